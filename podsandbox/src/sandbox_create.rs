//! CreateSandbox: reserve the ID, boot the VM, wait for its agent → `ready`.
//! Any failure unwinds every step before it.

use std::{
    os::unix::fs::DirBuilderExt,
    sync::Arc,
    time::{Duration, Instant},
};

use hypervisor::{Hypervisor, VmConfig, VmSize};

use crate::{
    agent::AgentClient,
    network::{NetInterface, SandboxFiles, SandboxNetwork},
    sandbox::{check_id, now_secs, Runtime, SandboxConfig, SandboxStatus},
    state::{Action, SandboxState},
    store::{SandboxRecord, RECORD_VERSION},
    Error, Result,
};

/// Pause between attempts to reach a booting guest's agent.
const DIAL_RETRY: Duration = Duration::from_millis(10);
/// How often a VM's start-up work is asked about (GuestDetails).
const SETTLE_POLL: Duration = Duration::from_millis(100);
/// How often a running VM's logs are checked against their cap.
const LOG_TRIM_PERIOD: Duration = Duration::from_secs(1);

impl Runtime {
    pub async fn create_sandbox(&self, config: SandboxConfig) -> Result<SandboxStatus> {
        check_id(&config.id)?;
        config.network.validate()?;
        let cgroup_parent = config
            .cgroup_parent
            .as_deref()
            .map(crate::cgroup::parent_path)
            .transpose()?;
        let hostname = config
            .hostname
            .clone()
            .unwrap_or_else(|| config.id.chars().take(63).collect());
        let files = SandboxFiles::new(&hostname, &config.network.pod_ips(), config.dns.as_ref())?;
        let id = config.id.clone();
        let hv = &self.inner.config.hypervisor;
        let mut record = SandboxRecord {
            version: RECORD_VERSION,
            id: id.clone(),
            state: SandboxState::Creating,
            vcpus: config.vcpus.unwrap_or(hv.default_vcpus),
            memory_mib: config.memory_mib.unwrap_or(hv.default_memory_mib),
            created_at: now_secs(),
            reason: None,
            vm: None,
            containers: Vec::new(),
            hostname,
            network: SandboxNetwork {
                interfaces: config
                    .network
                    .interfaces
                    .iter()
                    .map(|n| NetInterface {
                        tap: None,
                        ..n.clone()
                    })
                    .collect(),
                routes: config.network.routes.clone(),
                neighbors: config.network.neighbors.clone(),
                sysctls: config.network.sysctls.clone(),
            },
            cgroup: None,
            origin: Default::default(),
            floor: None,
        };
        let store = &self.inner.store;
        store.reserve(&id)?;
        let lock = match store.lock(&id).await {
            Ok(lock) => lock,
            Err(err) => {
                self.unwind(&id, None).await;
                return Err(err);
            }
        };
        let warm = self
            .claim_warm(
                &mut record,
                &config.network,
                &files,
                cgroup_parent.as_deref(),
            )
            .await;
        let vm = match warm {
            Some(vm) => vm,
            None => match self
                .boot(
                    &mut record,
                    &config.network,
                    &files,
                    cgroup_parent.as_deref(),
                )
                .await
            {
                Ok(vm) => vm,
                Err((err, vm)) => {
                    self.unwind(&id, vm.as_deref()).await;
                    return Err(err);
                }
            },
        };
        record.state = record
            .state
            .next(Action::Created)
            .unwrap_or(SandboxState::Ready);
        record.vm = Some(vm.state());
        if let Err(err) = store.save(&record) {
            self.unwind(&id, Some(vm.as_ref())).await;
            return Err(err);
        }
        drop(lock);
        tracing::info!(%id, pid = ?vm.pids().first(), "sandbox ready");
        self.watch_vm(&id, vm);
        Ok(Runtime::summary(&record))
    }

    /// Run dir, VM, boot, agent. On error, returns the VM (if any) to unwind.
    async fn boot(
        &self,
        record: &mut SandboxRecord,
        network: &SandboxNetwork,
        files: &SandboxFiles,
        cgroup_parent: Option<&std::path::Path>,
    ) -> std::result::Result<Arc<dyn Hypervisor>, (Error, Option<Arc<dyn Hypervisor>>)> {
        let id = record.id.clone();
        self.inner.store.save(record).map_err(|e| (e, None))?;
        let nics = network
            .interfaces
            .iter()
            .filter_map(NetInterface::vm_nic)
            .collect();
        let size = VmSize {
            vcpus: record.vcpus,
            memory_mib: record.memory_mib,
        };
        let vm = self
            .spawn_vm(&id, size, nics, None, 0)
            .await
            .map_err(|e| (e, None))?;
        // A VM runs that no record names yet.
        self.fail_point("create_sandbox.vm_spawned")
            .map_err(|e| (e, Some(vm.clone())))?;
        if let Some(parent) = cgroup_parent {
            match crate::cgroup::place(&id, parent, self.inner.config.cgroup_root, &vm.pids()) {
                Ok(cg) => record.cgroup = Some(cg),
                Err(err) => return Err((err, Some(vm))),
            }
        }
        // From here on a crash leaves a record that delete can clean up.
        record.vm = Some(vm.state());
        if let Err(err) = self.inner.store.save(record) {
            return Err((err, Some(vm)));
        }
        let timeout = self.inner.config.agent.dial_timeout();
        let agent = match self.wait_for_agent(&id, vm.as_ref(), timeout).await {
            Ok(agent) => agent,
            Err(err) => return Err((err, Some(vm))),
        };
        if let Err(err) = configure_guest(&id, agent.as_ref(), network, files).await {
            return Err((err, Some(vm)));
        }
        // The guest is ready; the record still says creating.
        match self.fail_point("create_sandbox.guest_ready") {
            Ok(()) => Ok(vm),
            Err(err) => Err((err, Some(vm))),
        }
    }

    /// Makes the run dir `run_dir(vm_id)` (a bounded tmpfs with the shared
    /// dirs) and boots a VM of `size` with `nics` in it, its processes at
    /// `nice` from the start. On error nothing of the VM runs; the run dir
    /// is the caller's to remove.
    pub(crate) async fn spawn_vm(
        &self,
        vm_id: &str,
        size: VmSize,
        nics: Vec<hypervisor::Nic>,
        template: Option<hypervisor::TemplateRole>,
        nice: i32,
    ) -> Result<Arc<dyn Hypervisor>> {
        let run_dir = self.run_dir(vm_id);
        // A run dir without a sandbox is debris of a crashed create.
        if run_dir.exists() {
            crate::mounts::remove_tree(&run_dir)?;
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&run_dir)
            .map_err(|source| Error::Io {
                action: "create run dir",
                path: run_dir.clone(),
                source,
            })?;
        let max_mib = self.inner.config.run_dir_max_mib;
        if max_mib > 0 {
            crate::mounts::bounded_tmpfs(&run_dir, max_mib)?;
        }
        let shared = crate::mounts::guest_share(&run_dir);
        let host_share = crate::mounts::host_share(&run_dir);
        for dir in [&shared, &host_share] {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(|source| Error::Io {
                    action: "create shared dir",
                    path: dir.clone(),
                    source,
                })?;
        }
        crate::mounts::share_read_only(&host_share, &shared)?;
        // Made here, known only to this VM's record and its guest.
        let secret = agent::AgentSecret::generate().map_err(|source| Error::Io {
            action: "read randomness for the agent secret from",
            path: "/dev/urandom".into(),
            source,
        })?;
        let vm_config = VmConfig {
            agent_secret: Some(secret.to_hex()),
            shared: Some(hypervisor::SharedDir {
                host_path: shared,
                tag: agent::SHARED_FS_TAG.into(),
            }),
            id: vm_id.to_string(),
            vcpus: size.vcpus,
            memory_mib: size.memory_mib,
            run_dir,
            nics,
            template,
            nice,
        };
        let hypervisor_error = |source| Error::Hypervisor {
            id: vm_id.to_string(),
            source,
        };
        let vm = self
            .inner
            .vms
            .create(&self.inner.config.hypervisor, vm_config)
            .map_err(hypervisor_error)?;
        vm.boot().await.map_err(hypervisor_error)?;
        Ok(vm)
    }

    /// Dials the agent until it answers a health check, the VM exits, or
    /// `timeout` passes.
    pub(crate) async fn wait_for_agent(
        &self,
        id: &str,
        vm: &dyn Hypervisor,
        timeout: Duration,
    ) -> Result<Arc<dyn AgentClient>> {
        tokio::select! {
            reason = vm.wait_exit() => Err(Error::VmExitedDuringBoot { id: id.into(), reason }),
            result = self.ready_then_dial(id, vm, timeout) => result,
        }
    }

    /// Waits for the readiness notice (where the transport has one), then
    /// dials until a health check answers.
    async fn ready_then_dial(
        &self,
        id: &str,
        vm: &dyn Hypervisor,
        timeout: Duration,
    ) -> Result<Arc<dyn AgentClient>> {
        let deadline = Instant::now() + timeout;
        if let Some(channel) = vm.vsock() {
            if let Err(err) = self.inner.dialer.wait_ready(&channel, timeout).await {
                return Err(agent_timeout(id, timeout, err.detail, vm));
            }
        }
        self.dial_until_ready(id, vm, deadline.saturating_duration_since(Instant::now()))
            .await
    }

    async fn dial_until_ready(
        &self,
        id: &str,
        vm: &dyn Hypervisor,
        timeout: Duration,
    ) -> Result<Arc<dyn AgentClient>> {
        let deadline = Instant::now() + timeout;
        loop {
            let last_error = match self.agent(id, vm).await {
                Ok(agent) => {
                    let left = deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(100));
                    match agent.check(left.min(Duration::from_secs(2))).await {
                        Ok(()) => return Ok(agent),
                        Err(err) => format!("health check: {err}"),
                    }
                }
                Err(err) => err.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(agent_timeout(id, timeout, last_error, vm));
            }
            tokio::time::sleep(DIAL_RETRY).await;
        }
    }

    /// Waits until the guest reports its start-up work settled (modules,
    /// namespaces, the shared filesystem; `GuestDetails.settled`) or
    /// `deadline` passes; a VM that does not settle by then is used as it
    /// is (logged): it works, only its first calls wait for that work. A VM
    /// that exits meanwhile is an error at once, as in `wait_for_agent`.
    pub(crate) async fn wait_settled(
        id: &str,
        vm: &dyn Hypervisor,
        agent: &dyn AgentClient,
        deadline: Instant,
    ) -> Result<()> {
        tokio::select! {
            reason = vm.wait_exit() => Err(Error::VmExitedDuringBoot { id: id.into(), reason }),
            () = Self::poll_settled(id, agent, deadline) => Ok(()),
        }
    }

    async fn poll_settled(id: &str, agent: &dyn AgentClient, deadline: Instant) {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = left.clamp(SETTLE_POLL, Duration::from_secs(5));
            match agent.guest_details(wait).await {
                Ok(d) if d.settled => return,
                Ok(_) => {}
                Err(e) => tracing::debug!(vm = %id, "guest details: {e}"),
            }
            if Instant::now() >= deadline {
                tracing::warn!(vm = %id, "the guest did not settle in time: used as it is");
                return;
            }
            tokio::time::sleep(SETTLE_POLL).await;
        }
    }

    /// Undoes a create: stops the VM, removes the run dir and the record. If
    /// cleanup fails, the record stays (stopped, with the reason) so that a
    /// later delete can finish it.
    pub(crate) async fn unwind(&self, id: &str, vm: Option<&dyn Hypervisor>) {
        let mut problems = Vec::new();
        if let Some(vm) = vm {
            if let Err(err) = vm.stop(Duration::from_millis(500)).await {
                problems.push(format!("stop VM: {err}"));
            }
        }
        let mut run_dirs = vec![self.run_dir(id)];
        // A VM from the pool lives in the run dir it booted in.
        if let Ok(record) = self.inner.store.load(id) {
            let own = self.vm_run_dir(&record);
            if !run_dirs.contains(&own) {
                run_dirs.push(own);
            }
        }
        for run_dir in &run_dirs {
            if let Err(err) = crate::mounts::remove_tree(run_dir) {
                problems.push(err.chain());
            }
        }
        if let Some(cg) = self.inner.store.load(id).ok().and_then(|r| r.cgroup) {
            crate::cgroup::remove(&cg);
        }
        if problems.is_empty() {
            if let Err(err) = self.inner.store.remove(id) {
                tracing::error!(%id, "unwinding create: {err}");
            }
            return;
        }
        let reason = format!(
            "create failed and cleanup is incomplete: {}",
            problems.join("; ")
        );
        tracing::error!(%id, "{reason}");
        if let Ok(mut record) = self.inner.store.load(id) {
            record.state = SandboxState::Stopped;
            record.reason = Some(reason);
            record.vm = vm.map(|v| v.state()).or(record.vm);
            if let Err(err) = self.inner.store.save(&record) {
                tracing::error!(%id, "unwinding create: {err}");
            }
        }
    }

    /// Watches the VMM of a sandbox (and keeps its logs trimmed): when it exits (a pidfd event, see
    /// [`hypervisor::ProcessRef::exited`]) the sandbox is reconciled at once
    /// — stopped, its containers exited and announced
    /// ([`Runtime::vm_gone`]). Other processes reconcile on their next call.
    pub(crate) fn watch_vm(&self, id: &str, vm: Arc<dyn Hypervisor>) {
        let runtime = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            // The logs the guest grows are kept in bounds while it runs.
            let exited = vm.wait_exit();
            tokio::pin!(exited);
            let mut trim = tokio::time::interval(LOG_TRIM_PERIOD);
            let reason = loop {
                tokio::select! {
                    reason = &mut exited => break reason,
                    _ = trim.tick() => {
                        if let Err(err) = vm.trim_logs().await {
                            tracing::warn!(%id, "{err}");
                        }
                    }
                }
            };
            tracing::debug!(%id, "VMM exited: {reason}");
            // Not found: deleted. Anything else is reported by the next call.
            if let Err(err) = runtime.locked(&id).await {
                if !matches!(err, Error::NotFound { .. }) {
                    tracing::warn!(%id, "VM watcher: {err}");
                }
            }
        });
    }
}

/// Gives the guest the pod's interfaces, routes and /etc files.
pub(crate) async fn configure_guest(
    id: &str,
    agent: &dyn AgentClient,
    network: &SandboxNetwork,
    files: &SandboxFiles,
) -> Result<()> {
    let failed = |call: &'static str| {
        move |e: crate::AgentError| Error::Agent {
            id: id.into(),
            call,
            detail: e.detail,
        }
    };
    let started = std::time::Instant::now();
    let interfaces = async {
        for nic in &network.interfaces {
            agent
                .update_interface(nic)
                .await
                .map_err(failed("UpdateInterface"))?;
        }
        Ok::<_, Error>(started.elapsed().as_millis())
    };
    // The files need no interface: written while the guest still brings a
    // hot-plugged NIC up.
    let written = async {
        agent
            .set_sandbox_files(files)
            .await
            .map_err(failed("SetSandboxFiles"))?;
        Ok::<_, Error>(started.elapsed().as_millis())
    };
    let (interfaces, written) = tokio::join!(interfaces, written);
    let (interfaces_ms, files_ms) = (interfaces?, written?);
    // After the interfaces (routes need their addresses, neighbours and
    // net.ipv4.conf.eth0.* their names), independent of each other: asked
    // at once, their round trips overlap. Any failure fails the whole
    // configuration, and the caller throws the VM away.
    tokio::try_join!(
        unless_empty(network.routes.is_empty(), async {
            agent
                .update_routes(&network.routes)
                .await
                .map_err(failed("UpdateRoutes"))
        }),
        unless_empty(network.neighbors.is_empty(), async {
            agent
                .add_neighbors(&network.neighbors)
                .await
                .map_err(failed("AddArpNeighbors"))
        }),
        unless_empty(network.sysctls.is_empty(), async {
            agent
                .set_sysctls(&network.sysctls)
                .await
                .map_err(failed("SetSysctls"))
        }),
    )?;
    tracing::debug!(
        sandbox = %id,
        interfaces_ms,
        files_ms,
        all_ms = started.elapsed().as_millis(),
        "guest configured"
    );
    Ok(())
}

/// Runs `call` (a future does nothing until awaited) unless there is
/// nothing to send.
async fn unless_empty<T>(
    empty: bool,
    call: impl std::future::Future<Output = Result<T>>,
) -> Result<()> {
    if !empty {
        call.await?;
    }
    Ok(())
}

fn agent_timeout(id: &str, timeout: Duration, last_error: String, vm: &dyn Hypervisor) -> Error {
    Error::AgentTimeout {
        id: id.into(),
        secs: timeout.as_secs(),
        last_error,
        console: vm.console_tail(10),
    }
}
