//! UpdateContainer (new cgroup limits) and ProcessListContainer.

use crate::{
    container::{ContainerState, ProcessInfo, Resources},
    sandbox::Runtime,
    Error, Result,
};

impl Runtime {
    /// Applies new limits to a created, running or paused container; limits
    /// left `None` stay as they are.
    pub async fn update_container(
        &self,
        sandbox_id: &str,
        id: &str,
        resources: &Resources,
    ) -> Result<()> {
        let (mut s, idx, agent) = self
            .container_agent(
                sandbox_id,
                id,
                "update",
                &[
                    ContainerState::Created,
                    ContainerState::Running,
                    ContainerState::Paused,
                ],
            )
            .await?;
        let invalid = |detail: String| Error::InvalidContainer {
            id: id.into(),
            detail,
        };
        let oci = resources.to_oci().map_err(|e| invalid(e.to_string()))?;
        let json = serde_json::to_vec(&oci)
            .map_err(|e| invalid(format!("cannot encode the resources: {e}")))?;
        let merged = s.record.containers[idx].resources.merged(resources);
        // Grow before the guest raises the limit, shrink after it lowered it.
        let size = self.size_with(&s, Some((id, &merged)))?;
        let have = s.vm()?.state().size();
        let grows = size.vcpus > have.vcpus || size.memory_mib > have.memory_mib;
        if grows {
            self.fit_vm(&mut s, size).await?;
        }
        agent
            .update_container(id, json)
            .await
            .map_err(|e| Error::from_agent(id, "update", e))?;
        s.record.containers[idx].resources = merged;
        if !grows {
            self.fit_vm(&mut s, size).await?;
        }
        self.inner.store.save(&s.record)?;
        Ok(())
    }

    /// The processes in the container's cgroup.
    pub async fn process_list(&self, sandbox_id: &str, id: &str) -> Result<Vec<ProcessInfo>> {
        let (_lock, _, agent) = self
            .container_agent(
                sandbox_id,
                id,
                "list the processes of",
                &[
                    ContainerState::Created,
                    ContainerState::Running,
                    ContainerState::Paused,
                ],
            )
            .await?;
        agent
            .list_processes(id)
            .await
            .map_err(|e| Error::from_agent(id, "list the processes of", e))
    }
}
