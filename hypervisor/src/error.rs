//! Errors of the hypervisor layer. Each variant's message names what failed
//! and never repeats its `#[source]`.

use std::path::PathBuf;

pub type Result<T, E = HypervisorError> = std::result::Result<T, E>;

/// The class of an error, for mapping to API status codes by callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    InvalidArgument,
    FailedPrecondition,
    Unavailable,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("memory must be at least {min} MiB, got {got} MiB")]
    MemoryTooSmall { got: u32, min: u32 },
    #[error("memory {got} MiB exceeds the maximum of {max} MiB")]
    MemoryTooLarge { got: u32, max: u32 },
    #[error("vcpus must be between 1 and {max} (the configured maximum), got {got}")]
    BadVcpus { got: u32, max: u32 },
    #[error("the agent secret is not 64 hex digits")]
    BadAgentSecret,
    #[error("NIC {index}: MAC address {mac:?} is not six hex octets (aa:bb:cc:dd:ee:ff)")]
    BadMac { index: usize, mac: String },
    #[error("NIC {index}: cannot duplicate the tap descriptor")]
    TapFd {
        index: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("no free hot-plug slot: all {slots} are in use (hypervisor.hotplug_slots)")]
    NoHotplugSlot { slots: u32 },
    #[error("no free SCSI target for a disk: all {targets} are in use")]
    NoDiskTarget { targets: u32 },
    #[error("no hot-plugged NIC has MAC address {mac}")]
    NicNotFound { mac: String },
    #[error("{what} is not supported by this VM: {why}")]
    Unsupported {
        what: &'static str,
        why: &'static str,
    },
    #[error("a VM template can carry only devices whose state QEMU saves: {why}")]
    NotTemplatable { why: &'static str },
    #[error("{what}: {detail}")]
    Migration { what: &'static str, detail: String },
    #[error("{what} {path} does not exist")]
    MissingFile { what: &'static str, path: PathBuf },
    #[error("socket path {path} is longer than the 107 bytes a unix socket allows; use a shorter run dir")]
    SocketPathTooLong { path: PathBuf },
    #[error("accelerator kvm was requested but is not usable here: {reason}")]
    KvmUnavailable { reason: String },
    #[error("unknown hypervisor {name:?} in persisted state")]
    UnknownHypervisor { name: String },
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} exited during start-up: {detail}")]
    StartupFailed { program: String, detail: String },
    #[error("{program} did not become ready within {secs}s: {detail}")]
    StartupTimeout {
        program: String,
        secs: u64,
        detail: String,
    },
    #[error("QMP {command} failed: {detail}")]
    Qmp { command: String, detail: String },
    #[error("QMP socket {path}")]
    QmpIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM was booted with room for {room} {what}, not {want}")]
    NoRoom {
        what: &'static str,
        want: u32,
        room: u32,
    },
    #[error("the VM did not take its new {what} within {secs}s: {detail}")]
    ResizeTimeout {
        what: &'static str,
        secs: u64,
        detail: String,
    },
    #[error("the VM is not running: {reason}")]
    NotRunning { reason: String },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot signal process {pid}")]
    Signal {
        pid: i32,
        #[source]
        source: nix::errno::Errno,
    },
}

impl HypervisorError {
    pub fn kind(&self) -> ErrorKind {
        use HypervisorError::*;
        match self {
            MemoryTooSmall { .. }
            | MemoryTooLarge { .. }
            | BadVcpus { .. }
            | BadMac { .. }
            | BadAgentSecret => ErrorKind::InvalidArgument,
            MissingFile { .. }
            | SocketPathTooLong { .. }
            | KvmUnavailable { .. }
            | NotRunning { .. }
            | NoHotplugSlot { .. }
            | NoRoom { .. }
            | NoDiskTarget { .. }
            | NotTemplatable { .. }
            | Unsupported { .. } => ErrorKind::FailedPrecondition,
            NicNotFound { .. } => ErrorKind::NotFound,
            StartupFailed { .. } | StartupTimeout { .. } | ResizeTimeout { .. } => {
                ErrorKind::Unavailable
            }
            UnknownHypervisor { .. }
            | Spawn { .. }
            | TapFd { .. }
            | Qmp { .. }
            | QmpIo { .. }
            | Io { .. }
            | Migration { .. }
            | Signal { .. } => ErrorKind::Internal,
        }
    }
}
