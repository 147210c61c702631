//! The sandbox's host cgroup: the VMM and its helpers in
//! `<cgroup parent>/vc-<sandbox>` of every mounted hierarchy (cgroup v1
//! controllers and the v2 unified tree alike), so kubelet's pod cgroup
//! accounts and limits the whole VM, as Kata's `sandbox_cgroup_only` does.
//!
//! The parent comes from the pod spec, so it is checked to be a plain
//! relative cgroup path (no `..`, a small alphabet) and is always joined
//! under a hierarchy's mount point; a systemd slice name
//! (`kubepods-besteffort-pod1.slice`) expands as systemd lays it out
//! (`kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice`).
//! Directories this creates (the sandbox's and any missing parents) are
//! recorded and removed again, deepest first, when the sandbox goes.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Where pod cgroup parents are rooted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupRoot {
    /// The hierarchy's root, as on a node where kubelet owns `/kubepods`.
    #[default]
    Root,
    /// The runtime's own cgroup in each hierarchy: for a runtime that runs
    /// inside a container (or a test) and must keep its VMs inside it.
    Own,
}

/// What a sandbox made: the directories, deepest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxCgroup {
    pub created: Vec<PathBuf>,
    /// The sandbox's own directory in each hierarchy.
    pub leaves: Vec<PathBuf>,
}

/// A cgroup parent from a pod spec, as a relative path.
pub fn parent_path(parent: &str) -> Result<PathBuf> {
    let bad = |why: &'static str| Error::InvalidCgroupParent {
        parent: parent.to_string(),
        why,
    };
    if parent.len() > 1024 {
        return Err(bad("too long"));
    }
    if !parent
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/' | ':' | '@'))
    {
        return Err(bad("use only [A-Za-z0-9_.:@/-]"));
    }
    let trimmed = parent.trim_start_matches('/');
    if !parent.contains('/') && parent.ends_with(".slice") {
        return slice_path(parent).ok_or_else(|| bad("not a valid systemd slice name"));
    }
    // Split by hand: Path::components would quietly drop "." and "//".
    if trimmed.is_empty()
        || trimmed
            .trim_end_matches('/')
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad(
            "must be a cgroup path without empty, '.' or '..' components",
        ));
    }
    Ok(PathBuf::from(trimmed.trim_end_matches('/')))
}

/// `a-b-c.slice` → `a.slice/a-b.slice/a-b-c.slice` (systemd's nesting).
fn slice_path(name: &str) -> Option<PathBuf> {
    let stem = name.strip_suffix(".slice")?;
    if stem.is_empty() || stem.starts_with('-') || stem.ends_with('-') || stem.contains("--") {
        return None;
    }
    let mut path = PathBuf::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    Some(path)
}

/// Each cgroup hierarchy: its mount point and this process's cgroup in it
/// (relative).
pub fn hierarchies() -> Vec<(PathBuf, PathBuf)> {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        // ... mountpoint ... - fstype source options
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut right = right.split_whitespace();
        let fstype = right.next().unwrap_or("");
        let options = right.nth(1).unwrap_or("");
        let Some(mountpoint) = left.split_whitespace().nth(4) else {
            continue;
        };
        let own_path = match fstype {
            "cgroup2" => own
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .unwrap_or("/"),
            "cgroup" => own
                .lines()
                .find_map(|l| {
                    let mut f = l.splitn(3, ':');
                    let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
                    let listed: Vec<&str> = controllers.split(',').collect();
                    options
                        .split(',')
                        .any(|o| listed.contains(&o))
                        .then_some(path)
                })
                .unwrap_or("/"),
            _ => continue,
        };
        out.push((
            PathBuf::from(mountpoint),
            PathBuf::from(own_path.trim_start_matches('/')),
        ));
    }
    out
}

/// Creates `<root>/<parent>/vc-<id>` in every hierarchy and moves `pids`
/// into it. On error, what was created is removed again.
pub fn place(id: &str, parent: &Path, root: CgroupRoot, pids: &[u32]) -> Result<SandboxCgroup> {
    let mut made = SandboxCgroup::default();
    let result = (|| {
        for (mount, own) in hierarchies() {
            let base = match root {
                CgroupRoot::Root => mount.clone(),
                CgroupRoot::Own => mount.join(&own),
            };
            let leaf = base.join(parent).join(format!("vc-{id}"));
            let mut missing = Vec::new();
            let mut p = leaf.as_path();
            while !p.exists() && p.starts_with(&base) && p != base {
                missing.push(p.to_path_buf());
                match p.parent() {
                    Some(up) => p = up,
                    None => break,
                }
            }
            for dir in missing.iter().rev() {
                std::fs::create_dir(dir).map_err(|source| Error::Io {
                    action: "create cgroup",
                    path: dir.clone(),
                    source,
                })?;
                made.created.insert(0, dir.clone());
            }
            // cgroup v1 cpuset: a new group has no CPUs or memory nodes
            // until given its parent's.
            inherit_cpuset(&base, &leaf);
            move_charges(&leaf);
            for pid in pids {
                let procs = leaf.join("cgroup.procs");
                std::fs::write(&procs, pid.to_string()).map_err(|source| Error::Io {
                    action: "move the VM into cgroup",
                    path: procs,
                    source,
                })?;
            }
            made.leaves.push(leaf);
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(made),
        Err(err) => {
            remove(&made);
            Err(err)
        }
    }
}

/// cgroup v1 memory: the VM's processes are moved in after boot, and v1
/// leaves what a process already charged (the guest memory QEMU touched
/// while booting, its own heap) with the old group unless the new one asks
/// for it: anonymous pages and the shared (memfd) guest memory they map
/// (bits 0 and 1). cgroup v2 has no such move; there charges stay where
/// they were made.
fn move_charges(leaf: &Path) {
    let knob = leaf.join("memory.move_charge_at_immigrate");
    if knob.exists() {
        if let Err(e) = std::fs::write(&knob, "3") {
            tracing::warn!(path = %knob.display(), "the VM's memory stays charged to the runtime's cgroup: {e}");
        }
    }
}

fn inherit_cpuset(base: &Path, leaf: &Path) {
    if !base.join("cpuset.cpus").exists() {
        return;
    }
    let mut chain = Vec::new();
    let mut p = leaf;
    while p != base {
        chain.push(p.to_path_buf());
        match p.parent() {
            Some(up) => p = up,
            None => return,
        }
    }
    for dir in chain.iter().rev() {
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let mine = dir.join(file);
            if std::fs::read_to_string(&mine).is_ok_and(|v| v.trim().is_empty()) {
                if let Some(from) = dir.parent() {
                    if let Ok(v) = std::fs::read_to_string(from.join(file)) {
                        let _ = std::fs::write(&mine, v.trim());
                    }
                }
            }
        }
    }
}

/// Removes what [`place`] created, deepest first. A directory that still
/// has processes (the VM not yet gone) or children of others is left, with
/// a warning.
pub fn remove(cg: &SandboxCgroup) {
    for dir in &cg.created {
        for attempt in 0..50 {
            match std::fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                // EBUSY: exiting processes still listed; try for a moment.
                Err(e)
                    if e.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32)
                        && attempt < 49 =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => {
                    tracing::warn!(path = %dir.display(), "cgroup left behind: {e}");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_stay_relative_and_slices_expand() {
        let p = |s: &str| parent_path(s).map(|p| p.display().to_string());
        assert_eq!(
            p("/kubepods/besteffort/pod12").ok().as_deref(),
            Some("kubepods/besteffort/pod12")
        );
        assert_eq!(
            p("kubepods-besteffort-pod12.slice").ok().as_deref(),
            Some("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice")
        );
        for bad in [
            "/",
            "",
            "/a/../../etc",
            "a/./b",
            "a b",
            "-x.slice",
            "a--b.slice",
            "/a/$(x)",
        ] {
            let err = parent_path(bad).expect_err(bad);
            assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument, "{bad}");
            assert!(err.to_string().contains("cgroup parent"), "{err}");
        }
    }

    #[test]
    fn a_process_is_placed_and_the_cgroups_removed() {
        if nix::unistd::geteuid().as_raw() != 0 {
            eprintln!("skipping: placing a process in a cgroup needs root");
            return;
        }
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let parent = parent_path(&format!("vcunit-{}/pod", std::process::id())).expect("parent");
        let cg = place("t1", &parent, CgroupRoot::Own, &[child.id()]).expect("place");
        assert!(!cg.leaves.is_empty());
        for leaf in &cg.leaves {
            let procs = std::fs::read_to_string(leaf.join("cgroup.procs")).expect("procs");
            assert!(
                procs.lines().any(|l| l == child.id().to_string()),
                "{} lists {procs:?}",
                leaf.display()
            );
        }
        // Two new directories per hierarchy: vcunit-N/pod and vc-t1 in it
        // (pod is part of the parent here, so three).
        assert_eq!(cg.created.len(), 3 * cg.leaves.len());
        let _ = child.kill();
        let _ = child.wait();
        remove(&cg);
        for dir in &cg.created {
            assert!(!dir.exists(), "{} left", dir.display());
        }
    }

    #[test]
    fn hierarchies_are_found() {
        // Every Linux host running these tests mounts at least one.
        let h = hierarchies();
        assert!(!h.is_empty(), "no cgroup hierarchy in /proc/self/mountinfo");
        assert!(h
            .iter()
            .all(|(m, own)| m.is_absolute() && own.is_relative()));
    }
}
