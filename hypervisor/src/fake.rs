//! A hand-written fake hypervisor for unit tests of callers: it records what
//! it is asked and fails on demand. Never used end to end.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;

use crate::{Hypervisor, HypervisorError, Result, VmState, VmStatus, VsockChannel};

/// An operation of the fake, for `fail_at` and the call log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Boot,
    Pause,
    Resume,
    Stop,
    Status,
    AddNic,
    RemoveNic,
    AddDisk,
    RemoveDisk,
    Resize,
    SaveTemplate,
}

#[derive(Debug, Default)]
struct Inner {
    calls: Vec<Op>,
    fail_at: Option<Op>,
    status: Option<VmStatus>,
    /// The size after the last resize.
    size: Option<crate::VmSize>,
}

/// Shared handle: clones observe the same VM.
#[derive(Debug, Clone)]
pub struct FakeHypervisor {
    state: VmState,
    inner: Arc<Mutex<Inner>>,
}

impl FakeHypervisor {
    pub fn new(state: VmState) -> Self {
        Self {
            state,
            inner: Arc::default(),
        }
    }

    /// Makes `op` fail from now on.
    pub fn failing_at(self, op: Op) -> Self {
        self.with(|i| i.fail_at = Some(op));
        self
    }

    /// What the fake has been asked, in order.
    pub fn calls(&self) -> Vec<Op> {
        self.with(|i| i.calls.clone())
    }

    /// Simulates the VMM dying.
    pub fn crash(&self, reason: &str) {
        self.with(|i| {
            i.status = Some(VmStatus::Exited {
                reason: reason.into(),
            })
        });
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    fn record(&self, op: Op, next: Option<VmStatus>) -> Result<()> {
        self.with(|i| {
            i.calls.push(op);
            if i.fail_at == Some(op) {
                return Err(HypervisorError::Qmp {
                    command: format!("{op:?}"),
                    detail: "injected failure".into(),
                });
            }
            if let Some(next) = next {
                if !matches!(i.status, Some(VmStatus::Exited { .. })) || op == Op::Boot {
                    i.status = Some(next);
                }
            }
            Ok(())
        })
    }
}

#[async_trait]
impl Hypervisor for FakeHypervisor {
    async fn boot(&self) -> Result<()> {
        self.record(Op::Boot, Some(VmStatus::Running))
    }
    async fn pause(&self) -> Result<()> {
        self.record(Op::Pause, Some(VmStatus::Paused))
    }
    async fn resume(&self) -> Result<()> {
        self.record(Op::Resume, Some(VmStatus::Running))
    }
    async fn save_template(&self, state: &std::path::Path) -> Result<()> {
        self.record(Op::SaveTemplate, Some(VmStatus::Paused))?;
        std::fs::write(state, b"fake device state").map_err(|source| crate::HypervisorError::Io {
            action: "write",
            path: state.to_path_buf(),
            source,
        })
    }
    async fn stop(&self, _grace: Duration) -> Result<()> {
        self.record(
            Op::Stop,
            Some(VmStatus::Exited {
                reason: "stopped".into(),
            }),
        )
    }
    async fn status(&self) -> Result<VmStatus> {
        self.record(Op::Status, None)?;
        Ok(self.with(|i| i.status.clone()).unwrap_or(VmStatus::Exited {
            reason: "never booted".into(),
        }))
    }
    async fn wait_exit(&self) -> String {
        loop {
            if let Some(VmStatus::Exited { reason }) = self.with(|i| i.status.clone()) {
                return reason;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    fn vsock(&self) -> Option<VsockChannel> {
        self.state.vsock.clone()
    }
    fn pids(&self) -> Vec<u32> {
        Vec::new()
    }
    fn state(&self) -> VmState {
        let mut state = self.state.clone();
        if let Some(size) = self.with(|i| i.size) {
            state.vcpus = size.vcpus;
            state.memory_mib = size.memory_mib;
        }
        state
    }
    fn console_tail(&self, _lines: usize) -> String {
        "fake console".into()
    }
    async fn add_nic(&self, _nic: &crate::Nic) -> Result<()> {
        self.record(Op::AddNic, None)
    }
    async fn remove_nic(&self, _mac: &str) -> Result<()> {
        self.record(Op::RemoveNic, None)
    }
    async fn add_disk(&self, _disk: &crate::Disk) -> Result<crate::DiskAddress> {
        self.record(Op::AddDisk, None)?;
        let target = self.with(|i| i.calls.iter().filter(|c| **c == Op::AddDisk).count());
        Ok(crate::DiskAddress {
            target: u32::try_from(target).unwrap_or(u32::MAX),
            lun: 0,
        })
    }
    async fn remove_disk(&self, _address: crate::DiskAddress) -> Result<()> {
        self.record(Op::RemoveDisk, None)
    }
    /// Takes any size down to what the VM booted with.
    async fn resize(&self, size: crate::VmSize) -> Result<crate::VmSize> {
        self.record(Op::Resize, None)?;
        let boot = self.state.boot_size();
        let now = crate::VmSize {
            vcpus: size.vcpus.max(boot.vcpus),
            memory_mib: size.memory_mib.max(boot.memory_mib),
        };
        self.with(|i| i.size = Some(now));
        Ok(now)
    }
}
