//! The content store: blobs under `<root>/blobs/sha256/<hex>`, each verified
//! while it streams, written to a temp file, fsynced and renamed into place.

use std::path::{Path, PathBuf};

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
        let (mut resp, url) = session.blob(digest).await?;
        let too_long = |declared: u64| ImageError::BlobTooLong {
            digest: digest.to_string(),
            url: crate::registry::redact(&url),
            declared,
        };
        if let (Some(declared), Some(sent)) = (size, resp.content_length()) {
            if sent > declared {
                return Err(too_long(declared));
            }
        }
        let tmp = self.temp_path(digest);
        // Removes the temp file on error and when the pull is dropped mid-download;
        // after the rename it is gone and this does nothing.
        let _tmp_guard = RemoveOnDrop(tmp.clone());
        let what = format!("blob {digest}");
        let res = async {
            let f = tokio::fs::File::create(&tmp)
                .await
                .map_err(|e| ImageError::io("create", &tmp, e))?;
            // Each tokio file write is a blocking-pool hop: write in large pieces.
            let mut f = tokio::io::BufWriter::with_capacity(1 << 20, f);
            let mut hasher = Sha256::new();
            let mut written: u64 = 0;
            while let Some(chunk) =
                crate::registry::next_chunk(&mut resp, session.progress(), &what, &url).await?
            {
                written += chunk.len() as u64;
                if let Some(declared) = size.filter(|&s| written > s) {
                    return Err(too_long(declared));
                }
                hasher.update(&chunk);
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
                    url: crate::registry::redact(&url),
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::reference::Reference;
    use crate::registry::RegistryClient;
    use crate::stub_registry::{Body, Reply, Stub};

    const SECOND: Duration = Duration::from_secs(1);

    /// Fetches `digest` (declared `size`) from a stub that answers every blob with `body`.
    async fn fetch(body: Body, digest: &Digest, size: u64) -> (Result<bool>, ContentStore, Stub) {
        let stub = Stub::start(move |_| Reply::new(200, body.clone())).await;
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let r = Reference::parse(&format!("{}/test/img:1", stub.host())).unwrap();
        let session = RegistryClient::new(Default::default(), SECOND)
            .unwrap()
            .session(&r, None);
        let res = store.fetch(&session, digest, Some(size)).await;
        // Nothing half-downloaded or refused stays, in the store or its ingest dir.
        let count = |d: &Path| std::fs::read_dir(d).unwrap().count();
        match &res {
            Ok(_) => assert!(store.contains(digest), "blob not stored"),
            Err(_) => assert_eq!(count(&store.dir), 0, "blob kept"),
        }
        assert_eq!(count(&store.ingest), 0, "temp file left");
        drop(dir);
        (res, store, stub)
    }

    #[tokio::test]
    async fn a_blob_is_stored_when_it_matches() {
        let data = vec![7u8; 100_000];
        let d = Digest::of(&data);
        let (res, _store, _stub) = fetch(Body::Chunked(data.clone()), &d, 100_000).await;
        assert!(res.unwrap());
    }

    #[tokio::test]
    async fn a_blob_longer_than_declared_is_refused() {
        let data = vec![7u8; 100_000];
        let d = Digest::of(&data[..1000]);
        for body in [
            Body::Sized(data.clone()),
            Body::Chunked(data.clone()),
            Body::Endless,
        ] {
            let (res, _store, stub) = fetch(body.clone(), &d, 1000).await;
            let e = res.unwrap_err();
            assert!(
                matches!(&e, ImageError::BlobTooLong { digest, declared: 1000, .. } if digest == d.as_str()),
                "{body:?}: {e:?}"
            );
            assert_eq!(e.kind(), crate::error::ErrorKind::FailedPrecondition);
            assert!(stub.sent() < 32 << 20, "sent {}", stub.sent());
        }
    }

    #[tokio::test]
    async fn a_blob_with_another_digest_or_short_is_refused() {
        let data = vec![7u8; 1000];
        let d = Digest::of(b"something else");
        let (res, _store, _stub) = fetch(Body::Sized(data.clone()), &d, 1000).await;
        assert!(
            matches!(res, Err(ImageError::DigestMismatch { size: 1000, .. })),
            "{res:?}"
        );
        let d = Digest::of(&data);
        let (res, _store, _stub) = fetch(Body::Chunked(data[..999].to_vec()), &d, 1000).await;
        assert!(
            matches!(res, Err(ImageError::DigestMismatch { size: 999, .. })),
            "{res:?}"
        );
    }

    #[tokio::test]
    async fn a_blob_that_stalls_is_cancelled_naming_it() {
        let data = vec![7u8; 1000];
        let d = Digest::of(&data);
        let started = std::time::Instant::now();
        let body = Body::Stall {
            declared: 1000,
            data: data[..500].to_vec(),
        };
        let (res, _store, stub) = fetch(body, &d, 1000).await;
        let e = res.unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ImageError::Stalled { .. }), "{e:?}");
        assert!(
            msg.contains(d.as_str()) && msg.contains(&stub.host()),
            "{msg}"
        );
        assert_eq!(e.kind(), crate::error::ErrorKind::DeadlineExceeded);
        let took = started.elapsed();
        assert!(took >= SECOND && took < SECOND * 5, "{took:?}");
    }
}
