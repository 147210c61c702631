//! What vcrid keeps about pods and containers beyond podsandbox's records:
//! the CRI request they were made from (metadata, labels, annotations, log
//! paths), timestamps, the pod's network, and the name reservations.
//!
//! One JSON file per object under `<state_dir>/cri/{pods,containers}/`,
//! written temp-file → fsync → rename; loaded whole at start-up. The
//! runtime state (VM, processes, exit codes) stays podsandbox's.
//!
//! ```text
//!   RunPodSandbox: reserve name ──► network ──► VM ──► save PodMeta
//!                        │ any failure: undo in reverse, release the name;
//!                        │ an undo that fails: PodMeta saved NOTREADY with the reason
//!   RemovePodSandbox: remove containers ──► VM ──► network ──► delete PodMeta, release name
//! ```
//!
//! These records are the authority on what exists: at start-up
//! (`reconcile.rs`) every sandbox, network, container and rootfs that no
//! record here names — what a crash between two steps above leaves — is
//! removed.

use std::{
    collections::HashMap,
    fs,
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use k8s_cri::v1 as cri;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::{CriError, Result};

/// A pod as vcrid knows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodMeta {
    pub id: String,
    /// The RunPodSandbox request's config, as kubelet sent it.
    pub config: cri::PodSandboxConfig,
    pub runtime_handler: String,
    pub created_at_ns: i64,
    /// The CNI result handed to the VM; `None` when the pod has no network.
    pub network: Option<cni::NetworkStatus>,
    /// StopPodSandbox ran: the pod is NOTREADY for good.
    pub stopped: bool,
    /// Why the last clean-up of this pod (a RunPodSandbox rolled back, a
    /// StopPodSandbox or RemovePodSandbox) did not finish: the pod is kept,
    /// NOTREADY, so that the next RemovePodSandbox finishes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleanup_error: Option<String>,
}

/// A container as vcrid knows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerMeta {
    pub id: String,
    pub sandbox_id: String,
    pub config: cri::ContainerConfig,
    /// The image ID the reference resolved to at creation.
    pub image_ref: String,
    /// The absolute log path (pod log directory + config.log_path), if any.
    pub log_path: Option<PathBuf>,
    pub created_at_ns: i64,
}

#[derive(Debug, Default)]
struct Maps {
    pods: HashMap<String, PodMeta>,
    containers: HashMap<String, ContainerMeta>,
    /// Reserved names → the ID holding them.
    names: HashMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    maps: Arc<Mutex<Maps>>,
}

/// The reservation key of a pod: what kubelet makes unique per attempt.
pub fn pod_name(m: &cri::PodSandboxMetadata) -> String {
    format!("{}_{}_{}_{}", m.name, m.namespace, m.uid, m.attempt)
}

/// The reservation key of a container (kubelet's k8s_<c>_<pod>_<ns>_<uid>_<attempt>).
pub fn container_name(c: &cri::ContainerMetadata, pod: &cri::PodSandboxMetadata) -> String {
    format!(
        "{}_{}_{}_{}_{}",
        c.name, pod.name, pod.namespace, pod.uid, c.attempt
    )
}

impl Store {
    /// Opens (creating) the store and loads every object. A file that does
    /// not parse is moved aside (`.corrupt`) and reported, not fatal.
    pub fn open(dir: &Path) -> Result<Self> {
        // The records hold the pods' configs, environment secrets included:
        // 0700 directories, 0600 files.
        for d in [dir.to_path_buf(), dir.join("pods"), dir.join("containers")] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .and_then(|()| fs::set_permissions(&d, fs::Permissions::from_mode(0o700)))
                .map_err(|source| CriError::Io {
                    action: "create (0700)",
                    path: d.clone(),
                    source,
                })?;
        }
        let mut maps = Maps::default();
        for pod in load_all::<PodMeta>(&dir.join("pods"))? {
            if let Some(m) = &pod.config.metadata {
                maps.names.insert(pod_name(m), pod.id.clone());
            }
            maps.pods.insert(pod.id.clone(), pod);
        }
        for c in load_all::<ContainerMeta>(&dir.join("containers"))? {
            let pod_md = maps
                .pods
                .get(&c.sandbox_id)
                .and_then(|p| p.config.metadata.clone());
            if let (Some(cm), Some(pm)) = (&c.config.metadata, pod_md) {
                maps.names.insert(container_name(cm, &pm), c.id.clone());
            }
            maps.containers.insert(c.id.clone(), c);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            maps: Arc::new(Mutex::new(maps)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves `name` for `id`; AlreadyExists naming the holder if taken.
    pub fn reserve(&self, what: &'static str, name: &str, id: &str) -> Result<()> {
        let mut maps = self.lock();
        if let Some(holder) = maps.names.get(name) {
            return Err(CriError::NameReserved {
                what,
                name: name.into(),
                id: holder.clone(),
            });
        }
        maps.names.insert(name.into(), id.into());
        Ok(())
    }

    /// Releases `name` if `id` holds it.
    pub fn release(&self, name: &str, id: &str) {
        let mut maps = self.lock();
        if maps.names.get(name).map(String::as_str) == Some(id) {
            maps.names.remove(name);
        }
    }

    pub fn save_pod(&self, pod: &PodMeta) -> Result<()> {
        write_atomic(&self.dir.join("pods").join(format!("{}.json", pod.id)), pod)?;
        self.lock().pods.insert(pod.id.clone(), pod.clone());
        Ok(())
    }

    pub fn pod(&self, id: &str) -> Option<PodMeta> {
        self.lock().pods.get(id).cloned()
    }

    pub fn pods(&self) -> Vec<PodMeta> {
        let mut pods: Vec<_> = self.lock().pods.values().cloned().collect();
        pods.sort_by_key(|p| p.created_at_ns);
        pods
    }

    /// Forgets a pod and releases its name.
    pub fn remove_pod(&self, id: &str) -> Result<()> {
        remove_file(&self.dir.join("pods").join(format!("{id}.json")))?;
        let mut maps = self.lock();
        if let Some(pod) = maps.pods.remove(id) {
            if let Some(m) = &pod.config.metadata {
                let name = pod_name(m);
                if maps.names.get(&name).map(String::as_str) == Some(id) {
                    maps.names.remove(&name);
                }
            }
        }
        Ok(())
    }

    pub fn save_container(&self, c: &ContainerMeta) -> Result<()> {
        write_atomic(
            &self.dir.join("containers").join(format!("{}.json", c.id)),
            c,
        )?;
        self.lock().containers.insert(c.id.clone(), c.clone());
        Ok(())
    }

    pub fn container(&self, id: &str) -> Option<ContainerMeta> {
        self.lock().containers.get(id).cloned()
    }

    pub fn containers(&self) -> Vec<ContainerMeta> {
        let mut all: Vec<_> = self.lock().containers.values().cloned().collect();
        all.sort_by_key(|c| c.created_at_ns);
        all
    }

    /// Forgets a container and releases its name.
    pub fn remove_container(&self, id: &str) -> Result<()> {
        remove_file(&self.dir.join("containers").join(format!("{id}.json")))?;
        let mut maps = self.lock();
        if let Some(c) = maps.containers.remove(id) {
            let pod_md = maps
                .pods
                .get(&c.sandbox_id)
                .and_then(|p| p.config.metadata.clone());
            if let (Some(cm), Some(pm)) = (&c.config.metadata, pod_md) {
                let name = container_name(cm, &pm);
                if maps.names.get(&name).map(String::as_str) == Some(id) {
                    maps.names.remove(&name);
                }
            }
        }
        Ok(())
    }

    /// Resolves a full ID or a unique prefix of one (crictl passes
    /// truncated IDs, like containerd accepts them).
    pub fn resolve_pod(&self, id: &str) -> Option<String> {
        resolve(self.lock().pods.keys(), id)
    }

    pub fn resolve_container(&self, id: &str) -> Option<String> {
        resolve(self.lock().containers.keys(), id)
    }
}

fn resolve<'a>(keys: impl Iterator<Item = &'a String>, id: &str) -> Option<String> {
    if id.is_empty() {
        return None;
    }
    let matches: Vec<&String> = keys.filter(|k| k.starts_with(id)).collect();
    match matches.as_slice() {
        [one] => Some((*one).clone()),
        many => many.iter().find(|k| k.as_str() == id).map(|k| (*k).clone()),
    }
}

fn load_all<T: DeserializeOwned>(dir: &Path) -> Result<Vec<T>> {
    let entries = fs::read_dir(dir).map_err(|source| CriError::Io {
        action: "list",
        path: dir.into(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let parsed = fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<T>(&b).map_err(|e| e.to_string()));
        match parsed {
            Ok(v) => out.push(v),
            Err(err) => {
                tracing::error!(path = %path.display(), "unreadable record set aside: {err}");
                let _ = fs::rename(&path, path.with_extension("corrupt"));
            }
        }
    }
    Ok(out)
}

fn write_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let io = |action, source| CriError::Io {
        action,
        path: path.into(),
        source,
    };
    let bytes =
        serde_json::to_vec_pretty(value).map_err(|e| CriError::Internal(format!("encode: {e}")))?;
    let tmp = path.with_extension("json.tmp");
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io("create", e))?;
    f.write_all(&bytes).map_err(|e| io("write", e))?;
    f.sync_all().map_err(|e| io("sync", e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| io("rename", e))?;
    // The rename is durable once the directory is.
    match path.parent() {
        Some(dir) => fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("sync the directory of", e)),
        None => Ok(()),
    }
}

fn remove_file(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CriError::Io {
            action: "remove",
            path: path.into(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(id: &str, name: &str) -> PodMeta {
        PodMeta {
            id: id.into(),
            config: cri::PodSandboxConfig {
                metadata: Some(cri::PodSandboxMetadata {
                    name: name.into(),
                    uid: "u1".into(),
                    namespace: "default".into(),
                    attempt: 0,
                }),
                ..Default::default()
            },
            runtime_handler: String::new(),
            created_at_ns: 1,
            network: None,
            stopped: false,
            cleanup_error: None,
        }
    }

    #[test]
    fn names_are_reserved_persisted_and_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let p = pod("aaaa1111", "web");
        let name = pod_name(p.config.metadata.as_ref().expect("md"));
        store.reserve("pod", &name, &p.id).expect("reserve");
        store.save_pod(&p).expect("save");
        let err = store.reserve("pod", &name, "bbbb").expect_err("taken");
        assert_eq!(err.code(), tonic::Code::AlreadyExists);
        assert!(err.to_string().contains("aaaa1111"), "{err}");
        // A restart finds the pod and its reservation.
        let again = Store::open(dir.path()).expect("reopen");
        assert_eq!(again.pod("aaaa1111").map(|p| p.id), Some("aaaa1111".into()));
        assert!(again.reserve("pod", &name, "cccc").is_err());
        assert_eq!(again.resolve_pod("aaaa").as_deref(), Some("aaaa1111"));
        assert_eq!(again.resolve_pod(""), None);
        again.remove_pod("aaaa1111").expect("remove");
        again.reserve("pod", &name, "cccc").expect("free again");
        assert!(Store::open(dir.path()).expect("reopen").pods().is_empty());
    }

    #[test]
    fn records_are_0600_in_0700_dirs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("cri");
        let store = Store::open(&root).expect("open");
        store.save_pod(&pod("aaaa1111", "web")).expect("save");
        let mode = |p: &Path| {
            use std::os::unix::fs::PermissionsExt as _;
            fs::metadata(p).expect("stat").permissions().mode() & 0o777
        };
        for d in [root.clone(), root.join("pods"), root.join("containers")] {
            assert_eq!(mode(&d), 0o700, "{}", d.display());
        }
        assert_eq!(mode(&root.join("pods/aaaa1111.json")), 0o600);
    }

    #[test]
    fn a_corrupt_record_is_set_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(Store::open(dir.path()).expect("open"));
        std::fs::write(dir.path().join("pods/bad.json"), b"{").expect("write");
        let store = Store::open(dir.path()).expect("open");
        assert!(store.pods().is_empty());
        assert!(dir.path().join("pods/bad.corrupt").exists());
    }
}
