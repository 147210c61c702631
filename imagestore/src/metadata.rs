//! Image and container-rootfs records, persisted as one versioned JSON file
//! (`<root>/metadata.json`) written temp-file → fsync → rename on every change.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{ImageError, Result};
use crate::manifest::RuntimeConfig;
use crate::reference::Reference;

const VERSION: u32 = 1;

/// One image in the store. Its ID is the digest of its config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// `sha256:<hex>` of the image config.
    pub id: String,
    /// `docker.io/library/busybox:latest`; a tag names at most one image.
    pub repo_tags: Vec<String>,
    /// `docker.io/library/busybox@sha256:<manifest or index digest>`.
    pub repo_digests: Vec<String>,
    /// Bytes of the config and compressed layers.
    pub size: u64,
    /// User, env, entrypoint, cmd, working dir, volumes, stop signal, labels.
    pub config: RuntimeConfig,
    /// The platform manifest actually unpacked.
    pub manifest_digest: Digest,
    /// Compressed layer digests, bottom first.
    pub layers: Vec<Digest>,
    /// Chain IDs of the layers, bottom first (snapshot keys).
    pub chain_ids: Vec<Digest>,
    /// Every blob this image holds: index, manifest, config, layers.
    pub blobs: Vec<Digest>,
}

/// Who the image runs as, from the config's `User` (`1000`, `1000:1000`, `nobody`, `nobody:grp`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageUser {
    None,
    Uid(i64),
    Username(String),
}

impl Image {
    pub fn user(&self) -> ImageUser {
        let Some(user) = self.config.user.as_deref().filter(|u| !u.is_empty()) else {
            return ImageUser::None;
        };
        let name = user.split(':').next().unwrap_or(user);
        match name.parse::<i64>() {
            Ok(uid) => ImageUser::Uid(uid),
            Err(_) => ImageUser::Username(name.to_string()),
        }
    }

    /// The CRI ImageStatus `verbose` info: the whole record as JSON.
    pub fn verbose_info(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Whether `reference` (ID, tag or digest reference) names this image.
    pub fn matches(&self, reference: &str) -> bool {
        if self.id == reference || self.id.strip_prefix("sha256:") == Some(reference) {
            return true;
        }
        match Reference::parse(reference) {
            Ok(r) => {
                let by_digest = r
                    .digest
                    .as_ref()
                    .is_some_and(|d| self.repo_digests.contains(&r.with_digest(d)));
                let by_tag =
                    r.digest.is_none() && r.tagged().is_some_and(|t| self.repo_tags.contains(&t));
                by_digest || by_tag
            }
            Err(_) => false,
        }
    }
}

/// How a container's rootfs is provided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RootfsKind {
    /// A host overlayfs mount shared into the VM over virtio-fs.
    Overlay,
    /// A qcow2 overlay over the image's ext4 block image.
    Block,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRootfs {
    pub image_id: String,
    pub kind: RootfsKind,
    /// The mounted rootfs directory or the qcow2 file.
    pub path: PathBuf,
    /// Snapshots the rootfs uses (kept while it exists).
    pub chain_ids: Vec<Digest>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct State {
    pub version: u32,
    pub images: BTreeMap<String, Image>,
    pub containers: BTreeMap<String, ContainerRootfs>,
}

#[derive(Debug)]
pub(crate) struct Metadata {
    path: PathBuf,
    state: Mutex<State>,
}

impl Metadata {
    pub fn open(root: &Path) -> Result<Self> {
        let path = root.join("metadata.json");
        let state = match std::fs::read(&path) {
            Ok(data) => serde_json::from_slice::<State>(&data).map_err(|source| {
                ImageError::CorruptMetadata {
                    path: path.clone(),
                    source,
                }
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State {
                version: VERSION,
                ..Default::default()
            },
            Err(e) => return Err(ImageError::io("read", path, e)),
        };
        Ok(Metadata {
            path,
            state: Mutex::new(state),
        })
    }

    /// Reads the state.
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Changes the state and persists it; on a failed write the change is undone.
    pub fn update<T>(&self, f: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let before = serde_json::to_vec(&*guard).map_err(|source| ImageError::CorruptMetadata {
            path: self.path.clone(),
            source,
        })?;
        let out = f(&mut guard)?;
        guard.version = VERSION;
        let data =
            serde_json::to_vec_pretty(&*guard).map_err(|source| ImageError::CorruptMetadata {
                path: self.path.clone(),
                source,
            })?;
        if let Err(e) = crate::util::write_atomic(&self.path, &data) {
            if let Ok(old) = serde_json::from_slice(&before) {
                *guard = old;
            }
            return Err(e);
        }
        Ok(out)
    }
}

impl State {
    pub fn resolve(&self, reference: &str) -> Option<&Image> {
        self.images.values().find(|i| i.matches(reference))
    }

    /// Adds or merges an image; a tag moves from any other image to this one.
    pub fn insert(&mut self, mut image: Image) -> Image {
        for other in self.images.values_mut() {
            if other.id != image.id {
                other.repo_tags.retain(|t| !image.repo_tags.contains(t));
            }
        }
        if let Some(old) = self.images.get(&image.id) {
            for t in &old.repo_tags {
                if !image.repo_tags.contains(t) {
                    image.repo_tags.push(t.clone());
                }
            }
            for d in &old.repo_digests {
                if !image.repo_digests.contains(d) {
                    image.repo_digests.push(d.clone());
                }
            }
            for b in &old.blobs {
                if !image.blobs.contains(b) {
                    image.blobs.push(b.clone());
                }
            }
        }
        image.repo_tags.sort();
        image.repo_digests.sort();
        self.images.insert(image.id.clone(), image.clone());
        image
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(id_byte: &[u8], tag: &str) -> Image {
        Image {
            id: Digest::of(id_byte).to_string(),
            repo_tags: vec![tag.to_string()],
            repo_digests: vec![],
            size: 1,
            config: RuntimeConfig {
                user: Some("1000:1000".into()),
                ..Default::default()
            },
            manifest_digest: Digest::of(b"m"),
            layers: vec![],
            chain_ids: vec![],
            blobs: vec![Digest::of(id_byte)],
        }
    }

    #[test]
    fn tags_move_and_state_persists() {
        let dir = tempfile::tempdir().unwrap();
        let md = Metadata::open(dir.path()).unwrap();
        md.update(|s| Ok(s.insert(image(b"a", "docker.io/library/x:1"))))
            .unwrap();
        md.update(|s| Ok(s.insert(image(b"b", "docker.io/library/x:1"))))
            .unwrap();
        drop(md);
        let md = Metadata::open(dir.path()).unwrap();
        let a = Digest::of(b"a").to_string();
        let b = Digest::of(b"b").to_string();
        md.read(|s| {
            assert!(s.images[&a].repo_tags.is_empty());
            assert_eq!(s.resolve("x:1").unwrap().id, b);
            assert_eq!(s.resolve(&b).unwrap().id, b);
            assert_eq!(s.resolve(&b[7..]).unwrap().id, b);
            assert!(s.resolve("x:2").is_none());
            assert_eq!(s.images[&b].user(), ImageUser::Uid(1000));
            let info: serde_json::Value =
                serde_json::from_str(&s.images[&b].verbose_info()).unwrap();
            assert_eq!(info["config"]["User"], "1000:1000");
        });
    }

    #[test]
    fn usernames() {
        let mut i = image(b"a", "x");
        i.config.user = Some("nobody:nogroup".into());
        assert_eq!(i.user(), ImageUser::Username("nobody".into()));
        i.config.user = None;
        assert_eq!(i.user(), ImageUser::None);
    }
}
