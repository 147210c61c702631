//! Containers inside the VM, run by youki's libcontainer from OCI specs.
//!
//! Each container gets a bundle under /run/vc/bundles/<id> (its config.json
//! pointing at the rootfs in the shared filesystem), libcontainer state
//! under /run/vc/containers, and pipes for stdout and stderr that the host
//! drains with ReadStdout / ReadStderr.

use std::{
    collections::HashMap,
    os::fd::{AsRawFd, OwnedFd},
    path::{Component, Path, PathBuf},
    sync::{Arc, Mutex},
};

use agent::protocol::agent as pb;
use libcontainer::{
    container::{builder::ContainerBuilder, Container},
    signal::Signal,
    syscall::syscall::SyscallType,
};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tokio::{io::AsyncReadExt, net::unix::pipe};

use crate::{reaper::Reaper, storage::Storage};

const BUNDLES: &str = "/run/vc/bundles";

/// libcontainer's create changes the whole process's working directory
/// while it sets up sockets: one create at a time.
static CREATE: Mutex<()> = Mutex::new(());
const STATE: &str = "/run/vc/containers";

/// Why a container call failed; becomes a ttrpc status.
#[derive(Debug)]
pub enum Failure {
    InvalidArgument(String),
    NotFound(String),
    AlreadyExists(String),
    FailedPrecondition(String),
    Internal(String),
}

type Result<T> = std::result::Result<T, Failure>;

type Output = Option<Arc<tokio::sync::Mutex<pipe::Receiver>>>;

/// A process started by ExecProcess.
struct Exec {
    pid: i32,
    stdout: Output,
    stderr: Output,
}

struct Entry {
    container: Container,
    /// The container's cgroup directory (from the spec's cgroupsPath).
    cgroup: Option<PathBuf>,
    stdout: Output,
    stderr: Output,
    execs: HashMap<String, Exec>,
}

impl Entry {
    /// The output streams of the init process (`exec_id` empty) or an exec.
    fn streams(&self, exec_id: &str) -> Result<(Output, Output)> {
        if exec_id.is_empty() {
            return Ok((self.stdout.clone(), self.stderr.clone()));
        }
        self.execs
            .get(exec_id)
            .map(|e| (e.stdout.clone(), e.stderr.clone()))
            .ok_or_else(|| Failure::NotFound(format!("exec {exec_id} not found")))
    }
}

#[derive(Clone)]
pub struct Containers {
    entries: Arc<Mutex<HashMap<String, Arc<Mutex<Entry>>>>>,
    storage: Storage,
    reaper: Reaper,
}

impl std::fmt::Debug for Containers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Containers")
    }
}

/// Container and exec IDs become directory names.
fn check_id(id: &str) -> Result<()> {
    if agent::valid_id(id) {
        Ok(())
    } else {
        Err(Failure::InvalidArgument(format!("invalid ID {id:?}")))
    }
}

/// A path relative to the shared filesystem, without `..` or a root.
fn shared_path(rel: &str) -> Result<PathBuf> {
    let rel_path = Path::new(rel);
    if rel.is_empty()
        || !rel_path
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(Failure::InvalidArgument(format!(
            "rootfs {rel:?} must be a relative path inside the shared filesystem"
        )));
    }
    Ok(Path::new(agent::SHARED_FS_GUEST_PATH).join(rel_path))
}

/// The stdio of a process libcontainer starts: stdin from /dev/null, stdout
/// and stderr into pipes whose read ends the host drains.
struct ChildStdio {
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

/// A libcontainer builder for container `id` with our state root and `stdio`.
fn builder(
    id: String,
    stdio: ChildStdio,
) -> std::result::Result<ContainerBuilder, libcontainer::error::LibcontainerError> {
    Ok(ContainerBuilder::new(id, SyscallType::default())
        .with_root_path(STATE)?
        .with_stdin(stdio.stdin)
        .with_stdout(stdio.stdout)
        .with_stderr(stdio.stderr))
}

fn stdio_pipes() -> Result<(Output, Output, ChildStdio)> {
    let (stdout_r, stdout) = pipe_pair()?;
    let (stderr_r, stderr) = pipe_pair()?;
    let stdin = std::fs::File::open("/dev/null")
        .map_err(|e| Failure::Internal(format!("/dev/null: {e}")))?
        .into();
    let wrap = |r| Some(Arc::new(tokio::sync::Mutex::new(r)));
    Ok((
        wrap(stdout_r),
        wrap(stderr_r),
        ChildStdio {
            stdin,
            stdout,
            stderr,
        },
    ))
}

/// A pipe whose read end is non-blocking (for tokio) and write end blocking
/// (for the container).
fn pipe_pair() -> Result<(pipe::Receiver, OwnedFd)> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| Failure::Internal(format!("pipe: {e}")))?;
    fcntl(read.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
        .map_err(|e| Failure::Internal(format!("fcntl: {e}")))?;
    let receiver =
        pipe::Receiver::from_owned_fd(read).map_err(|e| Failure::Internal(format!("pipe: {e}")))?;
    Ok((receiver, write))
}

impl Containers {
    pub fn new(storage: Storage, reaper: Reaper) -> Self {
        Self {
            entries: Arc::default(),
            storage,
            reaper,
        }
    }

    fn get(&self, id: &str) -> Result<Arc<Mutex<Entry>>> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| Failure::NotFound(format!("container {id} not found")))
    }

    pub async fn create(&self, id: &str, spec_json: &[u8], rootfs: &str) -> Result<()> {
        check_id(id)?;
        let rootfs = shared_path(rootfs)?;
        if self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id)
        {
            return Err(Failure::AlreadyExists(format!(
                "container {id} already exists"
            )));
        }
        self.storage
            .shared()
            .await
            .map_err(Failure::FailedPrecondition)?;
        if !rootfs.is_dir() {
            return Err(Failure::InvalidArgument(format!(
                "rootfs {} is not a directory in the guest",
                rootfs.display()
            )));
        }
        let mut spec: serde_json::Value = serde_json::from_slice(spec_json)
            .map_err(|e| Failure::InvalidArgument(format!("OCI spec is not valid JSON: {e}")))?;
        let root = spec
            .as_object_mut()
            .ok_or_else(|| Failure::InvalidArgument("OCI spec must be a JSON object".into()))?
            .entry("root")
            .or_insert_with(|| serde_json::json!({}));
        root["path"] = serde_json::Value::String(rootfs.display().to_string());
        let cgroup = spec["linux"]["cgroupsPath"]
            .as_str()
            .filter(|p| p.starts_with('/') && !p.contains(".."))
            .map(|p| Path::new("/sys/fs/cgroup").join(p.trim_start_matches('/')));
        let bundle = Path::new(BUNDLES).join(id);
        std::fs::create_dir_all(&bundle)
            .map_err(|e| Failure::Internal(format!("mkdir bundle: {e}")))?;
        std::fs::create_dir_all(STATE)
            .map_err(|e| Failure::Internal(format!("mkdir state: {e}")))?;
        let config = serde_json::to_vec(&spec).map_err(|e| Failure::Internal(e.to_string()))?;
        std::fs::write(bundle.join("config.json"), config)
            .map_err(|e| Failure::Internal(format!("write config: {e}")))?;

        let (stdout_r, stderr_r, stdio) = stdio_pipes()?;
        let id_owned = id.to_string();
        let bundle_for_build = bundle.clone();
        let built = tokio::task::spawn_blocking(move || {
            let _one_at_a_time = CREATE.lock().unwrap_or_else(|e| e.into_inner());
            builder(id_owned, stdio)
                .map(|b| {
                    b.as_init(&bundle_for_build)
                        .with_systemd(false)
                        // The guest's root is the initramfs (rootfs), which
                        // pivot_root(2) cannot move: enter the container's
                        // root with MS_MOVE + chroot instead.
                        .with_no_pivot(true)
                        .with_detach(true)
                })
                .and_then(|b| b.build())
        })
        .await
        .map_err(|e| Failure::Internal(format!("create task: {e}")))?;
        let container = match built {
            Ok(c) => c,
            Err(err) => {
                let _ = std::fs::remove_dir_all(&bundle);
                let _ = std::fs::remove_dir_all(Path::new(STATE).join(id));
                return Err(Failure::InvalidArgument(format!(
                    "cannot create container {id}: {err}"
                )));
            }
        };
        let entry = Entry {
            container,
            cgroup,
            stdout: stdout_r,
            stderr: stderr_r,
            execs: HashMap::new(),
        };
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), Arc::new(Mutex::new(entry)));
        Ok(())
    }

    pub async fn start(&self, id: &str) -> Result<()> {
        let entry = self.get(id)?;
        tokio::task::spawn_blocking(move || {
            let mut e = entry.lock().unwrap_or_else(|e| e.into_inner());
            if !e.container.can_start() {
                return Err(Failure::FailedPrecondition(format!(
                    "container {} cannot be started: it is {:?}",
                    e.container.id(),
                    e.container.status()
                )));
            }
            e.container
                .start()
                .map_err(|err| Failure::Internal(format!("start: {err}")))
        })
        .await
        .map_err(|e| Failure::Internal(format!("start task: {e}")))?
    }

    pub async fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let entry = self.get(id)?;
        if !exec_id.is_empty() {
            let pid = entry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .execs
                .get(exec_id)
                .map(|e| e.pid)
                .ok_or_else(|| Failure::NotFound(format!("exec {exec_id} not found")))?;
            let sig = i32::try_from(signal)
                .ok()
                .and_then(|s| nix::sys::signal::Signal::try_from(s).ok())
                .ok_or_else(|| Failure::InvalidArgument(format!("invalid signal {signal}")))?;
            return match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
                Err(e) => Err(Failure::Internal(format!("kill: {e}"))),
            };
        }
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or_else(|| Failure::InvalidArgument(format!("invalid signal {signal}")))?;
        tokio::task::spawn_blocking(move || {
            let mut e = entry.lock().unwrap_or_else(|e| e.into_inner());
            e.container
                .kill(sig, all)
                .map_err(|err| Failure::FailedPrecondition(format!("signal: {err}")))
        })
        .await
        .map_err(|e| Failure::Internal(format!("signal task: {e}")))?
    }

    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<i32> {
        let entry = self.get(id)?;
        if !exec_id.is_empty() {
            let pid = entry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .execs
                .get(exec_id)
                .map(|e| e.pid)
                .ok_or_else(|| Failure::NotFound(format!("exec {exec_id} not found")))?;
            let status = self.reaper.wait(pid).await;
            // Its output ends with it; forget it once waited for.
            entry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .execs
                .remove(exec_id);
            return Ok(status);
        }
        let pid = entry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .container
            .pid()
            .ok_or_else(|| Failure::FailedPrecondition(format!("container {id} has no process")))?;
        Ok(self.reaper.wait(pid.as_raw()).await)
    }

    /// Resource usage from the container's cgroup.
    pub fn stats(&self, id: &str) -> Result<pb::StatsContainerResponse> {
        let entry = self.get(id)?;
        let dir = entry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cgroup
            .clone()
            .ok_or_else(|| Failure::FailedPrecondition(format!("container {id} has no cgroup")))?;
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        Ok(parse_stats(
            &read("cpu.stat"),
            &read("memory.current"),
            &read("memory.stat"),
            &read("memory.max"),
            &read("pids.current"),
            &read("io.stat"),
        ))
    }

    /// Freezes (`pause`) or thaws the container's processes.
    pub async fn freeze(&self, id: &str, pause: bool) -> Result<()> {
        let entry = self.get(id)?;
        tokio::task::spawn_blocking(move || {
            let mut e = entry.lock().unwrap_or_else(|e| e.into_inner());
            let done = if pause {
                e.container.pause()
            } else {
                e.container.resume()
            };
            done.map_err(|err| {
                Failure::FailedPrecondition(format!(
                    "{}: {err}",
                    if pause { "pause" } else { "resume" }
                ))
            })
        })
        .await
        .map_err(|e| Failure::Internal(format!("freeze task: {e}")))?
    }

    /// Whether the kernel's OOM killer has killed a process of the
    /// container (its cgroup's memory.events).
    pub fn oom_killed(&self, id: &str) -> bool {
        let Ok(entry) = self.get(id) else {
            return false;
        };
        let cgroup = entry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cgroup
            .clone();
        cgroup
            .and_then(|dir| std::fs::read_to_string(dir.join("memory.events")).ok())
            .is_some_and(|events| oom_kills(&events) > 0)
    }

    pub async fn remove(&self, id: &str, force: bool) -> Result<()> {
        let entry = self.get(id)?;
        tokio::task::spawn_blocking(move || {
            let mut e = entry.lock().unwrap_or_else(|e| e.into_inner());
            e.stdout = None;
            e.stderr = None;
            e.container
                .delete(force)
                .map_err(|err| Failure::FailedPrecondition(format!("remove: {err}")))
        })
        .await
        .map_err(|e| Failure::Internal(format!("remove task: {e}")))??;
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        let _ = std::fs::remove_dir_all(Path::new(BUNDLES).join(id));
        Ok(())
    }

    /// Starts `args` in the running container `id` as process `exec_id`.
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        args: Vec<String>,
        env: Vec<String>,
        cwd: String,
    ) -> Result<()> {
        check_id(exec_id)?;
        if args.is_empty() {
            return Err(Failure::InvalidArgument("exec: no command".into()));
        }
        let entry = self.get(id)?;
        if entry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .execs
            .contains_key(exec_id)
        {
            return Err(Failure::AlreadyExists(format!(
                "exec {exec_id} already exists"
            )));
        }
        let (stdout_r, stderr_r, stdio) = stdio_pipes()?;
        let env: HashMap<String, String> = env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let id_owned = id.to_string();
        let pid = tokio::task::spawn_blocking(move || {
            let _one_at_a_time = CREATE.lock().unwrap_or_else(|e| e.into_inner());
            builder(id_owned, stdio)
                .map(|b| {
                    b.as_tenant()
                        .with_container_args(args)
                        .with_env(env)
                        .with_cwd((!cwd.is_empty()).then(|| PathBuf::from(cwd)))
                        .with_detach(true)
                })
                .and_then(|b| b.build())
        })
        .await
        .map_err(|e| Failure::Internal(format!("exec task: {e}")))?
        .map_err(|err| {
            Failure::FailedPrecondition(format!("cannot exec in container {id}: {err}"))
        })?;
        let exec = Exec {
            pid: pid.as_raw(),
            stdout: stdout_r,
            stderr: stderr_r,
        };
        entry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .execs
            .insert(exec_id.to_string(), exec);
        Ok(())
    }

    /// Up to `max` bytes of stdout (or stderr); empty with `eof` at the end.
    pub async fn read(
        &self,
        id: &str,
        exec_id: &str,
        stderr: bool,
        max: usize,
    ) -> Result<(Vec<u8>, bool)> {
        let entry = self.get(id)?;
        let stream = {
            let e = entry.lock().unwrap_or_else(|e| e.into_inner());
            let (out, err) = e.streams(exec_id)?;
            if stderr {
                err
            } else {
                out
            }
        };
        let Some(stream) = stream else {
            return Ok((Vec::new(), true));
        };
        let mut buf = vec![0u8; max.clamp(1, 1 << 20)];
        let n = stream
            .lock()
            .await
            .read(&mut buf)
            .await
            .map_err(|e| Failure::Internal(format!("read: {e}")))?;
        buf.truncate(n);
        Ok((buf, n == 0))
    }
}

/// `key value` lines (cpu.stat, memory.stat): the value of `key`.
fn keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn parse_stats(
    cpu: &str,
    mem_current: &str,
    mem_stat: &str,
    mem_max: &str,
    pids: &str,
    io: &str,
) -> pb::StatsContainerResponse {
    // io.stat: "8:0 rbytes=1 wbytes=2 rios=3 ..." per device.
    let io_sum = |field: &str| -> u64 {
        io.split_whitespace()
            .filter_map(|kv| {
                kv.strip_prefix(field)?
                    .strip_prefix('=')?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    };
    let mut st = pb::StatsContainerResponse::new();
    st.cpu_usage_usec = keyed(cpu, "usage_usec");
    st.memory_usage_bytes = mem_current.trim().parse().unwrap_or(0);
    st.memory_anon_bytes = keyed(mem_stat, "anon");
    st.memory_file_bytes = keyed(mem_stat, "file");
    st.memory_limit_bytes = mem_max.trim().parse().unwrap_or(0); // "max" → 0
    st.pids_current = pids.trim().parse().unwrap_or(0);
    st.io_read_bytes = io_sum("rbytes");
    st.io_write_bytes = io_sum("wbytes");
    st
}

/// The `oom_kill` count of a cgroup v2 memory.events file.
fn oom_kills(events: &str) -> u64 {
    events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_stats_parse() {
        let st = parse_stats(
            "usage_usec 1234\nuser_usec 1000\n",
            "4096\n",
            "anon 100\nfile 200\nanon_thp 0\n",
            "max\n",
            "3\n",
            "254:0 rbytes=10 wbytes=20 rios=1 wios=2\n254:16 rbytes=5 wbytes=0\n",
        );
        assert_eq!(st.cpu_usage_usec, 1234);
        assert_eq!(
            (
                st.memory_usage_bytes,
                st.memory_anon_bytes,
                st.memory_file_bytes
            ),
            (4096, 100, 200)
        );
        assert_eq!(st.memory_limit_bytes, 0);
        assert_eq!(st.pids_current, 3);
        assert_eq!((st.io_read_bytes, st.io_write_bytes), (15, 20));
    }

    #[test]
    fn memory_events() {
        let text = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(oom_kills(text), 1);
        assert_eq!(oom_kills("oom 0\n"), 0);
    }

    #[test]
    fn rootfs_paths_stay_inside_the_shared_fs() {
        assert_eq!(
            shared_path("c1/rootfs").ok(),
            Some(PathBuf::from("/run/vc/shared/c1/rootfs"))
        );
        for bad in ["", "/etc", "../x", "c1/../../x", "./c1"] {
            assert!(shared_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn container_ids() {
        assert!(check_id("c1").is_ok());
        for bad in ["", "../x", "a/b", ".x"] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }
}
