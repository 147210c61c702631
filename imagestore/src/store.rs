//! The image store: one root directory holding
//!
//! ```text
//! <root>/metadata.json                 images and container rootfs records
//! <root>/blobs/sha256/<hex>            verified content (manifests, configs, layers)
//! <root>/snapshots/<chain id hex>/     one unpacked layer each, overlay lowerdirs
//! <root>/blockimages/<image hex>.ext4  flattened image, backing file of qcow2 overlays
//! <root>/containers/<cid>/             upper/ work/ rootfs/ or rootfs.qcow2
//! ```
//!
//! The operations live one per file: `image_pull.rs`, `image_list.rs`,
//! `image_remove.rs`, `image_fs_info.rs`, `rootfs.rs`, `block.rs`.

use std::path::{Path, PathBuf};

use crate::config::StoreConfig;
use crate::content::ContentStore;
use crate::digest::Digest;
use crate::error::{ImageError, Result};
use crate::locks::{KeyedLocks, Lease, Leases};
use crate::manifest::Platform;
use crate::metadata::Metadata;
use crate::registry::RegistryClient;

/// The real image store.
#[derive(Debug)]
pub struct ImageStore {
    pub(crate) root: PathBuf,
    pub(crate) config: StoreConfig,
    pub(crate) client: RegistryClient,
    pub(crate) content: ContentStore,
    pub(crate) meta: Metadata,
    /// One unpack per chain ID at a time.
    pub(crate) snapshot_locks: KeyedLocks,
    /// One block-image build per image at a time; one rootfs per container.
    pub(crate) image_locks: KeyedLocks,
    /// Garbage collection (RemoveImage, RemoveContainer) holds it exclusively;
    /// taking a lease, committing a pull's record and a rootfs's mount and
    /// record hold it shared, briefly. Never held across a download or an
    /// unpack: a slow registry stalls nothing but its own pull.
    pub(crate) gc: tokio::sync::RwLock<()>,
    /// What in-flight pulls and rootfs preparations use; collection spares it.
    pub(crate) leases: Leases,
    pub(crate) platform: Platform,
    /// An exclusive `flock` on `<root>/lock`: one store per root.
    _lock: std::os::fd::OwnedFd,
}

impl ImageStore {
    /// Opens (creating if needed) the store at `config.root`; images pulled
    /// before a restart are there again.
    pub fn open(config: StoreConfig) -> Result<Self> {
        let root = config.root.clone();
        for d in ["snapshots", "containers", "blockimages"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(|e| ImageError::io("create", &p, e))?;
        }
        let lock = lock_root(&root)?;
        if config.nodev_mounts {
            for d in ["snapshots", "containers"] {
                crate::rootfs::inert_on_host(&root.join(d))?;
            }
        }
        remove_temp_entries(&root.join("snapshots"))?;
        remove_temp_entries(&root.join("blockimages"))?;
        let store = ImageStore {
            content: ContentStore::open(&root)?,
            meta: Metadata::open(&root)?,
            client: RegistryClient::new(config.registries.clone(), config.pull_progress_timeout())?,
            root,
            config,
            snapshot_locks: KeyedLocks::default(),
            image_locks: KeyedLocks::default(),
            gc: tokio::sync::RwLock::new(()),
            leases: Leases::default(),
            platform: Platform::host(),
            _lock: lock,
        };
        store.sweep_orphans()?;
        Ok(store)
    }

    /// Removes what no record refers to: blobs, snapshots and block images left
    /// by a crash between writing content and recording the image.
    fn sweep_orphans(&self) -> Result<()> {
        let (blobs, chains, images) = self.meta.read(|s| {
            let mut blobs = std::collections::HashSet::new();
            let mut chains = std::collections::HashSet::new();
            let mut images = std::collections::HashSet::new();
            for i in s.images.values() {
                blobs.extend(i.blobs.iter().map(|d| d.hex().to_string()));
                chains.extend(i.chain_ids.iter().map(|d| d.hex().to_string()));
                images.insert(format!("{}.ext4", i.id.trim_start_matches("sha256:")));
            }
            for c in s.containers.values() {
                chains.extend(c.chain_ids.iter().map(|d| d.hex().to_string()));
                images.insert(format!("{}.ext4", c.image_id.trim_start_matches("sha256:")));
            }
            (blobs, chains, images)
        });
        for (dir, keep) in [
            (self.root.join("blobs").join("sha256"), &blobs),
            (self.root.join("snapshots"), &chains),
            (self.root.join("blockimages"), &images),
        ] {
            let rd = std::fs::read_dir(&dir).map_err(|e| ImageError::io("read", &dir, e))?;
            for e in rd.flatten() {
                if keep.contains(e.file_name().to_string_lossy().as_ref()) {
                    continue;
                }
                let p = e.path();
                tracing::info!(path = %p.display(), "removing orphan");
                let res = if p.is_dir() {
                    crate::snapshot::remove_dir(&p)
                } else {
                    std::fs::remove_file(&p)
                };
                res.map_err(|e| ImageError::io("remove orphan", &p, e))?;
            }
        }
        Ok(())
    }

    /// Adds `keys` to `lease`, under the gc lock (shared) so no collection is
    /// halfway through meanwhile: whatever is present after this stays until
    /// the lease is dropped.
    pub(crate) async fn lease(
        &self,
        lease: &mut Lease<'_>,
        keys: impl IntoIterator<Item = String>,
    ) {
        let _gc = self.gc.read().await;
        lease.extend(keys);
    }

    /// Pull images for another platform than the host's (index selection).
    pub fn with_platform(mut self, platform: Platform) -> Self {
        self.platform = platform;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a stored blob lives (for tests and tools).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.content.path(digest)
    }

    /// Where the unpacked layer of a chain ID lives.
    pub fn snapshot_path(&self, chain_id: &Digest) -> PathBuf {
        self.root.join("snapshots").join(chain_id.hex())
    }

    pub(crate) fn container_dir(&self, container_id: &str) -> Result<PathBuf> {
        if !crate::util::valid_container_id(container_id) {
            return Err(ImageError::InvalidContainerId {
                container_id: container_id.to_string(),
            });
        }
        Ok(self.root.join("containers").join(container_id))
    }
}

fn lock_root(root: &Path) -> Result<std::os::fd::OwnedFd> {
    use rustix::fs::{FlockOperation, Mode, OFlags};
    let path = root.join("lock");
    let fd = rustix::fs::open(
        &path,
        OFlags::CREATE | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| ImageError::io("open", &path, e.into()))?;
    match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(fd),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(ImageError::RootInUse {
            root: root.to_path_buf(),
        }),
        Err(e) => Err(ImageError::io("lock", &path, e.into())),
    }
}

/// Half-done unpacks and builds (names starting with `.`) from before a crash.
fn remove_temp_entries(dir: &Path) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|e| ImageError::io("read", dir, e))?;
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with('.') {
            let p = e.path();
            // A stale build mount point may still be mounted.
            let _ = rustix::mount::unmount(&p, rustix::mount::UnmountFlags::DETACH);
            let res = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            res.map_err(|e| ImageError::io("remove stale", &p, e))?;
        }
    }
    Ok(())
}
