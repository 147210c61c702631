//! StopPodSandbox: stop every container, the VM, and tear the network down.
//! Idempotent: an unknown or already stopped pod is not an error.

use std::time::Duration;

use k8s_cri::v1 as cri;

use crate::{
    error::{CriError, Result},
    server::Cri,
};

/// Containers still running when their pod is stopped are killed at once,
/// like containerd does: kubelet has already stopped them with the pod's own
/// grace period.
const CONTAINER_GRACE: Duration = Duration::ZERO;

/// How long StopPodSandbox waits for its containers before it stops the
/// VM under them.
const CONTAINERS_STOP_BOUND: Duration = Duration::from_secs(15);

impl Cri {
    pub(crate) async fn stop_pod_sandbox(
        &self,
        req: cri::StopPodSandboxRequest,
    ) -> Result<cri::StopPodSandboxResponse> {
        if req.pod_sandbox_id.is_empty() {
            return Err(CriError::invalid("pod_sandbox_id", "must not be empty"));
        }
        let Some(id) = self.inner.store.resolve_pod(&req.pod_sandbox_id) else {
            return Ok(cri::StopPodSandboxResponse {});
        };
        let lock = self.pod_lock(&id);
        let _guard = lock.lock().await;
        if let Err(err) = self.stop_pod_locked(&id).await {
            self.keep_with_cleanup_error(&id, "StopPodSandbox", &err);
            return Err(err);
        }
        Ok(cri::StopPodSandboxResponse {})
    }

    /// Stops the pod's containers and VM and releases its network; the
    /// caller holds the pod's lock.
    pub(crate) async fn stop_pod_locked(&self, id: &str) -> Result<()> {
        let rt = &self.inner.runtime;
        match rt.list_containers(id).await {
            Ok(containers) => {
                let stops = async {
                    for c in containers {
                        if matches!(
                            c.state,
                            podsandbox::container::ContainerState::Running
                                | podsandbox::container::ContainerState::Paused
                        ) {
                            if let Err(err) = rt.stop_container(id, &c.id, CONTAINER_GRACE).await {
                                tracing::warn!(pod = %id, container = %c.id, "stop: {err}");
                            }
                        }
                    }
                };
                // A hung guest cannot hold the pod's stop: past the bound
                // the VM is stopped, which ends whatever still runs.
                if tokio::time::timeout(CONTAINERS_STOP_BOUND, stops)
                    .await
                    .is_err()
                {
                    tracing::warn!(pod = %id, "containers did not stop within {CONTAINERS_STOP_BOUND:?}; stopping the VM");
                }
            }
            Err(err) if err.kind() == podsandbox::ErrorKind::NotFound => {}
            Err(err) => return Err(err.into()),
        }
        match rt.stop_sandbox(id).await {
            Ok(_) => {}
            Err(err)
                if matches!(
                    err.kind(),
                    podsandbox::ErrorKind::NotFound | podsandbox::ErrorKind::FailedPrecondition
                ) =>
            {
                // Gone, or already stopped.
                tracing::debug!(pod = %id, "stop VM: {err}");
            }
            Err(err) => return Err(err.into()),
        }
        self.inner.network.teardown(id).await?;
        if let Some(mut meta) = self.inner.store.pod(id) {
            if !meta.stopped || meta.cleanup_error.is_some() {
                meta.stopped = true;
                meta.cleanup_error = None;
                self.inner.store.save_pod(&meta)?;
            }
        }
        Ok(())
    }
}
