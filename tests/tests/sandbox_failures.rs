//! Bad input and failures half-way, each with a clear error and nothing
//! left behind.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::PathBuf;

use podsandbox::{ErrorKind, Runtime, SandboxConfig, SandboxState};
use tests::TestEnv;

fn cfg(id: &str) -> SandboxConfig {
    SandboxConfig {
        id: id.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn invalid_requests_boot_nothing() {
    let env = TestEnv::new();
    let rt = Runtime::new(env.config.clone()).expect("runtime");

    let err = rt
        .create_sandbox(SandboxConfig {
            memory_mib: Some(0),
            ..cfg("m0")
        })
        .await
        .expect_err("memory 0");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(
        err.chain()
            .contains("memory must be at least 64 MiB, got 0 MiB"),
        "{}",
        err.chain()
    );
    env.assert_nothing_left("m0");

    let max = env.config.hypervisor.max_vcpus();
    let err = rt
        .create_sandbox(SandboxConfig {
            vcpus: Some(max + 1),
            ..cfg("cpu")
        })
        .await
        .expect_err("vcpus");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(
        err.chain()
            .contains(&format!("vcpus must be between 1 and {max}")),
        "{}",
        err.chain()
    );
    env.assert_nothing_left("cpu");

    let err = rt.create_sandbox(cfg("bad/id")).await.expect_err("id");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);

    let mut config = env.config.clone();
    config.hypervisor.kernel = PathBuf::from("/nonexistent/vmlinux");
    let rt2 = Runtime::new(config).expect("runtime");
    let err = rt2
        .create_sandbox(cfg("nok"))
        .await
        .expect_err("missing kernel");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(
        err.chain()
            .contains("guest kernel /nonexistent/vmlinux does not exist"),
        "{}",
        err.chain()
    );
    env.assert_nothing_left("nok");

    for call in ["start", "stop", "status", "delete"] {
        let err = match call {
            "start" => rt.start_sandbox("ghost").await.map(drop),
            "stop" => rt.stop_sandbox("ghost").await.map(drop),
            "status" => rt.status_sandbox("ghost").await.map(drop),
            _ => rt.delete_sandbox("ghost").await,
        }
        .expect_err(call);
        assert_eq!(err.kind(), ErrorKind::NotFound, "{call}");
        assert_eq!(err.to_string(), "sandbox ghost not found");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_id_is_refused_without_harming_its_owner() {
    let env = TestEnv::new();
    let rt = Runtime::new(env.config.clone()).expect("runtime");
    let first = rt.create_sandbox(cfg("dup")).await.expect("create");
    let err = rt.create_sandbox(cfg("dup")).await.expect_err("duplicate");
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    assert_eq!(err.to_string(), "sandbox dup already exists");
    let status = rt.status_sandbox("dup").await.expect("status");
    assert_eq!(status.state, SandboxState::Ready);
    assert_eq!(status.pid, first.pid, "the original VM is untouched");
    assert!(status.guest.is_some());
    rt.delete_sandbox("dup")
        .await
        .expect("delete a ready sandbox");
    env.assert_nothing_left("dup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_dying_during_boot_reports_the_console_tail() {
    let env = TestEnv::new();
    // Not an initramfs: the kernel finds no root and panics; panic=1 with
    // -no-reboot makes QEMU exit.
    let junk = env.dir.path().join("junk.cpio");
    std::fs::write(&junk, vec![0x5au8; 4096]).expect("write");
    let mut config = env.config.clone();
    config.hypervisor.initrd = junk;
    let rt = Runtime::new(config).expect("runtime");
    let err = rt
        .create_sandbox(cfg("panic"))
        .await
        .expect_err("boot must fail");
    let text = err.chain();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{text}");
    assert!(text.contains("exited before its agent answered"), "{text}");
    assert!(
        text.contains("Kernel panic"),
        "the console tail is quoted: {text}"
    );
    env.assert_nothing_left("panic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_never_answers_times_out_and_the_vm_is_cleaned_up() {
    let env = TestEnv::new();
    let mut config = env.config.clone();
    config.hypervisor.initrd = tests::busybox_initrd(
        env.dir.path(),
        "echo no agent here; exec /bin/busybox sleep 3600",
    );
    // Long enough for the busybox init to print under a loaded TCG host
    // (4 s was not, once: the tail was empty).
    config.agent.dial_timeout_ms = 15000;
    let rt = Runtime::new(config).expect("runtime");
    let err = rt.create_sandbox(cfg("mute")).await.expect_err("no agent");
    let text = err.chain();
    assert_eq!(err.kind(), ErrorKind::DeadlineExceeded, "{text}");
    assert!(
        text.contains("the agent did not answer within 15s"),
        "{text}"
    );
    assert!(
        text.contains("no agent here"),
        "the console tail is quoted: {text}"
    );
    env.assert_nothing_left("mute");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_vmm_is_reported_and_delete_cleans_up() {
    let env = TestEnv::new();
    let rt = Runtime::new(env.config.clone()).expect("runtime");
    rt.create_sandbox(cfg("kill9")).await.expect("create");
    let pid = rt
        .start_sandbox("kill9")
        .await
        .expect("start")
        .pid
        .expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");
    // Wait for the kernel to tear QEMU down (the signal is asynchronous).
    let mut status = rt.status_sandbox("kill9").await.expect("status");
    for _ in 0..200 {
        if status.state == SandboxState::Stopped {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        status = rt.status_sandbox("kill9").await.expect("status");
    }
    assert_eq!(status.state, SandboxState::Stopped);
    let reason = status.reason.expect("a reason");
    assert!(
        reason.contains(&format!("QEMU (pid {pid}) exited")),
        "{reason}"
    );
    assert!(status.pid.is_none());
    // The monitor also stopped the helper.
    assert!(
        env.processes().is_empty(),
        "helpers left: {:?}",
        env.processes()
    );
    let err = rt.pause_sandbox("kill9").await.expect_err("dead");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    rt.delete_sandbox("kill9").await.expect("delete");
    env.assert_nothing_left("kill9");
}
