//! The image store (issue 4, host side): pull from OCI registries into a
//! verified content store, unpack layers safely (one snapshot per chain ID),
//! keep image metadata across restarts, and give containers a rootfs, either
//! a host overlayfs directory (for virtio-fs) or a qcow2 overlay over a per-image
//! ext4 image (for a hot-plugged disk).
//!
//! Callers hold an `Arc<dyn ImageService>`; [`ImageStore`] is the real one,
//! `FakeImageService` (feature `testing`) the fake.
#![forbid(unsafe_code)]

mod block;
mod config;
mod content;
mod digest;
mod error;
mod image_fs_info;
mod image_list;
mod image_pull;
mod image_remove;
mod locks;
mod manifest;
mod metadata;
mod reference;
mod registry;
mod rootfs;
mod service;
mod snapshot;
mod store;
#[cfg(test)]
mod stub_registry;
mod unpack;
mod util;

#[cfg(any(test, feature = "testing"))]
pub mod fake;

pub use config::{
    is_loopback, Endpoint, HostConfig, RegistryConfig, StoreConfig, DEFAULT_PULL_PROGRESS_TIMEOUT,
};
pub use digest::{chain_ids, Digest};
pub use error::{ErrorKind, ImageError, Result};
pub use image_fs_info::FsInfo;
pub use manifest::{Platform, RuntimeConfig};
pub use metadata::{ContainerRootfs, Image, ImageUser, RootfsKind};
pub use reference::Reference;
pub use registry::AuthConfig;
pub use service::{ImageService, RootfsMode};
pub use store::ImageStore;
