//! Restart recovery: vcrid killed with SIGKILL and started again finds every
//! pod and container; running pods keep running, a container that exited
//! meanwhile reports its exit code, logs keep being written, exec works.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::large_futures
)]

use tests::registry as support;

use std::{collections::HashMap, time::Duration};

use k8s_cri::v1 as cri;
use tests::cri::{
    container_status as status, create_started, remove_pod, run_pod, wait_for_log, CriEnv, Runtime,
};

async fn pod(rt: &mut Runtime, env: &CriEnv, name: &str) -> (String, cri::PodSandboxConfig) {
    let config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "restart".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: env.dir.path().join("logs").join(name).display().to_string(),
        labels: HashMap::from([("test".to_string(), "restart".to_string())]),
        ..Default::default()
    };
    let id = run_pod(rt, config.clone()).await;
    (id, config)
}

async fn container(
    rt: &mut Runtime,
    pod: &(String, cri::PodSandboxConfig),
    image: &str,
    name: &str,
    script: &str,
) -> String {
    let config = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        log_path: format!("{name}.log"),
        ..Default::default()
    };
    create_started(rt, &pod.0, &pod.1, config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_pods_survive_a_sigkill_of_vcrid() {
    tests::become_subreaper();
    let registry = support::Registry::start().await;
    let image = tests::cri::push_busybox(&registry, "1").await;

    let mut env = CriEnv::new(43);
    env.start().await;
    let mut rt = env.runtime().await;
    env.pull(&image).await;
    let mut pods = Vec::new();
    let mut tickers = Vec::new();
    for name in ["r1", "r2", "r3"] {
        let p = pod(&mut rt, &env, name).await;
        std::fs::create_dir_all(&p.1.log_directory).expect("log dir");
        let t = container(
            &mut rt,
            &p,
            &image,
            "ticker",
            "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 1; done",
        )
        .await;
        tickers.push(t);
        pods.push(p);
    }
    // Exits with 7 while vcrid is down.
    let quitter = container(&mut rt, &pods[0], &image, "quitter", "sleep 6; exit 7").await;
    let ticker_log = std::path::Path::new(&pods[1].1.log_directory).join("ticker.log");
    wait_for_log(&ticker_log, "tick-1").await;

    env.kill9();
    tokio::time::sleep(Duration::from_secs(10)).await;
    env.start().await;
    let mut rt = env.runtime().await;

    let listed = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items;
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(
        listed
            .iter()
            .all(|p| p.state == cri::PodSandboxState::SandboxReady as i32),
        "{listed:?}"
    );
    for t in &tickers {
        let s = status(&mut rt, t).await;
        assert_eq!(
            s.state,
            cri::ContainerState::ContainerRunning as i32,
            "{s:?}"
        );
        let out = rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: t.clone(),
                cmd: vec!["echo".into(), "still-here".into()],
                timeout: 60,
            })
            .await
            .expect("ExecSync after restart")
            .into_inner();
        assert_eq!(out.stdout, b"still-here\n");
    }
    // The exit that happened while vcrid was down is found.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let q = loop {
        let q = status(&mut rt, &quitter).await;
        if q.state == cri::ContainerState::ContainerExited as i32
            || std::time::Instant::now() > deadline
        {
            break q;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        q.state,
        cri::ContainerState::ContainerExited as i32,
        "{q:?}"
    );
    assert_eq!(q.exit_code, 7);
    // Logs keep flowing into the same file after the restart.
    let before = std::fs::read_to_string(&ticker_log).expect("log");
    let last = before.lines().count();
    wait_for_log(&ticker_log, &format!("tick-{}", last + 2)).await;

    for (id, _) in &pods {
        remove_pod(&mut rt, id).await;
    }
    env.assert_no_pods_left();
}
