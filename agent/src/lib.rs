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

pub mod auth;
mod dial;
pub mod serial;

pub use auth::AgentSecret;
pub use dial::{dial, dial_forward, wait_ready_hybrid, DialError, Endpoint};

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
/// 6: every connection authenticates ([`auth`]).
/// 7: OnlineResources (CPU and memory hot-plug).
/// 8: Personalize (a VM cloned from a template gets its own identity).
pub const API_VERSION: u32 = 9;

/// Personalize (API 8): how many bytes of host randomness a request
/// carries, at least and at most.
pub const PERSONALIZE_ENTROPY_BYTES: std::ops::RangeInclusive<usize> = 32..=512;

/// Whether `id` is a machine ID as `/etc/machine-id` holds it (without its
/// newline): 32 lower-case hex digits. The host makes them, the agent
/// checks them (Personalize).
pub fn valid_machine_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Where the agent writes the pod's hostname, hosts and resolv.conf files
/// (SetSandboxFiles); containers bind-mount them from here.
pub const SANDBOX_FILES_GUEST_PATH: &str = "/run/vc/sandbox";

/// The host port the agent connects to once it serves, to say so.
///
/// Readiness is pushed by the guest rather than polled by the host: a host
/// that dials a userspace vsock device before the guest driver has set it up
/// can kill the device (vhost-device-vsock 0.3 ends its worker thread when a
/// host connection arrives before guest memory is mapped), and polling also
/// wastes the interval. With the hybrid transport the device forwards the
/// guest's connection to the unix socket `<uds>_<port>`.
pub const AGENT_READY_PORT: u32 = 1025;

/// The vsock port of the agent's port forwarder (API 4). A connection to
/// it starts with one line, `PORT <n>\n`; the agent connects to TCP port
/// `n` on the guest's loopback (the pod's localhost, where kubelet's
/// port-forward goes) and answers `OK\n` or `ERR <reason>\n`; from then on
/// the connection carries the forwarded bytes both ways.
pub const FORWARD_VSOCK_PORT: u32 = 1026;

/// The longest header or reply line of the port forwarder.
pub const FORWARD_MAX_LINE: usize = 256;

/// Whether `id` is a valid sandbox, container or exec ID: 1-128 characters
/// of `[A-Za-z0-9_.-]`, starting with a letter or digit. IDs become file
/// names on the host and in the guest, so both sides check the same rule.
pub fn valid_id(id: &str) -> bool {
    let mut chars = id.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && id.len() <= 128
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// The mount tag of the sandbox's shared directory (virtio-fs or 9p).
pub const SHARED_FS_TAG: &str = "vcshared";

/// Where the agent mounts the shared directory in the guest.
pub const SHARED_FS_GUEST_PATH: &str = "/run/vc/shared";

/// The serial number of the read-only modules disk (the guest kernel's
/// whole module tree), by which the agent finds it; the hypervisor gives it
/// the same (`hypervisor::MODULES_DISK_SERIAL`).
pub const MODULES_DISK_SERIAL: &str = "vc-modules";

/// The agent's virtio-serial port (`/sys/class/virtio-ports/*/name`), where
/// a VM without vsock carries the API: one connection at a time, which
/// starts with the host's hello, answered by the agent (see [`serial`]):
/// the host learns the guest is serving (serial has no readiness connection).
pub const SERIAL_PORT_NAME: &str = "io.virtcontainers.agent";

/// The guest kernel parameter naming the agent's channel: `vc.channel=serial`
/// for the virtio-serial port; absent, vsock.
pub const CHANNEL_PARAM: &str = "vc.channel";

/// The guest kernel parameter of a VM booted to be saved as a template (and
/// so of its clones, which resume its memory): the agent leaves the shared
/// filesystem unmounted until Personalize (QEMU cannot save a VM whose 9p
/// export is mounted), and reports itself settled once the rest of its
/// start-up work is done.
pub const TEMPLATE_PARAM: &str = "vc.template";

/// What the agent writes on the readiness connection.
pub const READY_MESSAGE: &[u8] = b"READY\n";

/// The unix socket on which a hybrid vsock device delivers guest
/// connections to host `port`.
pub fn hybrid_listener_path(uds: &std::path::Path, port: u32) -> std::path::PathBuf {
    let mut name = uds.as_os_str().to_owned();
    name.push(format!("_{port}"));
    std::path::PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    #[test]
    fn machine_ids_are_32_lower_case_hex_digits() {
        assert!(super::valid_machine_id("0123456789abcdef0123456789abcdef"));
        for bad in [
            "",
            "0123456789abcdef0123456789abcde",
            "0123456789abcdef0123456789abcdef0",
            "0123456789ABCDEF0123456789abcdef",
            "0123456789abcdef0123456789abcdeg",
            "0123456789abcdef0123456789abcde\n",
        ] {
            assert!(!super::valid_machine_id(bad), "{bad:?}");
        }
    }
}
