//! PauseContainer, ResumeContainer and StatsContainer: the container's
//! cgroup in the guest (v2 freezer; cpu, memory, pids and io counters).

use crate::{
    container::{ContainerState, ContainerStatus},
    sandbox::Runtime,
    Error, Result,
};

impl Runtime {
    /// Resource usage of a running (or paused) container.
    pub async fn stats_container(
        &self,
        sandbox_id: &str,
        id: &str,
    ) -> Result<crate::container::ContainerStats> {
        let (_lock, _, agent) = self
            .container_agent(
                sandbox_id,
                id,
                "get stats of",
                &[ContainerState::Running, ContainerState::Paused],
            )
            .await?;
        agent
            .stats_container(id)
            .await
            .map_err(|e| Error::from_agent(id, "stats", e))
    }

    pub async fn pause_container(&self, sandbox_id: &str, id: &str) -> Result<ContainerStatus> {
        self.freeze_container(sandbox_id, id, true).await
    }

    pub async fn resume_container(&self, sandbox_id: &str, id: &str) -> Result<ContainerStatus> {
        self.freeze_container(sandbox_id, id, false).await
    }

    async fn freeze_container(
        &self,
        sandbox_id: &str,
        id: &str,
        pause: bool,
    ) -> Result<ContainerStatus> {
        let (from, to, action) = if pause {
            (ContainerState::Running, ContainerState::Paused, "pause")
        } else {
            (ContainerState::Paused, ContainerState::Running, "resume")
        };
        let (mut s, idx, agent) = self
            .container_agent(sandbox_id, id, action, &[from])
            .await?;
        agent
            .freeze_container(id, pause)
            .await
            .map_err(|e| Error::from_agent(id, action, e))?;
        s.record.containers[idx].state = to;
        self.inner.store.save(&s.record)?;
        Ok(s.record.containers[idx].status(sandbox_id))
    }
}
