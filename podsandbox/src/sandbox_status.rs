//! StatusSandbox and ListSandboxes. Reading needs no lock; only when the VM
//! is found dead is the sandbox locked to record that. Where this process
//! owns the state dir, both read memory: the record, the guest's details
//! (asked once per boot) and the VMM's PID.

use crate::{
    sandbox::{Runtime, Sandbox, SandboxStatus},
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
            if rt.vm_seems_gone(vm.as_ref()).await {
                record = rt.locked(self.id()).await?.record.clone();
            }
        }
        let mut status = Runtime::summary(&record);
        if let (Some(vm), SandboxState::Ready | SandboxState::Running) = (&vm, record.state) {
            match rt.guest_details(self.id(), vm.as_ref()).await {
                Ok(details) => status.guest = Some(details),
                Err(err) => tracing::warn!(id = %self.id(), "guest details: {err}"),
            }
        }
        Ok(status)
    }
}

impl Runtime {
    /// A sandbox's status without its guest's details (no agent call):
    /// where this process owns the state dir, memory only.
    pub async fn sandbox_summary(&self, id: &str) -> Result<SandboxStatus> {
        if self.owns_state() {
            return Ok(Runtime::summary_checked(&self.inner.store.load(id)?, false));
        }
        let mut status = self.status_sandbox(id).await?;
        status.guest = None;
        Ok(status)
    }

    /// Every sandbox, sorted by ID, without asking the agents. Where this
    /// process owns the state dir, the records in memory as they are: each
    /// VM's watcher records its exit the moment it happens.
    pub async fn list_sandboxes(&self) -> Result<Vec<SandboxStatus>> {
        let mut out = Vec::new();
        if self.owns_state() {
            for id in self.inner.store.ids()? {
                match self.inner.store.load(&id) {
                    Ok(record) => out.push(Runtime::summary_checked(&record, false)),
                    Err(Error::NotFound { .. }) => {}
                    Err(err) => return Err(err),
                }
            }
            return Ok(out);
        }
        for id in self.inner.store.ids()? {
            let record = match self.inner.store.load(&id) {
                Ok(record) => record,
                // Deleted while we listed.
                Err(Error::NotFound { .. }) => continue,
                Err(err) => return Err(err),
            };
            let vm = self.restore_vm(&record)?;
            let record = match (&vm, record.state.vm_expected()) {
                (Some(vm), true) if self.vm_seems_gone(vm.as_ref()).await => {
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

    /// Whether a VM the record says is up may have exited. Where this
    /// process owns the state dir, a watcher records every VM's exit as it
    /// happens ([`Runtime::watch_vm`]): only the VMM's PID is looked at (no
    /// QMP), as a safety net. Elsewhere the VMM is asked.
    pub(crate) async fn vm_seems_gone(&self, vm: &dyn hypervisor::Hypervisor) -> bool {
        if self.owns_state() {
            return !vm.state().vmm.is_some_and(|p| p.is_alive());
        }
        matches!(vm.status().await, Ok(hypervisor::VmStatus::Exited { .. }))
    }
}
