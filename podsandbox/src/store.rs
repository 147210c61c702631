//! Persistence: one directory per sandbox under `<state_dir>/sandboxes/`,
//! holding `state.json` (written temp file → fsync → rename → fsync dir) and
//! `lock` (flock'ed by every mutating operation, so concurrent calls on one
//! sandbox, from any process, serialize).
//!
//! A long-lived owner of the state dir (vcrid) keeps every record in memory
//! as well: the disk is the checkpoint written on every transition, reads
//! (status, list) never touch it. Where each call may come from another
//! process (`virtc`), [`Store::uncached`] makes every read go to disk.

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::{state::SandboxState, Error, Result};

/// Bumped when the record's meaning changes; older records are migrated on load.
pub const RECORD_VERSION: u32 = 1;

const RECORD: &str = "state.json";
const LOCK: &str = "lock";

/// Writes `value` as JSON to `path` (0600) atomically: a temp file beside
/// it, fsync, rename over it, fsync of the dir. Readers see the old file
/// or the new one, never a mix, and a crash leaves at most the temp file.
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let io = |action, source| Error::Io {
        action,
        path: path.to_path_buf(),
        source,
    };
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io(
            "write",
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
        ));
    };
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let json = serde_json::to_vec_pretty(value)
        .map_err(|e| io("serialize", std::io::Error::other(e.to_string())))?;
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io("create temp", e))?;
    file.write_all(&json).map_err(|e| io("write", e))?;
    file.sync_all().map_err(|e| io("fsync", e))?;
    fs::rename(&tmp, path).map_err(|e| io("rename", e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("fsync dir", e))
}

/// What is persisted of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub version: u32,
    pub id: String,
    pub state: SandboxState,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// Why the VM is gone when it went without being asked.
    pub reason: Option<String>,
    /// The VM, once booted.
    pub vm: Option<hypervisor::VmState>,
    /// The sandbox's containers, in creation order.
    #[serde(default)]
    pub containers: Vec<crate::container::ContainerRecord>,
    /// The pod's host name (containers' UTS name and /etc/hostname).
    #[serde(default)]
    pub hostname: String,
    /// The network the guest was given (without the taps).
    #[serde(default)]
    pub network: crate::network::SandboxNetwork,
    /// The host cgroup directories the VM was placed in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<crate::cgroup::SandboxCgroup>,
    /// Where the VM came from: booted for this sandbox, or claimed from
    /// the factory's pool.
    #[serde(default)]
    pub origin: crate::factory::VmOrigin,
    /// The size the sandbox asked for when its VM (from the pool) booted
    /// smaller: the floor resizes keep to. `None`: the VM's boot size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor: Option<hypervisor::VmSize>,
}

/// Holds a sandbox's lock until dropped.
#[derive(Debug)]
pub struct SandboxLock {
    _lock: Flock<File>,
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// Records by ID and the IDs of every sandbox dir, while this process
    /// owns the state dir; `None` once [`Store::uncached`].
    cache: std::sync::Arc<std::sync::Mutex<Option<Cache>>>,
}

#[derive(Debug, Default)]
struct Cache {
    records: std::collections::HashMap<String, SandboxRecord>,
    ids: std::collections::BTreeSet<String>,
}

impl Store {
    pub fn new(state_dir: &Path) -> Result<Self> {
        let root = state_dir.join("sandboxes");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(|source| Error::Io {
                action: "create state dir",
                path: root.clone(),
                source,
            })?;
        let store = Self {
            root,
            cache: Default::default(),
        };
        let ids = store.ids_on_disk()?;
        *store.cache() = Some(Cache {
            records: Default::default(),
            ids: ids.into_iter().collect(),
        });
        Ok(store)
    }

    /// Every read goes to disk from now on: other processes may write.
    pub fn uncached(&self) {
        *self.cache() = None;
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Option<Cache>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where records are moved that do not parse (outside `sandboxes/`, so
    /// they are no longer listed).
    pub fn corrupt_dir(&self) -> PathBuf {
        self.root.with_file_name("corrupt")
    }

    /// Moves the directory of a sandbox whose record does not parse to
    /// [`Store::corrupt_dir`], kept for a person to look at; returns where.
    pub fn set_aside(&self, id: &str) -> Result<PathBuf> {
        let to_dir = self.corrupt_dir();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&to_dir)
            .map_err(|source| Error::Io {
                action: "create",
                path: to_dir.clone(),
                source,
            })?;
        let to = to_dir.join(format!("{id}.{}", crate::sandbox::now_secs()));
        fs::rename(self.dir(id), &to).map_err(|source| Error::Io {
            action: "move aside",
            path: self.dir(id),
            source,
        })?;
        if let Some(cache) = self.cache().as_mut() {
            cache.records.remove(id);
            cache.ids.remove(id);
        }
        Ok(to)
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Claims `id`: fails with AlreadyExists if any sandbox has it.
    pub fn reserve(&self, id: &str) -> Result<()> {
        let dir = self.dir(id);
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                if let Some(cache) = self.cache().as_mut() {
                    cache.ids.insert(id.to_string());
                }
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(Error::AlreadyExists { id: id.into() })
            }
            Err(source) => Err(Error::Io {
                action: "create sandbox dir",
                path: dir,
                source,
            }),
        }
    }

    /// Takes the sandbox's exclusive lock, waiting for other holders.
    pub async fn lock(&self, id: &str) -> Result<SandboxLock> {
        let path = self.dir(id).join(LOCK);
        let id = id.to_string();
        let task = tokio::task::spawn_blocking(move || {
            let file = match OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(Error::NotFound { id })
                }
                Err(source) => {
                    return Err(Error::Io {
                        action: "open lock",
                        path,
                        source,
                    })
                }
            };
            Flock::lock(file, FlockArg::LockExclusive)
                .map(|lock| SandboxLock { _lock: lock })
                .map_err(|(_, errno)| Error::Io {
                    action: "lock",
                    path,
                    source: errno.into(),
                })
        });
        task.await.map_err(|e| Error::Io {
            action: "lock (task failed)",
            path: self.root.clone(),
            source: std::io::Error::other(e.to_string()),
        })?
    }

    /// Reads a sandbox's record. A directory without a record is a create
    /// that has not written one yet (or crashed before it could).
    pub fn load(&self, id: &str) -> Result<SandboxRecord> {
        if let Some(cache) = self.cache().as_ref() {
            if let Some(record) = cache.records.get(id) {
                return Ok(record.clone());
            }
            if !cache.ids.contains(id) {
                return Err(Error::NotFound { id: id.into() });
            }
        }
        let record = self.load_from_disk(id)?;
        if record.state != SandboxState::Creating || record.vm.is_some() {
            if let Some(cache) = self.cache().as_mut() {
                if cache.ids.contains(id) {
                    cache.records.insert(id.to_string(), record.clone());
                }
            }
        }
        Ok(record)
    }

    fn load_from_disk(&self, id: &str) -> Result<SandboxRecord> {
        let dir = self.dir(id);
        let path = dir.join(RECORD);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if dir.is_dir() {
                    return Ok(SandboxRecord {
                        version: RECORD_VERSION,
                        id: id.into(),
                        state: SandboxState::Creating,
                        vcpus: 0,
                        memory_mib: 0,
                        created_at: 0,
                        reason: None,
                        vm: None,
                        containers: Vec::new(),
                        hostname: String::new(),
                        network: Default::default(),
                        cgroup: None,
                        origin: Default::default(),
                        floor: None,
                    });
                }
                return Err(Error::NotFound { id: id.into() });
            }
            Err(source) => {
                return Err(Error::Io {
                    action: "read",
                    path,
                    source,
                })
            }
        };
        let record: SandboxRecord =
            serde_json::from_str(&text).map_err(|e| Error::CorruptState {
                id: id.into(),
                path: path.clone(),
                detail: e.to_string(),
            })?;
        if record.version > RECORD_VERSION {
            return Err(Error::CorruptState {
                id: id.into(),
                path,
                detail: format!(
                    "record version {} is newer than this binary's {RECORD_VERSION}",
                    record.version
                ),
            });
        }
        Ok(record)
    }

    /// Writes a record atomically: readers see the old or the new, never a mix.
    pub fn save(&self, record: &SandboxRecord) -> Result<()> {
        write_json(&self.dir(&record.id).join(RECORD), record)?;
        if let Some(cache) = self.cache().as_mut() {
            cache.ids.insert(record.id.clone());
            cache.records.insert(record.id.clone(), record.clone());
        }
        Ok(())
    }

    /// Removes everything of a sandbox. Gone already is fine.
    pub fn remove(&self, id: &str) -> Result<()> {
        // Moved aside first, in one rename: a lock() racing with the removal
        // (a monitor recording an exit) then finds no directory, instead of
        // creating its lock file in one being emptied (ENOTEMPTY).
        if let Some(cache) = self.cache().as_mut() {
            cache.records.remove(id);
            cache.ids.remove(id);
        }
        let dir = self.dir(id);
        let doomed = self.root.join(format!(".deleting-{id}"));
        if doomed.exists() {
            // A removal that was cut short earlier.
            let _ = fs::remove_dir_all(&doomed);
        }
        let dir = match fs::rename(&dir, &doomed) {
            Ok(()) => doomed,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(Error::Io {
                    action: "move aside",
                    path: dir,
                    source,
                })
            }
        };
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Io {
                action: "remove",
                path: dir,
                source,
            }),
        }
    }

    /// IDs of all sandboxes, sorted.
    pub fn ids(&self) -> Result<Vec<String>> {
        if let Some(cache) = self.cache().as_ref() {
            return Ok(cache.ids.iter().cloned().collect());
        }
        self.ids_on_disk()
    }

    fn ids_on_disk(&self) -> Result<Vec<String>> {
        let entries = fs::read_dir(&self.root).map_err(|source| Error::Io {
            action: "list",
            path: self.root.clone(),
            source,
        })?;
        let mut ids: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| crate::sandbox::valid_id(name))
            .collect();
        ids.sort();
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> SandboxRecord {
        SandboxRecord {
            version: RECORD_VERSION,
            id: id.into(),
            state: SandboxState::Ready,
            vcpus: 1,
            memory_mib: 256,
            created_at: 1,
            reason: None,
            vm: None,
            containers: Vec::new(),
            hostname: String::new(),
            network: Default::default(),
            cgroup: None,
            origin: Default::default(),
            floor: None,
        }
    }

    #[tokio::test]
    async fn reserve_save_load_list_remove() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::new(dir.path()).expect("store");
        store.reserve("a").expect("reserve");
        assert!(matches!(
            store.reserve("a"),
            Err(Error::AlreadyExists { .. })
        ));
        assert_eq!(store.load("a").expect("load").state, SandboxState::Creating);
        store.save(&record("a")).expect("save");
        assert_eq!(store.load("a").expect("load"), record("a"));
        store.reserve("b").expect("reserve");
        assert_eq!(
            store.ids().expect("ids"),
            vec!["a".to_string(), "b".to_string()]
        );
        let _lock = store.lock("a").await.expect("lock");
        store.remove("a").expect("remove");
        assert!(matches!(store.load("a"), Err(Error::NotFound { .. })));
        assert!(matches!(store.lock("a").await, Err(Error::NotFound { .. })));
        store.remove("a").expect("idempotent");
        let left: Vec<String> = fs::read_dir(dir.path().join("sandboxes"))
            .expect("root")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["b"], "not even the moved-aside dir of a");
    }

    #[tokio::test]
    async fn lock_serializes_holders() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::new(dir.path()).expect("store");
        store.reserve("a").expect("reserve");
        let first = store.lock("a").await.expect("lock");
        let store2 = store.clone();
        let waiter = tokio::spawn(async move { store2.lock("a").await.map(drop) });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!waiter.is_finished(), "second lock must wait for the first");
        drop(first);
        waiter.await.expect("join").expect("second lock");
    }

    #[test]
    fn corrupt_and_future_records_are_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::new(dir.path()).expect("store");
        store.reserve("a").expect("reserve");
        fs::write(store.dir("a").join(RECORD), "{not json").expect("write");
        let err = store.load("a").expect_err("corrupt");
        assert!(err.to_string().contains("is unreadable"), "{err}");
        let mut future = record("a");
        future.version = RECORD_VERSION + 1;
        // Written by a newer binary, not through this store.
        fs::write(
            store.dir("a").join(RECORD),
            serde_json::to_vec(&future).expect("json"),
        )
        .expect("write");
        assert!(store
            .load("a")
            .expect_err("future")
            .to_string()
            .contains("newer than this binary"));
    }
}
