//! The content store: blobs under `<root>/blobs/sha256/<hex>`, each verified
//! while it streams, written to a temp file, fsynced and renamed into place.

use std::path::{Path, PathBuf};

use futures::StreamExt as _;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

use crate::digest::Digest;
use crate::error::{ImageError, Result};
use crate::locks::KeyedLocks;
use crate::registry::Session;

#[derive(Debug)]
pub(crate) struct ContentStore {
    dir: PathBuf,
    ingest: PathBuf,
    locks: KeyedLocks,
}

impl ContentStore {
    pub fn open(root: &Path) -> Result<Self> {
        let dir = root.join("blobs").join("sha256");
        let ingest = root.join("blobs").join("ingest");
        for d in [&dir, &ingest] {
            std::fs::create_dir_all(d).map_err(|e| ImageError::io("create", d, e))?;
        }
        // Leftovers of an interrupted download are never valid content.
        if let Ok(rd) = std::fs::read_dir(&ingest) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(ContentStore {
            dir,
            ingest,
            locks: KeyedLocks::default(),
        })
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    pub async fn read(&self, digest: &Digest) -> Result<Vec<u8>> {
        let p = self.path(digest);
        tokio::fs::read(&p)
            .await
            .map_err(|e| ImageError::io("read blob", p, e))
    }

    /// Stores bytes already in memory (manifests, configs), verifying them.
    pub async fn put(&self, digest: &Digest, data: &[u8], origin: &str) -> Result<()> {
        let actual = Digest::of(data);
        if &actual != digest {
            return Err(ImageError::DigestMismatch {
                expected: digest.to_string(),
                actual: actual.to_string(),
                size: data.len() as u64,
                url: origin.to_string(),
            });
        }
        let _guard = self.locks.lock(digest.hex()).await;
        if self.contains(digest) {
            return Ok(());
        }
        let tmp = self.temp_path(digest);
        // Removes the temp file on error and when the pull is dropped mid-download;
        // after the rename it is gone and this does nothing.
        let _tmp_guard = RemoveOnDrop(tmp.clone());
        let res = async {
            let mut f = tokio::fs::File::create(&tmp)
                .await
                .map_err(|e| ImageError::io("create", &tmp, e))?;
            f.write_all(data)
                .await
                .map_err(|e| ImageError::io("write", &tmp, e))?;
            f.sync_all()
                .await
                .map_err(|e| ImageError::io("fsync", &tmp, e))?;
            self.commit(&tmp, digest).await
        }
        .await;
        res
    }

    /// Makes sure a blob is present: downloads it through the session unless it
    /// is already stored. Concurrent callers for one digest share one download.
    /// Returns whether this call downloaded it.
    pub async fn fetch(
        &self,
        session: &Session,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<bool> {
        let _guard = self.locks.lock(digest.hex()).await;
        if self.contains(digest) {
            return Ok(false);
        }
        let (resp, url) = session.blob(digest).await?;
        let tmp = self.temp_path(digest);
        // Removes the temp file on error and when the pull is dropped mid-download;
        // after the rename it is gone and this does nothing.
        let _tmp_guard = RemoveOnDrop(tmp.clone());
        let res = async {
            let f = tokio::fs::File::create(&tmp)
                .await
                .map_err(|e| ImageError::io("create", &tmp, e))?;
            // Each tokio file write is a blocking-pool hop: write in large pieces.
            let mut f = tokio::io::BufWriter::with_capacity(1 << 20, f);
            let mut hasher = Sha256::new();
            let mut written: u64 = 0;
            let mut stream = resp.bytes_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|source| ImageError::Http {
                    url: url.clone(),
                    source,
                })?;
                hasher.update(&chunk);
                written += chunk.len() as u64;
                if size.is_some_and(|s| written > s) {
                    break;
                }
                f.write_all(&chunk)
                    .await
                    .map_err(|e| ImageError::io("write", &tmp, e))?;
            }
            let actual = Digest::from_hasher(hasher);
            if &actual != digest || size.is_some_and(|s| s != written) {
                return Err(ImageError::DigestMismatch {
                    expected: digest.to_string(),
                    actual: actual.to_string(),
                    size: written,
                    url: url.clone(),
                });
            }
            f.flush()
                .await
                .map_err(|e| ImageError::io("write", &tmp, e))?;
            f.get_ref()
                .sync_all()
                .await
                .map_err(|e| ImageError::io("fsync", &tmp, e))?;
            self.commit(&tmp, digest).await
        }
        .await;
        res.map(|()| true)
    }

    pub fn remove(&self, digest: &Digest) -> Result<()> {
        let p = self.path(digest);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ImageError::io("remove blob", p, e)),
        }
    }

    fn temp_path(&self, digest: &Digest) -> PathBuf {
        self.ingest
            .join(format!("{}.{}", digest.hex(), crate::util::unique_suffix()))
    }

    async fn commit(&self, tmp: &Path, digest: &Digest) -> Result<()> {
        let dst = self.path(digest);
        tokio::fs::rename(tmp, &dst)
            .await
            .map_err(|e| ImageError::io("rename into place", &dst, e))?;
        crate::util::fsync_dir(&self.dir)
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
