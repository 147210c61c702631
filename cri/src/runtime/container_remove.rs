//! RemoveContainer: force-stop, delete in the VM, remove its rootfs and
//! record. Idempotent: an unknown container is not an error.

use std::time::Duration;

use k8s_cri::v1 as cri;

use crate::{
    error::{CriError, Result},
    server::Cri,
};

impl Cri {
    pub(crate) async fn remove_container(
        &self,
        req: cri::RemoveContainerRequest,
    ) -> Result<cri::RemoveContainerResponse> {
        if req.container_id.is_empty() {
            return Err(CriError::invalid("container_id", "must not be empty"));
        }
        if let Some(id) = self.inner.store.resolve_container(&req.container_id) {
            self.remove_container_inner(&id).await?;
        }
        Ok(cri::RemoveContainerResponse {})
    }

    pub(crate) async fn remove_container_inner(&self, id: &str) -> Result<()> {
        let Some(c) = self.inner.store.container(id) else {
            return Ok(());
        };
        let rt = &self.inner.runtime;
        match rt.container_status(&c.sandbox_id, id).await {
            Ok(status) => {
                if status.state != podsandbox::container::ContainerState::Stopped {
                    rt.stop_container(&c.sandbox_id, id, Duration::ZERO)
                        .await
                        .ok();
                }
                match rt.delete_container(&c.sandbox_id, id).await {
                    Ok(()) => {}
                    Err(err) if err.kind() == podsandbox::ErrorKind::NotFound => {}
                    Err(err) => return Err(err.into()),
                }
            }
            Err(err) if err.kind() == podsandbox::ErrorKind::NotFound => {}
            Err(err) => return Err(err.into()),
        }
        match self.inner.images.remove_rootfs(id).await {
            Ok(()) => {}
            Err(err) if err.kind() == imagestore::ErrorKind::NotFound => {}
            Err(err) => return Err(err.into()),
        }
        self.emit(id, cri::ContainerEventType::ContainerDeletedEvent);
        self.inner.store.remove_container(id)?;
        tracing::info!(container = %id, "container removed");
        Ok(())
    }
}
