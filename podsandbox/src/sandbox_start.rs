//! StartSandbox: `ready` → `running`. The VM already runs; starting is where
//! the pod's containers and network come up (later issues).

use crate::{
    sandbox::{Runtime, Sandbox, SandboxStatus},
    state::Action,
    Result,
};

impl Sandbox {
    pub async fn start(&self) -> Result<SandboxStatus> {
        let rt = self.runtime();
        let mut s = rt.locked(self.id()).await?;
        let next = s.transition(Action::Start)?;
        s.record.state = next;
        rt.inner.store.save(&s.record)?;
        tracing::info!(id = %self.id(), "sandbox running");
        Ok(Runtime::summary(&s.record))
    }
}
