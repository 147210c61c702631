//! The CRI server: the state every RPC shares, and serving it on the socket.

use std::{
    collections::HashMap,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use k8s_cri::v1::{
    image_service_server::ImageServiceServer, runtime_service_server::RuntimeServiceServer,
    ContainerEventResponse,
};
use tokio::sync::broadcast;

use crate::{
    config::{Config, Interworking},
    error::{CriError, Result},
    store::Store,
};

/// Runs a mutation to its end (or its own rollback) in a task of its own:
/// a client that goes away — a deadline passed, a kubelet restarted — drops
/// only its wait for the answer, never the handler half-way.
pub(crate) async fn to_completion<T, F>(work: F) -> Result<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T>> + Send + 'static,
{
    tokio::spawn(work)
        .await
        .map_err(|e| CriError::Internal(format!("the call's task failed: {e}")))?
}

/// The server's state; cheap to clone (one `Arc`).
#[derive(Debug, Clone)]
pub struct Cri {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: Config,
    pub(crate) runtime: podsandbox::Runtime,
    pub(crate) images: Arc<dyn imagestore::ImageService>,
    pub(crate) network: Arc<dyn cni::NetworkPlugin>,
    /// For Status (is a network config there?).
    pub(crate) cni: cni::Cni,
    pub(crate) store: Store,
    pub(crate) events: broadcast::Sender<ContainerEventResponse>,
    /// The Exec/Attach/PortForward server, once serving.
    pub(crate) streaming: std::sync::OnceLock<crate::streaming::Server>,
    /// One lock per pod: Run/Stop/Remove of one pod never interleave,
    /// different pods never wait for each other.
    pod_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Cri {
    /// The real thing: QEMU VMs, the image store, CNI.
    pub async fn new(config: Config) -> Result<Self> {
        let runtime = podsandbox::Runtime::new(config.runtime())?;
        let images = imagestore::ImageStore::open(imagestore::StoreConfig {
            root: config.image_root(),
            registries: config.images.registries.clone(),
            max_concurrent_downloads: None,
            block_headroom_mib: None,
            pull_progress_timeout_secs: config.images.pull_progress_timeout_secs,
            nodev_mounts: true,
            writable_layer_max_mib: Some(
                config
                    .images
                    .writable_layer_max_mib
                    .unwrap_or(crate::config::DEFAULT_WRITABLE_LAYER_MIB),
            ),
        })?;
        if config.network.write_default_conflist {
            cni::defaults::ensure_default_conflist(&config.network.conf_dir)?;
        }
        let cni = cni::Cni::new(config.cni());
        let model = match config.network.interworking {
            Interworking::Tcfilter => cni::InterworkingModel::TcFilter,
            Interworking::None => cni::InterworkingModel::None,
        };
        // Warm VMs boot with a NIC of their own that moves into the pod
        // that claims one (tcfilter: the veth's traffic goes to that tap).
        let factory = &runtime.config().factory;
        if model == cni::InterworkingModel::TcFilter
            && factory.warm_nic
            && (factory.pool > 0 || factory.template)
        {
            runtime.set_warm_nics(Arc::new(crate::warm_nics::CniWarmNics::new()?));
        }
        let network = cni::PodNetwork::new(
            cni.clone(),
            config.netns_dir(),
            config.network_state_dir(),
            model.build(),
        );
        Self::with_parts(config, runtime, Arc::new(images), Arc::new(network), cni)
    }

    /// Assembles a server from its parts (tests hand in fakes).
    pub fn with_parts(
        config: Config,
        runtime: podsandbox::Runtime,
        images: Arc<dyn imagestore::ImageService>,
        network: Arc<dyn cni::NetworkPlugin>,
        cni: cni::Cni,
    ) -> Result<Self> {
        let store = Store::open(&config.cri_dir())?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                runtime,
                images,
                network,
                cni,
                store,
                events: broadcast::channel(1024).0,
                streaming: std::sync::OnceLock::new(),
                pod_locks: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub(crate) fn pod_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.inner
            .pod_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    /// Passes a fail point of a multi-step call (see podsandbox's
    /// `failpoint`: armed by unit tests, or by `VC_CRASH_AT` in debug builds).
    pub(crate) fn fail_point(&self, point: &'static str) -> Result<()> {
        self.inner
            .runtime
            .fail_points()
            .hit(point)
            .map_err(|e| podsandbox::Error::from(e).into())
    }

    pub(crate) fn forget_pod_lock(&self, id: &str) {
        self.inner
            .pod_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Picks up where a previous vcrid left off: podsandbox's recovery
    /// (monitors of live containers, dead VMs, half-made sandboxes), then
    /// [`Cri::reconcile`]: whatever no record names is removed.
    pub async fn recover(&self) -> Result<crate::reconcile::Reconciled> {
        let recovered = self.inner.runtime.recover().await?;
        for (id, moved_to) in &recovered.set_aside {
            tracing::error!(pod = %id, moved_to = %moved_to.display(), "the pod's VM record was corrupt and set aside; its pod is NOTREADY");
        }
        let removed = self.reconcile().await;
        if !removed.is_empty() {
            tracing::warn!(?removed, "removed what no pod or container record names");
        }
        tracing::info!(
            pods = self.inner.store.pods().len(),
            containers = self.inner.store.containers().len(),
            monitors = recovered.monitors,
            vms_found_dead = recovered.found_dead.len(),
            torn_down = recovered.torn_down.len(),
            orphans_killed = recovered.orphans_killed.len(),
            "state recovered"
        );
        Ok(removed)
    }

    /// Starts the streaming server (loopback by default) for Exec, Attach
    /// and PortForward URLs.
    pub async fn start_streaming(&self) -> Result<std::net::SocketAddr> {
        if let Some(s) = self.inner.streaming.get() {
            return Ok(s.local_addr());
        }
        let server = crate::streaming::Server::start(
            crate::streaming::ServerConfig {
                addr: self.inner.config.streaming.address,
                ..Default::default()
            },
            Arc::new(crate::stream_runtime::PodStreams { cri: self.clone() }),
        )
        .await
        .map_err(|e| CriError::Internal(format!("streaming server: {e}")))?;
        let addr = server.local_addr();
        // Lost race: another call started one; this one is dropped (stops).
        let _ = self.inner.streaming.set(server);
        Ok(addr)
    }

    /// Turns container exits into CONTAINER_STOPPED events, for the life of
    /// the server.
    fn spawn_exit_events(&self) {
        let cri = self.clone();
        let mut exits = self.inner.runtime.subscribe_exits();
        tokio::spawn(async move {
            loop {
                match exits.recv().await {
                    Ok(exit) => cri.emit(
                        &exit.id,
                        k8s_cri::v1::ContainerEventType::ContainerStoppedEvent,
                    ),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("{n} container exit events dropped");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }

    /// Broadcasts a container event to GetContainerEvents streams.
    pub(crate) fn emit(&self, container_id: &str, kind: k8s_cri::v1::ContainerEventType) {
        let Some(c) = self.inner.store.container(container_id) else {
            return;
        };
        let pod = self
            .inner
            .store
            .pod(&c.sandbox_id)
            .map(|p| crate::runtime::sandbox_status::pod_status_brief(&p));
        let event = ContainerEventResponse {
            container_id: container_id.into(),
            container_event_type: kind as i32,
            created_at: podsandbox::container::now_ns(),
            pod_sandbox_status: pod,
            containers_statuses: Vec::new(),
        };
        // No subscriber is fine.
        let _ = self.inner.events.send(event);
    }
}

/// What `serve_with` does to the `:authority` of the requests it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authority {
    /// Every `:authority` becomes `localhost` before h2 sees it
    /// (`crate::grpc_authority`): kubelet, crictl, grpc-java and grpc-python
    /// send socket paths that h2 refuses.
    Rewrite,
    /// Requests reach h2 as sent (benchmarks, and tests proving the rewrite
    /// is needed).
    AsSent,
}

/// Takes `<state_dir>/vcrid.lock` (an exclusive `flock`, released when the
/// process ends however it ends) and writes this process's PID in it; an
/// error naming the holder's PID if another vcrid has it.
fn claim_state_dir(state_dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    use std::io::{Read as _, Seek as _, Write as _};
    let path = state_dir.join("vcrid.lock");
    let io = |action, source| CriError::Io {
        action,
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(state_dir).map_err(|e| io("create the state dir of", e))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| io("open", e))?;
    let mut lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
    {
        Ok(lock) => lock,
        Err((mut file, _)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(CriError::FailedPrecondition(format!(
                "the state dir {} is in use by another vcrid (pid {})",
                state_dir.display(),
                holder.trim()
            )));
        }
    };
    lock.set_len(0).map_err(|e| io("truncate", e))?;
    lock.rewind().map_err(|e| io("rewind", e))?;
    writeln!(lock, "{}", std::process::id()).map_err(|e| io("write", e))?;
    Ok(lock)
}

/// Serves `cri` on its configured socket until `shutdown` resolves. Pods keep
/// running after a shutdown; the next `vcrid` finds them.
pub async fn serve(cri: Cri, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    serve_with(cri, Authority::Rewrite, shutdown).await
}

/// [`serve`], choosing what happens to `:authority`.
pub async fn serve_with(
    cri: Cri,
    authority: Authority,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let path = cri
        .inner
        .config
        .socket_path()
        .map_err(|detail| CriError::invalid("listen", detail))?;
    // Recovery removes what no record names: two servers over one state
    // dir would remove each other's pods.
    let _owner = claim_state_dir(&cri.inner.config.state_dir)?;
    let listener = bind_socket(&path).await?;
    cri.start_streaming().await?;
    cri.recover().await?;
    // After recovery, which discards warm VMs a previous vcrid left.
    cri.inner.runtime.start_factory()?;
    cri.spawn_exit_events();
    tracing::info!(socket = %path.display(), ?authority, "vcrid serves");
    let router = tonic::transport::Server::builder()
        .layer(crate::rpc_log::RpcLogLayer)
        .add_service(RuntimeServiceServer::new(cri.clone()))
        .add_service(ImageServiceServer::new(cri.clone()));
    let result = match authority {
        Authority::Rewrite => {
            router
                .serve_with_incoming_shutdown(crate::grpc_authority::incoming(listener), shutdown)
                .await
        }
        Authority::AsSent => {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
    };
    let _ = std::fs::remove_file(&path);
    // Pods keep running; warm VMs no pod has are thrown away.
    cri.inner.runtime.stop_factory().await;
    result.map_err(|e| CriError::Internal(format!("gRPC server: {e}")))
}

/// Binds the socket with mode 0600; a live socket of another server is
/// not taken over, a stale one is replaced.
async fn bind_socket(path: &Path) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| CriError::Io {
            action: "create",
            path: dir.into(),
            source,
        })?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(CriError::FailedPrecondition(format!(
                "{} is served by another process (another vcrid?)",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(|source| CriError::Io {
            action: "remove stale socket",
            path: path.into(),
            source,
        })?;
    }
    // Bound under a name of its own, made 0600, then renamed into place:
    // the socket is never reachable at `path` with looser permissions.
    let mut staging = path.as_os_str().to_owned();
    staging.push(format!(".{}.tmp", std::process::id()));
    let staging = PathBuf::from(staging);
    let io = |action, source| CriError::Io {
        action,
        path: staging.clone(),
        source,
    };
    match std::fs::remove_file(&staging) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("remove stale", e)),
    }
    let listener = tokio::net::UnixListener::bind(&staging).map_err(|e| io("bind", e))?;
    let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io("chmod 0600", e))
        .and_then(|()| std::fs::rename(&staging, path).map_err(|e| io("rename into place", e)));
    if let Err(err) = placed {
        let _ = std::fs::remove_file(&staging);
        return Err(err);
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]
    use super::*;

    #[test]
    fn one_vcrid_owns_a_state_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let first = claim_state_dir(&state).expect("first");
        let err = claim_state_dir(&state).expect_err("second");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(
            err.to_string().contains(&format!(
                "in use by another vcrid (pid {})",
                std::process::id()
            )),
            "{err}"
        );
        drop(first);
        claim_state_dir(&state).expect("free again");
    }
}
