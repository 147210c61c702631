//! RemoveImage: drop the image's record, then free what nothing else uses:
//! blobs of no other image, snapshots of no other image or container rootfs,
//! the block image once no container overlay is backed by it.

use std::collections::HashSet;

use crate::digest::Digest;
use crate::error::{ImageError, Result};
use crate::locks::{blob_key, block_key, snapshot_key};
use crate::store::ImageStore;

impl ImageStore {
    /// Removes an image by ID, tag or digest reference with all its tags.
    /// An absent image is NotFound (the CRI layer makes that idempotent).
    pub async fn remove_image(&self, reference: &str) -> Result<()> {
        let _gc = self.gc.write().await;
        let removed = self.meta.update(|s| {
            let id = s.resolve(reference).map(|i| i.id.clone()).ok_or_else(|| {
                ImageError::ImageNotFound {
                    reference: reference.to_string(),
                }
            })?;
            Ok(s.images.remove(&id))
        })?;
        let Some(image) = removed else {
            return Ok(());
        };
        tracing::info!(id = %image.id, "removed image");
        self.collect_garbage(&image.id, &image.blobs, &image.chain_ids)
    }

    /// Frees the given blobs and snapshots unless a remaining image or container uses them.
    /// Called with the gc lock held exclusively.
    pub(crate) fn collect_garbage(
        &self,
        image_id: &str,
        blobs: &[Digest],
        chain_ids: &[Digest],
    ) -> Result<()> {
        let (live_blobs, live_chains, image_alive, image_in_use) = self.meta.read(|s| {
            let mut lb = HashSet::new();
            let mut lc = HashSet::new();
            for i in s.images.values() {
                lb.extend(i.blobs.iter().cloned());
                lc.extend(i.chain_ids.iter().cloned());
            }
            for c in s.containers.values() {
                lc.extend(c.chain_ids.iter().cloned());
            }
            let alive = s.images.contains_key(image_id);
            let in_use = s
                .containers
                .values()
                .any(|c| c.image_id == image_id && c.kind == crate::metadata::RootfsKind::Block);
            (lb, lc, alive, in_use)
        });
        // What an in-flight pull or rootfs preparation leased is theirs: it
        // becomes an image's or a container's, or a later collection's.
        let leased = |key: String| self.leases.held(&key);
        for b in blobs
            .iter()
            .filter(|b| !live_blobs.contains(b) && !leased(blob_key(b)))
        {
            self.content.remove(b)?;
        }
        for c in chain_ids
            .iter()
            .filter(|c| !live_chains.contains(c) && !leased(snapshot_key(c)))
        {
            self.remove_snapshot(c)?;
        }
        let block_leased = leased(block_key(image_id.trim_start_matches("sha256:")));
        if !image_alive && !image_in_use && !block_leased {
            self.remove_block_image(image_id)?;
        }
        Ok(())
    }
}
