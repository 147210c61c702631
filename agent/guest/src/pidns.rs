//! The sandbox-wide PID and IPC namespaces: each made on first use by a
//! holder process that does nothing else. In the PID namespace it is PID 1,
//! so containers that share it see each other's processes and none of them
//! has to be an init; the IPC namespace is the pod's (Kubernetes' default:
//! its containers share SysV IPC and POSIX message queues).
//!
//! The holder is this binary run again as `vc-agent --pidns-holder` (or
//! `--ipcns-holder`) after unshare(CLONE_NEWPID or CLONE_NEWIPC): its first
//! child is in the new namespace (PID 1 of a new PID namespace); it reports
//! that child's PID on stdout and exits, and the child, orphaned, is reaped
//! by the agent if it ever dies.

use std::{io::Read, os::unix::process::CommandExt, process::Stdio};

use tokio::sync::OnceCell;

use crate::container::Failure;

pub const HOLDER_ARG: &str = "--pidns-holder";
pub const IPC_HOLDER_ARG: &str = "--ipcns-holder";

/// Which sandbox-wide namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Kind {
    #[default]
    Pid,
    Ipc,
}

#[derive(Debug, Clone, Default)]
pub struct PidNamespace {
    kind: Kind,
    holder: std::sync::Arc<OnceCell<i32>>,
}

impl PidNamespace {
    /// The sandbox-wide namespace of `kind`, not made yet.
    pub fn new(kind: Kind) -> Self {
        Self {
            kind,
            holder: Default::default(),
        }
    }

    /// `/proc/<holder>/ns/<pid|ipc>`: the path a container joins.
    pub async fn path(&self) -> Result<String, Failure> {
        let holder = self.holder().await?;
        let ns = match self.kind {
            Kind::Pid => "pid",
            Kind::Ipc => "ipc",
        };
        Ok(format!("/proc/{holder}/ns/{ns}"))
    }

    /// The PID (in the agent's namespace) of the namespace's PID 1.
    pub async fn holder(&self) -> Result<i32, Failure> {
        self.holder
            .get_or_try_init(|| async {
                let kind = self.kind;
                tokio::task::spawn_blocking(move || spawn_holder(kind))
                    .await
                    .map_err(|e| Failure::Internal(format!("pidns task: {e}")))?
            })
            .await
            .copied()
    }
}

fn spawn_holder(kind: Kind) -> Result<i32, Failure> {
    let fail = |e: &dyn std::fmt::Display| {
        Failure::Internal(format!("cannot make the sandbox {kind:?} namespace: {e}"))
    };
    let (arg, flag) = match kind {
        Kind::Pid => (HOLDER_ARG, nix::sched::CloneFlags::CLONE_NEWPID),
        Kind::Ipc => (IPC_HOLDER_ARG, nix::sched::CloneFlags::CLONE_NEWIPC),
    };
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: between fork and exec the closure only makes one syscall.
    unsafe {
        cmd.pre_exec(move || nix::sched::unshare(flag).map_err(Into::into));
    }
    // The agent's reaper collects the holder's exit; it is never waited on here.
    let mut child = cmd.spawn().map_err(|e| fail(&e))?;
    let mut out = String::new();
    child
        .stdout
        .take()
        .ok_or_else(|| fail(&"no stdout"))?
        .read_to_string(&mut out)
        .map_err(|e| fail(&e))?;
    out.trim()
        .parse::<i32>()
        .map_err(|_| fail(&format!("the holder said {out:?}")))
}

/// `vc-agent --pidns-holder`: fork the namespace's PID 1, print its PID.
pub fn run_holder() -> std::process::ExitCode {
    // SAFETY: this process has a single thread (nothing was started yet),
    // so the child may do anything after fork.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            // Not holding the pipe the agent reads the PID from.
            for fd in 0..3 {
                let _ = nix::unistd::close(fd);
            }
            loop {
                nix::unistd::pause();
            }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            println!("{child}");
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("vc-agent: fork: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}
