//! vcrid: the CRI server of virtcontainers. Every pod is a VM
//! (`podsandbox`), its images come from `imagestore`, its network from `cni`.
//!
//! Layout: `runtime/` holds the RuntimeService (one file per RPC), `image/`
//! the ImageService, `streaming/` the server Exec, Attach and PortForward
//! hand out URLs for (SPDY and WebSocket), `store` the CRI metadata vcrid
//! persists, `reconcile` what start-up removes that no record names, `error` the one mapping of failures to gRPC codes, `server` the
//! shared state and the socket, `check` the host readiness report.
#![forbid(unsafe_code)]

pub mod check;
pub mod config;
pub mod error;
pub mod fail_points;
pub mod grpc_authority;
mod image;
pub mod reconcile;
mod rpc_log;
mod runtime;
pub mod server;
mod store;
mod stream_runtime;
pub mod streaming;
mod warm_nics;

pub use config::Config;
pub use error::CriError;
pub use runtime::{RUNTIME_API_VERSION, RUNTIME_NAME};
pub use server::{serve, Cri};
