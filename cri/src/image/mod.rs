//! The ImageService, over the image store: PullImage, ListImages,
//! ImageStatus, RemoveImage, ImageFsInfo.

use std::collections::HashMap;

use k8s_cri::v1::{self as cri, image_service_server::ImageService};
use tonic::{Request, Response, Status};

use crate::{
    error::{CriError, Result},
    server::Cri,
};

type Reply<T> = std::result::Result<Response<T>, Status>;

fn image_ref(spec: Option<&cri::ImageSpec>, field: &str) -> Result<String> {
    spec.map(|s| s.image.trim().to_string())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| CriError::invalid(field, "must not be empty"))
}

fn to_cri(img: &imagestore::Image) -> cri::Image {
    let (uid, username) = match img.user() {
        imagestore::ImageUser::None => (Some(cri::Int64Value { value: 0 }), String::new()),
        imagestore::ImageUser::Uid(uid) => (Some(cri::Int64Value { value: uid }), String::new()),
        imagestore::ImageUser::Username(name) => (None, name),
    };
    cri::Image {
        id: img.id.clone(),
        repo_tags: img.repo_tags.clone(),
        repo_digests: img.repo_digests.clone(),
        size: img.size,
        uid,
        username,
        spec: Some(cri::ImageSpec {
            image: img.id.clone(),
            ..Default::default()
        }),
        pinned: false,
    }
}

impl Cri {
    async fn pull_image(&self, req: cri::PullImageRequest) -> Result<cri::PullImageResponse> {
        let reference = image_ref(req.image.as_ref(), "image.image")?;
        let auth = req.auth.map(|a| imagestore::AuthConfig {
            username: a.username,
            password: a.password,
            auth: a.auth,
            server_address: a.server_address,
            identity_token: a.identity_token,
            registry_token: a.registry_token,
        });
        let img = self.inner.images.pull(&reference, auth).await?;
        tracing::info!(image = %reference, id = %img.id, "image pulled");
        Ok(cri::PullImageResponse { image_ref: img.id })
    }

    async fn list_images(&self, req: cri::ListImagesRequest) -> Result<cri::ListImagesResponse> {
        let filter = req
            .filter
            .and_then(|f| f.image)
            .map(|i| i.image)
            .filter(|i| !i.is_empty());
        let images = self.inner.images.list(filter.as_deref()).await?;
        Ok(cri::ListImagesResponse {
            images: images.iter().map(to_cri).collect(),
        })
    }

    async fn image_status(&self, req: cri::ImageStatusRequest) -> Result<cri::ImageStatusResponse> {
        let reference = image_ref(req.image.as_ref(), "image.image")?;
        match self.inner.images.status(&reference).await {
            Ok(img) => {
                let mut info = HashMap::new();
                if req.verbose {
                    let detail = serde_json::json!({
                        "id": img.id,
                        "manifest": img.manifest_digest.to_string(),
                        "layers": img.layers.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
                        "config": img.config,
                    });
                    info.insert("info".to_string(), detail.to_string());
                }
                Ok(cri::ImageStatusResponse {
                    image: Some(to_cri(&img)),
                    info,
                })
            }
            // The CRI contract: an absent image is an empty answer, not an error.
            Err(err) if err.kind() == imagestore::ErrorKind::NotFound => {
                Ok(cri::ImageStatusResponse::default())
            }
            Err(err) => Err(err.into()),
        }
    }

    async fn remove_image(&self, req: cri::RemoveImageRequest) -> Result<cri::RemoveImageResponse> {
        let reference = image_ref(req.image.as_ref(), "image.image")?;
        match self.inner.images.remove(&reference).await {
            Ok(()) => Ok(cri::RemoveImageResponse {}),
            // Idempotent, like containerd.
            Err(err) if err.kind() == imagestore::ErrorKind::NotFound => {
                Ok(cri::RemoveImageResponse {})
            }
            Err(err) => Err(err.into()),
        }
    }

    async fn image_fs_info(&self) -> Result<cri::ImageFsInfoResponse> {
        let fs = self.inner.images.fs_info().await?;
        let usage = cri::FilesystemUsage {
            timestamp: fs.timestamp_ns,
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: fs.mountpoint.display().to_string(),
            }),
            used_bytes: Some(cri::UInt64Value {
                value: fs.used_bytes,
            }),
            inodes_used: Some(cri::UInt64Value {
                value: fs.inodes_used,
            }),
        };
        Ok(cri::ImageFsInfoResponse {
            image_filesystems: vec![usage.clone()],
            container_filesystems: vec![usage],
        })
    }
}

fn reply<T>(r: Result<T>) -> Reply<T> {
    r.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl ImageService for Cri {
    async fn list_images(
        &self,
        r: Request<cri::ListImagesRequest>,
    ) -> Reply<cri::ListImagesResponse> {
        reply(Cri::list_images(self, r.into_inner()).await)
    }
    async fn image_status(
        &self,
        r: Request<cri::ImageStatusRequest>,
    ) -> Reply<cri::ImageStatusResponse> {
        reply(Cri::image_status(self, r.into_inner()).await)
    }
    async fn pull_image(&self, r: Request<cri::PullImageRequest>) -> Reply<cri::PullImageResponse> {
        // A pull the client gave up on still finishes: kubelet's retry
        // then finds the image instead of starting over.
        let (cri, r) = (self.clone(), r.into_inner());
        reply(crate::server::to_completion(async move { Cri::pull_image(&cri, r).await }).await)
    }
    async fn remove_image(
        &self,
        r: Request<cri::RemoveImageRequest>,
    ) -> Reply<cri::RemoveImageResponse> {
        reply(Cri::remove_image(self, r.into_inner()).await)
    }
    async fn image_fs_info(
        &self,
        _r: Request<cri::ImageFsInfoRequest>,
    ) -> Reply<cri::ImageFsInfoResponse> {
        reply(Cri::image_fs_info(self).await)
    }
}
