//! StartContainer: run the created container's process (its monitor,
//! started at creation, is already draining its output).

use crate::{
    container::{ContainerState, ContainerStatus},
    sandbox::Runtime,
    Error, Result,
};

impl Runtime {
    pub async fn start_container(&self, sandbox_id: &str, id: &str) -> Result<ContainerStatus> {
        let t0 = std::time::Instant::now();
        let (mut s, idx, agent) = self
            .container_agent(sandbox_id, id, "start", &[ContainerState::Created])
            .await?;
        let locked = t0.elapsed();
        agent
            .start_container(id)
            .await
            .map_err(|e| Error::from_agent(id, "start", e))?;
        tracing::debug!(container = %id, ?locked, agent = ?t0.elapsed(), "start: agent answered");
        s.record.containers[idx].state = ContainerState::Running;
        s.record.containers[idx].started_at_ns = Some(crate::container::now_ns());
        self.inner.store.save(&s.record)?;
        tracing::info!(sandbox = %sandbox_id, container = %id, "container running");
        Ok(s.record.containers[idx].status(sandbox_id))
    }
}
