//! StopSandbox: agent shutdown, then the VMM's quit, then kill → `stopped`.
//! Idempotent: stopping a stopped sandbox succeeds.

use std::time::Duration;

use crate::{
    sandbox::{Runtime, Sandbox, SandboxStatus, AGENT_CALL_TIMEOUT},
    state::{Action, SandboxState},
    Result,
};

/// 128 + SIGKILL: what a shell reports for a killed process.
const KILLED_EXIT_CODE: i32 = 137;

impl Sandbox {
    pub async fn stop(&self) -> Result<SandboxStatus> {
        let rt = self.runtime();
        let mut s = rt.locked(self.id()).await?;
        if s.record.state == SandboxState::Stopped {
            return Ok(Runtime::summary(&s.record));
        }
        let next = s.transition(Action::Stop)?;
        if let Some(vm) = s.vm.clone() {
            let grace = hypervisor::DEFAULT_STOP_GRACE;
            // A paused guest cannot answer; go straight to the VMM.
            if s.record.state != SandboxState::Paused {
                match rt.agent(self.id(), vm.as_ref()).await {
                    Ok(agent) => match agent.shutdown(AGENT_CALL_TIMEOUT.min(grace)).await {
                        Ok(()) => {
                            // The guest powers off by itself; give it the grace period.
                            let _ = tokio::time::timeout(grace, vm.wait_exit()).await;
                        }
                        Err(err) => tracing::debug!(id = %self.id(), "agent shutdown: {err}"),
                    },
                    Err(err) => tracing::debug!(id = %self.id(), "agent shutdown: {err}"),
                }
            }
        }
        s.stop_vm(Duration::from_secs(2)).await?;
        rt.forget_agent(self.id());
        // Containers end with their VM, as if killed.
        let exits = crate::sandbox::end_containers(
            &mut s.record,
            KILLED_EXIT_CODE,
            None,
            "the pod sandbox was stopped while the container ran",
        );
        s.record.state = next;
        rt.inner.store.save(&s.record)?;
        let status = Runtime::summary(&s.record);
        drop(s);
        rt.announce(exits);
        tracing::info!(id = %self.id(), "sandbox stopped");
        Ok(status)
    }
}
