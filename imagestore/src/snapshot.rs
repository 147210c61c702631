//! Layer snapshots: each layer unpacked once, keyed by chain ID, into
//! `<root>/snapshots/<chain hex>` (unpacked into a temp dir and renamed).

use std::path::PathBuf;

use crate::digest::Digest;
use crate::error::{ImageError, Result};
use crate::manifest::Compression;
use crate::store::ImageStore;

impl ImageStore {
    /// Makes sure the snapshot for `chain_id` exists, unpacking `layer` (already
    /// in the content store) and checking its uncompressed digest against `diff_id`.
    pub(crate) async fn ensure_snapshot(
        &self,
        chain_id: &Digest,
        layer: &Digest,
        compression: Compression,
        diff_id: &Digest,
    ) -> Result<PathBuf> {
        let dir = self.snapshot_path(chain_id);
        let _guard = self.snapshot_locks.lock(chain_id.hex()).await;
        if dir.is_dir() {
            return Ok(dir);
        }
        let snapshots = self.root.join("snapshots");
        let tmp = snapshots.join(format!(
            ".{}.{}",
            chain_id.hex(),
            crate::util::unique_suffix()
        ));
        std::fs::create_dir(&tmp).map_err(|e| ImageError::io("create", &tmp, e))?;
        let blob = self.content.path(layer);
        let (layer, diff_id, dst) = (layer.clone(), diff_id.clone(), dir.clone());
        // Everything, cleanup included, runs in the blocking task: if the pull is
        // dropped meanwhile, the task still finishes or removes its temp dir.
        tokio::task::spawn_blocking(move || {
            let res = unpack_verified(&blob, compression, &tmp, &layer, &diff_id).and_then(|()| {
                std::fs::rename(&tmp, &dst)
                    .map_err(|e| ImageError::io("rename into place", &dst, e))?;
                crate::util::fsync_dir(&snapshots)
            });
            if res.is_err() {
                let _ = remove_dir(&tmp);
            }
            res
        })
        .await
        .map_err(|_| ImageError::Task {
            what: format!("unpack into {}", dir.display()),
        })??;
        Ok(dir)
    }

    pub(crate) fn remove_snapshot(&self, chain_id: &Digest) -> Result<()> {
        let dir = self.snapshot_path(chain_id);
        remove_dir(&dir).map_err(|e| ImageError::io("remove snapshot", dir, e))
    }
}

fn unpack_verified(
    blob: &std::path::Path,
    compression: Compression,
    tmp: &std::path::Path,
    layer: &Digest,
    diff_id: &Digest,
) -> Result<()> {
    let f = std::fs::File::open(blob).map_err(|e| ImageError::io("open blob", blob, e))?;
    let actual = crate::unpack::unpack_layer(f, compression, tmp, layer.as_str())?;
    if &actual != diff_id {
        return Err(ImageError::DiffIdMismatch {
            layer: layer.to_string(),
            expected: diff_id.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(())
}

/// Removes a directory tree without following symlinks; absent is fine.
pub(crate) fn remove_dir(path: &std::path::Path) -> std::io::Result<()> {
    // Layers and containers' upper dirs are shaped by images and guests:
    // no recursion, nothing followed, no mount crossed.
    safefs::remove_all(path)
}
