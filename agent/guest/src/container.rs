//! Containers inside the VM, run by youki's libcontainer from OCI specs.
//!
//! Each container gets a bundle under /run/vc/bundles/<id> (its config.json
//! pointing at the rootfs in the shared filesystem), libcontainer state
//! under /run/vc/containers, and pipes for stdout and stderr that the host
//! drains with ReadStdout / ReadStderr.

use std::{
    collections::HashMap,
    path::{Component, Path, PathBuf},
    sync::{Arc, Mutex},
};

use agent::protocol::agent as pb;
use libcontainer::{
    container::{builder::ContainerBuilder, Container},
    oci_spec::runtime::{
        LinuxDeviceBuilder, LinuxDeviceCgroupBuilder, LinuxDeviceType, LinuxNamespaceBuilder,
        LinuxNamespaceType, LinuxResources, LinuxSeccomp, Mount, MountBuilder, Process, Spec,
    },
    syscall::syscall::SyscallType,
    workload::{default::DefaultExecutor, Executor, ExecutorError, ExecutorValidationError},
};

use crate::{
    container_kill, exec_helper,
    pidns::{Kind, SandboxNamespaces},
    reaper::Reaper,
    stdio::{self, ChildStdio, ProcessIo},
    storage::{BlockMount, Storage},
};

const BUNDLES: &str = "/run/vc/bundles";

/// libcontainer's create changes the whole process's working directory
/// while it sets up sockets: one create at a time.
static CREATE: Mutex<()> = Mutex::new(());
const STATE: &str = "/run/vc/containers";

/// Why a container call failed; becomes a ttrpc status.
#[derive(Debug)]
pub enum Failure {
    InvalidArgument(String),
    NotFound(String),
    AlreadyExists(String),
    FailedPrecondition(String),
    Internal(String),
}

type Result<T> = std::result::Result<T, Failure>;

type Exit = Arc<tokio::sync::OnceCell<i32>>;

/// How a container is made, beside its spec (CreateContainerRequest).
#[derive(Debug, Clone, Copy, Default)]
pub struct CreateOptions {
    /// Keep the init's stdin open for WriteStdin.
    pub stdin: bool,
    /// Join the sandbox-wide PID namespace.
    pub sandbox_pidns: bool,
    /// Join the sandbox-wide IPC namespace (the pod's).
    pub sandbox_ipcns: bool,
    /// Privileged: every device of the guest.
    pub all_devices: bool,
}

/// A process started by ExecProcess.
struct Exec {
    pid: i32,
    io: ProcessIo,
    exit: Exit,
}

/// An exec is forgotten once it was waited for and its output read to the
/// end (callers may do these in either order).
fn forget_finished(e: &mut Entry, exec_id: &str) {
    if e.execs
        .get(exec_id)
        .is_some_and(|x| x.exit.initialized() && x.io.stdout.is_none() && x.io.stderr.is_none())
    {
        e.execs.remove(exec_id);
    }
}

struct Entry {
    container: Container,
    /// The container's cgroup directory (from the spec's cgroupsPath).
    cgroup: Option<PathBuf>,
    /// The spec's `process`: the template of every exec.
    process: Process,
    /// The spec's seccomp profile, which execs get too.
    seccomp: Option<LinuxSeccomp>,
    io: ProcessIo,
    exit: Exit,
    execs: HashMap<String, Exec>,
    /// The rootfs disk, when the rootfs is one; released on removal.
    block: Option<BlockMount>,
    /// Why execs must take libcontainer's tenant path whatever the process
    /// (the spec's linux section asks what the lean helper does not do).
    tenant_only: Option<&'static str>,
}

impl Entry {
    /// The stdio of the init process (`exec_id` empty) or an exec.
    fn io(&mut self, exec_id: &str) -> Result<&mut ProcessIo> {
        if exec_id.is_empty() {
            return Ok(&mut self.io);
        }
        self.execs
            .get_mut(exec_id)
            .map(|e| &mut e.io)
            .ok_or_else(|| Failure::NotFound(format!("exec {exec_id} not found")))
    }

    fn cgroup(&self) -> Result<PathBuf> {
        self.cgroup.clone().ok_or_else(|| {
            Failure::FailedPrecondition(format!("container {} has no cgroup", self.container.id()))
        })
    }
}

#[derive(Clone)]
pub struct Containers {
    entries: Arc<Mutex<HashMap<String, Arc<Mutex<Entry>>>>>,
    storage: Storage,
    reaper: Reaper,
    namespaces: SandboxNamespaces,
}

impl std::fmt::Debug for Containers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Containers")
    }
}

/// Container and exec IDs become directory names.
pub(crate) fn check_id(id: &str) -> Result<()> {
    if agent::valid_id(id) {
        Ok(())
    } else {
        Err(Failure::InvalidArgument(format!("invalid ID {id:?}")))
    }
}

/// Where a container's rootfs comes from.
enum Root<'a> {
    Shared(PathBuf),
    Disk(&'a pb::BlockRootfs),
}

/// A path relative to the shared filesystem, without `..` or a root.
pub(crate) fn shared_path(rel: &str) -> Result<PathBuf> {
    let rel_path = Path::new(rel);
    if rel.is_empty()
        || !rel_path
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(Failure::InvalidArgument(format!(
            "rootfs {rel:?} must be a relative path inside the shared filesystem"
        )));
    }
    Ok(Path::new(agent::SHARED_FS_GUEST_PATH).join(rel_path))
}

/// A libcontainer builder for container `id` with our state root and
/// either pipes or a console socket.
fn builder(
    id: String,
    stdio: Option<ChildStdio>,
    console: Option<PathBuf>,
) -> std::result::Result<ContainerBuilder, libcontainer::error::LibcontainerError> {
    let builder = ContainerBuilder::new(id, SyscallType::default())
        .with_root_path(STATE)?
        .with_console_socket(console);
    Ok(match stdio {
        Some(stdio) => builder
            .with_stdin(stdio.stdin)
            .with_stdout(stdio.stdout)
            .with_stderr(stdio.stderr),
        None => builder,
    })
}

/// Bind mounts may only take their source from the shared filesystem (what
/// the host chose to share), resolved in the guest so that no symlink leads
/// out of it; other mount types keep their source (`proc`, `tmpfs`, ...).
pub(crate) fn check_mounts(spec: &mut Spec) -> Result<()> {
    let Some(mounts) = spec.mounts_mut().as_mut() else {
        return Ok(());
    };
    for m in mounts {
        let is_bind = m.typ().as_deref() == Some("bind")
            || m.options()
                .as_ref()
                .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"));
        if !is_bind {
            continue;
        }
        let source = m
            .source()
            .as_ref()
            .map(|s| s.display().to_string())
            .unwrap_or_default();
        let resolved = shared_source(&source)?;
        m.set_source(Some(resolved));
    }
    Ok(())
}

/// The pod's hostname, hosts and resolv.conf (SetSandboxFiles), bound
/// read-only into a container unless its spec mounts something there itself
/// (kubelet brings its own /etc/hosts).
fn add_sandbox_file_mounts(spec: &mut Spec, files: &[(&str, PathBuf)]) -> Result<()> {
    let mut mounts: Vec<Mount> = spec.mounts().clone().unwrap_or_default();
    for (dest, source) in files {
        if mounts.iter().any(|m| m.destination() == Path::new(dest)) {
            continue;
        }
        let mount = MountBuilder::default()
            .destination(dest)
            .typ("bind")
            .source(source)
            .options(
                ["rbind", "ro", "nosuid", "nodev", "noexec"]
                    .map(String::from)
                    .to_vec(),
            )
            .build()
            .map_err(|e| Failure::Internal(format!("sandbox file mount: {e}")))?;
        mounts.push(mount);
    }
    spec.set_mounts(Some(mounts));
    Ok(())
}

/// The spec's namespace of `typ` becomes the existing one at `path`.
fn join_namespace(spec: &mut Spec, typ: LinuxNamespaceType, path: String) -> Result<()> {
    let linux = spec
        .linux_mut()
        .as_mut()
        .ok_or_else(|| Failure::InvalidArgument("OCI spec has no linux section".into()))?;
    let mut namespaces = linux.namespaces().clone().unwrap_or_default();
    namespaces.retain(|n| n.typ() != typ);
    namespaces.push(
        LinuxNamespaceBuilder::default()
            .typ(typ)
            .path(path)
            .build()
            .map_err(|e| Failure::Internal(format!("{typ:?} namespace: {e}")))?,
    );
    linux.set_namespaces(Some(namespaces));
    Ok(())
}

/// Directories of /dev that are no devices of their own (runc's list).
const DEV_SKIP_DIRS: &[&str] = &["pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"];

/// Every character and block device of the guest's `/dev` (a privileged
/// container gets them, as runc gives one the host's), but the console.
fn guest_devices(dir: &Path, out: &mut Vec<libcontainer::oci_spec::runtime::LinuxDevice>) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let ft = meta.file_type();
        if ft.is_dir() {
            if !DEV_SKIP_DIRS.iter().any(|d| name == *d) {
                guest_devices(&path, out);
            }
            continue;
        }
        if name == "console" {
            continue;
        }
        let typ = if ft.is_char_device() {
            LinuxDeviceType::C
        } else if ft.is_block_device() {
            LinuxDeviceType::B
        } else {
            continue;
        };
        let rdev = meta.rdev();
        let device = LinuxDeviceBuilder::default()
            .path(path.clone())
            .typ(typ)
            .major(i64::from(nix::sys::stat::major(rdev) as u32))
            .minor(i64::from(nix::sys::stat::minor(rdev) as u32))
            .file_mode(meta.mode() & 0o7777)
            .uid(meta.uid())
            .gid(meta.gid())
            .build();
        if let Ok(d) = device {
            out.push(d);
        }
    }
}

/// Privileged: the guest's devices in the container and a device cgroup
/// that allows every device.
fn add_all_devices(spec: &mut Spec) -> Result<()> {
    let mut devices = Vec::new();
    guest_devices(Path::new("/dev"), &mut devices);
    devices.sort_by(|a, b| a.path().cmp(b.path()));
    let allow_all = LinuxDeviceCgroupBuilder::default()
        .allow(true)
        .typ(LinuxDeviceType::A)
        .access("rwm")
        .build()
        .map_err(|e| Failure::Internal(format!("device rule: {e}")))?;
    let linux = spec
        .linux_mut()
        .as_mut()
        .ok_or_else(|| Failure::InvalidArgument("OCI spec has no linux section".into()))?;
    let mut resources: LinuxResources = linux.resources().clone().unwrap_or_default();
    resources.set_devices(Some(vec![allow_all]));
    linux.set_resources(Some(resources));
    linux.set_devices(Some(devices));
    Ok(())
}

/// `source` if it lies in the shared filesystem once resolved.
fn shared_source(source: &str) -> Result<PathBuf> {
    let outside = || {
        Failure::InvalidArgument(format!(
            "bind mount source {source:?} is outside the sandbox's shared directory {}",
            agent::SHARED_FS_GUEST_PATH
        ))
    };
    let root = Path::new(agent::SHARED_FS_GUEST_PATH);
    let rel = Path::new(source)
        .strip_prefix(root)
        .map_err(|_| outside())?;
    if rel.as_os_str().is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(outside());
    }
    let resolved = std::fs::canonicalize(source)
        .map_err(|e| Failure::InvalidArgument(format!("bind mount source {source:?}: {e}")))?;
    if !resolved.starts_with(root) || resolved == root {
        return Err(outside());
    }
    Ok(resolved)
}

/// The cgroup controllers containers may be limited by, enabled for the
/// children of the root and of `/vc` (where container cgroups live).
/// Enables the cgroup controllers containers use, once per boot: done ahead
/// at start (so a template's clones have them), else by the first create.
pub fn enable_controllers() {
    static ENABLED: std::sync::Once = std::sync::Once::new();
    ENABLED.call_once(enable_controllers_now);
}

fn enable_controllers_now() {
    for dir in ["/sys/fs/cgroup", "/sys/fs/cgroup/vc"] {
        let _ = std::fs::create_dir_all(dir);
        for c in ["cpu", "cpuset", "io", "memory", "pids"] {
            let _ = std::fs::write(
                Path::new(dir).join("cgroup.subtree_control"),
                format!("+{c}"),
            );
        }
    }
}

impl Containers {
    pub fn new(storage: Storage, reaper: Reaper) -> Self {
        Self {
            entries: Arc::default(),
            storage,
            reaper,
            namespaces: SandboxNamespaces::default(),
        }
    }

    /// Makes the pod's shared namespaces now, off the first container's path.
    pub fn make_namespaces_ahead(&self) -> tokio::task::JoinHandle<()> {
        self.namespaces.make_ahead()
    }

    fn get(&self, id: &str) -> Result<Arc<Mutex<Entry>>> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| Failure::NotFound(format!("container {id} not found")))
    }

    /// Creates container `id` whose rootfs is `rootfs` in the shared
    /// filesystem, or the disk `block` when given.
    pub async fn create(
        &self,
        id: &str,
        spec_json: &[u8],
        rootfs: &str,
        block: Option<&pb::BlockRootfs>,
        options: CreateOptions,
    ) -> Result<()> {
        check_id(id)?;
        let root = match block {
            Some(disk) => Root::Disk(disk),
            None => Root::Shared(shared_path(rootfs)?),
        };
        if self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id)
        {
            return Err(Failure::AlreadyExists(format!(
                "container {id} already exists"
            )));
        }
        let (rootfs, block) = match root {
            Root::Shared(path) => (path, None),
            Root::Disk(b) => {
                let mounted = self
                    .storage
                    .mount_block(id, b.scsi_target, b.scsi_lun, &b.fstype)
                    .await
                    .map_err(Failure::FailedPrecondition)?;
                (mounted.mountpoint.clone(), Some(mounted))
            }
        };
        let created = self
            .create_on(id, spec_json, rootfs, block.clone(), options)
            .await;
        if created.is_err() {
            if let Some(b) = &block {
                if let Err(e) = b.release() {
                    tracing::warn!(container = %id, "undo rootfs mount: {e}");
                }
            }
        }
        created
    }

    async fn create_on(
        &self,
        id: &str,
        spec_json: &[u8],
        rootfs: PathBuf,
        block: Option<BlockMount>,
        options: CreateOptions,
    ) -> Result<()> {
        let CreateOptions {
            stdin,
            sandbox_pidns,
            sandbox_ipcns,
            all_devices,
        } = options;
        let t0 = std::time::Instant::now();
        self.storage
            .shared()
            .await
            .map_err(Failure::FailedPrecondition)?;
        let shared_ms = t0.elapsed().as_millis() as u64;
        let mut marks: Vec<(&str, u64)> = Vec::new();
        let mut mark = |step| marks.push((step, t0.elapsed().as_millis() as u64));
        if !rootfs.is_dir() {
            return Err(Failure::InvalidArgument(format!(
                "rootfs {} is not a directory in the guest",
                rootfs.display()
            )));
        }
        // Typed: what the guest cannot honour is named here (libcontainer
        // itself only says "oci spec error").
        let mut spec: Spec = serde_json::from_slice(spec_json).map_err(|e| {
            Failure::InvalidArgument(format!("the OCI spec cannot be honoured: {e}"))
        })?;
        let mut root = spec.root().clone().unwrap_or_default();
        root.set_path(rootfs.clone());
        spec.set_root(Some(root));
        mark("parsed");
        check_mounts(&mut spec)?;
        mark("mounts checked");
        add_sandbox_file_mounts(&mut spec, &crate::network::sandbox_file_mounts())?;
        if all_devices {
            add_all_devices(&mut spec)?;
        }
        for (share, kind, typ) in [
            (sandbox_pidns, Kind::Pid, LinuxNamespaceType::Pid),
            (sandbox_ipcns, Kind::Ipc, LinuxNamespaceType::Ipc),
        ] {
            if share {
                join_namespace(&mut spec, typ, self.namespaces.path(kind).await?)?;
            }
        }
        mark("namespaces");
        let process = spec
            .process()
            .clone()
            .ok_or_else(|| Failure::InvalidArgument("OCI spec has no process".into()))?;
        let terminal = process.terminal().unwrap_or(false);
        let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().clone());
        let tenant_only = spec.linux().as_ref().and_then(|l| {
            if l.personality().is_some() {
                Some("personality")
            } else if l.time_offsets().is_some() {
                Some("timeOffsets")
            } else {
                None
            }
        });
        enable_controllers();
        mark("controllers");
        let cgroup = spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().clone())
            .filter(|p| {
                p.is_absolute() && p.components().all(|c| !matches!(c, Component::ParentDir))
            })
            .map(|p| Path::new("/sys/fs/cgroup").join(p.strip_prefix("/").unwrap_or(&p)));
        let bundle = Path::new(BUNDLES).join(id);
        std::fs::create_dir_all(&bundle)
            .map_err(|e| Failure::Internal(format!("mkdir bundle: {e}")))?;
        std::fs::create_dir_all(STATE)
            .map_err(|e| Failure::Internal(format!("mkdir state: {e}")))?;
        let config = serde_json::to_vec(&spec).map_err(|e| Failure::Internal(e.to_string()))?;
        std::fs::write(bundle.join("config.json"), config)
            .map_err(|e| Failure::Internal(format!("write config: {e}")))?;

        mark("bundle");
        let (pending, console, stdio) = stdio::prepare(terminal, stdin)?;
        mark("stdio");
        let id_owned = id.to_string();
        let bundle_for_build = bundle.clone();
        let built = tokio::task::spawn_blocking(move || {
            let _one_at_a_time = CREATE.lock().unwrap_or_else(|e| e.into_inner());
            builder(id_owned, stdio, console)
                .map(|b| {
                    b.as_init(&bundle_for_build)
                        .with_systemd(false)
                        // The guest's root is the initramfs (rootfs), which
                        // pivot_root(2) cannot move: enter the container's
                        // root with MS_MOVE + chroot instead.
                        .with_no_pivot(true)
                        .with_detach(true)
                })
                .and_then(|b| b.build())
        })
        .await
        .map_err(|e| Failure::Internal(format!("create task: {e}")))?;
        tracing::debug!(
            container = %id,
            shared_ms,
            ?marks,
            built_ms = t0.elapsed().as_millis() as u64,
            "create: built"
        );
        let built = built
            .map_err(|err| Failure::InvalidArgument(format!("cannot create container {id}: {err}")))
            .and_then(|container| Ok((container, pending.finish()?)));
        let (container, io) = match built {
            Ok(c) => c,
            Err(err) => {
                let _ = std::fs::remove_dir_all(&bundle);
                let _ = std::fs::remove_dir_all(Path::new(STATE).join(id));
                return Err(err);
            }
        };
        let entry = Entry {
            container,
            cgroup,
            process,
            seccomp,
            io,
            exit: Exit::default(),
            execs: HashMap::new(),
            block,
            tenant_only,
        };
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), Arc::new(Mutex::new(entry)));
        Ok(())
    }

    pub async fn start(&self, id: &str) -> Result<()> {
        let entry = self.get(id)?;
        let t0 = std::time::Instant::now();
        tokio::task::spawn_blocking(move || {
            let mut e = entry.lock().unwrap_or_else(|e| e.into_inner());
            tracing::debug!(locked_ms = t0.elapsed().as_millis() as u64, "start: locked");
            if !e.container.can_start() {
                return Err(Failure::FailedPrecondition(format!(
                    "container {} cannot be started: it is {:?}",
                    e.container.id(),
                    e.container.status()
                )));
            }
            let r = e
                .container
                .start()
                .map_err(|err| Failure::Internal(format!("start: {err}")));
            tracing::debug!(ms = t0.elapsed().as_millis() as u64, "start: done");
            r
        })
        .await
        .map_err(|e| Failure::Internal(format!("start task: {e}")))?
    }

    /// Sends `signal` to an exec's process, or to the container's init
    /// (`all`: to every process of its cgroup). A process that has ended
    /// meanwhile is no error: its exit status comes through WaitProcess
    /// (for the init see container_kill.rs).
    pub async fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let entry = self.get(id)?;
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|s| nix::sys::signal::Signal::try_from(s).ok())
            .ok_or_else(|| Failure::InvalidArgument(format!("invalid signal {signal}")))?;
        if !exec_id.is_empty() {
            let pid = entry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .execs
                .get(exec_id)
                .map(|e| e.pid)
                .ok_or_else(|| Failure::NotFound(format!("exec {exec_id} not found")))?;
            return match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
                Err(e) => Err(Failure::Internal(format!("kill: {e}"))),
            };
        }
        tokio::task::spawn_blocking(move || {
            let mut e = entry.lock().unwrap_or_else(|e| e.into_inner());
            container_kill::signal_init(&mut e.container, sig, all)
                .map_err(|err| Failure::FailedPrecondition(format!("signal: {err}")))
        })
        .await
        .map_err(|e| Failure::Internal(format!("signal task: {e}")))?
    }

    /// The exit status of the init process or an exec; any number of
    /// callers may wait, each gets the status.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<i32> {
        let entry = self.get(id)?;
        let (pid, exit) = {
            let e = entry.lock().unwrap_or_else(|e| e.into_inner());
            if exec_id.is_empty() {
                let pid = e.container.pid().ok_or_else(|| {
                    Failure::FailedPrecondition(format!("container {id} has no process"))
                })?;
                (pid.as_raw(), e.exit.clone())
            } else {
                let x = e
                    .execs
                    .get(exec_id)
                    .ok_or_else(|| Failure::NotFound(format!("exec {exec_id} not found")))?;
                (x.pid, x.exit.clone())
            }
        };
        let status = *exit.get_or_init(|| self.reaper.wait(pid)).await;
        if !exec_id.is_empty() {
            forget_finished(
                &mut entry.lock().unwrap_or_else(|e| e.into_inner()),
                exec_id,
            );
        }
        Ok(status)
    }

    /// Resource usage from the container's cgroup.
    pub fn stats(&self, id: &str) -> Result<pb::StatsContainerResponse> {
        let dir = self
            .get(id)?
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cgroup()?;
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        Ok(parse_stats(
            &read("cpu.stat"),
            &read("memory.current"),
            &read("memory.stat"),
            &read("memory.max"),
            &read("pids.current"),
            &read("io.stat"),
        ))
    }

    /// Freezes (`pause`) or thaws the container's processes.
    pub async fn freeze(&self, id: &str, pause: bool) -> Result<()> {
        let entry = self.get(id)?;
        tokio::task::spawn_blocking(move || {
            let mut e = entry.lock().unwrap_or_else(|e| e.into_inner());
            let done = if pause {
                e.container.pause()
            } else {
                e.container.resume()
            };
            done.map_err(|err| {
                Failure::FailedPrecondition(format!(
                    "{}: {err}",
                    if pause { "pause" } else { "resume" }
                ))
            })
        })
        .await
        .map_err(|e| Failure::Internal(format!("freeze task: {e}")))?
    }

    /// Whether the kernel's OOM killer has killed a process of the
    /// container (its cgroup's memory.events).
    pub fn oom_killed(&self, id: &str) -> bool {
        let Ok(entry) = self.get(id) else {
            return false;
        };
        let cgroup = entry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cgroup
            .clone();
        cgroup
            .and_then(|dir| std::fs::read_to_string(dir.join("memory.events")).ok())
            .is_some_and(|events| oom_kills(&events) > 0)
    }

    pub async fn remove(&self, id: &str, force: bool) -> Result<()> {
        let entry = self.get(id)?;
        let block = tokio::task::spawn_blocking(move || {
            let mut e = entry.lock().unwrap_or_else(|e| e.into_inner());
            e.io = ProcessIo::default();
            e.execs.clear();
            e.container
                .delete(force)
                .map_err(|err| Failure::FailedPrecondition(format!("remove: {err}")))?;
            Ok::<_, Failure>(e.block.take())
        })
        .await
        .map_err(|e| Failure::Internal(format!("remove task: {e}")))??;
        if let Some(block) = block {
            // The container is gone either way; a disk that cannot be let go
            // is the host's to detach regardless.
            match tokio::task::spawn_blocking(move || block.release()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(container = %id, "release rootfs disk: {e}"),
                Err(e) => tracing::warn!(container = %id, "release rootfs disk task: {e}"),
            }
        }
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        let _ = std::fs::remove_dir_all(Path::new(BUNDLES).join(id));
        Ok(())
    }

    /// Starts `args` in the running container `id` as process `exec_id`:
    /// the container's process (user, capabilities, limits, environment)
    /// with these args, extra environment and working directory.
    ///
    /// Through the lean helper (exec_helper.rs) unless the process needs
    /// what only libcontainer's tenant path does (a terminal: the pty comes
    /// through its console socket).
    pub async fn exec(&self, id: &str, r: pb::ExecProcessRequest) -> Result<()> {
        let exec_id = r.exec_id.clone();
        check_id(&exec_id)?;
        if r.args.is_empty() {
            return Err(Failure::InvalidArgument("exec: no command".into()));
        }
        let entry = self.get(id)?;
        let (process, seccomp, init, cgroup, tenant_only) = {
            let mut e = entry.lock().unwrap_or_else(|e| e.into_inner());
            if e.execs.contains_key(&exec_id) {
                return Err(Failure::AlreadyExists(format!(
                    "exec {exec_id} already exists"
                )));
            }
            // As libcontainer's tenant: only into a running container (a
            // paused one's frozen cgroup would hold the helper).
            let _ = e.container.refresh_status();
            let status = e.container.status();
            let init = match (status, e.container.pid()) {
                (libcontainer::container::ContainerStatus::Running, Some(pid)) => pid.as_raw(),
                _ => {
                    return Err(Failure::FailedPrecondition(format!(
                        "cannot exec in container {id}: it is {status:?}"
                    )))
                }
            };
            (
                exec_process(&e.process, &r),
                e.seccomp.clone(),
                init,
                e.cgroup.clone(),
                e.tenant_only,
            )
        };
        let (io, pid) = match tenant_only.or_else(|| exec_helper::unsupported(&process)) {
            Some(what) => {
                tracing::debug!(exec = %exec_id, what, "exec through libcontainer's tenant");
                exec_tenant(id, &exec_id, process, seccomp, r.terminal, r.stdin).await?
            }
            None => {
                let (pending, _, stdio) = stdio::prepare(false, r.stdin)?;
                let stdio =
                    stdio.ok_or_else(|| Failure::Internal("exec: no stdio pipes".into()))?;
                let request = exec_helper::Request {
                    pid: init,
                    cgroup,
                    process,
                    seccomp,
                };
                let reaper = self.reaper.clone();
                let t0 = std::time::Instant::now();
                let started = tokio::task::spawn_blocking(move || {
                    exec_helper::spawn(&request, stdio, &reaper)
                })
                .await
                .map_err(|e| Failure::Internal(format!("exec task: {e}")))?;
                tracing::debug!(ms = t0.elapsed().as_millis() as u64, "exec: started");
                let pid = started.map_err(|err| {
                    Failure::FailedPrecondition(format!("cannot exec in container {id}: {err}"))
                })?;
                (pending.finish()?, pid)
            }
        };
        entry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .execs
            .insert(
                exec_id,
                Exec {
                    pid,
                    io,
                    exit: Exit::default(),
                },
            );
        Ok(())
    }

    /// Up to `max` bytes of stdout (or stderr); empty with `eof` at the end.
    pub async fn read(
        &self,
        id: &str,
        exec_id: &str,
        stderr: bool,
        max: usize,
    ) -> Result<(Vec<u8>, bool)> {
        let stream = {
            let entry = self.get(id)?;
            let mut e = entry.lock().unwrap_or_else(|e| e.into_inner());
            let io = e.io(exec_id)?;
            if stderr {
                io.stderr.clone()
            } else {
                io.stdout.clone()
            }
        };
        let Some(stream) = stream else {
            return Ok((Vec::new(), true));
        };
        let mut buf = vec![0u8; max.clamp(1, 1 << 20)];
        let n = stream.read(&mut buf).await?;
        buf.truncate(n);
        if n == 0 {
            // The end: later reads answer at once, and a waited-for exec
            // can be forgotten.
            if let Ok(entry) = self.get(id) {
                let mut e = entry.lock().unwrap_or_else(|e| e.into_inner());
                if let Ok(io) = e.io(exec_id) {
                    if stderr {
                        io.stderr = None;
                    } else {
                        io.stdout = None;
                    }
                }
                if !exec_id.is_empty() {
                    forget_finished(&mut e, exec_id);
                }
            }
        }
        Ok((buf, n == 0))
    }

    /// Writes all of `data` to the process's stdin.
    pub async fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) -> Result<()> {
        let stdin = {
            let entry = self.get(id)?;
            let mut e = entry.lock().unwrap_or_else(|e| e.into_inner());
            e.io(exec_id)?.stdin.clone()
        };
        let stdin = stdin.ok_or_else(|| {
            Failure::FailedPrecondition(format!(
                "{}: stdin is not open (not asked for at creation, or closed)",
                process_name(id, exec_id)
            ))
        })?;
        stdin.write_all(data).await
    }

    /// Closes the agent's end of stdin: the process reads EOF (with a
    /// terminal: the line discipline's end-of-file, ^D).
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let entry = self.get(id)?;
        let (stdin, terminal) = {
            let mut e = entry.lock().unwrap_or_else(|e| e.into_inner());
            let io = e.io(exec_id)?;
            (io.stdin.take(), io.terminal.is_some())
        };
        if let (Some(stdin), true) = (stdin, terminal) {
            stdin.write_all(&[4]).await?;
        }
        Ok(())
    }

    pub fn resize(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
        let entry = self.get(id)?;
        let mut e = entry.lock().unwrap_or_else(|e| e.into_inner());
        e.io(exec_id)?.resize(clamp(rows), clamp(cols))
    }

    /// The processes in the container's cgroup.
    pub fn processes(&self, id: &str) -> Result<Vec<pb::ProcessInfo>> {
        let dir = self
            .get(id)?
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cgroup()?;
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        Ok(procs
            .lines()
            .filter_map(|l| l.trim().parse::<i32>().ok())
            .map(process_info)
            .collect())
    }

    /// Applies an OCI `linux.resources` object to the container's cgroup.
    pub fn update(&self, id: &str, resources: &[u8]) -> Result<()> {
        let resources: serde_json::Value = serde_json::from_slice(resources)
            .map_err(|e| Failure::InvalidArgument(format!("resources are not valid JSON: {e}")))?;
        let dir = self
            .get(id)?
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cgroup()?;
        let writes = cgroup_writes(&resources)?;
        for (file, value) in writes {
            std::fs::write(dir.join(file), &value).map_err(|e| {
                Failure::FailedPrecondition(format!("cannot set {file} to {value:?}: {e}"))
            })?;
        }
        Ok(())
    }
}

/// An exec through libcontainer's tenant path (terminal execs: the pty
/// master comes back through the console socket): its stdio and PID.
async fn exec_tenant(
    id: &str,
    exec_id: &str,
    process: Process,
    seccomp: Option<LinuxSeccomp>,
    terminal: bool,
    stdin: bool,
) -> Result<(ProcessIo, i32)> {
    let path = Path::new(BUNDLES)
        .join(id)
        .join(format!("exec-{exec_id}.json"));
    let json = serde_json::to_vec(&process).map_err(|e| Failure::Internal(e.to_string()))?;
    std::fs::write(&path, json)
        .map_err(|e| Failure::Internal(format!("write exec process: {e}")))?;
    let (pending, console, stdio) = stdio::prepare(terminal, stdin)?;
    let id_owned = id.to_string();
    let process_path = path.clone();
    let built = tokio::task::spawn_blocking(move || {
        let _one_at_a_time = CREATE.lock().unwrap_or_else(|e| e.into_inner());
        builder(id_owned, stdio, console)
            .map(|b| {
                b.with_executor(SeccompExecutor(seccomp))
                    .as_tenant()
                    .with_process(Some(process_path))
                    .with_detach(true)
            })
            .and_then(|b| b.build())
    })
    .await
    .map_err(|e| Failure::Internal(format!("exec task: {e}")));
    let _ = std::fs::remove_file(&path);
    let pid = built?.map_err(|err| {
        Failure::FailedPrecondition(format!("cannot exec in container {id}: {err}"))
    })?;
    Ok((pending.finish()?, pid.as_raw()))
}

/// Runs an exec's payload under the container's seccomp profile.
///
/// libcontainer 0.7 gives a tenant (exec) process the container's
/// namespaces, cgroup, user and capabilities but not `linux.seccomp`; runc
/// applies it. This executor installs the profile as the last step before
/// execve. Capabilities are already dropped there, so where installing needs
/// no_new_privs the process gets it (stricter than runc, never looser).
#[derive(Clone)]
struct SeccompExecutor(Option<LinuxSeccomp>);

impl Executor for SeccompExecutor {
    fn exec(&self, spec: &Spec) -> std::result::Result<(), ExecutorError> {
        if let Some(profile) = &self.0 {
            let first = libcontainer::seccomp::initialize_seccomp(profile);
            if first.is_err() {
                nix::sys::prctl::set_no_new_privs()
                    .map_err(|e| ExecutorError::Other(format!("no_new_privs: {e}")))?;
                libcontainer::seccomp::initialize_seccomp(profile)
                    .map_err(|e| ExecutorError::Other(format!("seccomp: {e}")))?;
            }
        }
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> std::result::Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

fn process_name(id: &str, exec_id: &str) -> String {
    if exec_id.is_empty() {
        format!("container {id}")
    } else {
        format!("exec {exec_id} of container {id}")
    }
}

/// The container's `process` with an exec's args, environment, working
/// directory and stdio.
pub(crate) fn exec_process(template: &Process, r: &pb::ExecProcessRequest) -> Process {
    let mut p = template.clone();
    let mut env: Vec<String> = p.env().clone().unwrap_or_default();
    for kv in &r.env {
        let key = kv.split_once('=').map_or(kv.as_str(), |(k, _)| k);
        env.retain(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) != key);
        env.push(kv.clone());
    }
    p.set_args(Some(r.args.clone()));
    p.set_env(Some(env));
    p.set_terminal(Some(r.terminal));
    if !r.cwd.is_empty() {
        p.set_cwd(PathBuf::from(&r.cwd));
    }
    p
}

fn process_info(pid: i32) -> pb::ProcessInfo {
    let mut info = pb::ProcessInfo::new();
    info.pid = pid;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    info.args = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if info.args.is_empty() {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        info.args = vec![format!("[{}]", comm.trim())];
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    info.uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    info
}

/// cgroup v2 files and values for an OCI `linux.resources` object (the
/// conversions runc and crun use).
pub(crate) fn cgroup_writes(r: &serde_json::Value) -> Result<Vec<(&'static str, String)>> {
    let int = |v: &serde_json::Value, what: &str| -> Result<Option<i64>> {
        match v {
            serde_json::Value::Null => Ok(None),
            v => v.as_i64().map(Some).ok_or_else(|| {
                Failure::InvalidArgument(format!("{what} must be an integer, not {v}"))
            }),
        }
    };
    let limit = |n: i64| {
        if n < 0 {
            "max".to_string()
        } else {
            n.to_string()
        }
    };
    let mut out = Vec::new();
    let mem = &r["memory"];
    let mem_limit = int(&mem["limit"], "memory.limit")?;
    if let Some(n) = mem_limit {
        out.push(("memory.max", limit(n)));
    }
    if let Some(n) = int(&mem["reservation"], "memory.reservation")? {
        out.push(("memory.low", limit(n)));
    }
    if let Some(swap) = int(&mem["swap"], "memory.swap")? {
        // OCI's swap is memory + swap; cgroup v2 counts swap alone.
        let value = match (swap, mem_limit) {
            (s, _) if s < 0 => "max".to_string(),
            (s, Some(l)) if l >= 0 => (s - l).max(0).to_string(),
            (s, _) => s.to_string(),
        };
        out.push(("memory.swap.max", value));
    }
    let cpu = &r["cpu"];
    if let Some(shares) = int(&cpu["shares"], "cpu.shares")? {
        if shares > 0 {
            let weight = 1 + ((shares.clamp(2, 262_144) - 2) * 9999) / 262_142;
            out.push(("cpu.weight", weight.to_string()));
        }
    }
    let quota = int(&cpu["quota"], "cpu.quota")?;
    let period = int(&cpu["period"], "cpu.period")?;
    if quota.is_some() || period.is_some() {
        let q = quota
            .filter(|q| *q > 0)
            .map_or("max".into(), |q| q.to_string());
        out.push((
            "cpu.max",
            format!("{q} {}", period.filter(|p| *p > 0).unwrap_or(100_000)),
        ));
    }
    if let Some(cpus) = cpu["cpus"].as_str().filter(|c| !c.is_empty()) {
        out.push(("cpuset.cpus", cpus.to_string()));
    }
    if let Some(mems) = cpu["mems"].as_str().filter(|m| !m.is_empty()) {
        out.push(("cpuset.mems", mems.to_string()));
    }
    if let Some(n) = int(&r["pids"]["limit"], "pids.limit")? {
        out.push((
            "pids.max",
            if n <= 0 { "max".into() } else { n.to_string() },
        ));
    }
    Ok(out)
}

/// `key value` lines (cpu.stat, memory.stat): the value of `key`.
fn keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn parse_stats(
    cpu: &str,
    mem_current: &str,
    mem_stat: &str,
    mem_max: &str,
    pids: &str,
    io: &str,
) -> pb::StatsContainerResponse {
    // io.stat: "8:0 rbytes=1 wbytes=2 rios=3 ..." per device.
    let io_sum = |field: &str| -> u64 {
        io.split_whitespace()
            .filter_map(|kv| {
                kv.strip_prefix(field)?
                    .strip_prefix('=')?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    };
    let mut st = pb::StatsContainerResponse::new();
    st.cpu_usage_usec = keyed(cpu, "usage_usec");
    st.memory_usage_bytes = mem_current.trim().parse().unwrap_or(0);
    st.memory_anon_bytes = keyed(mem_stat, "anon");
    st.memory_file_bytes = keyed(mem_stat, "file");
    st.memory_limit_bytes = mem_max.trim().parse().unwrap_or(0); // "max" → 0
    st.pids_current = pids.trim().parse().unwrap_or(0);
    st.io_read_bytes = io_sum("rbytes");
    st.io_write_bytes = io_sum("wbytes");
    st
}

/// The `oom_kill` count of a cgroup v2 memory.events file.
fn oom_kills(events: &str) -> u64 {
    events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_stats_parse() {
        let st = parse_stats(
            "usage_usec 1234\nuser_usec 1000\n",
            "4096\n",
            "anon 100\nfile 200\nanon_thp 0\n",
            "max\n",
            "3\n",
            "254:0 rbytes=10 wbytes=20 rios=1 wios=2\n254:16 rbytes=5 wbytes=0\n",
        );
        assert_eq!(st.cpu_usage_usec, 1234);
        assert_eq!(
            (
                st.memory_usage_bytes,
                st.memory_anon_bytes,
                st.memory_file_bytes
            ),
            (4096, 100, 200)
        );
        assert_eq!(st.memory_limit_bytes, 0);
        assert_eq!(st.pids_current, 3);
        assert_eq!((st.io_read_bytes, st.io_write_bytes), (15, 20));
    }

    #[test]
    fn memory_events() {
        let text = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(oom_kills(text), 1);
        assert_eq!(oom_kills("oom 0\n"), 0);
    }

    #[test]
    fn rootfs_paths_stay_inside_the_shared_fs() {
        assert_eq!(
            shared_path("c1/rootfs").ok(),
            Some(PathBuf::from("/run/vc/shared/c1/rootfs"))
        );
        for bad in ["", "/etc", "../x", "c1/../../x", "./c1"] {
            assert!(shared_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resources_become_cgroup_v2_files() {
        let r = serde_json::json!({
            "memory": { "limit": 67108864, "swap": 134217728 },
            "cpu": { "shares": 1024, "quota": 50000, "period": 100000, "cpus": "0" },
            "pids": { "limit": 20 },
        });
        let writes = cgroup_writes(&r).expect("valid");
        let get = |f: &str| writes.iter().find(|w| w.0 == f).map(|w| w.1.as_str());
        assert_eq!(get("memory.max"), Some("67108864"));
        assert_eq!(
            get("memory.swap.max"),
            Some("67108864"),
            "swap counts alone"
        );
        assert_eq!(get("cpu.weight"), Some("39"), "runc's shares → weight");
        assert_eq!(get("cpu.max"), Some("50000 100000"));
        assert_eq!(get("cpuset.cpus"), Some("0"));
        assert_eq!(get("pids.max"), Some("20"));
        let unlimited = cgroup_writes(&serde_json::json!({
            "memory": { "limit": -1 }, "cpu": { "quota": -1 }, "pids": { "limit": 0 },
        }))
        .expect("valid");
        assert_eq!(
            unlimited,
            [
                ("memory.max", "max".to_string()),
                ("cpu.max", "max 100000".to_string()),
                ("pids.max", "max".to_string()),
            ]
        );
        assert!(cgroup_writes(&serde_json::json!({}))
            .expect("empty")
            .is_empty());
        assert!(cgroup_writes(&serde_json::json!({ "memory": { "limit": "lots" } })).is_err());
    }

    #[test]
    fn execs_start_from_the_container_process() {
        let template: Process = serde_json::from_value(serde_json::json!({
            "args": ["/bin/sleep", "1000"],
            "env": ["PATH=/bin", "A=1"],
            "cwd": "/",
            "user": { "uid": 1000, "gid": 1000, "additionalGids": [5] },
            "terminal": false,
        }))
        .expect("process");
        let mut r = pb::ExecProcessRequest::new();
        r.args = vec!["/bin/sh".into()];
        r.env = vec!["A=2".into(), "B=3".into()];
        r.terminal = true;
        let p = serde_json::to_value(exec_process(&template, &r)).expect("json");
        assert_eq!(p["args"], serde_json::json!(["/bin/sh"]));
        assert_eq!(p["env"], serde_json::json!(["PATH=/bin", "A=2", "B=3"]));
        assert_eq!(p["user"]["uid"], 1000, "the container's user");
        assert_eq!(
            p["user"]["additionalGids"],
            serde_json::json!([5]),
            "and groups"
        );
        assert_eq!(p["terminal"], true);
        assert_eq!(p["cwd"], "/");
        r.cwd = "/tmp".into();
        assert_eq!(
            exec_process(&template, &r).cwd(),
            std::path::Path::new("/tmp")
        );
    }

    #[test]
    fn bind_sources_must_come_from_the_shared_fs() {
        for bad in [
            "/etc",
            "/run/vc/shared",
            "/run/vc/shared/../../etc",
            "/run/vc/sharedx/a",
            "relative",
        ] {
            let err = shared_source(bad).expect_err(bad);
            assert!(
                matches!(&err, Failure::InvalidArgument(m) if m.contains("outside")),
                "{bad}: {err:?}"
            );
        }
        let mut spec: Spec =
            serde_json::from_value(serde_json::json!({ "ociVersion": "1.0.2", "mounts": [
                { "destination": "/proc", "type": "proc", "source": "proc" },
                { "destination": "/x", "type": "bind", "source": "/etc", "options": ["rbind"] },
            ]}))
            .expect("spec");
        assert!(
            check_mounts(&mut spec).is_err(),
            "a bind of /etc is refused"
        );
    }

    #[test]
    fn sandbox_files_are_bound_unless_the_spec_mounts_there() {
        let mut spec: Spec =
            serde_json::from_value(serde_json::json!({ "ociVersion": "1.0.2", "mounts": [
                { "destination": "/etc/hosts", "type": "bind", "source": "/run/vc/shared/h" },
            ]}))
            .expect("spec");
        let files = [
            ("/etc/hosts", PathBuf::from("/run/vc/sandbox/hosts")),
            (
                "/etc/resolv.conf",
                PathBuf::from("/run/vc/sandbox/resolv.conf"),
            ),
        ];
        add_sandbox_file_mounts(&mut spec, &files).expect("mounts");
        let spec = serde_json::to_value(&spec).expect("json");
        let mounts = spec["mounts"].as_array().expect("mounts");
        assert_eq!(mounts.len(), 2);
        assert_eq!(
            mounts[0]["source"], "/run/vc/shared/h",
            "the spec's own wins"
        );
        assert_eq!(mounts[1]["destination"], "/etc/resolv.conf");
        assert_eq!(mounts[1]["source"], "/run/vc/sandbox/resolv.conf");
        assert!(mounts[1]["options"]
            .as_array()
            .expect("options")
            .iter()
            .any(|o| o == "ro"));
    }

    #[test]
    fn container_ids() {
        assert!(check_id("c1").is_ok());
        for bad in ["", "../x", "a/b", ".x"] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }
}
