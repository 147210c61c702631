//! RunPodSandbox: reserve the name, set up the pod's network (netns, CNI,
//! tc-filter tap), boot its VM with the tap and the pod's DNS and hostname,
//! then persist. Every step is undone, in reverse, when a later one fails.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use k8s_cri::v1 as cri;
use podsandbox::{DnsConfig, NetInterface, NetRoute, SandboxConfig, SandboxNetwork, TapFd};

use crate::{
    config::{ANNOTATION_MEMORY_MIB, ANNOTATION_VCPUS, KNOWN_ANNOTATIONS},
    error::{CriError, Result},
    server::Cri,
    store::{self, PodMeta},
};

/// Runtime handlers this server answers to ("" is the default).
pub const RUNTIME_HANDLERS: &[&str] = &["", "virtcontainers", "vc"];

/// The prefix of the annotations vcrid interprets.
const ANNOTATION_PREFIX: &str = "io.virtcontainers.";

impl Cri {
    pub(crate) async fn run_pod_sandbox(
        &self,
        req: cri::RunPodSandboxRequest,
    ) -> Result<cri::RunPodSandboxResponse> {
        let config = req
            .config
            .ok_or_else(|| CriError::invalid("config", "is required"))?;
        let md = config
            .metadata
            .clone()
            .ok_or_else(|| CriError::invalid("config.metadata", "is required"))?;
        for (field, value) in [
            ("config.metadata.name", &md.name),
            ("config.metadata.namespace", &md.namespace),
            ("config.metadata.uid", &md.uid),
        ] {
            if value.is_empty() {
                return Err(CriError::invalid(field, "must not be empty"));
            }
        }
        if !RUNTIME_HANDLERS.contains(&req.runtime_handler.as_str()) {
            return Err(CriError::invalid(
                "runtime_handler",
                format!(
                    "{:?} is not a handler of vcrid (use \"\" or \"virtcontainers\")",
                    req.runtime_handler
                ),
            ));
        }
        refuse_host_namespaces(&config)?;
        let sized =
            super::sandbox_size::pod_size(config.linux.as_ref(), &self.inner.config.hypervisor)?;
        let (vcpus, memory_mib) = self.annotation_overrides(&config.annotations)?;
        // An allowlisted annotation wins over the size the limits give.
        let (vcpus, memory_mib) = (vcpus.or(sized.vcpus), memory_mib.or(sized.memory_mib));
        let sysctls = pod_sysctls(&config)?;
        let hostname = pod_hostname(&config.hostname, &md.name)?;
        if let Some(parent) = config.linux.as_ref().map(|l| &l.cgroup_parent) {
            if !parent.is_empty() {
                podsandbox::cgroup::parent_path(parent)
                    .map_err(|e| CriError::invalid("config.linux.cgroup_parent", e.to_string()))?;
            }
        }

        let id = new_id();
        let name = store::pod_name(&md);
        self.inner.store.reserve("pod sandbox", &name, &id)?;
        let lock = self.pod_lock(&id);
        let _guard = lock.lock().await;
        let plan = PodPlan {
            vcpus,
            memory_mib,
            net_sysctls: sysctls.net,
            hostname,
        };
        let ran = self
            .run_steps(&id, config.clone(), req.runtime_handler.clone(), plan)
            .await;
        if let Err((err, undo_problems)) = ran {
            if undo_problems.is_empty() {
                self.inner.store.release(&name, &id);
                self.forget_pod_lock(&id);
                return Err(err);
            }
            // As containerd does: a pod whose undo failed is kept, NOTREADY
            // with the reason, so that RemovePodSandbox finishes the job.
            let reason = format!(
                "RunPodSandbox failed ({err}) and its undo did not finish: {}",
                undo_problems.join("; ")
            );
            tracing::error!(pod = %id, "{reason}");
            let meta = PodMeta {
                id: id.clone(),
                config,
                runtime_handler: req.runtime_handler,
                created_at_ns: podsandbox::container::now_ns(),
                network: None,
                stopped: true,
                cleanup_error: Some(reason),
            };
            if let Err(save) = self.inner.store.save_pod(&meta) {
                tracing::error!(pod = %id, "keeping the pod whose undo failed: {save}");
            }
            return Err(err);
        }
        tracing::info!(pod = %id, name = %name, "pod sandbox ready");
        Ok(cri::RunPodSandboxResponse { pod_sandbox_id: id })
    }

    /// Network, VM, record — each a step a failure undoes in reverse. On
    /// error, also what of the undo failed (empty: nothing is left).
    async fn run_steps(
        &self,
        id: &str,
        config: cri::PodSandboxConfig,
        runtime_handler: String,
        plan: PodPlan,
    ) -> std::result::Result<(), (CriError, Vec<String>)> {
        let PodPlan {
            vcpus,
            memory_mib,
            net_sysctls,
            hostname,
        } = plan;
        let network = self
            .inner
            .network
            .setup(&network_request(id, &config))
            .await
            .map_err(|e| (e.into(), Vec::new()))?;
        let booted: std::result::Result<(), (CriError, bool)> = async {
            let before_vm = |e: CriError| (e, false);
            self.fail_point("run_pod_sandbox.network_set_up")
                .map_err(before_vm)?;
            let sandbox = SandboxConfig {
                id: id.into(),
                vcpus,
                memory_mib,
                hostname: Some(hostname),
                network: SandboxNetwork {
                    sysctls: net_sysctls,
                    ..sandbox_network(&network).map_err(before_vm)?
                },
                cgroup_parent: config
                    .linux
                    .as_ref()
                    .map(|l| l.cgroup_parent.clone())
                    .filter(|p| !p.is_empty()),
                dns: config.dns_config.as_ref().map(|d| DnsConfig {
                    servers: d.servers.clone(),
                    searches: d.searches.clone(),
                    options: d.options.clone(),
                }),
            };
            // A create that fails undoes itself.
            self.inner
                .runtime
                .create_sandbox(sandbox)
                .await
                .map_err(|e| before_vm(e.into()))?;
            let started = async {
                self.fail_point("run_pod_sandbox.sandbox_created")?;
                self.inner.runtime.start_sandbox(id).await?;
                self.fail_point("run_pod_sandbox.sandbox_started")?;
                self.inner.store.save_pod(&PodMeta {
                    id: id.into(),
                    config,
                    runtime_handler,
                    created_at_ns: podsandbox::container::now_ns(),
                    network: Some(network.clone()),
                    stopped: false,
                    cleanup_error: None,
                })
            }
            .await;
            started.map_err(|err| (err, true))
        }
        .await;
        let Err((err, vm_made)) = booted else {
            return Ok(());
        };
        let mut problems = Vec::new();
        if vm_made {
            if let Err(undo) = self.undo_vm(id).await {
                problems.push(format!("removing the VM: {undo}"));
            }
        }
        if let Err(undo) = self.inner.network.teardown(id).await {
            problems.push(format!("tearing the network down: {undo}"));
        }
        Err((err, problems))
    }

    /// Stops and deletes the VM of a pod being undone.
    async fn undo_vm(&self, id: &str) -> Result<()> {
        if let Err(err) = self.inner.runtime.stop_sandbox(id).await {
            tracing::debug!(pod = %id, "undo: stop: {err}");
        }
        match self.inner.runtime.delete_sandbox(id).await {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == podsandbox::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    /// VM size overrides from annotations, only those the config allows.
    fn annotation_overrides(
        &self,
        annotations: &HashMap<String, String>,
    ) -> Result<(Option<u32>, Option<u32>)> {
        let allowed = &self.inner.config.annotations.allowed;
        let mut out = (None, None);
        for (key, value) in annotations {
            if !key.starts_with(ANNOTATION_PREFIX) {
                continue;
            }
            let field = format!("config.annotations[{key:?}]");
            if !KNOWN_ANNOTATIONS.contains(&key.as_str()) {
                return Err(CriError::invalid(
                    field,
                    format!(
                        "is not an annotation vcrid knows ({})",
                        KNOWN_ANNOTATIONS.join(", ")
                    ),
                ));
            }
            if !allowed.iter().any(|a| a == key) {
                return Err(CriError::invalid(
                    field,
                    "is not enabled in vcrid's config (annotations.allowed)",
                ));
            }
            let n: u32 = value
                .parse()
                .map_err(|_| CriError::invalid(&field, format!("{value:?} is not a number")))?;
            match key.as_str() {
                ANNOTATION_VCPUS => out.0 = Some(n),
                ANNOTATION_MEMORY_MIB => out.1 = Some(n),
                _ => {}
            }
        }
        Ok(out)
    }
}

/// What RunPodSandbox decided from the request before setting anything up.
struct PodPlan {
    vcpus: Option<u32>,
    memory_mib: Option<u32>,
    net_sysctls: BTreeMap<String, String>,
    hostname: String,
}

/// The pod's host name: the one asked for, checked (RFC 1123, at most 64
/// bytes: refused naming `config.hostname`), or, when none is asked for, the
/// node's own as containerd gives it — and if the node's is not a valid host
/// name, the pod's name made into one. A name vcrid chose never fails a pod.
fn pod_hostname(asked: &str, pod_name: &str) -> Result<String> {
    if !asked.is_empty() {
        podsandbox::network::check_hostname(asked).map_err(|detail| {
            CriError::invalid("config.hostname", format!("{asked:?} {detail}"))
        })?;
        return Ok(asked.to_string());
    }
    let node = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    if podsandbox::network::check_hostname(&node).is_ok() {
        return Ok(node);
    }
    Ok(sanitized_hostname(pod_name))
}

/// `name` as a host name: lower case, every other character than letters,
/// digits, '-' and '.' a '-', labels trimmed of hyphens, at most 63 bytes;
/// "pod" when nothing is left.
fn sanitized_hostname(name: &str) -> String {
    let mapped: String = name
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '-' | '.') => c,
            _ => '-',
        })
        .collect();
    let mut out = String::new();
    for label in mapped.split('.') {
        let label: String = label.trim_matches('-').chars().take(63).collect();
        let label = label.trim_end_matches('-');
        if label.is_empty() {
            continue;
        }
        let sep = usize::from(!out.is_empty());
        if out.len() + sep + label.len() > 63 {
            break;
        }
        if sep == 1 {
            out.push('.');
        }
        out.push_str(label);
    }
    if out.is_empty() {
        "pod".into()
    } else {
        out
    }
}

/// A pod asking for a host namespace cannot be a VM: say so, naming the field.
fn refuse_host_namespaces(config: &cri::PodSandboxConfig) -> Result<()> {
    let Some(ns) = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref())
    else {
        return Ok(());
    };
    let node = cri::NamespaceMode::Node as i32;
    for (field, mode, what) in [
        ("network", ns.network, "host network (hostNetwork)"),
        ("pid", ns.pid, "host PID namespace (hostPID)"),
        ("ipc", ns.ipc, "host IPC namespace (hostIPC)"),
    ] {
        if mode == node {
            return Err(CriError::invalid(
                format!("config.linux.security_context.namespace_options.{field}"),
                format!("NODE asks for the {what}; a pod of vcrid is a virtual machine and cannot share it"),
            ));
        }
    }
    Ok(())
}

/// A 128-bit random ID in hex (shorter than kubelet's 64: it names unix
/// socket paths, which must fit in 107 bytes).
pub(crate) fn new_id() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness: time and a counter still make a unique ID.
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = podsandbox::container::now_ns() as u64;
        bytes[..8].copy_from_slice(&t.to_le_bytes());
        bytes[8..].copy_from_slice(&n.to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn network_request(id: &str, config: &cri::PodSandboxConfig) -> cni::PodNetworkRequest {
    let md = config.metadata.clone().unwrap_or_default();
    cni::PodNetworkRequest {
        sandbox_id: id.into(),
        pod: cni::PodIdentity {
            namespace: md.namespace,
            name: md.name,
            uid: md.uid,
        },
        port_mappings: config
            .port_mappings
            .iter()
            .filter(|p| p.host_port > 0)
            .filter_map(|p| {
                Some(cni::PortMapping {
                    host_port: u16::try_from(p.host_port).ok()?,
                    container_port: u16::try_from(p.container_port).ok()?,
                    protocol: match cri::Protocol::try_from(p.protocol) {
                        Ok(cri::Protocol::Udp) => "udp",
                        Ok(cri::Protocol::Sctp) => "sctp",
                        _ => "tcp",
                    }
                    .into(),
                    host_ip: p.host_ip.clone(),
                })
            })
            .collect(),
        bandwidth: None,
        dns: config.dns_config.as_ref().map(|d| cni::DnsCapability {
            servers: d.servers.clone(),
            searches: d.searches.clone(),
            options: d.options.clone(),
        }),
    }
}

/// What the VM gets from the CNI result: a tap per interface, the veth's
/// MAC/MTU/addresses, and the namespace's routes.
fn sandbox_network(status: &cni::NetworkStatus) -> Result<SandboxNetwork> {
    let mut taps = if status.interfaces.iter().any(|i| i.tap_name.is_some()) {
        cni::open_pod_taps(status, true)?
    } else {
        Vec::new()
    };
    let interfaces: Vec<NetInterface> = status
        .interfaces
        .iter()
        .filter_map(|iface| {
            let at = taps
                .iter()
                .position(|(guest, _)| *guest == iface.guest_name)?;
            let (_, fd) = taps.remove(at);
            Some(NetInterface {
                name: iface.guest_name.clone(),
                mac: iface.mac.clone(),
                mtu: iface.mtu,
                ips: iface.ips.iter().map(|ip| ip.to_string()).collect(),
                tap: Some(TapFd(Arc::new(fd))),
                place: Some(podsandbox::network::TapPlace {
                    netns: status.netns.clone(),
                    veth: iface.guest_name.clone(),
                }),
                current_mac: None,
            })
        })
        .collect();
    let routes = status
        .routes
        .iter()
        .filter(|r| interfaces.iter().any(|i| i.name == r.device))
        .map(|r| NetRoute {
            dest: if r.dest.prefix_len == 0 {
                String::new()
            } else {
                r.dest.to_string()
            },
            gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
            device: r.device.clone(),
            source: String::new(),
        })
        .collect();
    let neighbors = status
        .neighbours
        .iter()
        .filter(|n| interfaces.iter().any(|i| i.name == n.device))
        .map(|n| podsandbox::NetNeighbor {
            ip: n.ip.to_string(),
            mac: n.mac.clone(),
            device: n.device.clone(),
        })
        .collect();
    Ok(SandboxNetwork {
        interfaces,
        routes,
        neighbors,
        sysctls: BTreeMap::new(),
    })
}

/// A pod's sysctls, by where a pod VM sets them.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct PodSysctls {
    /// `net.*`: the guest's (the VM's network is the pod's namespace).
    pub net: BTreeMap<String, String>,
    /// IPC namespace sysctls: in each container's spec (each has its IPC
    /// namespace in the guest).
    pub ipc: BTreeMap<String, String>,
}

/// The IPC sysctls a container namespace has (runc's and Kubernetes' list).
const IPC_SYSCTLS: &[&str] = &[
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.sem",
    "kernel.shmall",
    "kernel.shmmax",
    "kernel.shmmni",
    "kernel.shm_rmid_forced",
];

/// Sorts `config.linux.sysctls` into [`PodSysctls`]; a sysctl that is not
/// namespaced (it would be the whole VM's kernel, not the pod's) is refused,
/// naming it, as runc refuses it for a runc pod.
pub(crate) fn pod_sysctls(config: &cri::PodSandboxConfig) -> Result<PodSysctls> {
    let mut out = PodSysctls::default();
    let Some(linux) = config.linux.as_ref() else {
        return Ok(out);
    };
    for (key, value) in &linux.sysctls {
        let field = || format!("config.linux.sysctls[{key:?}]");
        if value.contains(['\n', '\0']) {
            return Err(CriError::invalid(field(), "the value must be one line"));
        }
        // kubelet accepts a slash form (net/ipv4/ip_forward) too; a net.*
        // name keeps its form (the agent reads both), IPC names have no
        // dots inside their components.
        let dotted = key.replace('/', ".");
        if key.starts_with("net.") || key.starts_with("net/") {
            out.net.insert(key.clone(), value.clone());
        } else if IPC_SYSCTLS.contains(&dotted.as_str()) || dotted.starts_with("fs.mqueue.") {
            out.ipc.insert(dotted, value.clone());
        } else {
            return Err(CriError::invalid(
                field(),
                "is not a namespaced sysctl (net.*, kernel.shm*, kernel.msg*, kernel.sem, fs.mqueue.*): it would set the VM's whole kernel",
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctls_are_sorted_by_namespace_and_others_refused() {
        let pod = |pairs: &[(&str, &str)]| cri::PodSandboxConfig {
            linux: Some(cri::LinuxPodSandboxConfig {
                sysctls: pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let s = pod_sysctls(&pod(&[
            ("net.ipv4.ip_unprivileged_port_start", "0"),
            ("net/ipv4/conf/eth0.100/forwarding", "1"),
            ("kernel/shm_rmid_forced", "1"),
            ("fs.mqueue.msg_max", "20"),
        ]))
        .expect("namespaced");
        assert_eq!(s.net.len(), 2);
        assert_eq!(
            s.ipc.keys().collect::<Vec<_>>(),
            ["fs.mqueue.msg_max", "kernel.shm_rmid_forced"]
        );
        let err = pod_sysctls(&pod(&[("kernel.pid_max", "100")])).expect_err("global");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.to_string()
                .contains("config.linux.sysctls[\"kernel.pid_max\"]"),
            "{err}"
        );
        assert!(pod_sysctls(&pod(&[("net.x", "1\n2")])).is_err());
        assert_eq!(
            pod_sysctls(&cri::PodSandboxConfig::default()).ok(),
            Some(PodSysctls::default())
        );
    }

    #[test]
    fn hostnames_asked_for_are_checked_and_chosen_ones_never_fail() {
        assert_eq!(pod_hostname("web-0", "x").expect("valid"), "web-0");
        let err = pod_hostname("bad_name", "x").expect_err("underscore");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.to_string().starts_with("config.hostname: "), "{err}");
        assert!(pod_hostname(&"a".repeat(65), "x").is_err());
        // None asked for: the node's (valid here) or the pod's name made valid.
        let chosen = pod_hostname(
            "",
            "create-PodSandbox-for-container-d81bed96-edb7-11f1-9de8-de90307c4893",
        )
        .expect("never fails");
        assert_eq!(podsandbox::network::check_hostname(&chosen), Ok(()));
        let long = "create-PodSandbox-for-container-d81bed96-edb7-11f1-9de8-de90307c4893";
        let s = sanitized_hostname(long);
        assert_eq!(
            s,
            "create-podsandbox-for-container-d81bed96-edb7-11f1-9de8-de90307"
        );
        assert_eq!(podsandbox::network::check_hostname(&s), Ok(()));
        for (name, want) in [
            ("Web_1", "web-1"),
            ("--", "pod"),
            ("a..b", "a.b"),
            ("x-", "x"),
            ("héllo", "h-llo"),
        ] {
            let got = sanitized_hostname(name);
            assert_eq!(got, want, "{name}");
            assert_eq!(podsandbox::network::check_hostname(&got), Ok(()), "{name}");
        }
    }

    #[test]
    fn ids_are_32_hex_and_differ() {
        let a = new_id();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, new_id());
    }

    #[test]
    fn host_namespaces_are_refused_by_field() {
        let mut config = cri::PodSandboxConfig {
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        pid: cri::NamespaceMode::Node as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = refuse_host_namespaces(&config).expect_err("hostPID");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.to_string()
                .starts_with("config.linux.security_context.namespace_options.pid: NODE"),
            "{err}"
        );
        config.linux = None;
        assert!(refuse_host_namespaces(&config).is_ok());
    }
}
