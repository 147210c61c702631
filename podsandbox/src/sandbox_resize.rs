//! A sandbox's VM follows its containers: CreateContainer and
//! UpdateContainer grow it (CPU and memory hot-plug) to what the live
//! containers' limits add up to, DeleteContainer and UpdateContainer shrink
//! it again — never below the size it booted with (the sandbox's own
//! sizing, e.g. from the pod's declared resources), never above the
//! configured maxima.
//!
//! - vCPUs = ceil(Σ cpu_quota / cpu_period) of the containers that have not
//!   stopped, at least the boot vCPUs;
//! - memory = Σ memory limits (MiB, rounded up) + `memory_overhead_mib` (the
//!   guest's kernel and agent), at least the boot memory. Containers without
//!   a limit add nothing.

use std::{sync::Arc, time::Duration};

use hypervisor::{Hypervisor, HypervisorConfig, VmSize};

use crate::{
    container::{ContainerState, Resources},
    sandbox::{Locked, Runtime},
    Error, Result,
};

/// How long the guest may take to online hot-plugged vCPUs.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(10);
/// The kernel's CFS period when a quota comes without one.
const DEFAULT_CPU_PERIOD_US: u64 = 100_000;

/// Why a set of containers does not fit any VM this runtime can make; the
/// message names the limit so callers can name their field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeError {
    Cpu(String),
    Memory(String),
}

impl std::fmt::Display for SizeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SizeError::Cpu(m) | SizeError::Memory(m) => f.write_str(m),
        }
    }
}

/// The size a VM that booted at `floor` needs for containers with
/// `resources`.
pub fn needed_size<'a>(
    floor: VmSize,
    resources: impl IntoIterator<Item = &'a Resources>,
    hv: &HypervisorConfig,
) -> std::result::Result<VmSize, SizeError> {
    let mut cpu_millis: u64 = 0;
    let mut memory_bytes: u64 = 0;
    for r in resources {
        if let Some(quota) = r.cpu_quota.and_then(|q| u64::try_from(q).ok()) {
            if quota > 0 {
                let period = r
                    .cpu_period
                    .filter(|p| *p > 0)
                    .unwrap_or(DEFAULT_CPU_PERIOD_US);
                cpu_millis = cpu_millis.saturating_add(quota.saturating_mul(1000).div_ceil(period));
            }
        }
        if let Some(limit) = r.memory_limit_bytes.and_then(|m| u64::try_from(m).ok()) {
            memory_bytes = memory_bytes.saturating_add(limit);
        }
    }
    let vcpus = u32::try_from(cpu_millis.div_ceil(1000)).unwrap_or(u32::MAX);
    let max_vcpus = hv.max_vcpus().max(floor.vcpus);
    if vcpus > max_vcpus {
        return Err(SizeError::Cpu(format!(
            "the sandbox's containers would need {vcpus} vCPUs, more than hypervisor.max_vcpus ({max_vcpus})"
        )));
    }
    let memory_mib = if memory_bytes == 0 {
        0
    } else {
        let mib = memory_bytes.div_ceil(1 << 20);
        u32::try_from(mib)
            .unwrap_or(u32::MAX)
            .saturating_add(hv.memory_overhead_mib)
    };
    let max_memory = hv.max_memory_mib.max(floor.memory_mib);
    if memory_mib > max_memory {
        return Err(SizeError::Memory(format!(
            "the sandbox's containers would need {memory_mib} MiB ({} MiB for the guest itself), more than hypervisor.max_memory_mib ({max_memory})",
            hv.memory_overhead_mib
        )));
    }
    Ok(VmSize {
        vcpus: vcpus.max(floor.vcpus),
        memory_mib: memory_mib.max(floor.memory_mib),
    })
}

impl Runtime {
    /// The size the sandbox's VM needs for its live containers, with
    /// `changed` (a container being created or updated) in place of the
    /// container of that ID. Errors are InvalidContainer for `changed`.
    pub(crate) fn size_with(
        &self,
        s: &Locked,
        changed: Option<(&str, &Resources)>,
    ) -> Result<VmSize> {
        let boot = s
            .record
            .vm
            .as_ref()
            .map(hypervisor::VmState::boot_size)
            .unwrap_or(VmSize {
                vcpus: s.record.vcpus,
                memory_mib: s.record.memory_mib,
            });
        // A VM from the pool booted smaller than the sandbox asked for.
        let asked = s.record.floor.unwrap_or(boot);
        let floor = VmSize {
            vcpus: boot.vcpus.max(asked.vcpus),
            memory_mib: boot.memory_mib.max(asked.memory_mib),
        };
        let others = s
            .record
            .containers
            .iter()
            .filter(|c| c.state != ContainerState::Stopped)
            .filter(|c| changed.is_none_or(|(id, _)| id != c.id))
            .map(|c| &c.resources);
        let all = others.chain(changed.map(|(_, r)| r));
        needed_size(floor, all, &self.inner.config.hypervisor).map_err(|e| {
            Error::InvalidContainer {
                id: changed.map(|(id, _)| id).unwrap_or_default().into(),
                detail: match e {
                    SizeError::Cpu(m) => format!("cpu_quota: {m}"),
                    SizeError::Memory(m) => format!("memory_limit_in_bytes: {m}"),
                },
            }
        })
    }

    /// Resizes the VM of `s` to `want` (a no-op when it is that size) and
    /// has the guest online what was added; the record then holds the size
    /// in force (the caller saves it). Growth that fails is an error
    /// (FailedPrecondition on a VM without hot-plug); a shrink that cannot
    /// happen leaves the VM bigger, with a warning.
    pub(crate) async fn fit_vm(&self, s: &mut Locked, want: VmSize) -> Result<()> {
        let vm: Arc<dyn Hypervisor> = s.vm()?.clone();
        let id = s.record.id.clone();
        let have = vm.state().size();
        let Some(now) = self.resize_vm(&id, vm.as_ref(), want).await? else {
            return Ok(());
        };
        // The record follows the VM even if the guest fails to online.
        s.record.vcpus = now.vcpus;
        s.record.memory_mib = now.memory_mib;
        s.record.vm = Some(vm.state());
        if now.vcpus > have.vcpus {
            self.online(&id, vm.as_ref(), now).await?;
        }
        Ok(())
    }

    /// Resizes `vm` to `want`: the size it has then, or `None` when nothing
    /// changed (it was that size, or a shrink could not happen: a warning).
    /// Growth that fails is an error.
    pub(crate) async fn resize_vm(
        &self,
        id: &str,
        vm: &dyn Hypervisor,
        want: VmSize,
    ) -> Result<Option<VmSize>> {
        let have = vm.state().size();
        if want == have {
            return Ok(None);
        }
        let growing = want.vcpus > have.vcpus || want.memory_mib > have.memory_mib;
        match vm.resize(want).await {
            Ok(now) => Ok(Some(now)),
            Err(source) if !growing => {
                tracing::warn!(sandbox = %id, %have, %want, "VM not shrunk: {source}");
                Ok(None)
            }
            Err(source) => Err(Error::Resize {
                id: id.into(),
                have,
                want,
                source,
            }),
        }
    }

    /// Has the guest online the hot-plugged vCPUs (and memory) of a VM now
    /// `now` in size.
    pub(crate) async fn online(&self, id: &str, vm: &dyn Hypervisor, now: VmSize) -> Result<()> {
        let agent = self.agent(id, vm).await?;
        let guest = agent
            .online_resources(now.vcpus, ONLINE_TIMEOUT)
            .await
            .map_err(|e| Error::Agent {
                id: id.into(),
                call: "OnlineResources",
                detail: e.to_string(),
            })?;
        if guest.online_cpus < now.vcpus {
            tracing::warn!(sandbox = %id, online = guest.online_cpus, plugged = now.vcpus, "the guest has not onlined every hot-plugged vCPU");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv() -> HypervisorConfig {
        HypervisorConfig {
            max_vcpus: 4,
            max_memory_mib: 4096,
            ..Default::default()
        }
    }

    const FLOOR: VmSize = VmSize {
        vcpus: 1,
        memory_mib: 256,
    };

    fn res(quota: Option<i64>, memory_mib: Option<i64>) -> Resources {
        Resources {
            cpu_quota: quota,
            cpu_period: quota.map(|_| 100_000),
            memory_limit_bytes: memory_mib.map(|m| m << 20),
            ..Default::default()
        }
    }

    #[test]
    fn no_limits_keep_the_floor() {
        assert_eq!(
            needed_size(FLOOR, &[Resources::default()], &hv()),
            Ok(FLOOR)
        );
        assert_eq!(needed_size(FLOOR, &[], &hv()), Ok(FLOOR));
    }

    #[test]
    fn limits_add_up_with_the_guest_overhead() {
        let r = [res(Some(150_000), Some(1024)), res(Some(50_000), Some(512))];
        assert_eq!(
            needed_size(FLOOR, &r, &hv()),
            Ok(VmSize {
                vcpus: 2,
                memory_mib: 1024 + 512 + 128
            })
        );
        // A quota without a period uses the kernel's 100 ms.
        let r = [Resources {
            cpu_quota: Some(250_000),
            ..Default::default()
        }];
        assert_eq!(needed_size(FLOOR, &r, &hv()).map(|s| s.vcpus), Ok(3));
    }

    #[test]
    fn a_bigger_floor_wins() {
        let floor = VmSize {
            vcpus: 2,
            memory_mib: 2048,
        };
        let r = [res(Some(100_000), Some(512))];
        assert_eq!(needed_size(floor, &r, &hv()), Ok(floor));
    }

    #[test]
    fn beyond_the_maxima_is_refused_naming_the_limit() {
        let r = [res(Some(500_000), None)];
        let err = needed_size(FLOOR, &r, &hv()).unwrap_err();
        assert!(
            matches!(&err, SizeError::Cpu(m) if m.contains("max_vcpus (4)")),
            "{err}"
        );
        let r = [res(None, Some(4000))];
        let err = needed_size(FLOOR, &r, &hv()).unwrap_err();
        assert!(
            matches!(&err, SizeError::Memory(m) if m.contains("4128 MiB") && m.contains("max_memory_mib (4096)")),
            "{err}"
        );
    }

    #[test]
    fn negative_values_add_nothing() {
        let r = [Resources {
            cpu_quota: Some(-1),
            memory_limit_bytes: Some(-1),
            ..Default::default()
        }];
        assert_eq!(needed_size(FLOOR, &r, &hv()), Ok(FLOOR));
    }
}
