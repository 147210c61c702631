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
//! sees it over virtio-fs; the bind mount goes when the container does.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// What a caller asks for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerConfig {
    pub id: String,
    /// A host directory holding the container's root filesystem.
    pub rootfs: PathBuf,
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
    /// cgroup memory.max; the OOM killer ends the container beyond it.
    pub memory_limit_bytes: Option<u64>,
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
    /// The bind mount of the rootfs in the shared directory.
    pub rootfs_mount: PathBuf,
    pub log_path: Option<PathBuf>,
    pub exit_code: Option<i32>,
    /// Why it ended, when the guest knows ("OOMKilled").
    #[serde(default)]
    pub reason: Option<String>,
    pub created_at: u64,
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

/// The OCI runtime spec for `config`: its own mount, PID, IPC and UTS
/// namespaces (the VM's network), the usual API filesystems, masked and
/// read-only paths as runc's defaults have them. `root.path` is set by the agent.
pub fn oci_spec(config: &ContainerConfig, sandbox_id: &str) -> Value {
    let mut spec = base_spec(config, sandbox_id);
    if let Some(profile) = &config.seccomp {
        spec["linux"]["seccomp"] = profile.clone();
    }
    if let Some(limit) = config.memory_limit_bytes {
        spec["linux"]["resources"] = json!({ "memory": { "limit": limit } });
    }
    spec
}

fn base_spec(config: &ContainerConfig, sandbox_id: &str) -> Value {
    let (uid, gid) = config.user.unwrap_or((0, 0));
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
            "terminal": false,
            "user": { "uid": uid, "gid": gid },
            "args": config.args,
            "env": env,
            "cwd": config.cwd.clone().unwrap_or_else(|| "/".into()),
            "capabilities": {
                "bounding": DEFAULT_CAPS,
                "effective": DEFAULT_CAPS,
                "permitted": DEFAULT_CAPS,
            },
            "noNewPrivileges": true,
        },
        "root": { "path": "rootfs", "readonly": config.readonly_rootfs },
        "hostname": sandbox_id.chars().take(63).collect::<String>(),
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
        let spec = oci_spec(&cfg, "pod1");
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
            memory_limit_bytes: Some(32 << 20),
            ..cfg.clone()
        };
        assert_eq!(
            oci_spec(&limited, "pod1")["linux"]["resources"]["memory"]["limit"],
            32 << 20
        );
        let with = ContainerConfig {
            seccomp: Some(json!({"defaultAction": "SCMP_ACT_ALLOW"})),
            ..cfg
        };
        assert_eq!(
            oci_spec(&with, "pod1")["linux"]["seccomp"]["defaultAction"],
            "SCMP_ACT_ALLOW"
        );
    }
}
