//! A pod's VM is as big as kubelet says: `linux.resources` (the sum of its
//! containers' limits) plus `linux.overhead` (the RuntimeClass overhead)
//! size the VM at boot; beyond `hypervisor.max_memory_mib` the pod is
//! refused naming the field, with nothing set up.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::large_futures
)]

use k8s_cri::v1 as cri;
use tests::cri::{
    busybox_env, container_config, create_started, limits, pod_config, remove_pod, run_pod,
    BusyboxEnv,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pods_limits_size_its_vm() {
    tests::become_subreaper();
    let BusyboxEnv {
        mut env,
        registry: _registry,
        image,
        mut rt,
    } = busybox_env(68, "max_memory_mib = 2048\nmax_vcpus = 2\n", "sizing").await;

    // Beyond the maximum: refused before anything is set up.
    let mut big = pod_config(&env, "too-big", "sizing");
    big.linux = Some(cri::LinuxPodSandboxConfig {
        resources: Some(limits(1000, 4096)),
        ..Default::default()
    });
    std::fs::create_dir_all(&big.log_directory).expect("log dir");
    let err = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(big),
            runtime_handler: String::new(),
        })
        .await
        .expect_err("beyond max_memory_mib");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .starts_with("config.linux.resources.memory_limit_in_bytes"),
        "{err:?}"
    );
    env.assert_no_pods_left();

    // 1 GiB and 2 CPUs for the containers, 64 MiB of RuntimeClass overhead.
    let mut cfg = pod_config(&env, "sized", "sizing");
    cfg.linux = Some(cri::LinuxPodSandboxConfig {
        resources: Some(limits(2000, 1024)),
        overhead: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 64 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let pod = run_pod(&mut rt, cfg.clone()).await;
    let id = create_started(
        &mut rt,
        &pod,
        &cfg,
        container_config(&image, "c", &["/bin/sleep", "3600"]),
    )
    .await;
    let out = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: id,
            cmd: vec![
                "/bin/sh".into(),
                "-c".into(),
                "nproc; grep MemTotal /proc/meminfo".into(),
            ],
            timeout: 60,
        })
        .await
        .expect("ExecSync")
        .into_inner();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("guest: {text}");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("2"), "{text}");
    let total_kib: u64 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .expect("MemTotal");
    // 1024 + 64 + 128 MiB booted; the kernel keeps some for itself.
    assert!(total_kib >= 1024 * 1024, "MemTotal {total_kib} kB");
    remove_pod(&mut rt, &pod).await;
    env.assert_no_pods_left();
    env.stop();
}
