//! UpdateContainerResources and ReopenContainerLog.

use k8s_cri::v1 as cri;

use crate::{error::Result, runtime::container_config::resources, server::Cri};

impl Cri {
    pub(crate) async fn update_container_resources(
        &self,
        req: cri::UpdateContainerResourcesRequest,
    ) -> Result<cri::UpdateContainerResourcesResponse> {
        let mut c = self.container_meta(&req.container_id)?;
        let r = resources(req.linux.as_ref());
        self.inner
            .runtime
            .update_container(&c.sandbox_id, &c.id, &r)
            .await?;
        // ContainerStatus reports the resources in force.
        if let Some(linux) = req.linux {
            c.config
                .linux
                .get_or_insert_with(Default::default)
                .resources = Some(linux);
            self.inner.store.save_container(&c)?;
        }
        Ok(cri::UpdateContainerResourcesResponse {})
    }

    pub(crate) async fn reopen_container_log(
        &self,
        req: cri::ReopenContainerLogRequest,
    ) -> Result<cri::ReopenContainerLogResponse> {
        let c = self.container_meta(&req.container_id)?;
        self.inner
            .runtime
            .reopen_container_log(&c.sandbox_id, &c.id)
            .await?;
        Ok(cri::ReopenContainerLogResponse {})
    }
}
