//! CreateSandbox from the factory: a warm VM (booted ahead, agent
//! answering, see [`crate::factory`]) becomes the new sandbox's. Its
//! priority goes back to normal, it joins the pod's cgroup, grows to the
//! pod's size, gets the pod's NICs by hot-plug and the pod's network and
//! files from its agent. If any step fails, the warm VM is thrown away and
//! the sandbox boots its own, as without a pool.
//!
//! Also the runtime's end of the factory ([`RuntimeWarmer`]): booting a
//! warm VM, throwing one away.

use std::{
    sync::{Arc, Weak},
    time::Duration,
};

use async_trait::async_trait;
use hypervisor::{Hypervisor, MachineType, VmSize};

use crate::{
    factory::{VmOrigin, WarmVm, Warmer},
    network::{NetInterface, SandboxFiles, SandboxNetwork, WARM_NIC_MAC},
    sandbox::{Runtime, RuntimeInner},
    store::SandboxRecord,
    Error, Result,
};

impl Runtime {
    /// Makes a warm VM the sandbox's, if the factory has one and the
    /// sandbox can have one. `None`: the caller boots one.
    pub(crate) async fn claim_warm(
        &self,
        record: &mut SandboxRecord,
        network: &SandboxNetwork,
        files: &SandboxFiles,
        cgroup_parent: Option<&std::path::Path>,
    ) -> Option<Arc<dyn Hypervisor>> {
        let want = VmSize {
            vcpus: record.vcpus,
            memory_mib: record.memory_mib,
        };
        if let Err(why) = self.warm_vm_fits(want, network) {
            if self.inner.factory.status().target > 0 {
                tracing::info!(sandbox = %record.id, "booting a VM: {why}");
            }
            return None;
        }
        let warm = match self.inner.factory.take() {
            Some(warm) => warm,
            // No warm clone ready: a clone made now is still far quicker
            // than a boot, if a template is saved (else the sandbox boots
            // rather than wait for one).
            None if self.inner.config.factory.template => {
                if !self.template_ready() {
                    tracing::info!(sandbox = %record.id, "booting a VM: no VM template is saved yet");
                    self.save_template_soon();
                    return None;
                }
                let vm_id = crate::factory::pool::new_id(crate::factory::pool::ID_PREFIX);
                match self.warm_vm(&vm_id, 0).await {
                    Ok(vm) => WarmVm { id: vm_id, vm },
                    Err(err) => {
                        tracing::warn!(sandbox = %record.id, "cloning the VM template failed, booting a VM instead: {}", err.chain());
                        return None;
                    }
                }
            }
            None => return None,
        };
        let id = record.id.clone();
        match self
            .claim(record, &warm, want, network, files, cgroup_parent)
            .await
        {
            Ok(()) => {
                tracing::info!(sandbox = %id, vm = %warm.id, "sandbox has a warm VM");
                Some(warm.vm)
            }
            Err(err) => {
                tracing::warn!(sandbox = %id, vm = %warm.id, "claiming a warm VM failed, booting one instead: {}", err.chain());
                if let Some(cg) = record.cgroup.take() {
                    crate::cgroup::remove(&cg);
                }
                self.forget_agent(&id);
                self.discard_vm(&warm.id, Some(warm.vm.as_ref())).await;
                record.vm = None;
                record.origin = VmOrigin::Boot;
                record.floor = None;
                record.vcpus = want.vcpus;
                record.memory_mib = want.memory_mib;
                None
            }
        }
    }

    /// Why a warm VM (the default size, no NICs) cannot become a sandbox
    /// of `want` with `network`, if it cannot.
    fn warm_vm_fits(
        &self,
        want: VmSize,
        network: &SandboxNetwork,
    ) -> std::result::Result<(), String> {
        let hv = &self.inner.config.hypervisor;
        if want.vcpus < hv.default_vcpus || want.memory_mib < hv.default_memory_mib {
            return Err(format!(
                "the sandbox asks for less than the warm VMs' {} vCPUs and {} MiB",
                hv.default_vcpus, hv.default_memory_mib
            ));
        }
        let grows = want.vcpus > hv.default_vcpus || want.memory_mib > hv.default_memory_mib;
        if grows && !hv.resource_hotplug {
            return Err("a warm VM cannot grow (hypervisor.resource_hotplug is off)".into());
        }
        // (The first interface with a place takes a warm VM's own NIC.)
        let own = self.has_warm_nics() && adoptable(network).is_some();
        let nics = u32::try_from(network.interfaces.len())
            .unwrap_or(u32::MAX)
            .saturating_sub(u32::from(own));
        if nics > 0 && (hv.machine != MachineType::Q35 || nics > hv.hotplug_slots) {
            return Err(format!(
                "{nics} NICs do not fit the hot-plug slots of a warm VM ({} on q35)",
                hv.hotplug_slots
            ));
        }
        Ok(())
    }

    async fn claim(
        &self,
        record: &mut SandboxRecord,
        warm: &WarmVm,
        want: VmSize,
        network: &SandboxNetwork,
        files: &SandboxFiles,
        cgroup_parent: Option<&std::path::Path>,
    ) -> Result<()> {
        let id = record.id.clone();
        let vm = warm.vm.as_ref();
        let mut steps = crate::steps::Steps::start();
        record.origin = if self.inner.config.factory.template {
            VmOrigin::Template
        } else {
            VmOrigin::Pool
        };
        record.vm = Some(vm.state());
        // From here on a crash leaves a record that names the VM: recovery
        // tears it down (its run dir with it).
        self.inner.store.save(record)?;
        hypervisor::process::set_nice(&vm.pids(), 0);
        self.adopt_agent(&warm.id, &id);
        self.fail_point("create_sandbox.claimed")?;
        if let Some(parent) = cgroup_parent {
            record.cgroup = Some(crate::cgroup::place(
                &id,
                parent,
                self.inner.config.cgroup_root,
                &vm.pids(),
            )?);
        }
        steps.mark("placed");
        // The warm VM's own NIC takes the first interface's place; the
        // guest then only gives it the pod's MAC and addresses.
        let mut network = network.clone();
        let first = adoptable(&network);
        let adopted = match (
            self.inner.warm_nics.get(),
            first.and_then(|i| network.interfaces.get_mut(i)),
        ) {
            (Some(nics), Some(first)) => {
                let place = first.place.clone().unwrap_or_default();
                let (n, vm_id, p) = (nics.clone(), warm.id.clone(), place.clone());
                tokio::task::spawn_blocking(move || n.adopt(&vm_id, &p))
                    .await
                    .unwrap_or_else(|e| Err(format!("adopt task: {e}")))
                    .map_err(|detail| Error::WarmNic {
                        id: id.clone(),
                        detail,
                    })?;
                first.current_mac = Some(WARM_NIC_MAC.into());
                first.tap = None;
                Some((nics.clone(), place))
            }
            _ => None,
        };
        let joined = self
            .join_network(record, warm, want, &network, files, &mut steps)
            .await;
        if let (Err(_), Some((nics, place))) = (&joined, adopted) {
            let vm_id = warm.id.clone();
            let restored = tokio::task::spawn_blocking(move || nics.restore(&vm_id, &place))
                .await
                .unwrap_or_else(|e| Err(format!("restore task: {e}")));
            if let Err(detail) = restored {
                tracing::warn!(sandbox = %id, vm = %warm.id, "giving the pod its own tap back: {detail}");
            }
        }
        joined?;
        tracing::info!(sandbox = %id, ?steps, "warm VM claimed (ms since the claim began)");
        Ok(())
    }

    /// The rest of a claim: the pod's other NICs, its size, the guest's
    /// network and files.
    async fn join_network(
        &self,
        record: &mut SandboxRecord,
        warm: &WarmVm,
        want: VmSize,
        network: &SandboxNetwork,
        files: &SandboxFiles,
        steps: &mut crate::steps::Steps,
    ) -> Result<()> {
        let id = record.id.clone();
        let vm = warm.vm.as_ref();
        self.fail_point("create_sandbox.nic_adopted")?;
        // NICs first: the guest finds a hot-plugged NIC only after its PCIe
        // hot-plug settles (~0.3 s under TCG), which the resize overlaps.
        for hw in network.interfaces.iter().filter_map(NetInterface::vm_nic) {
            vm.add_nic(&hw).await.map_err(|source| Error::Hypervisor {
                id: id.clone(),
                source,
            })?;
        }
        record.vm = Some(vm.state());
        self.inner.store.save(record)?;
        steps.mark("nics");
        let have = vm.state().size();
        if want != have {
            if let Some(now) = self.resize_vm(&id, vm, want).await? {
                record.vcpus = now.vcpus;
                record.memory_mib = now.memory_mib;
                record.vm = Some(vm.state());
                if now.vcpus > have.vcpus {
                    self.online(&id, vm, now).await?;
                }
            }
            record.floor = Some(want);
        }
        record.vm = Some(vm.state());
        self.inner.store.save(record)?;
        steps.mark("resized");
        let agent = self.agent(&id, vm).await?;
        crate::sandbox_create::configure_guest(&id, agent.as_ref(), network, files).await?;
        steps.mark("configured");
        self.fail_point("create_sandbox.guest_ready")
    }

    pub(crate) fn has_warm_nics(&self) -> bool {
        self.inner.warm_nics.get().is_some()
    }

    /// The NIC warm VM `vm_id` boots with (none without
    /// [`Runtime::set_warm_nics`]): a held tap, the warm MAC.
    pub(crate) async fn warm_nics_for(&self, vm_id: &str) -> Result<Vec<hypervisor::Nic>> {
        let Some(nics) = self.inner.warm_nics.get().cloned() else {
            return Ok(Vec::new());
        };
        let id = vm_id.to_string();
        let tap = tokio::task::spawn_blocking(move || nics.hold(&id))
            .await
            .unwrap_or_else(|e| Err(format!("hold task: {e}")))
            .map_err(|detail| Error::WarmNic {
                id: vm_id.into(),
                detail,
            })?;
        Ok(vec![hypervisor::Nic {
            tap: Arc::new(tap),
            mac: crate::network::WARM_NIC_MAC.into(),
            mtu: 0,
        }])
    }

    /// Brings a warm VM's NIC up (named eth0, no address), so that a claim
    /// only gives it the pod's MAC and addresses.
    pub(crate) async fn warm_nic_up(
        &self,
        vm_id: &str,
        agent: &dyn crate::AgentClient,
    ) -> Result<()> {
        if !self.has_warm_nics() {
            return Ok(());
        }
        let nic = NetInterface {
            name: "eth0".into(),
            mac: crate::network::WARM_NIC_MAC.into(),
            ..Default::default()
        };
        agent
            .update_interface(&nic)
            .await
            .map(drop)
            .map_err(|e| Error::Agent {
                id: vm_id.into(),
                call: "UpdateInterface",
                detail: e.detail,
            })
    }

    /// The agent connection a warm VM booted with, kept for the sandbox
    /// that claimed it.
    fn adopt_agent(&self, vm_id: &str, sandbox_id: &str) {
        let mut agents = self.inner.agents.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = agents.remove(vm_id) {
            agents.insert(sandbox_id.to_string(), client);
        }
        drop(agents);
        self.inner
            .dialing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(vm_id);
    }

    /// Boots a warm VM (or, with templates, clones one): the default
    /// size, its own NIC if warm NICs are on, at `nice` from the start,
    /// until its guest has settled (a clone: until it is personalized).
    /// On error nothing of it is left.
    async fn warm_vm(&self, vm_id: &str, nice: i32) -> Result<Arc<dyn Hypervisor>> {
        let config = &self.inner.config;
        let size = VmSize {
            vcpus: config.hypervisor.default_vcpus,
            memory_mib: config.hypervisor.default_memory_mib,
        };
        let template = if config.factory.template {
            Some(self.template().await?)
        } else {
            None
        };
        let role = template.as_ref().map(|t| t.role());
        let nics = self.warm_nics_for(vm_id).await?;
        let vm = match self.spawn_vm(vm_id, size, nics, role, nice).await {
            Ok(vm) => vm,
            Err(err) => {
                self.discard_vm(vm_id, None).await;
                if let Some(template) = &template {
                    // A template that cannot be loaded is made anew.
                    self.forget_template(&template.id).await;
                }
                return Err(err);
            }
        };
        let timeout = Duration::from_millis(config.factory.boot_timeout_ms);
        let started = std::time::Instant::now();
        let ready = match &template {
            Some(template) => {
                self.personalize_clone(vm_id, vm.as_ref(), template, timeout)
                    .await
            }
            // (A clone's NIC is up already: its template's was.) A boot
            // joins the pool once settled, so that its claim and first
            // container do not wait for its start-up work (~1.5 s of
            // modules and the shared filesystem's mount under TCG).
            None => match self.wait_for_agent(vm_id, vm.as_ref(), timeout).await {
                Ok(agent) => match self.warm_nic_up(vm_id, agent.as_ref()).await {
                    Ok(()) => {
                        Self::wait_settled(vm_id, vm.as_ref(), agent.as_ref(), started + timeout)
                            .await
                    }
                    Err(err) => Err(err),
                },
                Err(err) => Err(err),
            },
        };
        if let Err(err) = ready {
            self.discard_vm(vm_id, Some(vm.as_ref())).await;
            return Err(err);
        }
        Ok(vm)
    }

    /// Throws away a VM that is no sandbox's (a warm VM): stops it, kills
    /// whatever names its run dir, removes the run dir.
    pub(crate) async fn discard_vm(&self, vm_id: &str, vm: Option<&dyn Hypervisor>) {
        if let Some(vm) = vm {
            if let Err(err) = vm.stop(Duration::from_millis(500)).await {
                tracing::warn!(vm = %vm_id, "stopping a warm VM: {err}");
            }
        }
        self.forget_agent(vm_id);
        let run_dir = self.run_dir(vm_id);
        crate::recover::kill_processes_naming(vm_id, &run_dir);
        if let Err(err) = crate::mounts::remove_tree(&run_dir) {
            tracing::warn!(vm = %vm_id, "removing a warm VM's run dir: {}", err.chain());
        }
    }

    /// Starts the factory (a no-op without a pool). Call once the runtime
    /// has recovered its sandboxes (recovery discards warm VMs a previous
    /// owner left).
    pub fn start_factory(&self) -> Result<()> {
        // A template a previous owner saved is not trusted (nor needed).
        self.remove_saved_templates();
        if self.inner.config.factory.template && self.inner.config.factory.pool == 0 {
            // No pool to fill: this runtime keeps a template saved itself,
            // from now on, so that sandboxes are cloned rather than booted.
            self.inner
                .keeps_template
                .store(true, std::sync::atomic::Ordering::Relaxed);
            self.save_template_soon();
        }
        self.inner
            .factory
            .start(Arc::new(RuntimeWarmer(Arc::downgrade(&self.inner))));
        Ok(())
    }

    /// Stops the factory and throws its warm VMs (and template) away
    /// (sandboxes' VMs keep running).
    pub async fn stop_factory(&self) {
        self.inner.factory.shutdown().await;
        self.drop_templates().await;
    }

    pub fn factory_status(&self) -> crate::factory::FactoryStatus {
        self.inner.factory.status()
    }
}

/// The interface a warm VM's own NIC takes, if any: the first whose tap
/// has a place (a netns and veth) it can be put in instead.
fn adoptable(network: &SandboxNetwork) -> Option<usize> {
    network.interfaces.iter().position(|i| i.place.is_some())
}

/// The runtime as the factory's [`Warmer`]; holds it weakly, so a pool
/// does not keep a dropped runtime alive.
pub(crate) struct RuntimeWarmer(Weak<RuntimeInner>);

impl RuntimeWarmer {
    fn runtime(&self) -> Option<Runtime> {
        self.0.upgrade().map(|inner| Runtime { inner })
    }
}

#[async_trait]
impl Warmer for RuntimeWarmer {
    async fn warm(&self, id: &str) -> Result<Arc<dyn Hypervisor>> {
        match self.runtime() {
            Some(rt) => {
                let nice = rt.inner.config.factory.refill_nice;
                rt.warm_vm(id, nice).await
            }
            None => Err(Error::Config {
                path: "[factory]".into(),
                detail: "the runtime is gone".into(),
            }),
        }
    }

    async fn discard(&self, id: &str, vm: Option<&dyn Hypervisor>) {
        if let Some(rt) = self.runtime() {
            rt.discard_vm(id, vm).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use hypervisor::fake::Op;

    use crate::{
        factory::VmOrigin,
        fake::{FakeDialer, FakeVms},
        network::{NetInterface, SandboxNetwork, TapFd, TapPlace},
        Runtime, RuntimeConfig, SandboxConfig,
    };

    struct Harness {
        rt: Runtime,
        vms: Arc<FakeVms>,
        dir: tempfile::TempDir,
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            crate::fake::detach_mounts_under(self.dir.path());
        }
    }

    async fn pooled(pool: u32) -> Harness {
        pooled_with(pool, None).await
    }

    async fn pooled_with(pool: u32, nics: Option<Arc<crate::fake::FakeWarmNics>>) -> Harness {
        let h = started(pool, nics, Arc::new(FakeDialer::new(true)));
        h.until_ready(pool).await;
        h
    }

    /// A runtime with its factory started (not waited for) on `dialer`.
    fn started(
        pool: u32,
        nics: Option<Arc<crate::fake::FakeWarmNics>>,
        dialer: Arc<FakeDialer>,
    ) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = RuntimeConfig {
            state_dir: dir.path().join("state"),
            run_dir: dir.path().join("run"),
            ..RuntimeConfig::default()
        };
        config.agent.dial_timeout_ms = 200;
        config.factory.pool = pool;
        let vms = Arc::new(FakeVms::default());
        let rt = Runtime::with_parts(config, vms.clone(), dialer).expect("runtime");
        if let Some(nics) = nics {
            rt.set_warm_nics(nics);
        }
        rt.start_factory().expect("factory");
        Harness { rt, vms, dir }
    }

    impl Harness {
        async fn until_ready(&self, n: u32) {
            for _ in 0..1000 {
                if self.rt.factory_status().ready == n {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            panic!(
                "the pool never had {n} warm VMs: {:?}",
                self.rt.factory_status()
            );
        }

        /// The fake VM `id` was stopped.
        fn assert_stopped(&self, id: &str) {
            let vm = self.vms.get(id).unwrap_or_else(|| panic!("no VM {id}"));
            assert!(vm.calls().contains(&Op::Stop), "VM {id} was not stopped");
        }

        fn pool_dirs(&self) -> Vec<String> {
            let mut dirs: Vec<String> = std::fs::read_dir(self.dir.path().join("run"))
                .expect("run dir")
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("pool-"))
                .collect();
            dirs.sort();
            dirs
        }
    }

    fn pod(id: &str, vcpus: u32, memory_mib: u32) -> SandboxConfig {
        SandboxConfig {
            id: id.into(),
            vcpus: Some(vcpus),
            memory_mib: Some(memory_mib),
            network: SandboxNetwork {
                interfaces: vec![NetInterface {
                    name: "eth0".into(),
                    mac: "0a:58:0a:58:00:05".into(),
                    mtu: 1500,
                    ips: vec!["10.88.0.5/16".into()],
                    tap: Some(TapFd(Arc::new(
                        std::fs::File::open("/dev/null").expect("open").into(),
                    ))),
                    place: Some(TapPlace {
                        netns: "/run/netns/p".into(),
                        veth: "eth0".into(),
                    }),
                    current_mac: None,
                }],
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_sandbox_claims_a_warm_vm_grows_it_and_gets_its_nic_by_hotplug() {
        let h = pooled(1).await;
        let warm = h.pool_dirs();
        assert_eq!(warm.len(), 1);
        let s =
            h.rt.create_sandbox(pod("p1", 2, 1024))
                .await
                .expect("create");
        assert_eq!(s.origin, VmOrigin::Pool);
        assert_eq!(
            (s.vcpus, s.memory_mib),
            (2, 1024),
            "grown to the pod's size"
        );
        let vm = h.vms.get(&warm[0]).expect("the warm VM");
        let calls = vm.calls();
        assert_eq!(
            calls.iter().filter(|c| **c == Op::Boot).count(),
            1,
            "{calls:?}"
        );
        assert!(
            calls.contains(&Op::Resize) && calls.contains(&Op::AddNic),
            "{calls:?}"
        );
        assert!(h.vms.get("p1").is_none(), "no VM booted for the pod");
        assert!(
            !h.dir.path().join("run/p1").exists(),
            "the VM keeps its run dir"
        );
        // The pool refills; the claimed VM's dir is the pod's now.
        h.until_ready(1).await;
        assert_eq!(h.pool_dirs().len(), 2);

        // Resizes keep to the pod's size, not the warm VM's boot size.
        let record = h.rt.inner.store.load("p1").expect("record");
        assert_eq!(
            record.floor,
            Some(hypervisor::VmSize {
                vcpus: 2,
                memory_mib: 1024
            })
        );
        h.rt.stop_sandbox("p1").await.expect("stop");
        h.rt.delete_sandbox("p1").await.expect("delete");
        assert!(
            !h.dir.path().join("run").join(&warm[0]).exists(),
            "deleting the pod removes the run dir its VM booted in"
        );
        h.rt.stop_factory().await;
        assert!(h.pool_dirs().is_empty(), "{:?}", h.pool_dirs());
    }

    #[tokio::test]
    async fn a_booted_warm_vm_joins_the_pool_only_once_its_guest_has_settled() {
        let dialer = Arc::new(FakeDialer::new(true));
        dialer.settle_after(3);
        let h = started(1, None, dialer.clone());
        let rt = &h.rt;
        let details = || {
            dialer
                .calls()
                .iter()
                .filter(|c| **c == "guest_details")
                .count()
        };
        let mut ready_after = None;
        for _ in 0..400 {
            if rt.factory_status().ready == 1 {
                ready_after = Some(details());
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // Three "not settled" answers, then the one that let it in.
        assert_eq!(ready_after, Some(4), "{:?}", rt.factory_status());
        rt.stop_factory().await;
    }

    #[tokio::test]
    async fn a_warm_vm_that_dies_before_it_settles_never_joins_the_pool() {
        let dialer = Arc::new(FakeDialer::new(true));
        dialer.settle_after(usize::MAX);
        let h = started(1, None, dialer.clone());
        let (rt, vms) = (&h.rt, &h.vms);
        let mut error = None;
        for _ in 0..400 {
            // Once it is asked whether it settled (its agent answered).
            if dialer.calls().contains(&"guest_details") {
                for (id, vm) in vms.all() {
                    if id.starts_with("pool-") {
                        vm.crash("killed while settling");
                    }
                }
            }
            let status = rt.factory_status();
            assert_eq!(status.ready, 0, "{status:?}");
            if let Some(e) = status
                .last_error
                .filter(|e| e.contains("killed while settling"))
            {
                error = Some(e);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(error.is_some(), "{:?}", rt.factory_status());
        rt.stop_factory().await;
    }

    #[tokio::test]
    async fn a_warm_vm_boots_with_a_nic_of_its_own_which_the_pod_adopts() {
        let nics = Arc::new(crate::fake::FakeWarmNics::default());
        let h = pooled_with(1, Some(nics.clone())).await;
        let warm = h.pool_dirs();
        assert_eq!(h.vms.boot_macs(&warm[0]), [crate::WARM_NIC_MAC]);
        let s =
            h.rt.create_sandbox(pod("p1", 1, 256))
                .await
                .expect("create");
        assert_eq!(s.origin, VmOrigin::Pool);
        let calls = nics.calls();
        assert!(
            calls.contains(&format!("hold {}", warm[0]))
                && calls.contains(&format!("adopt {} eth0", warm[0])),
            "{calls:?}"
        );
        let ops = h.vms.get(&warm[0]).expect("the warm VM").calls();
        assert!(!ops.contains(&Op::AddNic), "no hot-plug: {ops:?}");
        // A pod with two interfaces: the second is hot-plugged.
        h.until_ready(1).await;
        let mut two = pod("p2", 1, 256);
        let mut second = two.network.interfaces[0].clone();
        second.name = "net1".into();
        second.mac = "0a:58:0a:58:00:06".into();
        two.network.interfaces.push(second);
        let warm2 = h
            .pool_dirs()
            .into_iter()
            .find(|d| *d != warm[0])
            .expect("refilled");
        let s = h.rt.create_sandbox(two).await.expect("create");
        assert_eq!(s.origin, VmOrigin::Pool);
        let ops = h.vms.get(&warm2).expect("the second warm VM").calls();
        assert_eq!(
            ops.iter().filter(|o| **o == Op::AddNic).count(),
            1,
            "{ops:?}"
        );
        h.rt.stop_factory().await;
    }

    #[tokio::test]
    async fn a_claim_that_fails_after_adopting_gives_the_pod_its_own_tap_back() {
        let nics = Arc::new(crate::fake::FakeWarmNics::default());
        let h = pooled_with(1, Some(nics.clone())).await;
        let warm = h.pool_dirs();
        h.rt.fail_points().error_at("create_sandbox.nic_adopted");
        let s =
            h.rt.create_sandbox(pod("p1", 1, 256))
                .await
                .expect("create");
        h.rt.fail_points().disarm();
        assert_eq!(s.origin, VmOrigin::Boot);
        let calls = nics.calls();
        assert!(
            calls.contains(&format!("restore {} eth0", warm[0])),
            "{calls:?}"
        );
        assert!(h.vms.get("p1").is_some(), "booted for the pod");
        assert!(
            h.vms
                .boot_macs("p1")
                .contains(&"0a:58:0a:58:00:05".to_string()),
            "with the pod's own tap"
        );

        // Adoption itself failing: nothing to restore, the pod boots.
        nics.fail_adopt
            .store(true, std::sync::atomic::Ordering::Relaxed);
        h.until_ready(1).await;
        let s =
            h.rt.create_sandbox(pod("p2", 1, 256))
                .await
                .expect("create");
        assert_eq!(s.origin, VmOrigin::Boot);
        h.rt.stop_factory().await;
    }

    #[tokio::test]
    async fn a_failed_claim_throws_the_warm_vm_away_and_boots_cold() {
        let h = pooled(1).await;
        let warm = h.pool_dirs();
        h.rt.fail_points().error_at("create_sandbox.claimed");
        let s =
            h.rt.create_sandbox(pod("p1", 1, 256))
                .await
                .expect("create");
        h.rt.fail_points().disarm();
        assert_eq!(s.origin, VmOrigin::Boot);
        assert!(h.vms.get("p1").is_some(), "booted for the pod");
        h.assert_stopped(&warm[0]);
        assert!(!h.dir.path().join("run").join(&warm[0]).exists());
        assert!(h.dir.path().join("run/p1").is_dir());
        h.rt.stop_factory().await;
    }

    #[tokio::test]
    async fn a_route_the_guest_refuses_fails_the_claim_and_the_cold_boot_and_leaves_nothing() {
        // Routes, neighbours and sysctls are asked at once: one failing
        // while the others are in flight fails the whole configuration.
        let dialer = Arc::new(FakeDialer::new(true));
        let h = started(1, None, dialer.clone());
        h.until_ready(1).await;
        let warm = h.pool_dirs();
        dialer.fail_call("update_routes");
        let mut config = pod("p1", 1, 256);
        config.network.routes = vec![crate::network::NetRoute {
            gateway: "10.88.0.1".into(),
            device: "eth0".into(),
            ..Default::default()
        }];
        config.network.neighbors = vec![crate::network::NetNeighbor {
            ip: "10.88.0.9".into(),
            mac: "0a:58:0a:58:00:09".into(),
            device: "eth0".into(),
        }];
        let err = h.rt.create_sandbox(config).await.expect_err("routes fail");
        assert!(
            matches!(
                err,
                crate::Error::Agent {
                    call: "UpdateRoutes",
                    ..
                }
            ),
            "{err:?}"
        );
        let calls = dialer.calls();
        assert_eq!(
            calls.iter().filter(|c| **c == "update_routes").count(),
            2,
            "the claim, then the cold boot: {calls:?}"
        );
        h.assert_stopped(&warm[0]);
        h.assert_stopped("p1");
        assert!(!h.dir.path().join("run").join(&warm[0]).exists());
        assert!(!h.dir.path().join("run/p1").exists());
        h.rt.stop_factory().await;
    }

    #[tokio::test]
    async fn an_empty_pool_or_a_small_pod_boots_cold() {
        let h = pooled(1).await;
        let first =
            h.rt.create_sandbox(pod("p1", 1, 256))
                .await
                .expect("create");
        assert_eq!(first.origin, VmOrigin::Pool);
        // Taken, and (if the refill has not finished) empty: cold.
        let second =
            h.rt.create_sandbox(pod("p2", 1, 256))
                .await
                .expect("create");
        let small =
            h.rt.create_sandbox(pod("p3", 1, 128))
                .await
                .expect("create");
        assert_eq!(small.origin, VmOrigin::Boot, "smaller than a warm VM");
        // A pod's own boot runs at nice 0; the pool's boots start at
        // refill_nice (19), before QEMU makes its threads.
        assert_eq!(h.vms.config("p3").map(|c| c.nice), Some(0));
        let warm: Vec<i32> = h
            .vms
            .all()
            .iter()
            .filter(|(id, _)| id.starts_with("pool-"))
            .filter_map(|(id, _)| h.vms.config(id).map(|c| c.nice))
            .collect();
        assert!(
            !warm.is_empty() && warm.iter().all(|n| *n == 19),
            "{warm:?}"
        );
        if second.origin == VmOrigin::Boot {
            assert!(h.vms.get("p2").is_some());
        }
        h.rt.stop_factory().await;
    }

    #[tokio::test]
    async fn recovery_discards_unclaimed_warm_vms_and_keeps_claimed_ones() {
        let h = pooled(2).await;
        h.rt.create_sandbox(pod("p1", 1, 256))
            .await
            .expect("create");
        h.until_ready(2).await;
        let before = h.pool_dirs();
        assert_eq!(before.len(), 3);
        // A new owner of the state dir (vcrid restarted): the pool's
        // VMs were the old owner's.
        let rt = Runtime::with_parts(
            h.rt.config().clone(),
            h.vms.clone(),
            Arc::new(FakeDialer::new(true)),
        )
        .expect("runtime");
        let got = rt.recover().await.expect("recover");
        assert_eq!(got.running, ["p1"]);
        let claimed = rt.status_sandbox("p1").await.expect("status");
        assert_eq!(claimed.origin, VmOrigin::Pool);
        assert_eq!(h.pool_dirs().len(), 1, "only the claimed VM's dir is left");
        rt.stop_sandbox("p1").await.expect("stop");
        rt.delete_sandbox("p1").await.expect("delete");
        assert!(h.pool_dirs().is_empty());
        h.rt.stop_factory().await;
    }

    #[test]
    fn a_pool_needs_q35() {
        let err =
            RuntimeConfig::parse("[factory]\npool = 1\n[hypervisor]\nmachine = \"microvm\"\n")
                .expect_err("microvm");
        assert!(err.contains("factory.pool") && err.contains("q35"), "{err}");
        let err = RuntimeConfig::parse("[factory]\nrefill_nice = 40\n").expect_err("nice");
        assert!(err.contains("factory.refill_nice"), "{err}");
        let ok = RuntimeConfig::parse("[factory]\npool = 2\n").expect("q35 is the default");
        assert_eq!(ok.factory.pool, 2);
    }

    #[test]
    fn a_template_needs_devices_qemu_saves_and_q35() {
        let saved = "[hypervisor]\nvsock = \"serial\"\nshared_fs = \"virtio-9p\"\n";
        for (config, names) in [
            (
                "[hypervisor]\nshared_fs = \"virtio-9p\"\n",
                "hypervisor.vsock",
            ),
            ("[hypervisor]\nvsock = \"serial\"\n", "hypervisor.shared_fs"),
            (
                "[hypervisor]\nvsock = \"serial\"\nshared_fs = \"none\"\nmachine = \"microvm\"\n",
                "q35",
            ),
        ] {
            let err = RuntimeConfig::parse(&format!("[factory]\ntemplate = true\n{config}"))
                .expect_err(config);
            assert!(
                err.contains("factory.template") && err.contains(names),
                "{err}"
            );
        }
        // Without a pool each sandbox is cloned when it is created.
        let ok = RuntimeConfig::parse(&format!("[factory]\ntemplate = true\n{saved}"))
            .expect("serial + 9p");
        assert!(ok.factory.template && ok.factory.pool == 0);
    }
}
