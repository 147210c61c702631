//! How big a pod's VM is: from what kubelet sends in
//! `PodSandboxConfig.linux` — `resources` (the sum of the pod's containers'
//! limits) plus `overhead` (the RuntimeClass overhead) — as containerd's
//! sandbox sizing for VM runtimes (Kata) reads them:
//!
//! - vCPUs = ceil(Σ cpu_quota / cpu_period) over both, at least
//!   `hypervisor.default_vcpus`;
//! - memory = Σ memory_limit_in_bytes over both (MiB, rounded up) +
//!   `hypervisor.memory_overhead_mib` (the guest's own kernel and agent),
//!   at least `hypervisor.default_memory_mib`.
//!
//! A pod without limits gets the defaults. Beyond `max_vcpus` /
//! `max_memory_mib` the pod is refused with InvalidArgument naming the
//! field; so is a negative or inconsistent value. An allowlisted
//! `io.virtcontainers.*` annotation still wins over the computed size.

use k8s_cri::v1 as cri;

use podsandbox::sandbox_resize::SizeError;

use crate::error::{CriError, Result};

/// The computed size; `None` where the defaults apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct PodSize {
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u32>,
}

pub(crate) fn pod_size(
    linux: Option<&cri::LinuxPodSandboxConfig>,
    hv: &hypervisor::HypervisorConfig,
) -> Result<PodSize> {
    let Some(linux) = linux else {
        return Ok(PodSize::default());
    };
    let parts = [
        ("config.linux.resources", linux.resources.as_ref()),
        ("config.linux.overhead", linux.overhead.as_ref()),
    ];
    // Checked here, where the field can be named; summed by the formula
    // the VM's resizes use (podsandbox::sandbox_resize::needed_size).
    let mut limits = Vec::new();
    for (field, res) in parts {
        let Some(res) = res else { continue };
        let number = |name: &str, v: i64| {
            u64::try_from(v).map_err(|_| {
                CriError::invalid(format!("{field}.{name}"), format!("{v} is negative"))
            })
        };
        let quota = number("cpu_quota", res.cpu_quota)?;
        let period = number("cpu_period", res.cpu_period)?;
        if quota > 0 && period == 0 {
            return Err(CriError::invalid(
                format!("{field}.cpu_period"),
                "must be set with cpu_quota",
            ));
        }
        let memory = number("memory_limit_in_bytes", res.memory_limit_in_bytes)?;
        limits.push(podsandbox::container::Resources {
            cpu_quota: (quota > 0).then_some(res.cpu_quota),
            cpu_period: (quota > 0).then_some(period),
            memory_limit_bytes: (memory > 0).then_some(res.memory_limit_in_bytes),
            ..Default::default()
        });
    }
    let floor = hypervisor::VmSize {
        vcpus: hv.default_vcpus,
        memory_mib: hv.default_memory_mib,
    };
    let size =
        podsandbox::sandbox_resize::needed_size(floor, &limits, hv).map_err(|e| match e {
            SizeError::Cpu(m) => CriError::invalid("config.linux.resources.cpu_quota", m),
            SizeError::Memory(m) => {
                CriError::invalid("config.linux.resources.memory_limit_in_bytes", m)
            }
        })?;
    let asks_cpu = limits.iter().any(|l| l.cpu_quota.is_some());
    let asks_memory = limits.iter().any(|l| l.memory_limit_bytes.is_some());
    Ok(PodSize {
        vcpus: asks_cpu.then_some(size.vcpus),
        memory_mib: asks_memory.then_some(size.memory_mib),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn res(quota: i64, period: i64, memory: i64) -> cri::LinuxContainerResources {
        cri::LinuxContainerResources {
            cpu_quota: quota,
            cpu_period: period,
            memory_limit_in_bytes: memory,
            ..Default::default()
        }
    }

    fn linux(
        resources: Option<cri::LinuxContainerResources>,
        overhead: Option<cri::LinuxContainerResources>,
    ) -> cri::LinuxPodSandboxConfig {
        cri::LinuxPodSandboxConfig {
            resources,
            overhead,
            ..Default::default()
        }
    }

    fn hv() -> hypervisor::HypervisorConfig {
        hypervisor::HypervisorConfig {
            max_vcpus: 8,
            max_memory_mib: 4096,
            ..Default::default()
        }
    }

    #[test]
    fn limits_and_overhead_size_the_vm() {
        // 1 GiB and 2 CPUs for the containers, 100m and 64 MiB of overhead.
        let l = linux(
            Some(res(200_000, 100_000, 1 << 30)),
            Some(res(10_000, 100_000, 64 << 20)),
        );
        let s = pod_size(Some(&l), &hv()).unwrap();
        assert_eq!(s.vcpus, Some(3), "ceil(2.1)");
        assert_eq!(s.memory_mib, Some(1024 + 64 + 128));
        // Small limits never go below the defaults.
        let small = linux(Some(res(10_000, 100_000, 16 << 20)), None);
        let s = pod_size(Some(&small), &hv()).unwrap();
        assert_eq!((s.vcpus, s.memory_mib), (Some(1), Some(256)));
        // No limits: the defaults.
        assert_eq!(pod_size(None, &hv()).unwrap(), PodSize::default());
        assert_eq!(
            pod_size(Some(&linux(None, None)), &hv()).unwrap(),
            PodSize::default()
        );
    }

    #[test]
    fn beyond_the_maximum_or_malformed_is_refused_naming_the_field() {
        let cases = [
            (
                linux(Some(res(900_000, 100_000, 0)), None),
                "config.linux.resources.cpu_quota",
            ),
            (
                linux(Some(res(0, 0, 4 << 30)), None),
                "config.linux.resources.memory_limit_in_bytes",
            ),
            (
                linux(Some(res(-1, 100_000, 0)), None),
                "config.linux.resources.cpu_quota",
            ),
            (
                linux(None, Some(res(50_000, 0, 0))),
                "config.linux.overhead.cpu_period",
            ),
            (
                linux(None, Some(res(0, 0, -5))),
                "config.linux.overhead.memory_limit_in_bytes",
            ),
        ];
        for (l, field) in cases {
            let err = pod_size(Some(&l), &hv()).expect_err(field);
            assert!(
                matches!(&err, CriError::InvalidArgument { field: f, .. } if f == field),
                "{field}: {err:?}"
            );
        }
    }
}
