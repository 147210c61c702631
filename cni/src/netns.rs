//! Named network namespaces under the runtime's own directory.
//!
//! A namespace is made on a short-lived thread that `unshare(CLONE_NEWNET)`s
//! and bind-mounts `/proc/thread-self/ns/net` onto `<dir>/<name>`; the mount
//! keeps the namespace alive after the thread exits. Work inside a namespace
//! (netlink, `tc`, `ip`, opening a tap) runs on a dedicated thread that
//! `setns()`es into it and then exits, so no pooled thread ever changes
//! namespace. Processes spawned from that thread start inside the namespace.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

use crate::error::{CniError, Result};

/// A network namespace bind-mounted at `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetNs {
    path: PathBuf,
}

impl NetNs {
    /// Create the namespace `<dir>/<name>`; fails if it already exists.
    pub fn create(dir: &Path, name: &str) -> Result<Self> {
        crate::valid_name("netns name", name)?;
        std::fs::create_dir_all(dir).map_err(CniError::io("create netns dir", dir))?;
        let path = dir.join(name);
        // create_new: of two racing creators, one wins.
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(CniError::NetnsExists { path })
            }
            Err(e) => return Err(CniError::io("create netns mount point", &path)(e)),
        }
        let target = path.clone();
        let made = std::thread::Builder::new()
            .name("netns-create".into())
            .spawn(move || -> Result<()> {
                unshare(CloneFlags::CLONE_NEWNET).map_err(|source| CniError::Netns {
                    path: target.clone(),
                    action: "unshare(CLONE_NEWNET)",
                    source,
                })?;
                mount(
                    Some("/proc/thread-self/ns/net"),
                    &target,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|source| CniError::Netns {
                    path: target.clone(),
                    action: "bind-mount",
                    source,
                })
            })
            .map_err(|_| CniError::Thread {
                what: format!("creating netns {}", path.display()),
            })?
            .join()
            .map_err(|_| CniError::Thread {
                what: format!("creating netns {}", path.display()),
            })?;
        if let Err(e) = made {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(Self { path })
    }

    /// An existing namespace at `path` (checked when it is entered).
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        if !path.exists() {
            return Err(CniError::NetnsNotFound { path });
        }
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Run `f` on a fresh thread inside this namespace and return its result.
    pub fn run<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> Result<T> + Send,
        T: Send,
    {
        let path = self.path.clone();
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name("netns-work".into())
                .spawn_scoped(scope, move || -> Result<T> {
                    let file = File::open(&path).map_err(|source| {
                        if source.kind() == std::io::ErrorKind::NotFound {
                            CniError::NetnsNotFound { path: path.clone() }
                        } else {
                            CniError::Io {
                                action: "open netns",
                                path: path.clone(),
                                source,
                            }
                        }
                    })?;
                    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| CniError::Netns {
                        path: path.clone(),
                        action: "setns",
                        source,
                    })?;
                    f()
                })
                .map_err(|_| CniError::Thread {
                    what: format!("work in netns {}", self.path.display()),
                })?;
            handle.join().map_err(|_| CniError::Thread {
                what: format!("work in netns {}", self.path.display()),
            })?
        })
    }

    /// Unmount and unlink the namespace; succeeds if it is already gone.
    pub fn remove(&self) -> Result<()> {
        remove_path(&self.path)
    }
}

/// Unmount and unlink a namespace mount point; idempotent.
pub fn remove_path(path: &Path) -> Result<()> {
    match umount2(path, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point (already unmounted); ENOENT: gone.
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(source) => {
            return Err(CniError::Netns {
                path: path.to_path_buf(),
                action: "unmount",
                source,
            })
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CniError::io("remove netns", path)(e)),
    }
}
