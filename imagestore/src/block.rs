//! Container rootfs as a block device (host half): once per image an ext4
//! image built with `mkfs.ext4 -d` from the flattened layers
//! (`<root>/blockimages/<image hex>.ext4`, built under a temp name and renamed),
//! and per container a qcow2 overlay backed by it
//! (`<root>/containers/<cid>/rootfs.qcow2`), so each container's writes stay in
//! its own file. Hot-plugging it into the VM is the hypervisor's part.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use crate::digest::Digest;
use crate::error::{ImageError, Result};
use crate::locks::{block_key, snapshot_key, Lease};
use crate::metadata::{ContainerRootfs, Image, RootfsKind};
use crate::rootfs::{lowerdirs, mount_overlay, unmount_if_mounted};
use crate::snapshot::remove_dir;
use crate::store::ImageStore;

const DEFAULT_HEADROOM_MIB: u64 = 64;

impl ImageStore {
    /// Creates a container's qcow2 overlay over the image's ext4 image (built
    /// on first use) and returns the qcow2 path.
    pub async fn prepare_block_rootfs(
        &self,
        image_ref: &str,
        container_id: &str,
    ) -> Result<PathBuf> {
        let dir = self.container_dir(container_id)?;
        let _c = self
            .image_locks
            .lock(&format!("container/{container_id}"))
            .await;
        // Leased, not locked: the ext4 build (mkfs of the whole image) holds
        // up no collection, and so no other container's rootfs.
        let mut lease = Lease::new(&self.leases);
        let image = {
            let _gc = self.gc.read().await;
            let image = self.image_status(image_ref)?;
            let id = image.id.trim_start_matches("sha256:");
            lease.extend(
                image
                    .chain_ids
                    .iter()
                    .map(snapshot_key)
                    .chain([block_key(id)]),
            );
            image
        };
        let ext4 = self.ensure_block_image(&image).await?;
        self.claim_container_dir(container_id, &dir)?;
        let qcow2 = dir.join("rootfs.qcow2");
        let res = async {
            run_tool(
                "qemu-img",
                &[
                    "create".as_ref(),
                    "-q".as_ref(),
                    "-f".as_ref(),
                    "qcow2".as_ref(),
                    "-F".as_ref(),
                    "raw".as_ref(),
                    "-b".as_ref(),
                    ext4.as_os_str(),
                    qcow2.as_os_str(),
                ],
                &qcow2,
            )
            .await?;
            self.meta.update(|s| {
                s.containers.insert(
                    container_id.to_string(),
                    ContainerRootfs {
                        image_id: image.id.clone(),
                        kind: RootfsKind::Block,
                        path: qcow2.clone(),
                        chain_ids: Vec::new(),
                    },
                );
                Ok(())
            })
        }
        .await;
        if res.is_err() {
            let _ = remove_dir(&dir);
        }
        res.map(|()| qcow2)
    }

    /// The image's ext4 block image, built once and reused.
    pub async fn ensure_block_image(&self, image: &Image) -> Result<PathBuf> {
        let id = Digest::parse(&image.id)?;
        let _l = self.image_locks.lock(&format!("block/{}", id.hex())).await;
        let dir = self.root.join("blockimages");
        let path = dir.join(format!("{}.ext4", id.hex()));
        if path.is_file() {
            return Ok(path);
        }
        let stem = format!(".{}.{}", id.hex(), crate::util::unique_suffix());
        let build = BuildDirs {
            mnt: dir.join(format!("{stem}.mnt")),
            empty: dir.join(format!("{stem}.empty")),
            img: dir.join(format!("{stem}.ext4")),
            mounted: false,
        };
        let mut build = build;
        for d in [&build.mnt, &build.empty] {
            std::fs::create_dir(d).map_err(|e| ImageError::io("create", d, e))?;
        }
        // A read-only overlay of the layers (the empty dir makes even a one-layer
        // image a valid lower-only overlay) is the flattened rootfs.
        let lowers = lowerdirs(self, &image.chain_ids, Some(&build.empty))?;
        mount_overlay(&build.mnt, &lowers, None)?;
        build.mounted = true;
        let mnt = build.mnt.clone();
        let (bytes, inodes) = tokio::task::spawn_blocking(move || content_size(&mnt))
            .await
            .map_err(|_| ImageError::Task {
                what: format!("size of {}", image.id),
            })??;
        let headroom = self
            .config
            .block_headroom_mib
            .unwrap_or(DEFAULT_HEADROOM_MIB)
            << 20;
        let size_kib = (bytes + bytes / 5 + headroom).div_ceil(1 << 20) * 1024;
        let inode_count = (inodes + inodes / 4 + 4096).to_string();
        let size_arg = format!("{size_kib}k");
        run_tool(
            "mkfs.ext4",
            &[
                "-q".as_ref(),
                "-F".as_ref(),
                "-m".as_ref(),
                "0".as_ref(),
                "-N".as_ref(),
                inode_count.as_ref(),
                "-L".as_ref(),
                "rootfs".as_ref(),
                "-d".as_ref(),
                build.mnt.as_os_str(),
                build.img.as_os_str(),
                size_arg.as_ref(),
            ],
            &build.img,
        )
        .await?;
        std::fs::File::open(&build.img)
            .and_then(|f| f.sync_all())
            .map_err(|e| ImageError::io("fsync", &build.img, e))?;
        std::fs::rename(&build.img, &path)
            .map_err(|e| ImageError::io("rename into place", &path, e))?;
        crate::util::fsync_dir(&dir)?;
        tracing::info!(image = %image.id, path = %path.display(), size_kib, "built block image");
        Ok(path)
    }

    pub(crate) fn remove_block_image(&self, image_id: &str) -> Result<()> {
        let Ok(id) = Digest::parse(image_id) else {
            return Ok(());
        };
        let path = self
            .root
            .join("blockimages")
            .join(format!("{}.ext4", id.hex()));
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(ImageError::io("remove block image", path, e))
            }
            _ => Ok(()),
        }
    }
}

/// The temp mount point, empty lower and image file of a build; removed on drop.
struct BuildDirs {
    mnt: PathBuf,
    empty: PathBuf,
    img: PathBuf,
    mounted: bool,
}

impl Drop for BuildDirs {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(e) = unmount_if_mounted(&self.mnt) {
                tracing::warn!(error = %e, "block image build mount left behind");
                return;
            }
        }
        let _ = std::fs::remove_dir(&self.mnt);
        let _ = std::fs::remove_dir(&self.empty);
        let _ = std::fs::remove_file(&self.img);
    }
}

/// Bytes (rounded to 4 KiB blocks) and inodes of a tree.
fn content_size(root: &Path) -> Result<(u64, u64)> {
    let mut stack = vec![root.to_path_buf()];
    let mut seen = std::collections::HashSet::new();
    let (mut bytes, mut inodes) = (0u64, 0u64);
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).map_err(|e| ImageError::io("stat", &p, e))?;
        if md.nlink() > 1 && !md.is_dir() && !seen.insert(md.ino()) {
            continue;
        }
        inodes += 1;
        bytes += md.len().div_ceil(4096) * 4096 + 256;
        if md.is_dir() {
            for e in std::fs::read_dir(&p).map_err(|e| ImageError::io("read", &p, e))? {
                stack.push(e.map_err(|e| ImageError::io("read", &p, e))?.path());
            }
        }
    }
    Ok((bytes, inodes))
}

pub(crate) async fn run_tool(
    program: &'static str,
    args: &[&std::ffi::OsStr],
    target: &Path,
) -> Result<()> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| ImageError::Tool {
            program,
            target: target.to_path_buf(),
            detail: format!("cannot run: {e}"),
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(ImageError::Tool {
        program,
        target: target.to_path_buf(),
        detail: format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    })
}
