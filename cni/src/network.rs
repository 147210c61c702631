//! The pod network: a netns, the CNI ADD into it, and the interworking that
//! hands the VM a tap. `setup` rolls every earlier step back on failure;
//! `teardown` runs every step even when one fails, and keeps the pod's state
//! file until all succeeded, so a retry finishes the job.

use std::fmt;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::cni::{
    Bandwidth, CapabilityArgs, Cni, DnsCapability, PodIdentity, PortMapping, RuntimeConf,
};
use crate::error::{CniError, Result};
use crate::interworking::{Endpoint, Interworking};
use crate::link::{self, NeighbourInfo, RouteInfo};
use crate::netns::{self, NetNs};
use crate::result::{Dns, IpNet};

/// What the CRI server asks for one pod sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodNetworkRequest {
    pub sandbox_id: String,
    pub pod: PodIdentity,
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
    #[serde(default)]
    pub bandwidth: Option<Bandwidth>,
    #[serde(default)]
    pub dns: Option<DnsCapability>,
}

/// One network interface the guest should configure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceInfo {
    /// The tap in the pod netns to hand to the hypervisor (`None` with the
    /// `none` interworking model).
    pub tap_name: Option<String>,
    /// The interface name in the guest (the veth's name, e.g. `eth0`).
    pub guest_name: String,
    /// The veth's MAC: the guest interface takes it.
    pub mac: String,
    pub mtu: u32,
    /// Addresses with prefix length, IPv4 first.
    pub ips: Vec<IpNet>,
    pub gateway: Option<IpAddr>,
}

/// Everything the VM and PodSandboxStatus need about a pod's network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkStatus {
    pub sandbox_id: String,
    pub netns: PathBuf,
    pub network_name: String,
    pub interfaces: Vec<InterfaceInfo>,
    pub routes: Vec<RouteInfo>,
    /// Static ARP / NDP entries of the netns, for the guest.
    #[serde(default)]
    pub neighbours: Vec<NeighbourInfo>,
    pub dns: Dns,
    /// IPv4 first, then IPv6.
    pub pod_ips: Vec<IpAddr>,
}

const STATE_VERSION: u32 = 1;

/// `<state dir>/<sandbox id>.json`.
#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    status: NetworkStatus,
}

/// The seam the CRI server uses.
#[async_trait]
pub trait NetworkPlugin: Send + Sync + fmt::Debug {
    /// Create the pod's netns, attach it to the network and connect it for the VM.
    async fn setup(&self, req: &PodNetworkRequest) -> Result<NetworkStatus>;
    /// Undo [`setup`](Self::setup); idempotent.
    async fn teardown(&self, sandbox_id: &str) -> Result<()>;
    /// The status [`setup`](Self::setup) returned.
    async fn status(&self, sandbox_id: &str) -> Result<NetworkStatus>;
    /// Every sandbox with something set up — a state file, or a netns a
    /// setup that did not finish left — sorted: what a restarted caller
    /// compares with its own records.
    fn sandboxes(&self) -> Result<Vec<String>>;
}

/// Where pod netns mount points go by default (tmpfs: gone after a reboot).
pub const DEFAULT_NETNS_DIR: &str = "/run/virtcontainers/netns";
/// Where each pod's [`NetworkStatus`] is kept by default.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/virtcontainers/network";

/// What connecting a veth produced.
struct Connected {
    endpoint: Option<Endpoint>,
    info: link::LinkInfo,
    routes: Vec<RouteInfo>,
    neighbours: Vec<NeighbourInfo>,
}

/// The real [`NetworkPlugin`].
#[derive(Debug, Clone)]
pub struct PodNetwork {
    cni: Cni,
    netns_dir: PathBuf,
    state_dir: PathBuf,
    model: Arc<dyn Interworking>,
}

fn blocking_err(what: &str) -> impl FnOnce(tokio::task::JoinError) -> CniError + '_ {
    move |_| CniError::Thread {
        what: what.to_string(),
    }
}

impl PodNetwork {
    /// Netns mount points go in `netns_dir`, per-pod state in `state_dir`.
    pub fn new(
        cni: Cni,
        netns_dir: PathBuf,
        state_dir: PathBuf,
        model: Box<dyn Interworking>,
    ) -> Self {
        Self {
            cni,
            netns_dir,
            state_dir,
            model: Arc::from(model),
        }
    }

    pub fn netns_path(&self, sandbox_id: &str) -> PathBuf {
        self.netns_dir.join(sandbox_id)
    }

    fn state_path(&self, sandbox_id: &str) -> PathBuf {
        self.state_dir.join(format!("{sandbox_id}.json"))
    }

    fn runtime_conf(&self, req: &PodNetworkRequest) -> RuntimeConf {
        let mut rt =
            RuntimeConf::for_pod(&req.sandbox_id, &self.netns_path(&req.sandbox_id), &req.pod);
        rt.capabilities = CapabilityArgs {
            port_mappings: req.port_mappings.clone(),
            bandwidth: req.bandwidth.clone(),
            ip_ranges: Vec::new(),
            dns: req.dns.clone(),
        };
        rt
    }

    async fn connect(&self, ns: &NetNs, if_name: &str) -> Result<Connected> {
        let model = self.model.clone();
        let ns2 = ns.clone();
        let dev = if_name.to_string();
        tokio::task::spawn_blocking(move || -> Result<_> {
            let endpoint = model.attach(&ns2, &dev)?;
            let path = ns2.path().to_path_buf();
            let read = ns2.run(|| {
                Ok((
                    link::link_info(&path, &dev)?,
                    link::routes(&path, &dev)?,
                    link::neighbours(&path, &dev)?,
                ))
            });
            match read {
                Ok((info, routes, neighbours)) => Ok(Connected {
                    endpoint,
                    info,
                    routes,
                    neighbours,
                }),
                Err(e) => {
                    if let Err(undo) = model.detach(&ns2, &dev) {
                        tracing::warn!(error = %undo, "undoing interworking after a failed read");
                    }
                    Err(e)
                }
            }
        })
        .await
        .map_err(blocking_err("connecting the pod netns"))?
    }

    async fn remove_netns(path: PathBuf) -> Result<()> {
        tokio::task::spawn_blocking(move || netns::remove_path(&path))
            .await
            .map_err(blocking_err("removing the pod netns"))?
    }

    async fn setup_inner(&self, req: &PodNetworkRequest) -> Result<NetworkStatus> {
        let id = req.sandbox_id.clone();
        let dir = self.netns_dir.clone();
        let ns = tokio::task::spawn_blocking(move || NetNs::create(&dir, &id))
            .await
            .map_err(blocking_err("creating the pod netns"))??;
        let rt = self.runtime_conf(req);
        let added = match self.cni.add(&rt).await {
            Ok(a) => a,
            // ADD already DELeted what it added (or says it could not).
            Err(e) => {
                return Err(match Self::remove_netns(ns.path().to_path_buf()).await {
                    Ok(()) => e,
                    Err(undo) => CniError::RollbackFailed {
                        command: "setup",
                        container_id: rt.container_id.clone(),
                        del_error: undo.to_string(),
                        source: Box::new(e),
                    },
                })
            }
        };
        let connected = self.connect(&ns, &rt.if_name).await;
        let Connected {
            endpoint,
            info,
            routes,
            neighbours,
        } = match connected {
            Ok(c) => c,
            // connect() undoes its own interworking steps.
            Err(e) => return Err(self.rollback(&rt, &ns, false, e).await),
        };
        let gateway = added
            .result
            .sandbox_interface(&rt.if_name)
            .and_then(|(idx, _)| {
                let mine = added
                    .result
                    .ips
                    .iter()
                    .filter(|ip| !matches!(ip.interface, Some(i) if i != idx));
                let gws: Vec<IpAddr> = mine.filter_map(|ip| ip.gateway).collect();
                gws.iter().find(|g| g.is_ipv4()).or(gws.first()).copied()
            });
        let mut pod_ips = added.result.pod_ips();
        if pod_ips.is_empty() {
            pod_ips = info.addrs.iter().map(|a| a.addr).collect();
        }
        let status = NetworkStatus {
            sandbox_id: req.sandbox_id.clone(),
            netns: ns.path().to_path_buf(),
            network_name: added.network_name,
            interfaces: vec![InterfaceInfo {
                tap_name: endpoint.map(|e| e.tap_name),
                guest_name: rt.if_name.clone(),
                mac: info.mac,
                mtu: info.mtu,
                ips: info.addrs,
                gateway,
            }],
            routes,
            neighbours,
            dns: added.result.dns,
            pod_ips,
        };
        if let Err(e) = self.write_state(&status) {
            return Err(self.rollback(&rt, &ns, true, e).await);
        }
        Ok(status)
    }

    /// Undo a half-done setup: interworking (if `detach`), CNI DEL, netns.
    /// Returns `cause`, or [`CniError::RollbackFailed`] when a step failed
    /// (then `teardown(id)` finishes the job from the CNI cache).
    async fn rollback(
        &self,
        rt: &RuntimeConf,
        ns: &NetNs,
        detach: bool,
        cause: CniError,
    ) -> CniError {
        let mut failed: Vec<String> = Vec::new();
        if detach {
            let model = self.model.clone();
            let (ns2, dev) = (ns.clone(), rt.if_name.clone());
            match tokio::task::spawn_blocking(move || model.detach(&ns2, &dev)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed.push(e.to_string()),
                Err(_) => failed.push("the detach worker panicked".into()),
            }
        }
        if let Err(e) = self.cni.del(rt).await {
            failed.push(e.to_string());
        }
        if let Err(e) = Self::remove_netns(ns.path().to_path_buf()).await {
            failed.push(e.to_string());
        }
        if failed.is_empty() {
            cause
        } else {
            CniError::RollbackFailed {
                command: "setup",
                container_id: rt.container_id.clone(),
                del_error: failed.join("; "),
                source: Box::new(cause),
            }
        }
    }

    fn write_state(&self, status: &NetworkStatus) -> Result<()> {
        let path = self.state_path(&status.sandbox_id);
        let file = StateFile {
            version: STATE_VERSION,
            status: status.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|source| CniError::Decode {
            path: path.clone(),
            source,
        })?;
        crate::write_atomic(&path, &bytes)
    }

    fn read_state(&self, sandbox_id: &str) -> Result<Option<NetworkStatus>> {
        let path = self.state_path(sandbox_id);
        match std::fs::read(&path) {
            Ok(b) => {
                let file: StateFile =
                    serde_json::from_slice(&b).map_err(|source| CniError::Decode {
                        path: path.clone(),
                        source,
                    })?;
                if file.version != STATE_VERSION {
                    return Err(CniError::StateVersion {
                        path,
                        version: file.version,
                    });
                }
                Ok(Some(file.status))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CniError::io("read pod network state", path)(e)),
        }
    }
}

#[async_trait]
impl NetworkPlugin for PodNetwork {
    async fn setup(&self, req: &PodNetworkRequest) -> Result<NetworkStatus> {
        crate::valid_name("sandbox id", &req.sandbox_id)?;
        if self.state_path(&req.sandbox_id).exists() {
            return Err(CniError::PodExists {
                id: req.sandbox_id.clone(),
            });
        }
        self.setup_inner(req).await
    }

    async fn teardown(&self, sandbox_id: &str) -> Result<()> {
        crate::valid_name("sandbox id", sandbox_id)?;
        let state = self.read_state(sandbox_id)?;
        let netns_path = state
            .as_ref()
            .map(|s| s.netns.clone())
            .unwrap_or_else(|| self.netns_path(sandbox_id));
        let rt = RuntimeConf::for_pod(sandbox_id, &netns_path, &PodIdentity::default());
        let mut first_err: Option<CniError> = None;

        if netns_path.exists() {
            let model = self.model.clone();
            let dev = rt.if_name.clone();
            let path = netns_path.clone();
            let detached =
                tokio::task::spawn_blocking(move || model.detach(&NetNs::open(path)?, &dev))
                    .await
                    .map_err(blocking_err("detaching the pod netns"))
                    .and_then(|r| r);
            match detached {
                Ok(()) | Err(CniError::NetnsNotFound { .. }) => {}
                Err(e) => {
                    keep_first(&mut first_err, e);
                }
            }
        }
        if self.cni.has_cached(&rt) {
            if let Err(e) = self.cni.del(&rt).await {
                keep_first(&mut first_err, e);
            }
        }
        if let Err(e) = Self::remove_netns(netns_path).await {
            keep_first(&mut first_err, e);
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        match std::fs::remove_file(self.state_path(sandbox_id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CniError::io(
                "remove pod network state",
                self.state_path(sandbox_id),
            )(e)),
        }
    }

    fn sandboxes(&self) -> Result<Vec<String>> {
        let mut ids = std::collections::BTreeSet::new();
        for (dir, suffix) in [(&self.state_dir, ".json"), (&self.netns_dir, "")] {
            let entries = match std::fs::read_dir(dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(CniError::io("list", dir.clone())(e)),
            };
            ids.extend(entries.flatten().filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let id = name.strip_suffix(suffix)?.to_string();
                crate::valid_name("sandbox id", &id).ok()?;
                Some(id)
            }));
        }
        Ok(ids.into_iter().collect())
    }

    async fn status(&self, sandbox_id: &str) -> Result<NetworkStatus> {
        crate::valid_name("sandbox id", sandbox_id)?;
        self.read_state(sandbox_id)?
            .ok_or_else(|| CniError::PodNotFound {
                id: sandbox_id.to_string(),
            })
    }
}

/// Keep the first error to return; log the later ones (not returned).
fn keep_first(slot: &mut Option<CniError>, e: CniError) {
    match slot {
        Some(_) => tracing::warn!(error = %e, "pod network teardown step failed too"),
        None => *slot = Some(e),
    }
}

/// The netns of a set-up pod, for [`crate::open_tap`].
pub fn pod_netns(status: &NetworkStatus) -> Result<NetNs> {
    NetNs::open(status.netns.clone())
}

/// Open every tap of a set-up pod for the hypervisor, in interface order
/// (interfaces without a tap are skipped): `(guest interface name, fd)`.
pub fn open_pod_taps(status: &NetworkStatus, vnet_hdr: bool) -> Result<Vec<(String, OwnedFd)>> {
    let ns = pod_netns(status)?;
    status
        .interfaces
        .iter()
        .filter_map(|i| i.tap_name.as_deref().map(|tap| (i.guest_name.clone(), tap)))
        .map(|(guest, tap)| Ok((guest, crate::open_tap(&ns, tap, vnet_hdr)?)))
        .collect()
}
