//! Container rootfs as a directory: a host overlayfs mount whose lowerdirs are
//! the image's layer snapshots and whose upper/work dirs are per container
//! (`<root>/containers/<cid>/{upper,work,rootfs}`).
//!
//! The overlay is composed on the host, not in the guest: virtiofsd then
//! shares one ready tree into the VM, and the guest needs no overlayfs over
//! virtio-fs (which would need the layers shared individually and an overlay
//! with a virtio-fs upper). The container's writes land in its own upper dir.

use std::path::{Path, PathBuf};

use rustix::io::Errno;
use rustix::mount::{MountFlags, UnmountFlags};

use crate::digest::Digest;
use crate::error::{ImageError, Result};
use crate::locks::{snapshot_key, Lease};
use crate::metadata::{ContainerRootfs, RootfsKind};
use crate::snapshot::remove_dir;
use crate::store::ImageStore;

impl ImageStore {
    /// Mounts the rootfs of a new container and returns the mounted directory.
    pub async fn prepare_rootfs(&self, image_ref: &str, container_id: &str) -> Result<PathBuf> {
        let dir = self.container_dir(container_id)?;
        let _c = self
            .image_locks
            .lock(&format!("container/{container_id}"))
            .await;
        // The image's snapshots are leased, not locked: a collection running
        // meanwhile spares them, and none waits for this mount.
        let mut lease = Lease::new(&self.leases);
        let image = {
            let _gc = self.gc.read().await;
            let image = self.image_status(image_ref)?;
            lease.extend(image.chain_ids.iter().map(snapshot_key));
            image
        };
        self.claim_container_dir(container_id, &dir)?;
        let rootfs = dir.join("rootfs");
        let (upper, work) = match self.config.writable_layer_max_mib.filter(|m| *m > 0) {
            Some(mib) => match bounded_layer(&dir, mib).await {
                Ok(layer) => (layer.join("upper"), layer.join("work")),
                Err(e) => {
                    let _ = unmount_container(&dir);
                    let _ = remove_dir(&dir);
                    return Err(e);
                }
            },
            None => (dir.join("upper"), dir.join("work")),
        };
        let res = (|| {
            for d in [&upper, &work, &rootfs] {
                std::fs::create_dir(d).map_err(|e| ImageError::io("create", d, e))?;
            }
            let lowers = lowerdirs(self, &image.chain_ids, None)?;
            mount_overlay(&rootfs, &lowers, Some((&upper, &work)))?;
            let record = ContainerRootfs {
                image_id: image.id.clone(),
                kind: RootfsKind::Overlay,
                path: rootfs.clone(),
                chain_ids: image.chain_ids.clone(),
            };
            if let Err(e) = self.meta.update(|s| {
                s.containers.insert(container_id.to_string(), record);
                Ok(())
            }) {
                let _ = rustix::mount::unmount(&rootfs, UnmountFlags::DETACH);
                return Err(e);
            }
            Ok(())
        })();
        if res.is_err() {
            let _ = unmount_container(&dir);
            let _ = remove_dir(&dir);
        }
        res.map(|()| rootfs)
    }

    /// Unmounts and deletes a container's rootfs (either kind), then frees
    /// snapshots and block images nothing else uses.
    pub async fn remove_rootfs(&self, container_id: &str) -> Result<()> {
        let dir = self.container_dir(container_id)?;
        let _c = self
            .image_locks
            .lock(&format!("container/{container_id}"))
            .await;
        let record = self.meta.read(|s| s.containers.get(container_id).cloned());
        if record.is_none() && !dir.exists() {
            return Err(ImageError::RootfsNotFound {
                container_id: container_id.to_string(),
            });
        }
        unmount_container(&dir)?;
        remove_dir(&dir).map_err(|e| ImageError::io("remove", &dir, e))?;
        self.meta.update(|s| {
            s.containers.remove(container_id);
            Ok(())
        })?;
        if let Some(r) = record {
            let _gc = self.gc.write().await;
            self.collect_garbage(&r.image_id, &[], &r.chain_ids)?;
        }
        Ok(())
    }

    /// Every container with a rootfs: recorded, or a directory a prepare
    /// that did not finish left (sorted, unique).
    pub fn rootfs_ids(&self) -> Result<Vec<String>> {
        let mut ids: std::collections::BTreeSet<String> =
            self.meta.read(|s| s.containers.keys().cloned().collect());
        let dir = self.root().join("containers");
        match std::fs::read_dir(&dir) {
            Ok(entries) => ids.extend(
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| crate::util::valid_container_id(n)),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ImageError::io("list", &dir, e)),
        }
        Ok(ids.into_iter().collect())
    }

    /// The rootfs record of a container, if any.
    pub fn container_rootfs(&self, container_id: &str) -> Option<ContainerRootfs> {
        self.meta.read(|s| s.containers.get(container_id).cloned())
    }

    /// Fails if the container has a rootfs; clears a leftover directory without a record.
    pub(crate) fn claim_container_dir(&self, container_id: &str, dir: &Path) -> Result<()> {
        if self.meta.read(|s| s.containers.contains_key(container_id)) {
            return Err(ImageError::RootfsExists {
                container_id: container_id.to_string(),
            });
        }
        if dir.exists() {
            unmount_container(dir)?;
            remove_dir(dir).map_err(|e| ImageError::io("remove stale", dir, e))?;
        }
        std::fs::create_dir(dir).map_err(|e| ImageError::io("create", dir, e))
    }
}

/// The container's writable layer on a filesystem of its own, at most
/// `mib` MiB: a sparse ext4 image (`<dir>/layer.img`, no journal, built in
/// milliseconds) loop-mounted nodev,nosuid at `<dir>/layer` (the loop
/// device goes with the unmount). A guest that fills it gets ENOSPC; the
/// host's disk keeps the rest. Returns the mount point.
async fn bounded_layer(dir: &Path, mib: u64) -> Result<PathBuf> {
    let (img, layer) = (dir.join("layer.img"), dir.join("layer"));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&img)
        .map_err(|e| ImageError::io("create", &img, e))?;
    file.set_len(mib << 20)
        .map_err(|e| ImageError::io("size", &img, e))?;
    drop(file);
    std::fs::create_dir(&layer).map_err(|e| ImageError::io("create", &layer, e))?;
    crate::block::run_tool(
        "mkfs.ext4",
        &[
            "-q".as_ref(),
            "-F".as_ref(),
            "-m".as_ref(),
            "0".as_ref(),
            "-O".as_ref(),
            "^has_journal".as_ref(),
            "-E".as_ref(),
            "nodiscard".as_ref(),
            img.as_os_str(),
        ],
        &img,
    )
    .await?;
    crate::block::run_tool(
        "mount",
        &[
            "-t".as_ref(),
            "ext4".as_ref(),
            "-o".as_ref(),
            "loop,nodev,nosuid,noatime".as_ref(),
            img.as_os_str(),
            layer.as_os_str(),
        ],
        &layer,
    )
    .await?;
    Ok(layer)
}

/// Detaches a container dir's mounts: the overlay, then its bounded layer.
fn unmount_container(dir: &Path) -> Result<()> {
    unmount_if_mounted(&dir.join("rootfs"))?;
    unmount_if_mounted(&dir.join("layer"))
}

/// The snapshot dirs, top layer first, plus `extra` at the bottom; each must exist.
pub(crate) fn lowerdirs(
    store: &ImageStore,
    chain_ids: &[Digest],
    extra: Option<&Path>,
) -> Result<Vec<PathBuf>> {
    let mut out = Vec::with_capacity(chain_ids.len() + 1);
    for c in chain_ids.iter().rev() {
        let p = store.snapshot_path(c);
        if !p.is_dir() {
            return Err(ImageError::io(
                "find snapshot",
                p,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        out.push(p);
    }
    out.extend(extra.map(Path::to_path_buf));
    Ok(out)
}

/// Mounts an overlay at `target`: read-only when there is no upper dir.
///
/// Uses the new mount API with one `lowerdir+` per layer (Linux 6.8+), which
/// has no limit on the number of layers; older kernels get `mount(2)` with
/// the options in one page (about 30 layers with a short root).
pub(crate) fn mount_overlay(
    target: &Path,
    lowers: &[PathBuf],
    upper_work: Option<(&Path, &Path)>,
) -> Result<()> {
    let mount_err = |source| ImageError::Mount {
        action: "mount overlay on",
        path: target.to_path_buf(),
        source,
    };
    match mount_overlay_fsconfig(target, lowers, upper_work) {
        Ok(()) => return Ok(()),
        // No new mount API, or no `lowerdir+`: fall back to mount(2).
        Err(Errno::NOSYS) | Err(Errno::INVAL) => {}
        Err(e) => return Err(mount_err(e)),
    }
    mount_overlay_legacy(target, lowers, upper_work)
}

fn mount_overlay_legacy(
    target: &Path,
    lowers: &[PathBuf],
    upper_work: Option<(&Path, &Path)>,
) -> Result<()> {
    let mount_err = |source| ImageError::Mount {
        action: "mount overlay on",
        path: target.to_path_buf(),
        source,
    };
    let mut data = String::from("lowerdir=");
    let parts = lowers
        .iter()
        .map(|p| option_path(p))
        .collect::<Result<Vec<_>>>()?;
    data.push_str(&parts.join(":"));
    // An image's device nodes and set-id files mean nothing on the host.
    let mut flags = MountFlags::RDONLY | MountFlags::NODEV | MountFlags::NOSUID;
    if let Some((upper, work)) = upper_work {
        data.push_str(&format!(
            ",upperdir={},workdir={}",
            option_path(upper)?,
            option_path(work)?
        ));
        flags = MountFlags::NODEV | MountFlags::NOSUID;
    }
    let cdata = std::ffi::CString::new(data).map_err(|_| mount_err(Errno::INVAL))?;
    rustix::mount::mount("overlay", target, "overlay", flags, cdata.as_c_str()).map_err(mount_err)
}

fn mount_overlay_fsconfig(
    target: &Path,
    lowers: &[PathBuf],
    upper_work: Option<(&Path, &Path)>,
) -> rustix::io::Result<()> {
    use rustix::mount::{
        fsconfig_create, fsconfig_set_string, fsmount, fsopen, move_mount, FsMountFlags,
        FsOpenFlags, MountAttrFlags, MoveMountFlags,
    };
    let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)?;
    for l in lowers {
        fsconfig_set_string(&fs, "lowerdir+", l)?;
    }
    let host_safe = MountAttrFlags::MOUNT_ATTR_NODEV | MountAttrFlags::MOUNT_ATTR_NOSUID;
    let mut attrs = MountAttrFlags::MOUNT_ATTR_RDONLY | host_safe;
    if let Some((upper, work)) = upper_work {
        fsconfig_set_string(&fs, "upperdir", upper)?;
        fsconfig_set_string(&fs, "workdir", work)?;
        attrs = host_safe;
    }
    fsconfig_create(&fs)?;
    let mnt = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs)?;
    move_mount(
        &mnt,
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
}

/// A path usable inside mount(2) overlay options (no `,` `:` `\`).
fn option_path(p: &Path) -> Result<String> {
    let s = p.to_str().unwrap_or_default();
    if s.is_empty() || s.contains([',', ':', '\\']) {
        return Err(ImageError::io(
            "use in overlay options",
            p,
            std::io::Error::from(std::io::ErrorKind::InvalidInput),
        ));
    }
    Ok(s.to_string())
}

/// Makes `dir` a nodev,nosuid mount (a bind onto itself) unless the
/// filesystem it is on is both already — then, too, after a restart.
pub(crate) fn inert_on_host(dir: &Path) -> Result<()> {
    use rustix::fs::StatVfsMountFlags as F;
    let flags = rustix::fs::statvfs(dir)
        .map_err(|e| ImageError::io("statvfs", dir, e.into()))?
        .f_flag;
    if flags.contains(F::NODEV | F::NOSUID) {
        return Ok(());
    }
    let failed = |action: &'static str| {
        move |source| ImageError::Mount {
            action,
            path: dir.to_path_buf(),
            source,
        }
    };
    // Recursive: overlays already mounted below (a restart with containers
    // running) come along.
    rustix::mount::mount_bind_recursive(dir, dir).map_err(failed("bind onto itself"))?;
    rustix::mount::mount_remount(
        dir,
        MountFlags::BIND | MountFlags::NODEV | MountFlags::NOSUID,
        "",
    )
    .map_err(|e| {
        let _ = rustix::mount::unmount(dir, UnmountFlags::DETACH);
        failed("remount nodev,nosuid")(e)
    })
}

pub(crate) fn unmount_if_mounted(path: &Path) -> Result<()> {
    // Detached, not waited for: a VM's virtiofsd may still hold files of a
    // container's rootfs open for a moment after the guest let go of them
    // (EBUSY otherwise, and a rootfs left behind).
    match rustix::mount::unmount(path, UnmountFlags::DETACH) {
        Ok(()) | Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(source) => Err(ImageError::Mount {
            action: "unmount",
            path: path.to_path_buf(),
            source,
        }),
    }
}

impl ImageStore {
    /// A small regular file of the image's flattened rootfs (`etc/passwd`,
    /// say), read from the layer snapshots top-down without mounting them:
    /// a whiteout or an opaque directory ends the search, and no symlink is
    /// followed (neither for the file nor its parents). `None` when the image
    /// has no such regular file of at most 4 MiB.
    pub fn image_file(&self, image_ref: &str, rel: &str) -> Result<Option<Vec<u8>>> {
        let image = self.image_status(image_ref)?;
        let rel = Path::new(rel);
        if rel.is_absolute()
            || rel.as_os_str().is_empty()
            || !rel
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        {
            return Ok(None);
        }
        for layer in lowerdirs(self, &image.chain_ids, None)? {
            match layer_lookup(&layer, rel) {
                Lookup::Found(bytes) => return Ok(Some(bytes)),
                Lookup::Hidden => return Ok(None),
                Lookup::Absent => {}
            }
        }
        Ok(None)
    }
}

enum Lookup {
    Found(Vec<u8>),
    /// Deleted or hidden by this layer (whiteout, opaque dir, non-file).
    Hidden,
    Absent,
}

fn layer_lookup(layer: &Path, rel: &Path) -> Lookup {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let mut dir = layer.to_path_buf();
    let parts: Vec<_> = rel.components().collect();
    // A directory of this layer marked opaque hides what lower layers hold
    // beneath it.
    let mut opaque = false;
    for (i, part) in parts.iter().enumerate() {
        opaque = opaque || (i > 0 && is_opaque(&dir));
        let path = dir.join(part);
        let Ok(md) = std::fs::symlink_metadata(&path) else {
            return if opaque {
                Lookup::Hidden
            } else {
                Lookup::Absent
            };
        };
        let last = i + 1 == parts.len();
        if md.file_type().is_char_device() && md.rdev() == 0 {
            return Lookup::Hidden; // overlay whiteout
        }
        if last {
            if !md.is_file() || md.len() > 4 << 20 {
                return Lookup::Hidden;
            }
            return match std::fs::read(&path) {
                Ok(bytes) => Lookup::Found(bytes),
                Err(_) => Lookup::Hidden,
            };
        }
        if !md.is_dir() {
            return Lookup::Hidden; // a symlink or file where a directory was
        }
        dir = path;
    }
    Lookup::Absent
}

fn is_opaque(dir: &Path) -> bool {
    rustix::fs::lgetxattr(dir, "trusted.overlay.opaque", &mut [0u8; 4])
        .map(|n| n == 1)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = unmount_if_mounted(&self.0);
        }
    }

    /// Both mount paths (new API and mount(2)) give the same merged view.
    #[test]
    fn overlay_mounts_with_both_apis() {
        let dir = tempfile::tempdir().unwrap();
        let d = |n: &str| {
            let p = dir.path().join(n);
            std::fs::create_dir(&p).unwrap();
            p
        };
        let (top, bottom) = (d("top"), d("bottom"));
        std::fs::write(top.join("f"), b"top").unwrap();
        std::fs::write(bottom.join("f"), b"bottom").unwrap();
        std::fs::write(bottom.join("g"), b"g").unwrap();
        let lowers = vec![top, bottom];
        type Mounter = fn(&Path, &[PathBuf], Option<(&Path, &Path)>) -> Result<()>;
        let mounters: [(&str, Mounter); 2] = [
            ("fsconfig", |t, l, u| {
                mount_overlay_fsconfig(t, l, u).map_err(|source| ImageError::Mount {
                    action: "mount",
                    path: t.to_path_buf(),
                    source,
                })
            }),
            ("legacy", mount_overlay_legacy),
        ];
        for (name, mount) in mounters {
            let (upper, work, mnt) = (
                d(&format!("{name}-u")),
                d(&format!("{name}-w")),
                d(&format!("{name}-m")),
            );
            mount(&mnt, &lowers, Some((&upper, &work))).unwrap();
            let _g = Unmount(mnt.clone());
            assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"top", "{name}");
            assert_eq!(std::fs::read(mnt.join("g")).unwrap(), b"g", "{name}");
            std::fs::write(mnt.join("new"), b"n").unwrap();
            assert_eq!(std::fs::read(upper.join("new")).unwrap(), b"n", "{name}");
            drop(_g);
            let ro = d(&format!("{name}-ro"));
            mount(&ro, &lowers, None).unwrap();
            let _g = Unmount(ro.clone());
            assert_eq!(std::fs::read(ro.join("f")).unwrap(), b"top", "{name}");
            assert!(
                std::fs::write(ro.join("x"), b"x").is_err(),
                "{name}: read-only"
            );
        }
    }

    fn found(layers: &[&Path], rel: &str) -> Option<Vec<u8>> {
        for l in layers {
            match layer_lookup(l, Path::new(rel)) {
                Lookup::Found(b) => return Some(b),
                Lookup::Hidden => return None,
                Lookup::Absent => {}
            }
        }
        None
    }

    #[test]
    fn image_files_honour_whiteouts_opaque_dirs_and_symlinks() {
        let t = tempfile::tempdir().expect("tempdir");
        let (top, low) = (t.path().join("top"), t.path().join("low"));
        for d in ["etc", "a/b", "opq"] {
            std::fs::create_dir_all(low.join(d)).expect("mkdir");
        }
        std::fs::write(low.join("etc/passwd"), "low").expect("write");
        std::fs::write(low.join("etc/group"), "low").expect("write");
        std::fs::write(low.join("a/b/c"), "low").expect("write");
        std::fs::write(low.join("opq/x"), "low").expect("write");
        std::fs::create_dir_all(top.join("etc")).expect("mkdir");
        std::fs::write(top.join("etc/group"), "top").expect("write");
        std::fs::create_dir_all(top.join("opq")).expect("mkdir");
        std::os::unix::fs::symlink("/etc", top.join("a")).expect("symlink");
        let layers = [top.as_path(), low.as_path()];
        assert_eq!(found(&layers, "etc/passwd").as_deref(), Some(&b"low"[..]));
        assert_eq!(found(&layers, "etc/group").as_deref(), Some(&b"top"[..]));
        // A symlink in the upper layer replaces the directory: not followed.
        assert_eq!(found(&layers, "a/b/c"), None);
        assert_eq!(found(&layers, "opq/x").as_deref(), Some(&b"low"[..]));
        if std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").expect("proc")) == 0
        {
            rustix::fs::lsetxattr(
                top.join("opq"),
                "trusted.overlay.opaque",
                b"y",
                rustix::fs::XattrFlags::empty(),
            )
            .expect("opaque xattr");
            assert_eq!(found(&layers, "opq/x"), None);
            rustix::fs::mknodat(
                rustix::fs::CWD,
                top.join("etc/passwd"),
                rustix::fs::FileType::CharacterDevice,
                rustix::fs::Mode::from_raw_mode(0),
                0,
            )
            .expect("whiteout");
            assert_eq!(found(&layers, "etc/passwd"), None);
        } else {
            eprintln!("skipping the whiteout and opaque cases: not root");
        }
    }
}
