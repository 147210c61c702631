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

use crate::oci::LinuxSeccomp;

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
    /// Supplementary groups of the process.
    pub additional_gids: Vec<u32>,
    pub readonly_rootfs: bool,
    /// Where the host writes stdout and stderr in the CRI log format.
    pub log_path: Option<PathBuf>,
    /// An OCI `linux.seccomp` profile, applied by the guest (to execs too).
    pub seccomp: Option<LinuxSeccomp>,
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
    /// Share the sandbox-wide IPC namespace (CRI `NamespaceMode::POD`, the
    /// Kubernetes default) instead of having one's own.
    pub share_ipc_namespace: bool,
    /// Capabilities added to and dropped from the default set
    /// (`CAP_NET_RAW` or `NET_RAW`; `ALL` drops all).
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    /// Ambient capabilities (kept across execve by a non-root user); each
    /// is also in the bounding, permitted and effective sets.
    pub cap_ambient: Vec<String>,
    /// Paths of the container hidden (`/dev/null` or an empty tmpfs over
    /// them) and bound read-only; `None`: runc's defaults
    /// ([`crate::oci::DEFAULT_MASKED_PATHS`], [`crate::oci::DEFAULT_READONLY_PATHS`]).
    pub masked_paths: Option<Vec<String>>,
    pub readonly_paths: Option<Vec<String>>,
    /// Privileged inside the VM (never on the host): every capability,
    /// every device of the guest, a writable `/sys`, nothing masked, no
    /// seccomp profile.
    pub privileged: bool,
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
    pub propagation: MountPropagation,
}

/// How mounts under a shared host path reach the container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MountPropagation {
    /// Neither way (`rprivate`).
    #[default]
    Private,
    /// Mounts the host makes under the source later appear in the container
    /// (`rslave` all the way: host, shared dir, virtiofsd, guest).
    HostToContainer,
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
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// These limits with those `update` sets replacing them.
    pub fn merged(&self, update: &Resources) -> Resources {
        Resources {
            memory_limit_bytes: update.memory_limit_bytes.or(self.memory_limit_bytes),
            cpu_shares: update.cpu_shares.or(self.cpu_shares),
            cpu_quota: update.cpu_quota.or(self.cpu_quota),
            cpu_period: update.cpu_period.or(self.cpu_period),
            cpuset_cpus: update
                .cpuset_cpus
                .clone()
                .or_else(|| self.cpuset_cpus.clone()),
            pids_limit: update.pids_limit.or(self.pids_limit),
        }
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
    /// Why it ended, when the guest knows ("OOMKilled"), or "VMExited".
    #[serde(default)]
    pub reason: Option<String>,
    /// What a person reads about the end: for a VM that died, QEMU's exit
    /// and its last log and console lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub created_at: u64,
    /// Its stdio is a terminal.
    #[serde(default)]
    pub tty: bool,
    /// When its process started / ended, in ns since the Unix epoch.
    #[serde(default)]
    pub started_at_ns: Option<i64>,
    #[serde(default)]
    pub finished_at_ns: Option<i64>,
    /// The limits in force (the VM is sized by those of live containers).
    #[serde(default, skip_serializing_if = "Resources::is_empty")]
    pub resources: Resources,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
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
            message: self.message.clone(),
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
