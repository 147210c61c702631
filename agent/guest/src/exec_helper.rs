//! The lean ExecProcess path: `/init` run again as `vc-exec` (argv[0]), a
//! single-threaded zygote whose children enter a running container and exec
//! the payload with the container's security context. It replaces
//! libcontainer's tenant set-up (state files, spec reload and validation,
//! three processes and their channels), which cost most of an exec.
//!
//! What it does mirrors libcontainer 0.7's tenant path, in its order:
//! oom_score_adj, non-dumpable, the container's cgroup, rlimits, the
//! container init's namespaces (time, pid, uts, ipc, net, cgroup, mnt: those
//! that differ from the agent's) and its root (`/proc/<pid>/root`: the
//! container was entered with MS_MOVE + chroot, so the mount namespace's
//! root is not the container's), then a fork (the PID namespace applies to
//! children only). The child: setsid, no_new_privs, umask, cwd, groups,
//! uid/gid with capabilities kept, fds past stdio close-on-exec, the
//! capability sets (libcontainer's own `drop_privileges`), HOME, the PATH
//! lookup, seccomp last (the no_new_privs retry of the tenant path's
//! executor) and execve.
//!
//! Processes: the agent starts one zygote (this binary as `vc-exec`, with
//! posix_spawn) on the first exec; for each exec it sends the zygote a new
//! control socket and the exec's stdio (SCM_RIGHTS). The zygote forks the
//! intermediate, which does the above and forks the payload process. So an
//! exec costs two forks of a small single-threaded process and one execve,
//! not a fork of the agent and an exec of its 15 MB binary.
//!
//! Protocol on the control socket: the agent writes the JSON [`Request`]
//! and shuts its write side; the intermediate answers `pid <n>\n` (the
//! payload's PID in the agent's namespace) and exits; the payload process
//! writes `error <message>` if anything fails before execve. The socket is
//! close-on-exec: the agent's EOF means the payload runs (or failed, with
//! the message before it). The payload is reparented to the agent (PID 1),
//! whose reaper collects its exit as it did libcontainer's detached tenant.

use std::{
    ffi::CString,
    io::{Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{
            fs::{MetadataExt, PermissionsExt},
            net::UnixStream,
            process::CommandExt,
        },
    },
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
};

use libcontainer::oci_spec::runtime::{LinuxCapabilities, LinuxSeccomp, Process};
use serde::{Deserialize, Serialize};

use crate::{reaper::Reaper, stdio::ChildStdio};

/// argv[0] of the helper personality.
pub const ARG0: &str = "vc-exec";

/// What the agent asks the helper to run.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    /// The container init's PID (in the agent's namespace).
    pub pid: i32,
    /// The container's cgroup directory; None: the init's own cgroup.
    pub cgroup: Option<PathBuf>,
    /// The exec's process: the container's with the exec's args, env, cwd.
    pub process: Process,
    /// The container's seccomp profile.
    pub seccomp: Option<LinuxSeccomp>,
}

/// Whether the process was started as the exec helper.
pub fn invoked() -> bool {
    std::env::args_os()
        .next()
        .is_some_and(|arg0| arg0 == std::ffi::OsStr::new(ARG0))
}

/// What the lean path does not do (libcontainer's tenant path does): such
/// processes go that way. Never set by this runtime's own specs.
pub fn unsupported(process: &Process) -> Option<&'static str> {
    if process.terminal() == Some(true) {
        // The pty comes through libcontainer's console socket (stdio.rs).
        return Some("terminal");
    }
    if process.apparmor_profile().is_some() {
        return Some("apparmor");
    }
    if process.selinux_label().is_some() {
        return Some("selinux");
    }
    if process.io_priority().is_some() {
        return Some("ioPriority");
    }
    if process.scheduler().is_some() {
        return Some("scheduler");
    }
    if process.exec_cpu_affinity().is_some() {
        return Some("execCPUAffinity");
    }
    None
}

// ---------------------------------------------------------------- agent side

/// The zygote's end of its request socket in the agent; None until the
/// first exec (and after it died: the next exec starts another).
static ZYGOTE: std::sync::Mutex<Option<OwnedFd>> = std::sync::Mutex::new(None);

/// Starts the zygote: this binary as `vc-exec`, its request socket on fd 0.
/// Spawned without a pre-exec hook, so std uses posix_spawn (no copy of
/// the agent's address space).
fn start_zygote() -> Result<OwnedFd, String> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| format!("zygote socket: {e}"))?;
    std::process::Command::new("/proc/self/exe")
        .arg0(ARG0)
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("start the exec zygote: {e}"))?;
    // Its exit (it only ends when this socket closes) is the reaper's.
    Ok(ours)
}

/// Hands the zygote one request's control socket and stdio.
fn to_zygote(fds: &[std::os::fd::RawFd; 4]) -> Result<(), String> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let mut zygote = ZYGOTE.lock().unwrap_or_else(|e| e.into_inner());
    let mut last = String::new();
    for _ in 0..2 {
        let sock = match zygote.take() {
            Some(sock) => sock,
            None => start_zygote()?,
        };
        let sent = sendmsg::<()>(
            sock.as_raw_fd(),
            &[std::io::IoSlice::new(b"x")],
            &[ControlMessage::ScmRights(fds)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        );
        match sent {
            Ok(_) => {
                *zygote = Some(sock);
                return Ok(());
            }
            // A zygote that died: once more with a new one.
            Err(e) => last = format!("exec zygote: {e}"),
        }
    }
    Err(last)
}

/// Starts `request` in its container with `stdio`; the payload's PID once
/// it was exec'd, or why it could not be.
pub fn spawn(request: &Request, stdio: ChildStdio, reaper: &Reaper) -> Result<i32, String> {
    let json = serde_json::to_vec(request).map_err(|e| format!("encode request: {e}"))?;
    let (mut ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    to_zygote(&[
        theirs.as_raw_fd(),
        stdio.stdin.as_raw_fd(),
        stdio.stdout.as_raw_fd(),
        stdio.stderr.as_raw_fd(),
    ])?;
    // The zygote has its copies: ours must go, or the pipes never end.
    drop(theirs);
    drop(stdio);
    let written = ours
        .write_all(&json)
        .and_then(|()| ours.shutdown(std::net::Shutdown::Write));
    let mut answer = String::new();
    let read = ours.read_to_string(&mut answer);
    let reply = parse_reply(&answer);
    if let (Some(pid), Some(_)) = (reply.pid, &reply.error) {
        // The payload process failed before its exec: its exit is nobody's.
        consume_exit(reaper, pid);
    }
    match reply {
        Reply {
            error: Some(msg), ..
        } => Err(msg),
        Reply { pid: Some(pid), .. } => Ok(pid),
        Reply { .. } => Err(match (written, read) {
            (Err(e), _) | (_, Err(e)) => format!("exec helper: {e}"),
            _ => "the exec helper exited without an answer".into(),
        }),
    }
}

/// Takes `pid`'s exit status off the reaper once it comes.
fn consume_exit(reaper: &Reaper, pid: i32) {
    let reaper = reaper.clone();
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            reaper.wait(pid).await;
        });
    }
}

/// The helper's answer: the payload's PID, and the error of either process.
#[derive(Debug, PartialEq, Eq)]
struct Reply {
    pid: Option<i32>,
    error: Option<String>,
}

fn parse_reply(answer: &str) -> Reply {
    let error = answer
        .find("error ")
        .map(|at| answer[at + "error ".len()..].trim_end().to_string());
    let pid = answer
        .lines()
        .find_map(|l| l.strip_prefix("pid ")?.trim().parse().ok());
    Reply { pid, error }
}

// --------------------------------------------------------------- helper side

/// `vc-exec`: the zygote. Single-threaded; for each request (a control
/// socket and three stdio fds on the socket at fd 0) it forks the
/// intermediate, which enters the container and exits once it has forked
/// the payload process; exited ones are collected before each request.
/// Ends when the agent's end closes.
pub fn main() -> ExitCode {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    loop {
        reap_finished();
        let mut byte = [0u8; 1];
        let mut iov = [std::io::IoSliceMut::new(&mut byte)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 4]);
        let msg = match recvmsg::<()>(0, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(msg) => msg,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return ExitCode::FAILURE,
        };
        if msg.bytes == 0 {
            return ExitCode::SUCCESS;
        }
        let mut fds: Vec<OwnedFd> = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for cmsg in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = cmsg {
                    // SAFETY: SCM_RIGHTS just installed these fds in this
                    // process; nothing else owns them.
                    fds.extend(
                        raw.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
        }
        let Ok([control, stdin, stdout, stderr]) = <[OwnedFd; 4]>::try_from(fds) else {
            continue;
        };
        // SAFETY: this process is single-threaded (a fresh exec of the
        // agent binary that started no thread), so the child may run any
        // code.
        match unsafe { nix::unistd::fork() } {
            Ok(nix::unistd::ForkResult::Child) => {
                let mut control = UnixStream::from(control);
                let done =
                    stdio_onto_012([stdin, stdout, stderr]).and_then(|()| enter(&mut control));
                if let Err(msg) = done {
                    let _ = control.write_all(format!("error {msg}").as_bytes());
                    std::process::exit(1);
                }
                std::process::exit(0);
            }
            Ok(nix::unistd::ForkResult::Parent { .. }) => {
                drop((control, stdin, stdout, stderr));
                reap_finished();
            }
            Err(e) => {
                let mut control = UnixStream::from(control);
                let _ = control.write_all(format!("error fork: {e}").as_bytes());
            }
        }
    }
}

/// Collects intermediates that have exited, never waiting for one: one
/// stuck in a container (a cgroup frozen meanwhile) must not hold up the
/// execs of others.
fn reap_finished() {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    loop {
        match waitpid(nix::unistd::Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => break,
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
}

/// The request's stdio becomes 0, 1, 2 (the zygote's socket and its
/// /dev/null go).
fn stdio_onto_012(stdio: [OwnedFd; 3]) -> Result<(), String> {
    for (target, fd) in stdio.iter().enumerate() {
        nix::unistd::dup2(fd.as_raw_fd(), target as i32).map_err(errno("stdio"))?;
    }
    Ok(())
}

fn errno(what: &str) -> impl Fn(nix::errno::Errno) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// The intermediate: cgroup, limits, namespaces and root; then the fork.
fn enter(control: &mut UnixStream) -> Result<(), String> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(control.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(errno("control socket"))?;
    let mut json = Vec::new();
    control
        .read_to_end(&mut json)
        .map_err(|e| format!("read request: {e}"))?;
    let req: Request = serde_json::from_slice(&json).map_err(|e| format!("request: {e}"))?;
    let process = &req.process;
    // As libcontainer's main process: the score first (its file is not
    // writable once non-dumpable), then non-dumpable so that nothing in the
    // namespaces we join can ptrace or read us before the exec.
    if let Some(score) = process.oom_score_adj() {
        std::fs::write("/proc/self/oom_score_adj", score.to_string())
            .map_err(|e| format!("oom_score_adj: {e}"))?;
    }
    nix::sys::prctl::set_dumpable(false).map_err(errno("non-dumpable"))?;
    // Before the cgroup namespace: the cgroup's root there is this one.
    let cgroup = match &req.cgroup {
        Some(dir) => dir.clone(),
        None => init_cgroup(req.pid)?,
    };
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .map_err(|e| format!("join cgroup {}: {e}", cgroup.display()))?;
    for rlimit in process.rlimits().iter().flatten() {
        let limit = libc::rlimit {
            rlim_cur: rlimit.soft(),
            rlim_max: rlimit.hard(),
        };
        // SAFETY: setrlimit reads one rlimit from a live local.
        if unsafe { libc::setrlimit(rlimit.typ() as u32, &limit) } != 0 {
            return Err(format!(
                "rlimit {:?}: {}",
                rlimit.typ(),
                std::io::Error::last_os_error()
            ));
        }
    }
    // Opened before any setns: /proc is the agent's.
    let mut joins = Vec::new();
    for ns in NAMESPACES {
        let theirs = format!("/proc/{}/ns/{}", req.pid, ns.name);
        let theirs_meta =
            std::fs::metadata(&theirs).map_err(|e| format!("container namespace {theirs}: {e}"))?;
        let ours_meta = std::fs::metadata(format!("/proc/self/ns/{}", ns.name))
            .map_err(|e| format!("own {} namespace: {e}", ns.name))?;
        if !differs(
            (theirs_meta.dev(), theirs_meta.ino()),
            (ours_meta.dev(), ours_meta.ino()),
        ) {
            continue;
        }
        if ns.flag == nix::sched::CloneFlags::CLONE_NEWUSER {
            return Err(
                "the container has a user namespace of its own, which exec does not join".into(),
            );
        }
        let fd = std::fs::File::open(&theirs).map_err(|e| format!("open {theirs}: {e}"))?;
        joins.push((ns, fd));
    }
    let root = std::fs::File::open(format!("/proc/{}/root", req.pid))
        .map_err(|e| format!("container root: {e}"))?;
    for (ns, fd) in &joins {
        nix::sched::setns(fd, ns.flag).map_err(|e| format!("setns {}: {e}", ns.name))?;
    }
    drop(joins);
    nix::unistd::fchdir(root.as_raw_fd()).map_err(errno("enter the container root"))?;
    nix::unistd::chroot(".").map_err(errno("chroot"))?;
    drop(root);
    // SAFETY: this process is single-threaded (a fresh exec of the agent
    // binary that started no thread), so the child may run any code.
    match unsafe { nix::unistd::fork() }.map_err(errno("fork"))? {
        nix::unistd::ForkResult::Parent { child } => {
            control
                .write_all(format!("pid {child}\n").as_bytes())
                .map_err(|e| format!("report pid: {e}"))?;
            Ok(())
        }
        nix::unistd::ForkResult::Child => {
            let err = payload(&req);
            let _ = control.write_all(format!("error {err}").as_bytes());
            std::process::exit(127);
        }
    }
}

struct Ns {
    name: &'static str,
    flag: nix::sched::CloneFlags,
}

/// The order libcontainer enters them in (user first, refused; mnt last but
/// for time, which needs the fork as pid does).
const NAMESPACES: &[Ns] = &[
    Ns {
        name: "user",
        flag: nix::sched::CloneFlags::CLONE_NEWUSER,
    },
    Ns {
        name: "time",
        flag: nix::sched::CloneFlags::from_bits_retain(libc::CLONE_NEWTIME),
    },
    Ns {
        name: "pid",
        flag: nix::sched::CloneFlags::CLONE_NEWPID,
    },
    Ns {
        name: "uts",
        flag: nix::sched::CloneFlags::CLONE_NEWUTS,
    },
    Ns {
        name: "ipc",
        flag: nix::sched::CloneFlags::CLONE_NEWIPC,
    },
    Ns {
        name: "net",
        flag: nix::sched::CloneFlags::CLONE_NEWNET,
    },
    Ns {
        name: "cgroup",
        flag: nix::sched::CloneFlags::CLONE_NEWCGROUP,
    },
    Ns {
        name: "mnt",
        flag: nix::sched::CloneFlags::CLONE_NEWNS,
    },
];

/// Whether a namespace file (device, inode) is another namespace.
fn differs(theirs: (u64, u64), ours: (u64, u64)) -> bool {
    theirs != ours
}

/// The cgroup v2 directory of `pid` (`0::/path` in /proc/<pid>/cgroup).
fn init_cgroup(pid: i32) -> Result<PathBuf, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|e| format!("container cgroup: {e}"))?;
    cgroup_v2_dir(&text).ok_or_else(|| format!("container cgroup: no v2 entry in {text:?}"))
}

fn cgroup_v2_dir(text: &str) -> Option<PathBuf> {
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let rel = rel.trim().trim_start_matches('/');
    if Path::new(rel)
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return None;
    }
    Some(Path::new("/sys/fs/cgroup").join(rel))
}

/// The payload process, inside every namespace: its security context, then
/// execve. Returns only on failure.
fn payload(req: &Request) -> String {
    match prepare_and_exec(req) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

enum Never {}

fn prepare_and_exec(req: &Request) -> Result<Never, String> {
    use libcontainer::syscall::syscall::create_syscall;
    use nix::unistd::{Gid, Uid};
    let process = &req.process;
    let syscall = create_syscall();
    nix::unistd::setsid().map_err(errno("setsid"))?;
    if process.no_new_privileges() == Some(true) {
        nix::sys::prctl::set_no_new_privs().map_err(errno("no_new_privs"))?;
    }
    let user = process.user();
    if let Some(umask) = user.umask() {
        let mode = nix::sys::stat::Mode::from_bits(umask)
            .ok_or_else(|| format!("invalid umask {umask:o}"))?;
        nix::sys::stat::umask(mode);
    }
    // Before the user changes (it may not reach the directory), after it
    // when root could not (EPERM: a root-squashing filesystem).
    let cwd = process.cwd();
    let chdir_later = match nix::unistd::chdir(cwd) {
        Ok(()) => false,
        Err(nix::errno::Errno::EPERM) => true,
        Err(e) => return Err(format!("chdir {}: {e}", cwd.display())),
    };
    let gids: Vec<Gid> = user
        .additional_gids()
        .iter()
        .flatten()
        .map(|g| Gid::from_raw(*g))
        .collect();
    if !gids.is_empty() {
        syscall
            .set_groups(&gids)
            .map_err(|e| format!("supplementary groups: {e}"))?;
    }
    syscall
        .set_id(Uid::from_raw(user.uid()), Gid::from_raw(user.gid()))
        .map_err(|e| format!("uid {} gid {}: {e}", user.uid(), user.gid()))?;
    syscall
        .close_range(0)
        .map_err(|e| format!("close-on-exec: {e}"))?;
    libcontainer::capabilities::reset_effective(syscall.as_ref())
        .map_err(|e| format!("effective capabilities: {e}"))?;
    if let Some(caps) = process.capabilities() {
        drop_capabilities(caps, syscall.as_ref())?;
    }
    if chdir_later {
        nix::unistd::chdir(cwd).map_err(|e| format!("chdir {}: {e}", cwd.display()))?;
    }
    nix::unistd::getcwd().map_err(errno("the working directory"))?;
    let env = environment(
        process.env().as_deref().unwrap_or_default(),
        user.uid(),
        libcontainer::utils::get_user_home,
    );
    let args = process.args().as_deref().unwrap_or_default();
    let name = args.first().ok_or("no command")?;
    let path_var = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .ok_or("PATH environment variable is not set")?;
    let exe = executable(name, path_var, |p| p.exists())
        .ok_or_else(|| format!("executable '{name}' not found in $PATH"))?;
    let meta = exe.metadata().map_err(|e| {
        format!("failed to check permissions for executable '{name}' at path '{exe:?}' : {e}")
    })?;
    if !(meta.is_file() && meta.permissions().mode() & 0o001 != 0) {
        return Err(format!(
            "executable '{name}' at path '{exe:?}' does not have correct permissions"
        ));
    }
    let c = |s: &str| CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"));
    let exe_c = CString::new(exe.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{exe:?} contains a NUL byte"))?;
    let argv = args.iter().map(|a| c(a)).collect::<Result<Vec<_>, _>>()?;
    let envp = env.iter().map(|e| c(e)).collect::<Result<Vec<_>, _>>()?;
    // Last, as close to the exec as can be (SeccompExecutor's order).
    if let Some(profile) = &req.seccomp {
        if libcontainer::seccomp::initialize_seccomp(profile).is_err() {
            nix::sys::prctl::set_no_new_privs().map_err(errno("no_new_privs"))?;
            libcontainer::seccomp::initialize_seccomp(profile)
                .map_err(|e| format!("seccomp: {e}"))?;
        }
    }
    let e = nix::unistd::execve(&exe_c, &argv, &envp).err();
    Err(format!(
        "error '{}' executing '{}'",
        e.map_or_else(|| "unknown".to_string(), |e| e.to_string()),
        exe.display()
    ))
}

/// The five sets as libcontainer sets them (bounding: all but these dropped;
/// then effective, permitted, inheritable, ambient where given).
fn drop_capabilities(
    caps: &LinuxCapabilities,
    syscall: &dyn libcontainer::syscall::Syscall,
) -> Result<(), String> {
    libcontainer::capabilities::drop_privileges(caps, syscall)
        .map_err(|e| format!("capabilities: {e}"))
}

/// The process's environment as libcontainer's init makes it: one value
/// per name (the last), and HOME from the user's passwd entry when unset
/// or empty.
fn environment(env: &[String], uid: u32, home: impl Fn(u32) -> Option<PathBuf>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(env.len() + 1);
    for kv in env {
        let key = kv.split('=').next().unwrap_or("");
        out.retain(|e| e.split('=').next().unwrap_or("") != key);
        out.push(kv.clone());
    }
    let has_home = out
        .iter()
        .any(|e| e.strip_prefix("HOME=").is_some_and(|v| !v.is_empty()));
    if !has_home {
        if let Some(dir) = home(uid).and_then(|d| d.to_str().map(str::to_string)) {
            out.retain(|e| !e.starts_with("HOME="));
            out.push(format!("HOME={dir}"));
        }
    }
    out
}

/// libcontainer's executable lookup: a name with a `/` as it is when it
/// exists, else the first `PATH` entry holding it.
fn executable(name: &str, path_var: &str, exists: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    if name.contains('/') && exists(Path::new(name)) {
        return Some(PathBuf::from(name));
    }
    path_var
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| exists(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request {
        let process: Process = serde_json::from_value(serde_json::json!({
            "args": ["/bin/true"],
            "env": ["PATH=/bin"],
            "cwd": "/",
            "user": { "uid": 1000, "gid": 1000, "additionalGids": [5] },
            "capabilities": {
                "bounding": ["CHOWN", "KILL"],
                "effective": ["CAP_CHOWN"],
                "permitted": ["CAP_CHOWN"],
            },
            "rlimits": [{ "type": "RLIMIT_NOFILE", "soft": 10, "hard": 20 }],
            "noNewPrivileges": true,
        }))
        .expect("process");
        let seccomp: LinuxSeccomp = serde_json::from_value(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{ "names": ["mkdir"], "action": "SCMP_ACT_ERRNO" }],
        }))
        .expect("seccomp");
        Request {
            pid: 42,
            cgroup: Some(PathBuf::from("/sys/fs/cgroup/vc/c1")),
            process,
            seccomp: Some(seccomp),
        }
    }

    #[test]
    fn requests_survive_the_pipe() {
        let req = request();
        let json = serde_json::to_vec(&req).expect("encode");
        let back: Request = serde_json::from_slice(&json).expect("decode");
        assert_eq!(back.pid, 42);
        assert_eq!(back.cgroup, req.cgroup);
        // Typed comparisons: capability sets are sets (no order in JSON).
        assert_eq!(back.process, req.process);
        assert_eq!(back.seccomp, req.seccomp);
        assert!(serde_json::from_slice::<Request>(b"{\"pid\": 1}").is_err());
        assert!(serde_json::from_slice::<Request>(b"garbage").is_err());
    }

    #[test]
    fn replies() {
        let reply = |pid: Option<i32>, error: Option<&str>| Reply {
            pid,
            error: error.map(String::from),
        };
        assert_eq!(parse_reply("pid 77\n"), reply(Some(77), None));
        assert_eq!(
            parse_reply("pid 77\nerror executable 'x' not found in $PATH"),
            reply(Some(77), Some("executable 'x' not found in $PATH"))
        );
        assert_eq!(
            parse_reply("error join cgroup /x: denied"),
            reply(None, Some("join cgroup /x: denied"))
        );
        assert_eq!(parse_reply(""), reply(None, None));
        assert_eq!(parse_reply("pid x\n"), reply(None, None));
    }

    #[test]
    fn path_lookup() {
        let have = |p: &Path| {
            ["/usr/bin/sh", "/bin/true", "./rel/x"]
                .iter()
                .any(|h| p == Path::new(h))
        };
        assert_eq!(
            executable("sh", "/bin:/usr/bin", have),
            Some(PathBuf::from("/usr/bin/sh"))
        );
        assert_eq!(
            executable("/bin/true", "/nowhere", have),
            Some(PathBuf::from("/bin/true"))
        );
        assert_eq!(
            executable("./rel/x", "", have),
            Some(PathBuf::from("./rel/x"))
        );
        assert_eq!(executable("nope", "/bin:/usr/bin", have), None);
        assert_eq!(executable("/usr/bin/nope", "/bin", have), None);
    }

    #[test]
    fn environment_is_deduplicated_with_home() {
        let env = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let home = |uid: u32| (uid == 1000).then(|| PathBuf::from("/home/u"));
        assert_eq!(
            environment(&env(&["PATH=/bin", "A=1", "A=2=3"]), 1000, home),
            env(&["PATH=/bin", "A=2=3", "HOME=/home/u"])
        );
        assert_eq!(
            environment(&env(&["HOME=/x"]), 1000, home),
            env(&["HOME=/x"]),
            "a HOME of its own stays"
        );
        assert_eq!(
            environment(&env(&["HOME="]), 1000, home),
            env(&["HOME=/home/u"]),
            "an empty HOME is replaced"
        );
        assert_eq!(environment(&env(&["A=1"]), 0, home), env(&["A=1"]));
    }

    #[test]
    fn namespaces_joined_only_when_different() {
        assert!(!differs((1, 4026531836), (1, 4026531836)));
        assert!(differs((1, 4026532000), (1, 4026531836)));
        let names: Vec<_> = NAMESPACES.iter().map(|n| n.name).collect();
        assert_eq!(
            names,
            ["user", "time", "pid", "uts", "ipc", "net", "cgroup", "mnt"]
        );
        assert_eq!(names.last(), Some(&"mnt"), "the mount namespace last");
    }

    #[test]
    fn cgroup_of_the_init() {
        assert_eq!(
            cgroup_v2_dir("0::/vc/c1\n"),
            Some(PathBuf::from("/sys/fs/cgroup/vc/c1"))
        );
        assert_eq!(
            cgroup_v2_dir("0::/\n"),
            Some(PathBuf::from("/sys/fs/cgroup/"))
        );
        assert_eq!(cgroup_v2_dir("1:cpu:/x\n"), None);
        assert_eq!(cgroup_v2_dir("0::/../x\n"), None);
    }

    #[test]
    fn what_goes_the_tenant_way() {
        let mut p = request().process;
        assert_eq!(unsupported(&p), None);
        p.set_terminal(Some(true));
        assert_eq!(unsupported(&p), Some("terminal"));
        p.set_terminal(Some(false));
        p.set_apparmor_profile(Some("x".into()));
        assert_eq!(unsupported(&p), Some("apparmor"));
    }

    #[test]
    fn capability_sets_as_given() {
        // The sets reach libcontainer's drop_privileges unchanged: what the
        // request carries is what the process gets.
        let p = request().process;
        let caps = p.capabilities().as_ref().expect("caps");
        let names = |s: &Option<libcontainer::oci_spec::runtime::Capabilities>| {
            let mut v: Vec<String> = s.iter().flatten().map(|c| c.to_string()).collect();
            v.sort();
            v
        };
        assert_eq!(names(caps.bounding()), ["CHOWN", "KILL"]);
        assert_eq!(names(caps.effective()), ["CHOWN"]);
        assert!(caps.ambient().is_none() || names(caps.ambient()).is_empty());
    }
}
