//! StatusSandbox and ListSandboxes. Reading needs no lock; only when the VM
//! is found dead is the sandbox locked to record that.

use crate::{
    sandbox::{Runtime, Sandbox, SandboxStatus, AGENT_CALL_TIMEOUT},
    state::SandboxState,
    Error, Result,
};

impl Sandbox {
    /// State, VM facts and — when the guest can answer — its details.
    pub async fn status(&self) -> Result<SandboxStatus> {
        let rt = self.runtime();
        let mut record = rt.inner.store.load(self.id())?;
        let vm = rt.restore_vm(&record)?;
        if let (Some(vm), true) = (&vm, record.state.vm_expected()) {
            if matches!(vm.status().await, Ok(hypervisor::VmStatus::Exited { .. })) {
                record = rt.locked(self.id()).await?.record.clone();
            }
        }
        let mut status = Runtime::summary(&record);
        if let (Some(vm), SandboxState::Ready | SandboxState::Running) = (&vm, record.state) {
            match rt.agent(self.id(), vm.as_ref()).await {
                Ok(agent) => match agent.guest_details(AGENT_CALL_TIMEOUT).await {
                    Ok(details) => status.guest = Some(details),
                    Err(err) => tracing::warn!(id = %self.id(), "guest details: {err}"),
                },
                Err(err) => tracing::warn!(id = %self.id(), "guest details: {err}"),
            }
        }
        Ok(status)
    }
}

impl Runtime {
    /// Every sandbox, sorted by ID, without asking the agents.
    pub async fn list_sandboxes(&self) -> Result<Vec<SandboxStatus>> {
        let mut out = Vec::new();
        for id in self.inner.store.ids()? {
            let record = match self.inner.store.load(&id) {
                Ok(record) => record,
                // Deleted while we listed.
                Err(Error::NotFound { .. }) => continue,
                Err(err) => return Err(err),
            };
            let vm = self.restore_vm(&record)?;
            let record = match (&vm, record.state.vm_expected()) {
                (Some(vm), true)
                    if matches!(vm.status().await, Ok(hypervisor::VmStatus::Exited { .. })) =>
                {
                    match self.locked(&id).await {
                        Ok(locked) => locked.record.clone(),
                        Err(Error::NotFound { .. }) => continue,
                        Err(err) => return Err(err),
                    }
                }
                _ => record,
            };
            out.push(Runtime::summary(&record));
        }
        Ok(out)
    }
}
