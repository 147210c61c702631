//! PID 1 duty: reap every child and orphan that exits, and keep the exit
//! statuses of those someone waits for (container init processes).
//!
//! libcontainer waits for its own intermediate process and tolerates this
//! reaper having taken it first (ECHILD), so one `waitpid(-1)` loop serves all.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use nix::{
    errno::Errno,
    sys::wait::{waitpid, WaitPidFlag, WaitStatus},
    unistd::Pid,
};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
};

/// How many unclaimed exit statuses are kept (orphans nobody waits for).
const KEEP: usize = 4096;

/// Exit statuses by PID, in the shell's convention: the exit code, or
/// 128 + the signal number.
#[derive(Debug, Clone, Default)]
pub struct Reaper {
    exits: Arc<Mutex<HashMap<i32, i32>>>,
    /// Bumped on every reaped batch; waiters re-check the map.
    tick: Arc<watch::Sender<u64>>,
}

impl Reaper {
    pub fn spawn() -> anyhow::Result<Self> {
        let reaper = Self {
            exits: Arc::default(),
            tick: Arc::new(watch::channel(0).0),
        };
        let mut sigchld = signal(SignalKind::child())?;
        let r = reaper.clone();
        tokio::spawn(async move {
            // Children that exited before the handler was installed.
            r.reap_all();
            while sigchld.recv().await.is_some() {
                r.reap_all();
            }
        });
        Ok(reaper)
    }

    fn reap_all(&self) {
        let mut reaped = false;
        loop {
            let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, code),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, 128 + sig as i32),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(err) => {
                    tracing::warn!("waitpid: {err}");
                    break;
                }
            };
            let mut exits = self.exits.lock().unwrap_or_else(|e| e.into_inner());
            if exits.len() >= KEEP {
                exits.clear();
            }
            exits.insert(pid.as_raw(), status);
            reaped = true;
        }
        if reaped {
            self.tick.send_modify(|t| *t = t.wrapping_add(1));
        }
    }

    /// Waits for `pid` to exit and returns its status (once: it is consumed).
    pub async fn wait(&self, pid: i32) -> i32 {
        let mut rx = self.tick.subscribe();
        loop {
            if let Some(status) = self
                .exits
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&pid)
            {
                return status;
            }
            if rx.changed().await.is_err() {
                // The reaper is gone (never, in practice): poll instead.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
