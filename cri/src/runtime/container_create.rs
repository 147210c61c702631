//! CreateContainer: reserve the name, prepare the rootfs from the image
//! store, create the container in the pod's VM, persist; undone on failure.

use k8s_cri::v1 as cri;

use podsandbox::container::Rootfs;

use crate::{
    config::RootfsKind,
    error::{CriError, Result},
    runtime::{
        container_config::{container_config, log_path, ImageDefaults},
        container_security::SecurityPolicy,
        sandbox_run::{new_id, pod_sysctls},
    },
    server::Cri,
    store::{self, ContainerMeta},
};

impl Cri {
    pub(crate) async fn create_container(
        &self,
        req: cri::CreateContainerRequest,
    ) -> Result<cri::CreateContainerResponse> {
        if req.pod_sandbox_id.is_empty() {
            return Err(CriError::invalid("pod_sandbox_id", "must not be empty"));
        }
        let config = req
            .config
            .ok_or_else(|| CriError::invalid("config", "is required"))?;
        let md = config
            .metadata
            .clone()
            .ok_or_else(|| CriError::invalid("config.metadata", "is required"))?;
        if md.name.is_empty() {
            return Err(CriError::invalid(
                "config.metadata.name",
                "must not be empty",
            ));
        }
        let image = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .filter(|i| !i.is_empty())
            .ok_or_else(|| CriError::invalid("config.image.image", "must not be empty"))?;
        let sandbox_id = self
            .inner
            .store
            .resolve_pod(&req.pod_sandbox_id)
            .ok_or_else(|| CriError::NotFound {
                what: "pod sandbox",
                id: req.pod_sandbox_id.clone(),
            })?;
        let pod = self
            .inner
            .store
            .pod(&sandbox_id)
            .ok_or_else(|| CriError::NotFound {
                what: "pod sandbox",
                id: sandbox_id.clone(),
            })?;
        if pod.stopped {
            return Err(CriError::FailedPrecondition(format!(
                "pod sandbox {sandbox_id} is stopped"
            )));
        }
        let pod_md = pod.config.metadata.clone().unwrap_or_default();
        let log = log_path(&pod.config.log_directory, &config.log_path)?;
        let id = new_id();
        let name = store::container_name(&md, &pod_md);
        self.inner.store.reserve("container", &name, &id)?;
        match self
            .create_steps(&id, &sandbox_id, &pod.config, &image, config, log)
            .await
        {
            Ok(()) => {
                self.emit(&id, cri::ContainerEventType::ContainerCreatedEvent);
                tracing::info!(pod = %sandbox_id, container = %id, name = %name, "container created");
                Ok(cri::CreateContainerResponse { container_id: id })
            }
            Err(err) => {
                self.inner.store.release(&name, &id);
                Err(err)
            }
        }
    }

    async fn create_steps(
        &self,
        id: &str,
        sandbox_id: &str,
        pod_config: &cri::PodSandboxConfig,
        image: &str,
        config: cri::ContainerConfig,
        log: Option<std::path::PathBuf>,
    ) -> Result<()> {
        if let Some(dir) = log.as_ref().and_then(|l| l.parent()) {
            // kubelet makes the container's log dir; other clients may not.
            std::fs::create_dir_all(dir).map_err(|source| CriError::Io {
                action: "create log directory",
                path: dir.into(),
                source,
            })?;
        }
        let images = &self.inner.images;
        let img = images.status(image).await?;
        let etc = |name: &str| -> Result<Option<String>> {
            Ok(images
                .image_file(&img.id, name)?
                .map(|b| String::from_utf8_lossy(&b).into_owned()))
        };
        let defaults = ImageDefaults {
            user: img.config.user.clone(),
            env: img.config.env.clone().unwrap_or_default(),
            entrypoint: img.config.entrypoint.clone().unwrap_or_default(),
            cmd: img.config.cmd.clone().unwrap_or_default(),
            working_dir: img.config.working_dir.clone(),
            etc_passwd: etc("etc/passwd")?,
            etc_group: etc("etc/group")?,
        };
        let rootfs = match self.inner.config.images.rootfs {
            RootfsKind::SharedDir => Rootfs::Dir(
                images
                    .prepare_rootfs(&img.id, id, imagestore::RootfsMode::SharedDir)
                    .await?,
            ),
            RootfsKind::Block => Rootfs::Block {
                // The image store's qcow2 overlay of the image's ext4 image.
                image: images
                    .prepare_rootfs(&img.id, id, imagestore::RootfsMode::Block)
                    .await?,
                format: podsandbox::DiskFormat::Qcow2,
                fstype: "ext4".into(),
            },
        };
        let created = async {
            self.fail_point("create_container.rootfs_prepared")?;
            let policy = SecurityPolicy {
                seccomp_profile_dirs: self.inner.config.security.seccomp_profile_dirs.clone(),
                pod_privileged: pod_config
                    .linux
                    .as_ref()
                    .and_then(|l| l.security_context.as_ref())
                    .is_some_and(|s| s.privileged),
            };
            let mut cfg = container_config(id, &config, &defaults, rootfs, log.clone(), &policy)?;
            cfg.sysctls = pod_sysctls(pod_config)?.ipc;
            self.inner.runtime.create_container(sandbox_id, cfg).await?;
            let meta = ContainerMeta {
                id: id.into(),
                sandbox_id: sandbox_id.into(),
                config,
                image_ref: img.id.clone(),
                log_path: log,
                created_at_ns: podsandbox::container::now_ns(),
            };
            let saved = self
                .fail_point("create_container.container_created")
                .and_then(|()| self.inner.store.save_container(&meta));
            if let Err(err) = saved {
                if let Err(e) = self.inner.runtime.delete_container(sandbox_id, id).await {
                    tracing::error!(container = %id, "undo create: {e}");
                }
                return Err(err);
            }
            Ok(())
        }
        .await;
        if created.is_err() {
            if let Err(e) = images.remove_rootfs(id).await {
                tracing::error!(container = %id, "undo rootfs: {e}");
            }
        }
        created
    }
}
