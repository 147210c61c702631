//! StartContainer.

use k8s_cri::v1 as cri;

use crate::{error::Result, server::Cri};

impl Cri {
    pub(crate) async fn start_container(
        &self,
        req: cri::StartContainerRequest,
    ) -> Result<cri::StartContainerResponse> {
        let c = self.container_meta(&req.container_id)?;
        self.inner
            .runtime
            .start_container(&c.sandbox_id, &c.id)
            .await?;
        self.emit(&c.id, cri::ContainerEventType::ContainerStartedEvent);
        Ok(cri::StartContainerResponse {})
    }

    /// The full ID of a pod named by ID or unique prefix (the request's
    /// `pod_sandbox_id`); InvalidArgument when empty, NotFound else.
    pub(crate) fn pod_id(&self, id: &str) -> Result<String> {
        if id.is_empty() {
            return Err(crate::error::CriError::invalid(
                "pod_sandbox_id",
                "must not be empty",
            ));
        }
        self.inner
            .store
            .resolve_pod(id)
            .ok_or_else(|| crate::error::CriError::NotFound {
                what: "pod sandbox",
                id: id.into(),
            })
    }

    /// The record of a container named by ID or unique prefix; NotFound else.
    pub(crate) fn container_meta(&self, id: &str) -> Result<crate::store::ContainerMeta> {
        if id.is_empty() {
            return Err(crate::error::CriError::invalid(
                "container_id",
                "must not be empty",
            ));
        }
        self.inner
            .store
            .resolve_container(id)
            .and_then(|full| self.inner.store.container(&full))
            .ok_or_else(|| crate::error::CriError::NotFound {
                what: "container",
                id: id.into(),
            })
    }
}
