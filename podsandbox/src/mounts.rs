//! Host mounts a sandbox owns: container rootfs and volume bind mounts in
//! its shared directory. Removing a directory that still has a bind mount
//! under it would delete the files of the mounted source, so every removal
//! of a run dir first detaches whatever is mounted below it.
//!
//! The guest writes its shared directory (virtio-fs exports it read-write),
//! so the host never creates a mount point there: a guest that swapped a
//! directory for a symlink between the host's mkdir and its mount would have
//! the host mount a volume wherever it liked (Kata's CVE-2020-2026). The
//! host works in `mounts/`, a directory only it sees, and `shared/` — what
//! the guest gets — is a read-only view of it that receives its mounts
//! (a slave bind, see [`share_read_only`]): the guest can write inside a
//! container's rootfs mount, never rename or replace the entries the host
//! mounts on.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::{Error, Result};

pub fn bind(source: &Path, target: &Path) -> Result<()> {
    bind_propagating(source, target, false)
}

/// A recursive bind mount of `source` at `target`: private, or, with
/// `from_source`, a slave of the source's peer group, so that mounts the
/// host makes later under `source` appear under `target` too (when the
/// source's mount is shared, as kubelet's volume dirs are).
pub fn bind_propagating(source: &Path, target: &Path, from_source: bool) -> Result<()> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| Error::Io {
        action: "bind-mount onto",
        path: target.to_path_buf(),
        source: std::io::Error::from(e),
    })?;
    // Private: mounts made later under the source do not travel here; a
    // slave receives them (and sends nothing back).
    let propagation = if from_source {
        MsFlags::MS_SLAVE
    } else {
        MsFlags::MS_PRIVATE
    };
    mount(
        None::<&str>,
        target,
        None::<&str>,
        propagation | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| {
        let _ = umount2(target, MntFlags::MNT_DETACH);
        Error::Io {
            action: "set the mount propagation of",
            path: target.to_path_buf(),
            source: std::io::Error::from(e),
        }
    })?;
    Ok(())
}

/// Mounts a tmpfs of `size_mib` at `dir` (a sandbox's run dir): private,
/// 0700, and nothing on it is a device, setuid or executable.
pub fn bounded_tmpfs(dir: &Path, size_mib: u32) -> Result<()> {
    mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(format!("size={size_mib}m,mode=0700").as_str()),
    )
    .and_then(|()| {
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_PRIVATE,
            None::<&str>,
        )
    })
    .map_err(|e| {
        let _ = umount2(dir, MntFlags::MNT_DETACH);
        Error::Io {
            action: "mount a bounded tmpfs at",
            path: dir.to_path_buf(),
            source: std::io::Error::from(e),
        }
    })
}

/// The host-only directory of a sandbox's shares (see the module's doc).
pub fn host_share(run_dir: &Path) -> PathBuf {
    run_dir.join("mounts")
}

/// The guest's view of [`host_share`], which virtio-fs or 9p exports.
pub fn guest_share(run_dir: &Path) -> PathBuf {
    run_dir.join("shared")
}

/// Makes `view` a read-only view of `host_only` (two empty directories)
/// that receives every mount made later under `host_only`, each with its
/// own flags (a rootfs stays writable), and sends nothing back:
/// `host_only` becomes a mount of its own peer group, `view` its slave,
/// remounted read-only. On error nothing stays mounted.
pub fn share_read_only(host_only: &Path, view: &Path) -> Result<()> {
    let step = |action: &'static str, path: &Path, res: nix::Result<()>| {
        res.map_err(|e| Error::Io {
            action,
            path: path.to_path_buf(),
            source: std::io::Error::from(e),
        })
    };
    let made = (|| {
        let none = None::<&str>;
        step(
            "bind-mount onto itself",
            host_only,
            mount(Some(host_only), host_only, none, MsFlags::MS_BIND, none),
        )?;
        // Out of whatever peer group the parent mount is in, then a group
        // of its own: its mounts travel to the view and nowhere else.
        step(
            "make private",
            host_only,
            mount(none, host_only, none, MsFlags::MS_PRIVATE, none),
        )?;
        step(
            "make shared",
            host_only,
            mount(none, host_only, none, MsFlags::MS_SHARED, none),
        )?;
        step(
            "bind-mount the host-only share onto",
            view,
            mount(Some(host_only), view, none, MsFlags::MS_BIND, none),
        )?;
        step(
            "make a slave",
            view,
            mount(none, view, none, MsFlags::MS_SLAVE, none),
        )?;
        step(
            "remount read-only",
            view,
            mount(
                none,
                view,
                none,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                none,
            ),
        )
    })();
    if made.is_err() {
        for dir in [view, host_only] {
            let _ = umount2(dir, MntFlags::MNT_DETACH);
        }
    }
    made
}

/// Removes what a container has in a sandbox's shares: the copies of its
/// mounts in the guest's view first (a private mount's copy does not go
/// with it), then its host-only tree.
pub fn remove_container_share(run_dir: &Path, id: &str) -> Result<()> {
    unmount_under(&guest_share(run_dir).join(id))?;
    remove_tree(&host_share(run_dir).join(id))
}

/// Makes the bind mount at `target` read-only (a bind mount takes its own
/// flags only through a remount).
pub fn remount_readonly(target: &Path) -> Result<()> {
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| Error::Io {
        action: "remount read-only",
        path: target.to_path_buf(),
        source: std::io::Error::from(e),
    })
}

/// Mount points at or below `dir`, deepest first. Fails — never an empty
/// list — when mountinfo cannot be read or a line of it parsed: a caller
/// about to delete the tree must not take "unknown" for "none".
fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mountinfo = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(mountinfo).map_err(|source| Error::Io {
        action: "read",
        path: mountinfo.to_path_buf(),
        source,
    })?;
    mount_points_in(&text, dir).map_err(|line| Error::Io {
        action: "parse",
        path: mountinfo.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a line without a mount point: {line:?}"),
        ),
    })
}

/// The mount points (field 5) of mountinfo `text` at or below `dir`,
/// deepest first; the first line that has none is the error.
fn mount_points_in(text: &str, dir: &Path) -> std::result::Result<Vec<PathBuf>, String> {
    let mut found = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let point = line
            .split(' ')
            .nth(4)
            .filter(|p| p.starts_with('/'))
            .ok_or_else(|| line.to_string())?;
        let point = PathBuf::from(unescape(point));
        if point.starts_with(dir) {
            found.push(point);
        }
    }
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    Ok(found)
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            if let Ok(n) = u8::from_str_radix(&code, 8) {
                out.push(n as char);
                continue;
            }
            out.push('\\');
            out.push_str(&code);
        } else {
            out.push(c);
        }
    }
    out
}

/// Detaches every mount at or below `dir` — again while some are left:
/// mounts stacked on one point come off one per pass — and fails if any is
/// still there (a mount it cannot detach is an error, not a tree to walk).
pub fn unmount_under(dir: &Path) -> Result<()> {
    const PASSES: usize = 8;
    for _ in 0..PASSES {
        let points = mounts_under(dir)?;
        if points.is_empty() {
            return Ok(());
        }
        for point in points {
            match umount2(&point, MntFlags::MNT_DETACH) {
                Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
                Err(e) => {
                    return Err(Error::Io {
                        action: "unmount",
                        path: point,
                        source: std::io::Error::from(e),
                    })
                }
            }
        }
    }
    match mounts_under(dir)?.first() {
        None => Ok(()),
        Some(left) => Err(Error::Io {
            action: "unmount (still mounted)",
            path: left.clone(),
            source: std::io::Error::from(std::io::ErrorKind::ResourceBusy),
        }),
    }
}

/// Removes a directory tree that may have mounts below it, never following
/// a mount into its source.
pub fn remove_tree(dir: &Path) -> Result<()> {
    unmount_under(dir)?;
    // The shared dir is the guest's to shape: no recursion, nothing
    // followed, no mount crossed.
    match safefs::remove_all(dir) {
        Ok(()) => Ok(()),
        Err(source) => Err(Error::Io {
            action: "remove",
            path: dir.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_is_parsed_or_refused() {
        let text = "22 1 0:21 / /run rw shared:5 - tmpfs tmpfs rw\n\
                    30 22 0:40 / /run/vc/a\\040b rw - tmpfs tmpfs rw\n\
                    31 30 0:41 / /run/vc/a\\040b/c rw - tmpfs tmpfs rw\n";
        assert_eq!(
            mount_points_in(text, Path::new("/run/vc")),
            Ok(vec![
                PathBuf::from("/run/vc/a b/c"),
                PathBuf::from("/run/vc/a b")
            ])
        );
        // A line it cannot read fails the whole answer: "no mounts" would
        // let a removal walk into a bind mount's source.
        assert!(mount_points_in("22 1 0:21\n", Path::new("/run")).is_err());
        assert!(mount_points_in("22 1 0:21 / run rw\n", Path::new("/run")).is_err());
    }

    /// Needs root: two mounts stacked on one point both come off, and the
    /// tree goes.
    #[test]
    fn stacked_mounts_are_all_detached() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP stacked_mounts_are_all_detached: needs root for mount(2)");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let point = dir.path().join("run/a");
        std::fs::create_dir_all(&point).expect("mkdir");
        for _ in 0..2 {
            mount(
                Some("tmpfs"),
                &point,
                Some("tmpfs"),
                MsFlags::empty(),
                None::<&str>,
            )
            .expect("mount tmpfs");
        }
        assert_eq!(mounts_under(dir.path()).expect("mountinfo").len(), 1);
        remove_tree(&dir.path().join("run")).expect("remove");
        assert!(mounts_under(dir.path()).expect("mountinfo").is_empty());
        assert!(!dir.path().join("run").exists());
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
    }

    /// Needs root (CI and `make test` are): a bind-mounted source survives
    /// the removal of the tree it is mounted in.
    #[test]
    fn removing_a_tree_never_deletes_a_mounted_source() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!(
                "SKIP removing_a_tree_never_deletes_a_mounted_source: needs root for mount(2)"
            );
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("source");
        std::fs::create_dir(&source).expect("mkdir");
        std::fs::write(source.join("precious"), b"x").expect("write");
        let tree = dir.path().join("run");
        let target = tree.join("shared/c1/rootfs");
        std::fs::create_dir_all(&target).expect("mkdir");
        bind(&source, &target).expect("bind");
        assert!(target.join("precious").exists());
        remove_tree(&tree).expect("remove");
        assert!(!tree.exists());
        assert!(source.join("precious").exists(), "the source is untouched");
    }
}
