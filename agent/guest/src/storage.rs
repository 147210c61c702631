//! The sandbox's shared filesystem, mounted once, when first needed: after
//! the background module load (virtiofs and 9p are among the later modules).

use std::sync::Arc;

use nix::mount::{mount, MsFlags};
use tokio::sync::{watch, OnceCell};

#[derive(Debug, Clone)]
pub struct Storage {
    modules_loaded: watch::Receiver<bool>,
    mounted: Arc<OnceCell<Result<&'static str, String>>>,
}

impl Storage {
    pub fn new(modules_loaded: watch::Receiver<bool>) -> Self {
        Self {
            modules_loaded,
            mounted: Arc::default(),
        }
    }

    /// Mounts the shared filesystem (virtio-fs, else 9p) if not yet done;
    /// returns the filesystem type.
    pub async fn shared(&self) -> Result<&'static str, String> {
        let mut loaded = self.modules_loaded.clone();
        if loaded.wait_for(|done| *done).await.is_err() {
            return Err("the module loader stopped".into());
        }
        self.mounted
            .get_or_init(|| async {
                tokio::task::spawn_blocking(mount_shared)
                    .await
                    .unwrap_or_else(|e| Err(format!("mount task: {e}")))
            })
            .await
            .clone()
    }
}

fn mount_shared() -> Result<&'static str, String> {
    let target = agent::SHARED_FS_GUEST_PATH;
    std::fs::create_dir_all(target).map_err(|e| format!("mkdir {target}: {e}"))?;
    let virtiofs = mount(
        Some(agent::SHARED_FS_TAG),
        target,
        Some("virtiofs"),
        MsFlags::MS_NODEV,
        None::<&str>,
    );
    if virtiofs.is_ok() {
        return Ok("virtiofs");
    }
    let opts = "trans=virtio,version=9p2000.L,msize=524288,cache=mmap";
    match mount(
        Some(agent::SHARED_FS_TAG),
        target,
        Some("9p"),
        MsFlags::MS_NODEV,
        Some(opts),
    ) {
        Ok(()) => Ok("9p"),
        Err(e9p) => Err(format!(
            "cannot mount the shared filesystem {:?}: virtiofs: {}, 9p: {e9p}",
            agent::SHARED_FS_TAG,
            virtiofs.err().map(|e| e.to_string()).unwrap_or_default()
        )),
    }
}
