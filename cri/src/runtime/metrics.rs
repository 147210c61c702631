//! ListMetricDescriptors and ListPodSandboxMetrics: the stats calls' numbers
//! as named metrics (kubelet's `PodAndContainerStatsFromCRI` serves them on
//! `/metrics/cadvisor`). Containers: their guest cgroup. Pods: the VM as the
//! host sees it (QEMU and its helpers), so the VM's overhead is a metric of
//! its own. Every value is an integer in the unit its name says.

use k8s_cri::v1 as cri;

use crate::{runtime::stats::vm_usage, server::Cri, store::ContainerMeta};

/// Label keys of container metrics (sorted, as the CRI asks).
const CONTAINER_LABELS: &[&str] = &["container", "id", "image", "namespace", "pod"];
/// Label keys of pod metrics.
const POD_LABELS: &[&str] = &["id", "namespace", "pod"];

/// (name, help, counter?, container metric?)
const METRICS: &[(&str, &str, bool, bool)] = &[
    (
        "container_cpu_usage_nanoseconds_total",
        "CPU time the container's cgroup in the pod VM used, in nanoseconds.",
        true,
        true,
    ),
    (
        "container_memory_usage_bytes",
        "Memory the container's cgroup in the pod VM uses, page cache included.",
        false,
        true,
    ),
    (
        "container_memory_working_set_bytes",
        "The container's memory usage less reclaimable file cache.",
        false,
        true,
    ),
    (
        "container_memory_rss",
        "Anonymous memory of the container's cgroup.",
        false,
        true,
    ),
    (
        "pod_vm_cpu_usage_nanoseconds_total",
        "CPU time the pod's VM (QEMU and its helpers) used on the host, in nanoseconds.",
        true,
        false,
    ),
    (
        "pod_vm_memory_rss_bytes",
        "Resident memory of the pod's VM (QEMU and its helpers) on the host.",
        false,
        false,
    ),
];

pub(crate) fn descriptors() -> cri::ListMetricDescriptorsResponse {
    cri::ListMetricDescriptorsResponse {
        descriptors: METRICS
            .iter()
            .map(|(name, help, _, container)| cri::MetricDescriptor {
                name: name.to_string(),
                help: help.to_string(),
                label_keys: (if *container {
                    CONTAINER_LABELS
                } else {
                    POD_LABELS
                })
                .iter()
                .map(|k| k.to_string())
                .collect(),
            })
            .collect(),
    }
}

fn metric(name: &str, labels: &[String], value: u64) -> cri::Metric {
    let counter = METRICS
        .iter()
        .find(|(n, ..)| *n == name)
        .is_some_and(|(_, _, counter, _)| *counter);
    cri::Metric {
        name: name.into(),
        // Gathered live.
        timestamp: 0,
        metric_type: if counter {
            cri::MetricType::Counter
        } else {
            cri::MetricType::Gauge
        } as i32,
        label_values: labels.to_vec(),
        value: Some(cri::UInt64Value { value }),
    }
}

impl Cri {
    pub(crate) async fn pod_sandbox_metrics(&self) -> cri::ListPodSandboxMetricsResponse {
        let mut pod_metrics = Vec::new();
        for pod in self.inner.store.pods() {
            if pod.stopped {
                continue;
            }
            let Ok(status) = self.inner.runtime.status_sandbox(&pod.id).await else {
                continue;
            };
            let md = pod.config.metadata.clone().unwrap_or_default();
            let pod_labels = vec![pod.id.clone(), md.namespace.clone(), md.name.clone()];
            let (cpu_ns, rss) = vm_usage(&status);
            let mut container_metrics = Vec::new();
            let containers: Vec<ContainerMeta> = self
                .inner
                .store
                .containers()
                .into_iter()
                .filter(|c| c.sandbox_id == pod.id)
                .collect();
            for c in containers {
                // Only running containers have a cgroup to read.
                let Ok(s) = self.stats_of(&c).await else {
                    continue;
                };
                let labels = vec![
                    c.config
                        .metadata
                        .as_ref()
                        .map(|m| m.name.clone())
                        .unwrap_or_default(),
                    c.id.clone(),
                    c.image_ref.clone(),
                    md.namespace.clone(),
                    md.name.clone(),
                ];
                let value = |u: Option<cri::UInt64Value>| u.map(|v| v.value).unwrap_or(0);
                let cpu = s.cpu.and_then(|c| c.usage_core_nano_seconds);
                let mem = s.memory.unwrap_or_default();
                container_metrics.push(cri::ContainerMetrics {
                    container_id: c.id.clone(),
                    metrics: vec![
                        metric("container_cpu_usage_nanoseconds_total", &labels, value(cpu)),
                        metric(
                            "container_memory_usage_bytes",
                            &labels,
                            value(mem.usage_bytes),
                        ),
                        metric(
                            "container_memory_working_set_bytes",
                            &labels,
                            value(mem.working_set_bytes),
                        ),
                        metric("container_memory_rss", &labels, value(mem.rss_bytes)),
                    ],
                });
            }
            pod_metrics.push(cri::PodSandboxMetrics {
                pod_sandbox_id: pod.id.clone(),
                metrics: vec![
                    metric("pod_vm_cpu_usage_nanoseconds_total", &pod_labels, cpu_ns),
                    metric("pod_vm_memory_rss_bytes", &pod_labels, rss),
                ],
                container_metrics,
            });
        }
        cri::ListPodSandboxMetricsResponse { pod_metrics }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_have_sorted_keys_and_match_metric_types() {
        let d = descriptors().descriptors;
        assert_eq!(d.len(), METRICS.len());
        for desc in &d {
            let mut sorted = desc.label_keys.clone();
            sorted.sort();
            assert_eq!(sorted, desc.label_keys, "{}", desc.name);
            assert!(!desc.help.is_empty());
        }
        let m = metric("pod_vm_memory_rss_bytes", &["a".into()], 7);
        assert_eq!(m.metric_type, cri::MetricType::Gauge as i32);
        let m = metric("container_cpu_usage_nanoseconds_total", &[], 1);
        assert_eq!(m.metric_type, cri::MetricType::Counter as i32);
    }
}
