//! Errors of the image store. Each variant's message names the offending thing
//! (reference, digest, registry, path, layer entry) and never repeats its `#[source]`.

use std::path::PathBuf;

pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// The class of an error, mapped to a gRPC code by the CRI server in one place.
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
pub enum ImageError {
    /// The image reference does not parse.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    /// No image in the store matches the reference or ID.
    #[error("image {reference:?} not found")]
    ImageNotFound { reference: String },
    /// No rootfs was prepared for this container.
    #[error("no rootfs for container {container_id:?}")]
    RootfsNotFound { container_id: String },
    /// A rootfs was already prepared for this container.
    #[error("container {container_id:?} already has a rootfs")]
    RootfsExists { container_id: String },
    /// The container ID cannot be used as a directory name.
    #[error("invalid container id {container_id:?}")]
    InvalidContainerId { container_id: String },
    /// A request to a registry failed at the transport level.
    #[error("registry request {url} failed")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The registry answered with an unexpected status.
    #[error("registry {url} answered {status}: {detail}")]
    Registry {
        url: String,
        status: u16,
        detail: String,
    },
    /// A registry (or its token endpoint) sent more than a limit allows; the
    /// rest was not read.
    #[error("{what} from {url} is larger than {limit_name} ({limit} bytes)")]
    TooLarge {
        what: String,
        url: String,
        limit_name: &'static str,
        limit: u64,
    },
    /// A blob download sent more bytes than its descriptor declares; the rest
    /// was not read and nothing was kept.
    #[error("blob {digest} from {url} is longer than its declared {declared} bytes")]
    BlobTooLong {
        digest: String,
        url: String,
        declared: u64,
    },
    /// A download made no progress for the pull progress timeout and was cancelled.
    #[error("{what} from {url} made no progress for {timeout:?}; download cancelled")]
    Stalled {
        what: String,
        url: String,
        timeout: std::time::Duration,
    },
    /// The registry (or its token endpoint) refused our credentials.
    #[error("registry {url} refused authentication ({status})")]
    Unauthorized { url: String, status: u16 },
    /// The manifest or index for the reference does not exist in any endpoint.
    #[error("manifest for {reference} not found in {endpoints}")]
    ManifestNotFound {
        reference: String,
        endpoints: String,
    },
    /// A manifest, index or config document is not what we expect.
    #[error("bad {what} {digest}: {reason}")]
    BadDocument {
        what: &'static str,
        digest: String,
        reason: String,
    },
    /// An index has no manifest for our platform.
    #[error("index {digest} has no manifest for platform {platform}")]
    NoMatchingPlatform { digest: String, platform: String },
    /// Content did not hash to the digest it was fetched by. Nothing was kept.
    #[error("content {expected} from {url} has digest {actual} ({size} bytes)")]
    DigestMismatch {
        expected: String,
        actual: String,
        size: u64,
        url: String,
    },
    /// A layer's uncompressed content does not match its diff ID from the image config.
    #[error("layer {layer} uncompresses to {actual}, the image config says {expected}")]
    DiffIdMismatch {
        layer: String,
        expected: String,
        actual: String,
    },
    /// The digest string is not `sha256:<64 hex>`.
    #[error("unsupported or malformed digest {digest:?}")]
    BadDigest { digest: String },
    /// A layer has an unsupported media type or compression.
    #[error("layer {digest} has unsupported media type {media_type}")]
    UnsupportedLayer { digest: String, media_type: String },
    /// A layer entry was refused because it would escape or corrupt the layer directory.
    #[error("layer {layer}: entry {entry:?} refused: {reason}")]
    HostileEntry {
        layer: String,
        entry: String,
        reason: String,
    },
    /// A layer tar stream could not be read or an entry could not be created.
    #[error("layer {layer}: cannot unpack entry {entry:?}")]
    Unpack {
        layer: String,
        entry: String,
        #[source]
        source: std::io::Error,
    },
    /// A file operation on the store failed.
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A mount or unmount failed.
    #[error("cannot {action} {path}")]
    Mount {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: rustix::io::Errno,
    },
    /// An external tool (mkfs.ext4, qemu-img) failed.
    #[error("{program} failed for {target}: {detail}")]
    Tool {
        program: &'static str,
        target: PathBuf,
        detail: String,
    },
    /// The persisted metadata is unreadable.
    #[error("metadata file {path} is corrupt")]
    CorruptMetadata {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// Another store instance holds the root.
    #[error("image store root {root} is in use by another process")]
    RootInUse { root: PathBuf },
    /// A blocking task was cancelled or panicked.
    #[error("background task for {what} did not finish")]
    Task { what: String },
}

impl ImageError {
    pub fn kind(&self) -> ErrorKind {
        use ImageError::*;
        match self {
            InvalidReference { .. } | InvalidContainerId { .. } | BadDigest { .. } => {
                ErrorKind::InvalidArgument
            }
            ImageNotFound { .. } | RootfsNotFound { .. } | ManifestNotFound { .. } => {
                ErrorKind::NotFound
            }
            RootfsExists { .. } => ErrorKind::AlreadyExists,
            RootInUse { .. } => ErrorKind::FailedPrecondition,
            Http { source, .. } if source.is_timeout() => ErrorKind::DeadlineExceeded,
            Stalled { .. } => ErrorKind::DeadlineExceeded,
            Http { .. } => ErrorKind::Unavailable,
            Registry { status, .. } if *status >= 500 => ErrorKind::Unavailable,
            Registry { .. } => ErrorKind::FailedPrecondition,
            Unauthorized { .. } => ErrorKind::FailedPrecondition,
            BadDocument { .. }
            | NoMatchingPlatform { .. }
            | DigestMismatch { .. }
            | DiffIdMismatch { .. }
            | UnsupportedLayer { .. }
            | TooLarge { .. }
            | BlobTooLong { .. }
            | HostileEntry { .. } => ErrorKind::FailedPrecondition,
            Unpack { .. }
            | Io { .. }
            | Mount { .. }
            | Tool { .. }
            | CorruptMetadata { .. }
            | Task { .. } => ErrorKind::Internal,
        }
    }

    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        ImageError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
