//! Virtual machine monitors behind one small async trait.
//!
//! A [`Hypervisor`] is one VM: booted from a kernel and initrd, paused,
//! resumed, stopped, and found again from its [`VmState`] by another process
//! (the VMM keeps running when the process that booted it exits). QEMU is the
//! implementation today; Cloud Hypervisor and Firecracker slot in behind the
//! same trait and the [`new_vm`] / [`restore_vm`] factory.
#![forbid(unsafe_code)]

mod config;
mod error;
#[cfg(any(test, feature = "testing"))]
pub mod fake;
pub mod process;
pub mod qemu;

use std::{
    os::fd::{AsRawFd, OwnedFd},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use config::{Accel, HypervisorConfig, MachineType, SharedFs, VsockBackend};
pub use error::{ErrorKind, HypervisorError, Result};
pub use process::ProcessRef;

/// What one VM is asked to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// The sandbox ID; names the VM in `ps` and in QMP.
    pub id: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// A directory the caller created for this VM alone; every socket, log
    /// and pid file goes in it. The caller removes it.
    pub run_dir: PathBuf,
    /// A host directory the guest mounts by `tag` (container rootfs and
    /// volumes travel through it), over the configured [`SharedFs`].
    pub shared: Option<SharedDir>,
    /// Network interfaces, in guest order (eth0 first).
    pub nics: Vec<Nic>,
    /// The secret the guest agent is to require on every connection (64
    /// hex digits, `agent::AgentSecret::to_hex`), handed to the guest as
    /// the fw_cfg file [`AGENT_SECRET_FW_CFG`] through a pipe, never a
    /// command line or a file. `None`: the guest gets none, and our agent
    /// then refuses to serve.
    pub agent_secret: Option<String>,
    /// Whether the VM is a template or starts from one (`None`: it boots).
    pub template: Option<TemplateRole>,
    /// The nice value the VMM and its helpers start at (0: as the caller
    /// runs), set as each is spawned, before it makes its threads: a VM
    /// started in the background (a warm pool's) yields to running ones
    /// from its first instruction, not only once it booted.
    pub nice: i32,
}

/// A VM that becomes a template, or starts from one: the template is a
/// booted VM's device state ([`Hypervisor::save_template`]) and its RAM as
/// a file, which every clone maps private (copy-on-write), so the clones
/// share the pages of the kernel, initramfs and agent that none of them
/// writes. Only VMs whose devices can all be saved qualify: no vhost-user
/// device (the agent over virtio-serial, files over 9p, or none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateRole {
    /// Boots as usual, its RAM the file `memory` (QEMU creates it and maps
    /// it shared), so that it can be saved.
    Source { memory: PathBuf },
    /// Does not boot: maps `memory` private and loads the device state in
    /// `state`, then runs on from where the template was saved.
    Clone { memory: PathBuf, state: PathBuf },
}

/// A network interface of the VM, backed by a tap device the caller opened
/// (typically inside the pod's network namespace, next to the CNI's veth).
/// QEMU receives a duplicate of the descriptor at boot; the caller may close
/// its own afterwards.
#[derive(Debug, Clone)]
pub struct Nic {
    /// An open `/dev/net/tun` descriptor attached to a tap (IFF_TAP | IFF_NO_PI).
    pub tap: Arc<OwnedFd>,
    /// The guest NIC's MAC address ("aa:bb:cc:dd:ee:ff"): the veth's, so the
    /// guest takes its place on the pod network.
    pub mac: String,
    /// Announced to the guest driver (virtio `host_mtu`); 0 leaves it out.
    pub mtu: u32,
}

impl PartialEq for Nic {
    fn eq(&self, other: &Self) -> bool {
        self.tap.as_raw_fd() == other.tap.as_raw_fd()
            && self.mac == other.mac
            && self.mtu == other.mtu
    }
}

impl Eq for Nic {}

/// Whether `mac` is six colon-separated hex octets (QEMU takes nothing else,
/// and the value goes into its command line).
pub fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// A disk image to attach to a running VM (a container's block rootfs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The image file. Only paths the caller made (the image store's) reach
    /// this: QEMU opens it, and a qcow2's backing file with it.
    pub path: PathBuf,
    pub format: DiskFormat,
    pub readonly: bool,
}

/// The format of a [`Disk`] image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskFormat {
    Raw,
    /// A qcow2 overlay; its backing file (named in its header) is opened read-only.
    Qcow2,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// Where the guest finds an attached disk: a SCSI device on the VM's one
/// virtio-scsi controller, at target `target`, LUN `lun`
/// (`/sys/bus/scsi/devices/<host>:0:<target>:<lun>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskAddress {
    pub target: u32,
    pub lun: u32,
}

/// A host directory shared into the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedDir {
    pub host_path: PathBuf,
    /// The mount tag the guest uses (`mount -t virtiofs TAG ...`).
    pub tag: String,
}

/// How the host reaches the guest's vsock ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum VsockChannel {
    /// A userspace vsock device; connect to `uds` and send `CONNECT <port>\n`.
    Hybrid { uds: PathBuf },
    /// Kernel vhost-vsock: connect with `AF_VSOCK` to `cid`.
    Kernel { cid: u32 },
    /// A virtio-serial port that QEMU serves on `uds`: one connection at
    /// a time, carrying the agent's API only.
    Serial { uds: PathBuf },
}

/// What the VMM says about the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum VmStatus {
    Running,
    Paused,
    /// The VMM process is gone. `reason` says what is known: the last lines
    /// of the guest console and of the VMM's own log.
    Exited {
        reason: String,
    },
}

/// Everything needed to find a running VM again from another process.
/// Persisted by the caller (as JSON) next to its own state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// Which implementation wrote this ("qemu").
    pub hypervisor: String,
    pub id: String,
    pub run_dir: PathBuf,
    /// The accelerator actually in use ("kvm" or "tcg").
    pub accel: String,
    pub machine: String,
    /// vCPUs and memory now (after any [`Hypervisor::resize`]).
    pub vcpus: u32,
    pub memory_mib: u32,
    /// What the VM booted with: the floor a resize cannot go below. 0 in a
    /// record written before VMs could be resized (then: `vcpus`,
    /// `memory_mib`; see [`VmState::boot_size`]).
    #[serde(default)]
    pub boot_vcpus: u32,
    #[serde(default)]
    pub boot_memory_mib: u32,
    /// The size of the VM's virtio-mem device, the memory it can grow by
    /// (MiB); 0: none (microvm, hot-plug off, an older record).
    #[serde(default)]
    pub hotplug_memory_mib: u32,
    /// The VMM process; `None` before boot.
    pub vmm: Option<ProcessRef>,
    /// Helper processes (the userspace vsock device, later virtiofsd).
    pub helpers: Vec<ProcessRef>,
    pub vsock: Option<VsockChannel>,
    /// NICs added to the running VM: (hot-plug slot, MAC).
    #[serde(default)]
    pub hotplugged_nics: Vec<(u32, String)>,
    /// Disks added to the running VM, by address.
    #[serde(default)]
    pub hotplugged_disks: Vec<(DiskAddress, PathBuf)>,
    /// The secret the guest agent requires on every connection (64 hex
    /// digits, made for this VM alone and handed to the guest as the fw_cfg
    /// file [`AGENT_SECRET_FW_CFG`]); `None` in a record of a VM booted
    /// before agents required one.
    #[serde(default)]
    pub agent_secret: Option<String>,
}

impl VmState {
    /// The size the VM booted with.
    pub fn boot_size(&self) -> VmSize {
        VmSize {
            vcpus: if self.boot_vcpus > 0 {
                self.boot_vcpus
            } else {
                self.vcpus
            },
            memory_mib: if self.boot_memory_mib > 0 {
                self.boot_memory_mib
            } else {
                self.memory_mib
            },
        }
    }

    /// The size the VM has now.
    pub fn size(&self) -> VmSize {
        VmSize {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
        }
    }
}

/// How many vCPUs and how much memory a VM has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u32,
}

impl std::fmt::Display for VmSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} vCPUs, {} MiB", self.vcpus, self.memory_mib)
    }
}

/// The fw_cfg file that carries a VM's agent secret; the agent protocol's
/// `agent::auth::SECRET_FW_CFG_NAME`, which a test of podsandbox checks.
pub const AGENT_SECRET_FW_CFG: &str = "opt/io.virtcontainers/agent-secret";

/// The name of the agent's virtio-serial port (serial backend); the agent
/// protocol's `agent::SERIAL_PORT_NAME`.
pub const AGENT_SERIAL_PORT: &str = "io.virtcontainers.agent";

/// The guest kernel parameter that tells the agent its channel
/// (`<param>=serial`); the agent protocol's `agent::CHANNEL_PARAM`.
pub const AGENT_CHANNEL_PARAM: &str = "vc.channel";

/// The guest kernel parameter of a template VM and its clones; the agent
/// protocol's `agent::TEMPLATE_PARAM`.
pub const TEMPLATE_PARAM: &str = "vc.template";

/// One virtual machine.
#[async_trait]
pub trait Hypervisor: Send + Sync + std::fmt::Debug {
    /// Starts the VMM and its helpers. Returns once the VMM runs the guest
    /// (not once the guest is up). On error nothing it started is left.
    async fn boot(&self) -> Result<()>;

    /// Freezes the guest's vCPUs.
    async fn pause(&self) -> Result<()>;

    /// Thaws the guest's vCPUs.
    async fn resume(&self) -> Result<()>;

    /// Asks the VMM to quit, waits up to `grace`, then kills it; then stops
    /// the helpers. Idempotent: stopping a VM that is gone succeeds.
    async fn stop(&self, grace: Duration) -> Result<()>;

    /// Rotates the logs the guest can grow (its console, the helpers' logs)
    /// that are over [`HypervisorConfig::console_log_max_kib`]; the owner
    /// of a running VM calls it periodically.
    async fn trim_logs(&self) -> Result<()> {
        Ok(())
    }

    /// Where the VM stands now.
    async fn status(&self) -> Result<VmStatus>;

    /// Resolves when the VMM process has exited, with the reason.
    async fn wait_exit(&self) -> String;

    /// The channel to the guest's vsock ports.
    fn vsock(&self) -> Option<VsockChannel>;

    /// Process IDs of the VMM and its helpers, for accounting and cgroups.
    fn pids(&self) -> Vec<u32>;

    /// The state to persist; [`restore_vm`] turns it back into a VM.
    fn state(&self) -> VmState;

    /// The last `lines` lines of the guest console.
    fn console_tail(&self, lines: usize) -> String;

    /// Adds a NIC to the running VM (a free hot-plug slot, the tap handed
    /// over QMP). The guest sees a new virtio-net device.
    async fn add_nic(&self, nic: &Nic) -> Result<()>;

    /// Removes the hot-plugged NIC with this MAC; returns once the guest
    /// has released it.
    async fn remove_nic(&self, mac: &str) -> Result<()>;

    /// Attaches a disk to the running VM (a SCSI disk on its virtio-scsi
    /// controller, no PCI slot needed) and says where the guest finds it.
    async fn add_disk(&self, disk: &Disk) -> Result<DiskAddress>;

    /// Detaches the disk at `address`; the guest should have unmounted it.
    /// Detaching a disk that is not attached succeeds (idempotent).
    async fn remove_disk(&self, address: DiskAddress) -> Result<()>;

    /// Pauses a VM booted as [`TemplateRole::Source`] and writes its
    /// device state to `state` (0600; its RAM is already its memory file).
    /// The VM stays paused; the caller stops it. Clones start from
    /// `state` and the memory file ([`TemplateRole::Clone`]).
    async fn save_template(&self, state: &std::path::Path) -> Result<()> {
        let _ = state;
        Err(HypervisorError::Unsupported {
            what: "saving a VM as a template",
            why: "this hypervisor cannot save a VM",
        })
    }

    /// Grows or shrinks the running VM towards `size` (never below what it
    /// booted with, never above the configured maxima): vCPUs are
    /// hot-plugged (the guest must online them), memory is plugged into or
    /// unplugged from the VM's virtio-mem device and onlined by the guest
    /// kernel. Returns the size in force afterwards: growth is complete or
    /// an error; a shrink the guest could not finish in time leaves more,
    /// and so does a vCPU shrink under TCG (QEMU cannot unplug them there).
    async fn resize(&self, size: VmSize) -> Result<VmSize> {
        let _ = size;
        Err(HypervisorError::Unsupported {
            what: "resizing a running VM",
            why: "this hypervisor has no CPU or memory hot-plug",
        })
    }
}

/// Creates (does not boot) a VM with the configured implementation.
pub fn new_vm(config: &HypervisorConfig, vm: VmConfig) -> Result<Arc<dyn Hypervisor>> {
    Ok(Arc::new(qemu::Qemu::new(config, vm)?))
}

/// Finds a VM again from its persisted state.
pub fn restore_vm(config: &HypervisorConfig, state: VmState) -> Result<Arc<dyn Hypervisor>> {
    match state.hypervisor.as_str() {
        qemu::NAME => Ok(Arc::new(qemu::Qemu::restore(config, state))),
        other => Err(HypervisorError::UnknownHypervisor {
            name: other.to_string(),
        }),
    }
}

/// The serial number the modules disk carries, by which the guest agent
/// finds it (`agent::MODULES_DISK_SERIAL` says the same).
pub const MODULES_DISK_SERIAL: &str = "vc-modules";

/// How long a graceful VMM quit may take before it is killed.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(3);
