//! The vc-agent protocol and the host's side of it.
//!
//! The guest agent (`agent/guest`, binary `vc-agent`) serves the services of
//! `protos/agent.proto` with ttrpc on vsock port [`AGENT_VSOCK_PORT`]. The host
//! reaches that port either through the kernel's vhost-vsock (`AF_VSOCK`) or
//! through a userspace vsock device whose unix socket speaks the "hybrid vsock"
//! handshake (`CONNECT <port>\n` → `OK <port>\n`); [`dial`] does both.
//!
//! Only the protocol lives here; guest-only code never links into host binaries.
#![forbid(unsafe_code)]

mod dial;

pub use dial::{dial, DialError, Endpoint};

/// Generated code: `agent` holds the protobuf messages, `agent_ttrpc` the
/// ttrpc clients (`HealthClient`, `AgentClient`) and service traits.
#[allow(
    warnings,
    clippy::all,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]
pub mod protocol {
    pub mod agent {
        include!(concat!(env!("OUT_DIR"), "/agent.rs"));
    }
    pub mod agent_ttrpc {
        include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
    }
}

pub use ttrpc;

/// The vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Protocol revision; bumped when the host needs to know a call exists.
pub const API_VERSION: u32 = 1;
