//! The CNI runner: ADD / CHECK / DEL of a network config list, with
//! `prevResult` chaining, capability args, a result cache for DEL after a
//! restart, and a rollback DEL when ADD fails half-way.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::{at_least_040, NetworkConfigList};
use crate::error::{CniError, Result};
use crate::exec::{find_plugin, invoke, CniCommand, Invocation};
use crate::result::CniResult;

pub const DEFAULT_CONF_DIR: &str = "/etc/cni/net.d";
pub const DEFAULT_BIN_DIRS: &[&str] = &["/opt/cni/bin", "/usr/lib/cni"];
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/virtcontainers/cni-cache";
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_IFNAME: &str = "eth0";
/// Plugins [`Cni::check`] should not ask by default: Debian's portmap 1.1.1
/// fails CHECK on a correct IPv4-only setup ("could not check ipv6 dnat:
/// chain CNI-DN-… not found").
pub const CHECK_SKIP_DEFAULT: &[&str] = &["portmap"];

/// Where configs, plugins and the cache live, and how long a plugin may run.
#[derive(Debug, Clone)]
pub struct CniConfig {
    pub conf_dir: PathBuf,
    pub bin_dirs: Vec<PathBuf>,
    pub cache_dir: PathBuf,
    pub timeout: Duration,
}

impl Default for CniConfig {
    fn default() -> Self {
        Self {
            conf_dir: DEFAULT_CONF_DIR.into(),
            bin_dirs: DEFAULT_BIN_DIRS.iter().map(PathBuf::from).collect(),
            cache_dir: DEFAULT_CACHE_DIR.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// A `portMappings` capability entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    #[serde(default, rename = "hostIP", skip_serializing_if = "String::is_empty")]
    pub host_ip: String,
}

/// The `bandwidth` capability (bits per second, burst in bits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bandwidth {
    pub ingress_rate: u64,
    pub ingress_burst: u64,
    pub egress_rate: u64,
    pub egress_burst: u64,
}

/// One entry of the `ipRanges` capability.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpRange {
    pub subnet: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_end: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

/// The `dns` capability.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsCapability {
    #[serde(default)]
    pub servers: Vec<String>,
    #[serde(default)]
    pub searches: Vec<String>,
    #[serde(default)]
    pub options: Vec<String>,
}

/// Capability args; each goes into `runtimeConfig` of the plugins that declare it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilityArgs {
    pub port_mappings: Vec<PortMapping>,
    pub bandwidth: Option<Bandwidth>,
    pub ip_ranges: Vec<Vec<IpRange>>,
    pub dns: Option<DnsCapability>,
}

impl CapabilityArgs {
    /// The capability values that are set, by capability name.
    pub fn to_map(&self) -> Map<String, Value> {
        let mut m = Map::new();
        if !self.port_mappings.is_empty() {
            m.insert("portMappings".into(), serde_json::json!(self.port_mappings));
        }
        if let Some(b) = &self.bandwidth {
            m.insert("bandwidth".into(), serde_json::json!(b));
        }
        if !self.ip_ranges.is_empty() {
            m.insert("ipRanges".into(), serde_json::json!(self.ip_ranges));
        }
        if let Some(d) = &self.dns {
            m.insert("dns".into(), serde_json::json!(d));
        }
        m
    }
}

/// The Kubernetes identity of a pod, passed to plugins in `CNI_ARGS`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// What one ADD / CHECK / DEL is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeConf {
    pub container_id: String,
    pub netns: PathBuf,
    pub if_name: String,
    /// `CNI_ARGS` key/value pairs (after `IgnoreUnknown=1`).
    pub args: Vec<(String, String)>,
    pub capabilities: CapabilityArgs,
}

impl RuntimeConf {
    /// The usual conf for a pod sandbox: `eth0` and the `K8S_*` args.
    pub fn for_pod(sandbox_id: &str, netns: &Path, pod: &PodIdentity) -> Self {
        Self {
            container_id: sandbox_id.to_string(),
            netns: netns.to_path_buf(),
            if_name: DEFAULT_IFNAME.to_string(),
            args: vec![
                ("K8S_POD_NAMESPACE".into(), pod.namespace.clone()),
                ("K8S_POD_NAME".into(), pod.name.clone()),
                ("K8S_POD_INFRA_CONTAINER_ID".into(), sandbox_id.to_string()),
                ("K8S_POD_UID".into(), pod.uid.clone()),
            ],
            capabilities: CapabilityArgs::default(),
        }
    }

    /// `CNI_ARGS`: always starting with `IgnoreUnknown=1` so plugins that do
    /// not know the `K8S_*` keys do not fail.
    pub fn cni_args(&self) -> String {
        let mut s = String::from("IgnoreUnknown=1");
        for (k, v) in &self.args {
            s.push(';');
            s.push_str(k);
            s.push('=');
            s.push_str(v);
        }
        s
    }

    fn validate(&self) -> Result<()> {
        crate::valid_name("container id", &self.container_id)?;
        crate::valid_name("interface name", &self.if_name)?;
        for (k, v) in &self.args {
            if k.contains([';', '=']) || v.contains(';') {
                return Err(CniError::InvalidArgument {
                    what: "CNI_ARGS entry",
                    value: format!("{k}={v}"),
                    reason: "keys may not hold ';' or '=', values may not hold ';'".into(),
                });
            }
        }
        Ok(())
    }
}

/// What the cache keeps per attachment (network, container, interface).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CacheEntry {
    kind: String,
    container_id: String,
    if_name: String,
    network_name: String,
    netns: PathBuf,
    /// The config list ADD used, so DEL runs the same plugins.
    config: Value,
    cni_args: Vec<(String, String)>,
    capability_args: CapabilityArgs,
    /// The final ADD result; absent while ADD is in progress or if it died.
    #[serde(default)]
    result: Option<Value>,
}

const CACHE_KIND: &str = "vcCniCacheV1";

/// The outcome of an ADD: the parsed result and the raw JSON.
#[derive(Debug, Clone)]
pub struct AddResult {
    pub network_name: String,
    pub result: CniResult,
    pub raw: Value,
}

/// Runs the plugins of the first config list in the conf dir.
#[derive(Debug, Clone)]
pub struct Cni {
    cfg: CniConfig,
}

impl Cni {
    pub fn new(cfg: CniConfig) -> Self {
        Self { cfg }
    }

    pub fn config(&self) -> &CniConfig {
        &self.cfg
    }

    /// Load the current network config list.
    pub fn load(&self) -> Result<NetworkConfigList> {
        NetworkConfigList::load_dir(&self.cfg.conf_dir)
    }

    fn cni_path(&self) -> String {
        self.cfg
            .bin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    }

    /// `<cache>/results/<container_id>-<ifname>.json`: one attachment per
    /// container and interface, whatever the network is called, so DEL finds
    /// it even after the config changed.
    fn cache_path(&self, rt: &RuntimeConf) -> PathBuf {
        self.cfg
            .cache_dir
            .join("results")
            .join(format!("{}-{}.json", rt.container_id, rt.if_name))
    }

    fn read_cache(&self, rt: &RuntimeConf) -> Result<Option<CacheEntry>> {
        let path = self.cache_path(rt);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| CniError::Decode { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CniError::io("read CNI cache", path)(e)),
        }
    }

    fn write_cache(&self, rt: &RuntimeConf, entry: &CacheEntry) -> Result<()> {
        let path = self.cache_path(rt);
        let bytes = serde_json::to_vec_pretty(entry).map_err(|source| CniError::Decode {
            path: path.clone(),
            source,
        })?;
        crate::write_atomic(&path, &bytes)
    }

    fn remove_cache(&self, rt: &RuntimeConf) -> Result<()> {
        let path = self.cache_path(rt);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CniError::io("remove CNI cache", path)(e)),
        }
    }

    /// Whether an ADD of this attachment is cached (done or in progress).
    pub fn has_cached(&self, rt: &RuntimeConf) -> bool {
        self.cache_path(rt).exists()
    }

    /// The cached ADD result of an attachment, if any.
    pub fn cached_result(&self, rt: &RuntimeConf) -> Result<Option<CniResult>> {
        let Some(entry) = self.read_cache(rt)? else {
            return Ok(None);
        };
        match entry.result {
            Some(v) => CniResult::parse(&v)
                .map(Some)
                .map_err(|reason| CniError::BadResult {
                    plugin: entry.network_name,
                    command: "ADD (cached)",
                    reason,
                }),
            None => Ok(None),
        }
    }

    /// The stdin config of one plugin invocation.
    fn plugin_stdin(
        list: &NetworkConfigList,
        index: usize,
        prev: Option<&Value>,
        caps: &CapabilityArgs,
    ) -> Vec<u8> {
        let plugin = &list.plugins[index];
        let mut conf = plugin.raw.clone();
        conf.insert("name".into(), Value::String(list.name.clone()));
        conf.insert("cniVersion".into(), Value::String(list.cni_version.clone()));
        if let Some(prev) = prev {
            conf.insert("prevResult".into(), prev.clone());
        }
        let mut runtime = Map::new();
        for (name, value) in caps.to_map() {
            if plugin.has_capability(&name) {
                runtime.insert(name, value);
            }
        }
        if !runtime.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(runtime));
        }
        // Serializing a map of JSON values cannot fail.
        serde_json::to_vec(&Value::Object(conf)).unwrap_or_default()
    }

    async fn run_plugin(
        &self,
        list: &NetworkConfigList,
        index: usize,
        command: CniCommand,
        rt: &RuntimeConf,
        prev: Option<&Value>,
    ) -> Result<Vec<u8>> {
        let plugin = &list.plugins[index];
        let binary = find_plugin(&plugin.plugin_type, &self.cfg.bin_dirs)?;
        let cni_args = rt.cni_args();
        let cni_path = self.cni_path();
        tracing::debug!(plugin = %plugin.plugin_type, command = command.as_str(), container = %rt.container_id, "running CNI plugin");
        invoke(Invocation {
            plugin: &plugin.plugin_type,
            binary: &binary,
            command,
            container_id: &rt.container_id,
            netns: &rt.netns,
            if_name: &rt.if_name,
            cni_args: &cni_args,
            cni_path: &cni_path,
            stdin: Self::plugin_stdin(list, index, prev, &rt.capabilities),
            timeout: self.cfg.timeout,
        })
        .await
    }

    /// ADD the attachment: every plugin in order, each given the previous
    /// result. On failure everything added is DELeted again and the cache
    /// entry removed.
    pub async fn add(&self, rt: &RuntimeConf) -> Result<AddResult> {
        rt.validate()?;
        let list = self.load()?;
        // Every plugin must exist before anything runs.
        for p in &list.plugins {
            find_plugin(&p.plugin_type, &self.cfg.bin_dirs)?;
        }
        if self.has_cached(rt) {
            return Err(CniError::AlreadyAttached {
                container_id: rt.container_id.clone(),
                if_name: rt.if_name.clone(),
            });
        }
        let mut entry = CacheEntry {
            kind: CACHE_KIND.into(),
            container_id: rt.container_id.clone(),
            if_name: rt.if_name.clone(),
            network_name: list.name.clone(),
            netns: rt.netns.clone(),
            config: list.raw.clone(),
            cni_args: rt.args.clone(),
            capability_args: rt.capabilities.clone(),
            result: None,
        };
        // Cached before the first plugin runs, so a crash mid-ADD can still be DELeted.
        self.write_cache(rt, &entry)?;
        let mut prev: Option<Value> = None;
        for index in 0..list.plugins.len() {
            let step = self
                .run_plugin(&list, index, CniCommand::Add, rt, prev.as_ref())
                .await
                .and_then(|out| {
                    let plugin = &list.plugins[index].plugin_type;
                    let value: Value =
                        serde_json::from_slice(&out).map_err(|e| CniError::BadResult {
                            plugin: plugin.clone(),
                            command: "ADD",
                            reason: format!("not JSON: {e}"),
                        })?;
                    CniResult::parse(&value).map_err(|reason| CniError::BadResult {
                        plugin: plugin.clone(),
                        command: "ADD",
                        reason,
                    })?;
                    Ok(value)
                });
            match step {
                Ok(value) => prev = Some(value),
                Err(e) => return Err(self.rollback(&list, rt, prev.as_ref(), e).await),
            }
        }
        let Some(raw) = prev else {
            return Err(CniError::InvalidConfig {
                file: list.source.clone(),
                reason: "no plugins".into(),
            });
        };
        let result = CniResult::parse(&raw).map_err(|reason| CniError::BadResult {
            plugin: list.name.clone(),
            command: "ADD",
            reason,
        })?;
        entry.result = Some(raw.clone());
        if let Err(e) = self.write_cache(rt, &entry) {
            return Err(self.rollback(&list, rt, Some(&raw), e).await);
        }
        Ok(AddResult {
            network_name: list.name,
            result,
            raw,
        })
    }

    async fn rollback(
        &self,
        list: &NetworkConfigList,
        rt: &RuntimeConf,
        prev: Option<&Value>,
        cause: CniError,
    ) -> CniError {
        tracing::info!(container = %rt.container_id, "CNI ADD failed; deleting what was added");
        match self.del_list(list, rt, prev).await {
            Ok(()) => match self.remove_cache(rt) {
                Ok(()) => cause,
                Err(e) => CniError::RollbackFailed {
                    command: "CNI ADD",
                    container_id: rt.container_id.clone(),
                    del_error: e.to_string(),
                    source: Box::new(cause),
                },
            },
            Err(e) => CniError::RollbackFailed {
                command: "CNI ADD",
                container_id: rt.container_id.clone(),
                del_error: e.to_string(),
                source: Box::new(cause),
            },
        }
    }

    /// DEL every plugin in reverse order; every plugin runs even if an
    /// earlier one failed, and the first error is returned.
    async fn del_list(
        &self,
        list: &NetworkConfigList,
        rt: &RuntimeConf,
        prev: Option<&Value>,
    ) -> Result<()> {
        let prev = if at_least_040(&list.cni_version) {
            prev
        } else {
            None
        };
        let mut first_err = None;
        for index in (0..list.plugins.len()).rev() {
            if let Err(e) = self
                .run_plugin(list, index, CniCommand::Del, rt, prev)
                .await
            {
                match first_err {
                    // Only the first error is returned: log the later ones.
                    Some(_) => tracing::warn!(error = %e, "CNI DEL failed too"),
                    None => first_err = Some(e),
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// DEL the attachment, from the cache when there is one (the config,
    /// args and result ADD used), else with the current config. Idempotent.
    pub async fn del(&self, rt: &RuntimeConf) -> Result<()> {
        rt.validate()?;
        let (list, rt_used, prev) = match self.read_cache(rt)? {
            Some(entry) => {
                let list = NetworkConfigList::from_value(&self.cache_path(rt), entry.config)?;
                let rt_used = RuntimeConf {
                    container_id: entry.container_id,
                    netns: rt.netns.clone(),
                    if_name: entry.if_name,
                    args: entry.cni_args,
                    capabilities: entry.capability_args,
                };
                (list, rt_used, entry.result)
            }
            None => (self.load()?, rt.clone(), None),
        };
        self.del_list(&list, &rt_used, prev.as_ref()).await?;
        self.remove_cache(rt)
    }

    /// CHECK the attachment against its cached result. Plugins listed in
    /// `skip` are not asked (Debian's portmap 1.1.1 fails CHECK on a correct
    /// setup). Spec versions before 0.4.0 and `disableCheck` lists skip CHECK.
    pub async fn check(&self, rt: &RuntimeConf, skip: &[&str]) -> Result<()> {
        rt.validate()?;
        let entry = self.read_cache(rt)?.ok_or_else(|| CniError::NotAttached {
            container_id: rt.container_id.clone(),
            if_name: rt.if_name.clone(),
        })?;
        let list = NetworkConfigList::from_value(&self.cache_path(rt), entry.config)?;
        if !at_least_040(&list.cni_version) || list.disable_check {
            return Ok(());
        }
        let rt_used = RuntimeConf {
            container_id: entry.container_id,
            netns: rt.netns.clone(),
            if_name: entry.if_name,
            args: entry.cni_args,
            capabilities: entry.capability_args,
        };
        let prev = entry.result;
        for index in 0..list.plugins.len() {
            if skip.contains(&list.plugins[index].plugin_type.as_str()) {
                continue;
            }
            self.run_plugin(&list, index, CniCommand::Check, &rt_used, prev.as_ref())
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cni_args_start_with_ignore_unknown() {
        let rt = RuntimeConf::for_pod(
            "sb1",
            Path::new("/run/ns/sb1"),
            &PodIdentity {
                namespace: "default".into(),
                name: "web".into(),
                uid: "u-1".into(),
            },
        );
        assert_eq!(
            rt.cni_args(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=sb1;K8S_POD_UID=u-1"
        );
        assert_eq!(rt.if_name, "eth0");
        let mut bad = rt.clone();
        bad.args.push(("X".into(), "a;b".into()));
        assert!(bad.validate().is_err());
    }

    #[test]
    fn capability_map_holds_only_what_is_set() {
        assert!(CapabilityArgs::default().to_map().is_empty());
        let caps = CapabilityArgs {
            ip_ranges: vec![vec![IpRange {
                subnet: "10.1.0.0/16".into(),
                range_start: None,
                range_end: None,
                gateway: Some("10.1.0.1".into()),
            }]],
            dns: Some(DnsCapability {
                servers: vec!["10.0.0.10".into()],
                searches: vec![],
                options: vec![],
            }),
            ..Default::default()
        };
        let m = caps.to_map();
        assert_eq!(m.len(), 2);
        assert_eq!(
            m["ipRanges"],
            json!([[{"subnet": "10.1.0.0/16", "gateway": "10.1.0.1"}]])
        );
        assert_eq!(m["dns"]["servers"], json!(["10.0.0.10"]));
    }

    #[test]
    fn stdin_sets_name_version_prev_result_and_declared_capabilities_only() {
        let list = NetworkConfigList::from_value(
            Path::new("/x.conflist"),
            json!({"cniVersion": "1.0.0", "name": "net", "plugins": [
                {"type": "bridge", "cniVersion": "0.1.0"},
                {"type": "portmap", "capabilities": {"portMappings": true, "bandwidth": false}}
            ]}),
        )
        .unwrap();
        let caps = CapabilityArgs {
            port_mappings: vec![PortMapping {
                host_port: 8080,
                container_port: 80,
                protocol: "tcp".into(),
                host_ip: String::new(),
            }],
            bandwidth: Some(Bandwidth {
                ingress_rate: 1,
                ingress_burst: 1,
                egress_rate: 1,
                egress_burst: 1,
            }),
            ..Default::default()
        };
        let first: Value =
            serde_json::from_slice(&Cni::plugin_stdin(&list, 0, None, &caps)).unwrap();
        assert_eq!(first["name"], "net");
        assert_eq!(first["cniVersion"], "1.0.0");
        assert!(first.get("prevResult").is_none());
        assert!(first.get("runtimeConfig").is_none());
        let prev = json!({"cniVersion": "1.0.0", "ips": []});
        let second: Value =
            serde_json::from_slice(&Cni::plugin_stdin(&list, 1, Some(&prev), &caps)).unwrap();
        assert_eq!(second["prevResult"], prev);
        assert_eq!(
            second["runtimeConfig"],
            json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]})
        );
    }
}
