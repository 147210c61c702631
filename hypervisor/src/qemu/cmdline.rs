//! The QEMU command line, built by small pure functions (one per concern)
//! so every flag is unit-tested without starting QEMU.

use std::path::{Path, PathBuf};

use super::accel::Resolved;
use crate::MachineType;

/// Files QEMU uses, all inside the VM's run dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPaths {
    /// The runtime's own monitor: one long-lived connection holds it.
    pub qmp: PathBuf,
    /// A second monitor, free for operators and tools (QEMU serves one
    /// client per socket).
    pub qmp_extra: PathBuf,
    pub console: PathBuf,
    pub log: PathBuf,
    /// vhost-user control socket of the userspace vsock device.
    pub vhost_vsock: PathBuf,
    /// Host-side socket of the userspace vsock device (hybrid vsock).
    pub vsock_uds: PathBuf,
    pub vsock_log: PathBuf,
    /// QEMU's socket for the agent's virtio-serial port (serial backend).
    pub agent_serial: PathBuf,
    /// vhost-user socket of virtiofsd.
    pub virtiofsd: PathBuf,
    pub virtiofsd_log: PathBuf,
}

impl RunPaths {
    pub fn new(run_dir: &Path) -> Self {
        Self {
            qmp: run_dir.join("qmp.sock"),
            qmp_extra: run_dir.join("qmp-extra.sock"),
            console: run_dir.join("console.log"),
            log: run_dir.join("qemu.log"),
            vhost_vsock: run_dir.join("vhost-vsock.sock"),
            vsock_uds: run_dir.join("vsock.sock"),
            vsock_log: run_dir.join("vhost-device-vsock.log"),
            agent_serial: run_dir.join("agent.sock"),
            virtiofsd: run_dir.join("virtiofsd.sock"),
            virtiofsd_log: run_dir.join("virtiofsd.log"),
        }
    }

    /// Paths that must fit in `sockaddr_un`.
    pub fn sockets(&self) -> [&Path; 6] {
        [
            &self.qmp,
            &self.qmp_extra,
            &self.vhost_vsock,
            &self.vsock_uds,
            &self.agent_serial,
            &self.virtiofsd,
        ]
    }

    /// Makes every socket that exists owner-only (0600): QEMU and the
    /// helpers bind them with the runtime's umask. The run dir is 0700
    /// already; this keeps each socket safe on its own too.
    pub fn restrict_sockets(&self) -> crate::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        for path in self.sockets() {
            match std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(crate::HypervisorError::Io {
                        action: "make socket owner-only:",
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }
}

/// How the guest's vsock is wired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VsockDevice {
    /// `vhost-user-vsock` to a userspace device on this control socket.
    VhostUser { socket: PathBuf },
    /// Kernel vhost-vsock with this context ID.
    Kernel { cid: u32 },
    /// No vsock: a virtio-serial port named [`crate::AGENT_SERIAL_PORT`]
    /// whose host side QEMU serves on this unix socket.
    Serial { socket: PathBuf },
}

/// How the shared directory is wired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedDevice {
    /// `vhost-user-fs` to virtiofsd on this socket.
    VhostUserFs { socket: PathBuf, tag: String },
    /// QEMU's own 9p server on this host directory.
    NineP { path: PathBuf, tag: String },
}

/// A NIC on the command line: a tap QEMU inherited as descriptor `fd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicArg {
    pub fd: i32,
    /// Already validated ([`crate::valid_mac`]).
    pub mac: String,
    pub mtu: u32,
}

/// Everything the command line depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec<'a> {
    pub id: &'a str,
    pub machine: MachineType,
    pub accel: Resolved,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The most vCPUs the running VM can have (`-smp maxcpus`); above
    /// `vcpus` only on q35, where ACPI CPU hot-plug adds them.
    pub max_vcpus: u32,
    /// The size of the virtio-mem device (`vmem0`) that memory is
    /// hot-plugged from and unplugged to (MiB); 0: none.
    pub hotplug_memory_mib: u32,
    /// A virtio-balloon with free-page reporting: memory the guest frees
    /// goes back to the host.
    pub free_page_reporting: bool,
    /// QEMU `mem-merge`: guest RAM marked mergeable for the host's KSM.
    pub mem_merge: bool,
    pub tb_size_mib: u32,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub extra_kernel_params: &'a str,
    /// Host TSC frequency, for microvm's guest (see [`kernel_cmdline`]).
    pub tsc_khz: Option<u64>,
    pub paths: &'a RunPaths,
    pub vsock: VsockDevice,
    pub shared: Option<SharedDevice>,
    pub nics: Vec<NicArg>,
    /// PCIe root ports `hp0`.. for hot-plugged devices (q35 only).
    pub hotplug_slots: u32,
    /// The virtio-scsi controller `scsi0` that disks are attached to.
    pub disk_controller: bool,
    /// The read-only modules disk image (the guest kernel's module tree).
    pub modules: Option<&'a Path>,
    /// The descriptor QEMU inherits with the agent's secret on it (a pipe),
    /// read once into the fw_cfg file [`crate::AGENT_SECRET_FW_CFG`]: the
    /// command line names the descriptor, never the secret.
    pub agent_secret_fd: Option<i32>,
    /// A template's source (RAM in a shared file) or a clone of one (RAM
    /// mapped private from that file, `-incoming defer`).
    pub template: Option<&'a crate::TemplateRole>,
}

/// Kernel parameters that every guest gets. `quiet` keeps the slow emulated
/// UART out of the boot path (errors and panics still print); `panic=1` with
/// QEMU's `-no-reboot` turns a guest panic into a VMM exit the host sees.
const BASE_KERNEL_PARAMS: &[&str] = &[
    "console=ttyS0",
    "quiet",
    "panic=1",
    "reboot=k",
    "no_timer_check",
    "rcupdate.rcu_expedited=1",
    "i8042.noaux=1",
    "i8042.nomux=1",
    "i8042.nopnp=1",
    "i8042.dumbkbd=1",
    "cryptomgr.notests",
    "random.trust_cpu=on",
];

pub fn kernel_cmdline(spec: &Spec<'_>) -> String {
    let mut params: Vec<String> = BASE_KERNEL_PARAMS.iter().map(|s| s.to_string()).collect();
    // Scanning all 256 buses is slow under TCG: only bus 0 and the buses
    // behind the hot-plug root ports exist.
    params.push(format!("pci=lastbus={}", hotplug_slots(spec)));
    if hotplug_memory_mib(spec) > 0 {
        // Plugged memory is onlined by the kernel as it arrives, into
        // ZONE_MOVABLE while that stays within 3x the kernel's own memory
        // (so it can be unplugged again) and into the normal zone beyond
        // (so kernel allocations never starve): the policy made for
        // virtio-mem.
        params.push("memhp_default_state=online".into());
        params.push("memory_hotplug.online_policy=auto-movable".into());
    }
    if matches!(spec.vsock, VsockDevice::Serial { .. }) {
        // The agent serves on the virtio-serial port instead of vsock.
        params.push(format!("{}=serial", crate::AGENT_CHANNEL_PARAM));
    }
    if spec.template.is_some() {
        // The same for the template and its clones (they resume its
        // memory): the agent keeps the template saveable.
        params.push(crate::TEMPLATE_PARAM.into());
    }
    if spec.machine == MachineType::Microvm {
        // microvm has no PIT/HPET to calibrate against; without a given TSC
        // frequency the guest hung in 3 of ~25 boots here.
        params.push("tsc=reliable".into());
        if let Some(khz) = spec.tsc_khz {
            params.push(format!("tsc_early_khz={khz}"));
        }
    }
    let extra = spec.extra_kernel_params.trim();
    if !extra.is_empty() {
        params.push(extra.to_string());
    }
    params.join(" ")
}

fn machine_args(spec: &Spec<'_>) -> Vec<String> {
    // microvm keeps its RTC: without one the kernel spends ~1.4 s timing
    // out on "Unable to read current time from RTC".
    let machine = match spec.machine {
        MachineType::Q35 => {
            "q35,smm=off,vmport=off,sata=off,usb=off,i8042=off,hpet=off,memory-backend=mem"
        }
        MachineType::Microvm => "microvm,pit=off,pic=off,isa-serial=on,memory-backend=mem",
    };
    let machine = format!(
        "{machine},mem-merge={}",
        if spec.mem_merge { "on" } else { "off" }
    );
    let accel = match spec.accel {
        Resolved::Kvm => "kvm".to_string(),
        // A small translation cache: QEMU's default of 1 GiB is mostly unused
        // but costs memory as it fills.
        Resolved::Tcg if hotplug_vcpus(spec) => {
            format!("tcg,tb-size={},thread=single", spec.tb_size_mib)
        }
        Resolved::Tcg => format!("tcg,tb-size={}", spec.tb_size_mib),
    };
    let cpu = match spec.accel {
        Resolved::Kvm => "host",
        Resolved::Tcg => "max",
    };
    // microvm's virtio-mmio transports default to legacy virtio, which
    // vhost-user backends refuse (virtiofsd: "virtio legacy devices aren't
    // supported by libvhost-user", and the guest's first mount hangs).
    let modern_mmio: &[&str] = if spec.machine == MachineType::Microvm {
        &["-global", "virtio-mmio.force-legacy=false"]
    } else {
        &[]
    };
    let mut args = strings(modern_mmio);
    args.extend(strings(&[
        "-machine",
        &machine,
        "-accel",
        &accel,
        "-cpu",
        cpu,
        "-smp",
        &smp(spec),
    ]));
    args
}

/// Whether vCPUs can be hot-plugged (q35, room above the boot count).
///
/// Under TCG such a VM runs all its vCPUs on one thread (`thread=single`):
/// multi-threaded TCG splits its translation cache into regions that the
/// running vCPUs take as they fill them, and a vCPU created later must
/// find one free — QEMU asserts (and exits) when none is, which happens
/// whenever the running vCPUs have taken them all between two flushes
/// (seen here on the second hot-plug with a 16 MiB cache). KVM has no
/// translation cache: there every vCPU is a thread of its own.
fn hotplug_vcpus(spec: &Spec<'_>) -> bool {
    spec.machine == MachineType::Q35 && spec.max_vcpus > spec.vcpus
}

/// `N`, or `N,maxcpus=M` where more can be hot-plugged.
fn smp(spec: &Spec<'_>) -> String {
    if hotplug_vcpus(spec) {
        format!("{},maxcpus={}", spec.vcpus, spec.max_vcpus)
    } else {
        spec.vcpus.to_string()
    }
}

/// The virtio-mem device's size, where the machine has one (q35: it is a
/// PCI device).
pub fn hotplug_memory_mib(spec: &Spec<'_>) -> u32 {
    if spec.machine == MachineType::Q35 {
        spec.hotplug_memory_mib
    } else {
        0
    }
}

/// Whether another process maps guest memory: vhost-user devices (the
/// userspace vsock device, virtiofsd) do.
pub fn shares_memory(spec: &Spec<'_>) -> bool {
    matches!(spec.vsock, VsockDevice::VhostUser { .. })
        || matches!(spec.shared, Some(SharedDevice::VhostUserFs { .. }))
}

fn memory_args(spec: &Spec<'_>) -> Vec<String> {
    // With a vhost-user device: memfd-backed and shared, so that it can map
    // it. Without: private anonymous memory, which (unlike a shared memfd)
    // host KSM can merge if the host turns it on.
    let hotplug = hotplug_memory_mib(spec);
    let backend = |id: &str, mib: u32| {
        // A template's RAM is a file: shared while the source writes it,
        // private (copy-on-write) in every clone. Device memory added
        // later (virtio-mem) is each VM's own.
        let file = match spec.template {
            Some(crate::TemplateRole::Source { memory }) => Some((memory, "on")),
            Some(crate::TemplateRole::Clone { memory, .. }) => Some((memory, "off")),
            None => None,
        };
        if let (Some((path, share)), "mem") = (file, id) {
            format!(
                "memory-backend-file,id={id},size={mib}M,mem-path={},share={share}",
                escape(path)
            )
        } else if shares_memory(spec) {
            format!("memory-backend-memfd,id={id},size={mib}M,share=on")
        } else {
            format!("memory-backend-ram,id={id},size={mib}M")
        }
    };
    let mut args = strings(&[
        "-m",
        &if hotplug > 0 {
            format!("{}M,maxmem={}M", spec.memory_mib, spec.memory_mib + hotplug)
        } else {
            format!("{}M", spec.memory_mib)
        },
        "-object",
        &backend("mem", spec.memory_mib),
    ]);
    if hotplug > 0 {
        // Sparse: only what the guest plugs and touches is memory on the
        // host; unplugged blocks are punched out (discarded) again.
        args.extend(strings(&[
            "-object",
            &backend("hpmem", hotplug),
            "-device",
            "virtio-mem-pci,id=vmem0,memdev=hpmem,requested-size=0,bus=pcie.0",
        ]));
    }
    // Never in a template or its clones. QEMU discards a page a balloon
    // is given by punching a hole in the RAM's file, even when the VM maps
    // that file private: a clone's guest (hostile, or merely freeing what
    // the template had in use) would zero those pages in the template every
    // other clone runs on and every later one starts from. Without the
    // device no guest can ask for a discard; what a clone frees stays its
    // own copy-on-write memory.
    if spec.free_page_reporting && spec.template.is_none() {
        let device = if spec.machine == MachineType::Microvm {
            "virtio-balloon-device"
        } else {
            "virtio-balloon-pci"
        };
        args.extend(strings(&[
            "-device",
            &format!("{device},id=balloon0,free-page-reporting=on"),
        ]));
    }
    args
}

fn base_args(spec: &Spec<'_>) -> Vec<String> {
    let mut args = strings(&[
        "-name",
        &format!("vc-{},debug-threads=on", spec.id.replace(',', ",,")),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-vga",
        "none",
        "-no-reboot",
    ]);
    if matches!(spec.template, Some(crate::TemplateRole::Clone { .. })) {
        // The device state comes over QMP (`migrate-incoming`).
        args.extend(strings(&["-incoming", "defer"]));
    }
    args
}

fn kernel_args(spec: &Spec<'_>) -> Vec<String> {
    vec![
        "-kernel".into(),
        spec.kernel.display().to_string(),
        "-initrd".into(),
        spec.initrd.display().to_string(),
        "-append".into(),
        kernel_cmdline(spec),
    ]
}

fn console_args(spec: &Spec<'_>) -> Vec<String> {
    strings(&[
        "-chardev",
        // O_APPEND: a rotation's truncation is where the next byte goes.
        &format!(
            "file,id=console,path={},append=on",
            escape(&spec.paths.console)
        ),
        "-serial",
        "chardev:console",
    ])
}

fn fw_cfg_args(spec: &Spec<'_>) -> Vec<String> {
    match spec.agent_secret_fd {
        Some(fd) => strings(&[
            "-fw_cfg",
            &format!(
                "name={},file=/proc/self/fd/{fd}",
                crate::AGENT_SECRET_FW_CFG
            ),
        ]),
        None => Vec::new(),
    }
}

fn qmp_args(spec: &Spec<'_>) -> Vec<String> {
    strings(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", escape(&spec.paths.qmp)),
        "-qmp",
        &format!("unix:{},server=on,wait=off", escape(&spec.paths.qmp_extra)),
    ])
}

fn vsock_args(spec: &Spec<'_>) -> Vec<String> {
    let (pci, mmio) = match &spec.vsock {
        VsockDevice::VhostUser { .. } => ("vhost-user-vsock-pci", "vhost-user-vsock-device"),
        VsockDevice::Kernel { .. } => ("vhost-vsock-pci", "vhost-vsock-device"),
        VsockDevice::Serial { .. } => ("virtio-serial-pci", "virtio-serial-device"),
    };
    let device = if spec.machine == MachineType::Microvm {
        mmio
    } else {
        pci
    };
    match &spec.vsock {
        VsockDevice::VhostUser { socket } => strings(&[
            "-chardev",
            &format!("socket,id=vsock,path={}", escape(socket)),
            "-device",
            &format!("{device},id=vsock0,chardev=vsock"),
        ]),
        VsockDevice::Kernel { cid } => {
            strings(&["-device", &format!("{device},id=vsock0,guest-cid={cid}")])
        }
        // QEMU listens itself (one client at a time); `wait=off`: the VM
        // runs before the host connects, and what the host writes before
        // the guest opens the port waits in the socket.
        VsockDevice::Serial { socket } => strings(&[
            "-device",
            &format!("{device},id=serial0,max_ports=2"),
            "-chardev",
            &format!("socket,id=agent,path={},server=on,wait=off", escape(socket)),
            "-device",
            &format!(
                "virtserialport,bus=serial0.0,chardev=agent,name={}",
                crate::AGENT_SERIAL_PORT
            ),
        ]),
    }
}

fn shared_fs_args(spec: &Spec<'_>) -> Vec<String> {
    let mmio = spec.machine == MachineType::Microvm;
    match &spec.shared {
        None => Vec::new(),
        Some(SharedDevice::VhostUserFs { socket, tag }) => strings(&[
            "-chardev",
            &format!("socket,id=sharedfs,path={}", escape(socket)),
            "-device",
            &format!(
                "{},id=sharedfs0,chardev=sharedfs,tag={},queue-size=1024",
                if mmio {
                    "vhost-user-fs-device"
                } else {
                    "vhost-user-fs-pci"
                },
                tag.replace(',', ",,")
            ),
        ]),
        Some(SharedDevice::NineP { path, tag }) => strings(&[
            "-fsdev",
            &format!(
                "local,id=shared9p,path={},security_model=none",
                escape(path)
            ),
            "-device",
            &format!(
                "{},id=shared9p0,fsdev=shared9p,mount_tag={}",
                if mmio {
                    "virtio-9p-device"
                } else {
                    "virtio-9p-pci"
                },
                tag.replace(',', ",,")
            ),
        ]),
    }
}

/// Root ports exist on q35 only (microvm has no PCI).
fn hotplug_slots(spec: &Spec<'_>) -> u32 {
    if spec.machine == MachineType::Q35 {
        spec.hotplug_slots
    } else {
        0
    }
}

/// `pcie-root-port` `hpN` per slot, each its own bus N+1.
fn hotplug_args(spec: &Spec<'_>) -> Vec<String> {
    (0..hotplug_slots(spec))
        .flat_map(|i| {
            [
                "-device".to_string(),
                format!(
                    "pcie-root-port,id=hp{i},bus=pcie.0,chassis={},slot={}",
                    i + 1,
                    i + 1
                ),
            ]
        })
        .collect()
}

/// The SCSI bus (`scsi0.0`) of hot-plugged disks. virtio-scsi rather than a
/// virtio-blk-pci per disk: one controller takes 256 targets without PCIe
/// slots, works on microvm's virtio-mmio too, and a disk leaves at once on
/// `device_del` (a PCIe device waits ~5 s for the guest's pciehp).
fn disk_controller_args(spec: &Spec<'_>) -> Vec<String> {
    if !spec.disk_controller {
        return Vec::new();
    }
    let device = if spec.machine == MachineType::Microvm {
        "virtio-scsi-device"
    } else {
        "virtio-scsi-pci"
    };
    strings(&["-device", &format!("{device},id=scsi0")])
}

/// The modules disk: virtio-blk, not a target on the SCSI controller, so
/// it needs no controller (`disk_hotplug = false` keeps it), can never take
/// a target a hot-plugged rootfs disk wants, and is found by its serial.
/// Read-only twice over: QEMU opens the file `O_RDONLY` (one image, shared
/// by every VM, that a hostile guest must not change) and the guest sees a
/// write-protected device.
fn modules_disk_args(spec: &Spec<'_>) -> Vec<String> {
    let Some(image) = spec.modules else {
        return Vec::new();
    };
    let device = if spec.machine == MachineType::Microvm {
        "virtio-blk-device"
    } else {
        "virtio-blk-pci"
    };
    strings(&[
        "-drive",
        &format!(
            "if=none,id=modules,file={},format=raw,readonly=on",
            escape(image)
        ),
        "-device",
        &format!(
            "{device},id=modules0,drive=modules,serial={}",
            crate::MODULES_DISK_SERIAL
        ),
    ])
}

fn nic_args(spec: &Spec<'_>) -> Vec<String> {
    let device = if spec.machine == MachineType::Microvm {
        "virtio-net-device"
    } else {
        "virtio-net-pci"
    };
    spec.nics
        .iter()
        .enumerate()
        .flat_map(|(i, nic)| {
            let mut dev = format!("{device},id=nic{i},netdev=net{i},mac={}", nic.mac);
            if nic.mtu > 0 {
                dev.push_str(&format!(",host_mtu={}", nic.mtu));
            }
            [
                "-netdev".to_string(),
                format!("tap,id=net{i},fd={}", nic.fd),
                "-device".to_string(),
                dev,
            ]
        })
        .collect()
}

/// The whole argument list (without the program).
pub fn build(spec: &Spec<'_>) -> Vec<String> {
    [
        base_args,
        machine_args,
        memory_args,
        kernel_args,
        console_args,
        fw_cfg_args,
        qmp_args,
        vsock_args,
        shared_fs_args,
        nic_args,
        disk_controller_args,
        modules_disk_args,
        hotplug_args,
    ]
    .iter()
    .flat_map(|piece| piece(spec))
    .collect()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// QEMU option values separate keys with ','; a literal comma is doubled.
fn escape(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(paths: &'a RunPaths, machine: MachineType, accel: Resolved) -> Spec<'a> {
        Spec {
            id: "s1",
            machine,
            accel,
            vcpus: 2,
            memory_mib: 256,
            max_vcpus: 2,
            hotplug_memory_mib: 0,
            free_page_reporting: false,
            mem_merge: false,
            tb_size_mib: 32,
            kernel: Path::new("/g/vmlinux"),
            initrd: Path::new("/g/initramfs.cpio"),
            extra_kernel_params: " loglevel=7 ",
            tsc_khz: Some(2_100_000),
            paths,
            vsock: VsockDevice::VhostUser {
                socket: paths.vhost_vsock.clone(),
            },
            shared: None,
            nics: Vec::new(),
            hotplug_slots: 2,
            disk_controller: true,
            modules: None,
            agent_secret_fd: Some(9),
            template: None,
        }
    }

    fn has_pair(args: &[String], flag: &str, value: &str) -> bool {
        args.windows(2).any(|w| w[0] == flag && w[1] == value)
    }

    #[test]
    fn the_agent_secret_is_named_by_descriptor_only() {
        let paths = RunPaths::new(Path::new("/r"));
        for machine in [MachineType::Q35, MachineType::Microvm] {
            let args = build(&spec(&paths, machine, Resolved::Tcg));
            assert!(has_pair(
                &args,
                "-fw_cfg",
                "name=opt/io.virtcontainers/agent-secret,file=/proc/self/fd/9"
            ));
        }
        let mut none = spec(&paths, MachineType::Q35, Resolved::Tcg);
        none.agent_secret_fd = None;
        assert!(!build(&none).iter().any(|a| a == "-fw_cfg"));
    }

    #[test]
    fn q35_tcg_hybrid_vsock() {
        let paths = RunPaths::new(Path::new("/run/vc/s1"));
        let args = build(&spec(&paths, MachineType::Q35, Resolved::Tcg));
        assert!(has_pair(&args, "-accel", "tcg,tb-size=32"));
        assert!(has_pair(&args, "-cpu", "max"));
        assert!(has_pair(&args, "-smp", "2"));
        assert!(has_pair(&args, "-m", "256M"));
        assert!(has_pair(
            &args,
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on"
        ));
        assert!(args
            .iter()
            .any(|a| a.starts_with("q35,") && a.contains(",memory-backend=mem,")));
        assert!(has_pair(&args, "-kernel", "/g/vmlinux"));
        assert!(has_pair(&args, "-initrd", "/g/initramfs.cpio"));
        assert!(has_pair(
            &args,
            "-chardev",
            "socket,id=vsock,path=/run/vc/s1/vhost-vsock.sock"
        ));
        assert!(has_pair(
            &args,
            "-device",
            "vhost-user-vsock-pci,id=vsock0,chardev=vsock"
        ));
        assert!(has_pair(
            &args,
            "-qmp",
            "unix:/run/vc/s1/qmp.sock,server=on,wait=off"
        ));
        assert!(has_pair(
            &args,
            "-qmp",
            "unix:/run/vc/s1/qmp-extra.sock,server=on,wait=off"
        ));
        assert!(has_pair(
            &args,
            "-chardev",
            "file,id=console,path=/run/vc/s1/console.log,append=on"
        ));
        assert!(args.contains(&"-no-reboot".to_string()));
        assert!(args.contains(&"-nodefaults".to_string()));
    }

    #[test]
    fn hotplug_adds_cpu_room_a_virtio_mem_device_and_a_balloon() {
        let paths = RunPaths::new(Path::new("/run/vc/s1"));
        let mut spec = spec(&paths, MachineType::Q35, Resolved::Tcg);
        spec.vcpus = 1;
        spec.max_vcpus = 4;
        spec.hotplug_memory_mib = 3840;
        spec.free_page_reporting = true;
        let args = build(&spec);
        assert!(has_pair(&args, "-smp", "1,maxcpus=4"));
        assert!(has_pair(&args, "-accel", "tcg,tb-size=32,thread=single"));
        assert!(has_pair(&args, "-m", "256M,maxmem=4096M"));
        assert!(has_pair(
            &args,
            "-object",
            "memory-backend-memfd,id=hpmem,size=3840M,share=on"
        ));
        assert!(has_pair(
            &args,
            "-device",
            "virtio-mem-pci,id=vmem0,memdev=hpmem,requested-size=0,bus=pcie.0"
        ));
        assert!(has_pair(
            &args,
            "-device",
            "virtio-balloon-pci,id=balloon0,free-page-reporting=on"
        ));
        let cmdline = kernel_cmdline(&spec);
        assert!(
            cmdline
                .contains("memhp_default_state=online memory_hotplug.online_policy=auto-movable"),
            "{cmdline}"
        );
        // KVM keeps a thread per vCPU.
        let kvm = build(&Spec {
            accel: Resolved::Kvm,
            ..spec.clone()
        });
        assert!(has_pair(&kvm, "-accel", "kvm"));
        // microvm has neither (no ACPI CPU hot-plug, no PCI for virtio-mem).
        let micro = build(&Spec {
            machine: MachineType::Microvm,
            ..spec
        });
        assert!(has_pair(&micro, "-smp", "1"));
        assert!(has_pair(&micro, "-m", "256M"));
        assert!(!micro.iter().any(|a| a.contains("virtio-mem")));
        assert!(has_pair(&micro, "-accel", "tcg,tb-size=32"));
        assert!(has_pair(
            &micro,
            "-device",
            "virtio-balloon-device,id=balloon0,free-page-reporting=on"
        ));
    }

    #[test]
    fn disks_have_one_scsi_controller_when_asked() {
        let paths = RunPaths::new(Path::new("/r"));
        let mut s = spec(&paths, MachineType::Q35, Resolved::Tcg);
        assert!(has_pair(&build(&s), "-device", "virtio-scsi-pci,id=scsi0"));
        s.machine = MachineType::Microvm;
        assert!(has_pair(
            &build(&s),
            "-device",
            "virtio-scsi-device,id=scsi0"
        ));
        s.disk_controller = false;
        assert!(!build(&s).iter().any(|a| a.contains("scsi")));
    }

    #[test]
    fn the_modules_disk_is_read_only_virtio_blk_on_either_machine() {
        let paths = RunPaths::new(Path::new("/r"));
        let mut s = spec(&paths, MachineType::Q35, Resolved::Tcg);
        assert!(!build(&s).iter().any(|a| a.contains("modules")));
        s.modules = Some(Path::new("/g/a,b/modules.img"));
        let args = build(&s);
        assert!(has_pair(
            &args,
            "-drive",
            "if=none,id=modules,file=/g/a,,b/modules.img,format=raw,readonly=on"
        ));
        assert!(has_pair(
            &args,
            "-device",
            "virtio-blk-pci,id=modules0,drive=modules,serial=vc-modules"
        ));
        s.machine = MachineType::Microvm;
        s.disk_controller = false;
        let args = build(&s);
        assert!(has_pair(
            &args,
            "-device",
            "virtio-blk-device,id=modules0,drive=modules,serial=vc-modules"
        ));
        assert!(!args.iter().any(|a| a.contains("scsi")));
    }

    #[test]
    fn a_template_and_its_clones_differ_only_in_how_ram_is_mapped_and_where_state_comes_from() {
        let paths = RunPaths::new(Path::new("/r"));
        let mut s = spec(&paths, MachineType::Q35, Resolved::Tcg);
        s.hotplug_memory_mib = 1024;
        s.free_page_reporting = true;
        s.vsock = VsockDevice::Serial {
            socket: paths.agent_serial.clone(),
        };
        assert!(
            build(&s).iter().any(|a| a.starts_with("virtio-balloon")),
            "a booted VM reports free pages"
        );
        let source = crate::TemplateRole::Source {
            memory: "/t,1/memory".into(),
        };
        s.template = Some(&source);
        let template = build(&s);
        assert!(has_pair(
            &template,
            "-object",
            "memory-backend-file,id=mem,size=256M,mem-path=/t,,1/memory,share=on"
        ));
        assert!(!template.contains(&"-incoming".to_string()));
        let clone = crate::TemplateRole::Clone {
            memory: "/t,1/memory".into(),
            state: "/t/state".into(),
        };
        s.template = Some(&clone);
        let cloned = build(&s);
        assert!(has_pair(
            &cloned,
            "-object",
            "memory-backend-file,id=mem,size=256M,mem-path=/t,,1/memory,share=off"
        ));
        assert!(has_pair(&cloned, "-incoming", "defer"));
        // Hot-plugged memory stays each VM's own.
        assert!(has_pair(
            &cloned,
            "-object",
            "memory-backend-ram,id=hpmem,size=1024M"
        ));
        // Everything else is the same device for device: that is what
        // lets the saved state load.
        let strip = |args: &[String]| -> Vec<String> {
            args.iter()
                .filter(|a| {
                    !a.starts_with("memory-backend-file") && *a != "-incoming" && *a != "defer"
                })
                .cloned()
                .collect()
        };
        assert_eq!(strip(&template), strip(&cloned));
        // No balloon: a discard would punch the template's file.
        assert!(!cloned.iter().any(|a| a.contains("balloon")), "{cloned:?}");
        // Both tell the agent it is (or resumes) a template.
        assert!(template
            .iter()
            .any(|a| a.split(' ').any(|p| p == "vc.template")));
        s.template = None;
        assert!(!kernel_cmdline(&s).contains("vc.template"));
    }

    #[test]
    fn the_serial_channel_is_a_port_qemu_serves_and_memory_is_private() {
        let paths = RunPaths::new(Path::new("/r"));
        let mut s = spec(&paths, MachineType::Q35, Resolved::Tcg);
        s.hotplug_memory_mib = 1024;
        s.vsock = VsockDevice::Serial {
            socket: paths.agent_serial.clone(),
        };
        let args = build(&s);
        assert!(has_pair(
            &args,
            "-device",
            "virtio-serial-pci,id=serial0,max_ports=2"
        ));
        assert!(has_pair(
            &args,
            "-chardev",
            "socket,id=agent,path=/r/agent.sock,server=on,wait=off"
        ));
        assert!(has_pair(
            &args,
            "-device",
            "virtserialport,bus=serial0.0,chardev=agent,name=io.virtcontainers.agent"
        ));
        assert!(kernel_cmdline(&s)
            .split(' ')
            .any(|p| p == "vc.channel=serial"));
        assert!(!args.iter().any(|a| a.contains("vsock")));
        // Nobody else maps guest memory: private RAM, no memfd.
        assert!(has_pair(
            &args,
            "-object",
            "memory-backend-ram,id=mem,size=256M"
        ));
        assert!(has_pair(
            &args,
            "-object",
            "memory-backend-ram,id=hpmem,size=1024M"
        ));
        assert!(!args
            .iter()
            .any(|a| a.contains("memfd") || a.contains("share=on")));
        // virtio-fs maps it again.
        s.shared = Some(SharedDevice::VhostUserFs {
            socket: paths.virtiofsd.clone(),
            tag: "t".into(),
        });
        assert!(has_pair(
            &build(&s),
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on"
        ));
        s.shared = Some(SharedDevice::NineP {
            path: "/r/shared".into(),
            tag: "t".into(),
        });
        assert!(has_pair(
            &build(&s),
            "-object",
            "memory-backend-ram,id=mem,size=256M"
        ));
        s.machine = MachineType::Microvm;
        assert!(has_pair(
            &build(&s),
            "-device",
            "virtio-serial-device,id=serial0,max_ports=2"
        ));
    }

    #[test]
    fn vsock_vms_do_not_get_the_serial_parameter() {
        let paths = RunPaths::new(Path::new("/r"));
        let s = spec(&paths, MachineType::Q35, Resolved::Tcg);
        assert!(!kernel_cmdline(&s).contains("vc.channel"));
        assert!(!build(&s).iter().any(|a| a.contains("virtserialport")));
    }

    #[test]
    fn kvm_uses_host_cpu_and_no_tb_size() {
        let paths = RunPaths::new(Path::new("/r"));
        let args = build(&spec(&paths, MachineType::Q35, Resolved::Kvm));
        assert!(has_pair(&args, "-accel", "kvm"));
        assert!(has_pair(&args, "-cpu", "host"));
    }

    #[test]
    fn ksm_may_merge_guest_ram_only_when_asked() {
        let paths = RunPaths::new(Path::new("/r"));
        for machine in [MachineType::Q35, MachineType::Microvm] {
            let mut s = spec(&paths, machine, Resolved::Tcg);
            let machine_arg = |args: &[String]| {
                let i = args.iter().position(|a| a == "-machine").expect("-machine");
                args[i + 1].clone()
            };
            assert!(machine_arg(&build(&s)).ends_with(",mem-merge=off"));
            s.mem_merge = true;
            assert!(machine_arg(&build(&s)).ends_with(",mem-merge=on"));
        }
    }

    #[test]
    fn microvm_uses_mmio_devices_and_a_fixed_tsc() {
        let paths = RunPaths::new(Path::new("/r"));
        let mut s = spec(&paths, MachineType::Microvm, Resolved::Tcg);
        s.vsock = VsockDevice::Kernel { cid: 7 };
        let args = build(&s);
        assert!(has_pair(
            &args,
            "-device",
            "vhost-vsock-device,id=vsock0,guest-cid=7"
        ));
        assert!(has_pair(&args, "-global", "virtio-mmio.force-legacy=false"));
        let cmdline = kernel_cmdline(&s);
        assert!(cmdline.contains("tsc=reliable"));
        assert!(cmdline.contains("tsc_early_khz=2100000"));
    }

    #[test]
    fn cmdline_has_console_panic_and_extra_params_last() {
        let paths = RunPaths::new(Path::new("/r"));
        let cmdline = kernel_cmdline(&spec(&paths, MachineType::Q35, Resolved::Tcg));
        assert!(cmdline.starts_with("console=ttyS0 quiet panic=1"));
        assert!(cmdline.ends_with(" loglevel=7"));
        assert!(!cmdline.contains("tsc_early_khz"));
    }

    #[test]
    fn nics_are_taps_by_descriptor_with_mac_and_mtu() {
        let paths = RunPaths::new(Path::new("/r"));
        let mut s = spec(&paths, MachineType::Q35, Resolved::Tcg);
        assert!(!build(&s).iter().any(|a| a == "-netdev"));
        s.nics = vec![
            NicArg {
                fd: 3,
                mac: "0a:58:0a:58:00:05".into(),
                mtu: 1450,
            },
            NicArg {
                fd: 4,
                mac: "0a:58:0a:58:00:06".into(),
                mtu: 0,
            },
        ];
        let args = build(&s);
        assert!(has_pair(&args, "-netdev", "tap,id=net0,fd=3"));
        assert!(has_pair(
            &args,
            "-device",
            "virtio-net-pci,id=nic0,netdev=net0,mac=0a:58:0a:58:00:05,host_mtu=1450"
        ));
        assert!(has_pair(&args, "-netdev", "tap,id=net1,fd=4"));
        assert!(has_pair(
            &args,
            "-device",
            "virtio-net-pci,id=nic1,netdev=net1,mac=0a:58:0a:58:00:06"
        ));
        assert!(has_pair(
            &args,
            "-device",
            "pcie-root-port,id=hp1,bus=pcie.0,chassis=2,slot=2"
        ));
        assert!(kernel_cmdline(&s).contains("pci=lastbus=2"));
        s.machine = MachineType::Microvm;
        assert!(build(&s)
            .iter()
            .any(|a| a.starts_with("virtio-net-device,id=nic0,")));
        assert!(!build(&s).iter().any(|a| a.starts_with("pcie-root-port")));
    }

    #[test]
    fn shared_dir_devices() {
        let paths = RunPaths::new(Path::new("/r"));
        let mut s = spec(&paths, MachineType::Q35, Resolved::Tcg);
        assert!(!build(&s).iter().any(|a| a.contains("sharedfs")));
        s.shared = Some(SharedDevice::VhostUserFs {
            socket: paths.virtiofsd.clone(),
            tag: "vcshared".into(),
        });
        let args = build(&s);
        assert!(has_pair(
            &args,
            "-chardev",
            "socket,id=sharedfs,path=/r/virtiofsd.sock"
        ));
        assert!(has_pair(
            &args,
            "-device",
            "vhost-user-fs-pci,id=sharedfs0,chardev=sharedfs,tag=vcshared,queue-size=1024"
        ));
        s.shared = Some(SharedDevice::NineP {
            path: "/s".into(),
            tag: "vcshared".into(),
        });
        s.machine = MachineType::Microvm;
        let args = build(&s);
        assert!(has_pair(
            &args,
            "-fsdev",
            "local,id=shared9p,path=/s,security_model=none"
        ));
        assert!(has_pair(
            &args,
            "-device",
            "virtio-9p-device,id=shared9p0,fsdev=shared9p,mount_tag=vcshared"
        ));
    }

    #[test]
    fn a_comma_in_the_id_cannot_add_options() {
        let paths = RunPaths::new(Path::new("/r"));
        let mut s = spec(&paths, MachineType::Q35, Resolved::Tcg);
        s.id = "x,debug-threads=off";
        assert!(has_pair(
            &build(&s),
            "-name",
            "vc-x,,debug-threads=off,debug-threads=on"
        ));
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let paths = RunPaths::new(Path::new("/run/a,b"));
        let args = build(&spec(&paths, MachineType::Q35, Resolved::Tcg));
        assert!(has_pair(
            &args,
            "-qmp",
            "unix:/run/a,,b/qmp.sock,server=on,wait=off"
        ));
    }
}
