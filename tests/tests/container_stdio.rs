//! Container processes in a real pod VM, the interactive half: stdin,
//! terminals and their size, the sandbox-wide PID namespace, host mounts,
//! limits changed on the fly, process lists, rlimits and capabilities; and a
//! container over the virtio-9p fallback.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use podsandbox::{
    container::{ContainerConfig, Mount, Resources},
    container_exec::ExecConfig,
    container_log::Stream,
    ErrorKind, ProcessIo, Runtime, SandboxConfig,
};
use tests::TestEnv;

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// Reads stdout until it contains `needle` (a terminal echoes and wraps, so
/// look for a substring); returns all read.
async fn read_until(p: &ProcessIo, needle: &str) -> String {
    let mut seen = String::new();
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while !seen.contains(needle) {
            match p.read(Stream::Stdout).await.expect("read") {
                Some(data) => seen.push_str(&String::from_utf8_lossy(&data)),
                None => break,
            }
        }
    })
    .await;
    assert!(
        found.is_ok() && seen.contains(needle),
        "no {needle:?} in the output: {seen:?}"
    );
    seen
}

/// All of a stream, to its end.
async fn read_all(p: &ProcessIo, stream: Stream) -> String {
    let mut out = Vec::new();
    while let Some(data) = p.read(stream).await.expect("read") {
        out.extend_from_slice(&data);
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn boot(rt: &Runtime, id: &str) {
    rt.create_sandbox(SandboxConfig {
        id: id.into(),
        memory_mib: Some(512),
        ..Default::default()
    })
    .await
    .expect("create sandbox");
    rt.start_sandbox(id).await.expect("start sandbox");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_terminals_namespaces_mounts_and_limits() {
    tokio::time::timeout(Duration::from_secs(600), interactive())
        .await
        .expect("the scenario did not finish within 10 minutes");
}

async fn interactive() {
    let env = TestEnv::new();
    let rt = Runtime::new(env.config.clone()).expect("runtime");
    boot(&rt, "pod").await;
    let rootfs = tests::busybox_rootfs(env.dir.path());
    let container = |id: &str, a: &[&str]| ContainerConfig {
        id: id.into(),
        rootfs: podsandbox::container::Rootfs::Dir(rootfs.clone()),
        args: args(a),
        log_path: Some(env.dir.path().join(format!("{id}.log"))),
        ..Default::default()
    };
    let create_start = |c: ContainerConfig| {
        let rt = rt.clone();
        async move {
            let id = c.id.clone();
            rt.create_container("pod", c).await.expect("create");
            rt.start_container("pod", &id).await.expect("start");
        }
    };

    // The main container: shares the sandbox PID namespace, mounts a host
    // directory read-write and another read-only.
    let shared = env.dir.path().join("data");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("data.txt"), "from the host\n").unwrap();
    let ro = env.dir.path().join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    let mut main = container("main", &["/bin/sleep", "1000"]);
    main.share_pid_namespace = true;
    main.mounts = vec![
        Mount {
            source: shared.clone(),
            destination: "/data".into(),
            readonly: false,
            propagation: Default::default(),
        },
        Mount {
            source: ro.clone(),
            destination: "/ro".into(),
            readonly: true,
            propagation: Default::default(),
        },
    ];
    main.rlimits = vec![("RLIMIT_NOFILE".into(), 512, 512)];
    main.no_new_privileges = true;
    main.cap_drop = vec!["CHOWN".into()];
    create_start(main).await;

    // stdin piped to cat comes back.
    let cat = rt
        .exec(
            "pod",
            "main",
            ExecConfig {
                args: args(&["/bin/cat"]),
                stdin: true,
                ..Default::default()
            },
        )
        .await
        .expect("exec cat");
    cat.write_stdin(b"hello through stdin\n")
        .await
        .expect("write");
    cat.close_stdin().await.expect("close");
    assert_eq!(
        read_all(&cat, Stream::Stdout).await,
        "hello through stdin\n"
    );
    assert_eq!(cat.wait().await.expect("wait"), 0);

    // A terminal: its size follows resize, and the exit status passes.
    let shell = rt
        .exec(
            "pod",
            "main",
            ExecConfig {
                args: args(&["/bin/sh"]),
                tty: true,
                stdin: true,
                ..Default::default()
            },
        )
        .await
        .expect("exec sh -t");
    assert!(shell.tty());
    shell.resize(40, 123).await.expect("resize");
    shell.write_stdin(b"stty size; tty\n").await.expect("write");
    let seen = read_until(&shell, "40 123").await;
    let seen = seen + &read_until(&shell, "/dev/pts/").await;
    shell.resize(50, 80).await.expect("resize again");
    shell.write_stdin(b"stty size\n").await.expect("write");
    read_until(&shell, "50 80").await;
    shell.write_stdin(b"exit 4\n").await.expect("write");
    assert_eq!(shell.wait().await.expect("wait"), 4, "{seen}");
    let err = cat.resize(1, 1).await.expect_err("no terminal");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("no terminal"), "{err}");

    // The init process's own stdin (the seed's IOStream).
    let mut reader = container("reader", &["/bin/sh", "-c", "read line; echo got:$line"]);
    reader.stdin = true;
    rt.create_container("pod", reader).await.expect("create");
    let io = rt.container_io("pod", "reader").await.expect("io");
    rt.start_container("pod", "reader").await.expect("start");
    io.write_stdin(b"via-init\n").await.expect("write");
    assert_eq!(rt.wait_container("pod", "reader").await.expect("wait"), 0);
    let log = std::fs::read_to_string(env.dir.path().join("reader.log")).unwrap();
    assert!(log.contains(" stdout F got:via-init"), "{log}");

    // The sandbox PID namespace: a second container that shares it sees the
    // first's process; one that does not, does not.
    let mut peer = container("peer", &["/bin/sleep", "1000"]);
    peer.share_pid_namespace = true;
    create_start(peer).await;
    let ps = rt
        .exec_sync("pod", "peer", args(&["/bin/ps"]), None)
        .await
        .expect("ps");
    let listing = String::from_utf8_lossy(&ps.stdout);
    assert_eq!(
        listing.matches("sleep 1000").count(),
        2,
        "both sleeps in one namespace: {listing}"
    );
    // Its PID 1 (the agent's namespace holder) inherits orphans and reaps
    // them: a process whose parent is gone leaves no zombie when it ends.
    let orphan = rt
        .exec_sync(
            "pod",
            "main",
            args(&[
                "/bin/sh",
                "-c",
                "(sleep 0.3 &); sleep 2; grep -l '^State:.Z' /proc/[0-9]*/status; true",
            ]),
            None,
        )
        .await
        .expect("orphan");
    assert_eq!(
        String::from_utf8_lossy(&orphan.stdout).trim(),
        "",
        "zombies in the sandbox PID namespace: {orphan:?}"
    );
    create_start(container("loner", &["/bin/sleep", "1000"])).await;
    // Not the init of its PID namespace, a plain process dies of TERM: 143.
    rt.kill_container("pod", "peer", 15, false)
        .await
        .expect("TERM");
    assert_eq!(rt.wait_container("pod", "peer").await.expect("wait"), 143);
    let ps = rt
        .exec_sync("pod", "loner", args(&["/bin/ps"]), None)
        .await
        .expect("ps");
    let listing = String::from_utf8_lossy(&ps.stdout);
    assert_eq!(listing.matches("sleep 1000").count(), 1, "{listing}");

    // Host mounts: read and written through, read-only refused.
    let sh = |cmd: &str| args(&["/bin/sh", "-c", cmd]);
    let r = rt
        .exec_sync(
            "pod",
            "main",
            sh("cat /data/data.txt; echo new > /data/new.txt"),
            None,
        )
        .await
        .expect("exec");
    assert_eq!(
        (r.exit_code, r.stdout.as_slice()),
        (0, &b"from the host\n"[..])
    );
    assert_eq!(
        std::fs::read_to_string(shared.join("new.txt")).unwrap(),
        "new\n"
    );
    let r = rt
        .exec_sync("pod", "main", sh("touch /ro/nope"), None)
        .await
        .expect("exec");
    assert_ne!(r.exit_code, 0);
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("Read-only"),
        "{r:?}"
    );
    assert!(!ro.join("nope").exists());

    // rlimits, no_new_privileges and a dropped capability.
    let r = rt
        .exec_sync(
            "pod",
            "main",
            sh("ulimit -n; grep NoNewPrivs /proc/self/status; touch /tmp/f; chown 1000 /tmp/f"),
            None,
        )
        .await
        .expect("exec");
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(out.starts_with("512\n"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert_ne!(r.exit_code, 0, "CAP_CHOWN dropped: chown refused");
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("not permitted"),
        "{r:?}"
    );

    // A seccomp profile blocking sethostname blocks it, for a container
    // whose capabilities would otherwise allow it.
    let mut admin = container("admin", &["/bin/sleep", "1000"]);
    admin.cap_add = vec!["SYS_ADMIN".into()];
    create_start(admin.clone()).await;
    let r = rt
        .exec_sync("pod", "admin", args(&["/bin/hostname", "renamed"]), None)
        .await
        .expect("exec");
    assert_eq!(r.exit_code, 0, "CAP_SYS_ADMIN added: {r:?}");
    admin.id = "admin-confined".into();
    admin.seccomp = Some(
        serde_json::from_value(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{ "names": ["sethostname"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1 }],
        }))
        .expect("an OCI profile"),
    );
    create_start(admin).await;
    let r = rt
        .exec_sync(
            "pod",
            "admin-confined",
            args(&["/bin/hostname", "renamed"]),
            None,
        )
        .await
        .expect("exec");
    assert_ne!(r.exit_code, 0, "seccomp blocks sethostname: {r:?}");

    // Limits change on the fly; the process list is the container's.
    rt.update_container(
        "pod",
        "loner",
        &Resources {
            memory_limit_bytes: Some(64 << 20),
            pids_limit: Some(20),
            cpu_quota: Some(50_000),
            cpu_period: Some(100_000),
            ..Default::default()
        },
    )
    .await
    .expect("update");
    let stats = rt.stats_container("pod", "loner").await.expect("stats");
    assert_eq!(stats.memory_limit_bytes, 64 << 20);
    let procs = rt.process_list("pod", "loner").await.expect("ps");
    assert_eq!(procs.len(), 1, "{procs:?}");
    assert_eq!(procs[0].args, ["/bin/sleep", "1000"]);
    let err = rt
        .update_container("pod", "ghost", &Resources::default())
        .await
        .expect_err("unknown container");
    assert_eq!(err.kind(), ErrorKind::NotFound);

    // Bad mounts: each a clear error, nothing left.
    for (source, why) in [
        (std::path::PathBuf::from("relative/dir"), "absolute"),
        (env.dir.path().join("missing"), "missing"),
        (env.config.state_dir.clone(), "overlaps the runtime"),
        (env.config.run_dir.join("pod"), "overlaps the runtime"),
    ] {
        let mut bad = container("bad", &["/bin/true"]);
        bad.mounts = vec![Mount {
            source: source.clone(),
            destination: "/x".into(),
            readonly: false,
            propagation: Default::default(),
        }];
        let err = rt
            .create_container("pod", bad)
            .await
            .expect_err("bad mount");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{source:?}: {err}");
        assert!(
            err.to_string().contains(why) || err.chain().contains(why) || why == "missing",
            "{source:?}: {}",
            err.chain()
        );
    }
    assert!(!env.run_dir("pod").join("shared/bad").exists());

    // A spec the guest cannot honour: refused by the guest, nothing left.
    let mut odd = container("odd", &["/bin/true"]);
    odd.rlimits = vec![("RLIMIT_BOGUS".into(), 1, 1)];
    let err = rt
        .create_container("pod", odd)
        .await
        .expect_err("bad rlimit");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{}", err.chain());
    assert!(err.chain().contains("RLIMIT_BOGUS"), "{}", err.chain());
    assert!(!env.run_dir("pod").join("shared/odd").exists());
    assert!(rt.container_status("pod", "odd").await.is_err());

    for c in rt.list_containers("pod").await.expect("list") {
        if c.state == podsandbox::container::ContainerState::Running {
            rt.stop_container("pod", &c.id, Duration::from_millis(200))
                .await
                .expect("stop");
        }
        rt.delete_container("pod", &c.id).await.expect("delete");
    }
    rt.stop_sandbox("pod").await.expect("stop");
    rt.delete_sandbox("pod").await.expect("delete");
    assert!(shared.join("data.txt").exists(), "mount sources survive");
    env.assert_nothing_left("pod");
}

/// The virtio-9p fallback carries a container's rootfs as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_runs_over_virtio_9p() {
    let mut env = TestEnv::new();
    env.config.hypervisor.shared_fs = hypervisor::SharedFs::Virtio9p;
    let rt = Runtime::new(env.config.clone()).expect("runtime");
    tokio::time::timeout(Duration::from_secs(300), async {
        boot(&rt, "p9").await;
        let rootfs = tests::busybox_rootfs(env.dir.path());
        let log = env.dir.path().join("c.log");
        rt.create_container(
            "p9",
            ContainerConfig {
                id: "c".into(),
                rootfs: podsandbox::container::Rootfs::Dir(rootfs),
                args: args(&["/bin/sh", "-c", "echo over-9p; cat /proc/mounts"]),
                log_path: Some(log.clone()),
                ..Default::default()
            },
        )
        .await
        .expect("create");
        rt.start_container("p9", "c").await.expect("start");
        assert_eq!(rt.wait_container("p9", "c").await.expect("wait"), 0);
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains(" stdout F over-9p"), "{text}");
        assert!(text.contains(" 9p "), "the rootfs is a 9p mount: {text}");
        rt.delete_container("p9", "c").await.expect("delete");
        rt.stop_sandbox("p9").await.expect("stop");
        rt.delete_sandbox("p9").await.expect("delete");
    })
    .await
    .expect("the 9p scenario did not finish within 5 minutes");
    env.assert_nothing_left("p9");
}
