//! PauseSandbox and ResumeSandbox: freeze and thaw the VM's vCPUs.

use crate::{
    sandbox::{Runtime, Sandbox, SandboxStatus},
    state::Action,
    Error, Result,
};

impl Sandbox {
    pub async fn pause(&self) -> Result<SandboxStatus> {
        self.freeze(Action::Pause).await
    }

    pub async fn resume(&self) -> Result<SandboxStatus> {
        self.freeze(Action::Resume).await
    }

    async fn freeze(&self, action: Action) -> Result<SandboxStatus> {
        let rt = self.runtime();
        let mut s = rt.locked(self.id()).await?;
        let next = s.transition(action)?;
        let vm = s.vm()?;
        let done = match action {
            Action::Pause => vm.pause().await,
            _ => vm.resume().await,
        };
        done.map_err(|source| Error::Hypervisor {
            id: self.id().into(),
            source,
        })?;
        s.record.state = next;
        rt.inner.store.save(&s.record)?;
        tracing::info!(id = %self.id(), state = %next, "sandbox {}", action.verb());
        Ok(Runtime::summary(&s.record))
    }
}
