//! Fakes of the two seams, for unit tests of the sandbox logic: a VM factory
//! handing out [`FakeHypervisor`]s and an agent that answers (or never does).
//! They record what they are asked and fail on demand; end-to-end tests use
//! the real QEMU and agent instead.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use hypervisor::{
    fake::{FakeHypervisor, Op},
    Hypervisor, HypervisorConfig, VmConfig, VmState, VsockChannel,
};

use crate::{
    agent::{AgentClient, AgentDialer, AgentError, GuestDetails, Personalization},
    network::{NetInterface, NetNeighbor, NetRoute, SandboxFiles},
    VmFactory,
};

/// Hands out fake VMs and keeps them by sandbox ID, so that `restore`
/// (another "process") sees the same VM.
#[derive(Debug, Default)]
pub struct FakeVms {
    vms: Mutex<HashMap<String, FakeHypervisor>>,
    fail_at: Mutex<Option<Op>>,
    /// What each VM was created as, by ID.
    configs: Mutex<HashMap<String, VmConfig>>,
}

impl FakeVms {
    /// New VMs fail at `op`.
    pub fn failing_at(self, op: Op) -> Self {
        *self.fail_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(op);
        self
    }

    /// Every VM handed out, by sandbox ID.
    pub fn all(&self) -> Vec<(String, FakeHypervisor)> {
        let vms = self.vms.lock().unwrap_or_else(|e| e.into_inner());
        vms.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// What VM `id` was created as.
    pub fn config(&self, id: &str) -> Option<VmConfig> {
        self.configs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// The template role VM `id` was created with (`None`: it booted).
    pub fn template_role(&self, id: &str) -> Option<hypervisor::TemplateRole> {
        self.config(id).and_then(|c| c.template)
    }

    /// The MACs of the NICs VM `id` booted with.
    pub fn boot_macs(&self, id: &str) -> Vec<String> {
        self.config(id)
            .map(|c| c.nics.iter().map(|n| n.mac.clone()).collect())
            .unwrap_or_default()
    }

    pub fn get(&self, id: &str) -> Option<FakeHypervisor> {
        self.vms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }
}

impl VmFactory for FakeVms {
    fn create(
        &self,
        _config: &HypervisorConfig,
        vm: VmConfig,
    ) -> hypervisor::Result<Arc<dyn Hypervisor>> {
        // As QEMU: a template's source makes its memory file, a clone
        // needs the saved files.
        match &vm.template {
            Some(hypervisor::TemplateRole::Source { memory }) => {
                std::fs::write(memory, b"fake memory").map_err(|source| {
                    hypervisor::HypervisorError::Io {
                        action: "write",
                        path: memory.clone(),
                        source,
                    }
                })?;
            }
            Some(hypervisor::TemplateRole::Clone { memory, state }) => {
                for path in [memory, state] {
                    if !path.is_file() {
                        return Err(hypervisor::HypervisorError::MissingFile {
                            what: "template file",
                            path: path.clone(),
                        });
                    }
                }
            }
            None => {}
        }
        self.configs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(vm.id.clone(), vm.clone());
        let state = VmState {
            hypervisor: "fake".into(),
            id: vm.id.clone(),
            run_dir: vm.run_dir,
            accel: "none".into(),
            machine: "fake".into(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            boot_vcpus: vm.vcpus,
            boot_memory_mib: vm.memory_mib,
            hotplug_memory_mib: 0,
            vmm: None,
            helpers: Vec::new(),
            vsock: Some(VsockChannel::Hybrid {
                uds: "/nonexistent".into(),
            }),
            hotplugged_nics: Vec::new(),
            hotplugged_disks: Vec::new(),
            agent_secret: vm.agent_secret,
        };
        let mut fake = FakeHypervisor::new(state);
        if let Some(op) = *self.fail_at.lock().unwrap_or_else(|e| e.into_inner()) {
            fake = fake.failing_at(op);
        }
        self.vms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(vm.id, fake.clone());
        Ok(Arc::new(fake))
    }

    fn restore(
        &self,
        _config: &HypervisorConfig,
        state: VmState,
    ) -> hypervisor::Result<Arc<dyn Hypervisor>> {
        let fake = self
            .get(&state.id)
            .unwrap_or_else(|| FakeHypervisor::new(state));
        Ok(Arc::new(fake))
    }
}

/// An agent that answers every call, or none. A container's init process
/// runs until it is signalled (as a real one would: a container never ends
/// on its own under a test's feet); an exec'd process ends at once with 0.
#[derive(Debug, Clone)]
pub struct FakeDialer {
    pub answers: bool,
    calls: Arc<Mutex<Vec<&'static str>>>,
    dials: Arc<std::sync::atomic::AtomicUsize>,
    /// How many more GuestDetails answers say the guest is not settled.
    unsettled: Arc<std::sync::atomic::AtomicUsize>,
    /// The signal that ended each container, once one did.
    signalled: Arc<tokio::sync::watch::Sender<HashMap<String, u32>>>,
    /// A network call (by its recorded name) that fails from now on.
    failing: Arc<Mutex<Option<&'static str>>>,
}

impl FakeDialer {
    pub fn new(answers: bool) -> Self {
        Self {
            answers,
            calls: Arc::default(),
            dials: Arc::default(),
            unsettled: Arc::default(),
            signalled: Arc::new(tokio::sync::watch::channel(HashMap::new()).0),
            failing: Arc::default(),
        }
    }

    /// From now on the network call recorded as `call` (`update_routes`,
    /// `add_neighbors`, `set_sysctls`) fails.
    pub fn fail_call(&self, call: &'static str) {
        *self.failing.lock().unwrap_or_else(|e| e.into_inner()) = Some(call);
    }

    /// Records `call`; an error if it is the one set to fail.
    fn answer(&self, call: &'static str) -> Result<(), AgentError> {
        self.record(call);
        if *self.failing.lock().unwrap_or_else(|e| e.into_inner()) == Some(call) {
            return Err(AgentError::new(format!("{call} failed (fake)")));
        }
        Ok(())
    }

    /// The next `answers` GuestDetails say the guest's start-up work is
    /// not done (`settled: false`).
    pub fn settle_after(&self, answers: usize) {
        self.unsettled
            .store(answers, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many connections were dialed.
    pub fn dials(&self) -> usize {
        self.dials.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Agent calls made through this dialer, in order.
    pub fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn record(&self, call: &'static str) {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(call);
    }
}

#[async_trait]
impl AgentDialer for FakeDialer {
    async fn dial(
        &self,
        _channel: &VsockChannel,
        _secret: Option<&agent::AgentSecret>,
    ) -> Result<Arc<dyn AgentClient>, AgentError> {
        self.dials
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A dial takes a while: concurrent callers overlap.
        tokio::task::yield_now().await;
        if !self.answers {
            return Err(AgentError::new("connection refused (fake)"));
        }
        Ok(Arc::new(self.clone()))
    }

    async fn wait_ready(
        &self,
        _channel: &VsockChannel,
        timeout: Duration,
    ) -> Result<(), AgentError> {
        if !self.answers {
            tokio::time::sleep(timeout).await;
            return Err(AgentError::new("no readiness notice (fake)"));
        }
        Ok(())
    }

    /// An echo of what is written, as if the pod's port echoed.
    async fn dial_port_forward(
        &self,
        _channel: &VsockChannel,
        _secret: Option<&agent::AgentSecret>,
        _port: u16,
    ) -> Result<crate::agent::ForwardedStream, AgentError> {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push("dial_port_forward");
        if !self.answers {
            return Err(AgentError::new("connection refused (fake)"));
        }
        let (ours, theirs) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(theirs);
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        Ok(Box::new(ours))
    }
}

#[async_trait]
impl AgentClient for FakeDialer {
    async fn check(&self, _timeout: Duration) -> Result<(), AgentError> {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push("check");
        Ok(())
    }
    async fn guest_details(&self, _timeout: Duration) -> Result<GuestDetails, AgentError> {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push("guest_details");
        let unsettled = self
            .unsettled
            .fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |n| n.checked_sub(1),
            )
            .is_ok();
        Ok(GuestDetails {
            kernel_release: "6.1.0-fake".into(),
            mem_total_kib: 1,
            mem_available_kib: 1,
            online_cpus: 1,
            agent_version: "fake".into(),
            uptime_ms: 1,
            agent_ready_ms: 1,
            machine_id: String::new(),
            settled: !unsettled,
        })
    }
    async fn online_resources(
        &self,
        cpus: u32,
        _wait: Duration,
    ) -> Result<GuestDetails, AgentError> {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push("online_resources");
        Ok(GuestDetails {
            kernel_release: "6.1.0-fake".into(),
            mem_total_kib: 1,
            mem_available_kib: 1,
            online_cpus: cpus,
            agent_version: "fake".into(),
            uptime_ms: 1,
            agent_ready_ms: 1,
            machine_id: String::new(),
            settled: true,
        })
    }
    async fn shutdown(&self, _timeout: Duration) -> Result<(), AgentError> {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push("shutdown");
        Ok(())
    }

    async fn create_container(
        &self,
        _id: &str,
        _spec: &crate::oci::Spec,
        _rootfs: &crate::agent::GuestRootfs,
        _options: &crate::agent::CreateOptions,
    ) -> Result<(), AgentError> {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push("create_container");
        Ok(())
    }
    async fn start_container(&self, _id: &str) -> Result<(), AgentError> {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push("start_container");
        Ok(())
    }
    async fn signal_container(
        &self,
        id: &str,
        exec: &str,
        signal: u32,
        _all: bool,
    ) -> Result<(), AgentError> {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push("signal_container");
        if exec.is_empty() && signal != 0 {
            self.signalled.send_modify(|ended| {
                ended.entry(id.to_string()).or_insert(signal);
            });
        }
        Ok(())
    }
    async fn exec_process(
        &self,
        _id: &str,
        _exec: &str,
        _process: &crate::container_exec::ExecConfig,
    ) -> Result<(), AgentError> {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push("exec_process");
        Ok(())
    }
    async fn wait_container(
        &self,
        id: &str,
        exec: &str,
    ) -> Result<(i32, Option<String>), AgentError> {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push("wait_container");
        if !exec.is_empty() {
            return Ok((0, None));
        }
        let mut ended = self.signalled.subscribe();
        let signal = ended
            .wait_for(|ended| ended.contains_key(id))
            .await
            .map_err(|_| AgentError::new("the fake agent went away"))?
            .get(id)
            .copied()
            .unwrap_or(0);
        Ok((128 + i32::try_from(signal).unwrap_or(0), None))
    }
    async fn stats_container(
        &self,
        _id: &str,
    ) -> Result<crate::container::ContainerStats, AgentError> {
        Ok(crate::container::ContainerStats::default())
    }
    async fn freeze_container(&self, _id: &str, _pause: bool) -> Result<(), AgentError> {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push("freeze_container");
        Ok(())
    }
    async fn remove_container(&self, _id: &str, _force: bool) -> Result<(), AgentError> {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push("remove_container");
        Ok(())
    }
    async fn read_output(
        &self,
        _id: &str,
        _exec: &str,
        _stream: crate::container_log::Stream,
    ) -> Result<Option<Vec<u8>>, AgentError> {
        Ok(None)
    }
    async fn write_stdin(&self, _id: &str, _exec: &str, _data: &[u8]) -> Result<(), AgentError> {
        self.record("write_stdin");
        Ok(())
    }
    async fn close_stdin(&self, _id: &str, _exec: &str) -> Result<(), AgentError> {
        self.record("close_stdin");
        Ok(())
    }
    async fn resize_terminal(
        &self,
        _id: &str,
        _exec: &str,
        _rows: u16,
        _cols: u16,
    ) -> Result<(), AgentError> {
        self.record("resize_terminal");
        Ok(())
    }
    async fn list_processes(
        &self,
        _id: &str,
    ) -> Result<Vec<crate::container::ProcessInfo>, AgentError> {
        Ok(Vec::new())
    }
    async fn update_container(&self, _id: &str, _resources: Vec<u8>) -> Result<(), AgentError> {
        self.record("update_container");
        Ok(())
    }
    async fn update_interface(&self, nic: &NetInterface) -> Result<NetInterface, AgentError> {
        self.record("update_interface");
        Ok(NetInterface {
            tap: None,
            ..nic.clone()
        })
    }
    async fn update_routes(&self, routes: &[NetRoute]) -> Result<Vec<NetRoute>, AgentError> {
        self.answer("update_routes")?;
        Ok(routes.to_vec())
    }
    async fn list_interfaces(&self) -> Result<Vec<NetInterface>, AgentError> {
        self.record("list_interfaces");
        Ok(Vec::new())
    }
    async fn list_routes(&self) -> Result<Vec<NetRoute>, AgentError> {
        self.record("list_routes");
        Ok(Vec::new())
    }
    async fn add_neighbors(&self, _neighbors: &[NetNeighbor]) -> Result<(), AgentError> {
        self.answer("add_neighbors")?;
        Ok(())
    }
    async fn set_sandbox_files(&self, _files: &SandboxFiles) -> Result<(), AgentError> {
        self.record("set_sandbox_files");
        Ok(())
    }
    async fn set_sysctls(
        &self,
        _sysctls: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), AgentError> {
        self.answer("set_sysctls")?;
        Ok(())
    }
    async fn personalize(&self, _p: &Personalization) -> Result<(), AgentError> {
        self.record("personalize");
        Ok(())
    }
}

/// Detaches every mount under `dir`, for the guard of a test's temporary
/// directory: a sandbox a test does not delete keeps its shares mounted
/// (see [`crate::mounts`]), and a temp dir's removal does not unmount.
pub fn detach_mounts_under(dir: &std::path::Path) {
    if let Err(err) = crate::mounts::unmount_under(dir) {
        tracing::warn!(dir = %dir.display(), "test clean-up: {err}");
    }
}

/// Calls [`detach_mounts_under`] on its directory when dropped (declare it
/// after the temp dir, so it goes first).
#[derive(Debug)]
pub struct MountGuard(pub std::path::PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        detach_mounts_under(&self.0);
    }
}

/// Warm NICs that record what was asked of them; `/dev/null` stands in for
/// a tap. `fail_adopt` makes adoption fail.
#[derive(Debug, Default)]
pub struct FakeWarmNics {
    calls: Mutex<Vec<String>>,
    pub fail_adopt: std::sync::atomic::AtomicBool,
}

impl FakeWarmNics {
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn record(&self, call: String) {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(call);
    }
}

impl crate::network::WarmNics for FakeWarmNics {
    fn hold(&self, vm_id: &str) -> Result<std::os::fd::OwnedFd, String> {
        self.record(format!("hold {vm_id}"));
        std::fs::File::open("/dev/null")
            .map(Into::into)
            .map_err(|e| e.to_string())
    }

    fn adopt(&self, vm_id: &str, place: &crate::network::TapPlace) -> Result<(), String> {
        self.record(format!("adopt {vm_id} {}", place.veth));
        if self.fail_adopt.load(std::sync::atomic::Ordering::Relaxed) {
            return Err("adoption failed (fake)".into());
        }
        Ok(())
    }

    fn restore(&self, vm_id: &str, place: &crate::network::TapPlace) -> Result<(), String> {
        self.record(format!("restore {vm_id} {}", place.veth));
        Ok(())
    }
}
