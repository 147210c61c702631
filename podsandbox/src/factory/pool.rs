//! The warm pool: `target` VMs booted ahead of demand.
//!
//! One background task refills it, one VM at a time (a boot takes the
//! CPU; two at once only slow each other down), backing off after a
//! failure. Each idle VM is watched: one that dies before a sandbox claims
//! it is thrown away and replaced. [`Factory::take`] hands the oldest one
//! out and wakes the refill.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use async_trait::async_trait;
use hypervisor::Hypervisor;
use tokio::sync::{oneshot, Notify};

use super::{Factory, FactoryStatus, WarmVm, Warmer};

/// The pause after a failed boot, doubled on each failure in a row.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How often an idle VM's logs are checked against their cap.
const LOG_TRIM_PERIOD: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Pool {
    /// What [`FactoryStatus::kind`] says: "pool", or "template" when the
    /// warmer clones a template rather than booting.
    kind: &'static str,
    target: u32,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the refill task: a VM was taken or lost.
    wake: Notify,
}

#[derive(Default)]
struct State {
    ready: VecDeque<Idle>,
    /// The ID of the VM booting now.
    booting: Option<String>,
    booted: u64,
    claimed: u64,
    lost: u64,
    last_error: Option<String>,
    warmer: Option<Arc<dyn Warmer>>,
    task: Option<tokio::task::JoinHandle<()>>,
    stopped: bool,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("ready", &self.ready.len())
            .field("booting", &self.booting)
            .field("stopped", &self.stopped)
            .finish_non_exhaustive()
    }
}

/// A warm VM in the pool; dropping it (taken, lost) ends its watcher.
struct Idle {
    warm: WarmVm,
    _watch: oneshot::Sender<()>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Pool {
    pub fn new(target: u32) -> Self {
        Self {
            kind: "pool",
            target,
            shared: Arc::default(),
        }
    }

    /// A pool whose warm VMs are clones of a template (its status says so).
    pub fn of_clones(target: u32) -> Self {
        Self {
            kind: "template",
            ..Self::new(target)
        }
    }
}

#[async_trait]
impl Factory for Pool {
    fn take(&self) -> Option<WarmVm> {
        let idle = {
            let mut state = self.shared.lock();
            let idle = state.ready.pop_front()?;
            state.claimed += 1;
            idle
        };
        self.shared.wake.notify_one();
        Some(idle.warm.clone())
    }

    fn status(&self) -> FactoryStatus {
        let state = self.shared.lock();
        FactoryStatus {
            kind: self.kind.into(),
            target: self.target,
            ready: u32::try_from(state.ready.len()).unwrap_or(u32::MAX),
            booting: state.booting.is_some(),
            booted: state.booted,
            claimed: state.claimed,
            lost: state.lost,
            last_error: state.last_error.clone(),
        }
    }

    fn start(&self, warmer: Arc<dyn Warmer>) {
        let mut state = self.shared.lock();
        if state.task.is_some() || state.stopped {
            return;
        }
        state.warmer = Some(warmer.clone());
        state.task = Some(tokio::spawn(refill(
            self.shared.clone(),
            self.target,
            warmer,
        )));
    }

    async fn shutdown(&self) {
        let (task, idle, booting, warmer) = {
            let mut state = self.shared.lock();
            state.stopped = true;
            (
                state.task.take(),
                state.ready.drain(..).collect::<Vec<_>>(),
                state.booting.take(),
                state.warmer.take(),
            )
        };
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        let Some(warmer) = warmer else { return };
        for Idle { warm, .. } in idle {
            warmer.discard(&warm.id, Some(warm.vm.as_ref())).await;
        }
        // Cut short mid-boot: whatever it had started goes.
        if let Some(id) = booting {
            warmer.discard(&id, None).await;
        }
    }
}

/// Keeps `target` VMs warm until the pool stops.
async fn refill(shared: Arc<Shared>, target: u32, warmer: Arc<dyn Warmer>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let id = {
            let mut state = shared.lock();
            if state.stopped {
                return;
            }
            if state.ready.len() >= usize::try_from(target).unwrap_or(usize::MAX) {
                None
            } else {
                let id = new_id(ID_PREFIX);
                state.booting = Some(id.clone());
                Some(id)
            }
        };
        let Some(id) = id else {
            shared.wake.notified().await;
            continue;
        };
        let result = warmer.warm(&id).await;
        let failed = {
            let mut state = shared.lock();
            state.booting = None;
            match result {
                Ok(vm) => {
                    state.booted += 1;
                    state.last_error = None;
                    let (tx, rx) = oneshot::channel();
                    state.ready.push_back(Idle {
                        warm: WarmVm {
                            id: id.clone(),
                            vm: vm.clone(),
                        },
                        _watch: tx,
                    });
                    tracing::info!(vm = %id, "a warm VM is ready");
                    tokio::spawn(watch_idle(
                        shared.clone(),
                        warmer.clone(),
                        id.clone(),
                        vm,
                        rx,
                    ));
                    None
                }
                Err(err) => {
                    state.lost += 1;
                    let message = err.chain();
                    state.last_error = Some(message.clone());
                    Some(message)
                }
            }
        };
        match failed {
            None => backoff = BACKOFF_MIN,
            Some(message) => {
                tracing::warn!(vm = %id, "booting a warm VM failed (next try in {backoff:?}): {message}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Watches an idle warm VM until it is taken; one that dies first is
/// thrown away, and the refill told.
async fn watch_idle(
    shared: Arc<Shared>,
    warmer: Arc<dyn Warmer>,
    id: String,
    vm: Arc<dyn Hypervisor>,
    mut taken: oneshot::Receiver<()>,
) {
    let exited = vm.wait_exit();
    tokio::pin!(exited);
    let mut trim = tokio::time::interval(LOG_TRIM_PERIOD);
    let reason = loop {
        tokio::select! {
            reason = &mut exited => break reason,
            _ = &mut taken => return,
            _ = trim.tick() => {
                if let Err(err) = vm.trim_logs().await {
                    tracing::warn!(vm = %id, "{err}");
                }
            }
        }
    };
    let was_idle = {
        let mut state = shared.lock();
        match state.ready.iter().position(|i| i.warm.id == id) {
            Some(at) => {
                state.ready.remove(at);
                state.lost += 1;
                true
            }
            None => false,
        }
    };
    if was_idle {
        tracing::warn!(vm = %id, "a warm VM died before any sandbox claimed it ({reason}); replacing it");
        warmer.discard(&id, Some(vm.as_ref())).await;
        shared.wake.notify_one();
    }
}

/// What the name of every warm VM (and its run dir) starts with.
pub const ID_PREFIX: &str = "pool-";

/// A name no sandbox has: `prefix` (`pool-`, `template-`) and 16 hex
/// digits (time and a counter).
pub(crate) fn new_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Truncation is fine: uniqueness within a run comes from the counter.
    #[allow(clippy::cast_possible_truncation)]
    let low = nanos as u64;
    format!("{prefix}{:016x}", low.wrapping_add(n.rotate_right(16)))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use hypervisor::{fake::FakeHypervisor, VmState};

    use super::*;

    /// Boots fake VMs (or fails to, on demand) and remembers what it threw
    /// away.
    #[derive(Default)]
    struct FakeWarmer {
        fail: AtomicBool,
        vms: Mutex<Vec<(String, FakeHypervisor)>>,
        discarded: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl Warmer for FakeWarmer {
        async fn warm(&self, id: &str) -> crate::Result<Arc<dyn Hypervisor>> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(crate::Error::AgentTimeout {
                    id: id.into(),
                    secs: 1,
                    last_error: "no answer".into(),
                    console: String::new(),
                });
            }
            let vm = FakeHypervisor::new(VmState {
                hypervisor: "fake".into(),
                id: id.into(),
                run_dir: id.into(),
                accel: "none".into(),
                machine: "fake".into(),
                vcpus: 1,
                memory_mib: 256,
                boot_vcpus: 1,
                boot_memory_mib: 256,
                hotplug_memory_mib: 0,
                vmm: None,
                helpers: Vec::new(),
                vsock: None,
                hotplugged_nics: Vec::new(),
                hotplugged_disks: Vec::new(),
                agent_secret: None,
            });
            vm.boot().await.map_err(|source| crate::Error::Hypervisor {
                id: id.into(),
                source,
            })?;
            self.vms
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((id.into(), vm.clone()));
            Ok(Arc::new(vm))
        }

        async fn discard(&self, id: &str, _vm: Option<&dyn Hypervisor>) {
            self.discarded
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(id.into());
        }
    }

    impl FakeWarmer {
        fn booted(&self) -> Vec<(String, FakeHypervisor)> {
            self.vms.lock().unwrap_or_else(|e| e.into_inner()).clone()
        }
        fn discarded(&self) -> Vec<String> {
            self.discarded
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        }
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..1000 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn the_pool_fills_refills_after_a_take_and_replaces_a_vm_that_died_idle() {
        let warmer = Arc::new(FakeWarmer::default());
        let pool = Pool::new(2);
        assert!(pool.take().is_none(), "empty before it starts");
        pool.start(warmer.clone());
        until("two warm VMs", || pool.status().ready == 2).await;
        let status = pool.status();
        assert_eq!((status.kind.as_str(), status.target), ("pool", 2));
        assert_eq!(status.booted, 2);

        let first = pool.take().expect("a warm VM");
        assert_eq!(first.id, warmer.booted()[0].0, "the oldest first");
        assert!(first.id.starts_with("pool-"), "{}", first.id);
        until("the refill", || pool.status().ready == 2).await;
        assert_eq!(pool.status().claimed, 1);
        assert_eq!(warmer.booted().len(), 3);

        // A VM that dies idle is thrown away and replaced; the taken one
        // dying is no longer the pool's business.
        let (second_id, second) = warmer.booted()[1].clone();
        second.crash("killed");
        first.vm.stop(Duration::ZERO).await.expect("stop");
        until("the replacement", || warmer.booted().len() == 4).await;
        until("ready again", || pool.status().ready == 2).await;
        assert_eq!(warmer.discarded(), [second_id]);
        assert_eq!(pool.status().lost, 1);

        pool.shutdown().await;
        assert_eq!(pool.status().ready, 0);
        let mut discarded = warmer.discarded();
        discarded.sort();
        let mut expected: Vec<String> = warmer.booted()[1..].iter().map(|v| v.0.clone()).collect();
        expected.sort();
        assert_eq!(discarded, expected, "every idle VM, none of the taken one");
        assert!(pool.take().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_boot_is_retried_with_backoff_and_reported() {
        let warmer = Arc::new(FakeWarmer::default());
        warmer.fail.store(true, Ordering::SeqCst);
        let pool = Pool::new(1);
        pool.start(warmer.clone());
        until("a failure", || pool.status().lost >= 1).await;
        let status = pool.status();
        assert_eq!(status.ready, 0);
        assert!(
            status
                .last_error
                .as_deref()
                .unwrap_or("")
                .contains("no answer"),
            "{status:?}"
        );
        // 1 s, 2 s, 4 s apart: about four tries in eight seconds, not
        // thousands.
        tokio::time::sleep(Duration::from_secs(8)).await;
        let tries = pool.status().lost;
        assert!((3..=5).contains(&tries), "{tries} tries");
        warmer.fail.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(20)).await;
        until("a warm VM at last", || pool.status().ready == 1).await;
        assert_eq!(pool.status().last_error, None);
        pool.shutdown().await;
        assert_eq!(warmer.discarded().len(), 1);
    }

    #[tokio::test]
    async fn shutdown_mid_boot_discards_the_vm_being_booted() {
        /// Never finishes a boot.
        struct Hanging(Mutex<Vec<String>>);
        #[async_trait]
        impl Warmer for Hanging {
            async fn warm(&self, _id: &str) -> crate::Result<Arc<dyn Hypervisor>> {
                std::future::pending().await
            }
            async fn discard(&self, id: &str, vm: Option<&dyn Hypervisor>) {
                assert!(vm.is_none(), "no VM object mid-boot");
                self.0
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(id.into());
            }
        }
        let warmer = Arc::new(Hanging(Mutex::default()));
        let pool = Pool::new(1);
        pool.start(warmer.clone());
        until("a boot", || pool.status().booting).await;
        pool.shutdown().await;
        let discarded = warmer.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert_eq!(discarded.len(), 1);
        assert!(discarded[0].starts_with("pool-"));
        assert!(!pool.status().booting);
    }
}
