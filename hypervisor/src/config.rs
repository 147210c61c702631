//! The hypervisor section of the runtime configuration.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Which accelerator runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM where it really runs guests, TCG otherwise.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// The QEMU machine type.
///
/// `q35` is the default. Measured here under TCG (30 create/delete runs
/// each): `microvm` reaches a serving agent ~0.3 s sooner (2.15 s vs 2.45 s
/// median; the bare-kernel floor is 1.70 s vs 2.17 s) and, with the RTC kept
/// and a fixed TSC frequency given to the guest, never hung. But microvm has
/// no PCI, hence no device hotplug, and the block and network devices of
/// later issues are hot-plugged into a running sandbox — so q35 it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineType {
    #[default]
    Q35,
    Microvm,
}

impl MachineType {
    pub fn as_str(self) -> &'static str {
        match self {
            MachineType::Q35 => "q35",
            MachineType::Microvm => "microvm",
        }
    }
}

/// How the host reaches the guest's agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VsockBackend {
    /// Kernel vhost-vsock where `/dev/vhost-vsock` exists, else hybrid.
    #[default]
    Auto,
    /// Kernel `vhost-vsock-pci`.
    Vhost,
    /// `vhost-device-vsock` behind `vhost-user-vsock`, reached over a unix socket.
    Hybrid,
    /// No vsock: the agent's API on a virtio-serial port that QEMU itself
    /// serves as a unix socket. No helper process and no vhost-user device
    /// (so, with a shared directory over 9p or none, guest memory need not
    /// be shared with another process); one connection at a time, so no
    /// port forwarding.
    Serial,
}

/// How the sandbox's shared directory reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SharedFs {
    /// virtio-fs through one virtiofsd per sandbox (metadata 10-45x faster
    /// than 9p here).
    #[default]
    VirtioFs,
    /// virtio-9p, served by QEMU itself: no helper process. Spelled
    /// `virtio-9p` as documented (serde's kebab-case made it `virtio9p`,
    /// still accepted).
    #[serde(rename = "virtio-9p", alias = "virtio9p")]
    Virtio9p,
    /// No shared directory.
    None,
}

/// `[hypervisor]` in the config file. Every field has a working default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HypervisorConfig {
    /// The QEMU binary.
    pub qemu_path: PathBuf,
    /// Uncompressed guest kernel (ELF with a PVH entry). Empty: the guest
    /// image found next to the binaries (see `podsandbox::config`).
    pub kernel: PathBuf,
    /// Guest initramfs with `vc-agent` as `/init`.
    pub initrd: PathBuf,
    /// The guest kernel's whole module tree as a read-only ext4 image
    /// (`modules.img` from `hack/build-guest.sh`), attached to every VM
    /// read-only for the guest's modprobe. Empty: `modules.img` next to the
    /// kernel if there is one (see `podsandbox::config`), else no disk.
    pub modules: PathBuf,
    pub machine: MachineType,
    pub accel: Accel,
    /// vCPUs of a sandbox that asks for none.
    pub default_vcpus: u32,
    /// Upper bound on a sandbox's vCPUs; 0 means the host's CPU count.
    pub max_vcpus: u32,
    /// Memory of a sandbox that asks for none, in MiB.
    pub default_memory_mib: u32,
    /// Upper bound on a sandbox's memory, in MiB.
    pub max_memory_mib: u32,
    /// Appended to the guest kernel command line.
    pub kernel_params: String,
    pub vsock: VsockBackend,
    /// The userspace vsock device binary for the hybrid backend.
    pub vhost_device_vsock_path: PathBuf,
    /// How the shared directory is shared.
    pub shared_fs: SharedFs,
    /// The virtio-fs daemon (Debian's QEMU ships one).
    pub virtiofsd_path: PathBuf,
    /// TCG translation cache size in MiB (QEMU's default, 1 GiB, is mostly
    /// untouched but inflates the footprint). Each VM's cache fills up to
    /// this and is then flushed whole: below the guest's working set (a
    /// container create's kernel, agent and libcontainer code) the guest
    /// translates the same code again and again. 32: ExecSync 2.4× and pod
    /// start 1.6× faster than at 16, for ~17 MiB more per VM (README,
    /// "Warm VMs").
    pub tcg_tb_size_mib: u32,
    /// PCIe root ports for devices added to a running VM (q35 only): the
    /// number of NICs that can be hot-plugged at once.
    pub hotplug_slots: u32,
    /// A virtio-scsi controller at boot, so disks (block-device container
    /// rootfs) can be attached to the running VM without a PCIe slot each.
    pub disk_hotplug: bool,
    /// The most the guest console's log (and each helper's log) may hold
    /// before it is rotated: the newest quarter goes to `<log>.1`, the log
    /// starts again (see [`crate::Hypervisor::trim_logs`]). The guest
    /// writes the console, so this is what it can make the host keep.
    pub console_log_max_kib: u32,
    /// What the guest itself (kernel, agent) takes on top of a pod's
    /// memory limits when the pod is sized from them (MiB).
    pub memory_overhead_mib: u32,
    /// CPU and memory hot-plug (q35 only): every VM can grow while it runs
    /// to `max_vcpus` and `max_memory_mib` (vCPUs by ACPI hot-plug, memory
    /// from a virtio-mem device, which can also give it back). Off, or on
    /// microvm, a VM keeps the size it booted with.
    pub resource_hotplug: bool,
    /// A virtio-balloon with free-page reporting in every booted VM: memory
    /// the guest frees (in 2 MiB pieces, after ~2 s) is handed back to the
    /// host. Never in a template or its clones (a discard would punch the
    /// template's shared file).
    pub free_page_reporting: bool,
    /// Whether the host's KSM may merge guest RAM (QEMU `mem-merge`, which
    /// is on in QEMU by default). Off: a VM's pages are never shared with
    /// another VM's by content, which is what deduplication side channels
    /// (write-fault timing, Flip Feng Shui) need. KSM itself is the host's
    /// switch (`/sys/kernel/mm/ksm/run`); it merges only private RAM (VMs
    /// with no vhost-user device, template clones).
    pub mem_merge: bool,
}

impl Default for HypervisorConfig {
    fn default() -> Self {
        Self {
            qemu_path: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            kernel: PathBuf::new(),
            initrd: PathBuf::new(),
            modules: PathBuf::new(),
            machine: MachineType::default(),
            accel: Accel::default(),
            default_vcpus: 1,
            max_vcpus: 0,
            default_memory_mib: 256,
            max_memory_mib: 16384,
            kernel_params: String::new(),
            vsock: VsockBackend::default(),
            vhost_device_vsock_path: default_vhost_device_vsock(),
            shared_fs: SharedFs::default(),
            virtiofsd_path: PathBuf::from("/usr/lib/qemu/virtiofsd"),
            tcg_tb_size_mib: 32,
            hotplug_slots: 2,
            disk_hotplug: true,
            console_log_max_kib: 1024,
            memory_overhead_mib: 128,
            resource_hotplug: true,
            free_page_reporting: true,
            mem_merge: false,
        }
    }
}

/// `cargo install` puts it in ~/.cargo/bin; packagers in /usr/bin.
fn default_vhost_device_vsock() -> PathBuf {
    let candidates = [
        std::env::var_os("CARGO_HOME").map(|h| PathBuf::from(h).join("bin/vhost-device-vsock")),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/vhost-device-vsock")),
        Some(PathBuf::from("/usr/local/bin/vhost-device-vsock")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("/usr/bin/vhost-device-vsock"))
}

impl HypervisorConfig {
    /// The effective vCPU limit.
    pub fn max_vcpus(&self) -> u32 {
        if self.max_vcpus > 0 {
            return self.max_vcpus;
        }
        std::thread::available_parallelism()
            .ok()
            .and_then(|n| u32::try_from(n.get()).ok())
            .unwrap_or(1)
    }
}
