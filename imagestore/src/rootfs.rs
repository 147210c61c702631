//! Container rootfs as a directory: a host overlayfs mount whose lowerdirs are
//! the image's layer snapshots and whose upper/work dirs are per container
//! (`<root>/containers/<cid>/{upper,work,rootfs}`).
//!
//! The overlay is composed on the host, not in the guest: virtiofsd then
//! shares one ready tree into the VM, and the guest needs no overlayfs over
//! virtio-fs (which would need the layers shared individually and an overlay
//! with a virtio-fs upper). The container's writes land in its own upper dir.

use std::path::{Path, PathBuf};

use rustix::mount::{MountFlags, UnmountFlags};

use crate::digest::Digest;
use crate::error::{ImageError, Result};
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
        let _gc = self.gc.read().await;
        let image = self.image_status(image_ref)?;
        self.claim_container_dir(container_id, &dir)?;
        let (upper, work, rootfs) = (dir.join("upper"), dir.join("work"), dir.join("rootfs"));
        let res = (|| {
            for d in [&upper, &work, &rootfs] {
                std::fs::create_dir(d).map_err(|e| ImageError::io("create", d, e))?;
            }
            let lowers = lowerdirs(self, &image.chain_ids, None)?;
            let data = format!(
                "lowerdir={lowers},upperdir={},workdir={}",
                option_path(&upper)?,
                option_path(&work)?
            );
            mount_overlay(&rootfs, &data, MountFlags::empty())?;
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
        let rootfs = dir.join("rootfs");
        unmount_if_mounted(&rootfs)?;
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
            unmount_if_mounted(&dir.join("rootfs"))?;
            remove_dir(dir).map_err(|e| ImageError::io("remove stale", dir, e))?;
        }
        std::fs::create_dir(dir).map_err(|e| ImageError::io("create", dir, e))
    }
}

/// `top:...:bottom[:extra]` of the snapshot dirs, checking each exists.
pub(crate) fn lowerdirs(
    store: &ImageStore,
    chain_ids: &[Digest],
    extra: Option<&Path>,
) -> Result<String> {
    let mut parts = Vec::with_capacity(chain_ids.len() + 1);
    for c in chain_ids.iter().rev() {
        let p = store.snapshot_path(c);
        if !p.is_dir() {
            return Err(ImageError::io(
                "find snapshot",
                p,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        parts.push(option_path(&p)?);
    }
    if let Some(e) = extra {
        parts.push(option_path(e)?);
    }
    Ok(parts.join(":"))
}

/// A path usable inside overlay mount options (no `,` `:` `\`).
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

pub(crate) fn mount_overlay(target: &Path, data: &str, flags: MountFlags) -> Result<()> {
    let cdata = std::ffi::CString::new(data).map_err(|_| {
        ImageError::io(
            "build overlay options for",
            target,
            std::io::Error::from(std::io::ErrorKind::InvalidInput),
        )
    })?;
    rustix::mount::mount("overlay", target, "overlay", flags, cdata.as_c_str()).map_err(|source| {
        ImageError::Mount {
            action: "mount overlay on",
            path: target.to_path_buf(),
            source,
        }
    })
}

pub(crate) fn unmount_if_mounted(path: &Path) -> Result<()> {
    match rustix::mount::unmount(path, UnmountFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(source) => Err(ImageError::Mount {
            action: "unmount",
            path: path.to_path_buf(),
            source,
        }),
    }
}
