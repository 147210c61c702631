//! PauseContainer and ResumeContainer: freeze and thaw a container's
//! processes (cgroup v2 freezer in the guest).

use crate::{
    container::{ContainerState, ContainerStatus},
    sandbox::Runtime,
    Error, Result,
};

impl Runtime {
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
        let mut s = self.locked(sandbox_id).await?;
        let idx = s.container_index(id)?;
        let state = s.record.containers[idx].state;
        let (from, to, action) = if pause {
            (ContainerState::Running, ContainerState::Paused, "pause")
        } else {
            (ContainerState::Paused, ContainerState::Running, "resume")
        };
        if state != from {
            return Err(Error::ContainerWrongState {
                id: id.into(),
                action,
                state,
                hint: "",
            });
        }
        let vm = s.vm()?.clone();
        let agent = self.agent(sandbox_id, vm.as_ref()).await?;
        agent
            .freeze_container(id, pause)
            .await
            .map_err(|e| Error::from_agent(id, action, e))?;
        s.record.containers[idx].state = to;
        self.inner.store.save(&s.record)?;
        Ok(s.record.containers[idx].status(sandbox_id))
    }
}
