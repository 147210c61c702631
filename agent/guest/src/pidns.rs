//! The sandbox-wide PID and IPC namespaces, both held by one process that
//! does nothing else. In the PID namespace it is PID 1, so containers that
//! share it see each other's processes and none of them has to be an init;
//! the IPC namespace is the pod's (Kubernetes' default: its containers
//! share SysV IPC and POSIX message queues).
//!
//! The holder is this binary run again as `vc-agent --pidns-holder` after
//! unshare(CLONE_NEWPID | CLONE_NEWIPC): its first child is in both new
//! namespaces (PID 1 of the new PID namespace); it reports that child's PID
//! on stdout and exits, and the child, orphaned, is reaped by the agent if
//! it ever dies. Made once, ahead ([`SandboxNamespaces::make_ahead`], at
//! agent start): a fork and an exec cost ~250 ms under TCG, which would
//! otherwise be the first container's; a warm or template VM has it made
//! before any pod claims it.

use std::{io::Read, os::unix::process::CommandExt, process::Stdio};

use tokio::sync::OnceCell;

use crate::container::Failure;

pub const HOLDER_ARG: &str = "--pidns-holder";

/// Which sandbox-wide namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Pid,
    Ipc,
}

/// The pod's PID and IPC namespaces (one holder process for both).
#[derive(Debug, Clone, Default)]
pub struct SandboxNamespaces {
    holder: std::sync::Arc<OnceCell<i32>>,
}

impl SandboxNamespaces {
    /// Starts making the holder in the background; [`Self::path`] waits
    /// for it (and tries again if this failed).
    pub fn make_ahead(&self) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(err) = this.holder().await {
                tracing::warn!("sandbox namespaces made ahead: {err:?}");
            }
        })
    }

    /// `/proc/<holder>/ns/<pid|ipc>`: the path a container joins.
    pub async fn path(&self, kind: Kind) -> Result<String, Failure> {
        let holder = self.holder().await?;
        let ns = match kind {
            Kind::Pid => "pid",
            Kind::Ipc => "ipc",
        };
        Ok(format!("/proc/{holder}/ns/{ns}"))
    }

    /// The PID (in the agent's namespace) of the namespaces' holder.
    pub async fn holder(&self) -> Result<i32, Failure> {
        self.holder
            .get_or_try_init(|| async {
                tokio::task::spawn_blocking(spawn_holder)
                    .await
                    .map_err(|e| Failure::Internal(format!("namespace holder task: {e}")))?
            })
            .await
            .copied()
    }
}

fn spawn_holder() -> Result<i32, Failure> {
    let started = std::time::Instant::now();
    let fail = |e: &dyn std::fmt::Display| {
        Failure::Internal(format!(
            "cannot make the sandbox PID and IPC namespaces: {e}"
        ))
    };
    let flags = nix::sched::CloneFlags::CLONE_NEWPID | nix::sched::CloneFlags::CLONE_NEWIPC;
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.arg(HOLDER_ARG)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: between fork and exec the closure only makes one syscall.
    unsafe {
        cmd.pre_exec(move || nix::sched::unshare(flags).map_err(Into::into));
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
    let pid = out
        .trim()
        .parse::<i32>()
        .map_err(|_| fail(&format!("the holder said {out:?}")))?;
    tracing::debug!(
        pid,
        ms = started.elapsed().as_millis() as u64,
        "sandbox PID and IPC namespaces made"
    );
    Ok(pid)
}

/// `vc-agent --pidns-holder`: fork the namespaces' PID 1, print its PID.
pub fn run_holder() -> std::process::ExitCode {
    // SAFETY: this process has a single thread (nothing was started yet),
    // so the child may do anything after fork.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            // Not holding the pipe the agent reads the PID from.
            for fd in 0..3 {
                let _ = nix::unistd::close(fd);
            }
            // PID 1 of the namespace inherits its orphans: ignoring
            // SIGCHLD has the kernel reap them, so none stays a zombie.
            // SAFETY: SIG_IGN runs no handler code.
            let _ = unsafe {
                nix::sys::signal::signal(
                    nix::sys::signal::Signal::SIGCHLD,
                    nix::sys::signal::SigHandler::SigIgn,
                )
            };
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
