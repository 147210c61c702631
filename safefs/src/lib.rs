//! `safefs`: filesystem operations that hold against a tree someone hostile
//! shaped — an image's layer, a container's writes, a guest's shared files.
#![forbid(unsafe_code)]

use std::{ffi::OsString, io, os::unix::ffi::OsStrExt as _, path::Path};

use rustix::fs::{AtFlags, Mode, OFlags};

const DIR: OFlags = OFlags::DIRECTORY
    .union(OFlags::RDONLY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Removes `root` and everything below it; a missing `root` is fine.
///
/// Iterative, so a tree 20,000 directories deep costs neither stack (the
/// standard library's `remove_dir_all` recurses and overflows a 2 MiB thread
/// stack) nor a file descriptor per level (one at a time: the way back up
/// is `..`, the names on the way down are kept). Nothing is followed: every
/// directory is opened `O_NOFOLLOW` relative to its parent, symlinks are
/// unlinked as links. A directory on another filesystem than `root` — a
/// mount nobody detached — stops the removal with an error instead of
/// being emptied.
pub fn remove_all(root: &Path) -> io::Result<()> {
    let mut cur = match rustix::fs::open(root, DIR, Mode::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        // A symlink or a file: the entry itself goes, nothing it points to.
        Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
            return std::fs::remove_file(root)
        }
        Err(e) => return Err(e.into()),
    };
    let dev = rustix::fs::fstat(&cur)?.st_dev;
    // The names from `root` down to `cur`.
    let mut path: Vec<OsString> = Vec::new();
    loop {
        match empty_but_dirs(&cur)? {
            Some(sub) => {
                let next = rustix::fs::openat(&cur, sub.as_os_str(), DIR, Mode::empty())?;
                if rustix::fs::fstat(&next)?.st_dev != dev {
                    return Err(io::Error::other(format!(
                        "{} is a mount point: not removing across it",
                        root.join(path.iter().collect::<std::path::PathBuf>())
                            .join(&sub)
                            .display()
                    )));
                }
                path.push(sub);
                cur = next;
            }
            None => {
                let Some(name) = path.pop() else {
                    drop(cur);
                    return match std::fs::remove_dir(root) {
                        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                        other => other,
                    };
                };
                let parent = rustix::fs::openat(&cur, "..", DIR, Mode::empty())?;
                cur = parent;
                rustix::fs::unlinkat(&cur, name.as_os_str(), AtFlags::REMOVEDIR)?;
            }
        }
    }
}

/// Unlinks every entry of `dir` that is not a directory; returns the name
/// of a subdirectory still there, if any.
fn empty_but_dirs(dir: &rustix::fd::OwnedFd) -> io::Result<Option<OsString>> {
    let mut entries = rustix::fs::Dir::read_from(dir)?;
    let mut sub = None;
    while let Some(entry) = entries.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let name = std::ffi::OsStr::from_bytes(name).to_os_string();
        let is_dir = match entry.file_type() {
            rustix::fs::FileType::Directory => true,
            rustix::fs::FileType::Unknown => {
                rustix::fs::statat(dir, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)?.st_mode
                    & 0o170000
                    == 0o040000
            }
            _ => false,
        };
        if is_dir {
            if sub.is_none() {
                sub = Some(name);
            }
            continue;
        }
        match rustix::fs::unlinkat(dir, name.as_os_str(), AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(sub)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]
    use super::*;

    #[test]
    fn a_very_deep_tree_goes_on_a_small_stack() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("tree");
        std::fs::create_dir(&root).expect("mkdir");
        // Deep by openat, as a hostile writer makes it (paths get too long).
        let mut fd = rustix::fs::open(&root, DIR, Mode::empty()).expect("open");
        for i in 0..20_000 {
            rustix::fs::mkdirat(&fd, "d", Mode::from_raw_mode(0o755)).expect("mkdir");
            if i % 1000 == 0 {
                rustix::fs::openat(
                    &fd,
                    "f",
                    OFlags::CREATE | OFlags::WRONLY,
                    Mode::from_raw_mode(0o644),
                )
                .expect("file");
            }
            fd = rustix::fs::openat(&fd, "d", DIR, Mode::empty()).expect("open");
        }
        drop(fd);
        let removed = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || remove_all(&root))
            .expect("thread")
            .join()
            .expect("no overflow");
        removed.expect("removed");
        assert!(!dir.path().join("tree").exists());
    }

    #[test]
    fn symlinks_are_removed_not_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        std::fs::write(outside.join("precious"), b"x").expect("write");
        let root = dir.path().join("tree");
        std::fs::create_dir_all(root.join("a/b")).expect("mkdir");
        std::os::unix::fs::symlink(&outside, root.join("a/link")).expect("symlink");
        std::os::unix::fs::symlink(&outside, root.join("a/b/link2")).expect("symlink");
        std::fs::write(root.join("a/b/file"), b"y").expect("write");
        remove_all(&root).expect("remove");
        assert!(!root.exists());
        assert_eq!(std::fs::read(outside.join("precious")).expect("kept"), b"x");
        // Gone already is fine; a symlink as the root is unlinked, not followed.
        remove_all(&root).expect("missing root");
        std::os::unix::fs::symlink(&outside, &root).expect("symlink");
        remove_all(&root).expect("the link goes");
        assert!(std::fs::symlink_metadata(&root).is_err());
        assert!(outside.join("precious").exists());
    }
}
