//! Safe layer unpacking into one directory per layer.
//!
//! Every path of a layer entry is resolved with `openat2(RESOLVE_IN_ROOT)`
//! against the layer directory, so `..`, absolute symlinks and symlinked parent
//! directories can never reach outside it. Final components are created with
//! `*at` calls relative to the resolved parent and never followed
//! (`O_NOFOLLOW | O_EXCL`, `AT_SYMLINK_NOFOLLOW`), so nothing is written through
//! a symlink planted by an earlier entry. Hardlink targets are resolved the
//! same way and must already exist inside the layer. Entries with `..`
//! components are refused outright.
//!
//! Whiteouts become overlayfs whiteouts in the layer's own directory:
//! `.wh.<name>` → a 0:0 character device `<name>`, `.wh..wh..opq` →
//! `trusted.overlay.opaque=y` on the directory.

use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps};
use rustix::io::Errno;
use sha2::{Digest as _, Sha256};

use crate::digest::Digest;
use crate::error::{ImageError, Result};
use crate::manifest::Compression;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Hashes everything read through it: the diff ID of the uncompressed tar.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Unpacks one layer blob into `dest` (an existing empty directory) and returns
/// the digest of its uncompressed tar (to check against the config's diff ID).
pub(crate) fn unpack_layer(
    blob: impl Read,
    compression: Compression,
    dest: &Path,
    layer: &str,
) -> Result<Digest> {
    let blob = io::BufReader::with_capacity(256 * 1024, blob);
    let decompressed: Box<dyn Read> = match compression {
        Compression::None => Box::new(blob),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(blob)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(blob).map_err(
            |source| ImageError::Unpack {
                layer: layer.to_string(),
                entry: String::new(),
                source,
            },
        )?),
    };
    let root = rustix::fs::open(
        dest,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )
    .map_err(|e| ImageError::io("open layer dir", dest, e.into()))?;
    let mut archive = tar::Archive::new(HashingReader {
        inner: decompressed,
        hasher: Sha256::new(),
    });
    let mut u = Unpacker {
        root,
        layer,
        dir_times: Vec::new(),
        dir_times_bytes: 0,
        last_dir: None,
        buf: vec![0; 1 << 20],
    };
    let entries = archive.entries().map_err(|source| u.err("", source))?;
    for entry in entries {
        let mut entry = entry.map_err(|source| u.err("", source))?;
        u.entry(&mut entry)?;
    }
    u.finish()?;
    // The tar reader stops at the end-of-archive blocks; hash the rest too.
    let mut reader = archive.into_inner();
    io::copy(&mut reader, &mut io::sink()).map_err(|source| u.err("", source))?;
    Ok(Digest::from_hasher(reader.hasher))
}

struct Unpacker<'a> {
    root: OwnedFd,
    layer: &'a str,
    /// Directory mtimes, applied last (creating entries inside changes them),
    /// by joined path; at most [`MAX_DIR_TIMES_BYTES`] of paths are kept (a
    /// deeper tree keeps the unpack time on the rest).
    dir_times: Vec<(Vec<u8>, u64)>,
    dir_times_bytes: usize,
    /// The directory the last directory entry made or found, by joined
    /// path: the parent of the next entry in a tar's usual order, found
    /// without resolving its path again (a deep chain would cost O(depth²)).
    last_dir: Option<(Vec<u8>, OwnedFd)>,
    /// Copy buffer for file contents (fewer, larger writes than `io::copy`'s 8 KiB).
    buf: Vec<u8>,
}

fn copy_large(from: &mut impl Read, to: &mut impl io::Write, buf: &mut [u8]) -> io::Result<()> {
    loop {
        let n = match from.read(buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
    }
}

/// Splits an entry path into normal components; `None` for a `..` component.
fn components(raw: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return None,
            c => out.push(c.to_vec()),
        }
    }
    Some(out)
}

fn join(components: &[Vec<u8>]) -> Vec<u8> {
    let mut p = Vec::new();
    for (i, c) in components.iter().enumerate() {
        if i > 0 {
            p.push(b'/');
        }
        p.extend_from_slice(c);
    }
    if p.is_empty() {
        p.push(b'.');
    }
    p
}

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

const RESOLVE: ResolveFlags = ResolveFlags::IN_ROOT.union(ResolveFlags::NO_MAGICLINKS);
/// The longest path resolved by one `openat2` (below PATH_MAX, 4096).
const MAX_RESOLVE: usize = 3072;
/// The most bytes of directory paths kept for their mtimes.
const MAX_DIR_TIMES_BYTES: usize = 64 << 20;
const DIR_FLAGS: OFlags = OFlags::DIRECTORY
    .union(OFlags::RDONLY)
    .union(OFlags::CLOEXEC)
    .union(OFlags::NOFOLLOW);

impl Unpacker<'_> {
    fn err(&self, entry: &str, source: io::Error) -> ImageError {
        ImageError::Unpack {
            layer: self.layer.to_string(),
            entry: entry.to_string(),
            source,
        }
    }

    fn hostile(&self, entry: &str, reason: &str) -> ImageError {
        ImageError::HostileEntry {
            layer: self.layer.to_string(),
            entry: entry.to_string(),
            reason: reason.to_string(),
        }
    }

    /// Opens a directory of the layer, resolved inside the layer root: symlinks,
    /// the last component included, resolve as if the layer root were `/`.
    ///
    /// A path longer than one system call takes (PATH_MAX; a 20,000-deep
    /// chain is 40,000 bytes) is resolved [`MAX_RESOLVE`] bytes at a time,
    /// each piece inside the directory the last one reached: still never
    /// outside the layer (an absolute or `..` symlink that deep resolves
    /// from that directory instead of the layer root).
    fn open_in_root(&self, comps: &[Vec<u8>]) -> rustix::io::Result<OwnedFd> {
        let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC;
        let mut reached: Option<OwnedFd> = None;
        let mut start = 0;
        loop {
            let mut end = start;
            let mut len = 0;
            while end < comps.len() && (end == start || len + comps[end].len() < MAX_RESOLVE) {
                len += comps[end].len() + 1;
                end += 1;
            }
            let base = reached.as_ref().map_or(self.root.as_fd(), |fd| fd.as_fd());
            let fd = rustix::fs::openat2(
                base,
                os(&join(&comps[start..end])),
                flags,
                Mode::empty(),
                RESOLVE,
            )?;
            if end >= comps.len() {
                return Ok(fd);
            }
            reached = Some(fd);
            start = end;
        }
    }

    /// Opens (creating missing directories, root-owned 0755) the parent of an entry.
    fn parent(&self, comps: &[Vec<u8>]) -> rustix::io::Result<OwnedFd> {
        match self.open_in_root(comps) {
            Err(Errno::NOENT) => {}
            other => return other,
        }
        let mut fd = rustix::fs::openat(&self.root, ".", DIR_FLAGS, Mode::empty())?;
        for i in 1..=comps.len() {
            fd = match self.open_in_root(&comps[..i]) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => {
                    match rustix::fs::mkdirat(&fd, os(&comps[i - 1]), Mode::from_raw_mode(0o755)) {
                        Ok(()) => {}
                        // A dangling symlink: refuse rather than guess where it points.
                        Err(Errno::EXIST) => return Err(Errno::LOOP),
                        Err(e) => return Err(e),
                    }
                    self.open_in_root(&comps[..i])?
                }
                Err(e) => return Err(e),
            };
        }
        Ok(fd)
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<()> {
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let Some(comps) = components(&raw) else {
            return Err(self.hostile(&name, "path has a '..' component"));
        };
        let kind = entry.header().entry_type();
        let Some((base, parent_comps)) = comps.split_last() else {
            // The layer root itself ("./"): apply its metadata only.
            if kind.is_dir() {
                let meta = Meta::of(entry).map_err(|e| self.err(&name, e))?;
                let fd = rustix::fs::openat(&self.root, ".", DIR_FLAGS, Mode::empty())
                    .map_err(|e| self.err(&name, e.into()))?;
                meta.apply_fd(&fd, false).map_err(|e| self.err(&name, e))?;
                self.dir_times.push((b".".to_vec(), meta.mtime));
            }
            return Ok(());
        };
        let parent_path = join(parent_comps);
        let cached = match &self.last_dir {
            Some((path, fd)) if *path == parent_path => fd.try_clone().ok(),
            _ => None,
        };
        if kind != tar::EntryType::Directory {
            // Whatever else an entry does may replace what the cache names.
            self.last_dir = None;
        }
        let parent = match cached {
            Some(fd) => Ok(fd),
            None => self.parent(parent_comps),
        };
        let parent = parent.map_err(|e| match e {
            Errno::LOOP => self.hostile(&name, "a parent is a dangling symlink"),
            Errno::NOTDIR => self.hostile(&name, "a parent is not a directory"),
            e => self.err(&name, e.into()),
        })?;

        if base.as_slice() == OPAQUE {
            return rustix::fs::fsetxattr(
                &parent,
                OPAQUE_XATTR,
                b"y",
                rustix::fs::XattrFlags::empty(),
            )
            .map_err(|e| self.err(&name, e.into()));
        }
        if base.starts_with(b".wh..wh.") {
            // AUFS metadata (`.wh..wh.plnk`, `.wh..wh.aufs`): not content, as in Docker.
            return Ok(());
        }
        if let Some(hidden) = base.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(self.hostile(&name, "whiteout of nothing"));
            }
            remove_existing(&parent, hidden).map_err(|e| self.err(&name, e))?;
            return rustix::fs::mknodat(
                &parent,
                os(hidden),
                FileType::CharacterDevice,
                Mode::empty(),
                rustix::fs::makedev(0, 0),
            )
            .map_err(|e| self.err(&name, e.into()));
        }

        let meta = Meta::of(entry).map_err(|e| self.err(&name, e))?;
        let base = os(base);
        use tar::EntryType as T;
        match kind {
            T::Directory => {
                match rustix::fs::statat(&parent, base, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
                    Ok(_) => {
                        // A symlink replaced: paths through it now go elsewhere.
                        self.last_dir = None;
                        remove_existing(&parent, base.as_bytes())
                            .map_err(|e| self.err(&name, e))?;
                        mkdir(&parent, base).map_err(|e| self.err(&name, e))?;
                    }
                    Err(Errno::NOENT) => mkdir(&parent, base).map_err(|e| self.err(&name, e))?,
                    Err(e) => return Err(self.err(&name, e.into())),
                }
                let fd = rustix::fs::openat(&parent, base, DIR_FLAGS, Mode::empty())
                    .map_err(|e| self.err(&name, e.into()))?;
                meta.apply_fd(&fd, false).map_err(|e| self.err(&name, e))?;
                let path = join(&comps);
                if self.dir_times_bytes + path.len() <= MAX_DIR_TIMES_BYTES {
                    self.dir_times_bytes += path.len();
                    self.dir_times.push((path.clone(), meta.mtime));
                }
                self.last_dir = Some((path, fd));
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                remove_existing(&parent, base.as_bytes()).map_err(|e| self.err(&name, e))?;
                let fd = rustix::fs::openat(
                    &parent,
                    base,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| self.err(&name, e.into()))?;
                let mut file = std::fs::File::from(fd);
                copy_large(entry, &mut file, &mut self.buf).map_err(|e| self.err(&name, e))?;
                meta.apply_fd(&file, true).map_err(|e| self.err(&name, e))?;
            }
            T::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| self.hostile(&name, "symlink without a target"))?
                    .into_owned();
                remove_existing(&parent, base.as_bytes()).map_err(|e| self.err(&name, e))?;
                rustix::fs::symlinkat(os(&target), &parent, base)
                    .map_err(|e| self.err(&name, e.into()))?;
                meta.apply_at(&parent, base)
                    .map_err(|e| self.err(&name, e))?;
            }
            T::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| self.hostile(&name, "hardlink without a target"))?
                    .into_owned();
                let tcomps = components(&target)
                    .ok_or_else(|| self.hostile(&name, "hardlink target has a '..' component"))?;
                let Some((tbase, tparent)) = tcomps.split_last() else {
                    return Err(self.hostile(&name, "hardlink to the layer root"));
                };
                let tparent_fd = self
                    .open_in_root(tparent)
                    .map_err(|_| self.hostile(&name, "hardlink target is not inside the layer"))?;
                match rustix::fs::statat(&tparent_fd, os(tbase), AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::Directory => {}
                    Ok(_) => return Err(self.hostile(&name, "hardlink to a directory")),
                    Err(_) => {
                        return Err(self.hostile(&name, "hardlink target is not inside the layer"))
                    }
                }
                if tparent == parent_comps && tbase.as_slice() == base.as_bytes() {
                    return Ok(());
                }
                remove_existing(&parent, base.as_bytes()).map_err(|e| self.err(&name, e))?;
                rustix::fs::linkat(&tparent_fd, os(tbase), &parent, base, AtFlags::empty())
                    .map_err(|e| self.err(&name, e.into()))?;
            }
            T::Char | T::Block | T::Fifo => {
                let ft = match kind {
                    T::Char => FileType::CharacterDevice,
                    T::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                let h = entry.header();
                let dev = rustix::fs::makedev(
                    h.device_major().ok().flatten().unwrap_or(0),
                    h.device_minor().ok().flatten().unwrap_or(0),
                );
                remove_existing(&parent, base.as_bytes()).map_err(|e| self.err(&name, e))?;
                rustix::fs::mknodat(&parent, base, ft, Mode::from_raw_mode(meta.mode), dev)
                    .map_err(|e| self.err(&name, e.into()))?;
                meta.apply_at(&parent, base)
                    .map_err(|e| self.err(&name, e))?;
                // mknod applied the umask and chown cleared set-id bits: set the mode last.
                // The node was just created by this unpacker, so the name is not a symlink.
                rustix::fs::chmodat(
                    &parent,
                    base,
                    Mode::from_raw_mode(meta.mode),
                    AtFlags::empty(),
                )
                .map_err(|e| self.err(&name, e.into()))?;
            }
            // Global PAX headers and other metadata-only entries.
            _ => tracing::debug!(layer = self.layer, entry = %name, ?kind, "skipping entry"),
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.last_dir = None;
        for (path, mtime) in self.dir_times.iter().rev() {
            let comps = components(path).unwrap_or_default();
            let res = match comps.split_last() {
                None => rustix::fs::utimensat(&self.root, ".", &times(*mtime), AtFlags::empty()),
                Some((base, parent)) => self.open_in_root(parent).and_then(|p| {
                    rustix::fs::utimensat(&p, os(base), &times(*mtime), AtFlags::SYMLINK_NOFOLLOW)
                }),
            };
            res.map_err(|e| self.err(&String::from_utf8_lossy(path), e.into()))?;
        }
        rustix::fs::syncfs(&self.root).map_err(|e| self.err("", e.into()))
    }
}

fn mkdir(parent: &OwnedFd, name: &OsStr) -> io::Result<()> {
    rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o755)).map_err(io::Error::from)
}

fn times(mtime: u64) -> Timestamps {
    let t = Timespec {
        tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Removes whatever is at `parent/name` (a directory recursively), without following symlinks.
fn remove_existing(parent: &OwnedFd, name: &[u8]) -> io::Result<()> {
    match rustix::fs::statat(parent, os(name), AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
            remove_tree(parent, name)
        }
        Ok(_) => rustix::fs::unlinkat(parent, os(name), AtFlags::empty()).map_err(io::Error::from),
    }
}

/// Removes a directory tree relative to a directory fd, never following symlinks.
pub(crate) fn remove_tree(parent: impl AsFd, name: &[u8]) -> io::Result<()> {
    let dir = rustix::fs::openat(&parent, os(name), DIR_FLAGS, Mode::empty())?;
    let mut children = Vec::new();
    for e in rustix::fs::Dir::read_from(&dir)? {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n == b"." || n == b".." {
            continue;
        }
        children.push((n.to_vec(), e.file_type()));
    }
    for (n, ft) in children {
        if ft == FileType::Directory {
            remove_tree(&dir, &n)?;
        } else {
            rustix::fs::unlinkat(&dir, os(&n), AtFlags::empty())?;
        }
    }
    rustix::fs::unlinkat(&parent, os(name), AtFlags::REMOVEDIR).map_err(io::Error::from)
}

/// The xattrs an image may set on its files: file capabilities and the
/// user namespace. Others are dropped — `trusted.overlay.*` would steer the
/// host's overlayfs (opaque dirs, redirects), `security.*` the host's LSMs.
fn xattr_allowed(name: &str) -> bool {
    name == "security.capability" || name.starts_with("user.")
}

/// Ownership, mode, mtime and xattrs of an entry.
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: u64,
    xattrs: Vec<(String, Vec<u8>)>,
}

impl Meta {
    fn of<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Self> {
        let h = entry.header();
        let mut m = Meta {
            // Empty numeric fields are zero, as Go's archive/tar reads them.
            uid: u32::try_from(h.uid().unwrap_or(0)).unwrap_or(u32::MAX),
            gid: u32::try_from(h.gid().unwrap_or(0)).unwrap_or(u32::MAX),
            mode: h.mode().unwrap_or(0o644) & 0o7777,
            mtime: h.mtime().unwrap_or(0),
            xattrs: Vec::new(),
        };
        if let Some(exts) = entry.pax_extensions()? {
            for ext in exts {
                let ext = ext?;
                let Ok(key) = ext.key() else { continue };
                let value = ext.value_bytes();
                let num = || {
                    std::str::from_utf8(value)
                        .ok()
                        .and_then(|s| s.split('.').next()?.parse::<u64>().ok())
                };
                if let Some(x) = key.strip_prefix("SCHILY.xattr.") {
                    if xattr_allowed(x) {
                        m.xattrs.push((x.to_string(), value.to_vec()));
                    } else {
                        tracing::debug!(xattr = x, "image xattr outside the allowlist dropped");
                    }
                } else if key == "uid" {
                    m.uid = num().and_then(|n| u32::try_from(n).ok()).unwrap_or(m.uid);
                } else if key == "gid" {
                    m.gid = num().and_then(|n| u32::try_from(n).ok()).unwrap_or(m.gid);
                } else if key == "mtime" {
                    m.mtime = num().unwrap_or(m.mtime);
                }
            }
        }
        Ok(m)
    }

    /// Owner, then mode (chown clears set-id bits), xattrs and, for files, mtime.
    fn apply_fd(&self, fd: impl AsFd, set_mtime: bool) -> io::Result<()> {
        rustix::fs::fchown(
            &fd,
            Some(rustix::fs::Uid::from_raw(self.uid)),
            Some(rustix::fs::Gid::from_raw(self.gid)),
        )?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(self.mode))?;
        for (k, v) in &self.xattrs {
            rustix::fs::fsetxattr(&fd, k.as_str(), v, rustix::fs::XattrFlags::empty())?;
        }
        if set_mtime {
            rustix::fs::futimens(&fd, &times(self.mtime))?;
        }
        Ok(())
    }

    /// For symlinks and device nodes: owner and mtime by name, without following.
    fn apply_at(&self, parent: &OwnedFd, name: &OsStr) -> io::Result<()> {
        rustix::fs::chownat(
            parent,
            name,
            Some(rustix::fs::Uid::from_raw(self.uid)),
            Some(rustix::fs::Gid::from_raw(self.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
        rustix::fs::utimensat(parent, name, &times(self.mtime), AtFlags::SYMLINK_NOFOLLOW)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_refuse_dotdot() {
        assert_eq!(
            components(b"./a//b/"),
            Some(vec![b"a".to_vec(), b"b".to_vec()])
        );
        assert_eq!(
            components(b"/etc/passwd"),
            Some(vec![b"etc".to_vec(), b"passwd".to_vec()])
        );
        assert_eq!(components(b"a/../../b"), None);
        assert_eq!(components(b"./"), Some(vec![]));
    }

    fn tar_of(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, link, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn only_allowlisted_xattrs_are_applied() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([
            ("SCHILY.xattr.trusted.overlay.opaque", &b"y"[..]),
            ("SCHILY.xattr.trusted.overlay.redirect", &b"/etc"[..]),
            (
                "SCHILY.xattr.security.selinux",
                &b"system_u:object_r:etc_t:s0"[..],
            ),
            ("SCHILY.xattr.user.note", &b"kept"[..]),
        ])
        .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_path("d/").unwrap();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(0o755);
        h.set_cksum();
        b.append(&h, &b""[..]).unwrap();
        let tar = b.into_inner().unwrap();
        unpack_layer(&tar[..], Compression::None, dir.path(), "test").unwrap();
        let d = dir.path().join("d");
        let mut buf = [0u8; 64];
        let n = rustix::fs::lgetxattr(&d, "user.note", &mut buf).expect("user.* is applied");
        assert_eq!(&buf[..n], b"kept");
        for dropped in [
            "trusted.overlay.opaque",
            "trusted.overlay.redirect",
            "security.selinux",
        ] {
            assert!(
                rustix::fs::lgetxattr(&d, dropped, &mut buf).is_err(),
                "{dropped} was applied"
            );
        }
        assert!(xattr_allowed("security.capability"));
    }

    #[test]
    fn a_chain_deeper_than_path_max_unpacks_and_is_removed() {
        // 10,000 bytes of path: past PATH_MAX, so resolved in pieces (the
        // e2e hostile-image test and safefs's own test go 20,000 deep).
        const DEPTH: usize = 5_000;
        let dir = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut path = String::new();
        for _ in 0..DEPTH {
            path.push_str("d/");
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            h.set_mode(0o755);
            b.append_data(&mut h, &path, &b""[..]).unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(6);
        h.set_mode(0o644);
        b.append_data(&mut h, format!("{path}bottom"), &b"bottom"[..])
            .unwrap();
        let tar = b.into_inner().unwrap();
        let layer = dir.path().join("layer");
        std::fs::create_dir(&layer).unwrap();
        unpack_layer(&tar[..], Compression::None, &layer, "deep").unwrap();
        // Walk down by descriptor (the path is too long for one call).
        let mut fd = rustix::fs::openat(rustix::fs::CWD, &layer, DIR_FLAGS, Mode::empty()).unwrap();
        for _ in 0..DEPTH {
            fd = rustix::fs::openat(&fd, "d", DIR_FLAGS, Mode::empty()).unwrap();
        }
        let file = rustix::fs::openat(&fd, "bottom", OFlags::RDONLY, Mode::empty()).unwrap();
        let mut text = String::new();
        std::fs::File::from(file).read_to_string(&mut text).unwrap();
        assert_eq!(text, "bottom");
        safefs::remove_all(&layer).unwrap();
        assert!(!layer.exists());
    }

    #[test]
    fn symlink_to_root_is_followed_inside_the_layer() {
        let dir = tempfile::tempdir().unwrap();
        let tar = tar_of(&[
            ("evil", tar::EntryType::Symlink, "/", b""),
            ("evil/x/y", tar::EntryType::Regular, "", b"data"),
            ("up", tar::EntryType::Symlink, "../../..", b""),
            ("up/z", tar::EntryType::Regular, "", b"z"),
            (".wh..wh.plnk", tar::EntryType::Directory, "", b""),
        ]);
        let d = unpack_layer(&tar[..], Compression::None, dir.path(), "test").unwrap();
        assert_eq!(d, Digest::of(&tar));
        assert_eq!(std::fs::read(dir.path().join("x/y")).unwrap(), b"data");
        assert_eq!(std::fs::read(dir.path().join("z")).unwrap(), b"z");
        assert!(!dir.path().join(".wh.plnk").exists() && !dir.path().join(".wh..wh.plnk").exists());
    }
}
