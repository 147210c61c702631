//! A real VM through the podsandbox library: boot, guest details from the
//! agent, pause, resume, stop, delete — and nothing left behind.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use podsandbox::{ErrorKind, Runtime, SandboxConfig, SandboxState};
use tests::TestEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_is_a_vm_from_create_to_delete() {
    let env = TestEnv::new();
    let rt = Runtime::new(env.config.clone()).expect("runtime");
    let cfg = SandboxConfig {
        id: "life".into(),
        vcpus: Some(1),
        memory_mib: Some(256),
        ..Default::default()
    };

    let created = rt.create_sandbox(cfg).await.expect("create");
    assert_eq!(created.state, SandboxState::Ready);
    assert_eq!(created.hypervisor, "qemu");
    let pid = created.pid.expect("QEMU pid");
    assert!(hypervisor::ProcessRef::of(pid).is_some(), "QEMU {pid} runs");
    assert!(!env.processes().is_empty());

    // The agent answers with the guest's own view.
    let status = rt.status_sandbox("life").await.expect("status");
    let guest = status.guest.expect("guest details from the agent");
    let release =
        std::fs::read_to_string(tests::guest_dir().join("kernel-release")).expect("kernel-release");
    assert_eq!(guest.kernel_release, release.trim());
    assert_eq!(guest.online_cpus, 1);
    assert!(
        guest.mem_total_kib > 128 * 1024 && guest.mem_total_kib <= 256 * 1024,
        "{guest:?}"
    );
    assert_eq!(guest.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(
        guest.agent_ready_ms > 0 && guest.agent_ready_ms <= guest.uptime_ms,
        "{guest:?}"
    );

    assert_eq!(
        rt.start_sandbox("life").await.expect("start").state,
        SandboxState::Running
    );
    assert_eq!(
        rt.pause_sandbox("life").await.expect("pause").state,
        SandboxState::Paused
    );
    // QEMU itself says paused, and a paused guest gives no details.
    let paused = rt.status_sandbox("life").await.expect("status");
    assert_eq!(paused.state, SandboxState::Paused);
    assert!(paused.guest.is_none());
    assert_eq!(
        rt.resume_sandbox("life").await.expect("resume").state,
        SandboxState::Running
    );
    assert!(
        rt.status_sandbox("life")
            .await
            .expect("status")
            .guest
            .is_some(),
        "agent answers after resume"
    );

    let err = rt
        .delete_sandbox("life")
        .await
        .expect_err("delete while running");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);

    let stopped = rt.stop_sandbox("life").await.expect("stop");
    assert_eq!(stopped.state, SandboxState::Stopped);
    assert!(
        stopped.reason.is_none(),
        "an asked-for stop has no failure reason"
    );
    assert!(
        env.processes().is_empty(),
        "stop leaves no process: {:?}",
        env.processes()
    );
    rt.delete_sandbox("life").await.expect("delete");
    assert!(rt.list_sandboxes().await.expect("list").is_empty());
    env.assert_nothing_left("life");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_runtime_finds_a_running_sandbox_from_persisted_state() {
    let env = TestEnv::new();
    {
        let rt = Runtime::new(env.config.clone()).expect("runtime");
        rt.create_sandbox(SandboxConfig {
            id: "persist".into(),
            ..Default::default()
        })
        .await
        .expect("create");
        rt.start_sandbox("persist").await.expect("start");
    }
    // Everything in memory is gone; the state on disk and the VM remain.
    let rt = Runtime::new(env.config.clone()).expect("runtime");
    let sandbox = rt.fetch_sandbox("persist").await.expect("fetch");
    let status = sandbox.status().await.expect("status");
    assert_eq!(status.state, SandboxState::Running);
    assert!(
        status.guest.is_some(),
        "the agent is reachable from the new runtime"
    );
    sandbox.pause().await.expect("pause");
    sandbox.resume().await.expect("resume");
    sandbox.stop().await.expect("stop");
    sandbox.delete().await.expect("delete");
    env.assert_nothing_left("persist");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_microvm_sandbox_boots_and_stops() {
    let env = TestEnv::new();
    let mut config = env.config.clone();
    config.hypervisor.machine = hypervisor::MachineType::Microvm;
    let rt = Runtime::new(config).expect("runtime");
    let created = rt
        .create_sandbox(SandboxConfig {
            id: "micro".into(),
            ..Default::default()
        })
        .await
        .expect("create");
    assert_eq!(created.machine, "microvm");
    let status = rt.status_sandbox("micro").await.expect("status");
    assert!(
        status.guest.is_some(),
        "the agent answers over virtio-mmio vsock"
    );
    rt.stop_sandbox("micro").await.expect("stop");
    rt.delete_sandbox("micro").await.expect("delete");
    env.assert_nothing_left("micro");
}
