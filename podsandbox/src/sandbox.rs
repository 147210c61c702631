//! The sandbox handle, the runtime that makes them, and what both share.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use hypervisor::{Hypervisor, HypervisorConfig, VmConfig, VmState, VmStatus};
use serde::{Deserialize, Serialize};

use crate::{
    agent::{AgentClient, AgentDialer, GuestDetails},
    config::RuntimeConfig,
    state::{Action, SandboxState},
    store::{SandboxLock, SandboxRecord, Store},
    Error, Result, TtrpcDialer,
};

/// What a caller asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxConfig {
    pub id: String,
    /// vCPUs; the configured default when `None`.
    pub vcpus: Option<u32>,
    /// Memory in MiB; the configured default when `None`.
    pub memory_mib: Option<u32>,
    /// The pod's host name; the sandbox ID (up to 63 characters) when `None`.
    pub hostname: Option<String>,
    /// NICs (taps the caller opened) and routes; none: loopback only.
    pub network: crate::network::SandboxNetwork,
    /// The pod's resolv.conf; `None` keeps each image's own.
    pub dns: Option<crate::network::DnsConfig>,
    /// A host cgroup (kubelet's pod cgroup) for the VM's processes: they go
    /// into `<parent>/vc-<id>` of every hierarchy. `None`: they stay in the
    /// runtime's cgroup.
    pub cgroup_parent: Option<String>,
}

/// What a caller sees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxStatus {
    pub id: String,
    pub state: SandboxState,
    pub hypervisor: String,
    pub accel: String,
    pub machine: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The VMM's process ID while it runs.
    pub pid: Option<i32>,
    /// The VM's helper processes (vsock device, virtiofsd) while it runs:
    /// with `pid`, everything the pod costs the host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub helper_pids: Vec<i32>,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// Why the VM exited when nobody asked it to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The agent's view of the guest, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestDetails>,
    pub hostname: String,
    /// The pod's IPs, IPv4 first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    /// The network the guest was given.
    #[serde(default)]
    pub network: crate::network::SandboxNetwork,
    /// Where the VM came from (booted for the sandbox, or the pool).
    #[serde(default)]
    pub origin: crate::factory::VmOrigin,
}

/// Makes and finds VMs; the seam where tests put a fake hypervisor.
pub trait VmFactory: Send + Sync + std::fmt::Debug {
    fn create(
        &self,
        config: &HypervisorConfig,
        vm: VmConfig,
    ) -> hypervisor::Result<Arc<dyn Hypervisor>>;
    fn restore(
        &self,
        config: &HypervisorConfig,
        state: VmState,
    ) -> hypervisor::Result<Arc<dyn Hypervisor>>;
}

/// The real hypervisors of the `hypervisor` crate.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealVms;

impl VmFactory for RealVms {
    fn create(
        &self,
        config: &HypervisorConfig,
        vm: VmConfig,
    ) -> hypervisor::Result<Arc<dyn Hypervisor>> {
        hypervisor::new_vm(config, vm)
    }
    fn restore(
        &self,
        config: &HypervisorConfig,
        state: VmState,
    ) -> hypervisor::Result<Arc<dyn Hypervisor>> {
        hypervisor::restore_vm(config, state)
    }
}

/// Entry point of the library: one per state dir. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub(crate) inner: Arc<RuntimeInner>,
}

#[derive(Debug)]
pub(crate) struct RuntimeInner {
    pub(crate) config: RuntimeConfig,
    pub(crate) store: Store,
    pub(crate) vms: Arc<dyn VmFactory>,
    /// Warm VMs for new sandboxes (see [`crate::factory`]).
    pub(crate) factory: Arc<dyn crate::factory::Factory>,
    pub(crate) dialer: Arc<dyn AgentDialer>,
    /// In-process container monitors, by "sandbox/container".
    pub(crate) monitors:
        std::sync::Mutex<std::collections::HashMap<String, tokio::task::JoinHandle<()>>>,
    /// Agent connections by sandbox, with the PIDs of the VM they reach.
    #[allow(clippy::type_complexity)]
    pub(crate) agents:
        std::sync::Mutex<std::collections::HashMap<String, (Vec<u32>, Arc<dyn AgentClient>)>>,
    /// One dial at a time per sandbox: callers that find no connection
    /// wait for the one being dialed (a serial channel takes one host
    /// connection at a time; a second dial would wait in QEMU's backlog
    /// until its handshake timed out).
    #[allow(clippy::type_complexity)]
    pub(crate) dialing:
        std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Guest details by sandbox, with the PIDs of the VM that gave them.
    #[allow(clippy::type_complexity)]
    pub(crate) guests:
        std::sync::Mutex<std::collections::HashMap<String, (Vec<u32>, GuestDetails)>>,
    /// Whether monitors run here (else in processes of their own).
    pub(crate) in_process_monitors: std::sync::atomic::AtomicBool,
    /// Log files open in in-process monitors, by "sandbox/container".
    pub(crate) logs:
        std::sync::Mutex<std::collections::HashMap<String, crate::container_log::LogFile>>,
    /// Container exits recorded by in-process monitors.
    pub(crate) exits: tokio::sync::broadcast::Sender<crate::container::ContainerExit>,
    /// The live output of containers whose monitor runs here, for attach.
    pub(crate) outputs: std::sync::Mutex<
        std::collections::HashMap<
            String,
            tokio::sync::broadcast::Sender<crate::container_monitor::OutputChunk>,
        >,
    >,
    /// Where tests make multi-step operations fail (see [`crate::failpoint`]).
    pub(crate) fail_points: crate::failpoint::FailPoints,
    /// NICs for warm VMs, if set (see [`Runtime::set_warm_nics`]).
    pub(crate) warm_nics: std::sync::OnceLock<Arc<dyn crate::network::WarmNics>>,
    /// The saved VM template warm VMs are cloned from (see
    /// [`crate::vm_template`]); made on first need.
    pub(crate) template: tokio::sync::Mutex<Option<Arc<crate::vm_template::Template>>>,
    /// Whether this runtime saves a template in the background when it
    /// has none (a started factory with templates and no pool: vcrid).
    pub(crate) keeps_template: std::sync::atomic::AtomicBool,
}

/// A sandbox found from its persisted state. Each operation takes the
/// sandbox's lock and re-reads the state, so a handle never acts on stale data.
#[derive(Debug, Clone)]
pub struct Sandbox {
    runtime: Runtime,
    id: String,
}

/// Agent calls on a live guest answer in milliseconds; this bounds a wedged one.
pub(crate) const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The exit code of a container whose VM died under it (containerd's code
/// for an exit nobody saw).
pub const VM_EXIT_CODE: i32 = 255;
/// The reason of such an exit.
pub const VM_EXIT_REASON: &str = "VMExited";

/// Ends every container of `record` that has not exited, with `code`,
/// `reason` and `message`; returns the exits to announce.
pub(crate) fn end_containers(
    record: &mut SandboxRecord,
    code: i32,
    reason: Option<&str>,
    message: &str,
) -> Vec<crate::container::ContainerExit> {
    let finished_at_ns = crate::container::now_ns();
    let mut exits = Vec::new();
    for c in &mut record.containers {
        if c.state == crate::container::ContainerState::Stopped {
            continue;
        }
        c.state = crate::container::ContainerState::Stopped;
        c.exit_code = Some(code);
        c.reason = reason.map(str::to_string);
        c.message = Some(message.to_string());
        c.finished_at_ns = Some(finished_at_ns);
        exits.push(crate::container::ContainerExit {
            sandbox_id: record.id.clone(),
            id: c.id.clone(),
            exit_code: code,
            finished_at_ns,
        });
    }
    exits
}

impl Runtime {
    /// A runtime with the real hypervisor and agent transport.
    pub fn new(config: RuntimeConfig) -> Result<Self> {
        Self::with_parts(config, Arc::new(RealVms), Arc::new(TtrpcDialer))
    }

    /// A runtime with the given seams (tests pass fakes here).
    pub fn with_parts(
        config: RuntimeConfig,
        vms: Arc<dyn VmFactory>,
        dialer: Arc<dyn AgentDialer>,
    ) -> Result<Self> {
        config
            .factory
            .check(&config.hypervisor)
            .map_err(|detail| Error::Config {
                path: "[factory]".into(),
                detail,
            })?;
        let store = Store::new(&config.state_dir)?;
        let factory = crate::factory::from_config(&config.factory);
        Ok(Self {
            inner: Arc::new(RuntimeInner {
                config,
                store,
                vms,
                factory,
                dialer,
                monitors: Default::default(),
                agents: Default::default(),
                dialing: Default::default(),
                guests: Default::default(),
                in_process_monitors: std::sync::atomic::AtomicBool::new(true),
                exits: tokio::sync::broadcast::channel(256).0,
                logs: Default::default(),
                outputs: Default::default(),
                fail_points: crate::failpoint::FailPoints::from_env(),
                warm_nics: Default::default(),
                template: Default::default(),
                keeps_template: Default::default(),
            }),
        })
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// Warm VMs boot with a NIC from `nics`, which moves into the pod of
    /// the sandbox that claims one (instead of the pod's NIC being
    /// hot-plugged). Set it before [`start_factory`](Self::start_factory);
    /// once only (a later call is ignored: warm VMs and the template must
    /// agree on their devices).
    pub fn set_warm_nics(&self, nics: Arc<dyn crate::network::WarmNics>) {
        if self.inner.warm_nics.set(nics).is_err() {
            tracing::warn!("warm NICs were set already: kept the first");
        }
    }

    /// The fail points of this runtime's multi-step operations (see
    /// [`crate::failpoint`]).
    pub fn fail_points(&self) -> &crate::failpoint::FailPoints {
        &self.inner.fail_points
    }

    pub(crate) fn fail_point(&self, point: &'static str) -> Result<()> {
        Ok(self.inner.fail_points.hit(point)?)
    }

    /// Finds an existing sandbox (the virtcontainers `fetchSandbox`).
    pub async fn fetch_sandbox(&self, id: &str) -> Result<Sandbox> {
        check_id(id)?;
        self.inner.store.load(id)?;
        Ok(Sandbox {
            runtime: self.clone(),
            id: id.to_string(),
        })
    }

    pub async fn start_sandbox(&self, id: &str) -> Result<SandboxStatus> {
        self.fetch_sandbox(id).await?.start().await
    }

    pub async fn stop_sandbox(&self, id: &str) -> Result<SandboxStatus> {
        self.fetch_sandbox(id).await?.stop().await
    }

    pub async fn pause_sandbox(&self, id: &str) -> Result<SandboxStatus> {
        self.fetch_sandbox(id).await?.pause().await
    }

    pub async fn resume_sandbox(&self, id: &str) -> Result<SandboxStatus> {
        self.fetch_sandbox(id).await?.resume().await
    }

    pub async fn delete_sandbox(&self, id: &str) -> Result<()> {
        self.fetch_sandbox(id).await?.delete().await
    }

    pub async fn status_sandbox(&self, id: &str) -> Result<SandboxStatus> {
        self.fetch_sandbox(id).await?.status().await
    }

    /// The run dir (sockets, logs) a VM booted for sandbox (or pool VM)
    /// `id` gets.
    pub(crate) fn run_dir(&self, id: &str) -> PathBuf {
        self.inner.config.run_dir.join(id)
    }

    /// The run dir of the VM of `record`: its own, or the one its VM booted
    /// in (a pool VM's). Only a dir directly under the configured run dir
    /// is taken from the record.
    pub(crate) fn vm_run_dir(&self, record: &SandboxRecord) -> PathBuf {
        record
            .vm
            .as_ref()
            .map(|vm| vm.run_dir.clone())
            .filter(|dir| dir.parent() == Some(self.inner.config.run_dir.as_path()))
            .unwrap_or_else(|| self.run_dir(&record.id))
    }

    pub(crate) fn restore_vm(&self, record: &SandboxRecord) -> Result<Option<Arc<dyn Hypervisor>>> {
        record
            .vm
            .clone()
            .map(|state| self.inner.vms.restore(&self.inner.config.hypervisor, state))
            .transpose()
            .map_err(|source| Error::Hypervisor {
                id: record.id.clone(),
                source,
            })
    }

    /// Takes the lock, loads the record and reconciles it with the VM.
    pub(crate) async fn locked(&self, id: &str) -> Result<Locked> {
        let lock = self.inner.store.lock(id).await?;
        let mut record = self.inner.store.load(id)?;
        let vm = self.restore_vm(&record)?;
        self.reconcile(&mut record, vm.as_deref()).await?;
        Ok(Locked {
            _lock: lock,
            record,
            vm,
        })
    }

    /// If the record says the VM is up but the VMM is gone, the sandbox is
    /// stopped: see [`Runtime::vm_gone`]. Needs the lock.
    pub(crate) async fn reconcile(
        &self,
        record: &mut SandboxRecord,
        vm: Option<&dyn Hypervisor>,
    ) -> Result<()> {
        let Some(vm) = vm else { return Ok(()) };
        if !record.state.vm_expected() {
            return Ok(());
        }
        let reason = match vm.status().await {
            Ok(VmStatus::Exited { reason }) => reason,
            Ok(_) => return Ok(()),
            Err(err) => {
                tracing::warn!(id = %record.id, "cannot query the VM: {err}");
                return Ok(());
            }
        };
        self.vm_gone(record, vm, reason).await
    }

    /// The VM of `record` died without being asked: what is left of it
    /// (helpers) is stopped, the sandbox becomes `stopped` with the reason,
    /// and every container that had not exited ends with it (exit code 255,
    /// reason `VMExited`, QEMU's last words as the message); the record is
    /// saved, then the exits are announced. Needs the lock.
    pub(crate) async fn vm_gone(
        &self,
        record: &mut SandboxRecord,
        vm: &dyn Hypervisor,
        reason: String,
    ) -> Result<()> {
        tracing::warn!(id = %record.id, "VM exited unexpectedly: {reason}");
        self.forget_agent(&record.id);
        record.state = record
            .state
            .next(Action::VmExited)
            .unwrap_or(SandboxState::Stopped);
        let message = format!("the pod's VM exited: {reason}");
        record.reason = Some(reason);
        let exits = end_containers(record, VM_EXIT_CODE, Some(VM_EXIT_REASON), &message);
        // Recorded and announced first; the helpers' stop may take its grace.
        self.inner.store.save(record)?;
        self.announce(exits);
        if let Err(err) = vm.stop(hypervisor::DEFAULT_STOP_GRACE).await {
            tracing::warn!(id = %record.id, "cleanup after VM exit: {err}");
        }
        record.vm = Some(vm.state());
        self.inner.store.save(record)
    }

    /// Tells the subscribers of [`Runtime::subscribe_exits`].
    pub(crate) fn announce(&self, exits: Vec<crate::container::ContainerExit>) {
        for exit in exits {
            tracing::info!(sandbox = %exit.sandbox_id, container = %exit.id, code = exit.exit_code, "container exited");
            // Nobody listening is fine.
            let _ = self.inner.exits.send(exit);
        }
    }

    /// A connection to a sandbox's agent: the one this runtime already has
    /// to that VM (by its PIDs, so a new boot never gets an old connection),
    /// else a new one. ttrpc multiplexes calls, so one connection serves all.
    pub(crate) async fn agent(
        &self,
        id: &str,
        vm: &dyn Hypervisor,
    ) -> Result<Arc<dyn AgentClient>> {
        if let Some(client) = self.kept_agent(id, vm) {
            return Ok(client);
        }
        let gate = self
            .inner
            .dialing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone();
        let _turn = gate.lock().await;
        // The caller before us may have dialed it.
        if let Some(client) = self.kept_agent(id, vm) {
            return Ok(client);
        }
        let channel = vm.vsock().ok_or_else(|| Error::Agent {
            id: id.into(),
            call: "dial",
            detail: "the VM has no vsock channel".into(),
        })?;
        let client = self
            .inner
            .dialer
            .dial(&channel, crate::agent::agent_secret(vm).as_ref())
            .await
            .map_err(|e| Error::Agent {
                id: id.into(),
                call: "dial",
                detail: e.detail,
            })?;
        self.keep_agent(id, vm, client.clone());
        Ok(client)
    }

    /// The connection this runtime has to `vm`'s agent under `id`, if it
    /// has one to this boot of it.
    fn kept_agent(&self, id: &str, vm: &dyn Hypervisor) -> Option<Arc<dyn AgentClient>> {
        self.inner
            .agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .filter(|(pids, _)| *pids == vm.pids())
            .map(|(_, client)| client.clone())
    }

    /// Keeps `client` as the connection to `vm`'s agent under `id`.
    pub(crate) fn keep_agent(&self, id: &str, vm: &dyn Hypervisor, client: Arc<dyn AgentClient>) {
        self.inner
            .agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), (vm.pids(), client));
    }

    /// Drops the cached agent connection (and guest details) of a sandbox
    /// whose VM is going.
    pub(crate) fn forget_agent(&self, id: &str) {
        self.inner
            .agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        self.inner
            .dialing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        self.inner
            .guests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// The guest's details (kernel, agent version): asked once per boot of
    /// a VM, then answered from memory (they do not change while it runs).
    pub(crate) async fn guest_details(
        &self,
        id: &str,
        vm: &dyn Hypervisor,
    ) -> Result<GuestDetails> {
        let pids = vm.pids();
        if let Some((_, details)) = self
            .inner
            .guests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .filter(|(p, _)| *p == pids)
        {
            return Ok(details.clone());
        }
        let agent = self.agent(id, vm).await?;
        let details = agent
            .guest_details(AGENT_CALL_TIMEOUT)
            .await
            .map_err(|e| Error::Agent {
                id: id.into(),
                call: "GetGuestDetails",
                detail: e.detail,
            })?;
        self.inner
            .guests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), (pids, details.clone()));
        Ok(details)
    }

    /// Under the sandbox's lock: container `id` must be in one of `allowed`
    /// states to `action` it. Returns the lock, the container's index in the
    /// record and a connection to the agent.
    pub(crate) async fn container_agent(
        &self,
        sandbox_id: &str,
        id: &str,
        action: &'static str,
        allowed: &[crate::container::ContainerState],
    ) -> Result<(Locked, usize, Arc<dyn AgentClient>)> {
        let s = self.locked(sandbox_id).await?;
        let idx = s.container_index(id)?;
        let state = s.record.containers[idx].state;
        if !allowed.contains(&state) {
            return Err(Error::ContainerWrongState {
                id: id.into(),
                action,
                state,
                hint: "",
            });
        }
        let vm = s.vm()?.clone();
        let agent = self.agent(sandbox_id, vm.as_ref()).await?;
        Ok((s, idx, agent))
    }

    /// Builds the status of a record (no agent call).
    pub(crate) fn summary(record: &SandboxRecord) -> SandboxStatus {
        Self::summary_checked(record, true)
    }

    /// [`Runtime::summary`]; `check_pids` looks in /proc that the VMM and
    /// helpers still run (a reader that does not watch them), otherwise the
    /// record — kept current by the watchers of this process — is trusted.
    pub(crate) fn summary_checked(record: &SandboxRecord, check_pids: bool) -> SandboxStatus {
        let up = |p: &hypervisor::ProcessRef| {
            record.state.vm_expected() && (!check_pids || p.is_alive())
        };
        let vm = record.vm.as_ref();
        SandboxStatus {
            id: record.id.clone(),
            state: record.state,
            hypervisor: vm.map(|v| v.hypervisor.clone()).unwrap_or_default(),
            accel: vm.map(|v| v.accel.clone()).unwrap_or_default(),
            machine: vm.map(|v| v.machine.clone()).unwrap_or_default(),
            vcpus: record.vcpus,
            memory_mib: record.memory_mib,
            pid: vm.and_then(|v| v.vmm).filter(up).map(|p| p.pid),
            helper_pids: vm
                .map(|v| v.helpers.as_slice())
                .unwrap_or_default()
                .iter()
                .filter(|p| up(p))
                .map(|p| p.pid)
                .collect(),
            created_at: record.created_at,
            reason: record.reason.clone(),
            guest: None,
            hostname: record.hostname.clone(),
            ips: record
                .network
                .pod_ips()
                .iter()
                .map(|ip| ip.to_string())
                .collect(),
            network: record.network.clone(),
            origin: record.origin,
        }
    }
}

/// A sandbox under its lock, with its VM (once booted).
pub(crate) struct Locked {
    _lock: SandboxLock,
    pub(crate) record: SandboxRecord,
    pub(crate) vm: Option<Arc<dyn Hypervisor>>,
}

impl Locked {
    /// Applies `action` to the state or refuses with a message naming both.
    pub(crate) fn transition(&mut self, action: Action) -> Result<SandboxState> {
        let state = self.record.state;
        state.next(action).ok_or_else(|| Error::WrongState {
            id: self.record.id.clone(),
            action: action.verb(),
            state,
            hint: state.hint(action),
        })
    }

    /// Stops the VM, if there is one (idempotent).
    pub(crate) async fn stop_vm(&mut self, grace: Duration) -> Result<()> {
        let Some(vm) = self.vm.clone() else {
            return Ok(());
        };
        vm.stop(grace).await.map_err(|source| Error::Hypervisor {
            id: self.record.id.clone(),
            source,
        })?;
        self.record.vm = Some(vm.state());
        Ok(())
    }

    /// The position of container `id` in the record.
    pub(crate) fn container_index(&self, id: &str) -> Result<usize> {
        self.record
            .containers
            .iter()
            .position(|c| c.id == id)
            .ok_or_else(|| Error::ContainerNotFound {
                sandbox: self.record.id.clone(),
                id: id.into(),
            })
    }

    pub(crate) fn vm(&self) -> Result<&Arc<dyn Hypervisor>> {
        self.vm.as_ref().ok_or_else(|| Error::WrongState {
            id: self.record.id.clone(),
            action: "reach the VM of",
            state: self.record.state,
            hint: " (it has no VM)",
        })
    }
}

impl Sandbox {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn runtime(&self) -> &Runtime {
        &self.runtime
    }
}

/// IDs become directory names: keep them to a safe alphabet.
pub(crate) fn valid_id(id: &str) -> bool {
    agent::valid_id(id)
}

pub(crate) fn check_id(id: &str) -> Result<()> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(Error::InvalidId { id: id.to_string() })
    }
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["s1", "a", "0abc", "pod_1.x-y", &"f".repeat(128)] {
            assert!(valid_id(ok), "{ok}");
        }
        for bad in [
            "",
            "-x",
            ".hidden",
            "..",
            "a/b",
            "a b",
            "é",
            &"f".repeat(129),
            "../etc",
        ] {
            assert!(!valid_id(bad), "{bad}");
        }
    }
}

/// Unit tests of the lifecycle against the fakes.
#[cfg(test)]
mod lifecycle_tests {
    use std::sync::Arc;

    use hypervisor::fake::Op;

    use crate::{
        fake::{FakeDialer, FakeVms},
        Error, ErrorKind, Runtime, RuntimeConfig, SandboxConfig, SandboxState,
    };

    struct Harness {
        rt: Runtime,
        vms: Arc<FakeVms>,
        dialer: FakeDialer,
        dir: tempfile::TempDir,
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            crate::fake::detach_mounts_under(self.dir.path());
        }
    }

    fn harness_with(vms: FakeVms, answers: bool) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = RuntimeConfig {
            state_dir: dir.path().join("state"),
            run_dir: dir.path().join("run"),
            ..RuntimeConfig::default()
        };
        config.agent.dial_timeout_ms = 200;
        let vms = Arc::new(vms);
        let dialer = FakeDialer::new(answers);
        let rt =
            Runtime::with_parts(config, vms.clone(), Arc::new(dialer.clone())).expect("runtime");
        Harness {
            rt,
            vms,
            dialer,
            dir,
        }
    }

    fn harness() -> Harness {
        harness_with(FakeVms::default(), true)
    }

    fn cfg(id: &str) -> SandboxConfig {
        SandboxConfig {
            id: id.into(),
            ..SandboxConfig::default()
        }
    }

    #[tokio::test]
    async fn full_lifecycle() {
        let h = harness();
        let s = h.rt.create_sandbox(cfg("s1")).await.expect("create");
        assert_eq!(s.state, SandboxState::Ready);
        assert_eq!((s.vcpus, s.memory_mib), (1, 256));
        assert!(h.dir.path().join("run/s1").is_dir());
        assert_eq!(
            h.rt.start_sandbox("s1").await.expect("start").state,
            SandboxState::Running
        );
        let status = h.rt.status_sandbox("s1").await.expect("status");
        assert_eq!(
            status.guest.expect("guest details").kernel_release,
            "6.1.0-fake"
        );
        assert_eq!(
            h.rt.pause_sandbox("s1").await.expect("pause").state,
            SandboxState::Paused
        );
        assert_eq!(
            h.rt.resume_sandbox("s1").await.expect("resume").state,
            SandboxState::Running
        );
        assert_eq!(
            h.rt.stop_sandbox("s1").await.expect("stop").state,
            SandboxState::Stopped
        );
        assert_eq!(
            h.rt.stop_sandbox("s1")
                .await
                .expect("stop is idempotent")
                .state,
            SandboxState::Stopped
        );
        h.rt.delete_sandbox("s1").await.expect("delete");
        assert!(h.rt.list_sandboxes().await.expect("list").is_empty());
        assert!(!h.dir.path().join("run/s1").exists());
        let vm = h.vms.get("s1").expect("vm");
        assert_eq!(vm.calls().iter().filter(|op| **op == Op::Boot).count(), 1);
        assert!(vm.calls().contains(&Op::Pause) && vm.calls().contains(&Op::Resume));
        assert!(h.dialer.calls().contains(&"shutdown"));
    }

    /// Callers that find no connection share the one being dialed: a
    /// serial channel takes one host connection at a time.
    #[tokio::test]
    async fn concurrent_callers_share_one_dial() {
        let h = harness();
        h.rt.create_sandbox(cfg("s1")).await.expect("create");
        let vm = h.vms.get("s1").expect("vm");
        h.rt.forget_agent("s1");
        let before = h.dialer.dials();
        let (a, b, c) = tokio::join!(
            h.rt.agent("s1", &vm),
            h.rt.agent("s1", &vm),
            h.rt.agent("s1", &vm)
        );
        for client in [a, b, c] {
            client.expect("a connection");
        }
        assert_eq!(h.dialer.dials() - before, 1, "one dial for three callers");
        h.rt.agent("s1", &vm).await.expect("kept");
        assert_eq!(h.dialer.dials() - before, 1, "the connection is kept");
    }

    #[tokio::test]
    async fn duplicate_and_unknown_ids() {
        let h = harness();
        h.rt.create_sandbox(cfg("s1")).await.expect("create");
        let err = h.rt.create_sandbox(cfg("s1")).await.expect_err("duplicate");
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        assert_eq!(err.to_string(), "sandbox s1 already exists");
        let err = h.rt.start_sandbox("nope").await.expect_err("unknown");
        assert_eq!(err.kind(), ErrorKind::NotFound);
        let err =
            h.rt.create_sandbox(cfg("../etc"))
                .await
                .expect_err("bad id");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        // The failed duplicate did not disturb the original.
        assert_eq!(
            h.rt.status_sandbox("s1").await.expect("status").state,
            SandboxState::Ready
        );
    }

    #[tokio::test]
    async fn delete_is_refused_while_running_and_paused() {
        let h = harness();
        h.rt.create_sandbox(cfg("s1")).await.expect("create");
        h.rt.start_sandbox("s1").await.expect("start");
        let err = h.rt.delete_sandbox("s1").await.expect_err("running");
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert_eq!(
            err.to_string(),
            "cannot delete sandbox s1: it is running (stop it first)"
        );
        h.rt.pause_sandbox("s1").await.expect("pause");
        assert!(matches!(
            h.rt.delete_sandbox("s1").await,
            Err(Error::WrongState { .. })
        ));
        // Stopping a paused VM skips the agent (a frozen guest cannot answer).
        h.rt.stop_sandbox("s1").await.expect("stop");
        assert!(!h.dialer.calls().contains(&"shutdown"));
        h.rt.delete_sandbox("s1").await.expect("delete");
    }

    fn block_container(h: &Harness, id: &str) -> crate::container::ContainerConfig {
        let image = h.dir.path().join(format!("{id}.qcow2"));
        std::fs::write(&image, b"QFI\xfb").expect("image");
        crate::container::ContainerConfig {
            id: id.into(),
            rootfs: crate::container::Rootfs::Block {
                image,
                format: hypervisor::DiskFormat::Qcow2,
                fstype: "ext4".into(),
            },
            args: vec!["/bin/true".into()],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_block_rootfs_is_attached_for_the_container_and_detached_after() {
        let h = harness();
        h.rt.create_sandbox(cfg("s1")).await.expect("create");
        h.rt.create_container("s1", block_container(&h, "c1"))
            .await
            .expect("create container");
        let vm = h.vms.get("s1").expect("vm");
        assert!(vm.calls().contains(&Op::AddDisk));
        assert!(h.dialer.calls().contains(&"create_container"));
        h.rt.delete_container("s1", "c1")
            .await
            .expect("delete container");
        assert!(vm.calls().contains(&Op::RemoveDisk));
        assert!(!h.dir.path().join("run/s1/shared/c1").exists());
    }

    fn limited(
        mut c: crate::container::ContainerConfig,
        millicpus: i64,
        memory_mib: i64,
    ) -> crate::container::ContainerConfig {
        c.resources.cpu_quota = Some(millicpus * 100);
        c.resources.cpu_period = Some(100_000);
        c.resources.memory_limit_bytes = Some(memory_mib << 20);
        c
    }

    #[tokio::test]
    async fn the_vm_grows_with_its_containers_and_shrinks_back() {
        let h = harness();
        h.rt.create_sandbox(cfg("s1")).await.expect("create");
        let c1 = limited(block_container(&h, "c1"), 1500, 1024);
        h.rt.create_container("s1", c1).await.expect("create c1");
        let status = h.rt.status_sandbox("s1").await.expect("status");
        assert_eq!((status.vcpus, status.memory_mib), (2, 1024 + 128));
        assert!(h.dialer.calls().contains(&"online_resources"));
        // Lower limits shrink it (after the guest lowered them).
        h.rt.update_container(
            "s1",
            "c1",
            &crate::container::Resources {
                memory_limit_bytes: Some(512 << 20),
                ..Default::default()
            },
        )
        .await
        .expect("update");
        let status = h.rt.status_sandbox("s1").await.expect("status");
        assert_eq!((status.vcpus, status.memory_mib), (2, 512 + 128));
        // The record keeps the merged limits: the quota is still there.
        let c2 = limited(block_container(&h, "c2"), 500, 0);
        h.rt.create_container("s1", c2).await.expect("create c2");
        assert_eq!(h.rt.status_sandbox("s1").await.expect("status").vcpus, 2);
        h.rt.delete_container("s1", "c1").await.expect("delete c1");
        h.rt.delete_container("s1", "c2").await.expect("delete c2");
        let status = h.rt.status_sandbox("s1").await.expect("status");
        assert_eq!((status.vcpus, status.memory_mib), (1, 256));
        let vm = h.vms.get("s1").expect("vm");
        assert_eq!(vm.calls().iter().filter(|op| **op == Op::Resize).count(), 3);
    }

    #[tokio::test]
    async fn a_vm_that_cannot_grow_refuses_the_container() {
        let h = harness_with(FakeVms::default().failing_at(Op::Resize), true);
        h.rt.create_sandbox(cfg("s1")).await.expect("create");
        let err =
            h.rt.create_container("s1", limited(block_container(&h, "c1"), 1000, 1024))
                .await
                .expect_err("cannot grow");
        assert!(matches!(err, Error::Resize { .. }), "{err:?}");
        assert!(
            err.chain().starts_with(
                "sandbox s1: cannot grow its VM from 1 vCPUs, 256 MiB to 1 vCPUs, 1152 MiB"
            ),
            "{}",
            err.chain()
        );
        assert!(!h.dialer.calls().contains(&"create_container"));
        assert!(!h.dir.path().join("run/s1/mounts/c1").exists());
        // Within the boot size nothing needs to grow: it is created.
        h.rt.create_container("s1", limited(block_container(&h, "c2"), 500, 64))
            .await
            .expect("fits the boot size");
    }

    #[tokio::test]
    async fn limits_beyond_the_maximum_are_refused_naming_the_field() {
        let h = harness();
        h.rt.create_sandbox(cfg("s1")).await.expect("create");
        let err =
            h.rt.create_container("s1", limited(block_container(&h, "c1"), 0, 64 << 10))
                .await
                .expect_err("too big");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("memory_limit_in_bytes"), "{err}");
        let vm = h.vms.get("s1").expect("vm");
        assert!(!vm.calls().contains(&Op::Resize));
        assert!(!vm.calls().contains(&Op::AddDisk));
    }

    #[tokio::test]
    async fn a_failed_disk_attach_leaves_no_container() {
        let h = harness_with(FakeVms::default().failing_at(Op::AddDisk), true);
        h.rt.create_sandbox(cfg("s1")).await.expect("create");
        let err =
            h.rt.create_container("s1", block_container(&h, "c1"))
                .await
                .expect_err("attach fails");
        assert!(err.chain().contains("injected failure"), "{}", err.chain());
        assert!(!h.dialer.calls().contains(&"create_container"));
        assert!(!h.dir.path().join("run/s1/shared/c1").exists());
        let err =
            h.rt.delete_container("s1", "c1")
                .await
                .expect_err("no such container");
        assert_eq!(err.kind(), ErrorKind::NotFound);
        let missing = crate::container::ContainerConfig {
            rootfs: crate::container::Rootfs::Block {
                image: h.dir.path().join("nope.qcow2"),
                format: hypervisor::DiskFormat::Qcow2,
                fstype: "ext4".into(),
            },
            ..block_container(&h, "c2")
        };
        let err =
            h.rt.create_container("s1", missing)
                .await
                .expect_err("no image");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("nope.qcow2"), "{err}");
    }

    #[tokio::test]
    async fn port_forward_goes_through_the_agent_of_a_live_sandbox() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let h = harness();
        let err = h.rt.port_forward("s1", 80).await.err().expect("no sandbox");
        assert_eq!(err.kind(), ErrorKind::NotFound);
        h.rt.create_sandbox(cfg("s1")).await.expect("create");
        let mut s = h.rt.port_forward("s1", 80).await.expect("forward");
        s.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"ping");
        assert!(h.dialer.calls().contains(&"dial_port_forward"));
        let err = h.rt.port_forward("s1", 0).await.err().expect("port 0");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        h.rt.stop_sandbox("s1").await.expect("stop");
        let err = h.rt.port_forward("s1", 80).await.err().expect("stopped");
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    }

    #[tokio::test]
    async fn a_ready_sandbox_can_be_deleted_and_its_vm_is_stopped() {
        let h = harness();
        h.rt.create_sandbox(cfg("s1")).await.expect("create");
        h.rt.delete_sandbox("s1").await.expect("delete");
        assert!(h.vms.get("s1").expect("vm").calls().contains(&Op::Stop));
    }

    #[tokio::test]
    async fn boot_failure_unwinds_everything() {
        let h = harness_with(FakeVms::default().failing_at(Op::Boot), true);
        let err =
            h.rt.create_sandbox(cfg("s1"))
                .await
                .expect_err("boot fails");
        assert!(err.chain().contains("injected failure"), "{}", err.chain());
        assert!(h.rt.list_sandboxes().await.expect("list").is_empty());
        assert!(!h.dir.path().join("run/s1").exists());
        assert!(
            !h.dir.path().join("state/sandboxes/s1").exists(),
            "the ID is free again"
        );
    }

    #[tokio::test]
    async fn an_agent_that_never_answers_times_out_and_unwinds() {
        let h = harness_with(FakeVms::default(), false);
        let err = h.rt.create_sandbox(cfg("s1")).await.expect_err("timeout");
        assert_eq!(err.kind(), ErrorKind::DeadlineExceeded);
        assert!(err.to_string().contains("did not answer within"), "{err}");
        assert!(
            err.to_string().contains("fake console"),
            "console tail is quoted: {err}"
        );
        assert!(
            h.vms.get("s1").expect("vm").calls().contains(&Op::Stop),
            "the VM was stopped"
        );
        assert!(h.rt.list_sandboxes().await.expect("list").is_empty());
        assert!(!h.dir.path().join("run/s1").exists());
    }

    #[tokio::test]
    async fn a_dead_vm_is_reported_stopped_with_its_reason() {
        let h = harness();
        h.rt.create_sandbox(cfg("s1")).await.expect("create");
        h.rt.start_sandbox("s1").await.expect("start");
        h.vms
            .get("s1")
            .expect("vm")
            .crash("QEMU (pid 1) exited; last console lines: Kernel panic");
        let status = h.rt.status_sandbox("s1").await.expect("status");
        assert_eq!(status.state, SandboxState::Stopped);
        assert!(status.reason.expect("reason").contains("Kernel panic"));
        let err = h.rt.pause_sandbox("s1").await.expect_err("dead");
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        h.rt.delete_sandbox("s1").await.expect("delete cleans up");
    }

    #[tokio::test]
    async fn a_vm_that_dies_takes_its_containers_with_it() {
        let h = harness();
        h.rt.create_sandbox(cfg("s1")).await.expect("create");
        h.rt.start_sandbox("s1").await.expect("start");
        h.rt.create_container("s1", block_container(&h, "c1"))
            .await
            .expect("c1");
        h.rt.start_container("s1", "c1").await.expect("start c1");
        h.rt.create_container("s1", block_container(&h, "c2"))
            .await
            .expect("c2");
        let mut exits = h.rt.subscribe_exits();
        h.vms
            .get("s1")
            .expect("vm")
            .crash("QEMU (pid 1) was killed by SIGKILL; last console lines: x");
        // No call made: the VM's watcher records the death by itself.
        let mut ended = Vec::new();
        while ended.len() < 2 {
            let exit = tokio::time::timeout(std::time::Duration::from_secs(10), exits.recv())
                .await
                .expect("announced")
                .expect("exit");
            assert_eq!(exit.exit_code, crate::VM_EXIT_CODE);
            ended.push(exit.id);
        }
        ended.sort();
        assert_eq!(ended, ["c1", "c2"]);
        for id in ["c1", "c2"] {
            let c = h.rt.container_status("s1", id).await.expect("status");
            assert_eq!(c.state, crate::container::ContainerState::Stopped);
            assert_eq!(c.reason.as_deref(), Some(crate::VM_EXIT_REASON));
            assert!(c.message.as_deref().unwrap_or("").contains("SIGKILL"));
            // Stopping an exited container is a no-op; removing it works.
            assert_eq!(
                h.rt.stop_container("s1", id, std::time::Duration::ZERO)
                    .await
                    .expect("stop"),
                crate::VM_EXIT_CODE
            );
            h.rt.delete_container("s1", id).await.expect("delete");
        }
        assert_eq!(
            h.rt.status_sandbox("s1").await.expect("status").state,
            SandboxState::Stopped
        );
        h.rt.stop_sandbox("s1").await.expect("stop");
        h.rt.delete_sandbox("s1").await.expect("delete");
    }

    #[tokio::test]
    async fn wrong_order_is_refused() {
        let h = harness();
        h.rt.create_sandbox(cfg("s1")).await.expect("create");
        assert!(matches!(
            h.rt.pause_sandbox("s1").await,
            Err(Error::WrongState { .. })
        ));
        assert!(matches!(
            h.rt.resume_sandbox("s1").await,
            Err(Error::WrongState { .. })
        ));
        h.rt.start_sandbox("s1").await.expect("start");
        assert!(matches!(
            h.rt.start_sandbox("s1").await,
            Err(Error::WrongState { .. })
        ));
        h.rt.stop_sandbox("s1").await.expect("stop");
        let err = h.rt.start_sandbox("s1").await.expect_err("stopped");
        assert!(err.to_string().contains("cannot be restarted"), "{err}");
    }
}
