//! Faults around vcrid: a VM that dies while vcrid is down, a client that
//! gives up on RunPodSandbox, a frozen guest (QMP `stop`) that must not
//! hold StopPodSandbox forever, and a corrupt sandbox record at restart.
//! After each, nothing of any pod is left.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::large_futures
)]

use tests::registry as support;

use std::{
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    time::{Duration, Instant},
};

use k8s_cri::v1 as cri;
use tests::cri::{
    container_config, container_status as status, create_started, pod_config, qemu_pid, remove_pod,
    run_pod, CriEnv, Runtime,
};

/// Every pod vcrid lists.
async fn list(rt: &mut Runtime) -> Vec<cri::PodSandbox> {
    rt.list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items
}

/// The state letter of /proc/<pid>/stat, None once the process is gone.
fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ...": the comm may hold spaces and parens.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
}

/// Gone, or a zombie nobody reaped yet.
fn dead(pid: i32) -> bool {
    matches!(proc_state(pid), None | Some('Z' | 'X'))
}

/// Waits (up to `bound`) for `pid` to be dead; asserts it is.
async fn wait_dead(pid: i32, bound: Duration, what: &str) -> Duration {
    let start = Instant::now();
    while !dead(pid) && start.elapsed() < bound {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        dead(pid),
        "{what} (pid {pid}) still runs after {bound:?}: state {:?}",
        proc_state(pid)
    );
    start.elapsed()
}

fn kill9(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");
}

/// The spare QMP socket of a QEMU (vcrid holds the first one; QEMU serves
/// one client per socket), from its command line (`-qmp unix:<path>,...`,
/// where a comma in the path is written `,,`).
fn qmp_socket(pid: i32) -> PathBuf {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).expect("QEMU's cmdline");
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let value = args
        .windows(2)
        .find(|w| w[0] == "-qmp" && w[1].contains("qmp-extra.sock"))
        .map(|w| &w[1])
        .unwrap_or_else(|| panic!("no spare -qmp in QEMU's command line: {args:?}"));
    let spec = value
        .strip_prefix("unix:")
        .unwrap_or_else(|| panic!("-qmp {value:?} is not a unix socket"));
    let mut path = String::new();
    let mut chars = spec.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                path.push(',');
                continue;
            }
            break;
        }
        path.push(c);
    }
    PathBuf::from(path)
}

/// Reads QMP lines until one is a reply (`return` or `error`); events
/// (`{"event": ...}`) on the way are skipped. Each read is bounded by the
/// socket's read timeout.
fn qmp_reply(reader: &mut impl BufRead, what: &str) -> String {
    for _ in 0..64 {
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("QMP {what}: reading: {e}"));
        assert!(n > 0, "QMP {what}: QEMU closed the connection");
        if line.contains("\"event\"") {
            continue;
        }
        return line;
    }
    panic!("QMP {what}: no reply among 64 lines");
}

/// Freezes the guest: QMP `stop`, then checks `query-status` says paused.
/// Blocking (std sockets with read timeouts).
fn qmp_stop(socket: &std::path::Path) {
    let stream = std::os::unix::net::UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .expect("write timeout");
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    let mut greeting = String::new();
    reader
        .read_line(&mut greeting)
        .expect("QMP greeting (QEMU serves one QMP client at a time)");
    assert!(greeting.contains("\"QMP\""), "greeting: {greeting:?}");
    writer
        .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .expect("write");
    let caps = qmp_reply(&mut reader, "qmp_capabilities");
    assert!(caps.contains("\"return\""), "qmp_capabilities: {caps:?}");
    writer
        .write_all(b"{\"execute\":\"stop\"}\n")
        .expect("write");
    let stop = qmp_reply(&mut reader, "stop");
    let v: serde_json::Value = serde_json::from_str(&stop).expect("json reply");
    assert_eq!(v, serde_json::json!({"return": {}}), "stop: {stop:?}");
    writer
        .write_all(b"{\"execute\":\"query-status\"}\n")
        .expect("write");
    let st = qmp_reply(&mut reader, "query-status");
    let v: serde_json::Value = serde_json::from_str(&st).expect("json reply");
    assert_eq!(v["return"]["status"], "paused", "query-status: {st:?}");
    assert_eq!(v["return"]["running"], false, "query-status: {st:?}");
    println!(
        "QMP: {}; stop: {}; {}",
        greeting.trim(),
        stop.trim(),
        st.trim()
    );
}

/// The lines of vcrid's log that hold any of `needles`.
fn log_lines(env: &CriEnv, needles: &[&str]) -> String {
    env.log()
        .lines()
        .filter(|l| needles.iter().any(|n| l.contains(n)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A vcrid (subnet `octet`) with the busybox image pulled and one pod
/// `name` running a `sleep 3600` container.
struct OnePod {
    _registry: support::Registry,
    env: CriEnv,
    rt: Runtime,
    pod: String,
    ctr: String,
    qemu: i32,
}

async fn one_pod(octet: u8, name: &str) -> OnePod {
    let registry = support::Registry::start().await;
    let image = tests::cri::push_busybox(&registry, "1").await;
    let mut env = CriEnv::new(octet);
    env.start().await;
    let mut rt = env.runtime().await;
    env.pull(&image).await;
    let sandbox = pod_config(&env, name, "faults");
    let pod = run_pod(&mut rt, sandbox.clone()).await;
    let ctr = create_started(
        &mut rt,
        &pod,
        &sandbox,
        container_config(&image, "sleeper", &["sleep", "3600"]),
    )
    .await;
    let qemu = qemu_pid(&mut rt, &pod).await;
    OnePod {
        _registry: registry,
        env,
        rt,
        pod,
        ctr,
        qemu,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_killed_while_vcrid_is_down_is_found_at_restart() {
    tests::become_subreaper();
    let t0 = Instant::now();
    let OnePod {
        _registry,
        mut env,
        rt,
        pod,
        ctr,
        qemu: pid,
    } = one_pod(53, "lonely").await;
    drop(rt);

    env.kill9();
    kill9(pid);
    let gone = wait_dead(pid, Duration::from_secs(30), "QEMU").await;
    println!("QEMU dead {gone:?} after kill -9 (vcrid down)");

    let restart = Instant::now();
    env.start().await;
    println!("vcrid listening again after {:?}", restart.elapsed());
    let mut rt = env.runtime().await;

    let s = status(&mut rt, &ctr).await;
    println!(
        "container status at restart (+{:?}): {s:?}",
        restart.elapsed()
    );
    assert_eq!(
        s.state,
        cri::ContainerState::ContainerExited as i32,
        "{s:?}\n{}",
        env.log()
    );
    assert_eq!(s.exit_code, 255, "{s:?}");
    assert_eq!(s.reason, "VMExited", "{s:?}");
    assert!(s.message.contains("QEMU"), "{s:?}");

    let pods = list(&mut rt).await;
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert_eq!(pods[0].id, pod);
    assert_eq!(
        pods[0].state,
        cri::PodSandboxState::SandboxNotready as i32,
        "{pods:?}"
    );

    rt.stop_container(cri::StopContainerRequest {
        container_id: ctr.clone(),
        timeout: 10,
    })
    .await
    .expect("StopContainer of a container whose VM died while vcrid was down");
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: ctr.clone(),
    })
    .await
    .expect("RemoveContainer of a container whose VM died while vcrid was down");
    remove_pod(&mut rt, &pod).await;
    env.assert_no_pods_left();
    println!("test took {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_gives_up_on_run_pod_sandbox_leaks_nothing() {
    tests::become_subreaper();
    let t0 = Instant::now();
    let mut env = CriEnv::new(58);
    env.start().await;
    let mut rt = env.runtime().await;
    let config = pod_config(&env, "impatient", "faults");
    std::fs::create_dir_all(&config.log_directory).expect("log dir");
    let request = cri::RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: String::new(),
    };

    let mut req = tonic::Request::new(request.clone());
    req.set_timeout(Duration::from_secs(1));
    let asked = Instant::now();
    let err = rt
        .run_pod_sandbox(req)
        .await
        .expect_err("RunPodSandbox answered within 1 s: a VM boot takes longer");
    println!(
        "first RunPodSandbox gave up after {:?}: {err:?}",
        asked.elapsed()
    );
    assert!(
        matches!(
            err.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{err:?}"
    );

    // The first call still runs in vcrid: its name is taken.
    let retry = rt
        .run_pod_sandbox(request.clone())
        .await
        .expect_err("a retry while the first call runs");
    println!("retry: {retry:?}");
    assert_eq!(retry.code(), tonic::Code::AlreadyExists, "{retry:?}");
    assert!(retry.message().contains("reserved for"), "{retry:?}");
    let holder = retry
        .message()
        .rsplit("reserved for ")
        .next()
        .expect("holder")
        .trim()
        .to_string();
    assert!(!holder.is_empty(), "{retry:?}");

    // vcrid finishes the first call by itself.
    let deadline = Instant::now() + Duration::from_secs(120);
    let named = loop {
        let named: Vec<_> = list(&mut rt)
            .await
            .into_iter()
            .filter(|p| p.metadata.as_ref().map(|m| m.name.as_str()) == Some("impatient"))
            .collect();
        if named.len() == 1 && named[0].state == cri::PodSandboxState::SandboxReady as i32 {
            break named;
        }
        assert!(
            Instant::now() < deadline,
            "no single READY pod \"impatient\" 120 s after the call: {named:?}\n{}",
            env.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "the abandoned pod READY {:?} after the first call",
        asked.elapsed()
    );
    assert_eq!(
        named[0].id, holder,
        "the retry named the pod holding the name"
    );
    let all = list(&mut rt).await;
    assert_eq!(all.len(), 1, "{all:?}");

    remove_pod(&mut rt, &holder).await;
    // The name is free again.
    let again = run_pod(&mut rt, config.clone()).await;
    assert_ne!(again, holder);
    let pods = list(&mut rt).await;
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert_eq!(pods[0].id, again);
    assert_eq!(pods[0].state, cri::PodSandboxState::SandboxReady as i32);
    remove_pod(&mut rt, &again).await;
    env.assert_no_pods_left();
    println!("test took {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_pod_sandbox_of_a_frozen_guest_returns() {
    tests::become_subreaper();
    let t0 = Instant::now();
    let OnePod {
        _registry,
        env,
        mut rt,
        pod,
        ctr,
        qemu: pid,
    } = one_pod(59, "frozen").await;
    let socket = qmp_socket(pid);
    println!("QMP socket of QEMU {pid}: {}", socket.display());

    // Frozen under a running vcrid, through the spare monitor.
    let sock = socket.clone();
    tokio::task::spawn_blocking(move || qmp_stop(&sock))
        .await
        .expect("QMP stop");
    assert!(!dead(pid), "the frozen QEMU is still there");

    let mut req = tonic::Request::new(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    });
    req.set_timeout(Duration::from_secs(120));
    let asked = Instant::now();
    let stopped = rt.stop_pod_sandbox(req).await;
    let took = asked.elapsed();
    println!("StopPodSandbox of the frozen guest took {took:?}: {stopped:?}");
    println!(
        "vcrid's log on the stop:\n{}",
        log_lines(
            &env,
            &[
                "stop",
                "shutdown",
                "did not",
                "timed out",
                "timeout",
                "kill"
            ]
        )
    );
    stopped.expect("StopPodSandbox of a frozen guest");
    let gone = wait_dead(pid, Duration::from_secs(30), "the frozen QEMU").await;
    println!("QEMU dead {gone:?} after StopPodSandbox returned");
    let s = status(&mut rt, &ctr).await;
    assert_eq!(
        s.state,
        cri::ContainerState::ContainerExited as i32,
        "{s:?}"
    );
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("RemovePodSandbox");
    env.assert_no_pods_left();
    println!("test took {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_does_not_stop_vcrid() {
    tests::become_subreaper();
    let t0 = Instant::now();
    let registry = support::Registry::start().await;
    let image = tests::cri::push_busybox(&registry, "1").await;
    let mut env = CriEnv::new(62);
    env.start().await;
    let mut rt = env.runtime().await;
    env.pull(&image).await;
    let a = run_pod(&mut rt, pod_config(&env, "a", "faults")).await;
    let b_config = pod_config(&env, "b", "faults");
    let b = run_pod(&mut rt, b_config.clone()).await;
    let b_ctr = create_started(
        &mut rt,
        &b,
        &b_config,
        container_config(&image, "sleeper", &["sleep", "3600"]),
    )
    .await;
    let a_pid = qemu_pid(&mut rt, &a).await;
    let b_pid = qemu_pid(&mut rt, &b).await;

    env.kill9();
    let a_dir = env.dir.path().join("state/sandboxes").join(&a);
    let files: Vec<_> = std::fs::read_dir(&a_dir)
        .unwrap_or_else(|e| panic!("{}: {e}", a_dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    println!("{}: {files:?}", a_dir.display());
    let record = a_dir.join("state.json");
    assert!(record.is_file(), "no {}: {files:?}", record.display());
    std::fs::write(&record, b"{ not json").expect("overwrite the record");

    let restart = Instant::now();
    env.start().await;
    println!("vcrid listening again after {:?}", restart.elapsed());
    let mut rt = env.runtime().await;
    let set_aside = log_lines(&env, &["set aside"]);
    println!("vcrid's log:\n{set_aside}");
    assert!(!set_aside.is_empty(), "no \"set aside\" in {}", env.log());
    let corrupt: Vec<_> = std::fs::read_dir(env.dir.path().join("state/corrupt"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    println!("state/corrupt: {corrupt:?}");

    let pods = list(&mut rt).await;
    println!("pods after the restart: {pods:?}");
    let state_of = |id: &str| {
        pods.iter()
            .find(|p| p.id == id)
            .map(|p| p.state)
            .unwrap_or_else(|| panic!("pod {id} is not listed: {pods:?}"))
    };
    assert_eq!(
        state_of(&b),
        cri::PodSandboxState::SandboxReady as i32,
        "{pods:?}"
    );
    assert_eq!(
        state_of(&a),
        cri::PodSandboxState::SandboxNotready as i32,
        "{pods:?}"
    );
    assert!(!dead(b_pid), "B's QEMU runs");
    let out = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: b_ctr.clone(),
            cmd: vec!["echo".into(), "ok".into()],
            timeout: 60,
        })
        .await
        .expect("ExecSync in B after the restart")
        .into_inner();
    assert_eq!(out.exit_code, 0, "{out:?}");
    assert_eq!(out.stdout, b"ok\n", "{out:?}");

    let gone = wait_dead(a_pid, Duration::from_secs(30), "A's QEMU (an orphan now)").await;
    println!(
        "A's QEMU dead {gone:?} after the restart was listening (+{:?} since the start)",
        restart.elapsed()
    );
    println!(
        "vcrid's log on orphans:\n{}",
        log_lines(&env, &["orphan", "no running sandbox owns", "recovered"])
    );

    // No StopPodSandbox first: RemovePodSandbox alone must do.
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: a.clone(),
    })
    .await
    .expect("RemovePodSandbox of A (NOTREADY, its VM record set aside)");
    remove_pod(&mut rt, &b).await;
    assert!(list(&mut rt).await.is_empty());
    env.assert_no_pods_left();
    println!("test took {:?}", t0.elapsed());
}
