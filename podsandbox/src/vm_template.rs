//! VM templates (`[factory] template = true`): one VM of the default size
//! boots until its agent answers and is saved — its device state to a
//! small file, its RAM already a file of its own — and every warm VM then
//! starts as a clone of it instead of booting: QEMU maps the RAM file
//! private (copy-on-write) and loads the device state, and the guest runs on
//! from where the template stopped, in a fraction of a second. The clones
//! share every page none of them writes (kernel, initramfs, agent).
//!
//! A clone is its template until it is told otherwise: the same RNG state,
//! clock, machine-id and agent secret. Before it joins the pool its agent is
//! dialed with the template's secret and personalized (host entropy and a
//! forced CRNG reseed, the host's clock, a new machine-id, the clone's own
//! secret), so no two clones share a boot_id, a key or a secret; its MAC
//! and addresses are the pod's, given at claim as for any warm VM.
//!
//! Only VMs whose every device QEMU saves can be templates: the agent over
//! virtio-serial, files over 9p or none; `FactoryConfig::check` says so by
//! name. The template VM boots with `vc.template`, so its agent leaves the
//! 9p export unmounted (QEMU refuses to save a VM with it mounted) until a
//! clone is personalized, and it is saved only once the agent reports its
//! start-up work settled (modules, the modules disk, the pod namespaces):
//! no clone does that work again.
//! The saved files live in `<run_dir>/_templates/<id>/` (`_` is no sandbox
//! ID's first character): `memory`, `state`, and last `template.json` (the
//! template's agent secret, size, and the fingerprint of what its state
//! loads into: the hypervisor config and the QEMU binary, kernel, initramfs
//! and modules image it was made from). A template is whole once its
//! manifest is there. A runtime reuses a whole template whose fingerprint
//! matches its own (`virtc`, one process per call, saves one with
//! `virtc factory init` and clones it on every `sandbox create`); any other
//! is removed. vcrid removes them at start and at shutdown — without
//! killing anything: a clone keeps its mapping of a removed memory file.

use std::{
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use hypervisor::{Hypervisor, TemplateRole, VmSize};
use serde::{Deserialize, Serialize};

use crate::{sandbox::Runtime, Error, Result};

/// What a template VM's ID (and its run dir) starts with.
pub const ID_PREFIX: &str = "template-";

/// Where saved templates live, under the run dir.
const TEMPLATES_DIR: &str = "_templates";
/// The file that makes a saved template whole: written last.
const MANIFEST: &str = "template.json";
const MANIFEST_VERSION: u32 = 1;

/// `template.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    version: u32,
    id: String,
    /// The agent secret of the template, and of each clone until it is
    /// personalized (64 hex digits).
    secret: String,
    vcpus: u32,
    memory_mib: u32,
    /// Seconds since the Unix epoch.
    saved_at: u64,
    /// What the device state loads into (see [`fingerprint`]).
    fingerprint: serde_json::Value,
}

/// A saved template, as `virtc factory status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TemplateInfo {
    pub id: String,
    pub dir: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Seconds since the Unix epoch.
    pub saved_at: u64,
    /// What the memory file takes on the host's disk or tmpfs (its
    /// allocated blocks: RAM the template's guest never touched is a hole).
    pub memory_allocated_bytes: u64,
    /// The device state's size.
    pub state_bytes: u64,
}

/// A saved template.
#[derive(Debug)]
pub(crate) struct Template {
    pub(crate) id: String,
    pub(crate) memory: PathBuf,
    pub(crate) state: PathBuf,
    /// The secret the template's agent (and every clone's, until it is
    /// personalized) requires.
    pub(crate) secret: agent::AgentSecret,
}

impl Template {
    pub(crate) fn role(&self) -> TemplateRole {
        TemplateRole::Clone {
            memory: self.memory.clone(),
            state: self.state.clone(),
        }
    }
}

impl Runtime {
    fn templates_dir(&self) -> PathBuf {
        self.inner.config.run_dir.join(TEMPLATES_DIR)
    }

    /// Removes every saved template (clones running from one keep their
    /// mapping of its memory).
    pub(crate) async fn drop_templates(&self) {
        self.inner.template.lock().await.take();
        self.remove_saved_templates();
    }

    /// Removes the saved templates' files.
    pub(crate) fn remove_saved_templates(&self) {
        let dir = self.templates_dir();
        if dir.exists() {
            if let Err(err) = crate::mounts::remove_tree(&dir) {
                tracing::warn!(dir = %dir.display(), "removing saved templates: {}", err.chain());
            }
        }
    }

    /// The template clones start from: the one saved, else a new one
    /// (one boot, at the pool's priority).
    pub(crate) async fn template(&self) -> Result<Arc<Template>> {
        let mut slot = self.inner.template.lock().await;
        if let Some(template) = slot.as_ref() {
            if template.memory.is_file() && template.state.is_file() {
                return Ok(template.clone());
            }
        }
        let template = match self.saved_template() {
            Some(saved) => saved,
            None => self.save_template().await?,
        };
        let template = Arc::new(template);
        *slot = Some(template.clone());
        Ok(template)
    }

    /// A whole saved template this runtime can clone, if there is one;
    /// every other whole one (made for another config or binary) is
    /// removed. One without its manifest is left alone: another process
    /// (`virtc factory init`) may be saving it.
    fn saved_template(&self) -> Option<Template> {
        let entries = std::fs::read_dir(self.templates_dir()).ok()?;
        let want = fingerprint(&self.inner.config.hypervisor, self.has_warm_nics());
        let mut found = None;
        for entry in entries.flatten() {
            let dir = entry.path();
            let Some(m) = read_manifest(&dir) else {
                continue;
            };
            if found.is_none() && m.fingerprint == want {
                let secret = agent::AgentSecret::from_hex(&m.secret);
                let (memory, state) = (dir.join("memory"), dir.join("state"));
                if let (Some(secret), true, true) = (secret, memory.is_file(), state.is_file()) {
                    found = Some(Template {
                        id: m.id,
                        memory,
                        state,
                        secret,
                    });
                    continue;
                }
            }
            tracing::info!(dir = %dir.display(), "removing a saved template this runtime cannot use");
            if let Err(err) = crate::mounts::remove_tree(&dir) {
                tracing::warn!(dir = %dir.display(), "removing a saved template: {}", err.chain());
            }
        }
        found
    }

    /// Saves a new template (after removing any saved one), as
    /// `virtc factory init` does: clones made from now on start from it.
    pub async fn save_vm_template(&self) -> Result<TemplateInfo> {
        let mut slot = self.inner.template.lock().await;
        slot.take();
        self.remove_saved_templates();
        let template = self.save_template().await?;
        let dir = self.templates_dir().join(&template.id);
        *slot = Some(Arc::new(template));
        template_info(&dir).ok_or_else(|| Error::Io {
            action: "read the saved template in",
            path: dir,
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })
    }

    /// The saved templates' summaries (`virtc factory status`).
    pub fn vm_templates(&self) -> Vec<TemplateInfo> {
        let mut all: Vec<TemplateInfo> = std::fs::read_dir(self.templates_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| template_info(&e.path()))
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// Removes every saved template (`virtc factory destroy`): sandboxes
    /// cloned from one keep running, and later ones boot or save anew.
    pub async fn destroy_vm_templates(&self) {
        self.drop_templates().await;
    }

    /// A saved template that failed a clone is not used again (and a new
    /// one is saved, if this runtime keeps one).
    pub(crate) async fn forget_template(&self, id: &str) {
        {
            let mut slot = self.inner.template.lock().await;
            if slot.as_ref().is_some_and(|t| t.id == id) {
                slot.take();
                let dir = self.templates_dir().join(id);
                if let Err(err) = crate::mounts::remove_tree(&dir) {
                    tracing::warn!(template = %id, "removing a template: {}", err.chain());
                }
            }
        }
        self.save_template_soon();
    }

    /// Whether a template can be cloned now, without waiting: one is in
    /// memory or saved on disk (not being saved at this moment).
    pub(crate) fn template_ready(&self) -> bool {
        let Ok(mut slot) = self.inner.template.try_lock() else {
            return false;
        };
        if let Some(t) = slot.as_ref() {
            if t.memory.is_file() && t.state.is_file() {
                return true;
            }
        }
        match self.saved_template() {
            Some(saved) => {
                *slot = Some(Arc::new(saved));
                true
            }
            None => false,
        }
    }

    /// Saves a template in the background, if this runtime keeps one
    /// (see `start_factory`) and no save is under way.
    pub(crate) fn save_template_soon(&self) {
        let keeps = self
            .inner
            .keeps_template
            .load(std::sync::atomic::Ordering::Relaxed);
        if !keeps || self.inner.template.try_lock().is_err() {
            return;
        }
        let rt = self.clone();
        tokio::spawn(async move {
            if let Err(err) = rt.template().await {
                tracing::warn!("saving a VM template: {}", err.chain());
            }
        });
    }

    async fn save_template(&self) -> Result<Template> {
        let id = crate::factory::pool::new_id(ID_PREFIX);
        let dir = self.templates_dir().join(&id);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| Error::Io {
                action: "create the template dir",
                path: dir.clone(),
                source,
            })?;
        let memory = dir.join("memory");
        let state = dir.join("state");
        let started = std::time::Instant::now();
        let saved = match self.boot_and_save(&id, memory.clone(), &state).await {
            Ok(secret) => self.write_manifest(&dir, &id, &secret).map(|()| secret),
            Err(err) => Err(err),
        };
        match saved {
            Ok(secret) => {
                tracing::info!(template = %id, ms = started.elapsed().as_millis(), "VM template saved");
                Ok(Template {
                    id,
                    memory,
                    state,
                    secret,
                })
            }
            Err(err) => {
                if let Err(cleanup) = crate::mounts::remove_tree(&dir) {
                    tracing::warn!(template = %id, "removing a failed template: {}", cleanup.chain());
                }
                Err(err)
            }
        }
    }

    /// The manifest that makes the template in `dir` whole.
    fn write_manifest(&self, dir: &Path, id: &str, secret: &agent::AgentSecret) -> Result<()> {
        let hv = &self.inner.config.hypervisor;
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            id: id.into(),
            secret: secret.to_hex(),
            vcpus: hv.default_vcpus,
            memory_mib: hv.default_memory_mib,
            saved_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            fingerprint: fingerprint(hv, self.has_warm_nics()),
        };
        crate::store::write_json(&dir.join(MANIFEST), &manifest)
    }

    /// Boots the template VM `id` until its agent answers, saves it, and
    /// throws the VM away. Returns its agent's secret.
    async fn boot_and_save(
        &self,
        id: &str,
        memory: PathBuf,
        state: &std::path::Path,
    ) -> Result<agent::AgentSecret> {
        let config = &self.inner.config;
        let size = VmSize {
            vcpus: config.hypervisor.default_vcpus,
            memory_mib: config.hypervisor.default_memory_mib,
        };
        let role = TemplateRole::Source { memory };
        let nics = self.warm_nics_for(id).await?;
        let nice = config.factory.refill_nice;
        let vm = match self.spawn_vm(id, size, nics, Some(role), nice).await {
            Ok(vm) => vm,
            Err(err) => {
                self.discard_vm(id, None).await;
                return Err(err);
            }
        };
        let result = self.ready_then_save(id, vm.as_ref(), state).await;
        self.discard_vm(id, Some(vm.as_ref())).await;
        result
    }

    async fn ready_then_save(
        &self,
        id: &str,
        vm: &dyn Hypervisor,
        state: &std::path::Path,
    ) -> Result<agent::AgentSecret> {
        let config = &self.inner.config;
        let timeout = Duration::from_millis(config.factory.boot_timeout_ms);
        let started = std::time::Instant::now();
        let agent = self.wait_for_agent(id, vm, timeout).await?;
        // Its clones' NIC is up from the start.
        self.warm_nic_up(id, agent.as_ref()).await?;
        // Saved once settled: what the guest still does after it began
        // serving (modules, namespaces) is then done once, not per clone.
        Self::wait_settled(id, vm, agent.as_ref(), started + timeout).await?;
        tracing::debug!(vm = %id, ms = started.elapsed().as_millis() as u64, "template VM ready to save");
        drop(agent);
        // The port is free again when the clone's host dials it.
        self.forget_agent(id);
        let secret = crate::agent::agent_secret(vm).ok_or_else(|| Error::Agent {
            id: id.into(),
            call: "dial",
            detail: "the template VM has no agent secret".into(),
        })?;
        vm.save_template(state)
            .await
            .map_err(|source| Error::Hypervisor {
                id: id.into(),
                source,
            })?;
        Ok(secret)
    }

    /// Makes the clone `vm_id` of `template` its own: dials its agent with
    /// the template's secret until it answers (or `timeout`), personalizes
    /// it with the clone's own secret, and keeps that connection.
    pub(crate) async fn personalize_clone(
        &self,
        vm_id: &str,
        vm: &dyn Hypervisor,
        template: &Template,
        timeout: Duration,
    ) -> Result<()> {
        let agent_error = |call: &'static str, detail: String| Error::Agent {
            id: vm_id.into(),
            call,
            detail,
        };
        let channel = vm
            .vsock()
            .ok_or_else(|| agent_error("dial", "the clone has no agent channel".into()))?;
        let own = crate::agent::agent_secret(vm)
            .ok_or_else(|| agent_error("dial", "the clone has no agent secret".into()))?;
        let deadline = std::time::Instant::now() + timeout;
        let client = loop {
            let tried = match self
                .inner
                .dialer
                .dial(&channel, Some(&template.secret))
                .await
            {
                Ok(client) => match client.check(Duration::from_secs(2)).await {
                    Ok(()) => Ok(client),
                    Err(e) => Err(format!("health check: {e}")),
                },
                Err(e) => Err(e.to_string()),
            };
            match tried {
                Ok(client) => break client,
                Err(detail) if std::time::Instant::now() >= deadline => {
                    return Err(agent_error("dial", detail))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let personal =
            crate::agent::Personalization::generate(own).map_err(|source| Error::Io {
                action: "read randomness for a clone from",
                path: "/dev/urandom".into(),
                source,
            })?;
        client
            .personalize(&personal)
            .await
            .map_err(|e| agent_error("personalize", e.detail))?;
        self.keep_agent(vm_id, vm, client);
        Ok(())
    }
}

/// What a template's device state loads into: the hypervisor config (the
/// devices of the command line) and the identity (size, mtime) of the
/// QEMU binary, kernel, initramfs (whose agent the template runs) and
/// modules image. A template made with other ones is not used.
fn fingerprint(hv: &hypervisor::HypervisorConfig, warm_nic: bool) -> serde_json::Value {
    let file = |path: &Path| match std::fs::metadata(path) {
        Ok(m) => serde_json::json!({
            "path": path,
            "len": m.len(),
            "mtime": [m.mtime(), m.mtime_nsec()],
        }),
        Err(_) => serde_json::json!({ "path": path }),
    };
    serde_json::json!({
        "hypervisor": hv,
        // A template with a NIC loads only into a clone with one.
        "warm_nic": warm_nic,
        "files": [file(&hv.qemu_path), file(&hv.kernel), file(&hv.initrd), file(&hv.modules)],
    })
}

/// The manifest of the template in `dir`, if it is whole and of this
/// version.
fn read_manifest(dir: &Path) -> Option<Manifest> {
    let text = std::fs::read(dir.join(MANIFEST)).ok()?;
    let manifest: Manifest = serde_json::from_slice(&text).ok()?;
    (manifest.version == MANIFEST_VERSION
        && dir.file_name().and_then(|n| n.to_str()) == Some(manifest.id.as_str()))
    .then_some(manifest)
}

fn template_info(dir: &Path) -> Option<TemplateInfo> {
    let m = read_manifest(dir)?;
    let memory = std::fs::metadata(dir.join("memory")).ok()?;
    let state = std::fs::metadata(dir.join("state")).ok()?;
    Some(TemplateInfo {
        id: m.id,
        dir: dir.to_path_buf(),
        vcpus: m.vcpus,
        memory_mib: m.memory_mib,
        saved_at: m.saved_at,
        memory_allocated_bytes: memory.blocks() * 512,
        state_bytes: state.len(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use hypervisor::{fake::Op, SharedFs, TemplateRole, VsockBackend};

    use crate::{
        factory::VmOrigin,
        fake::{FakeDialer, FakeVms},
        Runtime, RuntimeConfig, SandboxConfig,
    };

    #[tokio::test]
    async fn warm_vms_are_personalized_clones_of_one_saved_template() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = RuntimeConfig {
            state_dir: dir.path().join("state"),
            run_dir: dir.path().join("run"),
            ..RuntimeConfig::default()
        };
        config.agent.dial_timeout_ms = 200;
        config.factory.pool = 2;
        config.factory.template = true;
        config.hypervisor.vsock = VsockBackend::Serial;
        config.hypervisor.shared_fs = SharedFs::Virtio9p;
        let vms = Arc::new(FakeVms::default());
        let dialer = Arc::new(FakeDialer::new(true));
        let rt = Runtime::with_parts(config, vms.clone(), dialer.clone()).expect("runtime");
        // A template a crashed owner left is removed at start.
        let stale = dir.path().join("run/_templates/template-old");
        std::fs::create_dir_all(&stale).expect("stale");
        rt.start_factory().expect("factory");
        assert!(!stale.exists());
        for _ in 0..1000 {
            if rt.factory_status().ready == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let status = rt.factory_status();
        assert_eq!((status.kind.as_str(), status.ready), ("template", 2));

        // One template VM, booted, saved and stopped.
        let all = vms.all();
        let templates: Vec<_> = all
            .iter()
            .filter(|(id, _)| id.starts_with(super::ID_PREFIX))
            .collect();
        assert_eq!(templates.len(), 1, "{all:?}");
        let calls = templates[0].1.calls();
        assert_eq!(
            calls
                .iter()
                .filter(|c| matches!(c, Op::SaveTemplate | Op::Stop))
                .collect::<Vec<_>>(),
            [&Op::SaveTemplate, &Op::Stop],
            "{calls:?}"
        );
        let saved = dir.path().join("run/_templates").join(&templates[0].0);
        // Two clones of it, each personalized before it was ready.
        let clones: Vec<_> = all
            .iter()
            .filter(|(id, _)| id.starts_with("pool-"))
            .collect();
        assert_eq!(clones.len(), 2);
        for (id, _) in &clones {
            assert_eq!(
                vms.template_role(id),
                Some(TemplateRole::Clone {
                    memory: saved.join("memory"),
                    state: saved.join("state"),
                })
            );
        }
        let personalized = dialer
            .calls()
            .iter()
            .filter(|c| **c == "personalize")
            .count();
        assert_eq!(personalized, 2, "{:?}", dialer.calls());

        let s = rt
            .create_sandbox(SandboxConfig {
                id: "p1".into(),
                ..Default::default()
            })
            .await
            .expect("create");
        assert_eq!(s.origin, VmOrigin::Template);
        rt.stop_factory().await;
        assert!(!dir.path().join("run/_templates").exists());
        crate::fake::detach_mounts_under(dir.path());
    }

    /// How many template VMs `vms` has booted.
    fn template_boots(vms: &FakeVms) -> usize {
        vms.all()
            .iter()
            .filter(|(id, _)| id.starts_with(super::ID_PREFIX))
            .count()
    }

    #[tokio::test]
    async fn without_a_pool_sandboxes_are_cloned_from_a_saved_template_that_outlives_its_runtime() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = RuntimeConfig {
            state_dir: dir.path().join("state"),
            run_dir: dir.path().join("run"),
            ..RuntimeConfig::default()
        };
        config.agent.dial_timeout_ms = 200;
        config.factory.template = true;
        config.hypervisor.vsock = VsockBackend::Serial;
        config.hypervisor.shared_fs = SharedFs::Virtio9p;
        let vms = Arc::new(FakeVms::default());
        let dialer = Arc::new(FakeDialer::new(true));
        let runtime = |config: &RuntimeConfig| {
            Runtime::with_parts(config.clone(), vms.clone(), dialer.clone()).expect("runtime")
        };
        // `virtc factory init`, then `status`.
        let first = runtime(&config);
        assert!(first.vm_templates().is_empty());
        let info = first.save_vm_template().await.expect("init");
        assert_eq!((info.vcpus, info.memory_mib), (1, 256));
        assert!(info.state_bytes > 0);
        assert_eq!(first.vm_templates(), std::slice::from_ref(&info));
        drop(first);

        // The next process clones it for its sandbox: no second template.
        let second = runtime(&config);
        let s = second
            .create_sandbox(SandboxConfig {
                id: "p1".into(),
                ..Default::default()
            })
            .await
            .expect("create");
        assert_eq!(s.origin, VmOrigin::Template);
        assert_eq!(template_boots(&vms), 1);
        let clones: Vec<_> = vms
            .all()
            .into_iter()
            .filter(|(id, _)| {
                vms.template_role(id)
                    .is_some_and(|r| matches!(r, TemplateRole::Clone { .. }))
            })
            .collect();
        assert_eq!(clones.len(), 1, "{clones:?}");
        assert_eq!(
            vms.template_role(&clones[0].0),
            Some(TemplateRole::Clone {
                memory: info.dir.join("memory"),
                state: info.dir.join("state"),
            })
        );
        assert!(dialer.calls().contains(&"personalize"));

        // A template made for another configuration is not used: it is
        // removed, and with none saved the sandbox boots.
        let mut bigger = config.clone();
        bigger.hypervisor.default_memory_mib = 512;
        let third = runtime(&bigger);
        let s = third
            .create_sandbox(SandboxConfig {
                id: "p2".into(),
                ..Default::default()
            })
            .await
            .expect("create");
        assert_eq!(s.origin, VmOrigin::Boot);
        assert!(third.vm_templates().is_empty());
        let info = third.save_vm_template().await.expect("init");
        assert_eq!(info.memory_mib, 512);
        assert_eq!(template_boots(&vms), 2);
        // A template cut short (no manifest) is no template.
        std::fs::create_dir_all(dir.path().join("run/_templates/template-cut")).expect("mkdir");
        assert_eq!(third.vm_templates(), [info]);

        // `virtc factory destroy`: the sandboxes run on.
        third.destroy_vm_templates().await;
        assert!(third.vm_templates().is_empty());
        assert!(!dir.path().join("run/_templates").exists());
        for (rt, id) in [(&second, "p1"), (&third, "p2")] {
            rt.stop_sandbox(id).await.expect("stop");
            rt.delete_sandbox(id).await.expect("delete");
        }
        crate::fake::detach_mounts_under(dir.path());
    }
}
