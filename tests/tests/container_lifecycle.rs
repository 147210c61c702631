//! Containers in a real pod VM: processes from OCI specs, run by the agent
//! with libcontainer, their output in CRI log files on the host.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::Path;

use podsandbox::{
    container::{ContainerConfig, ContainerState},
    ErrorKind, Runtime, SandboxConfig,
};
use tests::TestEnv;

fn log_records(path: &Path) -> Vec<(String, String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut p = l.splitn(4, ' ');
            let ts = p.next().unwrap_or("");
            assert!(
                ts.ends_with('Z') && ts.contains('T'),
                "timestamp {ts:?} in {l:?}"
            );
            (
                p.next().unwrap_or("").to_string(),
                p.next().unwrap_or("").to_string(),
                p.next().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_run_exit_log_and_take_signals() {
    // A wedged agent call must fail the test, not hang CI.
    tokio::time::timeout(std::time::Duration::from_secs(600), scenario())
        .await
        .expect("the container scenario did not finish within 10 minutes");
}

async fn scenario() {
    let env = TestEnv::new();
    let rt = Runtime::new(env.config.clone()).expect("runtime");
    rt.create_sandbox(SandboxConfig {
        id: "pod".into(),
        memory_mib: Some(512),
        ..Default::default()
    })
    .await
    .expect("create sandbox");
    rt.start_sandbox("pod").await.expect("start sandbox");
    let rootfs = tests::busybox_rootfs(env.dir.path());
    let container = |id: &str, args: &[&str]| ContainerConfig {
        id: id.into(),
        rootfs: podsandbox::container::Rootfs::Dir(rootfs.clone()),
        args: args.iter().map(|a| a.to_string()).collect(),
        log_path: Some(env.dir.path().join(format!("{id}.log"))),
        ..Default::default()
    };

    // echo hello → a CRI log line, exit 0.
    let created = match rt
        .create_container("pod", container("hello", &["/bin/echo", "hello"]))
        .await
    {
        Ok(c) => c,
        Err(err) => panic!(
            "create: {}\nguest console:\n{}",
            err.chain(),
            std::fs::read_to_string(env.run_dir("pod").join("console.log")).unwrap_or_default()
        ),
    };
    assert_eq!(created.state, ContainerState::Created);
    assert_eq!(
        rt.start_container("pod", "hello")
            .await
            .expect("start")
            .state,
        ContainerState::Running
    );
    assert_eq!(rt.wait_container("pod", "hello").await.expect("wait"), 0);
    assert_eq!(
        log_records(&env.dir.path().join("hello.log")),
        [("stdout".into(), "F".into(), "hello".into())]
    );
    let status = rt.container_status("pod", "hello").await.expect("status");
    assert_eq!(
        (status.state, status.exit_code),
        (ContainerState::Stopped, Some(0))
    );

    // An exit code passes through; stderr is its own stream; output just
    // before exit is not lost.
    rt.create_container(
        "pod",
        container(
            "three",
            &["/bin/sh", "-c", "echo oops >&2; printf tail; exit 3"],
        ),
    )
    .await
    .expect("create");
    rt.start_container("pod", "three").await.expect("start");
    assert_eq!(rt.wait_container("pod", "three").await.expect("wait"), 3);
    let records = log_records(&env.dir.path().join("three.log"));
    assert!(
        records.contains(&("stderr".into(), "F".into(), "oops".into())),
        "{records:?}"
    );
    assert!(
        records.contains(&("stdout".into(), "F".into(), "tail".into())),
        "{records:?}"
    );

    // A signal reaches the process: TERM to a shell that handles it.
    rt.create_container(
        "pod",
        container(
            "term",
            &[
                "/bin/sh",
                "-c",
                "trap 'exit 143' TERM; echo ready; while :; do sleep 1; done",
            ],
        ),
    )
    .await
    .expect("create");
    rt.start_container("pod", "term").await.expect("start");
    for _ in 0..200 {
        if !log_records(&env.dir.path().join("term.log")).is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    rt.kill_container("pod", "term", 15, false)
        .await
        .expect("kill TERM");
    assert_eq!(rt.wait_container("pod", "term").await.expect("wait"), 143);

    // SIGKILL ends anything: 128 + 9.
    rt.create_container("pod", container("sleeper", &["/bin/sleep", "1000"]))
        .await
        .expect("create");
    rt.start_container("pod", "sleeper").await.expect("start");

    // Exec while the main process runs: output, exit codes, a timeout.
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let ls = rt
        .exec_sync("pod", "sleeper", args(&["/bin/ls", "/"]), None)
        .await
        .expect("exec ls");
    assert_eq!(ls.exit_code, 0);
    let listing = String::from_utf8_lossy(&ls.stdout);
    assert!(
        listing.lines().any(|l| l == "bin") && listing.lines().any(|l| l == "proc"),
        "{listing}"
    );
    let five = rt
        .exec_sync(
            "pod",
            "sleeper",
            args(&["/bin/sh", "-c", "echo err >&2; exit 5"]),
            None,
        )
        .await
        .expect("exec exit 5");
    assert_eq!(
        (
            five.exit_code,
            five.stderr.as_slice(),
            five.stdout.as_slice()
        ),
        (5, &b"err\n"[..], &b""[..])
    );
    let err = rt
        .exec_sync(
            "pod",
            "sleeper",
            args(&["/bin/sleep", "100"]),
            Some(std::time::Duration::from_secs(1)),
        )
        .await
        .expect_err("timeout");
    assert_eq!(err.kind(), ErrorKind::DeadlineExceeded);
    for (missing, says) in [
        (
            "/bin/no-such-command",
            "executable '/bin/no-such-command' not found in $PATH",
        ),
        (
            "no-such-command",
            "executable 'no-such-command' not found in $PATH",
        ),
    ] {
        let err = rt
            .exec_sync("pod", "sleeper", args(&[missing]), None)
            .await
            .expect_err("a missing command");
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
        assert!(err.to_string().contains(says), "{err}");
    }
    let err = rt
        .exec_sync("pod", "hello", args(&["/bin/true"]), None)
        .await
        .expect_err("stopped container");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    let err = rt
        .delete_container("pod", "sleeper")
        .await
        .expect_err("delete while running");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    rt.kill_container("pod", "sleeper", 9, true)
        .await
        .expect("kill -9");
    assert_eq!(
        rt.wait_container("pod", "sleeper").await.expect("wait"),
        137
    );

    // A seccomp profile is enforced in the guest: mkdir fails under one
    // that denies it, and works without.
    let deny_mkdir = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{ "names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1 }],
    });
    let mut confined = container("confined", &["/bin/sh", "-c", "mkdir /tmp/x"]);
    confined.seccomp = Some(serde_json::from_value(deny_mkdir).expect("an OCI profile"));
    rt.create_container("pod", confined).await.expect("create");
    rt.start_container("pod", "confined").await.expect("start");
    assert_eq!(rt.wait_container("pod", "confined").await.expect("wait"), 1);
    let records = log_records(&env.dir.path().join("confined.log"));
    assert!(
        records
            .iter()
            .any(|r| r.0 == "stderr" && r.2.contains("Operation not permitted")),
        "{records:?}"
    );
    rt.create_container("pod", container("free", &["/bin/sh", "-c", "mkdir /tmp/x"]))
        .await
        .expect("create");
    rt.start_container("pod", "free").await.expect("start");
    assert_eq!(rt.wait_container("pod", "free").await.expect("wait"), 0);

    // Isolation as the spec asks: a user, a read-only rootfs, masked paths,
    // the capabilities a container is not given.
    let mut as_user = container("user", &["/bin/id"]);
    as_user.user = Some((1000, 1000));
    rt.create_container("pod", as_user).await.expect("create");
    rt.start_container("pod", "user").await.expect("start");
    assert_eq!(rt.wait_container("pod", "user").await.expect("wait"), 0);
    let id_line = log_records(&env.dir.path().join("user.log"));
    assert!(
        id_line.iter().any(|r| r.2.starts_with("uid=1000 gid=1000")),
        "{id_line:?}"
    );
    let mut frozen = container("ro", &["/bin/sh", "-c", "echo x > /written"]);
    frozen.readonly_rootfs = true;
    rt.create_container("pod", frozen).await.expect("create");
    rt.start_container("pod", "ro").await.expect("start");
    assert_ne!(rt.wait_container("pod", "ro").await.expect("wait"), 0);
    let records = log_records(&env.dir.path().join("ro.log"));
    assert!(
        records
            .iter()
            .any(|r| r.2.contains("Read-only file system")),
        "{records:?}"
    );
    assert!(!rootfs.join("written").exists());
    rt.create_container("pod", container("probe", &["/bin/sleep", "1000"]))
        .await
        .expect("create");
    rt.start_container("pod", "probe").await.expect("start");
    let kcore = rt
        .exec_sync("pod", "probe", args(&["/bin/cat", "/proc/kcore"]), None)
        .await
        .expect("exec");
    assert_eq!(
        (kcore.exit_code, kcore.stdout.len()),
        (0, 0),
        "masked: reads empty"
    );
    let renamed = rt
        .exec_sync("pod", "probe", args(&["/bin/hostname", "other"]), None)
        .await
        .expect("exec");
    assert_ne!(
        renamed.exit_code, 0,
        "no CAP_SYS_ADMIN: sethostname is refused"
    );
    assert!(
        String::from_utf8_lossy(&renamed.stderr).contains("not permitted"),
        "{renamed:?}"
    );
    let name = rt
        .exec_sync("pod", "probe", args(&["/bin/hostname"]), None)
        .await
        .expect("exec");
    assert_eq!(name.stdout, b"pod\n", "the pod's hostname");
    rt.kill_container("pod", "probe", 9, true)
        .await
        .expect("kill");
    assert_eq!(rt.wait_container("pod", "probe").await.expect("wait"), 137);

    // Pause freezes every process of a container; resume thaws them.
    rt.create_container(
        "pod",
        container(
            "ticker",
            &["/bin/sh", "-c", "while :; do echo tick; sleep 0.1; done"],
        ),
    )
    .await
    .expect("create");
    rt.start_container("pod", "ticker").await.expect("start");
    let ticks = || log_records(&env.dir.path().join("ticker.log")).len();
    let grows_past = |n: usize| async move {
        for _ in 0..400 {
            if ticks() > n {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("the ticker's log did not grow past {n} lines in 20 s");
    };
    grows_past(2).await;
    assert_eq!(
        rt.pause_container("pod", "ticker")
            .await
            .expect("pause")
            .state,
        ContainerState::Paused
    );
    // Let output written before the freeze drain: wait for a quiet half second.
    let mut frozen_at = ticks();
    for _ in 0..40 {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let now = ticks();
        if now == frozen_at {
            break;
        }
        frozen_at = now;
    }
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!(ticks(), frozen_at, "no output while paused");
    let err = rt
        .exec_sync("pod", "ticker", args(&["/bin/true"]), None)
        .await
        .expect_err("exec while paused");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert_eq!(
        rt.resume_container("pod", "ticker")
            .await
            .expect("resume")
            .state,
        ContainerState::Running
    );
    grows_past(frozen_at).await;
    let stats = rt.stats_container("pod", "ticker").await.expect("stats");
    assert!(stats.pids_current >= 1, "{stats:?}");
    assert!(
        stats.memory_usage_bytes > 0 && stats.cpu_usage_usec > 0,
        "{stats:?}"
    );
    assert_eq!(stats.memory_limit_bytes, 0, "no limit asked: {stats:?}");
    rt.pause_container("pod", "ticker")
        .await
        .expect("pause again");
    // Stopping a paused container thaws it first; the shell dies of TERM... as
    // PID 1 of its namespace it ignores TERM, so the grace ends in KILL.
    let code = rt
        .stop_container("pod", "ticker", std::time::Duration::from_millis(500))
        .await
        .expect("stop");
    assert_eq!(code, 137);

    // Two containers of one pod share the network (127.0.0.1), not their
    // files or processes.
    let rootfs_b = tests::busybox_rootfs(&env.dir.path().join("b"));
    rt.create_container(
        "pod",
        container(
            "server",
            &["/bin/sh", "-c", "echo mine > /tmp/a-only; nc -l -p 8080"],
        ),
    )
    .await
    .expect("create");
    rt.start_container("pod", "server").await.expect("start");
    let mut client = container(
        "client",
        &[
            "/bin/sh",
            "-c",
            "for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do \
             echo hi-over-loopback | nc 127.0.0.1 8080 && break; sleep 0.5; done; ls /tmp; ps",
        ],
    );
    client.rootfs = podsandbox::container::Rootfs::Dir(rootfs_b.clone());
    rt.create_container("pod", client).await.expect("create");
    rt.start_container("pod", "client").await.expect("start");
    assert_eq!(rt.wait_container("pod", "server").await.expect("wait"), 0);
    assert_eq!(rt.wait_container("pod", "client").await.expect("wait"), 0);
    let server_log = log_records(&env.dir.path().join("server.log"));
    assert!(
        server_log.iter().any(|r| r.2 == "hi-over-loopback"),
        "{server_log:?}"
    );
    let client_log = log_records(&env.dir.path().join("client.log"));
    assert!(
        !client_log.iter().any(|r| r.2.contains("a-only")),
        "files stay apart: {client_log:?}"
    );
    assert!(
        !client_log.iter().any(|r| r.2.contains("nc -l")),
        "processes stay apart: {client_log:?}"
    );

    // Within its memory limit a container runs (the limit applies to the
    // workload, not to the runtime's set-up in the guest)...
    let mut small = container("small", &["/bin/echo", "fits"]);
    small.resources.memory_limit_bytes = Some(32 << 20);
    rt.create_container("pod", small).await.expect("create");
    rt.start_container("pod", "small").await.expect("start");
    assert_eq!(rt.wait_container("pod", "small").await.expect("wait"), 0);
    assert_eq!(
        rt.container_status("pod", "small")
            .await
            .expect("status")
            .reason,
        None
    );

    // ...beyond it the OOM killer ends it, and we say so.
    let mut hungry = container(
        "hungry",
        &[
            "/bin/dd",
            "if=/dev/zero",
            "of=/dev/null",
            "bs=64M",
            "count=1",
        ],
    );
    hungry.resources.memory_limit_bytes = Some(32 << 20);
    rt.create_container("pod", hungry).await.expect("create");
    rt.start_container("pod", "hungry").await.expect("start");
    assert_eq!(rt.wait_container("pod", "hungry").await.expect("wait"), 137);
    let status = rt.container_status("pod", "hungry").await.expect("status");
    assert_eq!(status.reason.as_deref(), Some("OOMKilled"));
    assert_eq!(
        rt.container_status("pod", "three")
            .await
            .expect("status")
            .reason,
        None
    );

    // Bad input.
    let err = rt
        .create_container("pod", container("hello", &["/bin/true"]))
        .await
        .expect_err("duplicate");
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    let err = rt
        .create_container("pod", container("noargs", &[]))
        .await
        .expect_err("no args");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    let mut missing = container("nofs", &["/bin/true"]);
    missing.rootfs = podsandbox::container::Rootfs::Dir(env.dir.path().join("no-such-rootfs"));
    assert_eq!(
        rt.create_container("pod", missing)
            .await
            .expect_err("rootfs")
            .kind(),
        ErrorKind::InvalidArgument
    );
    let err = rt
        .start_container("pod", "ghost")
        .await
        .expect_err("unknown");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let err = rt
        .start_container("pod", "hello")
        .await
        .expect_err("started twice");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);

    let all = rt.list_containers("pod").await.expect("list");
    assert_eq!(all.len(), 14, "{all:?}");
    for c in all {
        rt.delete_container("pod", &c.id)
            .await
            .expect("delete container");
    }
    assert!(rt.list_containers("pod").await.expect("list").is_empty());
    rt.stop_sandbox("pod").await.expect("stop");
    rt.delete_sandbox("pod").await.expect("delete");
    assert!(
        rootfs.join("bin/busybox").exists(),
        "the rootfs source survives"
    );
    env.assert_nothing_left("pod");
}
