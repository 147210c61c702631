//! RemovePodSandbox: remove its containers, stop what still runs, delete the
//! VM's state and the pod's record. Idempotent: an unknown pod is not an error.
//! A step that fails keeps the pod, NOTREADY, its reason in PodSandboxStatus.

use k8s_cri::v1 as cri;

use crate::{
    error::{CriError, Result},
    server::Cri,
};

impl Cri {
    pub(crate) async fn remove_pod_sandbox(
        &self,
        req: cri::RemovePodSandboxRequest,
    ) -> Result<cri::RemovePodSandboxResponse> {
        if req.pod_sandbox_id.is_empty() {
            return Err(CriError::invalid("pod_sandbox_id", "must not be empty"));
        }
        let Some(id) = self.inner.store.resolve_pod(&req.pod_sandbox_id) else {
            return Ok(cri::RemovePodSandboxResponse {});
        };
        let lock = self.pod_lock(&id);
        let guard = lock.lock().await;
        if let Err(err) = self.remove_pod_locked(&id).await {
            self.keep_with_cleanup_error(&id, "RemovePodSandbox", &err);
            return Err(err);
        }
        drop(guard);
        self.forget_pod_lock(&id);
        tracing::info!(pod = %id, "pod sandbox removed");
        Ok(cri::RemovePodSandboxResponse {})
    }

    /// Containers, VM, network, record; the caller holds the pod's lock.
    async fn remove_pod_locked(&self, id: &str) -> Result<()> {
        let containers: Vec<String> = self
            .inner
            .store
            .containers()
            .into_iter()
            .filter(|c| c.sandbox_id == id)
            .map(|c| c.id)
            .collect();
        for cid in containers {
            self.remove_container_inner(&cid).await?;
        }
        self.stop_pod_locked(id).await?;
        match self.inner.runtime.delete_sandbox(id).await {
            Ok(()) => {}
            Err(err) if err.kind() == podsandbox::ErrorKind::NotFound => {}
            Err(err) => return Err(err.into()),
        }
        self.inner.store.remove_pod(id)
    }

    /// A clean-up that failed keeps the pod, NOTREADY, with the reason in
    /// its status (as containerd keeps it), for the next remove to finish.
    pub(crate) fn keep_with_cleanup_error(&self, id: &str, call: &str, err: &CriError) {
        let Some(mut meta) = self.inner.store.pod(id) else {
            return;
        };
        tracing::error!(pod = %id, "{call} did not finish, the pod is kept: {err}");
        meta.cleanup_error = Some(format!("{call}: {err}"));
        if let Err(save) = self.inner.store.save_pod(&meta) {
            tracing::error!(pod = %id, "recording the clean-up error: {save}");
        }
    }
}
