//! Start-up reconciliation: vcrid's records (`store.rs`) are the authority
//! on which pods and containers exist. What a crash between two steps of a
//! call leaves — a VM, a pod network, a container in a VM or a container
//! rootfs that no record names — is removed before vcrid serves, so a
//! `kill -9` at any step leaks nothing.
//!
//! ```text
//!   podsandbox recover (its own half-created sandboxes and containers)
//!     ──► sandboxes no pod names: stopped, deleted
//!     ──► pod networks no pod names: torn down (CNI DEL, netns)
//!     ──► containers of a pod's VM no container record names: stopped, deleted
//!     ──► container records whose pod is gone: removed
//!     ──► rootfs no container record names: removed (unmounted, snapshots freed)
//! ```

use std::collections::BTreeSet;

use crate::server::Cri;

/// What reconciliation removed, by kind of resource (IDs).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    pub sandboxes: Vec<String>,
    pub networks: Vec<String>,
    pub containers: Vec<String>,
    pub container_records: Vec<String>,
    pub rootfs: Vec<String>,
}

impl Reconciled {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl Cri {
    /// Removes every resource no record names (see the module doc).
    /// Failures are logged and leave the resource for the next start.
    pub(crate) async fn reconcile(&self) -> Reconciled {
        let store = &self.inner.store;
        let rt = &self.inner.runtime;
        let pods: BTreeSet<String> = store.pods().into_iter().map(|p| p.id).collect();
        let mut out = Reconciled::default();

        match rt.list_sandboxes().await {
            Ok(sandboxes) => {
                for s in sandboxes.iter().filter(|s| !pods.contains(&s.id)) {
                    tracing::warn!(sandbox = %s.id, "removing a sandbox no pod names (vcrid stopped while creating or removing it)");
                    if let Err(err) = rt.stop_sandbox(&s.id).await {
                        tracing::debug!(sandbox = %s.id, "stop: {err}");
                    }
                    match rt.delete_sandbox(&s.id).await {
                        Ok(()) => out.sandboxes.push(s.id.clone()),
                        Err(err) => tracing::error!(sandbox = %s.id, "removing it: {err}"),
                    }
                }
            }
            Err(err) => tracing::error!("listing sandboxes: {err}"),
        }

        match self.inner.network.sandboxes() {
            Ok(ids) => {
                for id in ids.into_iter().filter(|id| !pods.contains(id)) {
                    tracing::warn!(pod = %id, "tearing down a pod network no pod names");
                    match self.inner.network.teardown(&id).await {
                        Ok(()) => out.networks.push(id),
                        Err(err) => tracing::error!(pod = %id, "tearing it down: {err}"),
                    }
                }
            }
            Err(err) => tracing::error!("listing pod networks: {err}"),
        }

        let records: BTreeSet<String> = store.containers().into_iter().map(|c| c.id).collect();
        for pod in &pods {
            let Ok(containers) = rt.list_containers(pod).await else {
                continue;
            };
            for c in containers.iter().filter(|c| !records.contains(&c.id)) {
                tracing::warn!(pod = %pod, container = %c.id, "removing a container no record names");
                if matches!(
                    c.state,
                    podsandbox::container::ContainerState::Running
                        | podsandbox::container::ContainerState::Paused
                ) {
                    if let Err(err) = rt
                        .stop_container(pod, &c.id, std::time::Duration::ZERO)
                        .await
                    {
                        tracing::warn!(container = %c.id, "stop: {err}");
                    }
                }
                match rt.delete_container(pod, &c.id).await {
                    Ok(()) => out.containers.push(c.id.clone()),
                    Err(err) => tracing::error!(container = %c.id, "removing it: {err}"),
                }
            }
        }

        for c in store.containers() {
            if pods.contains(&c.sandbox_id) {
                continue;
            }
            tracing::warn!(container = %c.id, pod = %c.sandbox_id, "removing the record of a container whose pod is gone");
            match store.remove_container(&c.id) {
                Ok(()) => out.container_records.push(c.id),
                Err(err) => tracing::error!(container = %c.id, "{err}"),
            }
        }

        let kept: BTreeSet<String> = store.containers().into_iter().map(|c| c.id).collect();
        match self.inner.images.rootfs_ids() {
            Ok(ids) => {
                for id in ids.into_iter().filter(|id| !kept.contains(id)) {
                    tracing::warn!(container = %id, "removing a container rootfs no record names");
                    match self.inner.images.remove_rootfs(&id).await {
                        Ok(()) => out.rootfs.push(id),
                        Err(err) => tracing::error!(container = %id, "removing it: {err}"),
                    }
                }
            }
            Err(err) => tracing::error!("listing container rootfs: {err}"),
        }
        out
    }
}
