//! An in-memory `ImageService` for unit tests of callers: records calls and
//! fails on demand.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::digest::Digest;
use crate::error::{ImageError, Result};
use crate::image_fs_info::FsInfo;
use crate::metadata::Image;
use crate::reference::Reference;
use crate::registry::AuthConfig;
use crate::service::{ImageService, RootfsMode};

/// A call the fake received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Pull(String),
    List(Option<String>),
    Status(String),
    Remove(String),
    FsInfo,
    PrepareRootfs(String, String, RootfsMode),
    ImageFile(String),
    RemoveRootfs(String),
}

#[derive(Debug, Default)]
struct State {
    images: BTreeMap<String, Image>,
    rootfs: BTreeMap<String, PathBuf>,
    calls: Vec<Call>,
    fail_next: Option<ImageError>,
    /// Where rootfs are made as real (empty) files and directories.
    root: Option<PathBuf>,
}

/// Pull "succeeds" for any well-formed reference with a made-up image.
#[derive(Debug, Default)]
pub struct FakeImageService {
    state: Mutex<State>,
}

impl FakeImageService {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rootfs become real, empty, under `root`: a directory (SharedDir) or
    /// a file (Block), so that callers that check them find them.
    pub fn in_dir(root: &std::path::Path) -> Self {
        let fake = Self::default();
        fake.lock().root = Some(root.to_path_buf());
        fake
    }

    /// The next call fails with this error.
    pub fn fail_next(&self, err: ImageError) {
        self.lock().fail_next = Some(err);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn begin(&self, call: Call) -> Result<std::sync::MutexGuard<'_, State>> {
        let mut s = self.lock();
        s.calls.push(call);
        match s.fail_next.take() {
            Some(e) => Err(e),
            None => Ok(s),
        }
    }
}

fn not_found(reference: &str) -> ImageError {
    ImageError::ImageNotFound {
        reference: reference.to_string(),
    }
}

#[async_trait]
impl ImageService for FakeImageService {
    async fn pull(&self, reference: &str, _auth: Option<AuthConfig>) -> Result<Image> {
        let mut s = self.begin(Call::Pull(reference.to_string()))?;
        let r = Reference::parse(reference)?;
        let id = Digest::of(r.name().as_bytes());
        let image = Image {
            id: id.to_string(),
            repo_tags: r.tagged().into_iter().collect(),
            repo_digests: vec![r.with_digest(&id)],
            size: 1024,
            config: Default::default(),
            manifest_digest: id.clone(),
            layers: vec![],
            chain_ids: vec![],
            blobs: vec![],
        };
        s.images.insert(image.id.clone(), image.clone());
        Ok(image)
    }
    async fn list(&self, filter: Option<&str>) -> Result<Vec<Image>> {
        let s = self.begin(Call::List(filter.map(str::to_string)))?;
        Ok(s.images
            .values()
            .filter(|i| filter.is_none_or(|f| i.matches(f)))
            .cloned()
            .collect())
    }
    async fn status(&self, reference: &str) -> Result<Image> {
        let s = self.begin(Call::Status(reference.to_string()))?;
        s.images
            .values()
            .find(|i| i.matches(reference))
            .cloned()
            .ok_or_else(|| not_found(reference))
    }
    async fn remove(&self, reference: &str) -> Result<()> {
        let mut s = self.begin(Call::Remove(reference.to_string()))?;
        let id = s
            .images
            .values()
            .find(|i| i.matches(reference))
            .map(|i| i.id.clone())
            .ok_or_else(|| not_found(reference))?;
        s.images.remove(&id);
        Ok(())
    }
    async fn fs_info(&self) -> Result<FsInfo> {
        let s = self.begin(Call::FsInfo)?;
        Ok(FsInfo {
            mountpoint: PathBuf::from("/fake"),
            used_bytes: s.images.values().map(|i| i.size).sum(),
            inodes_used: s.images.len() as u64,
            timestamp_ns: 0,
        })
    }
    async fn prepare_rootfs(
        &self,
        image_ref: &str,
        container_id: &str,
        mode: RootfsMode,
    ) -> Result<PathBuf> {
        let mut s = self.begin(Call::PrepareRootfs(
            image_ref.to_string(),
            container_id.to_string(),
            mode,
        ))?;
        if !s.images.values().any(|i| i.matches(image_ref)) {
            return Err(not_found(image_ref));
        }
        if s.rootfs.contains_key(container_id) {
            return Err(ImageError::RootfsExists {
                container_id: container_id.to_string(),
            });
        }
        let p = match &s.root {
            Some(root) => {
                let p = root.join(container_id);
                match mode {
                    RootfsMode::SharedDir => std::fs::create_dir(&p),
                    RootfsMode::Block => std::fs::write(&p, b""),
                }
                .map_err(|e| ImageError::io("create", &p, e))?;
                p
            }
            None => PathBuf::from(format!("/fake/containers/{container_id}/rootfs")),
        };
        s.rootfs.insert(container_id.to_string(), p.clone());
        Ok(p)
    }
    async fn remove_rootfs(&self, container_id: &str) -> Result<()> {
        let mut s = self.begin(Call::RemoveRootfs(container_id.to_string()))?;
        let p = s
            .rootfs
            .remove(container_id)
            .ok_or_else(|| ImageError::RootfsNotFound {
                container_id: container_id.to_string(),
            })?;
        if s.root.is_some() {
            let removed = if p.is_dir() {
                std::fs::remove_dir(&p)
            } else {
                std::fs::remove_file(&p)
            };
            removed.map_err(|e| ImageError::io("remove", &p, e))?;
        }
        Ok(())
    }
    fn rootfs_ids(&self) -> Result<Vec<String>> {
        Ok(self.lock().rootfs.keys().cloned().collect())
    }
    fn image_file(&self, image_ref: &str, _path: &str) -> Result<Option<Vec<u8>>> {
        let s = self.begin(Call::ImageFile(image_ref.to_string()))?;
        if !s.images.values().any(|i| i.matches(image_ref)) {
            return Err(not_found(image_ref));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[tokio::test]
    async fn fake_records_and_fails_on_demand() {
        let f = FakeImageService::new();
        let img = f.pull("busybox", None).await.unwrap();
        assert_eq!(f.status("busybox:latest").await.unwrap().id, img.id);
        assert_eq!(f.list(Some("busybox")).await.unwrap().len(), 1);
        f.fail_next(ImageError::Task { what: "x".into() });
        assert_eq!(
            f.remove("busybox").await.unwrap_err().kind(),
            ErrorKind::Internal
        );
        f.prepare_rootfs("busybox", "c1", RootfsMode::SharedDir)
            .await
            .unwrap();
        f.remove_rootfs("c1").await.unwrap();
        f.remove("busybox").await.unwrap();
        assert_eq!(
            f.remove("busybox").await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert_eq!(f.calls().len(), 8);
        assert_eq!(f.calls()[0], Call::Pull("busybox".into()));
    }
}
