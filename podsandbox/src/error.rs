//! Errors of the sandbox library. `kind()` is what API layers map to status
//! codes (in one place: `cri`'s error layer, `virtc`'s exit message).

use std::path::PathBuf;

use crate::state::SandboxState;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The class of an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    FailedPrecondition,
    DeadlineExceeded,
    Unavailable,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Injected(#[from] crate::failpoint::Injected),
    #[error("invalid sandbox ID {id:?}: use 1-128 characters of [A-Za-z0-9_.-], starting with a letter or digit")]
    InvalidId { id: String },
    #[error("sandbox {id} already exists")]
    AlreadyExists { id: String },
    #[error("sandbox {id} not found")]
    NotFound { id: String },
    #[error("cannot {action} sandbox {id}: it is {state}{hint}")]
    WrongState {
        id: String,
        action: &'static str,
        state: SandboxState,
        hint: &'static str,
    },
    #[error("sandbox {id}")]
    Hypervisor {
        id: String,
        #[source]
        source: hypervisor::HypervisorError,
    },
    #[error("sandbox {id}: cannot grow its VM from {have} to {want} for its containers")]
    Resize {
        id: String,
        have: hypervisor::VmSize,
        want: hypervisor::VmSize,
        #[source]
        source: hypervisor::HypervisorError,
    },
    #[error("sandbox {id}: {what} is not possible: {why}")]
    NotSupported {
        id: String,
        what: &'static str,
        why: &'static str,
    },
    #[error("sandbox {id}: the VM exited before its agent answered: {reason}")]
    VmExitedDuringBoot { id: String, reason: String },
    #[error("sandbox {id}: the agent did not answer within {secs}s ({last_error}); last console lines:\n{console}")]
    AgentTimeout {
        id: String,
        secs: u64,
        last_error: String,
        console: String,
    },
    #[error("sandbox {id}: agent {call} failed: {detail}")]
    Agent {
        id: String,
        call: &'static str,
        detail: String,
    },
    #[error("invalid cgroup parent {parent:?}: {why}")]
    InvalidCgroupParent { parent: String, why: &'static str },
    #[error("invalid sandbox network: {detail}")]
    InvalidNetwork { detail: String },
    #[error("sandbox {id}: the warm VM's NIC: {detail}")]
    WarmNic { id: String, detail: String },
    #[error("container {id} not found in sandbox {sandbox}")]
    ContainerNotFound { sandbox: String, id: String },
    #[error("container {id} already exists in sandbox {sandbox}")]
    ContainerExists { sandbox: String, id: String },
    #[error("invalid container {id:?}: {detail}")]
    InvalidContainer { id: String, detail: String },
    #[error("cannot {action} container {id}: it is {state}{hint}")]
    ContainerWrongState {
        id: String,
        action: &'static str,
        state: crate::container::ContainerState,
        hint: &'static str,
    },
    #[error("container {id} did not exit within {secs}s of SIGKILL (is its guest hung?)")]
    StopTimeout { id: String, secs: u64 },
    #[error("exec in container {id} did not finish within {secs}s; it was killed")]
    ExecTimeout { id: String, secs: f64 },
    #[error("container {id}: the agent refused {call}: {detail}")]
    AgentRefused {
        id: String,
        call: &'static str,
        detail: String,
        kind: ErrorKind,
    },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state of sandbox {id} in {path} is unreadable: {detail}")]
    CorruptState {
        id: String,
        path: PathBuf,
        detail: String,
    },
    #[error("config {path}: {detail}")]
    Config { path: PathBuf, detail: String },
}

impl Error {
    /// An agent call about container `id` failed: the agent's own refusal
    /// keeps its class, a transport failure is Unavailable.
    pub(crate) fn from_agent(id: &str, call: &'static str, err: crate::agent::AgentError) -> Self {
        use crate::agent::AgentCode;
        let kind = match err.code {
            Some(AgentCode::InvalidArgument) => ErrorKind::InvalidArgument,
            Some(AgentCode::NotFound) => ErrorKind::NotFound,
            Some(AgentCode::AlreadyExists) => ErrorKind::AlreadyExists,
            Some(AgentCode::FailedPrecondition) => ErrorKind::FailedPrecondition,
            Some(AgentCode::Other) => ErrorKind::Internal,
            None => ErrorKind::Unavailable,
        };
        Error::AgentRefused {
            id: id.into(),
            call,
            detail: err.detail,
            kind,
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidId { .. } => ErrorKind::InvalidArgument,
            Error::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::WrongState { .. } | Error::NotSupported { .. } => ErrorKind::FailedPrecondition,
            Error::Hypervisor { source, .. } | Error::Resize { source, .. } => {
                match source.kind() {
                    hypervisor::ErrorKind::NotFound => ErrorKind::NotFound,
                    hypervisor::ErrorKind::InvalidArgument => ErrorKind::InvalidArgument,
                    hypervisor::ErrorKind::FailedPrecondition => ErrorKind::FailedPrecondition,
                    hypervisor::ErrorKind::Unavailable => ErrorKind::Unavailable,
                    hypervisor::ErrorKind::Internal => ErrorKind::Internal,
                }
            }
            Error::VmExitedDuringBoot { .. } | Error::Agent { .. } => ErrorKind::Unavailable,
            Error::AgentTimeout { .. } => ErrorKind::DeadlineExceeded,
            Error::Io { .. }
            | Error::CorruptState { .. }
            | Error::Injected(_)
            | Error::WarmNic { .. } => ErrorKind::Internal,
            Error::Config { .. }
            | Error::InvalidNetwork { .. }
            | Error::InvalidCgroupParent { .. } => ErrorKind::InvalidArgument,
            Error::ContainerNotFound { .. } => ErrorKind::NotFound,
            Error::ContainerExists { .. } => ErrorKind::AlreadyExists,
            Error::InvalidContainer { .. } => ErrorKind::InvalidArgument,
            Error::ContainerWrongState { .. } => ErrorKind::FailedPrecondition,
            Error::AgentRefused { kind, .. } => *kind,
            Error::ExecTimeout { .. } | Error::StopTimeout { .. } => ErrorKind::DeadlineExceeded,
        }
    }

    /// The message with every `#[source]` appended, for one-line reports.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(err) = source {
            text.push_str(": ");
            text.push_str(&err.to_string());
            source = err.source();
        }
        text
    }
}
