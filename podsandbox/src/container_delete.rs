//! DeleteContainer: remove a stopped (or never started) container from the
//! guest and its rootfs bind mount (or disk) from the host.

use crate::{container::ContainerState, mounts, sandbox::Runtime, Error, Result};

impl Runtime {
    pub async fn delete_container(&self, sandbox_id: &str, id: &str) -> Result<()> {
        let mut s = self.locked(sandbox_id).await?;
        let idx = s.container_index(id)?;
        let state = s.record.containers[idx].state;
        if matches!(state, ContainerState::Running | ContainerState::Paused) {
            return Err(Error::ContainerWrongState {
                id: id.into(),
                action: "delete",
                state,
                hint: " (stop it first)",
            });
        }
        if let Some(vm) = s.vm.clone() {
            if s.record.state.vm_expected() {
                let agent = self.agent(sandbox_id, vm.as_ref()).await?;
                match agent.remove_container(id, true).await {
                    Ok(()) => {}
                    // The guest forgot it already (e.g. removed before a crash).
                    Err(e) if e.code == Some(crate::agent::AgentCode::NotFound) => {}
                    Err(e) => return Err(Error::from_agent(id, "remove", e)),
                }
            }
        }
        // The guest has unmounted the rootfs disk: detach it.
        if let (Some(address), Some(vm)) = (s.record.containers[idx].rootfs_disk, s.vm.clone()) {
            if s.record.state.vm_expected() {
                vm.remove_disk(address)
                    .await
                    .map_err(|source| Error::Hypervisor {
                        id: sandbox_id.into(),
                        source,
                    })?;
            }
        }
        mounts::remove_container_share(&self.vm_run_dir(&s.record), id)?;
        s.record.containers.remove(idx);
        if let Some(vm) = &s.vm {
            s.record.vm = Some(vm.state());
        }
        // What the container's limits held goes back (best effort: a VM
        // that cannot shrink keeps it).
        if s.vm.is_some() && s.record.state.vm_expected() {
            let size = self.size_with(&s, None)?;
            self.fit_vm(&mut s, size).await?;
        }
        self.inner.store.save(&s.record)?;
        self.forget_monitor(sandbox_id, id);
        tracing::info!(sandbox = %sandbox_id, container = %id, "container deleted");
        Ok(())
    }
}
