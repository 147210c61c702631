//! The seam the CRI server holds as `Arc<dyn ImageService>`.

use std::path::PathBuf;

use async_trait::async_trait;

use crate::error::Result;
use crate::image_fs_info::FsInfo;
use crate::metadata::Image;
use crate::registry::AuthConfig;
use crate::store::ImageStore;

/// Which rootfs a container gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootfsMode {
    /// A host overlayfs directory, shared into the VM over virtio-fs.
    SharedDir,
    /// A qcow2 overlay over the image's ext4 image, hot-plugged as a disk.
    Block,
}

/// Image operations of the CRI ImageService plus container rootfs preparation.
#[async_trait]
pub trait ImageService: Send + Sync + std::fmt::Debug {
    /// Pulls an image; returns its record (its `id` is the CRI image ref).
    async fn pull(&self, reference: &str, auth: Option<AuthConfig>) -> Result<Image>;
    /// All images, or those an ID / tag / digest reference names.
    async fn list(&self, filter: Option<&str>) -> Result<Vec<Image>>;
    /// One image by ID, tag or digest reference; NotFound when absent.
    async fn status(&self, reference: &str) -> Result<Image>;
    /// Removes an image by ID, tag or digest reference; NotFound when absent.
    async fn remove(&self, reference: &str) -> Result<()>;
    async fn fs_info(&self) -> Result<FsInfo>;
    /// A directory (SharedDir) or a qcow2 file (Block) for the container's rootfs.
    async fn prepare_rootfs(
        &self,
        image_ref: &str,
        container_id: &str,
        mode: RootfsMode,
    ) -> Result<PathBuf>;
    /// Unmounts / deletes the container's rootfs; NotFound when there is none.
    async fn remove_rootfs(&self, container_id: &str) -> Result<()>;
    /// The containers that have a rootfs (a record or a leftover directory).
    fn rootfs_ids(&self) -> Result<Vec<String>>;
    /// A small regular file of the image's rootfs (`etc/passwd`), read from
    /// its layers; `None` when there is none.
    fn image_file(&self, image_ref: &str, path: &str) -> Result<Option<Vec<u8>>>;
}

#[async_trait]
impl ImageService for ImageStore {
    async fn pull(&self, reference: &str, auth: Option<AuthConfig>) -> Result<Image> {
        self.pull_image(reference, auth).await
    }
    async fn list(&self, filter: Option<&str>) -> Result<Vec<Image>> {
        Ok(self.list_images(filter))
    }
    async fn status(&self, reference: &str) -> Result<Image> {
        self.image_status(reference)
    }
    async fn remove(&self, reference: &str) -> Result<()> {
        self.remove_image(reference).await
    }
    async fn fs_info(&self) -> Result<FsInfo> {
        ImageStore::fs_info(self).await
    }
    async fn prepare_rootfs(
        &self,
        image_ref: &str,
        container_id: &str,
        mode: RootfsMode,
    ) -> Result<PathBuf> {
        match mode {
            RootfsMode::SharedDir => {
                ImageStore::prepare_rootfs(self, image_ref, container_id).await
            }
            RootfsMode::Block => self.prepare_block_rootfs(image_ref, container_id).await,
        }
    }
    async fn remove_rootfs(&self, container_id: &str) -> Result<()> {
        ImageStore::remove_rootfs(self, container_id).await
    }
    fn rootfs_ids(&self) -> Result<Vec<String>> {
        ImageStore::rootfs_ids(self)
    }
    fn image_file(&self, image_ref: &str, path: &str) -> Result<Option<Vec<u8>>> {
        ImageStore::image_file(self, image_ref, path)
    }
}
