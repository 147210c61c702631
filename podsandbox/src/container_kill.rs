//! KillContainer, WaitContainer and StopContainer (signal, grace, SIGKILL).

use std::time::Duration;

use crate::{
    container::{ContainerState, ContainerStatus},
    sandbox::Runtime,
    Error, Result,
};

/// How long a waiter gives the container's monitor to record an exit.
const MONITOR_GRACE: Duration = Duration::from_secs(10);
/// How long a stop waits for the exit after SIGKILL: the kernel tears a
/// killed process down in milliseconds unless the guest is hung.
const KILL_WAIT: Duration = Duration::from_secs(10);

impl Runtime {
    /// Sends `signal` to the container's process (or all its processes).
    pub async fn kill_container(
        &self,
        sandbox_id: &str,
        id: &str,
        signal: u32,
        all: bool,
    ) -> Result<()> {
        let (_lock, _, agent) = self
            .container_agent(
                sandbox_id,
                id,
                "signal",
                &[ContainerState::Running, ContainerState::Paused],
            )
            .await?;
        agent
            .signal_container(id, "", signal, all)
            .await
            .map_err(|e| Error::from_agent(id, "signal", e))
    }

    /// Waits for the container's process to exit (holding no lock while it
    /// runs), then for its monitor to have put its output in the log and
    /// recorded the exit; returns the exit status.
    pub async fn wait_container(&self, sandbox_id: &str, id: &str) -> Result<i32> {
        let (agent, state, exit) = {
            let s = self.locked(sandbox_id).await?;
            let idx = s.container_index(id)?;
            let vm = s.vm()?.clone();
            let c = &s.record.containers[idx];
            (
                self.agent(sandbox_id, vm.as_ref()).await?,
                c.state,
                c.exit_code,
            )
        };
        match (state, exit) {
            (ContainerState::Stopped, Some(code)) => return Ok(code),
            (ContainerState::Created, _) => {
                return Err(Error::ContainerWrongState {
                    id: id.into(),
                    action: "wait for",
                    state,
                    hint: " (start it first)",
                })
            }
            _ => {}
        }
        let (code, reason) = agent
            .wait_container(id, "")
            .await
            .map_err(|e| Error::from_agent(id, "wait for", e))?;
        // The monitor records the exit once the output is in the log; give
        // it that time, then record it here if no monitor did.
        let deadline = tokio::time::Instant::now() + MONITOR_GRACE;
        while tokio::time::Instant::now() < deadline {
            let status = self.container_status(sandbox_id, id).await?;
            if status.state == ContainerState::Stopped {
                return Ok(status.exit_code.unwrap_or(code));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.record_exit(sandbox_id, id, code, reason).await?;
        Ok(code)
    }

    /// SIGTERM, then SIGKILL after `grace`; returns the exit status.
    pub async fn stop_container(&self, sandbox_id: &str, id: &str, grace: Duration) -> Result<i32> {
        let status = self.container_status(sandbox_id, id).await?;
        match status.state {
            ContainerState::Stopped => return Ok(status.exit_code.unwrap_or(0)),
            ContainerState::Created => {
                return Err(Error::ContainerWrongState {
                    id: id.into(),
                    action: "stop",
                    state: status.state,
                    hint: "",
                })
            }
            // A frozen process cannot act on TERM: thaw it first.
            ContainerState::Paused => {
                self.resume_container(sandbox_id, id).await?;
            }
            ContainerState::Running => {}
        }
        let term = nix::sys::signal::Signal::SIGTERM as u32;
        if let Some(done) = self
            .signal_then_wait(sandbox_id, id, term, false, grace)
            .await
        {
            return done;
        }
        let kill = nix::sys::signal::Signal::SIGKILL as u32;
        match self
            .signal_then_wait(sandbox_id, id, kill, true, KILL_WAIT)
            .await
        {
            Some(done) => done,
            None => Err(Error::StopTimeout {
                id: id.into(),
                secs: KILL_WAIT.as_secs(),
            }),
        }
    }

    /// One step of a stop: `signal`, then up to `wait` for the exit. `None`
    /// when the container still runs after `wait`; a signal that fails
    /// because the container ended meanwhile is the stop's success.
    async fn signal_then_wait(
        &self,
        sandbox_id: &str,
        id: &str,
        signal: u32,
        all: bool,
        wait: Duration,
    ) -> Option<Result<i32>> {
        if let Err(err) = self.kill_container(sandbox_id, id, signal, all).await {
            return Some(self.ended_anyway(sandbox_id, id, err).await);
        }
        tokio::time::timeout(wait, self.wait_container(sandbox_id, id))
            .await
            .ok()
    }

    /// A signal failed: if that is because the container ended meanwhile
    /// (or its VM died, which ends it: see `Runtime::vm_gone`), the stop
    /// succeeded; otherwise the signal's error stands.
    async fn ended_anyway(&self, sandbox_id: &str, id: &str, err: Error) -> Result<i32> {
        // Under the lock the record is reconciled with the VM.
        drop(self.locked(sandbox_id).await?);
        let status = self.container_status(sandbox_id, id).await?;
        match (status.state, status.exit_code) {
            (ContainerState::Stopped, code) => Ok(code.unwrap_or(crate::VM_EXIT_CODE)),
            _ => Err(err),
        }
    }

    pub async fn container_status(&self, sandbox_id: &str, id: &str) -> Result<ContainerStatus> {
        let record = self.inner.store.load(sandbox_id)?;
        record
            .containers
            .iter()
            .find(|c| c.id == id)
            .map(|c| c.status(sandbox_id))
            .ok_or_else(|| Error::ContainerNotFound {
                sandbox: sandbox_id.into(),
                id: id.into(),
            })
    }

    pub async fn list_containers(&self, sandbox_id: &str) -> Result<Vec<ContainerStatus>> {
        let record = self.inner.store.load(sandbox_id)?;
        Ok(record
            .containers
            .iter()
            .map(|c| c.status(sandbox_id))
            .collect())
    }
}
