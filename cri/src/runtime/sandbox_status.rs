//! PodSandboxStatus and ListPodSandbox.

use std::collections::HashMap;

use k8s_cri::v1 as cri;
use podsandbox::SandboxState;

use crate::{
    error::{CriError, Result},
    server::Cri,
    store::PodMeta,
};

impl Cri {
    pub(crate) async fn pod_sandbox_status(
        &self,
        req: cri::PodSandboxStatusRequest,
    ) -> Result<cri::PodSandboxStatusResponse> {
        let id = self.pod_id(&req.pod_sandbox_id)?;
        let meta = self
            .inner
            .store
            .pod(&id)
            .ok_or_else(|| CriError::NotFound {
                what: "pod sandbox",
                id: id.clone(),
            })?;
        // Only verbose needs the guest's own details.
        let vm = if req.verbose {
            self.inner.runtime.status_sandbox(&id).await
        } else {
            self.inner.runtime.sandbox_summary(&id).await
        };
        let state = pod_state(&meta, vm.as_ref().ok().map(|s| s.state));
        let mut status = pod_status_brief(&meta);
        status.state = state as i32;
        let mut info = HashMap::new();
        if let Some(reason) = &meta.cleanup_error {
            info.insert("cleanup_error".to_string(), reason.clone());
        }
        if req.verbose {
            let detail = serde_json::json!({
                "id": id,
                "runtime_handler": meta.runtime_handler,
                "vm": vm.as_ref().ok(),
                "vm_error": vm.as_ref().err().map(|e| e.to_string()),
                "network": meta.network,
                "cleanup_error": meta.cleanup_error,
                "config": meta.config,
            });
            info.insert("info".to_string(), detail.to_string());
        }
        Ok(cri::PodSandboxStatusResponse {
            status: Some(status),
            info,
            containers_statuses: Vec::new(),
            timestamp: podsandbox::container::now_ns(),
        })
    }

    pub(crate) async fn list_pod_sandbox(
        &self,
        req: cri::ListPodSandboxRequest,
    ) -> Result<cri::ListPodSandboxResponse> {
        let filter = req.filter.unwrap_or_default();
        let vms: HashMap<String, SandboxState> = self
            .inner
            .runtime
            .list_sandboxes()
            .await?
            .into_iter()
            .map(|s| (s.id, s.state))
            .collect();
        let items = self
            .inner
            .store
            .pods()
            .into_iter()
            .filter(|p| filter.id.is_empty() || p.id.starts_with(&filter.id))
            .filter(|p| labels_match(&p.config.labels, &filter.label_selector))
            .map(|p| {
                let state = pod_state(&p, vms.get(&p.id).copied());
                cri::PodSandbox {
                    id: p.id.clone(),
                    metadata: p.config.metadata.clone(),
                    state: state as i32,
                    created_at: p.created_at_ns,
                    labels: p.config.labels.clone(),
                    annotations: p.config.annotations.clone(),
                    runtime_handler: p.runtime_handler.clone(),
                }
            })
            .filter(|p| filter.state.as_ref().is_none_or(|s| s.state == p.state))
            .collect();
        Ok(cri::ListPodSandboxResponse { items })
    }
}

/// READY while its VM runs, nobody stopped it and no clean-up failed.
pub(crate) fn pod_state(meta: &PodMeta, vm: Option<SandboxState>) -> cri::PodSandboxState {
    match vm {
        Some(SandboxState::Ready | SandboxState::Running)
            if !meta.stopped && meta.cleanup_error.is_none() =>
        {
            cri::PodSandboxState::SandboxReady
        }
        _ => cri::PodSandboxState::SandboxNotready,
    }
}

/// The status fields that need no VM call (state left READY unless stopped).
pub(crate) fn pod_status_brief(meta: &PodMeta) -> cri::PodSandboxStatus {
    let ips: Vec<String> = meta
        .network
        .as_ref()
        .map(|n| n.pod_ips.iter().map(|ip| ip.to_string()).collect())
        .unwrap_or_default();
    let network = ips
        .split_first()
        .map(|(first, rest)| cri::PodSandboxNetworkStatus {
            ip: first.clone(),
            additional_ips: rest
                .iter()
                .map(|ip| cri::PodIp { ip: ip.clone() })
                .collect(),
        });
    let namespace_options = meta
        .config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone())
        .unwrap_or_default();
    cri::PodSandboxStatus {
        id: meta.id.clone(),
        metadata: meta.config.metadata.clone(),
        state: if meta.stopped || meta.cleanup_error.is_some() {
            cri::PodSandboxState::SandboxNotready as i32
        } else {
            cri::PodSandboxState::SandboxReady as i32
        },
        created_at: meta.created_at_ns,
        network,
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace {
                options: Some(namespace_options),
            }),
        }),
        labels: meta.config.labels.clone(),
        annotations: meta.config.annotations.clone(),
        runtime_handler: meta.runtime_handler.clone(),
    }
}

/// Every selector label present with the same value.
pub(crate) fn labels_match(
    labels: &HashMap<String, String>,
    selector: &HashMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}
