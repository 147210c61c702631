//! Two vcrids side by side (own sockets, dirs, networks) that never see each
//! other's pods; log rotation through ReopenContainerLog; resources changed on
//! a running container; pod stats and metrics for every pod.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::large_futures
)]

use tests::registry as support;

use std::{path::Path, time::Duration};

use k8s_cri::v1 as cri;
use tests::cri::{remove_pod, wait_for_log, CriEnv, Runtime};

async fn pod_with_ticker(
    rt: &mut Runtime,
    env: &CriEnv,
    image: &str,
    name: &str,
) -> (String, String) {
    let log_dir = env.dir.path().join("logs").join(name);
    std::fs::create_dir_all(&log_dir).expect("log dir");
    let pod_cfg = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "two".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_dir.display().to_string(),
        ..Default::default()
    };
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_cfg.clone()),
            runtime_handler: String::new(),
        })
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id;
    let c = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: "ticker".into(),
                    attempt: 0,
                }),
                image: Some(cri::ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                command: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.3; done".into(),
                ],
                log_path: "ticker.log".into(),
                ..Default::default()
            }),
            sandbox_config: Some(pod_cfg),
        })
        .await
        .expect("CreateContainer")
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: c.clone(),
    })
    .await
    .expect("StartContainer");
    (pod, c)
}

async fn pod_ids(rt: &mut Runtime) -> Vec<String> {
    rt.list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items
        .into_iter()
        .map(|p| p.id)
        .collect()
}

fn last_tick(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit("tick-").next()?.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vcrids_rotation_resources_and_pod_stats() {
    tests::become_subreaper();
    let registry = support::Registry::start().await;
    let image = tests::cri::push_busybox(&registry, "two").await;

    let mut one = CriEnv::new(45);
    let mut two = CriEnv::new(46);
    one.start().await;
    two.start().await;
    one.pull(&image).await;
    two.pull(&image).await;
    let mut rt1 = one.runtime().await;
    let mut rt2 = two.runtime().await;
    // The same pod name in both: each instance reserves names on its own.
    let (p1, c1) = pod_with_ticker(&mut rt1, &one, &image, "same").await;
    let (p2, _c2) = pod_with_ticker(&mut rt2, &two, &image, "same").await;
    assert_eq!(pod_ids(&mut rt1).await, std::slice::from_ref(&p1));
    assert_eq!(pod_ids(&mut rt2).await, std::slice::from_ref(&p2));

    // Log rotation: the log moves away, ReopenContainerLog starts a new file.
    let log = one.dir.path().join("logs/same/ticker.log");
    wait_for_log(&log, "tick-2").await;
    let rotated = one.dir.path().join("logs/same/ticker.log.1");
    std::fs::rename(&log, &rotated).expect("rotate");
    rt1.reopen_container_log(cri::ReopenContainerLogRequest {
        container_id: c1.clone(),
    })
    .await
    .expect("ReopenContainerLog");
    let at_rotation = last_tick(&rotated);
    let fresh = wait_for_log(&log, "tick-").await;
    let first_new: u64 = fresh
        .lines()
        .filter_map(|l| l.rsplit("tick-").next()?.trim().parse().ok())
        .min()
        .expect("a tick in the new file");
    assert!(
        first_new >= at_rotation,
        "new file starts after the rotation: {first_new} < {at_rotation}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        last_tick(&rotated),
        at_rotation,
        "nothing more goes to the rotated file"
    );

    // Resources on a running container.
    rt1.update_container_resources(cri::UpdateContainerResourcesRequest {
        container_id: c1.clone(),
        linux: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 200 << 20,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .expect("UpdateContainerResources");
    let status = rt1
        .container_status(cri::ContainerStatusRequest {
            container_id: c1.clone(),
            verbose: false,
        })
        .await
        .expect("ContainerStatus")
        .into_inner()
        .status
        .expect("status");
    let limit = status
        .resources
        .and_then(|r| r.linux)
        .map(|l| l.memory_limit_in_bytes);
    assert_eq!(limit, Some(200 << 20));
    let stats = rt1
        .container_stats(cri::ContainerStatsRequest {
            container_id: c1.clone(),
        })
        .await
        .expect("ContainerStats")
        .into_inner()
        .stats
        .and_then(|s| s.memory)
        .expect("memory");
    let available = stats.available_bytes.map(|v| v.value).expect("a limit now");
    assert!(available > 0 && available < 200 << 20, "{available}");

    // Pod stats: every pod of the instance, its VM's numbers.
    let all = rt1
        .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest::default())
        .await
        .expect("ListPodSandboxStats")
        .into_inner()
        .stats;
    assert_eq!(all.len(), 1);
    assert_eq!(
        all[0].attributes.as_ref().map(|a| a.id.clone()),
        Some(p1.clone())
    );

    let listed = rt1
        .list_container_stats(cri::ListContainerStatsRequest {
            filter: Some(cri::ContainerStatsFilter {
                pod_sandbox_id: p1.clone(),
                ..Default::default()
            }),
        })
        .await
        .expect("ListContainerStats")
        .into_inner()
        .stats;
    assert_eq!(
        listed
            .iter()
            .filter_map(|s| s.attributes.as_ref().map(|a| a.id.clone()))
            .collect::<Vec<_>>(),
        std::slice::from_ref(&c1)
    );

    // The runtime-wide calls kubelet makes at start.
    let rc = rt1
        .runtime_config(cri::RuntimeConfigRequest {})
        .await
        .expect("RuntimeConfig")
        .into_inner();
    assert_eq!(
        rc.linux.map(|l| l.cgroup_driver),
        Some(cri::CgroupDriver::Cgroupfs as i32)
    );
    rt1.update_runtime_config(cri::UpdateRuntimeConfigRequest {
        runtime_config: Some(cri::RuntimeConfig {
            network_config: Some(cri::NetworkConfig {
                pod_cidr: "10.244.0.0/24".into(),
            }),
        }),
    })
    .await
    .expect("UpdateRuntimeConfig");
    let fs = one
        .images()
        .await
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .expect("ImageFsInfo")
        .into_inner();
    let images_fs = fs.image_filesystems.first().expect("the image filesystem");
    assert!(
        images_fs.used_bytes.as_ref().map(|u| u.value).unwrap_or(0) > 1 << 20,
        "the pulled busybox is counted: {images_fs:?}"
    );
    assert!(
        images_fs.fs_id.as_ref().is_some_and(|f| f
            .mountpoint
            .starts_with(&one.dir.path().display().to_string())),
        "{images_fs:?}"
    );

    // The same numbers as metrics: descriptors first, then one pod with its
    // VM's metrics and its running container's, labelled as described.
    let descriptors = rt1
        .list_metric_descriptors(cri::ListMetricDescriptorsRequest {})
        .await
        .expect("ListMetricDescriptors")
        .into_inner()
        .descriptors;
    let keys_of = |name: &str| {
        descriptors
            .iter()
            .find(|d| d.name == name)
            .map(|d| d.label_keys.len())
            .unwrap_or_else(|| panic!("no descriptor {name}"))
    };
    let metrics = rt1
        .list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {})
        .await
        .expect("ListPodSandboxMetrics")
        .into_inner()
        .pod_metrics;
    assert_eq!(metrics.len(), 1);
    assert_eq!(metrics[0].pod_sandbox_id, p1);
    let rss = metrics[0]
        .metrics
        .iter()
        .find(|m| m.name == "pod_vm_memory_rss_bytes")
        .expect("the VM's memory");
    assert_eq!(rss.label_values.len(), keys_of("pod_vm_memory_rss_bytes"));
    assert!(
        rss.value.as_ref().map(|v| v.value).unwrap_or(0) > 64 << 20,
        "a VM is more than 64 MiB: {rss:?}"
    );
    assert_eq!(metrics[0].container_metrics.len(), 1);
    assert_eq!(metrics[0].container_metrics[0].container_id, c1);
    let ws = metrics[0].container_metrics[0]
        .metrics
        .iter()
        .find(|m| m.name == "container_memory_working_set_bytes")
        .expect("working set");
    assert_eq!(
        ws.label_values.len(),
        keys_of("container_memory_working_set_bytes")
    );
    assert!(ws.label_values.contains(&"ticker".to_string()), "{ws:?}");
    assert!(
        ws.value.as_ref().map(|v| v.value).unwrap_or(0) > 0,
        "{ws:?}"
    );

    // Removing one instance's pod leaves the other's running.
    remove_pod(&mut rt1, &p1).await;
    let listed = rt2
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, cri::PodSandboxState::SandboxReady as i32);
    one.assert_no_pods_left();
    remove_pod(&mut rt2, &p2).await;
    two.assert_no_pods_left();
}
