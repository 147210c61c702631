//! StopContainer: the stop signal, then KILL after `timeout` seconds.
//! Stopping a container that already exited succeeds.

use std::time::Duration;

use k8s_cri::v1 as cri;
use podsandbox::container::ContainerState;

use crate::{error::Result, server::Cri};

impl Cri {
    pub(crate) async fn stop_container(
        &self,
        req: cri::StopContainerRequest,
    ) -> Result<cri::StopContainerResponse> {
        let c = self.container_meta(&req.container_id)?;
        let rt = &self.inner.runtime;
        let status = rt.container_status(&c.sandbox_id, &c.id).await?;
        if matches!(
            status.state,
            ContainerState::Running | ContainerState::Paused
        ) {
            let grace = Duration::from_secs(u64::try_from(req.timeout).unwrap_or(0));
            rt.stop_container(&c.sandbox_id, &c.id, grace).await?;
        }
        Ok(cri::StopContainerResponse {})
    }
}
