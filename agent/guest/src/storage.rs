//! The sandbox's shared filesystem, mounted once: by the agent's start-up
//! (a template's clone: once personalized, see `startup.rs`) or the first
//! container, whichever comes first, after the background module load
//! (virtiofs and 9p are among the later modules).

use std::sync::Arc;

use nix::mount::{mount, MsFlags};
use tokio::sync::{watch, OnceCell};

#[derive(Debug, Clone)]
pub struct Storage {
    modules_loaded: watch::Receiver<bool>,
    mounted: Arc<OnceCell<Result<&'static str, String>>>,
}

impl Storage {
    pub fn new(modules_loaded: watch::Receiver<bool>) -> Self {
        Self {
            modules_loaded,
            mounted: Arc::default(),
        }
    }

    /// Mounts the shared filesystem (virtio-fs, else 9p) if not yet done;
    /// returns the filesystem type.
    pub async fn shared(&self) -> Result<&'static str, String> {
        let mut loaded = self.modules_loaded.clone();
        if loaded.wait_for(|done| *done).await.is_err() {
            return Err("the module loader stopped".into());
        }
        self.mounted
            .get_or_init(|| async {
                tokio::task::spawn_blocking(mount_shared)
                    .await
                    .unwrap_or_else(|e| Err(format!("mount task: {e}")))
            })
            .await
            .clone()
    }
}

fn mount_shared() -> Result<&'static str, String> {
    let target = agent::SHARED_FS_GUEST_PATH;
    std::fs::create_dir_all(target).map_err(|e| format!("mkdir {target}: {e}"))?;
    let virtiofs = mount(
        Some(agent::SHARED_FS_TAG),
        target,
        Some("virtiofs"),
        MsFlags::MS_NODEV,
        None::<&str>,
    );
    if virtiofs.is_ok() {
        return Ok("virtiofs");
    }
    let opts = "trans=virtio,version=9p2000.L,msize=524288,cache=mmap";
    match mount(
        Some(agent::SHARED_FS_TAG),
        target,
        Some("9p"),
        MsFlags::MS_NODEV,
        Some(opts),
    ) {
        Ok(()) => Ok("9p"),
        Err(e9p) => Err(format!(
            "cannot mount the shared filesystem {:?}: virtiofs: {}, 9p: {e9p}",
            agent::SHARED_FS_TAG,
            virtiofs.err().map(|e| e.to_string()).unwrap_or_default()
        )),
    }
}

/// Where block-device rootfs are mounted: `<BLOCK_MOUNTS>/<container id>`.
const BLOCK_MOUNTS: &str = "/run/vc/blocks";
/// How long a hot-plugged disk may take to appear.
const DISK_APPEAR_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// A container's rootfs disk, mounted at `mountpoint`.
#[derive(Debug, Clone)]
pub struct BlockMount {
    pub mountpoint: std::path::PathBuf,
    /// `/sys/bus/scsi/devices/H:C:T:L`, to let the device go after unmount.
    scsi_device: std::path::PathBuf,
}

impl Storage {
    /// Waits for the SCSI disk at `target`:`lun` and mounts its filesystem
    /// for container `id`.
    pub async fn mount_block(
        &self,
        id: &str,
        target: u32,
        lun: u32,
        fstype: &str,
    ) -> Result<BlockMount, String> {
        if !matches!(fstype, "ext4" | "ext3" | "ext2" | "xfs") {
            return Err(format!("unsupported rootfs filesystem {fstype:?}"));
        }
        let mut loaded = self.modules_loaded.clone();
        if loaded.wait_for(|done| *done).await.is_err() {
            return Err("the module loader stopped".into());
        }
        let deadline = tokio::time::Instant::now() + DISK_APPEAR_TIMEOUT;
        let mut rescanned = false;
        let (scsi_device, dev) = loop {
            if let Some(found) = find_scsi_disk(target, lun) {
                break found;
            }
            if !rescanned {
                // The controller's hot-plug event normally adds the disk;
                // a scan request covers a guest that missed it.
                rescan(target, lun);
                rescanned = true;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "no disk appeared at SCSI target {target} LUN {lun} within {}s",
                    DISK_APPEAR_TIMEOUT.as_secs()
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        let mountpoint = std::path::Path::new(BLOCK_MOUNTS).join(id);
        let fstype = fstype.to_string();
        let mp = mountpoint.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&mp).map_err(|e| format!("mkdir {}: {e}", mp.display()))?;
            // The device node may lag its sysfs entry by a moment.
            let mut last = None;
            for _ in 0..200 {
                match mount(
                    Some(&dev),
                    &mp,
                    Some(fstype.as_str()),
                    MsFlags::empty(),
                    None::<&str>,
                ) {
                    Ok(()) => return Ok(()),
                    Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENXIO) => {
                        last = Some(nix::errno::Errno::ENOENT);
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(e) => {
                        last = Some(e);
                        break;
                    }
                }
            }
            let _ = std::fs::remove_dir(&mp);
            Err(format!(
                "cannot mount {} ({fstype}) at {}: {}",
                dev.display(),
                mp.display(),
                last.map(|e| e.to_string()).unwrap_or_default()
            ))
        })
        .await
        .map_err(|e| format!("mount task: {e}"))??;
        Ok(BlockMount {
            mountpoint,
            scsi_device,
        })
    }
}

impl BlockMount {
    /// Unmounts the rootfs and removes the SCSI device from the guest, so the
    /// host can detach the disk.
    pub fn release(&self) -> Result<(), String> {
        use nix::mount::{umount2, MntFlags};
        match umount2(&self.mountpoint, MntFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
            // Something still holds it (a process that escaped the cgroup):
            // detach it lazily; the filesystem goes once that lets go.
            Err(nix::errno::Errno::EBUSY) => {
                umount2(&self.mountpoint, MntFlags::MNT_DETACH)
                    .map_err(|e| format!("unmount {}: {e}", self.mountpoint.display()))?;
            }
            Err(e) => return Err(format!("unmount {}: {e}", self.mountpoint.display())),
        }
        let _ = std::fs::remove_dir(&self.mountpoint);
        let delete = self.scsi_device.join("delete");
        if delete.exists() {
            std::fs::write(&delete, b"1").map_err(|e| format!("{}: {e}", delete.display()))?;
        }
        Ok(())
    }
}

/// The sysfs directory and `/dev` node of the disk at `target`:`lun` on
/// any SCSI host (there is one virtio-scsi controller).
fn find_scsi_disk(target: u32, lun: u32) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let suffix = format!(":0:{target}:{lun}");
    for entry in std::fs::read_dir("/sys/bus/scsi/devices").ok()?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.ends_with(&suffix) || name.matches(':').count() != 3 {
            continue;
        }
        let block = entry.path().join("block");
        let disk = std::fs::read_dir(&block).ok()?.flatten().next()?;
        return Some((
            entry.path(),
            std::path::Path::new("/dev").join(disk.file_name()),
        ));
    }
    None
}

/// Asks every SCSI host to scan for `target`:`lun`.
fn rescan(target: u32, lun: u32) {
    let Ok(hosts) = std::fs::read_dir("/sys/class/scsi_host") else {
        return;
    };
    for host in hosts.flatten() {
        let _ = std::fs::write(host.path().join("scan"), format!("0 {target} {lun}"));
    }
}
