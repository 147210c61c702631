//! Version, Status, RuntimeConfig, UpdateRuntimeConfig,
//! CheckpointContainer and GetContainerEvents: the runtime-wide RPCs.

use std::{collections::HashMap, pin::Pin};

use k8s_cri::v1 as cri;
use tokio_stream::{wrappers::BroadcastStream, Stream, StreamExt as _};

use crate::{
    error::{CriError, Result},
    server::Cri,
};

/// The CRI version spoken.
pub const RUNTIME_API_VERSION: &str = "v1";
pub const RUNTIME_NAME: &str = "vcrid";

pub type EventStream = Pin<
    Box<dyn Stream<Item = std::result::Result<cri::ContainerEventResponse, tonic::Status>> + Send>,
>;

impl Cri {
    pub(crate) fn version(&self, _req: cri::VersionRequest) -> cri::VersionResponse {
        cri::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: RUNTIME_API_VERSION.into(),
        }
    }

    pub(crate) async fn status(&self, req: cri::StatusRequest) -> Result<cri::StatusResponse> {
        let hv = &self.inner.config.hypervisor;
        let missing: Vec<String> = [
            ("QEMU", &hv.qemu_path),
            ("guest kernel", &hv.kernel),
            ("guest initramfs", &hv.initrd),
        ]
        .iter()
        .filter(|(_, p)| p.as_os_str().is_empty() || !p.exists())
        .map(|(what, p)| format!("{what} {} is missing", p.display()))
        .collect();
        let runtime = cri::RuntimeCondition {
            r#type: "RuntimeReady".into(),
            status: missing.is_empty(),
            reason: if missing.is_empty() {
                String::new()
            } else {
                "GuestImageMissing".into()
            },
            message: missing.join("; "),
        };
        let network = match self.inner.cni.load() {
            Ok(_) => cri::RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: true,
                reason: String::new(),
                message: String::new(),
            },
            Err(err) => cri::RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: false,
                reason: "NetworkPluginNotReady".into(),
                message: format!("CNI: {err}"),
            },
        };
        let mut info = HashMap::new();
        if req.verbose {
            info.insert(
                "config".to_string(),
                serde_json::to_string(&self.inner.config).unwrap_or_default(),
            );
            info.insert(
                "factory".to_string(),
                serde_json::to_string(&self.inner.runtime.factory_status()).unwrap_or_default(),
            );
        }
        let handler = |name: &str| cri::RuntimeHandler {
            name: name.into(),
            features: Some(cri::RuntimeHandlerFeatures {
                recursive_read_only_mounts: false,
                user_namespaces: false,
            }),
        };
        Ok(cri::StatusResponse {
            status: Some(cri::RuntimeStatus {
                conditions: vec![runtime, network],
            }),
            info,
            runtime_handlers: vec![handler(""), handler("virtcontainers")],
            features: Some(cri::RuntimeFeatures {
                supplemental_groups_policy: false,
            }),
        })
    }

    pub(crate) fn runtime_config(&self) -> cri::RuntimeConfigResponse {
        cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: cri::CgroupDriver::Cgroupfs as i32,
            }),
        }
    }

    /// kubelet sends the pod CIDR here; CNI plugins get theirs from their
    /// own config, so there is nothing to change.
    pub(crate) fn update_runtime_config(
        &self,
        req: cri::UpdateRuntimeConfigRequest,
    ) -> cri::UpdateRuntimeConfigResponse {
        if let Some(cidr) = req
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
        {
            tracing::info!(%cidr, "pod CIDR from kubelet (the CNI config decides addresses)");
        }
        cri::UpdateRuntimeConfigResponse {}
    }

    pub(crate) fn checkpoint_container(&self) -> Result<cri::CheckpointContainerResponse> {
        Err(CriError::Unimplemented(
            "CheckpointContainer: checkpointing a container out of its pod VM is not supported"
                .into(),
        ))
    }

    pub(crate) fn container_events(&self) -> EventStream {
        let stream = BroadcastStream::new(self.inner.events.subscribe()).filter_map(|e| match e {
            Ok(event) => Some(Ok(event)),
            // A slow reader misses events rather than stalling everyone.
            Err(err) => {
                tracing::warn!("event stream: {err}");
                None
            }
        });
        Box::pin(stream)
    }
}
