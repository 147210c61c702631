//! ContainerStatus and ListContainers.

use std::collections::HashMap;

use k8s_cri::v1 as cri;
use podsandbox::container::{ContainerState, ContainerStatus};

use crate::{
    error::Result, runtime::sandbox_status::labels_match, server::Cri, store::ContainerMeta,
};

impl Cri {
    pub(crate) async fn container_status(
        &self,
        req: cri::ContainerStatusRequest,
    ) -> Result<cri::ContainerStatusResponse> {
        let c = self.container_meta(&req.container_id)?;
        let rt = self
            .inner
            .runtime
            .container_status(&c.sandbox_id, &c.id)
            .await;
        let (state, exit_code, reason, started, finished) = match &rt {
            Ok(s) => (
                cri_state(s.state),
                s.exit_code.unwrap_or(0),
                s.reason.clone().unwrap_or_else(|| default_reason(s)),
                s.started_at_ns.unwrap_or(0),
                s.finished_at_ns.unwrap_or(0),
            ),
            // The VM is gone (pod removed underneath): unknown, not an error.
            Err(_) => (
                cri::ContainerState::ContainerUnknown,
                0,
                String::new(),
                0,
                0,
            ),
        };
        let mut info = HashMap::new();
        if req.verbose {
            let detail = serde_json::json!({
                "sandbox_id": c.sandbox_id,
                "runtime": rt.as_ref().ok(),
                "runtime_error": rt.as_ref().err().map(|e| e.to_string()),
                "config": c.config,
            });
            info.insert("info".to_string(), detail.to_string());
        }
        let status = cri::ContainerStatus {
            id: c.id.clone(),
            metadata: c.config.metadata.clone(),
            state: state as i32,
            created_at: c.created_at_ns,
            started_at: started,
            finished_at: finished,
            exit_code,
            image: c.config.image.clone(),
            image_ref: c.image_ref.clone(),
            reason,
            message: rt
                .as_ref()
                .ok()
                .and_then(|s| s.message.clone())
                .unwrap_or_default(),
            labels: c.config.labels.clone(),
            annotations: c.config.annotations.clone(),
            mounts: c.config.mounts.clone(),
            log_path: c
                .log_path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            resources: c
                .config
                .linux
                .as_ref()
                .and_then(|l| l.resources.clone())
                .map(|r| cri::ContainerResources {
                    linux: Some(r),
                    windows: None,
                }),
            image_id: c.image_ref.clone(),
            user: None,
        };
        Ok(cri::ContainerStatusResponse {
            status: Some(status),
            info,
        })
    }

    pub(crate) async fn list_containers(
        &self,
        req: cri::ListContainersRequest,
    ) -> Result<cri::ListContainersResponse> {
        let filter = req.filter.unwrap_or_default();
        let pod_filter = if filter.pod_sandbox_id.is_empty() {
            None
        } else {
            match self.inner.store.resolve_pod(&filter.pod_sandbox_id) {
                Some(id) => Some(id),
                None => return Ok(cri::ListContainersResponse::default()),
            }
        };
        let metas: Vec<ContainerMeta> = self
            .inner
            .store
            .containers()
            .into_iter()
            .filter(|c| filter.id.is_empty() || c.id.starts_with(&filter.id))
            .filter(|c| pod_filter.as_ref().is_none_or(|p| &c.sandbox_id == p))
            .filter(|c| labels_match(&c.config.labels, &filter.label_selector))
            .collect();
        let mut states: HashMap<String, HashMap<String, ContainerState>> = HashMap::new();
        for c in &metas {
            if !states.contains_key(&c.sandbox_id) {
                let list = self
                    .inner
                    .runtime
                    .list_containers(&c.sandbox_id)
                    .await
                    .unwrap_or_default();
                states.insert(
                    c.sandbox_id.clone(),
                    list.into_iter().map(|s| (s.id, s.state)).collect(),
                );
            }
        }
        let containers = metas
            .into_iter()
            .map(|c| {
                let state = states
                    .get(&c.sandbox_id)
                    .and_then(|m| m.get(&c.id))
                    .map(|s| cri_state(*s))
                    .unwrap_or(cri::ContainerState::ContainerUnknown);
                cri::Container {
                    id: c.id.clone(),
                    pod_sandbox_id: c.sandbox_id.clone(),
                    metadata: c.config.metadata.clone(),
                    image: c.config.image.clone(),
                    image_ref: c.image_ref.clone(),
                    state: state as i32,
                    created_at: c.created_at_ns,
                    labels: c.config.labels.clone(),
                    annotations: c.config.annotations.clone(),
                    image_id: c.image_ref.clone(),
                }
            })
            .filter(|c| filter.state.as_ref().is_none_or(|s| s.state == c.state))
            .collect();
        Ok(cri::ListContainersResponse { containers })
    }
}

/// Paused containers are still running as far as kubelet is concerned.
pub(crate) fn cri_state(s: ContainerState) -> cri::ContainerState {
    match s {
        ContainerState::Created => cri::ContainerState::ContainerCreated,
        ContainerState::Running | ContainerState::Paused => cri::ContainerState::ContainerRunning,
        ContainerState::Stopped => cri::ContainerState::ContainerExited,
    }
}

/// kubelet shows "Completed" / "Error" for exited containers without a reason.
fn default_reason(s: &ContainerStatus) -> String {
    match (s.state, s.exit_code) {
        (ContainerState::Stopped, Some(0)) => "Completed".into(),
        (ContainerState::Stopped, Some(_)) => "Error".into(),
        _ => String::new(),
    }
}
