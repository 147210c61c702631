//! DeleteSandbox: removes every trace of a sandbox. Refused while it runs
//! (stop it first); a `ready` sandbox's VM is stopped on the way.

use std::time::Duration;

use crate::{sandbox::Sandbox, state::Action, Result};

impl Sandbox {
    pub async fn delete(&self) -> Result<()> {
        let rt = self.runtime();
        let mut s = rt.locked(self.id()).await?;
        s.transition(Action::Delete)?;
        s.stop_vm(Duration::from_secs(2)).await?;
        rt.forget_agent(self.id());
        // Container rootfs bind mounts are detached first: removing the
        // tree through them would delete the sources' files.
        crate::mounts::remove_tree(&rt.vm_run_dir(&s.record))?;
        if let Some(cg) = &s.record.cgroup {
            crate::cgroup::remove(cg);
        }
        rt.inner.store.remove(self.id())?;
        tracing::info!(id = %self.id(), "sandbox deleted");
        Ok(())
    }
}
