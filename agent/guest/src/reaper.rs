//! PID 1 duty: reap every orphan that exits, so no zombie accumulates.
//! Containers (a later issue) will take their own children's statuses from here.

use nix::{
    errno::Errno,
    sys::wait::{waitpid, WaitPidFlag, WaitStatus},
    unistd::Pid,
};
use tokio::signal::unix::{signal, SignalKind};

pub fn spawn() -> anyhow::Result<()> {
    let mut sigchld = signal(SignalKind::child())?;
    tokio::spawn(async move {
        while sigchld.recv().await.is_some() {
            reap_all();
        }
    });
    Ok(())
}

fn reap_all() {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(status) => tracing::debug!(?status, "reaped"),
            Err(Errno::EINTR) => continue,
            Err(err) => {
                tracing::warn!("waitpid: {err}");
                return;
            }
        }
    }
}
