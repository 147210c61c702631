//! The runtime configuration: `/etc/vcrid/config.toml` unless told otherwise.
//! Every field has a default that works on a host set up by
//! `hack/install-deps.sh` with the guest image from `make build`.
//!
//! ```toml
//! state_dir = "/var/lib/vcrid"
//! run_dir = "/run/vcrid"
//!
//! [hypervisor]
//! qemu_path = "/usr/bin/qemu-system-x86_64"
//! kernel = "/usr/share/virtcontainers/guest/vmlinux"
//! initrd = "/usr/share/virtcontainers/guest/initramfs.cpio"
//! modules = ""             # modules.img next to the kernel, if there
//! machine = "q35"          # or "microvm"
//! accel = "auto"           # or "kvm", "tcg"
//! default_vcpus = 1
//! default_memory_mib = 256
//! kernel_params = ""
//!
//! [agent]
//! dial_timeout_ms = 30000
//!
//! [factory]
//! pool = 0                 # warm VMs booted ahead of demand (a node: 1-2)
//! refill_nice = 19         # the nice value a pool VM boots (and idles) at
//! ```

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use hypervisor::HypervisorConfig;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Top-level keys of the shared config file that belong to the CRI server
/// (vcrid), not to this library.
pub const SERVER_KEYS: &[&str] = &["listen", "network", "images", "streaming", "annotations"];

/// Where the config lives when none is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/vcrid/config.toml";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Persistent state: one directory per sandbox.
    pub state_dir: PathBuf,
    /// Runtime files (sockets, logs, pid files): one directory per sandbox.
    /// Keep it short: unix socket paths must fit in 107 bytes.
    pub run_dir: PathBuf,
    pub hypervisor: HypervisorConfig,
    pub agent: AgentConfig,
    /// Where a pod's cgroup parent is rooted in each hierarchy: `root`
    /// (a node's kubelet layout) or `own` (beneath the runtime's own cgroup,
    /// for a runtime that itself runs inside a container).
    pub cgroup_root: crate::cgroup::CgroupRoot,
    /// Each sandbox's run dir is a tmpfs of this size (MiB): what its logs
    /// (the guest's console among them), sockets and share mount points
    /// can take of the host's memory, whatever the guest writes. 0: a plain
    /// directory of `run_dir`'s filesystem.
    pub run_dir_max_mib: u32,
    /// Where new sandboxes' VMs come from (see [`crate::factory`]).
    pub factory: FactoryConfig,
}

/// The VM factory: `pool = 0` boots every sandbox's VM when it is created;
/// `pool = N` keeps N VMs of the default size booted, agent ready, for
/// sandboxes to claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FactoryConfig {
    /// How many warm VMs to keep; 0: none (every VM boots on demand).
    pub pool: u32,
    /// The nice value (0..=19) of a pool VM's threads until a sandbox
    /// claims it, so that refilling the pool yields to running pods.
    pub refill_nice: i32,
    /// How long a pool VM may take to boot (it boots at low priority, so
    /// longer than a sandbox's own `agent.dial_timeout_ms`).
    pub boot_timeout_ms: u64,
    /// VMs start as clones of one saved template VM instead of each
    /// booting (see [`crate::vm_template`]): they share the template's
    /// untouched memory pages. With a pool, warm VMs are clones; without,
    /// each sandbox is cloned when it is created. Needs devices QEMU can
    /// save (the agent over virtio-serial, no virtio-fs).
    pub template: bool,
    /// Warm VMs boot with a NIC of their own that moves into the pod
    /// claiming one (when the runtime is given [`crate::WarmNics`]: vcrid
    /// with the tcfilter interworking); off: the pod's NICs are hot-plugged.
    pub warm_nic: bool,
}

impl FactoryConfig {
    /// What the file cannot mean, naming the key.
    pub fn check(&self, hv: &HypervisorConfig) -> std::result::Result<(), String> {
        if !(0..=19).contains(&self.refill_nice) {
            return Err(format!(
                "factory.refill_nice: {} is not a nice value of 0 to 19",
                self.refill_nice
            ));
        }
        if self.template {
            if hv.vsock != hypervisor::VsockBackend::Serial {
                return Err("factory.template: a template's devices must all be saved, so the agent must ride virtio-serial: set hypervisor.vsock = \"serial\" (a vsock device is vhost-user or kernel vhost)".into());
            }
            if hv.shared_fs == hypervisor::SharedFs::VirtioFs {
                return Err("factory.template: virtiofsd (hypervisor.shared_fs = \"virtio-fs\") is vhost-user and cannot be saved: set hypervisor.shared_fs = \"virtio-9p\" (or \"none\" with block rootfs)".into());
            }
        }
        if self.pool > 0 && hv.machine != hypervisor::MachineType::Q35 {
            return Err(format!(
                "factory.pool: {} warm VMs need hypervisor.machine = \"q35\" (a warm VM gets its pod's NICs and size by hot-plug)",
                self.pool
            ));
        }
        if self.template && hv.machine != hypervisor::MachineType::Q35 {
            return Err("factory.template: clones need hypervisor.machine = \"q35\" (a clone gets its pod's NICs and size by hot-plug)".into());
        }
        Ok(())
    }
}

impl Default for FactoryConfig {
    fn default() -> Self {
        Self {
            pool: 0,
            refill_nice: 19,
            boot_timeout_ms: 120_000,
            template: false,
            warm_nic: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// How long create waits for a booting guest's agent to answer.
    pub dial_timeout_ms: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            dial_timeout_ms: 30_000,
        }
    }
}

impl AgentConfig {
    pub fn dial_timeout(&self) -> Duration {
        Duration::from_millis(self.dial_timeout_ms)
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/vcrid"),
            run_dir: PathBuf::from("/run/vcrid"),
            hypervisor: HypervisorConfig::default(),
            agent: AgentConfig::default(),
            cgroup_root: crate::cgroup::CgroupRoot::default(),
            run_dir_max_mib: 32,
            factory: FactoryConfig::default(),
        }
    }
}

impl RuntimeConfig {
    /// Reads `path`, or [`DEFAULT_CONFIG_PATH`] if it exists, or defaults;
    /// then fills in the guest image if the file left it empty.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let mut config = match path {
            Some(path) => Self::from_file(path)?,
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                Self::from_file(Path::new(DEFAULT_CONFIG_PATH))?
            }
            None => Self::default(),
        };
        config.fill_guest_image();
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        Self::parse(&text).map_err(|detail| Error::Config {
            path: path.to_path_buf(),
            detail,
        })
    }

    /// Parses the library's part of the file; the sections only vcrid
    /// reads (see [`SERVER_KEYS`]) are left to it, anything else unknown is
    /// an error naming it.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| e.message().to_string())?;
        for key in SERVER_KEYS {
            table.remove(*key);
        }
        let config: Self = table
            .try_into()
            .map_err(|e: toml::de::Error| e.message().to_string())?;
        config.factory.check(&config.hypervisor)?;
        Ok(config)
    }

    /// An empty kernel or initrd means "the guest image that was built or
    /// installed with these binaries"; an empty modules image, the
    /// `modules.img` next to the kernel (built for that kernel) if there is
    /// one, else none (the VM gets no modules disk).
    pub fn fill_guest_image(&mut self) {
        let hv = &mut self.hypervisor;
        if hv.kernel.as_os_str().is_empty() || hv.initrd.as_os_str().is_empty() {
            if let Some(dir) = find_guest_dir() {
                if hv.kernel.as_os_str().is_empty() {
                    hv.kernel = dir.join("vmlinux");
                }
                if hv.initrd.as_os_str().is_empty() {
                    hv.initrd = dir.join("initramfs.cpio");
                }
            }
        }
        if hv.modules.as_os_str().is_empty() {
            if let Some(image) = hv.kernel.parent().map(|d| d.join("modules.img")) {
                if image.is_file() {
                    hv.modules = image;
                }
            }
        }
    }
}

/// The guest image directory: `build/guest` of the source tree the running
/// binary was built in (`target/{debug,release}/X` or a test binary in
/// `target/*/deps/`), else the installed locations.
pub fn find_guest_dir() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        for ancestor in exe.ancestors().skip(1).take(4) {
            candidates.push(ancestor.join("build/guest"));
        }
        if let Some(bin) = exe.parent() {
            candidates.push(bin.join("../share/virtcontainers/guest"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/share/virtcontainers/guest"));
    candidates.push(PathBuf::from("/usr/share/virtcontainers/guest"));
    candidates
        .into_iter()
        .find(|d| d.join("vmlinux").is_file() && d.join("initramfs.cpio").is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_modules_image_is_the_one_next_to_the_kernel_if_any() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = RuntimeConfig::default();
        config.hypervisor.kernel = dir.path().join("vmlinux");
        config.hypervisor.initrd = dir.path().join("initramfs.cpio");
        config.fill_guest_image();
        assert_eq!(
            config.hypervisor.modules,
            PathBuf::new(),
            "none there: no disk"
        );
        std::fs::write(dir.path().join("modules.img"), b"m").expect("write");
        config.fill_guest_image();
        assert_eq!(config.hypervisor.modules, dir.path().join("modules.img"));
        config.hypervisor.modules = PathBuf::from("/elsewhere/m.img");
        config.fill_guest_image();
        assert_eq!(config.hypervisor.modules, PathBuf::from("/elsewhere/m.img"));
        // The host names the disk as the guest looks for it.
        assert_eq!(hypervisor::MODULES_DISK_SERIAL, agent::MODULES_DISK_SERIAL);
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(
            RuntimeConfig::parse("").expect("parse"),
            RuntimeConfig::default()
        );
    }

    #[test]
    fn fields_override_and_unknown_fields_are_named() {
        let cfg = RuntimeConfig::parse(
            "run_dir = \"/tmp/r\"\n[hypervisor]\naccel = \"tcg\"\nmachine = \"microvm\"\ndefault_memory_mib = 512\n[agent]\ndial_timeout_ms = 5\n",
        )
        .expect("parse");
        assert_eq!(cfg.run_dir, PathBuf::from("/tmp/r"));
        assert_eq!(cfg.hypervisor.accel, hypervisor::Accel::Tcg);
        assert_eq!(cfg.hypervisor.machine, hypervisor::MachineType::Microvm);
        assert_eq!(cfg.hypervisor.default_memory_mib, 512);
        assert_eq!(cfg.agent.dial_timeout(), Duration::from_millis(5));
        let shared = RuntimeConfig::parse("listen = \"unix:///x\"\n[network]\nconf_dir = \"/n\"\n")
            .expect("vcrid's sections are left to vcrid");
        assert_eq!(shared, RuntimeConfig::default());
        let err = RuntimeConfig::parse("[hypervisor]\nqemu = \"x\"\n").expect_err("unknown");
        assert!(err.contains("unknown field `qemu`"), "{err}");
        let err = RuntimeConfig::parse("[hypervisor]\naccel = \"fast\"\n").expect_err("bad enum");
        assert!(err.contains("fast"), "{err}");
    }

    #[test]
    fn a_missing_config_file_is_an_error_naming_it() {
        let err =
            RuntimeConfig::load(Some(Path::new("/nonexistent/vc.toml"))).expect_err("missing");
        assert!(
            err.to_string().starts_with("config /nonexistent/vc.toml: "),
            "{err}"
        );
    }
}
