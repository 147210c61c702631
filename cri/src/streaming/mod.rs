//! The CRI streaming server: the URLs that Exec, Attach and PortForward return, and the
//! Kubernetes streaming protocols spoken on them.
//!
//! [`Server`] listens on loopback HTTP. `get_exec`/`get_attach`/`get_port_forward` store a request
//! under a random single-use token that expires and return
//! `http://127.0.0.1:<port>/{exec,attach,portforward}/<token>`. The client (kubelet, kubectl,
//! crictl) upgrades that connection to SPDY/3.1 (`X-Stream-Protocol-Version`:
//! `v4.channel.k8s.io` … `channel.k8s.io`, `portforward.k8s.io`) or to a WebSocket
//! (`v5.channel.k8s.io`, `v4.channel.k8s.io`, `channel.k8s.io`, `base64.channel.k8s.io`,
//! `v4.portforward.k8s.io`, `portforward.k8s.io`), and the server drives the request through a
//! [`StreamingRuntime`] that the CRI server implements.

mod error;
#[cfg(any(test, feature = "testing"))]
pub mod fake;
mod portforward;
mod remotecommand;
mod request;
mod runtime;
mod server;
pub mod spdy;
mod status;
mod token;
mod websocket;

pub use error::{Error, ErrorKind, Result};
pub use request::{AttachRequest, ExecRequest, PortForwardRequest};
pub use runtime::{
    BoxDuplex, BoxReader, BoxWriter, Duplex, RuntimeError, StreamIo, StreamingRuntime, TermSize,
};
pub use server::{Server, ServerConfig};
