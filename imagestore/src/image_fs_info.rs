//! ImageFsInfo: bytes and inodes used under the store root.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use crate::error::{ImageError, Result};
use crate::store::ImageStore;

/// Usage of the filesystem holding images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsInfo {
    /// The store root.
    pub mountpoint: PathBuf,
    /// Bytes allocated under the root (blocks × 512).
    pub used_bytes: u64,
    /// Files, directories and links under the root.
    pub inodes_used: u64,
    /// Nanoseconds since the epoch when measured.
    pub timestamp_ns: i64,
}

impl ImageStore {
    pub async fn fs_info(&self) -> Result<FsInfo> {
        let root = self.root.clone();
        let (used_bytes, inodes_used) = tokio::task::spawn_blocking(move || usage(&root))
            .await
            .map_err(|_| ImageError::Task {
            what: "fs usage walk".into(),
        })??;
        let timestamp_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        Ok(FsInfo {
            mountpoint: self.root.clone(),
            used_bytes,
            inodes_used,
            timestamp_ns,
        })
    }
}

/// Walks a tree without following symlinks or crossing into container rootfs mounts;
/// counts each hardlinked inode once.
fn usage(root: &Path) -> Result<(u64, u64)> {
    let dev = std::fs::symlink_metadata(root)
        .map_err(|e| ImageError::io("stat", root, e))?
        .dev();
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    let (mut bytes, mut inodes) = (0u64, 0u64);
    while let Some(p) = stack.pop() {
        let md = match std::fs::symlink_metadata(&p) {
            Ok(md) => md,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(ImageError::io("stat", &p, e)),
        };
        if md.dev() != dev {
            continue;
        }
        if md.nlink() > 1 && !md.is_dir() && !seen.insert(md.ino()) {
            continue;
        }
        bytes += md.blocks() * 512;
        inodes += 1;
        if md.is_dir() {
            let rd = match std::fs::read_dir(&p) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(ImageError::io("read", &p, e)),
            };
            stack.extend(rd.flatten().map(|e| e.path()));
        }
    }
    Ok((bytes, inodes))
}
