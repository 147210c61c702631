//! The sandbox-wide PID namespace: made on first use by a holder process
//! that is its PID 1 and does nothing else, so containers that share it see
//! each other's processes and none of them has to be an init.
//!
//! The holder is this binary run again as `vc-agent --pidns-holder` after
//! unshare(CLONE_NEWPID): its first child is PID 1 of the new namespace; it
//! reports that child's PID on stdout and exits, and the child, orphaned,
//! is reaped by the agent if it ever dies.

use std::{io::Read, os::unix::process::CommandExt, process::Stdio};

use tokio::sync::OnceCell;

use crate::container::Failure;

pub const HOLDER_ARG: &str = "--pidns-holder";

#[derive(Debug, Clone, Default)]
pub struct PidNamespace {
    holder: std::sync::Arc<OnceCell<i32>>,
}

impl PidNamespace {
    /// The PID (in the agent's namespace) of the namespace's PID 1.
    pub async fn holder(&self) -> Result<i32, Failure> {
        self.holder
            .get_or_try_init(|| async {
                tokio::task::spawn_blocking(spawn_holder)
                    .await
                    .map_err(|e| Failure::Internal(format!("pidns task: {e}")))?
            })
            .await
            .copied()
    }
}

fn spawn_holder() -> Result<i32, Failure> {
    let fail = |e: &dyn std::fmt::Display| {
        Failure::Internal(format!("cannot make the sandbox PID namespace: {e}"))
    };
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.arg(HOLDER_ARG)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: between fork and exec the closure only makes one syscall.
    unsafe {
        cmd.pre_exec(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID).map_err(Into::into)
        });
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
