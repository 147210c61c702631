//! `podsandbox`: the virtcontainers library.
//!
//! A pod sandbox is one VM whose guest agent runs the pod's containers. This
//! crate owns the sandbox lifecycle — create, start, stop, pause, resume,
//! status, list, delete — and its persistence, so that every call can come
//! from a different process: [`Runtime::fetch_sandbox`] finds a sandbox again
//! from its persisted state (the VM keeps running between calls).
//!
//! It knows nothing of CRI. Callers (`vcrid`, `virtc`) hand it a
//! [`SandboxConfig`] and get [`SandboxStatus`]es back. Below it sit two
//! seams, both traits: the [`hypervisor::Hypervisor`] (via [`VmFactory`])
//! and the guest [`AgentClient`] (via [`AgentDialer`]).
//!
//! One file per operation: `sandbox_create.rs`, `sandbox_start.rs`,
//! `sandbox_stop.rs`, `sandbox_pause.rs` (pause and resume),
//! `sandbox_delete.rs`, `sandbox_status.rs` (status and list).
#![forbid(unsafe_code)]

pub mod agent;
mod agent_ttrpc;
pub mod cgroup;
pub mod config;
pub mod container;
mod container_create;
mod container_delete;
pub mod container_exec;
mod container_io;
mod container_kill;
pub mod container_log;
mod container_monitor;
mod container_pause;
mod container_start;
mod container_update;
mod error;
pub mod factory;
pub mod failpoint;
#[cfg(any(test, feature = "testing"))]
pub mod fake;
mod mounts;
pub mod network;
pub mod oci;
mod recover;
mod sandbox;
mod sandbox_claim;
mod sandbox_create;
mod sandbox_delete;
mod sandbox_network;
mod sandbox_pause;
mod sandbox_port_forward;
pub mod sandbox_resize;
mod sandbox_start;
mod sandbox_status;
mod sandbox_stop;
pub mod state;
mod steps;
pub mod store;
mod vm_template;

pub use agent::{AgentClient, AgentDialer, AgentError, ForwardedStream, GuestDetails};
pub use agent_ttrpc::TtrpcDialer;
pub use config::RuntimeConfig;
pub use container_io::ProcessIo;
pub use container_monitor::OutputChunk;
pub use error::{Error, ErrorKind, Result};
pub use hypervisor::DiskFormat;
pub use network::{
    DnsConfig, NetInterface, NetNeighbor, NetRoute, SandboxFiles, SandboxNetwork, TapFd, TapPlace,
    WarmNics, WARM_NIC_MAC,
};
pub use recover::Recovery;
pub use sandbox::{
    Runtime, Sandbox, SandboxConfig, SandboxStatus, VmFactory, VM_EXIT_CODE, VM_EXIT_REASON,
};
pub use state::SandboxState;
pub use vm_template::TemplateInfo;
