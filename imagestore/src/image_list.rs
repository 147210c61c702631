//! ListImages and ImageStatus.

use crate::error::{ImageError, Result};
use crate::metadata::Image;
use crate::store::ImageStore;

impl ImageStore {
    /// All images, or those a reference (ID, tag or digest reference) names.
    pub fn list_images(&self, filter: Option<&str>) -> Vec<Image> {
        self.meta.read(|s| {
            s.images
                .values()
                .filter(|i| filter.is_none_or(|f| f.is_empty() || i.matches(f)))
                .cloned()
                .collect()
        })
    }

    /// One image by ID, tag or digest reference; NotFound when absent.
    pub fn image_status(&self, reference: &str) -> Result<Image> {
        self.meta
            .read(|s| s.resolve(reference).cloned())
            .ok_or_else(|| ImageError::ImageNotFound {
                reference: reference.to_string(),
            })
    }
}
