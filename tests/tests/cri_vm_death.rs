//! A pod whose VM dies (kill -9 of its QEMU): its containers end with it
//! (EXITED, 255, VMExited, QEMU's last words), events say so, and the
//! containers and the pod can be stopped and removed; nothing is left.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::large_futures
)]

use tests::registry as support;

use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use tests::cri::{
    container_status as status, create_started, qemu_pid, remove_pod, run_pod, CriEnv,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_vm_takes_its_containers_with_it() {
    tests::become_subreaper();
    let registry = support::Registry::start().await;
    let image = tests::cri::push_busybox(&registry, "1").await;
    let mut env = CriEnv::new(55);
    env.start().await;
    let mut rt = env.runtime().await;
    env.pull(&image).await;
    let pod_config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "doomed".into(),
            uid: "uid-doomed".into(),
            namespace: "faults".into(),
            attempt: 0,
        }),
        log_directory: env.dir.path().join("logs").display().to_string(),
        ..Default::default()
    };
    std::fs::create_dir_all(&pod_config.log_directory).expect("log dir");
    let pod = run_pod(&mut rt, pod_config.clone()).await;
    let mut containers = Vec::new();
    for name in ["a", "b"] {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
            command: vec!["sleep".into(), "3600".into()],
            log_path: format!("{name}.log"),
            ..Default::default()
        };
        containers.push(create_started(&mut rt, &pod, &pod_config, config).await);
    }
    let mut events = rt
        .get_container_events(cri::GetEventsRequest {})
        .await
        .expect("GetContainerEvents")
        .into_inner();

    let pid = qemu_pid(&mut rt, &pod).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 QEMU");
    let killed = Instant::now();

    // The watcher records the death by itself (a generous bound: the
    // latency is printed, not asserted).
    let mut exited = Vec::new();
    for id in &containers {
        let s = loop {
            let s = status(&mut rt, id).await;
            if s.state == cri::ContainerState::ContainerExited as i32
                || killed.elapsed() > Duration::from_secs(30)
            {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(
            s.state,
            cri::ContainerState::ContainerExited as i32,
            "{s:?}"
        );
        assert_eq!(s.exit_code, 255, "{s:?}");
        assert_eq!(s.reason, "VMExited", "{s:?}");
        assert!(s.message.contains("QEMU"), "{s:?}");
        exited.push(killed.elapsed());
    }
    println!("containers EXITED {:?} after the kill", exited);
    let mut stopped = std::collections::BTreeSet::new();
    while stopped.len() < containers.len() {
        let ev = tokio::time::timeout(Duration::from_secs(30), events.message())
            .await
            .expect("events within 30 s")
            .expect("stream")
            .expect("an event");
        if ev.container_event_type == cri::ContainerEventType::ContainerStoppedEvent as i32 {
            stopped.insert(ev.container_id);
        }
    }
    let pods = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items;
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0].state, cri::PodSandboxState::SandboxNotready as i32);

    for id in &containers {
        rt.stop_container(cri::StopContainerRequest {
            container_id: id.clone(),
            timeout: 10,
        })
        .await
        .expect("StopContainer of a container whose VM died");
        rt.remove_container(cri::RemoveContainerRequest {
            container_id: id.clone(),
        })
        .await
        .expect("RemoveContainer of a container whose VM died");
    }
    remove_pod(&mut rt, &pod).await;
    env.assert_no_pods_left();
}
