//! Containers of a sandbox: what a caller asks for, what is persisted, and
//! the OCI runtime spec the guest agent runs.
//!
//! ```text
//!   create          start            exit / kill
//! ─────────► created ─────► running ─────────────► stopped ──► (deleted)
//!                            │   ▲
//!                      pause ▼   │ resume
//!                            paused
//! ```
//!
//! The rootfs is a host directory, bind-mounted into the sandbox's shared
//! directory (`<run_dir>/<sandbox>/shared/<container>/rootfs`) so the guest
//! sees it over virtio-fs; or a disk image attached to the VM (a SCSI disk
//! the agent mounts). Either goes when the container does.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// What a caller asks for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerConfig {
    pub id: String,
    pub rootfs: Rootfs,
    pub args: Vec<String>,
    /// `KEY=value` entries.
    pub env: Vec<String>,
    /// Working directory inside the container; `/` when `None`.
    pub cwd: Option<String>,
    /// uid and gid; root when `None`.
    pub user: Option<(u32, u32)>,
    pub readonly_rootfs: bool,
    /// Where the host writes stdout and stderr in the CRI log format.
    pub log_path: Option<PathBuf>,
    /// An OCI `linux.seccomp` profile, applied by the guest.
    pub seccomp: Option<Value>,
    /// cgroup limits (cpu, memory, pids).
    pub resources: Resources,
    /// A terminal for the process (stdout then carries stderr too).
    pub tty: bool,
    /// Keep stdin open for [`crate::ProcessIo::write_stdin`].
    pub stdin: bool,
    /// Host paths shared into the VM and bind-mounted into the container.
    pub mounts: Vec<Mount>,
    /// Share the sandbox-wide PID namespace with the other containers that
    /// ask for it (CRI `NamespaceMode::POD`) instead of having one's own.
    pub share_pid_namespace: bool,
    /// Capabilities added to and dropped from the default set
    /// (`CAP_NET_RAW` or `NET_RAW`; `ALL` drops all).
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    pub no_new_privileges: bool,
    /// POSIX rlimits: (`RLIMIT_NOFILE`, soft, hard).
    pub rlimits: Vec<(String, u64, u64)>,
    /// Sysctls of the container's own namespaces (IPC: `kernel.shm*`,
    /// `kernel.msg*`, `kernel.sem`, `fs.mqueue.*`), set by the guest's OCI
    /// runtime. Network sysctls are the sandbox's
    /// ([`crate::network::SandboxNetwork::sysctls`]).
    pub sysctls: std::collections::BTreeMap<String, String>,
}

/// Where a container's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rootfs {
    /// A host directory, shared into the VM.
    Dir(PathBuf),
    /// A disk image whose filesystem's root is the rootfs, attached to the
    /// VM for this container alone (its writes stay in the image).
    Block {
        image: PathBuf,
        format: hypervisor::DiskFormat,
        /// The filesystem on it ("ext4").
        fstype: String,
    },
}

impl Default for Rootfs {
    fn default() -> Self {
        Rootfs::Dir(PathBuf::new())
    }
}

/// A host path mounted into a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// An absolute host path: a directory or a file.
    pub source: PathBuf,
    /// Where it appears in the container.
    pub destination: String,
    pub readonly: bool,
}

/// cgroup limits of a container; `None` leaves a limit as it is (unset at
/// creation).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// memory.max in bytes; the OOM killer ends the container beyond it.
    pub memory_limit_bytes: Option<i64>,
    /// Relative CPU weight (cgroup v1 shares, 2..262144).
    pub cpu_shares: Option<u64>,
    /// CPU time per period in µs (with `cpu_period`).
    pub cpu_quota: Option<i64>,
    pub cpu_period: Option<u64>,
    /// CPUs the container may run on ("0-1").
    pub cpuset_cpus: Option<String>,
    /// Most processes at once.
    pub pids_limit: Option<i64>,
}

impl Resources {
    /// The OCI `linux.resources` object.
    pub fn to_oci(&self) -> Value {
        let mut r = json!({});
        if let Some(limit) = self.memory_limit_bytes {
            r["memory"] = json!({ "limit": limit });
        }
        let mut cpu = serde_json::Map::new();
        if let Some(v) = self.cpu_shares {
            cpu.insert("shares".into(), json!(v));
        }
        if let Some(v) = self.cpu_quota {
            cpu.insert("quota".into(), json!(v));
        }
        if let Some(v) = self.cpu_period {
            cpu.insert("period".into(), json!(v));
        }
        if let Some(v) = &self.cpuset_cpus {
            cpu.insert("cpus".into(), json!(v));
        }
        if !cpu.is_empty() {
            r["cpu"] = Value::Object(cpu);
        }
        if let Some(limit) = self.pids_limit {
            r["pids"] = json!({ "limit": limit });
        }
        r
    }

    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A process in a container, as ProcessListContainer reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// In the guest's PID namespace.
    pub pid: i32,
    pub args: Vec<String>,
    pub uid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerState {
    Created,
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for ContainerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            ContainerState::Created => "created",
            ContainerState::Running => "running",
            ContainerState::Paused => "paused",
            ContainerState::Stopped => "stopped",
        })
    }
}

/// What is persisted of a container, inside its sandbox's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub state: ContainerState,
    /// The bind mount of the rootfs in the shared directory (empty for a
    /// block rootfs).
    pub rootfs_mount: PathBuf,
    /// Where the rootfs disk is attached, for a block rootfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_disk: Option<hypervisor::DiskAddress>,
    pub log_path: Option<PathBuf>,
    pub exit_code: Option<i32>,
    /// Why it ended, when the guest knows ("OOMKilled").
    #[serde(default)]
    pub reason: Option<String>,
    pub created_at: u64,
    /// Its stdio is a terminal.
    #[serde(default)]
    pub tty: bool,
    /// When its process started / ended, in ns since the Unix epoch.
    #[serde(default)]
    pub started_at_ns: Option<i64>,
    #[serde(default)]
    pub finished_at_ns: Option<i64>,
}

/// What a caller sees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStatus {
    pub id: String,
    pub sandbox_id: String,
    pub state: ContainerState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub created_at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at_ns: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at_ns: Option<i64>,
}

/// A container's process has ended (broadcast by [`crate::Runtime::subscribe_exits`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerExit {
    pub sandbox_id: String,
    pub id: String,
    pub exit_code: i32,
    pub finished_at_ns: i64,
}

/// Now, in ns since the Unix epoch.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl ContainerRecord {
    pub(crate) fn status(&self, sandbox_id: &str) -> ContainerStatus {
        ContainerStatus {
            id: self.id.clone(),
            sandbox_id: sandbox_id.into(),
            state: self.state,
            exit_code: self.exit_code,
            log_path: self.log_path.clone(),
            reason: self.reason.clone(),
            created_at: self.created_at,
            started_at_ns: self.started_at_ns,
            finished_at_ns: self.finished_at_ns,
        }
    }
}

/// A container's resource usage, from its cgroup in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStats {
    pub cpu_usage_usec: u64,
    pub memory_usage_bytes: u64,
    pub memory_anon_bytes: u64,
    pub memory_file_bytes: u64,
    /// 0 when unlimited.
    pub memory_limit_bytes: u64,
    pub pids_current: u64,
    pub io_read_bytes: u64,
    pub io_write_bytes: u64,
}

/// The capabilities a container process keeps by default (Docker's set).
const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability the guest kernel knows (for `add: ALL`).
const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The OCI runtime spec for `config`: its own mount, PID, IPC and UTS
/// namespaces (the VM's network), the usual API filesystems, masked and
/// read-only paths as runc's defaults have them. `root.path` is set by the agent.
///
/// `mount_sources` are the guest paths of `config.mounts`, in order.
pub fn oci_spec(config: &ContainerConfig, hostname: &str, mount_sources: &[String]) -> Value {
    let mut spec = base_spec(config, hostname);
    if let Some(mounts) = spec["mounts"].as_array_mut() {
        mounts.extend(bind_mounts(config, mount_sources));
    }
    // Only when set: libcontainer 0.7 reads a present `false` as true for
    // seccomp ordering (it would install the profile after dropping
    // CAP_SYS_ADMIN, without no_new_privs, and fail).
    if config.no_new_privileges {
        spec["process"]["noNewPrivileges"] = Value::Bool(true);
    }
    if !config.rlimits.is_empty() {
        spec["process"]["rlimits"] = config
            .rlimits
            .iter()
            .map(|(kind, soft, hard)| json!({ "type": kind, "soft": soft, "hard": hard }))
            .collect();
    }
    if let Some(profile) = &config.seccomp {
        spec["linux"]["seccomp"] = profile.clone();
    }
    if !config.resources.is_empty() {
        spec["linux"]["resources"] = config.resources.to_oci();
    }
    if !config.sysctls.is_empty() {
        spec["linux"]["sysctl"] = json!(config.sysctls);
    }
    spec
}

/// The capability set: the defaults, less `drop`, plus `add`.
fn capabilities(add: &[String], drop: &[String]) -> Vec<String> {
    let norm = |c: &String| {
        let c = c.to_ascii_uppercase();
        if c == "ALL" || c.starts_with("CAP_") {
            c
        } else {
            format!("CAP_{c}")
        }
    };
    let drop: Vec<String> = drop.iter().map(norm).collect();
    let mut caps: Vec<String> = if drop.iter().any(|c| c == "ALL") {
        Vec::new()
    } else {
        DEFAULT_CAPS
            .iter()
            .map(|c| c.to_string())
            .filter(|c| !drop.contains(c))
            .collect()
    };
    for c in add.iter().map(norm) {
        if c == "ALL" {
            return ALL_CAPS.iter().map(|c| c.to_string()).collect();
        }
        if !caps.contains(&c) {
            caps.push(c);
        }
    }
    caps
}

/// Bind mounts of the container's shared mount sources: `shared` are their
/// paths as the guest sees them.
fn bind_mounts(config: &ContainerConfig, shared: &[String]) -> Vec<Value> {
    config
        .mounts
        .iter()
        .zip(shared)
        .map(|(m, source)| {
            json!({
                "destination": m.destination,
                "type": "bind",
                "source": source,
                "options": ["rbind", "rprivate", if m.readonly { "ro" } else { "rw" }],
            })
        })
        .collect()
}

fn base_spec(config: &ContainerConfig, hostname: &str) -> Value {
    let (uid, gid) = config.user.unwrap_or((0, 0));
    let caps = capabilities(&config.cap_add, &config.cap_drop);
    let mut env = config.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(
            0,
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
    }
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": config.tty,
            "user": { "uid": uid, "gid": gid },
            "args": config.args,
            "env": env,
            "cwd": config.cwd.clone().unwrap_or_else(|| "/".into()),
            "capabilities": {
                "bounding": caps,
                "effective": caps,
                "permitted": caps,
            },
        },
        "root": { "path": "rootfs", "readonly": config.readonly_rootfs },
        "hostname": hostname.chars().take(63).collect::<String>(),
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"] },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"] },
            { "destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
            { "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"] },
        ],
        "linux": {
            "namespaces": [ { "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" } ],
            "cgroupsPath": format!("/vc/{}", config.id),
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
            ],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_carries_the_process_and_isolation() {
        let cfg = ContainerConfig {
            id: "c1".into(),
            args: vec!["/bin/echo".into(), "hello".into()],
            env: vec!["A=b".into()],
            user: Some((1000, 1000)),
            readonly_rootfs: true,
            ..Default::default()
        };
        let spec = oci_spec(&cfg, "pod1", &[]);
        assert_eq!(spec["process"]["args"], json!(["/bin/echo", "hello"]));
        assert_eq!(spec["process"]["user"], json!({"uid": 1000, "gid": 1000}));
        assert_eq!(spec["process"]["cwd"], "/");
        assert!(spec["process"]["env"][0]
            .as_str()
            .is_some_and(|p| p.starts_with("PATH=")));
        assert_eq!(spec["process"]["env"][1], "A=b");
        assert_eq!(spec["root"]["readonly"], true);
        assert_eq!(spec["hostname"], "pod1");
        let ns: Vec<&str> = spec["linux"]["namespaces"]
            .as_array()
            .expect("namespaces")
            .iter()
            .filter_map(|n| n["type"].as_str())
            .collect();
        assert_eq!(
            ns,
            ["pid", "ipc", "uts", "mount"],
            "no network namespace: the pod shares the VM's"
        );
        assert_eq!(spec["linux"]["cgroupsPath"], "/vc/c1");
        assert!(spec["linux"].get("seccomp").is_none());
        assert!(spec["linux"].get("resources").is_none());
        let limited = ContainerConfig {
            resources: Resources {
                memory_limit_bytes: Some(32 << 20),
                ..Default::default()
            },
            ..cfg.clone()
        };
        assert_eq!(
            oci_spec(&limited, "pod1", &[])["linux"]["resources"]["memory"]["limit"],
            32 << 20
        );
        let with = ContainerConfig {
            seccomp: Some(json!({"defaultAction": "SCMP_ACT_ALLOW"})),
            ..cfg
        };
        assert_eq!(
            oci_spec(&with, "pod1", &[])["linux"]["seccomp"]["defaultAction"],
            "SCMP_ACT_ALLOW"
        );
    }

    #[test]
    fn capabilities_add_and_drop() {
        let caps = capabilities(
            &["sys_admin".into()],
            &["NET_RAW".into(), "CAP_KILL".into()],
        );
        assert!(caps.contains(&"CAP_SYS_ADMIN".to_string()));
        assert!(!caps.contains(&"CAP_NET_RAW".to_string()));
        assert!(!caps.contains(&"CAP_KILL".to_string()));
        assert!(caps.contains(&"CAP_CHOWN".to_string()));
        assert_eq!(capabilities(&[], &["ALL".into()]), Vec::<String>::new());
        assert_eq!(
            capabilities(&["CAP_CHOWN".into()], &["all".into()]),
            ["CAP_CHOWN"]
        );
        assert_eq!(capabilities(&["ALL".into()], &[]).len(), ALL_CAPS.len());
    }

    #[test]
    fn mounts_rlimits_tty_and_resources_reach_the_spec() {
        let cfg = ContainerConfig {
            id: "c1".into(),
            args: vec!["sh".into()],
            tty: true,
            no_new_privileges: true,
            mounts: vec![Mount {
                source: "/srv/data".into(),
                destination: "/data".into(),
                readonly: true,
            }],
            rlimits: vec![("RLIMIT_NOFILE".into(), 512, 1024)],
            resources: Resources {
                cpu_quota: Some(50_000),
                cpu_period: Some(100_000),
                pids_limit: Some(64),
                ..Default::default()
            },
            ..Default::default()
        };
        let spec = oci_spec(&cfg, "pod1", &["/run/vc/shared/c1/mounts/0".into()]);
        assert_eq!(spec["process"]["terminal"], true);
        assert_eq!(spec["process"]["noNewPrivileges"], true);
        assert_eq!(
            spec["process"]["rlimits"],
            json!([{ "type": "RLIMIT_NOFILE", "soft": 512, "hard": 1024 }])
        );
        let data = spec["mounts"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["destination"] == "/data"))
            .cloned()
            .expect("the bind mount");
        assert_eq!(data["source"], "/run/vc/shared/c1/mounts/0");
        assert_eq!(data["options"], json!(["rbind", "rprivate", "ro"]));
        assert_eq!(
            spec["linux"]["resources"],
            json!({ "cpu": { "quota": 50_000, "period": 100_000 }, "pids": { "limit": 64 } })
        );
    }
}
