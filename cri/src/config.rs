//! `vcrid`'s configuration: `/etc/vcrid/config.toml` unless told otherwise.
//! Every field has a default that works on a host prepared by
//! `hack/install-deps.sh` with the guest image from `make build`.
//!
//! ```toml
//! listen = "unix:///run/vcrid/vcrid.sock"
//! state_dir = "/var/lib/vcrid"
//! run_dir = "/run/vcrid"
//!
//! [hypervisor]            # podsandbox's hypervisor section
//! accel = "auto"
//! default_memory_mib = 256
//!
//! [agent]
//! dial_timeout_ms = 30000
//!
//! [network]
//! conf_dir = "/etc/cni/net.d"
//! bin_dirs = ["/opt/cni/bin", "/usr/lib/cni"]
//! plugin_timeout_secs = 30
//! interworking = "tcfilter"   # or "none"
//! write_default_conflist = true
//!
//! [images]
//! rootfs = "shared-dir"       # or "block"
//! pull_progress_timeout_secs = 60   # a download receiving nothing this long fails
//! writable_layer_max_mib = 10240    # a container's writable layer (0: unbounded)
//! [images.registries.hosts."docker.io"]
//! mirrors = ["http://127.0.0.1:5000"]
//!
//! [streaming]
//! address = "127.0.0.1:0"
//!
//! [annotations]
//! # Annotations a pod may set to override hypervisor settings; none by default.
//! allowed = []                # e.g. ["io.virtcontainers.vcpus", "io.virtcontainers.memory_mib"]
//!
//! [security]
//! # Localhost seccomp profiles are read only from beneath these.
//! seccomp_profile_dirs = ["/var/lib/kubelet/seccomp"]
//! ```

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use hypervisor::HypervisorConfig;
use podsandbox::{config::AgentConfig, RuntimeConfig};
use serde::{Deserialize, Serialize};

/// Where the config lives when none is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/vcrid/config.toml";
/// The socket kubelet is pointed at.
pub const DEFAULT_LISTEN: &str = "unix:///run/vcrid/vcrid.sock";

/// Pod annotations that may override hypervisor settings, when allowed.
pub const ANNOTATION_VCPUS: &str = "io.virtcontainers.vcpus";
pub const ANNOTATION_MEMORY_MIB: &str = "io.virtcontainers.memory_mib";
/// Every annotation vcrid understands (others are kept, never interpreted).
pub const KNOWN_ANNOTATIONS: &[&str] = &[ANNOTATION_VCPUS, ANNOTATION_MEMORY_MIB];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `unix:///path` of the gRPC socket.
    pub listen: String,
    pub state_dir: PathBuf,
    /// Keep it short: unix socket paths of each pod must fit in 107 bytes.
    pub run_dir: PathBuf,
    pub hypervisor: HypervisorConfig,
    pub agent: AgentConfig,
    /// Where pods' cgroup parents are rooted: `root` or `own` (see
    /// `podsandbox::cgroup::CgroupRoot`).
    pub cgroup_root: podsandbox::cgroup::CgroupRoot,
    /// Each pod's run dir is a tmpfs of this many MiB (0: a plain dir);
    /// see `podsandbox::RuntimeConfig::run_dir_max_mib`.
    pub run_dir_max_mib: u32,
    /// Warm VMs (see `podsandbox::config::FactoryConfig`).
    pub factory: podsandbox::config::FactoryConfig,
    pub network: NetworkConfig,
    pub images: ImagesConfig,
    pub streaming: StreamingConfig,
    pub annotations: AnnotationsConfig,
    pub security: SecurityConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    /// Where `Localhost` seccomp profiles may be read from: a profile path
    /// a pod names must resolve (symlinks followed) beneath one of these.
    /// kubelet keeps them in its root's `seccomp/` directory.
    pub seccomp_profile_dirs: Vec<PathBuf>,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            seccomp_profile_dirs: vec![PathBuf::from("/var/lib/kubelet/seccomp")],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    pub conf_dir: PathBuf,
    pub bin_dirs: Vec<PathBuf>,
    pub plugin_timeout_secs: u64,
    pub interworking: Interworking,
    /// Write a bridge conflist into `conf_dir` when it has none.
    pub write_default_conflist: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interworking {
    #[default]
    Tcfilter,
    None,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImagesConfig {
    pub rootfs: RootfsKind,
    pub registries: imagestore::RegistryConfig,
    /// A download that receives nothing for this many seconds fails the pull
    /// (DeadlineExceeded); unset: imagestore's default (60 s, as kubelet's
    /// image pull progress deadline).
    pub pull_progress_timeout_secs: Option<u64>,
    /// A shared-dir container's writable layer is a filesystem of this many
    /// MiB (sparse); 0: a plain directory. Unset:
    /// [`DEFAULT_WRITABLE_LAYER_MIB`].
    pub writable_layer_max_mib: Option<u64>,
}

/// What a container may write to its rootfs by default (CRI carries no
/// ephemeral-storage limit; kubelet evicts on its own accounting).
pub const DEFAULT_WRITABLE_LAYER_MIB: u64 = 10 * 1024;

impl PartialEq for ImagesConfig {
    fn eq(&self, other: &Self) -> bool {
        self.rootfs == other.rootfs
            && self.pull_progress_timeout_secs == other.pull_progress_timeout_secs
            && self.writable_layer_max_mib == other.writable_layer_max_mib
            && serde_json::to_value(&self.registries).ok()
                == serde_json::to_value(&other.registries).ok()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RootfsKind {
    /// A host overlayfs directory shared over virtio-fs.
    #[default]
    SharedDir,
    /// A copy-on-write disk per container.
    Block,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamingConfig {
    /// Loopback only by default: kubelet runs on the same node.
    pub address: SocketAddr,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnnotationsConfig {
    /// Which of [`KNOWN_ANNOTATIONS`] a pod may use.
    pub allowed: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.into(),
            state_dir: PathBuf::from("/var/lib/vcrid"),
            run_dir: PathBuf::from("/run/vcrid"),
            hypervisor: HypervisorConfig::default(),
            agent: AgentConfig::default(),
            cgroup_root: podsandbox::cgroup::CgroupRoot::default(),
            run_dir_max_mib: podsandbox::RuntimeConfig::default().run_dir_max_mib,
            factory: Default::default(),
            network: NetworkConfig::default(),
            images: ImagesConfig::default(),
            streaming: StreamingConfig::default(),
            annotations: AnnotationsConfig::default(),
            security: SecurityConfig::default(),
        }
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            conf_dir: PathBuf::from(cni::cni::DEFAULT_CONF_DIR),
            bin_dirs: cni::cni::DEFAULT_BIN_DIRS
                .iter()
                .map(PathBuf::from)
                .collect(),
            plugin_timeout_secs: 30,
            interworking: Interworking::default(),
            write_default_conflist: true,
        }
    }
}

impl Default for StreamingConfig {
    fn default() -> Self {
        Self {
            address: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }
}

/// A config file that cannot be used, naming it.
#[derive(Debug, thiserror::Error)]
#[error("config {path}: {detail}")]
pub struct ConfigError {
    pub path: PathBuf,
    pub detail: String,
}

impl Config {
    /// Reads `path`, or [`DEFAULT_CONFIG_PATH`] if it exists, or defaults;
    /// then fills in the guest image if the file left it empty.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut config = match path {
            Some(path) => Self::from_file(path)?,
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                Self::from_file(Path::new(DEFAULT_CONFIG_PATH))?
            }
            None => Self::default(),
        };
        let mut runtime = config.runtime();
        runtime.fill_guest_image();
        config.hypervisor = runtime.hypervisor;
        config.check().map_err(|detail| ConfigError {
            path: path.unwrap_or(Path::new(DEFAULT_CONFIG_PATH)).into(),
            detail,
        })?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.into(),
            detail: e.to_string(),
        })?;
        Self::parse(&text).map_err(|detail| ConfigError {
            path: path.into(),
            detail,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let config: Self = toml::from_str(text).map_err(|e| e.message().to_string())?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        self.socket_path()?;
        self.factory.check(&self.hypervisor)?;
        for a in &self.annotations.allowed {
            if !KNOWN_ANNOTATIONS.contains(&a.as_str()) {
                return Err(format!(
                    "annotations.allowed: {a:?} is not an annotation vcrid knows ({})",
                    KNOWN_ANNOTATIONS.join(", ")
                ));
            }
        }
        for d in &self.security.seccomp_profile_dirs {
            if !d.is_absolute() {
                return Err(format!(
                    "security.seccomp_profile_dirs: {} is not an absolute path",
                    d.display()
                ));
            }
        }
        Ok(())
    }

    /// The socket path from `listen` (only `unix://` is served).
    pub fn socket_path(&self) -> Result<PathBuf, String> {
        match self.listen.strip_prefix("unix://") {
            Some(path) if path.starts_with('/') => Ok(PathBuf::from(path)),
            _ => Err(format!(
                "listen {:?} must be unix:///absolute/path",
                self.listen
            )),
        }
    }

    /// podsandbox's view: its state lives under `state_dir/sandboxes`.
    pub fn runtime(&self) -> RuntimeConfig {
        RuntimeConfig {
            state_dir: self.state_dir.clone(),
            run_dir: self.run_dir.clone(),
            hypervisor: self.hypervisor.clone(),
            agent: self.agent.clone(),
            cgroup_root: self.cgroup_root,
            run_dir_max_mib: self.run_dir_max_mib,
            factory: self.factory.clone(),
        }
    }

    /// CRI metadata (names, labels, log paths) of pods and containers.
    pub fn cri_dir(&self) -> PathBuf {
        self.state_dir.join("cri")
    }

    pub fn image_root(&self) -> PathBuf {
        self.state_dir.join("images")
    }

    pub fn cni(&self) -> cni::CniConfig {
        cni::CniConfig {
            conf_dir: self.network.conf_dir.clone(),
            bin_dirs: self.network.bin_dirs.clone(),
            cache_dir: self.state_dir.join("cni-cache"),
            timeout: Duration::from_secs(self.network.plugin_timeout_secs.max(1)),
        }
    }

    pub fn netns_dir(&self) -> PathBuf {
        self.run_dir.join("netns")
    }

    pub fn network_state_dir(&self) -> PathBuf {
        self.state_dir.join("network")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(Config::parse("").expect("parse"), Config::default());
        assert_eq!(
            Config::default().socket_path().expect("path"),
            PathBuf::from("/run/vcrid/vcrid.sock")
        );
    }

    #[test]
    fn sections_override_and_mistakes_are_named() {
        let c = Config::parse(
            "listen = \"unix:///tmp/v.sock\"\n[network]\ninterworking = \"none\"\n[images]\nrootfs = \"block\"\n[images.registries.hosts.\"docker.io\"]\nmirrors = [\"http://127.0.0.1:5000\"]\n[annotations]\nallowed = [\"io.virtcontainers.vcpus\"]\n",
        )
        .expect("parse");
        assert_eq!(c.network.interworking, Interworking::None);
        assert_eq!(c.images.rootfs, RootfsKind::Block);
        assert_eq!(
            c.images.registries.hosts["docker.io"].mirrors,
            vec!["http://127.0.0.1:5000".to_string()]
        );
        let err = Config::parse("listen = \"tcp://0.0.0.0:1\"\n").expect_err("tcp");
        assert!(err.contains("unix:///"), "{err}");
        let err = Config::parse("[annotations]\nallowed = [\"io.katacontainers.kernel\"]\n")
            .expect_err("unknown annotation");
        assert!(err.contains("io.katacontainers.kernel"), "{err}");
        let err = Config::parse("[network]\nconfdir = \"/x\"\n").expect_err("unknown key");
        assert!(err.contains("confdir"), "{err}");
    }

    #[test]
    fn hypervisor_values_as_the_readme_spells_them() {
        use hypervisor::{SharedFs, VsockBackend};
        for (text, fs) in [
            ("virtio-fs", SharedFs::VirtioFs),
            ("virtio-9p", SharedFs::Virtio9p),
            ("virtio9p", SharedFs::Virtio9p),
            ("none", SharedFs::None),
        ] {
            let c = Config::parse(&format!("[hypervisor]\nshared_fs = \"{text}\"\n")).expect(text);
            assert_eq!(c.hypervisor.shared_fs, fs, "{text}");
        }
        let c = Config::parse("[hypervisor]\nvsock = \"serial\"\n").expect("serial");
        assert_eq!(c.hypervisor.vsock, VsockBackend::Serial);
    }
}
