//! ContainerStats, ListContainerStats, PodSandboxStats, ListPodSandboxStats.
//!
//! A container's numbers come from its cgroup in the guest. A pod's are the
//! VM's as the host sees it — CPU time and resident memory of QEMU and its
//! helpers (vsock device, virtiofsd) — so the VM's own overhead (guest
//! kernel, agent, device emulation) is counted in the pod, never hidden.

use k8s_cri::v1 as cri;

use crate::{
    error::{CriError, Result},
    runtime::sandbox_status::labels_match,
    server::Cri,
    store::ContainerMeta,
};

fn u64v(value: u64) -> Option<cri::UInt64Value> {
    Some(cri::UInt64Value { value })
}

impl Cri {
    pub(crate) async fn stats_of(&self, c: &ContainerMeta) -> Result<cri::ContainerStats> {
        let s = self
            .inner
            .runtime
            .stats_container(&c.sandbox_id, &c.id)
            .await?;
        let now = podsandbox::container::now_ns();
        Ok(cri::ContainerStats {
            attributes: Some(cri::ContainerAttributes {
                id: c.id.clone(),
                metadata: c.config.metadata.clone(),
                labels: c.config.labels.clone(),
                annotations: c.config.annotations.clone(),
            }),
            cpu: Some(cri::CpuUsage {
                timestamp: now,
                usage_core_nano_seconds: u64v(s.cpu_usage_usec.saturating_mul(1000)),
                usage_nano_cores: None,
            }),
            memory: Some(cri::MemoryUsage {
                timestamp: now,
                // cgroup v2 working set: usage minus the reclaimable file cache.
                working_set_bytes: u64v(s.memory_usage_bytes.saturating_sub(s.memory_file_bytes)),
                available_bytes: (s.memory_limit_bytes > 0)
                    .then(|| s.memory_limit_bytes.saturating_sub(s.memory_usage_bytes))
                    .and_then(u64v),
                usage_bytes: u64v(s.memory_usage_bytes),
                rss_bytes: u64v(s.memory_anon_bytes),
                page_faults: None,
                major_page_faults: None,
            }),
            writable_layer: None,
            swap: None,
        })
    }

    pub(crate) async fn container_stats(
        &self,
        req: cri::ContainerStatsRequest,
    ) -> Result<cri::ContainerStatsResponse> {
        let c = self.container_meta(&req.container_id)?;
        Ok(cri::ContainerStatsResponse {
            stats: Some(self.stats_of(&c).await?),
        })
    }

    pub(crate) async fn list_container_stats(
        &self,
        req: cri::ListContainerStatsRequest,
    ) -> Result<cri::ListContainerStatsResponse> {
        let filter = req.filter.unwrap_or_default();
        let mut stats = Vec::new();
        for c in self.inner.store.containers() {
            if (!filter.id.is_empty() && !c.id.starts_with(&filter.id))
                || (!filter.pod_sandbox_id.is_empty()
                    && !c.sandbox_id.starts_with(&filter.pod_sandbox_id))
                || !labels_match(&c.config.labels, &filter.label_selector)
            {
                continue;
            }
            // Only running containers have a cgroup to read.
            if let Ok(s) = self.stats_of(&c).await {
                stats.push(s);
            }
        }
        Ok(cri::ListContainerStatsResponse { stats })
    }

    async fn pod_stats_of(&self, id: &str) -> Result<cri::PodSandboxStats> {
        let meta = self.inner.store.pod(id).ok_or_else(|| CriError::NotFound {
            what: "pod sandbox",
            id: id.into(),
        })?;
        let status = self.inner.runtime.status_sandbox(id).await?;
        let now = podsandbox::container::now_ns();
        let (cpu_ns, rss) = vm_usage(&status);
        let mut containers = Vec::new();
        for c in self.inner.store.containers() {
            if c.sandbox_id == id {
                if let Ok(s) = self.stats_of(&c).await {
                    containers.push(s);
                }
            }
        }
        Ok(cri::PodSandboxStats {
            attributes: Some(cri::PodSandboxAttributes {
                id: id.into(),
                metadata: meta.config.metadata.clone(),
                labels: meta.config.labels.clone(),
                annotations: meta.config.annotations.clone(),
            }),
            linux: Some(cri::LinuxPodSandboxStats {
                cpu: Some(cri::CpuUsage {
                    timestamp: now,
                    usage_core_nano_seconds: u64v(cpu_ns),
                    usage_nano_cores: None,
                }),
                memory: Some(cri::MemoryUsage {
                    timestamp: now,
                    working_set_bytes: u64v(rss),
                    // What the VM has now (after any hot-plug) less what
                    // the host holds of it.
                    available_bytes: u64v((u64::from(status.memory_mib) << 20).saturating_sub(rss)),
                    usage_bytes: u64v(rss),
                    rss_bytes: u64v(rss),
                    page_faults: None,
                    major_page_faults: None,
                }),
                network: self.pod_network_usage(&meta, now),
                process: None,
                containers,
            }),
            windows: None,
        })
    }

    pub(crate) async fn pod_sandbox_stats(
        &self,
        req: cri::PodSandboxStatsRequest,
    ) -> Result<cri::PodSandboxStatsResponse> {
        let id = self.pod_id(&req.pod_sandbox_id)?;
        Ok(cri::PodSandboxStatsResponse {
            stats: Some(self.pod_stats_of(&id).await?),
        })
    }

    pub(crate) async fn list_pod_sandbox_stats(
        &self,
        req: cri::ListPodSandboxStatsRequest,
    ) -> Result<cri::ListPodSandboxStatsResponse> {
        let filter = req.filter.unwrap_or_default();
        let mut stats = Vec::new();
        for p in self.inner.store.pods() {
            if p.stopped
                || (!filter.id.is_empty() && !p.id.starts_with(&filter.id))
                || !labels_match(&p.config.labels, &filter.label_selector)
            {
                continue;
            }
            if let Ok(s) = self.pod_stats_of(&p.id).await {
                stats.push(s);
            }
        }
        Ok(cri::ListPodSandboxStatsResponse { stats })
    }
}

impl Cri {
    /// The pod's traffic: the counters of its CNI interfaces (the veths the
    /// VM's taps are redirected through); `None` for a pod without network.
    fn pod_network_usage(
        &self,
        meta: &crate::store::PodMeta,
        now: i64,
    ) -> Option<cri::NetworkUsage> {
        let status = meta.network.as_ref()?;
        let ns = cni::network::pod_netns(status).ok()?;
        let mut interfaces: Vec<cri::NetworkInterfaceUsage> = status
            .interfaces
            .iter()
            .filter_map(|i| {
                let s = cni::link_stats(&ns, &i.guest_name).ok()?;
                Some(cri::NetworkInterfaceUsage {
                    name: i.guest_name.clone(),
                    rx_bytes: u64v(s.rx_bytes),
                    rx_errors: u64v(s.rx_errors),
                    tx_bytes: u64v(s.tx_bytes),
                    tx_errors: u64v(s.tx_errors),
                })
            })
            .collect();
        // The first (eth0) is the default; `interfaces` holds the others.
        let default_interface = (!interfaces.is_empty()).then(|| interfaces.remove(0));
        Some(cri::NetworkUsage {
            timestamp: now,
            default_interface,
            interfaces,
        })
    }
}

/// CPU time (ns) and resident memory (bytes) of the pod's VM on the host:
/// QEMU and its helpers together.
pub(crate) fn vm_usage(status: &podsandbox::SandboxStatus) -> (u64, u64) {
    status
        .pid
        .iter()
        .chain(status.helper_pids.iter())
        .map(|pid| host_usage(*pid))
        .fold((0, 0), |(c, r), (c2, r2)| (c + c2, r + r2))
}

/// CPU time (ns) and resident memory (bytes) of a host process.
fn host_usage(pid: i32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(100);
    let cpu = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .map(|rest| {
            let f: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 (11 and 12 after the name).
            let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            (t(11) + t(12)) * 1_000_000_000 / ticks
        })
        .unwrap_or(0);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .unwrap_or(0);
    (cpu, rss)
}
