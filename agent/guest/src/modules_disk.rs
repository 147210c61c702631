//! The read-only modules disk: the guest kernel's whole module tree (built
//! by `hack/build-guest.sh` as `modules.img`, root `<release>/`), attached by
//! the host as a virtio-blk disk with serial [`agent::MODULES_DISK_SERIAL`].
//! Mounted once the later modules are loaded (virtio_blk and ext4 are among
//! them), off the boot's critical path; only then is the kernel's modprobe
//! helper pointed at the agent (see `modprobe.rs`).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Where the kernel's usermode helper runs modprobe; `/sbin/modprobe` in
/// the initramfs is a symlink to `/init`.
pub const MODPROBE_PATH: &str = "/sbin/modprobe";
const MODPROBE_SYSCTL: &str = "/proc/sys/kernel/modprobe";
/// The disk itself is mounted here; its `<release>/` is bound onto
/// `/lib/modules/<release>`.
const DISK_MOUNT: &str = "/run/vc/modules";
/// Exists while the disk is being mounted: modprobe waits for the mount
/// (bounded) only then, and fails at once otherwise.
pub const PENDING: &str = "/run/vc/modules.pending";

/// Until the disk is mounted the kernel has no modprobe, as before the disk
/// existed: an empty path makes `request_module` fail without starting a
/// helper (the kernel's default, `/sbin/modprobe`, would start the agent).
pub fn disable_modprobe() -> anyhow::Result<()> {
    std::fs::write(MODPROBE_SYSCTL, b"\n").context(MODPROBE_SYSCTL)
}

/// Finds the modules disk, mounts it read-only at `/lib/modules/<release>`
/// and makes the agent the kernel's modprobe. `Ok(None)`: the VM has no
/// modules disk (the host's `hypervisor.modules` found no image).
pub fn mount_and_enable() -> anyhow::Result<Option<PathBuf>> {
    let Some(dev) = find_disk(Path::new("/sys/block"), agent::MODULES_DISK_SERIAL) else {
        return Ok(None);
    };
    let release = nix::sys::utsname::uname()
        .context("uname")?
        .release()
        .to_string_lossy()
        .into_owned();
    std::fs::create_dir_all("/run/vc").context("mkdir /run/vc")?;
    std::fs::write(PENDING, b"").context(PENDING)?;
    let mounted = std::fs::write(MODPROBE_SYSCTL, MODPROBE_PATH)
        .context(MODPROBE_SYSCTL)
        .and_then(|()| mount_disk(&dev, &release));
    let _ = std::fs::remove_file(PENDING);
    match mounted {
        Ok(target) => Ok(Some(target)),
        Err(err) => {
            let _ = disable_modprobe();
            Err(err)
        }
    }
}

fn mount_disk(dev: &Path, release: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(DISK_MOUNT).with_context(|| format!("mkdir {DISK_MOUNT}"))?;
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
    // The device node may lag its sysfs entry by a moment.
    let mut attempt = 0;
    loop {
        match mount(Some(dev), DISK_MOUNT, Some("ext4"), flags, None::<&str>) {
            Ok(()) => break,
            Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENXIO) if attempt < 100 => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(err) => {
                return Err(err)
                    .with_context(|| format!("mount {} (ext4) at {DISK_MOUNT}", dev.display()))
            }
        }
    }
    let tree = Path::new(DISK_MOUNT).join(release);
    if !tree.join("modules.dep").is_file() {
        let found: Vec<String> = std::fs::read_dir(DISK_MOUNT)
            .map(|dir| {
                dir.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != "lost+found")
                    .collect()
            })
            .unwrap_or_default();
        let _ = umount2(DISK_MOUNT, MntFlags::MNT_DETACH);
        anyhow::bail!(
            "the modules disk has no modules.dep for kernel {release} (it has {found:?})"
        );
    }
    let target = Path::new("/lib/modules").join(release);
    let bound = std::fs::create_dir_all(&target)
        .with_context(|| format!("mkdir {}", target.display()))
        .and_then(|()| {
            mount(
                Some(&tree),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .with_context(|| format!("bind {} on {}", tree.display(), target.display()))
        })
        .and_then(|()| {
            // A bind mount takes its own flags only on a remount.
            mount(
                None::<&str>,
                &target,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_BIND | flags,
                None::<&str>,
            )
            .with_context(|| format!("remount {} read-only", target.display()))
        });
    if let Err(err) = bound {
        let _ = umount2(&target, MntFlags::MNT_DETACH);
        let _ = umount2(DISK_MOUNT, MntFlags::MNT_DETACH);
        return Err(err);
    }
    Ok(target)
}

/// `/dev/<name>` of the block device under `sys_block` whose `serial` is
/// `serial` (virtio-blk exposes it).
fn find_disk(sys_block: &Path, serial: &str) -> Option<PathBuf> {
    let mut names: Vec<_> = std::fs::read_dir(sys_block)
        .ok()?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    names.sort();
    names.into_iter().find_map(|name| {
        let found = std::fs::read_to_string(sys_block.join(&name).join("serial")).ok()?;
        (found.trim() == serial).then(|| Path::new("/dev").join(name))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disk_is_found_by_its_serial() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, serial) in [
            ("vda", Some("other")),
            ("vdb", Some("vc-modules\n")),
            ("sda", None),
        ] {
            std::fs::create_dir(dir.path().join(name)).expect("mkdir");
            if let Some(serial) = serial {
                std::fs::write(dir.path().join(name).join("serial"), serial).expect("write");
            }
        }
        assert_eq!(
            find_disk(dir.path(), "vc-modules"),
            Some(PathBuf::from("/dev/vdb"))
        );
        assert_eq!(find_disk(dir.path(), "nope"), None);
        assert_eq!(find_disk(&dir.path().join("missing"), "vc-modules"), None);
    }
}
