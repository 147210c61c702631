//! Recover: what a restarted owner of the state dir (vcrid) does before it
//! serves anything, so that a crash at any step leaves nothing it does not
//! either finish or remove.
//!
//! ```text
//!   each sandbox dir ─┬─ record unreadable ──► moved to <state>/corrupt/, warned
//!                     ├─ creating (no final record) ──► torn down (VM, run dir, cgroup, record)
//!                     ├─ VM expected, VMM gone ──► stopped, containers exited (255, VMExited)
//!                     └─ VM runs ──► its watcher and its containers' monitors resumed
//!   each run dir without a live VM ──► processes naming it killed, dir removed
//! ```

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use crate::{container::ContainerState, sandbox::Runtime, Error, Result};

/// What [`Runtime::recover`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Sandboxes whose VM runs: watched again.
    pub running: Vec<String>,
    /// Sandboxes whose VM had died meanwhile: now stopped.
    pub found_dead: Vec<String>,
    /// Sandboxes whose creation had not finished: torn down.
    pub torn_down: Vec<String>,
    /// Records that did not parse, and where they were moved.
    pub set_aside: Vec<(String, PathBuf)>,
    /// Processes of VMs no record owns, killed.
    pub orphans_killed: Vec<i32>,
    /// Container monitors started again.
    pub monitors: usize,
    /// Containers whose creation had not finished (in the guest or the
    /// shared directory, with no record): removed, as `(sandbox, container)`.
    pub containers_discarded: Vec<(String, String)>,
}

impl Runtime {
    /// Picks up where a previous owner of the state dir left off (see the
    /// module's doc). Problems with one sandbox are logged and do not stop
    /// the others.
    pub async fn recover(&self) -> Result<Recovery> {
        let mut out = Recovery::default();
        for id in self.inner.store.ids()? {
            match self.inner.store.load(&id) {
                Ok(record) if record.state == crate::SandboxState::Creating => {
                    tracing::warn!(%id, "tearing down a sandbox whose creation did not finish");
                    let vm = self.restore_vm(&record).ok().flatten();
                    if vm.is_none() {
                        // The VM may have been spawned before the record
                        // named it: its processes name the run dir.
                        out.orphans_killed
                            .extend(kill_processes_naming(&id, &self.run_dir(&id)));
                    }
                    self.unwind(&id, vm.as_deref()).await;
                    out.torn_down.push(id);
                }
                Ok(record) if record.state.vm_expected() => match self.locked(&id).await {
                    Ok(s) if s.record.state.vm_expected() => {
                        if let Some(vm) = s.vm.clone() {
                            self.watch_vm(&id, vm);
                        }
                        let live: Vec<String> = s
                            .record
                            .containers
                            .iter()
                            .filter(|c| c.state != ContainerState::Stopped)
                            .map(|c| c.id.clone())
                            .collect();
                        let recorded: BTreeSet<String> =
                            s.record.containers.iter().map(|c| c.id.clone()).collect();
                        if let Some(vm) = s.vm.clone() {
                            let run_dir = self.vm_run_dir(&s.record);
                            out.containers_discarded.extend(
                                self.discard_unrecorded(&id, &run_dir, vm.as_ref(), &recorded)
                                    .await,
                            );
                        }
                        drop(s);
                        for cid in live {
                            self.spawn_container_monitor(&id, &cid);
                            out.monitors += 1;
                        }
                        out.running.push(id);
                    }
                    Ok(_) => out.found_dead.push(id),
                    Err(err) => tracing::error!(%id, "recovering: {}", err.chain()),
                },
                Ok(_) => {}
                Err(Error::NotFound { .. }) => {}
                Err(err @ Error::CorruptState { .. }) => match self.inner.store.set_aside(&id) {
                    Ok(to) => {
                        tracing::error!(%id, moved_to = %to.display(), "unreadable sandbox record set aside: {err}");
                        out.set_aside.push((id, to));
                    }
                    Err(move_err) => {
                        tracing::error!(%id, "unreadable sandbox record ({err}) cannot be set aside: {move_err}")
                    }
                },
                Err(err) => tracing::error!(%id, "recovering: {}", err.chain()),
            }
        }
        let more = self.remove_orphans(&out.running);
        out.orphans_killed.extend(more);
        tracing::info!(
            running = out.running.len(),
            found_dead = out.found_dead.len(),
            torn_down = out.torn_down.len(),
            set_aside = out.set_aside.len(),
            orphans_killed = out.orphans_killed.len(),
            monitors = out.monitors,
            containers_discarded = out.containers_discarded.len(),
            "sandboxes recovered"
        );
        Ok(out)
    }

    /// Removes what a create that did not finish left of a container in a
    /// running sandbox: its entry of the shared directory (bind mounts
    /// detached first) and its container in the guest. Only names a
    /// container could have are touched.
    async fn discard_unrecorded(
        &self,
        sandbox_id: &str,
        run_dir: &Path,
        vm: &dyn hypervisor::Hypervisor,
        recorded: &BTreeSet<String>,
    ) -> Vec<(String, String)> {
        let Ok(entries) = std::fs::read_dir(crate::mounts::host_share(run_dir)) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let Ok(cid) = entry.file_name().into_string() else {
                continue;
            };
            if recorded.contains(&cid) || !crate::sandbox::valid_id(&cid) {
                continue;
            }
            tracing::warn!(sandbox = %sandbox_id, container = %cid, "removing a container whose creation did not finish");
            self.discard_guest_container(sandbox_id, vm, &cid).await;
            if let Err(err) = crate::mounts::remove_container_share(run_dir, &cid) {
                tracing::warn!(sandbox = %sandbox_id, container = %cid, "removing its shared dir: {}", err.chain());
                continue;
            }
            out.push((sandbox_id.to_string(), cid));
        }
        out
    }

    /// Kills the processes (a QEMU, its helpers) that name the run dir of a
    /// sandbox whose VM is not supposed to run — no record, stopped, torn
    /// down, set aside — and removes run dirs no sandbox has (a pool VM's
    /// that no sandbox claimed among them). Returns the PIDs killed.
    fn remove_orphans(&self, running: &[String]) -> Vec<i32> {
        let run_root = &self.inner.config.run_dir;
        let Ok(entries) = std::fs::read_dir(run_root) else {
            return Vec::new();
        };
        let running: BTreeSet<&str> = running.iter().map(String::as_str).collect();
        // Each record's run dir by name (a VM from the pool keeps the
        // name it booted under), and whether its VM is to keep running.
        let mut known: std::collections::BTreeMap<String, bool> = Default::default();
        for id in self.inner.store.ids().unwrap_or_default() {
            let dir = match self.inner.store.load(&id) {
                Ok(record) => self.vm_run_dir(&record),
                Err(_) => self.run_dir(&id),
            };
            let Some(name) = dir.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let live = running.contains(id.as_str());
            let entry = known.entry(name.to_string()).or_insert(false);
            *entry |= live;
            known.entry(id).or_insert(false);
        }
        let mut killed = Vec::new();
        for entry in entries.flatten() {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if !entry.path().is_dir() || known.get(&name) == Some(&true) {
                continue;
            }
            // The run dir may be shared with others (vcrid keeps its netns
            // and CNI state there): only what a sandbox made is touched —
            // a sandbox's own ID, a dir with the `shared/` every sandbox
            // run dir has, or a warm VM's (perhaps cut short before its
            // `shared/`).
            let sandbox_made = known.contains_key(&name)
                || (crate::sandbox::valid_id(&name)
                    && (entry.path().join("shared").is_dir()
                        || name.starts_with(crate::factory::pool::ID_PREFIX)
                        || name.starts_with(crate::vm_template::ID_PREFIX)));
            if !sandbox_made {
                continue;
            }
            killed.extend(kill_processes_naming(&name, &entry.path()));
            if !known.contains_key(&name) {
                if let Err(err) = crate::mounts::remove_tree(&entry.path()) {
                    tracing::warn!(sandbox = %name, "removing an orphan run dir: {}", err.chain());
                }
            }
        }
        killed
    }
}

/// SIGKILLs the processes naming `dir` (see [`processes_naming`]): those of
/// a VM no running sandbox owns. Returns the PIDs killed.
pub(crate) fn kill_processes_naming(sandbox: &str, dir: &Path) -> Vec<i32> {
    let mut killed = Vec::new();
    for pid in processes_naming(dir) {
        tracing::warn!(%sandbox, pid, "killing a process of a VM no running sandbox owns");
        if let Some(p) = hypervisor::ProcessRef::of(pid) {
            if let Err(err) = p.signal(nix::sys::signal::Signal::SIGKILL) {
                tracing::warn!(pid, "kill: {err}");
                continue;
            }
            killed.push(pid);
        }
    }
    killed
}

/// The processes whose command line names a path inside `dir` (how a VMM
/// and its helpers are told their sockets), other than this one.
pub(crate) fn processes_naming(dir: &Path) -> Vec<i32> {
    let needle = format!("{}/", dir.display());
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| u32::try_from(*pid).ok() != Some(me))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|raw| {
                    raw.split(|b| *b == 0)
                        .any(|arg| String::from_utf8_lossy(arg).contains(&needle))
                })
                .unwrap_or(false)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use crate::{
        fake::{FakeDialer, FakeVms},
        Runtime, RuntimeConfig, SandboxConfig, SandboxState,
    };

    fn runtime(dir: &std::path::Path, vms: Arc<FakeVms>) -> Runtime {
        let config = RuntimeConfig {
            state_dir: dir.join("state"),
            run_dir: dir.join("run"),
            ..RuntimeConfig::default()
        };
        Runtime::with_parts(config, vms, Arc::new(FakeDialer::new(true))).expect("runtime")
    }

    async fn first_owner(dir: &std::path::Path, vms: Arc<FakeVms>) {
        let rt = runtime(dir, vms);
        for id in ["live", "dead", "corrupt"] {
            rt.create_sandbox(SandboxConfig {
                id: id.into(),
                ..Default::default()
            })
            .await
            .expect("create");
        }
        let image = dir.join("c1.qcow2");
        std::fs::write(&image, b"QFI\xfb").expect("image");
        rt.create_container(
            "dead",
            crate::container::ContainerConfig {
                id: "c1".into(),
                rootfs: crate::container::Rootfs::Block {
                    image: image.clone(),
                    format: hypervisor::DiskFormat::Qcow2,
                    fstype: "ext4".into(),
                },
                args: vec!["/bin/true".into()],
                ..Default::default()
            },
        )
        .await
        .expect("container");
        // A creation cut short: reserved, no final record.
        rt.inner.store.reserve("half").expect("reserve");
        std::fs::create_dir_all(dir.join("run/half")).expect("run dir");
        // A run dir nothing owns, and one that is not a sandbox's.
        std::fs::create_dir_all(dir.join("run/stray/shared")).expect("stray");
        std::fs::create_dir_all(dir.join("run/netns")).expect("netns");
        std::fs::write(dir.join("state/sandboxes/corrupt/state.json"), b"{garbage")
            .expect("corrupt");
    }

    #[tokio::test]
    async fn a_restart_sorts_every_sandbox_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _mounts = crate::fake::MountGuard(dir.path().to_path_buf());
        let vms = Arc::new(FakeVms::default());
        // The first owner runs in a tokio runtime of its own, dropped at
        // the end like a killed process: none of its tasks outlives it.
        let (path, first_vms) = (dir.path().to_path_buf(), vms.clone());
        std::thread::spawn(move || {
            let tokio_rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio");
            tokio_rt.block_on(first_owner(&path, first_vms));
        })
        .join()
        .expect("first owner");
        vms.get("dead")
            .expect("vm")
            .crash("QEMU (pid 7) was killed by SIGKILL");

        let rt = runtime(dir.path(), vms.clone());
        let mut exits = rt.subscribe_exits();
        let got = rt.recover().await.expect("recover");
        assert_eq!(got.running, ["live"]);
        assert_eq!(got.found_dead, ["dead"]);
        assert_eq!(got.torn_down, ["half"]);
        assert_eq!(got.set_aside.len(), 1);
        assert_eq!(got.set_aside[0].0, "corrupt");
        assert!(
            got.set_aside[0].1.join("state.json").exists(),
            "kept to look at"
        );

        let ids: Vec<String> = rt
            .list_sandboxes()
            .await
            .expect("list")
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(ids, ["dead", "live"]);
        let dead = rt.status_sandbox("dead").await.expect("status");
        assert_eq!(dead.state, SandboxState::Stopped);
        let c = rt.container_status("dead", "c1").await.expect("container");
        assert_eq!(c.state, crate::container::ContainerState::Stopped);
        assert_eq!(c.exit_code, Some(crate::VM_EXIT_CODE));
        assert_eq!(c.reason.as_deref(), Some(crate::VM_EXIT_REASON));
        assert!(
            c.message.as_deref().unwrap_or("").contains("SIGKILL"),
            "{c:?}"
        );
        let exit = tokio::time::timeout(Duration::from_secs(5), exits.recv())
            .await
            .expect("announced")
            .expect("exit");
        assert_eq!((exit.id.as_str(), exit.exit_code), ("c1", 255));
        assert!(!dir.path().join("run/half").exists());
        assert!(!dir.path().join("run/stray").exists());
        assert!(dir.path().join("run/netns").exists(), "not a sandbox's");
        assert!(!dir.path().join("run/corrupt").exists());
        // And the dead one is removable.
        rt.delete_container("dead", "c1")
            .await
            .expect("delete container");
        rt.delete_sandbox("dead").await.expect("delete");
    }

    #[test]
    fn a_process_naming_a_dir_is_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("x");
        std::fs::create_dir_all(&marker).expect("dir");
        // A builtin that blocks: sh keeps its argv and forks nothing (a
        // forked child carries sh's argv until it execs, and would be
        // found too).
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "read x"])
            .arg(marker.join("qmp.sock"))
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        // spawn() may return before the child's exec has set its argv.
        let mut found = Vec::new();
        for _ in 0..500 {
            found = super::processes_naming(&marker);
            if !found.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(
            found,
            [i32::try_from(child.id()).expect("pid")],
            "sleep names the dir"
        );
        assert!(super::processes_naming(&dir.path().join("y")).is_empty());
    }
}
