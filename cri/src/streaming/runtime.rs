//! The seam to the container runtime: what the streaming server asks of the CRI server.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use super::ErrorKind;

pub type BoxReader = Box<dyn AsyncRead + Send + Unpin>;
pub type BoxWriter = Box<dyn AsyncWrite + Send + Unpin>;

/// A bidirectional byte stream (a forwarded connection).
pub trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Duplex for T {}
pub type BoxDuplex = Box<dyn Duplex>;

/// A terminal size, as the `resize` stream carries it (`{"Width":80,"Height":24}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TermSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// The standard streams of an exec or attach. A missing one was not asked for. Writers are
/// shut down by the server after the call returns; the runtime need not close them. `resize`
/// ends when the client is gone.
pub struct StreamIo {
    pub tty: bool,
    pub stdin: Option<BoxReader>,
    pub stdout: Option<BoxWriter>,
    pub stderr: Option<BoxWriter>,
    pub resize: Option<mpsc::Receiver<TermSize>>,
}

impl std::fmt::Debug for StreamIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamIo")
            .field("tty", &self.tty)
            .field("stdin", &self.stdin.is_some())
            .field("stdout", &self.stdout.is_some())
            .field("stderr", &self.stderr.is_some())
            .field("resize", &self.resize.is_some())
            .finish()
    }
}

/// A failure of the runtime, shown to the client on the error stream.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct RuntimeError {
    pub kind: ErrorKind,
    pub message: String,
}

impl RuntimeError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

/// What the CRI server implements for the streaming server (held as `Arc<dyn StreamingRuntime>`).
#[async_trait::async_trait]
pub trait StreamingRuntime: Send + Sync {
    /// Runs `cmd` in the container with the given streams; returns its exit code.
    async fn exec(
        &self,
        container_id: &str,
        cmd: &[String],
        io: StreamIo,
    ) -> Result<i32, RuntimeError>;

    /// Attaches the streams to the container's main process until it exits or the client leaves.
    async fn attach(&self, container_id: &str, io: StreamIo) -> Result<(), RuntimeError>;

    /// Connects `stream` to `port` inside the pod until either side closes.
    async fn port_forward(
        &self,
        pod_sandbox_id: &str,
        port: u16,
        stream: BoxDuplex,
    ) -> Result<(), RuntimeError>;
}
