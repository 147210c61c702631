//! The guest agent as the sandbox sees it: a small trait in domain types.
//! The ttrpc implementation is in `agent_ttrpc.rs`; fakes in `fake.rs`.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use hypervisor::VsockChannel;
use serde::{Deserialize, Serialize};

use crate::network::{NetInterface, NetNeighbor, NetRoute, SandboxFiles};

/// What the agent reports about its guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestDetails {
    pub kernel_release: String,
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    pub online_cpus: u32,
    pub agent_version: String,
    pub uptime_ms: u64,
    /// Guest uptime when the agent began serving.
    pub agent_ready_ms: u64,
    /// The guest's /etc/machine-id; empty when it has none.
    #[serde(default)]
    pub machine_id: String,
    /// The agent's background start-up work is done (API 9).
    #[serde(default)]
    pub settled: bool,
}

/// How the guest creates a container, beside its spec.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CreateOptions {
    /// Keep the init process's stdin open for writing.
    pub stdin: bool,
    /// Join the sandbox-wide PID namespace.
    pub sandbox_pidns: bool,
    /// Join the sandbox-wide IPC namespace.
    pub sandbox_ipcns: bool,
    /// Give the container every device of the guest (privileged).
    pub all_devices: bool,
}

/// A container's rootfs as the guest finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestRootfs {
    /// A directory, relative to the shared filesystem's root.
    Shared(String),
    /// The filesystem `fstype` on the disk at `address`.
    Disk {
        address: hypervisor::DiskAddress,
        fstype: String,
    },
}

/// What makes a VM restored from a template its own (the agent's
/// Personalize): until then its RNG state, clock, machine ID and agent
/// secret are the template's, shared with every other clone.
#[derive(Clone, PartialEq, Eq)]
pub struct Personalization {
    /// Mixed into the guest kernel's pool before its CRNG is reseeded.
    pub entropy: Vec<u8>,
    /// The host's CLOCK_REALTIME, in ns since the epoch; 0 leaves the
    /// guest's clock alone.
    pub realtime_ns: i64,
    /// The guest's /etc/machine-id: 32 lower-case hex digits.
    pub machine_id: String,
    /// The agent secret that connections made afterwards must present;
    /// the connection that personalizes stays open.
    pub secret: agent::AgentSecret,
}

/// Bytes of entropy [`Personalization::generate`] sends.
const PERSONALIZE_ENTROPY: usize = 64;
/// Random bytes of a machine ID (32 hex digits).
const MACHINE_ID_BYTES: usize = 16;

impl Personalization {
    /// A fresh identity with `secret`: entropy and a machine ID from
    /// /dev/urandom, and the host's clock now.
    pub fn generate(secret: agent::AgentSecret) -> std::io::Result<Self> {
        use std::{fmt::Write as _, io::Read as _};
        let mut random = [0u8; PERSONALIZE_ENTROPY + MACHINE_ID_BYTES];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
        let (entropy, id) = random.split_at(PERSONALIZE_ENTROPY);
        let machine_id = id.iter().fold(String::with_capacity(32), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        });
        // SystemTime is CLOCK_REALTIME.
        let realtime_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(std::io::Error::other)
            .and_then(|t| i64::try_from(t.as_nanos()).map_err(std::io::Error::other))?;
        Ok(Self {
            entropy: entropy.to_vec(),
            realtime_ns,
            machine_id,
            secret,
        })
    }
}

/// The entropy seeds the clone's RNG and the secret guards its agent:
/// neither is printed.
impl std::fmt::Debug for Personalization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Personalization")
            .field("entropy", &format_args!("[{} bytes]", self.entropy.len()))
            .field("realtime_ns", &self.realtime_ns)
            .field("machine_id", &self.machine_id)
            .field("secret", &self.secret)
            .finish()
    }
}

/// An agent call failed; `detail` says how (transport or remote status).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{detail}")]
pub struct AgentError {
    pub detail: String,
    /// The remote status class, when the agent answered with one.
    pub code: Option<AgentCode>,
}

/// The agent's answer classes that callers act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentCode {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    Other,
}

impl AgentError {
    pub fn new(detail: impl Into<String>) -> Self {
        Self {
            detail: detail.into(),
            code: None,
        }
    }
}

/// One connection to one guest's agent.
#[async_trait]
pub trait AgentClient: Send + Sync + std::fmt::Debug {
    /// Health check: succeeds once the agent serves.
    async fn check(&self, timeout: Duration) -> Result<(), AgentError>;
    async fn guest_details(&self, timeout: Duration) -> Result<GuestDetails, AgentError>;
    /// Onlines hot-plugged vCPUs and memory, waiting up to `wait` for
    /// `cpus` CPUs to be online; the guest as it then is.
    async fn online_resources(&self, cpus: u32, wait: Duration)
        -> Result<GuestDetails, AgentError>;
    /// Asks the guest to power off; the VMM exits shortly after.
    async fn shutdown(&self, timeout: Duration) -> Result<(), AgentError>;

    /// Creates a container from an OCI spec whose rootfs is `rootfs`.
    async fn create_container(
        &self,
        id: &str,
        oci_spec: &crate::oci::Spec,
        rootfs: &GuestRootfs,
        options: &CreateOptions,
    ) -> Result<(), AgentError>;
    async fn start_container(&self, id: &str) -> Result<(), AgentError>;
    /// Signals a process of container `id`: its init when `exec_id` is
    /// empty, else that exec; `all`: every process of the container.
    async fn signal_container(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError>;
    /// Blocks until the process exits: its exit status and, for a
    /// container's init killed by the OOM killer, "OOMKilled".
    async fn wait_container(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<(i32, Option<String>), AgentError>;
    /// Starts another process in a running container: the container's
    /// process with these args (environment entries override by key).
    async fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        process: &crate::container_exec::ExecConfig,
    ) -> Result<(), AgentError>;
    async fn remove_container(&self, id: &str, force: bool) -> Result<(), AgentError>;
    async fn stats_container(
        &self,
        id: &str,
    ) -> Result<crate::container::ContainerStats, AgentError>;
    /// Freezes (`pause`) or thaws all processes of a container.
    async fn freeze_container(&self, id: &str, pause: bool) -> Result<(), AgentError>;
    /// Blocks until output is there; `None` at the end of the stream.
    async fn read_output(
        &self,
        id: &str,
        exec_id: &str,
        stream: crate::container_log::Stream,
    ) -> Result<Option<Vec<u8>>, AgentError>;
    /// Writes all of `data` to a process's stdin.
    async fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) -> Result<(), AgentError>;
    /// The process reads end-of-file.
    async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), AgentError>;
    /// The window size of a process's terminal.
    async fn resize_terminal(
        &self,
        id: &str,
        exec_id: &str,
        rows: u16,
        cols: u16,
    ) -> Result<(), AgentError>;
    async fn list_processes(
        &self,
        id: &str,
    ) -> Result<Vec<crate::container::ProcessInfo>, AgentError>;
    /// New cgroup limits: an OCI `linux.resources` object (JSON).
    async fn update_container(&self, id: &str, resources: Vec<u8>) -> Result<(), AgentError>;

    /// Gives the guest NIC with the interface's MAC its name, MTU and
    /// addresses, and brings it up; returns what the guest then reports.
    async fn update_interface(&self, nic: &NetInterface) -> Result<NetInterface, AgentError>;
    /// Replaces the guest's routes; returns the table as it then stands.
    async fn update_routes(&self, routes: &[NetRoute]) -> Result<Vec<NetRoute>, AgentError>;
    async fn list_interfaces(&self) -> Result<Vec<NetInterface>, AgentError>;
    async fn list_routes(&self) -> Result<Vec<NetRoute>, AgentError>;
    /// Permanent ARP / NDP entries.
    async fn add_neighbors(&self, neighbors: &[NetNeighbor]) -> Result<(), AgentError>;
    /// The pod's hostname, hosts and resolv.conf for its containers.
    async fn set_sandbox_files(&self, files: &SandboxFiles) -> Result<(), AgentError>;
    /// `net.*` sysctls, written guest-wide (the VM's network is the pod's).
    async fn set_sysctls(
        &self,
        sysctls: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), AgentError>;

    /// Gives a VM restored from a template its own identity (API 8): after
    /// it, new connections to the agent must present `p.secret`.
    async fn personalize(&self, p: &Personalization) -> Result<(), AgentError>;
}

/// Opens connections to agents.
#[async_trait]
pub trait AgentDialer: Send + Sync + std::fmt::Debug {
    /// One attempt, authenticated with the VM's `secret`
    /// ([`agent_secret`]); the caller retries while a guest boots.
    async fn dial(
        &self,
        channel: &VsockChannel,
        secret: Option<&agent::AgentSecret>,
    ) -> Result<Arc<dyn AgentClient>, AgentError>;

    /// Waits until a freshly booted guest's agent says it serves, where the
    /// transport lets it say so; returns at once where it cannot (callers
    /// then poll with [`AgentDialer::dial`]).
    async fn wait_ready(&self, channel: &VsockChannel, timeout: Duration)
        -> Result<(), AgentError>;

    /// A connection to TCP `port` on the pod's localhost, through the
    /// agent's port forwarder.
    async fn dial_port_forward(
        &self,
        channel: &VsockChannel,
        secret: Option<&agent::AgentSecret>,
        port: u16,
    ) -> Result<ForwardedStream, AgentError>;
}

/// The secret the agent of `vm` requires (`None` for a VM booted before
/// agents required one: its agent takes none).
pub fn agent_secret(vm: &dyn hypervisor::Hypervisor) -> Option<agent::AgentSecret> {
    vm.state()
        .agent_secret
        .as_deref()
        .and_then(agent::AgentSecret::from_hex)
}

/// The bytes of one forwarded connection, both ways.
pub trait ForwardedIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> ForwardedIo for T {}

/// A forwarded connection (see [`AgentDialer::dial_port_forward`]).
pub type ForwardedStream = Box<dyn ForwardedIo>;

#[cfg(test)]
mod tests {
    use super::Personalization;

    #[test]
    fn a_generated_personalization_is_what_the_agent_takes() {
        let secret = agent::AgentSecret::generate().expect("random");
        let a = Personalization::generate(secret.clone()).expect("generate");
        let b = Personalization::generate(secret.clone()).expect("generate");
        assert!(agent::PERSONALIZE_ENTROPY_BYTES.contains(&a.entropy.len()));
        assert!(agent::valid_machine_id(&a.machine_id), "{}", a.machine_id);
        assert!(a.realtime_ns > 0 && b.realtime_ns >= a.realtime_ns);
        assert_eq!(a.secret, secret);
        assert_ne!(a.entropy, b.entropy);
        assert_ne!(a.machine_id, b.machine_id);
        let debug = format!("{a:?}");
        assert!(debug.contains("[64 bytes]"), "{debug}");
        assert!(!debug.contains(&secret.to_hex()), "{debug}");
    }

    #[test]
    fn host_and_agent_name_the_same_secret_file() {
        assert_eq!(
            hypervisor::AGENT_SECRET_FW_CFG,
            agent::auth::SECRET_FW_CFG_NAME
        );
    }

    #[test]
    fn host_and_agent_name_the_same_serial_port_and_parameter() {
        assert_eq!(hypervisor::AGENT_SERIAL_PORT, agent::SERIAL_PORT_NAME);
        assert_eq!(hypervisor::AGENT_CHANNEL_PARAM, agent::CHANNEL_PARAM);
        assert_eq!(hypervisor::TEMPLATE_PARAM, agent::TEMPLATE_PARAM);
    }
}
