//! CreateContainer: bind the rootfs into the shared directory and have the
//! agent create the container (its process waits for StartContainer).

use std::os::unix::fs::DirBuilderExt;

use crate::{
    container::{oci_spec, ContainerConfig, ContainerRecord, ContainerState, ContainerStatus},
    mounts,
    sandbox::{check_id, now_secs, Runtime},
    state::SandboxState,
    Error, Result,
};

impl Runtime {
    pub async fn create_container(
        &self,
        sandbox_id: &str,
        config: ContainerConfig,
    ) -> Result<ContainerStatus> {
        check_id(sandbox_id)?;
        let cid = config.id.clone();
        let invalid = |detail: String| Error::InvalidContainer {
            id: cid.clone(),
            detail,
        };
        if !crate::sandbox::valid_id(&cid) {
            return Err(invalid(
                "use 1-128 characters of [A-Za-z0-9_.-], starting with a letter or digit".into(),
            ));
        }
        if config.args.is_empty() {
            return Err(invalid("no command: args is empty".into()));
        }
        if !config.rootfs.is_absolute() || !config.rootfs.is_dir() {
            return Err(invalid(format!(
                "rootfs {} is not an absolute path to a directory",
                config.rootfs.display()
            )));
        }
        let mut s = self.locked(sandbox_id).await?;
        if !matches!(s.record.state, SandboxState::Ready | SandboxState::Running) {
            return Err(Error::WrongState {
                id: sandbox_id.into(),
                action: "create a container in",
                state: s.record.state,
                hint: "",
            });
        }
        if s.record.containers.iter().any(|c| c.id == cid) {
            return Err(Error::ContainerExists {
                sandbox: sandbox_id.into(),
                id: cid,
            });
        }
        let vm = s.vm()?.clone();
        let shared_rel = format!("{cid}/rootfs");
        let target = self.run_dir(sandbox_id).join("shared").join(&shared_rel);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&target)
            .map_err(|source| Error::Io {
                action: "create",
                path: target.clone(),
                source,
            })?;
        let container_dir = self.run_dir(sandbox_id).join("shared").join(&cid);
        if let Err(err) = mounts::bind(&config.rootfs, &target) {
            let _ = mounts::remove_tree(&container_dir);
            return Err(err);
        }
        let spec = serde_json::to_vec(&oci_spec(&config, sandbox_id))
            .map_err(|e| invalid(format!("cannot encode the OCI spec: {e}")))?;
        let created = match self.agent(sandbox_id, vm.as_ref()).await {
            Ok(agent) => agent
                .create_container(&cid, spec, &shared_rel)
                .await
                .map_err(|e| Error::from_agent(&cid, "create", e)),
            Err(err) => Err(err),
        };
        if let Err(err) = created {
            let _ = mounts::remove_tree(&container_dir);
            return Err(err);
        }
        let record = ContainerRecord {
            id: cid.clone(),
            state: ContainerState::Created,
            rootfs_mount: target,
            log_path: config.log_path.clone(),
            exit_code: None,
            reason: None,
            created_at: now_secs(),
        };
        let status = record.status(sandbox_id);
        s.record.containers.push(record);
        self.inner.store.save(&s.record)?;
        tracing::info!(sandbox = %sandbox_id, container = %cid, "container created");
        Ok(status)
    }
}
