//! PullImage: resolve the reference (index → platform manifest), fetch the
//! config and layers (up to N in parallel, each blob once), unpack each layer
//! into its snapshot, record the image.
//!
//! Downloads and unpacks hold no store-wide lock: what the pull fetched is
//! leased (garbage collection spares it) until the image record commits, and
//! only that commit takes the gc lock, shared. Concurrent pulls of one blob
//! share one download (the content store's per-digest lock).

use futures::StreamExt as _;

use crate::digest::{chain_ids, Digest};
use crate::error::{ImageError, Result};
use crate::locks::{blob_key, snapshot_key, Lease};
use crate::manifest::{
    Compression, Descriptor, Document, ImageConfigFile, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX,
    OCI_MANIFEST,
};
use crate::metadata::Image;
use crate::reference::Reference;
use crate::registry::{AuthConfig, Session, MAX_CONFIG};
use crate::store::ImageStore;

const DEFAULT_PARALLEL: usize = 3;

impl ImageStore {
    /// Pulls an image (short names allowed) and returns its record.
    pub async fn pull_image(&self, reference: &str, auth: Option<AuthConfig>) -> Result<Image> {
        let r = Reference::parse(reference)?;
        let mut lease = Lease::new(&self.leases);
        let res = self.pull_leased(&r, auth, &mut lease).await;
        if res.is_err() {
            // What this pull fetched and nothing records is freed now (another
            // in-flight pull's lease still spares it), not at the next restart.
            let (blobs, chains) = lease.blobs_and_snapshots();
            drop(lease);
            let _gc = self.gc.write().await;
            if let Err(e) = self.collect_garbage("", &blobs, &chains) {
                tracing::warn!(reference = %r, error = %e, "clean-up after a failed pull");
            }
        }
        res
    }

    async fn pull_leased(
        &self,
        r: &Reference,
        auth: Option<AuthConfig>,
        lease: &mut Lease<'_>,
    ) -> Result<Image> {
        let session = self.client.session(r, auth);
        let (top_bytes, header_type) = session.manifest(&r.api_reference()).await?;
        let top_digest = Digest::of(&top_bytes);
        if let Some(want) = &r.digest {
            if want != &top_digest {
                return Err(ImageError::DigestMismatch {
                    expected: want.to_string(),
                    actual: top_digest.to_string(),
                    size: top_bytes.len() as u64,
                    url: r.to_string(),
                });
            }
        }
        let mut blobs = vec![top_digest.clone()];
        let top = parse_document(&top_bytes, &top_digest)?;
        let mut index_bytes = None;
        let (manifest, manifest_digest, manifest_bytes) = if is_index(&top, header_type.as_deref())
        {
            let desc = self.select_platform(&top, &top_digest)?;
            let (bytes, _) = session.manifest(desc.digest.as_str()).await?;
            let digest = Digest::of(&bytes);
            if digest != desc.digest {
                return Err(ImageError::DigestMismatch {
                    expected: desc.digest.to_string(),
                    actual: digest.to_string(),
                    size: bytes.len() as u64,
                    url: r.with_digest(&desc.digest),
                });
            }
            blobs.push(digest.clone());
            index_bytes = Some(top_bytes);
            (parse_document(&bytes, &digest)?, digest, bytes)
        } else {
            (top, top_digest.clone(), top_bytes)
        };
        let bad = |reason: &str| ImageError::BadDocument {
            what: "manifest",
            digest: manifest_digest.to_string(),
            reason: reason.to_string(),
        };
        if let Some(mt) = &manifest.media_type {
            if mt != OCI_MANIFEST && mt != DOCKER_MANIFEST {
                return Err(bad(&format!("unsupported media type {mt}")));
            }
        }
        let config_desc = manifest.config.clone().ok_or_else(|| bad("no config"))?;
        let layers = manifest.layers.clone().ok_or_else(|| bad("no layers"))?;
        let mut compressions = Vec::with_capacity(layers.len());
        for l in &layers {
            compressions.push(Compression::from_media_type(&l.media_type).ok_or_else(|| {
                ImageError::UnsupportedLayer {
                    digest: l.digest.to_string(),
                    media_type: l.media_type.clone(),
                }
            })?);
        }

        // The config is read into memory: bounded before it is fetched.
        if config_desc.size > MAX_CONFIG.bytes {
            return Err(ImageError::TooLarge {
                what: format!("image config {}", config_desc.digest),
                url: r.to_string(),
                limit_name: MAX_CONFIG.name,
                limit: MAX_CONFIG.bytes,
            });
        }
        self.lease(lease, [blob_key(&config_desc.digest)]).await;
        self.content
            .fetch(&session, &config_desc.digest, Some(config_desc.size))
            .await?;
        let config_bytes = self.content.read(&config_desc.digest).await?;
        let config: ImageConfigFile =
            serde_json::from_slice(&config_bytes).map_err(|e| ImageError::BadDocument {
                what: "image config",
                digest: config_desc.digest.to_string(),
                reason: e.to_string(),
            })?;
        if config.rootfs.diff_ids.len() != layers.len() {
            return Err(ImageError::BadDocument {
                what: "image config",
                digest: config_desc.digest.to_string(),
                reason: format!(
                    "{} diff_ids for {} layers",
                    config.rootfs.diff_ids.len(),
                    layers.len()
                ),
            });
        }
        let chains = chain_ids(&config.rootfs.diff_ids);
        self.lease(
            lease,
            layers
                .iter()
                .map(|l| blob_key(&l.digest))
                .chain(chains.iter().map(snapshot_key)),
        )
        .await;
        let parallel = self
            .config
            .max_concurrent_downloads
            .unwrap_or(DEFAULT_PARALLEL)
            .max(1);
        // On the first failure no further layer starts, but those in flight are
        // awaited, so no half-written temp file or snapshot outlives the pull.
        let failed = std::sync::atomic::AtomicBool::new(false);
        let mut jobs = Vec::with_capacity(layers.len());
        for (i, desc) in layers.iter().enumerate() {
            let failed = &failed;
            let job = self.pull_layer(
                &session,
                desc,
                compressions[i],
                &config.rootfs.diff_ids[i],
                &chains[i],
            );
            jobs.push(async move {
                if failed.load(std::sync::atomic::Ordering::Relaxed) {
                    return Ok(());
                }
                let res = job.await;
                if res.is_err() {
                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                res
            });
        }
        let results: Vec<Result<()>> = futures::stream::iter(jobs)
            .buffer_unordered(parallel)
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<()>>>()?;
        // The commit: no collection between storing the manifests and
        // recording the image that keeps them.
        let _gc = self.gc.read().await;
        // Manifests are stored last: a stored manifest means a complete image.
        self.content
            .put(&manifest_digest, &manifest_bytes, &r.to_string())
            .await?;
        if let Some(bytes) = &index_bytes {
            self.content.put(&top_digest, bytes, &r.to_string()).await?;
        }

        blobs.push(config_desc.digest.clone());
        blobs.extend(layers.iter().map(|l| l.digest.clone()));
        let image = Image {
            id: config_desc.digest.to_string(),
            repo_tags: r.tagged().into_iter().collect(),
            repo_digests: vec![r.with_digest(&top_digest)],
            size: config_desc.size + layers.iter().map(|l| l.size).sum::<u64>(),
            config: config.config.unwrap_or_default(),
            manifest_digest,
            layers: layers.iter().map(|l| l.digest.clone()).collect(),
            chain_ids: chains,
            blobs,
        };
        let image = self.meta.update(|s| Ok(s.insert(image)))?;
        tracing::info!(reference = %r, id = %image.id, "pulled image");
        Ok(image)
    }

    async fn pull_layer(
        &self,
        session: &Session,
        desc: &Descriptor,
        compression: Compression,
        diff_id: &Digest,
        chain_id: &Digest,
    ) -> Result<()> {
        if self.snapshot_path(chain_id).is_dir() && self.content.contains(&desc.digest) {
            return Ok(());
        }
        self.content
            .fetch(session, &desc.digest, Some(desc.size))
            .await?;
        self.ensure_snapshot(chain_id, &desc.digest, compression, diff_id)
            .await?;
        Ok(())
    }

    fn select_platform(&self, index: &Document, digest: &Digest) -> Result<Descriptor> {
        let manifests = index.manifests.as_deref().unwrap_or_default();
        manifests
            .iter()
            .find(|m| {
                m.platform
                    .as_ref()
                    .is_some_and(|p| self.platform.matches(p))
            })
            .cloned()
            .ok_or_else(|| ImageError::NoMatchingPlatform {
                digest: digest.to_string(),
                platform: self.platform.to_string(),
            })
    }
}

fn parse_document(bytes: &[u8], digest: &Digest) -> Result<Document> {
    let doc: Document = serde_json::from_slice(bytes).map_err(|e| ImageError::BadDocument {
        what: "manifest",
        digest: digest.to_string(),
        reason: e.to_string(),
    })?;
    if doc.schema_version != 2 {
        return Err(ImageError::BadDocument {
            what: "manifest",
            digest: digest.to_string(),
            reason: format!(
                "schema version {} (only 2 is supported)",
                doc.schema_version
            ),
        });
    }
    Ok(doc)
}

fn is_index(doc: &Document, header_type: Option<&str>) -> bool {
    let is_list = |t: &str| t == OCI_INDEX || t == DOCKER_LIST;
    doc.media_type.as_deref().is_some_and(is_list)
        || (doc.media_type.is_none() && header_type.is_some_and(is_list))
        || (doc.manifests.is_some() && doc.layers.is_none())
}
