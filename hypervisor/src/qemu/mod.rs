//! QEMU: the command line from [`cmdline`], control over [`qmp`], the
//! accelerator from [`accel`], and the userspace vsock device as a helper.

pub mod accel;
pub mod cmdline;
pub mod qmp;
mod resize;

use std::{
    path::Path,
    sync::{Mutex, MutexGuard, OnceLock},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use serde_json::Value;

use self::{
    accel::{HostFacts, Resolved},
    cmdline::{NicArg, RunPaths, SharedDevice, Spec, VsockDevice},
    qmp::QmpSession,
};
use crate::{
    process::{self, ProcessRef},
    Disk, DiskAddress, HypervisorConfig, HypervisorError, Nic, Result, SharedDir, SharedFs,
    TemplateRole, VmConfig, VmState, VmStatus, VsockBackend, VsockChannel,
};

/// The `hypervisor` value in persisted state.
pub const NAME: &str = "qemu";

/// The name QEMU knows a migration's descriptor by (QMP `getfd`).
const MIGRATION_FD_NAME: &str = "vc-migration";
/// How long saving or loading a template's device state may take (it is
/// well under a megabyte: RAM is not in it).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);

/// How long QEMU may take to open its QMP socket.
const QMP_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the vsock device may take to create its control socket.
const HELPER_READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest may take to release a hot-unplugged NIC.
const NIC_RELEASE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long QEMU may take to detach a SCSI disk (it does so at once).
const DISK_RELEASE_TIMEOUT: Duration = Duration::from_secs(10);
/// SCSI targets of the virtio-scsi controller (its `max_target` is 255).
const SCSI_TARGETS: u32 = 256;
/// The descriptor number QEMU sees its first tap at (after stdio).
const FIRST_NIC_FD: i32 = 3;
/// The descriptor on which QEMU reads the agent's secret (above any NIC's).
const AGENT_SECRET_FD: i32 = 200;
/// Guest memory below this cannot hold the kernel and agent.
const MIN_MEMORY_MIB: u32 = 64;
/// Console lines quoted in errors.
const TAIL_LINES: usize = 15;

#[derive(Debug)]
pub struct Qemu {
    config: HypervisorConfig,
    paths: RunPaths,
    /// The directory to share, for boot only (a restored VM has it already).
    shared: Option<SharedDir>,
    /// Network interfaces, for boot only.
    nics: Vec<Nic>,
    /// A template's source or clone, for boot only.
    template: Option<TemplateRole>,
    /// The nice value QEMU and its helpers start at, for boot only.
    nice: i32,
    state: Mutex<VmState>,
    /// Serialises disk attach and detach.
    disk_lock: tokio::sync::Mutex<()>,
    /// Serialises resizes.
    resize_lock: tokio::sync::Mutex<()>,
}

/// Host facts are probed once per process.
fn host_facts() -> &'static HostFacts {
    static FACTS: OnceLock<HostFacts> = OnceLock::new();
    FACTS.get_or_init(HostFacts::probe)
}

impl Qemu {
    /// Validates the request; nothing is started.
    pub fn new(config: &HypervisorConfig, vm: VmConfig) -> Result<Self> {
        validate(config, &vm)?;
        let accel = accel::resolve(config.accel, host_facts())?;
        let paths = RunPaths::new(&vm.run_dir);
        let hotplug = config.machine == crate::MachineType::Q35 && config.resource_hotplug;
        let shared = vm.shared.clone();
        let nics = vm.nics.clone();
        let template = vm.template.clone();
        let nice = vm.nice;
        let state = VmState {
            hypervisor: NAME.into(),
            id: vm.id,
            run_dir: vm.run_dir,
            accel: accel.as_str().into(),
            machine: config.machine.as_str().into(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            boot_vcpus: vm.vcpus,
            boot_memory_mib: vm.memory_mib,
            hotplug_memory_mib: if hotplug {
                resize::device_mib(vm.memory_mib, config.max_memory_mib)
            } else {
                0
            },
            vmm: None,
            helpers: Vec::new(),
            vsock: None,
            hotplugged_nics: Vec::new(),
            hotplugged_disks: Vec::new(),
            agent_secret: vm.agent_secret,
        };
        Ok(Self {
            config: config.clone(),
            paths,
            shared,
            nics,
            template,
            nice,
            state: Mutex::new(state),
            disk_lock: tokio::sync::Mutex::new(()),
            resize_lock: tokio::sync::Mutex::new(()),
        })
    }

    pub fn restore(config: &HypervisorConfig, state: VmState) -> Self {
        Self {
            config: config.clone(),
            paths: RunPaths::new(&state.run_dir),
            shared: None,
            nics: Vec::new(),
            template: None,
            nice: 0,
            state: Mutex::new(state),
            disk_lock: tokio::sync::Mutex::new(()),
            resize_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Gives a process just spawned (still in its start-up, before it made
    /// its worker and vCPU threads, which inherit it) the VM's nice value.
    fn renice(&self, process: &ProcessRef) {
        if self.nice != 0 {
            if let Ok(pid) = u32::try_from(process.pid) {
                process::set_nice(&[pid], self.nice);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, VmState> {
        // A poisoned lock only means another thread panicked mid-update of
        // plain data; the data is still the best we have.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn accel(&self) -> Resolved {
        if self.lock().accel == "kvm" {
            Resolved::Kvm
        } else {
            Resolved::Tcg
        }
    }

    /// Why the VMM is gone: the tails of its log and of the guest console.
    fn exit_reason(&self, pid: Option<i32>) -> String {
        let mut reason = match pid {
            Some(pid) => format!("QEMU (pid {pid}) exited"),
            None => "QEMU is not running".to_string(),
        };
        let log = process::tail(&self.paths.log, 3);
        if !log.is_empty() {
            reason.push_str(&format!("; qemu.log: {}", log.replace('\n', " | ")));
        }
        let console = crate::Hypervisor::console_tail(self, TAIL_LINES);
        if !console.is_empty() {
            reason.push_str(&format!("; last console lines:\n{console}"));
        }
        reason
    }

    async fn qmp(&self, command: &str, args: Option<Value>) -> Result<Value> {
        self.session().await?.execute(command, args).await
    }

    /// The QMP session of the running VMM (NotRunning when it is gone):
    /// the process's one session for this VM ([`qmp::session_for`]).
    async fn session(&self) -> Result<QmpSession> {
        let vmm = self.lock().vmm;
        match vmm {
            Some(p) if p.is_alive() => {}
            other => {
                return Err(HypervisorError::NotRunning {
                    reason: self.exit_reason(other.map(|p| p.pid)),
                })
            }
        }
        qmp::session_for(&self.paths.qmp).await
    }

    /// Starts a vhost-user helper (`name`, from `program`) and waits until it
    /// has created its control `socket`.
    async fn start_helper(
        &self,
        name: &str,
        program: &Path,
        args: &[String],
        socket: &Path,
        log: &Path,
    ) -> Result<ProcessRef> {
        if !program.exists() {
            return Err(HypervisorError::MissingFile {
                what: "helper binary",
                path: program.to_path_buf(),
            });
        }
        let helper = process::spawn_detached(program, args, log)?;
        self.renice(&helper);
        let deadline = Instant::now() + HELPER_READY_TIMEOUT;
        while !socket.exists() {
            if !helper.is_alive() {
                return Err(HypervisorError::StartupFailed {
                    program: name.into(),
                    detail: process::tail(log, 5),
                });
            }
            if Instant::now() >= deadline {
                helper.kill().await?;
                return Err(HypervisorError::StartupTimeout {
                    program: name.into(),
                    secs: HELPER_READY_TIMEOUT.as_secs(),
                    detail: process::tail(log, 5),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(helper)
    }

    /// The userspace vsock device (hybrid vsock).
    async fn start_vsock_helper(&self) -> Result<ProcessRef> {
        let args = [
            "--guest-cid",
            "3",
            "--socket",
            &self.paths.vhost_vsock.display().to_string(),
            "--uds-path",
            &self.paths.vsock_uds.display().to_string(),
        ]
        .map(String::from);
        self.start_helper(
            "vhost-device-vsock",
            &self.config.vhost_device_vsock_path,
            &args,
            &self.paths.vhost_vsock,
            &self.paths.vsock_log,
        )
        .await
    }

    /// The shared directory's device: virtiofsd for virtio-fs (a helper),
    /// nothing to start for 9p (QEMU serves it itself).
    async fn start_shared_fs(&self) -> Result<Option<SharedDevice>> {
        let Some(shared) = self.shared.clone() else {
            return Ok(None);
        };
        match self.config.shared_fs {
            SharedFs::None => Ok(None),
            SharedFs::Virtio9p => Ok(Some(SharedDevice::NineP {
                path: shared.host_path,
                tag: shared.tag,
            })),
            SharedFs::VirtioFs => {
                let args = [
                    format!("--socket-path={}", self.paths.virtiofsd.display()),
                    "-o".into(),
                    format!("source={}", shared.host_path.display()),
                    // The guest keeps a file's pages across opens
                    // (cache=auto dropped them on every open: each exec of
                    // busybox re-read it and evicted the pages every running
                    // shell mapped, ~0.3 s an exec under TCG) and revalidates
                    // attributes and names after 1 s as cache=auto does; a
                    // changed mtime or size then drops the stale pages
                    // (FUSE's auto_inval_data), so volumes the host updates
                    // are seen as before.
                    "-o".into(),
                    "cache=always,timeout=1".into(),
                    "-o".into(),
                    "sandbox=chroot".into(),
                    "-o".into(),
                    "xattr".into(),
                ];
                let helper = self
                    .start_helper(
                        "virtiofsd",
                        &self.config.virtiofsd_path,
                        &args,
                        &self.paths.virtiofsd,
                        &self.paths.virtiofsd_log,
                    )
                    .await?;
                self.lock().helpers.push(helper);
                Ok(Some(SharedDevice::VhostUserFs {
                    socket: self.paths.virtiofsd.clone(),
                    tag: shared.tag,
                }))
            }
        }
    }

    /// Starts QEMU and waits until QMP answers.
    async fn start_vmm(
        &self,
        vsock: VsockDevice,
        shared: Option<SharedDevice>,
    ) -> Result<ProcessRef> {
        let state = self.lock().clone();
        let modules = Some(self.config.modules.as_path()).filter(|p| !p.as_os_str().is_empty());
        if modules.is_none() {
            tracing::info!(id = %state.id, "no modules disk (hypervisor.modules is empty and no modules.img is next to the kernel): the guest has no modprobe");
        }
        let spec = Spec {
            id: &state.id,
            machine: self.config.machine,
            accel: self.accel(),
            vcpus: state.vcpus,
            memory_mib: state.memory_mib,
            max_vcpus: if self.config.resource_hotplug {
                self.config.max_vcpus().max(state.vcpus)
            } else {
                state.vcpus
            },
            hotplug_memory_mib: state.hotplug_memory_mib,
            free_page_reporting: self.config.free_page_reporting,
            mem_merge: self.config.mem_merge,
            tb_size_mib: self.config.tcg_tb_size_mib,
            kernel: &self.config.kernel,
            initrd: &self.config.initrd,
            extra_kernel_params: &self.config.kernel_params,
            tsc_khz: host_tsc_khz(),
            paths: &self.paths,
            vsock,
            shared,
            hotplug_slots: self.config.hotplug_slots,
            disk_controller: self.config.disk_hotplug,
            modules,
            agent_secret_fd: state.agent_secret.as_ref().map(|_| AGENT_SECRET_FD),
            template: self.template.as_ref(),
            nics: self
                .nics
                .iter()
                .enumerate()
                .map(|(i, nic)| NicArg {
                    fd: FIRST_NIC_FD + i as i32,
                    mac: nic.mac.clone(),
                    mtu: nic.mtu,
                })
                .collect(),
        };
        let args = cmdline::build(&spec);
        // QEMU gets each tap as fd FIRST_NIC_FD + i.
        let fds = self
            .nics
            .iter()
            .enumerate()
            .map(|(index, nic)| {
                nic.tap
                    .try_clone()
                    .map(|fd| (fd, FIRST_NIC_FD + index as i32))
                    .map_err(|source| HypervisorError::TapFd { index, source })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut fds = fds;
        if let Some(secret) = &state.agent_secret {
            fds.push((secret_pipe(secret)?, AGENT_SECRET_FD));
        }
        tracing::debug!(id = %state.id, args = ?args, "starting QEMU");
        let vmm =
            process::spawn_detached_with_fds(&self.config.qemu_path, &args, &self.paths.log, fds)?;
        self.renice(&vmm);
        let deadline = Instant::now() + QMP_READY_TIMEOUT;
        loop {
            if !vmm.is_alive() {
                return Err(HypervisorError::StartupFailed {
                    program: "QEMU".into(),
                    detail: self.exit_reason(Some(vmm.pid)),
                });
            }
            if self.paths.qmp.exists() {
                // The session made here is kept: every later command and
                // event of this VM rides it.
                if let Ok(qmp) = qmp::session_for(&self.paths.qmp).await {
                    if qmp.execute("query-status", None).await.is_ok() {
                        // Every chardev socket is bound before QMP answers.
                        if let Err(e) = self.paths.restrict_sockets() {
                            vmm.kill().await?;
                            return Err(e);
                        }
                        return Ok(vmm);
                    }
                }
            }
            if Instant::now() >= deadline {
                vmm.kill().await?;
                return Err(HypervisorError::StartupTimeout {
                    program: "QEMU".into(),
                    secs: QMP_READY_TIMEOUT.as_secs(),
                    detail: self.exit_reason(Some(vmm.pid)),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn boot_inner(&self) -> Result<()> {
        let backend = match self.config.vsock {
            VsockBackend::Auto if Path::new("/dev/vhost-vsock").exists() => VsockBackend::Vhost,
            VsockBackend::Auto => VsockBackend::Hybrid,
            other => other,
        };
        let (device, channel) = match backend {
            VsockBackend::Serial => (
                VsockDevice::Serial {
                    socket: self.paths.agent_serial.clone(),
                },
                VsockChannel::Serial {
                    uds: self.paths.agent_serial.clone(),
                },
            ),
            VsockBackend::Vhost => {
                let cid = guest_cid(&self.lock().id);
                (VsockDevice::Kernel { cid }, VsockChannel::Kernel { cid })
            }
            _ => {
                let helper = self.start_vsock_helper().await?;
                self.lock().helpers.push(helper);
                (
                    VsockDevice::VhostUser {
                        socket: self.paths.vhost_vsock.clone(),
                    },
                    VsockChannel::Hybrid {
                        uds: self.paths.vsock_uds.clone(),
                    },
                )
            }
        };
        let shared = self.start_shared_fs().await?;
        let vmm = self.start_vmm(device, shared).await?;
        {
            let mut state = self.lock();
            state.vmm = Some(vmm);
            state.vsock = Some(channel);
        }
        if let Some(TemplateRole::Clone { state, .. }) = &self.template {
            self.load_template(state).await?;
        }
        Ok(())
    }

    /// A clone's start: the template's device state in (its RAM is the
    /// mapped memory file already), then the vCPUs run on.
    async fn load_template(&self, state: &Path) -> Result<()> {
        let file = std::fs::File::open(state).map_err(|source| HypervisorError::Io {
            action: "open the template's device state",
            path: state.to_path_buf(),
            source,
        })?;
        let qmp = self.session().await?;
        ignore_shared_memory(&qmp).await?;
        qmp.send_fd(MIGRATION_FD_NAME, std::os::fd::AsFd::as_fd(&file))
            .await?;
        qmp.execute(
            "migrate-incoming",
            Some(serde_json::json!({ "uri": format!("fd:{MIGRATION_FD_NAME}") })),
        )
        .await?;
        wait_migration(&qmp, "loading the template's device state").await?;
        qmp.execute("cont", None).await.map(drop)
    }

    async fn stop_helpers(&self) -> Result<()> {
        let helpers = self.lock().helpers.clone();
        for helper in helpers {
            helper.terminate(Duration::from_secs(1)).await?;
        }
        Ok(())
    }
}

/// The read end of a pipe that holds `secret` and has no writer left:
/// QEMU reads it to its end once, at start-up. Nothing touches the disk.
fn secret_pipe(secret: &str) -> Result<std::os::fd::OwnedFd> {
    let failed = |e: nix::Error| HypervisorError::Io {
        action: "pass the agent secret through a pipe",
        path: "pipe".into(),
        source: std::io::Error::from(e),
    };
    let (read, write) = nix::unistd::pipe().map_err(failed)?;
    // 64 bytes: far below a pipe's buffer, so the write never blocks.
    let written = nix::unistd::write(&write, secret.as_bytes()).map_err(failed)?;
    if written != secret.len() {
        return Err(failed(nix::Error::EIO));
    }
    Ok(read)
}

/// Leaves RAM in a shared memory file out of the migration stream: a
/// template's RAM is its memory file, which clones map themselves.
async fn ignore_shared_memory(qmp: &QmpSession) -> Result<()> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(serde_json::json!({
            "capabilities": [{ "capability": "x-ignore-shared", "state": true }]
        })),
    )
    .await
    .map(drop)
}

/// Polls `query-migrate` until the migration completed, failed, or took
/// longer than [`MIGRATION_TIMEOUT`].
async fn wait_migration(qmp: &QmpSession, what: &'static str) -> Result<()> {
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let reply = qmp.execute("query-migrate", None).await?;
        match reply.get("status").and_then(Value::as_str) {
            Some("completed") => return Ok(()),
            Some(status @ ("failed" | "cancelled")) => {
                let detail = reply
                    .get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or(status);
                return Err(HypervisorError::Migration {
                    what,
                    detail: detail.to_string(),
                });
            }
            _ if Instant::now() >= deadline => {
                return Err(HypervisorError::Migration {
                    what,
                    detail: format!("not done after {} s", MIGRATION_TIMEOUT.as_secs()),
                })
            }
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Why `vm` cannot be (or start from) a template with `config`, if so.
fn templatable(config: &HypervisorConfig, vm: &VmConfig) -> Result<()> {
    let Some(role) = &vm.template else {
        return Ok(());
    };
    if config.vsock != VsockBackend::Serial {
        return Err(HypervisorError::NotTemplatable {
            why: "the agent must ride virtio-serial (hypervisor.vsock = \"serial\"): a vsock device is vhost-user or kernel vhost, neither saved",
        });
    }
    if vm.shared.is_some() && config.shared_fs == SharedFs::VirtioFs {
        return Err(HypervisorError::NotTemplatable {
            why: "virtiofsd is vhost-user and is not saved: use hypervisor.shared_fs = \"virtio-9p\" (or \"none\" with block rootfs)",
        });
    }
    if let TemplateRole::Clone { memory, state } = role {
        for (what, path) in [
            ("template memory file", memory),
            ("template device state", state),
        ] {
            if !path.is_file() {
                return Err(HypervisorError::MissingFile {
                    what,
                    path: path.clone(),
                });
            }
        }
    }
    Ok(())
}

fn validate(config: &HypervisorConfig, vm: &VmConfig) -> Result<()> {
    templatable(config, vm)?;
    if let Some(secret) = &vm.agent_secret {
        if secret.len() != 64 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(HypervisorError::BadAgentSecret);
        }
    }
    if vm.memory_mib < MIN_MEMORY_MIB {
        return Err(HypervisorError::MemoryTooSmall {
            got: vm.memory_mib,
            min: MIN_MEMORY_MIB,
        });
    }
    if vm.memory_mib > config.max_memory_mib {
        return Err(HypervisorError::MemoryTooLarge {
            got: vm.memory_mib,
            max: config.max_memory_mib,
        });
    }
    for (index, nic) in vm.nics.iter().enumerate() {
        if !crate::valid_mac(&nic.mac) {
            return Err(HypervisorError::BadMac {
                index,
                mac: nic.mac.clone(),
            });
        }
    }
    let max = config.max_vcpus();
    if vm.vcpus == 0 || vm.vcpus > max {
        return Err(HypervisorError::BadVcpus { got: vm.vcpus, max });
    }
    for (what, path) in [
        ("QEMU binary", &config.qemu_path),
        ("guest kernel", &config.kernel),
        ("guest initrd", &config.initrd),
    ] {
        if path.as_os_str().is_empty() || !path.exists() {
            return Err(HypervisorError::MissingFile {
                what,
                path: path.clone(),
            });
        }
    }
    // Optional, but one that is named must be there.
    if !config.modules.as_os_str().is_empty() && !config.modules.is_file() {
        return Err(HypervisorError::MissingFile {
            what: "guest modules image",
            path: config.modules.clone(),
        });
    }
    for socket in RunPaths::new(&vm.run_dir).sockets() {
        if socket.as_os_str().len() > 107 {
            return Err(HypervisorError::SocketPathTooLong {
                path: socket.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// A context ID for kernel vsock derived from the sandbox ID (3 and above;
/// 0–2 are reserved). Collisions make QEMU fail at start with a clear error.
fn guest_cid(id: &str) -> u32 {
    let hash = id.bytes().fold(2166136261u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(16777619)
    });
    3 + hash % (u32::MAX - 4)
}

/// The host's CPU frequency in kHz from /proc/cpuinfo, for microvm guests.
fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

#[async_trait]
impl crate::Hypervisor for Qemu {
    async fn boot(&self) -> Result<()> {
        if let Err(err) = self.boot_inner().await {
            // Roll back whatever started.
            if let Err(cleanup) = self.stop(Duration::from_millis(500)).await {
                tracing::warn!("cleanup after failed boot: {cleanup}");
            }
            return Err(err);
        }
        Ok(())
    }

    async fn pause(&self) -> Result<()> {
        self.qmp("stop", None).await.map(drop)
    }

    async fn save_template(&self, state: &Path) -> Result<()> {
        if !matches!(self.template, Some(TemplateRole::Source { .. })) {
            return Err(HypervisorError::Unsupported {
                what: "saving a VM as a template",
                why: "it was not booted as a template's source (its RAM is not a memory file)",
            });
        }
        let file = {
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(state)
                .map_err(|source| HypervisorError::Io {
                    action: "create the template's device state",
                    path: state.to_path_buf(),
                    source,
                })?
        };
        let qmp = self.session().await?;
        qmp.execute("stop", None).await?;
        ignore_shared_memory(&qmp).await?;
        qmp.send_fd(MIGRATION_FD_NAME, std::os::fd::AsFd::as_fd(&file))
            .await?;
        qmp.execute(
            "migrate",
            Some(serde_json::json!({ "uri": format!("fd:{MIGRATION_FD_NAME}") })),
        )
        .await?;
        wait_migration(&qmp, "saving the template's device state").await?;
        file.sync_all().map_err(|source| HypervisorError::Io {
            action: "sync the template's device state",
            path: state.to_path_buf(),
            source,
        })
    }

    async fn resume(&self) -> Result<()> {
        self.qmp("cont", None).await.map(drop)
    }

    async fn stop(&self, grace: Duration) -> Result<()> {
        let vmm = self.lock().vmm;
        if let Some(vmm) = vmm.filter(ProcessRef::is_alive) {
            // A paused VM quits as well as a running one.
            match self.session().await {
                Ok(qmp) => {
                    if let Err(err) = qmp.execute("quit", None).await {
                        tracing::debug!("QMP quit: {err}");
                    }
                }
                Err(err) => tracing::debug!("QMP for quit: {err}"),
            }
            if !vmm.wait_gone(grace).await {
                tracing::warn!(pid = vmm.pid, "QEMU did not quit in {grace:?}; killing it");
                vmm.kill().await?;
            }
        }
        self.stop_helpers().await
    }

    async fn status(&self) -> Result<VmStatus> {
        let vmm = self.lock().vmm;
        let Some(vmm) = vmm else {
            return Ok(VmStatus::Exited {
                reason: "QEMU was never started".into(),
            });
        };
        if !vmm.is_alive() {
            return Ok(VmStatus::Exited {
                reason: self.exit_reason(Some(vmm.pid)),
            });
        }
        let status = match self.qmp("query-status", None).await {
            Ok(v) => v,
            // It may have exited between the check and the query.
            Err(_) if !vmm.is_alive() => {
                return Ok(VmStatus::Exited {
                    reason: self.exit_reason(Some(vmm.pid)),
                })
            }
            Err(err) => return Err(err),
        };
        Ok(
            match status.get("status").and_then(Value::as_str).unwrap_or("") {
                "paused" | "suspended" => VmStatus::Paused,
                "running" | "prelaunch" | "inmigrate" | "postmigrate" | "finish-migrate"
                | "restore-vm" | "save-vm" => VmStatus::Running,
                other => VmStatus::Exited {
                    reason: format!("QEMU reports the guest as {other}"),
                },
            },
        )
    }

    async fn wait_exit(&self) -> String {
        let vmm = self.lock().vmm;
        if let Some(vmm) = vmm {
            vmm.exited().await;
        }
        self.exit_reason(vmm.map(|p| p.pid))
    }

    fn vsock(&self) -> Option<VsockChannel> {
        self.lock().vsock.clone()
    }

    fn pids(&self) -> Vec<u32> {
        let state = self.lock();
        state
            .vmm
            .iter()
            .chain(state.helpers.iter())
            .filter_map(|p| u32::try_from(p.pid).ok())
            .collect()
    }

    fn state(&self) -> VmState {
        self.lock().clone()
    }

    async fn trim_logs(&self) -> Result<()> {
        let max = u64::from(self.config.console_log_max_kib) * 1024;
        for log in [
            &self.paths.console,
            &self.paths.log,
            &self.paths.virtiofsd_log,
            &self.paths.vsock_log,
        ] {
            if process::rotate_if_over(log, max).map_err(|source| HypervisorError::Io {
                action: "rotate",
                path: log.clone(),
                source,
            })? {
                tracing::debug!(log = %log.display(), "rotated");
            }
        }
        Ok(())
    }

    fn console_tail(&self, lines: usize) -> String {
        process::tail_with(&self.paths.console, lines, Some("Kernel panic"))
    }

    async fn add_nic(&self, nic: &Nic) -> Result<()> {
        if self.config.machine != crate::MachineType::Q35 {
            return Err(HypervisorError::Unsupported {
                what: "adding a NIC",
                why: "only q35 has hot-plug slots",
            });
        }
        if !crate::valid_mac(&nic.mac) {
            return Err(HypervisorError::BadMac {
                index: 0,
                mac: nic.mac.clone(),
            });
        }
        let slots = self.config.hotplug_slots;
        let slot = {
            let state = self.lock();
            (0..slots)
                .find(|s| !state.hotplugged_nics.iter().any(|(used, _)| used == s))
                .ok_or(HypervisorError::NoHotplugSlot { slots })?
        };
        let qmp = self.session().await?;
        let (fdname, netdev, device) = (
            format!("hptap{slot}"),
            format!("hpnet{slot}"),
            format!("hpnic{slot}"),
        );
        qmp.send_fd(&fdname, std::os::fd::AsFd::as_fd(nic.tap.as_ref()))
            .await?;
        let added = async {
            qmp.execute(
                "netdev_add",
                Some(serde_json::json!({ "type": "tap", "id": netdev, "fd": fdname })),
            )
            .await?;
            let mut dev = serde_json::json!({
                "driver": "virtio-net-pci", "id": device, "netdev": netdev,
                "mac": nic.mac, "bus": format!("hp{slot}"),
            });
            if nic.mtu > 0 {
                dev["host_mtu"] = nic.mtu.into();
            }
            if let Err(err) = qmp.execute("device_add", Some(dev)).await {
                let _ = qmp
                    .execute("netdev_del", Some(serde_json::json!({ "id": netdev })))
                    .await;
                return Err(err);
            }
            Ok(())
        }
        .await;
        if let Err(err) = added {
            let _ = qmp
                .execute("closefd", Some(serde_json::json!({ "fdname": fdname })))
                .await;
            return Err(err);
        }
        self.lock()
            .hotplugged_nics
            .push((slot, nic.mac.to_ascii_lowercase()));
        tracing::info!(id = %self.lock().id, slot, mac = %nic.mac, "NIC added");
        Ok(())
    }

    async fn remove_nic(&self, mac: &str) -> Result<()> {
        let slot = self
            .lock()
            .hotplugged_nics
            .iter()
            .find(|(_, m)| m.eq_ignore_ascii_case(mac))
            .map(|(s, _)| *s)
            .ok_or_else(|| HypervisorError::NicNotFound { mac: mac.into() })?;
        let (netdev, device) = (format!("hpnet{slot}"), format!("hpnic{slot}"));
        let qmp = self.session().await?;
        let mark = qmp.mark();
        qmp.execute("device_del", Some(serde_json::json!({ "id": device })))
            .await?;
        // The guest must release the slot (pciehp waits ~5 s after the
        // attention button); only then is the device gone.
        qmp.wait_event("DEVICE_DELETED", mark, NIC_RELEASE_TIMEOUT, |d| {
            d.get("device").and_then(Value::as_str) == Some(device.as_str())
        })
        .await?;
        qmp.execute("netdev_del", Some(serde_json::json!({ "id": netdev })))
            .await?;
        self.lock().hotplugged_nics.retain(|(s, _)| *s != slot);
        tracing::info!(id = %self.lock().id, slot, %mac, "NIC removed");
        Ok(())
    }

    async fn add_disk(&self, disk: &Disk) -> Result<DiskAddress> {
        if !self.config.disk_hotplug {
            return Err(HypervisorError::Unsupported {
                what: "adding a disk",
                why: "the VM was booted without a disk controller (hypervisor.disk_hotplug)",
            });
        }
        if !disk.path.is_absolute() || !disk.path.is_file() {
            return Err(HypervisorError::MissingFile {
                what: "disk image",
                path: disk.path.clone(),
            });
        }
        // One attach at a time per VM: the free-target search and the QMP
        // exchange must not interleave.
        let _attach = self.disk_lock.lock().await;
        let address = {
            let state = self.lock();
            (0..SCSI_TARGETS)
                .map(|target| DiskAddress { target, lun: 0 })
                .find(|a| !state.hotplugged_disks.iter().any(|(used, _)| used == a))
                .ok_or(HypervisorError::NoDiskTarget {
                    targets: SCSI_TARGETS,
                })?
        };
        let (node, device) = disk_names(address);
        let qmp = self.session().await?;
        let mut blockdev = serde_json::json!({
            "driver": disk.format.as_str(),
            "node-name": node,
            "read-only": disk.readonly,
            "discard": "unmap",
            "file": { "driver": "file", "filename": disk.path, "aio": "threads" },
        });
        if disk.readonly {
            blockdev["file"]["read-only"] = true.into();
        }
        qmp.execute("blockdev-add", Some(blockdev)).await?;
        let dev = serde_json::json!({
            "driver": "scsi-hd", "id": device, "drive": node, "bus": "scsi0.0",
            "channel": 0, "scsi-id": address.target, "lun": address.lun,
            "serial": node,
        });
        if let Err(err) = qmp.execute("device_add", Some(dev)).await {
            let _ = qmp
                .execute(
                    "blockdev-del",
                    Some(serde_json::json!({ "node-name": node })),
                )
                .await;
            return Err(err);
        }
        self.lock()
            .hotplugged_disks
            .push((address, disk.path.clone()));
        tracing::info!(id = %self.lock().id, target = address.target, path = %disk.path.display(), "disk added");
        Ok(address)
    }

    async fn resize(&self, size: crate::VmSize) -> Result<crate::VmSize> {
        self.resize_inner(size).await
    }

    async fn remove_disk(&self, address: DiskAddress) -> Result<()> {
        let _attach = self.disk_lock.lock().await;
        if !self
            .lock()
            .hotplugged_disks
            .iter()
            .any(|(a, _)| *a == address)
        {
            return Ok(());
        }
        let vmm = self.lock().vmm;
        if vmm.is_some_and(|p| p.is_alive()) {
            let (node, device) = disk_names(address);
            let qmp = self.session().await?;
            let mark = qmp.mark();
            match qmp
                .execute("device_del", Some(serde_json::json!({ "id": device })))
                .await
            {
                Ok(_) => {
                    qmp.wait_event("DEVICE_DELETED", mark, DISK_RELEASE_TIMEOUT, |d| {
                        d.get("device").and_then(Value::as_str) == Some(device.as_str())
                    })
                    .await?;
                }
                // Gone already (a restart between the two steps).
                Err(HypervisorError::Qmp { detail, .. }) if detail.contains("not found") => {}
                Err(err) => return Err(err),
            }
            match qmp
                .execute(
                    "blockdev-del",
                    Some(serde_json::json!({ "node-name": node })),
                )
                .await
            {
                Ok(_) => {}
                Err(HypervisorError::Qmp { detail, .. })
                    if detail.contains("not found") || detail.contains("Cannot find") => {}
                Err(err) => return Err(err),
            }
        }
        self.lock().hotplugged_disks.retain(|(a, _)| *a != address);
        tracing::info!(id = %self.lock().id, target = address.target, "disk removed");
        Ok(())
    }
}

/// The QMP block node and device names of the disk at `address`.
fn disk_names(address: DiskAddress) -> (String, String) {
    (
        format!("disk{}-{}", address.target, address.lun),
        format!("sdisk{}-{}", address.target, address.lun),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn files(dir: &Path) -> HypervisorConfig {
        let kernel = dir.join("vmlinux");
        let initrd = dir.join("initrd");
        std::fs::write(&kernel, b"k").expect("write");
        std::fs::write(&initrd, b"i").expect("write");
        HypervisorConfig {
            qemu_path: PathBuf::from("/bin/true"),
            kernel,
            initrd,
            max_vcpus: 2,
            accel: crate::Accel::Tcg,
            ..HypervisorConfig::default()
        }
    }

    fn vm(dir: &Path, vcpus: u32, memory_mib: u32) -> VmConfig {
        VmConfig {
            id: "s1".into(),
            vcpus,
            memory_mib,
            run_dir: dir.join("run"),
            shared: None,
            nics: Vec::new(),
            agent_secret: Some("ab".repeat(32)),
            template: None,
            nice: 0,
        }
    }

    #[tokio::test]
    async fn microvm_and_hotplug_off_refuse_to_resize_and_size_no_device() {
        use crate::Hypervisor as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let size = crate::VmSize {
            vcpus: 2,
            memory_mib: 1024,
        };
        let mut cfg = files(dir.path());
        cfg.machine = crate::MachineType::Microvm;
        let q = Qemu::new(&cfg, vm(dir.path(), 1, 256)).expect("new");
        assert_eq!(q.state().hotplug_memory_mib, 0);
        let err = q.resize(size).await.expect_err("microvm");
        assert_eq!(err.kind(), crate::ErrorKind::FailedPrecondition);
        assert!(
            err.to_string()
                .contains("microvm has no CPU or memory hot-plug"),
            "{err}"
        );
        let mut cfg = files(dir.path());
        cfg.resource_hotplug = false;
        let q = Qemu::new(&cfg, vm(dir.path(), 1, 256)).expect("new");
        assert_eq!(q.state().hotplug_memory_mib, 0);
        let err = q.resize(size).await.expect_err("hot-plug off");
        assert!(
            err.to_string()
                .contains("hypervisor.resource_hotplug is off"),
            "{err}"
        );
        // q35 with hot-plug: a device up to max_memory_mib in whole blocks,
        // recorded with the boot size (the floor).
        let q = Qemu::new(&files(dir.path()), vm(dir.path(), 1, 256)).expect("new");
        let state = q.state();
        assert_eq!(state.hotplug_memory_mib, 16384 - 256);
        assert_eq!(
            state.boot_size(),
            crate::VmSize {
                vcpus: 1,
                memory_mib: 256
            }
        );
        // Not running: refused as such, not attempted.
        let err = q.resize(size).await.expect_err("not running");
        assert!(matches!(err, HypervisorError::NotRunning { .. }), "{err}");
    }

    #[test]
    fn validation_names_the_problem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = files(dir.path());
        assert!(validate(&cfg, &vm(dir.path(), 1, 256)).is_ok());
        let err = validate(&cfg, &vm(dir.path(), 1, 0)).expect_err("memory 0");
        assert_eq!(err.to_string(), "memory must be at least 64 MiB, got 0 MiB");
        assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
        let err = validate(&cfg, &vm(dir.path(), 3, 256)).expect_err("too many vcpus");
        assert_eq!(
            err.to_string(),
            "vcpus must be between 1 and 2 (the configured maximum), got 3"
        );
        let err = validate(&cfg, &vm(dir.path(), 0, 256)).expect_err("zero vcpus");
        assert!(matches!(err, HypervisorError::BadVcpus { got: 0, .. }));
        let missing = HypervisorConfig {
            kernel: dir.path().join("nope"),
            ..cfg.clone()
        };
        let err = validate(&missing, &vm(dir.path(), 1, 256)).expect_err("missing kernel");
        assert!(err.to_string().starts_with("guest kernel "), "{err}");
        assert!(err.to_string().ends_with("/nope does not exist"), "{err}");
        assert_eq!(err.kind(), crate::ErrorKind::FailedPrecondition);
        let named_modules = HypervisorConfig {
            modules: dir.path().join("modules.img"),
            ..cfg.clone()
        };
        let err = validate(&named_modules, &vm(dir.path(), 1, 256)).expect_err("missing modules");
        assert!(err.to_string().starts_with("guest modules image "), "{err}");
        std::fs::write(dir.path().join("modules.img"), b"m").expect("write");
        assert!(validate(&named_modules, &vm(dir.path(), 1, 256)).is_ok());
        let mut bad_mac = vm(dir.path(), 1, 256);
        bad_mac.nics.push(crate::Nic {
            tap: std::sync::Arc::new(std::fs::File::open("/dev/null").expect("open").into()),
            mac: "0a:58:0a:58:00:05,romfile=/etc/shadow".into(),
            mtu: 0,
        });
        let err = validate(&cfg, &bad_mac).expect_err("bad mac");
        assert!(err.to_string().starts_with("NIC 0: MAC address"), "{err}");
        assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
        let long = VmConfig {
            run_dir: PathBuf::from(format!("/{}", "x".repeat(100))),
            ..vm(dir.path(), 1, 256)
        };
        assert!(matches!(
            validate(&cfg, &long),
            Err(HypervisorError::SocketPathTooLong { .. })
        ));
        // Templates: only devices QEMU saves, and a clone's files there.
        let clone = TemplateRole::Clone {
            memory: dir.path().join("memory"),
            state: dir.path().join("state"),
        };
        let templated = VmConfig {
            template: Some(clone),
            ..vm(dir.path(), 1, 256)
        };
        let err = validate(&cfg, &templated).expect_err("vsock is not saved");
        assert!(err.to_string().contains("hypervisor.vsock"), "{err}");
        let serial = HypervisorConfig {
            vsock: VsockBackend::Serial,
            ..cfg.clone()
        };
        let err = validate(&serial, &templated).expect_err("no files yet");
        assert!(err.to_string().contains("template memory file"), "{err}");
        std::fs::write(dir.path().join("memory"), b"").expect("memory");
        std::fs::write(dir.path().join("state"), b"").expect("state");
        validate(&serial, &templated).expect("serial, no share, no NIC");
        let shared = VmConfig {
            shared: Some(SharedDir {
                host_path: dir.path().into(),
                tag: "t".into(),
            }),
            ..templated.clone()
        };
        let err = validate(&serial, &shared).expect_err("virtiofsd");
        assert!(err.to_string().contains("virtio-9p"), "{err}");
        let ninep = HypervisorConfig {
            shared_fs: SharedFs::Virtio9p,
            ..serial.clone()
        };
        validate(&ninep, &shared).expect("9p is saved");
        for secret in [
            "ab".repeat(31),
            "zz".repeat(32),
            format!("{}\n", "ab".repeat(32)),
        ] {
            let bad = VmConfig {
                agent_secret: Some(secret),
                ..vm(dir.path(), 1, 256)
            };
            assert!(matches!(
                validate(&cfg, &bad),
                Err(HypervisorError::BadAgentSecret)
            ));
        }
    }

    #[test]
    fn guest_cids_avoid_reserved_values() {
        for id in ["", "a", "s1", "ffffffffffffffffffffffffffffffff"] {
            assert!(guest_cid(id) >= 3);
            assert!(guest_cid(id) < u32::MAX);
        }
        assert_eq!(guest_cid("s1"), guest_cid("s1"));
    }
}
