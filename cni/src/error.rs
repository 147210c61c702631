//! Errors of pod networking. Each variant's message names what failed (file,
//! plugin, device, netns) and never repeats its `#[source]`.

use std::path::PathBuf;

pub type Result<T, E = CniError> = std::result::Result<T, E>;

/// The class of an error, for mapping to API status codes by callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    FailedPrecondition,
    Unavailable,
    DeadlineExceeded,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// The CNI configuration directory does not exist or cannot be listed.
    #[error("CNI config dir {dir}")]
    ConfDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no network config (*.conflist, *.conf, *.json) in {dir}")]
    NoConfig { dir: PathBuf },
    #[error("cannot read CNI config {file}")]
    ReadConfig {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed CNI config {file}")]
    MalformedConfig {
        file: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid CNI config {file}: {reason}")]
    InvalidConfig { file: PathBuf, reason: String },
    #[error("CNI plugin {plugin:?} not found in {dirs}")]
    PluginNotFound { plugin: String, dirs: String },
    #[error("cannot run CNI plugin {plugin} ({command})")]
    PluginSpawn {
        plugin: String,
        command: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("CNI plugin {plugin} {command} failed (code {code}): {msg}{details}")]
    PluginFailed {
        plugin: String,
        command: &'static str,
        code: u32,
        msg: String,
        /// Empty, or `": <details>"`.
        details: String,
    },
    #[error("CNI plugin {plugin} {command} did not finish within {timeout:?}; its process group was killed")]
    PluginTimeout {
        plugin: String,
        command: &'static str,
        timeout: std::time::Duration,
    },
    #[error("CNI plugin {plugin} {command} returned an unusable result: {reason}")]
    BadResult {
        plugin: String,
        command: &'static str,
        reason: String,
    },
    #[error("{command} of {container_id} failed, and so did its clean-up: {del_error}")]
    RollbackFailed {
        command: &'static str,
        container_id: String,
        del_error: String,
        #[source]
        source: Box<CniError>,
    },
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidArgument {
        what: &'static str,
        value: String,
        reason: String,
    },
    #[error("container {container_id} is already attached on {if_name} (DEL it first)")]
    AlreadyAttached {
        container_id: String,
        if_name: String,
    },
    #[error("container {container_id} has no cached CNI ADD on {if_name}")]
    NotAttached {
        container_id: String,
        if_name: String,
    },
    #[error("network namespace {path} already exists")]
    NetnsExists { path: PathBuf },
    #[error("network namespace {path} does not exist")]
    NetnsNotFound { path: PathBuf },
    #[error("network namespace {path}: cannot {action}")]
    Netns {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("device {device} in {netns}: {action}")]
    Device {
        device: String,
        netns: PathBuf,
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no network state for pod sandbox {id}")]
    PodNotFound { id: String },
    #[error("pod sandbox {id} already has a network")]
    PodExists { id: String },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot decode {path}")]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} has state version {version}, this runtime reads version 1")]
    StateVersion { path: PathBuf, version: u32 },
    #[error("a worker thread for {what} panicked or could not start")]
    Thread { what: String },
    #[error("{what} failed in the fake network plugin (failing on demand)")]
    Injected { what: String },
}

impl CniError {
    pub fn kind(&self) -> ErrorKind {
        use CniError::*;
        match self {
            ConfDir { .. }
            | NoConfig { .. }
            | ReadConfig { .. }
            | MalformedConfig { .. }
            | InvalidConfig { .. }
            | PluginNotFound { .. } => ErrorKind::FailedPrecondition,
            PluginTimeout { .. } => ErrorKind::DeadlineExceeded,
            PluginFailed { .. } | PluginSpawn { .. } | BadResult { .. } => ErrorKind::Unavailable,
            RollbackFailed { source, .. } => source.kind(),
            InvalidArgument { .. } => ErrorKind::InvalidArgument,
            NetnsExists { .. } | PodExists { .. } | AlreadyAttached { .. } => {
                ErrorKind::AlreadyExists
            }
            NetnsNotFound { .. } | PodNotFound { .. } | NotAttached { .. } => ErrorKind::NotFound,
            Netns { .. } | Device { .. } | Io { .. } | Decode { .. } | Thread { .. } => {
                ErrorKind::Internal
            }
            StateVersion { .. } => ErrorKind::FailedPrecondition,
            Injected { .. } => ErrorKind::Unavailable,
        }
    }

    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| CniError::Io {
            action,
            path,
            source,
        }
    }
}
