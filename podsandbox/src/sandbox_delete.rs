//! DeleteSandbox: removes every trace of a sandbox. Refused while it runs
//! (stop it first); a `ready` sandbox's VM is stopped on the way.

use std::time::Duration;

use crate::{sandbox::Sandbox, state::Action, Error, Result};

impl Sandbox {
    pub async fn delete(&self) -> Result<()> {
        let rt = self.runtime();
        let mut s = rt.locked(self.id()).await?;
        s.transition(Action::Delete)?;
        s.stop_vm(Duration::from_secs(2)).await?;
        let run_dir = rt.run_dir(self.id());
        match std::fs::remove_dir_all(&run_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(Error::Io {
                    action: "remove run dir",
                    path: run_dir,
                    source,
                })
            }
        }
        rt.inner.store.remove(self.id())?;
        tracing::info!(id = %self.id(), "sandbox deleted");
        Ok(())
    }
}
