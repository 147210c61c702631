//! CreateContainer: bind the rootfs into the shared directory (or attach its
//! disk to the VM) and have the agent create the container (its process waits for StartContainer).

use std::{
    os::unix::fs::DirBuilderExt,
    path::{Component, Path},
};

use crate::{
    agent::GuestRootfs,
    container::{ContainerConfig, ContainerRecord, ContainerState, ContainerStatus, Mount, Rootfs},
    mounts,
    sandbox::{check_id, now_secs, Runtime},
    state::SandboxState,
    Error, Result,
};

impl Runtime {
    pub async fn create_container(
        &self,
        sandbox_id: &str,
        config: ContainerConfig,
    ) -> Result<ContainerStatus> {
        check_id(sandbox_id)?;
        let cid = config.id.clone();
        let invalid = |detail: String| Error::InvalidContainer {
            id: cid.clone(),
            detail,
        };
        if !crate::sandbox::valid_id(&cid) {
            return Err(invalid(
                "use 1-128 characters of [A-Za-z0-9_.-], starting with a letter or digit".into(),
            ));
        }
        if config.args.is_empty() {
            return Err(invalid("no command: args is empty".into()));
        }
        match &config.rootfs {
            Rootfs::Dir(dir) if !dir.is_absolute() || !dir.is_dir() => {
                return Err(invalid(format!(
                    "rootfs {} is not an absolute path to a directory",
                    dir.display()
                )));
            }
            Rootfs::Block { image, .. } if !image.is_absolute() || !image.is_file() => {
                return Err(invalid(format!(
                    "rootfs disk image {} is not an absolute path to a file",
                    image.display()
                )));
            }
            _ => {}
        }
        // Each source resolved once, here, and mounted by that descriptor:
        // a path swapped after the check is not the one mounted.
        let sources = config
            .mounts
            .iter()
            .map(|m| self.open_mount_source(m))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let mut s = self.locked(sandbox_id).await?;
        if !matches!(s.record.state, SandboxState::Ready | SandboxState::Running) {
            return Err(Error::WrongState {
                id: sandbox_id.into(),
                action: "create a container in",
                state: s.record.state,
                hint: "",
            });
        }
        if s.record.containers.iter().any(|c| c.id == cid) {
            return Err(Error::ContainerExists {
                sandbox: sandbox_id.into(),
                id: cid,
            });
        }
        let vm = s.vm()?.clone();
        let mut steps = crate::steps::Steps::start();
        // The VM grows first: the container's limits must fit in it. A
        // create that fails later leaves it grown until the next resize.
        let size = self.size_with(&s, Some((&cid, &config.resources)))?;
        if s.vm()?.state().size() != size {
            let fitted = self.fit_vm(&mut s, size).await;
            // The record says what the VM now is, whatever happens next.
            self.inner.store.save(&s.record)?;
            fitted?;
        }
        steps.mark("sized");
        // Records from before hostnames were kept have none: the ID then.
        let hostname = if s.record.hostname.is_empty() {
            sandbox_id.to_string()
        } else {
            s.record.hostname.clone()
        };
        // Built where only the host writes; the guest sees it read-only.
        let run_dir = self.vm_run_dir(&s.record);
        let container_dir = mounts::host_share(&run_dir).join(&cid);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&container_dir)
            .map_err(|source| Error::Io {
                action: "create",
                path: container_dir.clone(),
                source,
            })?;
        let mut attached = None;
        let mut in_guest = false;
        let created = async {
            let (guest_rootfs, rootfs_mount) = match &config.rootfs {
                Rootfs::Dir(dir) => {
                    let shared_rel = format!("{cid}/rootfs");
                    let target = container_dir.join("rootfs");
                    std::fs::create_dir(&target).map_err(|source| Error::Io {
                        action: "create",
                        path: target.clone(),
                        source,
                    })?;
                    mounts::bind(dir, &target)?;
                    (GuestRootfs::Shared(shared_rel), target)
                }
                Rootfs::Block {
                    image,
                    format,
                    fstype,
                } => {
                    let disk = hypervisor::Disk {
                        path: image.clone(),
                        format: *format,
                        readonly: false,
                    };
                    let address = vm
                        .add_disk(&disk)
                        .await
                        .map_err(|source| Error::Hypervisor {
                            id: sandbox_id.into(),
                            source,
                        })?;
                    attached = Some(address);
                    let rootfs = GuestRootfs::Disk {
                        address,
                        fstype: fstype.clone(),
                    };
                    (rootfs, std::path::PathBuf::new())
                }
            };
            let guest_sources = share_mounts(&config, &sources, &container_dir)?;
            steps.mark("shared");
            let spec = crate::oci::spec(&config, &hostname, &guest_sources)
                .map_err(|e| invalid(e.to_string()))?;
            self.agent(sandbox_id, vm.as_ref())
                .await?
                .create_container(
                    &cid,
                    &spec,
                    &guest_rootfs,
                    &crate::agent::CreateOptions {
                        stdin: config.stdin,
                        sandbox_pidns: config.share_pid_namespace,
                        sandbox_ipcns: config.share_ipc_namespace,
                        all_devices: config.privileged,
                    },
                )
                .await
                .map_err(|e| Error::from_agent(&cid, "create", e))?;
            in_guest = true;
            steps.mark("in guest");
            // The guest holds the container; no record names it yet.
            self.fail_point("create_container.guest_created")?;
            Ok(rootfs_mount)
        }
        .await;
        let rootfs_mount = match created {
            Ok(m) => m,
            Err(err) => {
                if in_guest {
                    self.discard_guest_container(sandbox_id, vm.as_ref(), &cid)
                        .await;
                }
                if let Some(address) = attached {
                    if let Err(e) = vm.remove_disk(address).await {
                        tracing::warn!(container = %cid, "undo disk attach: {e}");
                    }
                }
                if let Err(e) = mounts::remove_container_share(&run_dir, &cid) {
                    tracing::warn!(container = %cid, "undo the container's shares: {e}");
                }
                return Err(err);
            }
        };
        let record = ContainerRecord {
            id: cid.clone(),
            state: ContainerState::Created,
            rootfs_mount,
            rootfs_disk: attached,
            log_path: config.log_path.clone(),
            exit_code: None,
            reason: None,
            message: None,
            created_at: now_secs(),
            tty: config.tty,
            started_at_ns: None,
            finished_at_ns: None,
            resources: config.resources.clone(),
        };
        let status = record.status(sandbox_id);
        s.record.containers.push(record);
        // The VM's attached disks are part of its state.
        s.record.vm = Some(vm.state());
        self.inner.store.save(&s.record)?;
        drop(s);
        self.spawn_container_monitor(sandbox_id, &cid);
        steps.mark("saved");
        tracing::info!(sandbox = %sandbox_id, container = %cid, ?steps, "container created (ms since the sandbox was locked)");
        Ok(status)
    }
}

impl Runtime {
    /// Removes a container the guest holds but no record names (a create
    /// undone, or found after a crash); best effort, logged.
    pub(crate) async fn discard_guest_container(
        &self,
        sandbox_id: &str,
        vm: &dyn hypervisor::Hypervisor,
        cid: &str,
    ) {
        let removed = match self.agent(sandbox_id, vm).await {
            Ok(agent) => match agent.remove_container(cid, true).await {
                Ok(()) => Ok(()),
                Err(e) if e.code == Some(crate::agent::AgentCode::NotFound) => Ok(()),
                Err(e) => Err(e.to_string()),
            },
            Err(err) => Err(err.to_string()),
        };
        if let Err(err) = removed {
            tracing::warn!(sandbox = %sandbox_id, container = %cid, "removing an unrecorded container from the guest: {err}");
        }
    }

    /// A mount source must be an existing absolute host path, with no `..`,
    /// and not inside the runtime's own state or run directory; its
    /// destination an absolute container path. Returns the source opened
    /// (symlinks followed, as containerd resolves a hostPath), which is what
    /// gets mounted.
    fn open_mount_source(&self, m: &Mount) -> std::result::Result<MountSource, String> {
        let src = &m.source;
        if !src.is_absolute() || src.components().any(|c| c == Component::ParentDir) {
            return Err(format!(
                "mount source {} must be an absolute path without '..'",
                src.display()
            ));
        }
        if !m.destination.starts_with('/') || m.destination.split('/').any(|c| c == "..") {
            return Err(format!(
                "mount destination {:?} must be an absolute path without '..'",
                m.destination
            ));
        }
        let source = MountSource::open(src)?;
        let config = self.config();
        for own in [&config.state_dir, &config.run_dir] {
            let own = own.canonicalize().unwrap_or_else(|_| own.clone());
            if source.real.starts_with(&own) || own.starts_with(&source.real) {
                return Err(format!(
                    "mount source {} overlaps the runtime's own directory {}",
                    src.display(),
                    own.display()
                ));
            }
        }
        Ok(source)
    }
}

/// A mount source, opened once: the path it resolved to (for the checks)
/// and the descriptor the mount is made from.
struct MountSource {
    fd: std::os::fd::OwnedFd,
    real: std::path::PathBuf,
    is_dir: bool,
}

impl MountSource {
    fn open(path: &Path) -> std::result::Result<Self, String> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let failed = |e: std::io::Error| format!("mount source {}: {e}", path.display());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_PATH | nix::libc::O_CLOEXEC)
            .open(path)
            .map_err(failed)?;
        let fd = std::os::fd::OwnedFd::from(file);
        let proc_path = Self::proc_path_of(&fd);
        let real = std::fs::read_link(&proc_path).map_err(failed)?;
        let is_dir = std::fs::metadata(&proc_path).map_err(failed)?.is_dir();
        Ok(Self { fd, real, is_dir })
    }

    fn proc_path_of(fd: &std::os::fd::OwnedFd) -> std::path::PathBuf {
        use std::os::fd::AsRawFd as _;
        std::path::PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
    }

    /// The path a mount takes this source by: the descriptor's own link.
    fn mount_path(&self) -> std::path::PathBuf {
        Self::proc_path_of(&self.fd)
    }
}

/// Bind-mounts each opened mount source into the container's host-only
/// directory (read-only ones read-only on the host already); returns their
/// paths as the guest sees them.
fn share_mounts(
    config: &ContainerConfig,
    sources: &[MountSource],
    container_dir: &Path,
) -> Result<Vec<String>> {
    let mut guest = Vec::new();
    for (i, (m, source)) in config.mounts.iter().zip(sources).enumerate() {
        let target = container_dir.join("mounts").join(i.to_string());
        let made = if source.is_dir {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&target)
        } else {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(container_dir.join("mounts"))
                .and_then(|()| std::fs::File::create(&target).map(drop))
        };
        made.map_err(|source| Error::Io {
            action: "create",
            path: target.clone(),
            source,
        })?;
        mounts::bind_propagating(
            &source.mount_path(),
            &target,
            m.propagation == crate::container::MountPropagation::HostToContainer,
        )?;
        if m.readonly {
            mounts::remount_readonly(&target)?;
        }
        guest.push(format!(
            "{}/{}/mounts/{i}",
            agent::SHARED_FS_GUEST_PATH,
            config.id
        ));
    }
    Ok(guest)
}
