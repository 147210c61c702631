//! The warm pool (`[factory] pool = N`) end to end, through the CRI: a pod
//! takes a warm VM (hot-plugged NIC, grown to its size, its cgroup) and
//! works as a booted one does — pod IP, hostPort, exec, logs, stop and
//! remove; a warm VM that dies idle is replaced; an empty pool boots cold;
//! a vcrid restart discards the warm VMs the old one left; nothing is left.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    os::unix::process::ExitStatusExt as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use k8s_cri::v1 as cri;
use tests::cri::{
    container_config, create_started, exec_sh, factory_status, http_get, pod_config, pod_info,
    remove_pod, run_pod, start_httpd, CriEnv, Runtime,
};

/// Waits (up to 5 minutes: a warm VM boots at nice 19 on a busy host) for
/// `ready` warm VMs and, if `lost` is given, at least that many lost.
async fn until_pool(rt: &mut Runtime, ready: u64, lost: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let f = factory_status(rt).await;
        if f["ready"].as_u64() == Some(ready) && f["lost"].as_u64().unwrap_or(0) >= lost {
            return f;
        }
        assert!(Instant::now() < deadline, "the pool never got there: {f}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The run dirs of warm VMs (`run/pool-*`), claimed or not.
fn pool_dirs(env: &CriEnv) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(env.dir.path().join("run"))
        .expect("run dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("pool-"))
        })
        .collect();
    dirs.sort();
    dirs
}

/// The nice value of every thread of every process naming `dir` (field 19
/// of /proc/PID/task/TID/stat), as `(pid, tid, nice)`.
fn thread_nices(dir: &std::path::Path) -> Vec<(i32, String, String)> {
    let mut nices = Vec::new();
    for (pid, _) in tests::processes_mentioning(dir) {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let tid = task.file_name().to_string_lossy().to_string();
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
                continue;
            };
            let nice = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(16))
                .unwrap_or("?")
                .to_string();
            nices.push((pid, tid, nice));
        }
    }
    nices
}

/// Waits (up to 10 s: a SIGKILL lands asynchronously) until no process
/// names `dir`; returns those that still do.
async fn until_gone(dir: &std::path::Path) -> Vec<(i32, String)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = tests::processes_mentioning(dir);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn serving_pod(env: &CriEnv, name: &str, host_port: i32) -> cri::PodSandboxConfig {
    let mut config = pod_config(env, name, "default");
    config.port_mappings = vec![cri::PortMapping {
        protocol: cri::Protocol::Tcp as i32,
        container_port: 80,
        host_port,
        host_ip: String::new(),
    }];
    config.linux = Some(cri::LinuxPodSandboxConfig {
        cgroup_parent: env.cgroup_parent(name),
        ..Default::default()
    });
    // Bigger than a warm VM (256 MiB): the claim grows it.
    config
        .annotations
        .insert("io.virtcontainers.memory_mib".into(), "640".into());
    config
}

/// What a pod's guest says about itself: boot_id, eth0's MAC, its IP.
async fn identity(rt: &mut Runtime, container: &str) -> String {
    let (code, out) = exec_sh(
        rt,
        container,
        "cat /proc/sys/kernel/random/boot_id /sys/class/net/eth0/address; ip -4 -o addr show eth0",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_from_the_pool_serve_like_booted_ones_and_a_dead_warm_vm_is_replaced() {
    tests::become_subreaper();
    let registry = tests::registry::Registry::start().await;
    let image = tests::cri::push_busybox(&registry, "factory").await;
    let mut env = CriEnv::with_config(71, "\n[factory]\npool = 1\n");
    env.start().await;
    env.pull(&image).await;
    let mut rt = env.runtime().await;
    let f = until_pool(&mut rt, 1, 0).await;
    assert_eq!(
        (f["kind"].as_str(), f["target"].as_u64()),
        (Some("pool"), Some(1)),
        "{f}"
    );
    let warm = pool_dirs(&env);
    assert_eq!(warm.len(), 1, "{warm:?}");
    // The warm VM (QEMU, virtiofsd, vhost-device-vsock) runs at
    // refill_nice, every thread of it: niced as spawned, before QEMU made
    // its vCPU and worker threads.
    let nices = thread_nices(&warm[0]);
    assert!(
        nices.len() > 3 && nices.iter().all(|(_, _, n)| n == "19"),
        "{nices:?}"
    );

    // Pod A takes the warm VM and serves HTTP on a hostPort.
    let host_port = 18000 + i32::from(env.subnet_octet);
    let a_cfg = serving_pod(&env, "pool-a", host_port);
    let a = run_pod(&mut rt, a_cfg.clone()).await;
    let info = pod_info(&mut rt, &a).await;
    assert_eq!(info["vm"]["origin"], "pool", "{info}");
    for line in env.log().lines().filter(|l| l.contains("warm VM claimed")) {
        println!("{line}");
    }
    assert_eq!(
        info["vm"]["memory_mib"], 640,
        "grown to the pod's size: {info}"
    );
    assert_eq!(
        info["vm"]["pid"].as_i64().map(|p| p > 0),
        Some(true),
        "{info}"
    );
    let web = start_httpd(&mut rt, &a, &a_cfg, &image, "hello-from-pool").await;
    let a_ip = info["vm"]["ips"][0].as_str().expect("pod IP").to_string();
    assert!(http_get(&format!("{a_ip}:80")).contains("hello-from-pool"));
    assert!(http_get(&format!("{}:{host_port}", env.gateway())).contains("hello-from-pool"));
    // The warm VM's own NIC carries the pod: its tap moved into the pod's
    // netns, and the guest NIC took the veth's MAC.
    let netns = env.dir.path().join("run/netns").join(&a);
    let links = std::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["ip", "-o", "link"])
        .output()
        .expect("nsenter ip link");
    let links = String::from_utf8_lossy(&links.stdout).to_string();
    assert!(
        links.contains(": vcw"),
        "the held tap is in the pod's netns: {links}"
    );
    let veth_mac = links
        .lines()
        .find(|l| l.contains(": eth0@"))
        .and_then(|l| l.split("link/ether ").nth(1))
        .and_then(|m| m.split_whitespace().next())
        .unwrap_or_else(|| panic!("eth0 in {links}"))
        .to_string();
    let (code, guest_mac) = exec_sh(&mut rt, &web, "cat /sys/class/net/eth0/address").await;
    assert_eq!(code, 0, "{guest_mac}");
    assert_eq!(guest_mac.trim(), veth_mac, "the guest took the veth's MAC");
    let (code, out) = exec_sh(
        &mut rt,
        &web,
        "cat /etc/hostname; grep MemTotal /proc/meminfo",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("pool-a\n"), "{out}");
    let mem_kib: u64 = out
        .split_whitespace()
        .nth(2)
        .and_then(|k| k.parse().ok())
        .expect("MemTotal");
    assert!(
        mem_kib > 500 * 1024,
        "the guest sees the grown memory: {out}"
    );
    // The VM's processes are in the pod's cgroup now.
    let pid = info["vm"]["pid"].as_i64().expect("pid");
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    assert!(cgroups.contains(&env.cgroup_parent("pool-a")), "{cgroups}");
    // ... and back at normal priority (field 19 of stat: nice).
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let nice = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(16))
        .expect("nice");
    assert_eq!(nice, "0", "{stat}");

    // The pool refills; pod B takes the new warm VM and reaches A.
    until_pool(&mut rt, 1, 0).await;
    // (Without a cgroup parent: a parent both pods' groups made under
    // one ancestor of their own would outlive the first removal.)
    let mut b_cfg = serving_pod(&env, "pool-b", host_port + 100);
    b_cfg.linux = None;
    let b = run_pod(&mut rt, b_cfg.clone()).await;
    assert_eq!(pod_info(&mut rt, &b).await["vm"]["origin"], "pool");
    let client = Box::pin(create_started(
        &mut rt,
        &b,
        &b_cfg,
        container_config(&image, "client", &["sleep", "3600"]),
    ))
    .await;
    let (code, out) = exec_sh(&mut rt, &client, &format!("wget -q -O - http://{a_ip}/")).await;
    assert_eq!((code, out.trim()), (0, "hello-from-pool"));
    // Two warm VMs are two machines.
    let (id_a, id_b) = (
        identity(&mut rt, &web).await,
        identity(&mut rt, &client).await,
    );
    let lines = |s: &str| s.lines().map(String::from).collect::<Vec<_>>();
    let (la, lb) = (lines(&id_a), lines(&id_b));
    assert_eq!((la.len(), lb.len()), (3, 3), "{id_a}\n{id_b}");
    for i in 0..3 {
        assert_ne!(la[i], lb[i], "boot_id, MAC and IP differ: {id_a}\n{id_b}");
    }

    // A warm VM killed while idle is thrown away and replaced. The idle
    // one is the pool dir whose processes are neither pod's VM.
    until_pool(&mut rt, 1, 0).await;
    let mut claimed = Vec::new();
    for pod in [&a, &b] {
        claimed.push(
            pod_info(&mut rt, pod).await["vm"]["pid"]
                .as_i64()
                .expect("pid"),
        );
    }
    let idle_dirs: Vec<PathBuf> = pool_dirs(&env)
        .into_iter()
        .filter(|d| {
            !tests::processes_mentioning(d)
                .iter()
                .any(|(pid, _)| claimed.contains(&i64::from(*pid)))
        })
        .collect();
    assert_eq!(idle_dirs.len(), 1, "one idle warm VM: {idle_dirs:?}");
    let procs = tests::processes_mentioning(&idle_dirs[0]);
    assert!(!procs.is_empty(), "the idle VM runs");
    for (pid, _) in &procs {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let f = until_pool(&mut rt, 1, 1).await;
    assert!(!idle_dirs[0].exists(), "the dead VM's run dir is gone: {f}");
    let left = until_gone(&idle_dirs[0]).await;
    assert!(left.is_empty(), "{left:?}");

    // Logs, stop and remove as for any pod.
    remove_pod(&mut rt, &a).await;
    remove_pod(&mut rt, &b).await;
    assert_eq!(pool_dirs(&env).len(), 1, "only the idle warm VM is left");
    // A graceful stop throws the warm VM away.
    env.stop();
    env.assert_no_pods_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_pool_boots_cold_and_a_restart_discards_the_old_warm_vms() {
    tests::become_subreaper();
    let registry = tests::registry::Registry::start().await;
    let image = tests::cri::push_busybox(&registry, "factory-restart").await;
    let mut env = CriEnv::with_config(72, "\n[factory]\npool = 1\n");
    env.start().await;
    let mut rt = env.runtime().await;
    // Just started: the first warm VM is seconds from ready.
    let p_cfg = pod_config(&env, "cold", "default");
    let p = run_pod(&mut rt, p_cfg.clone()).await;
    assert_eq!(pod_info(&mut rt, &p).await["vm"]["origin"], "boot");
    env.pull(&image).await;
    let sleeper = Box::pin(create_started(
        &mut rt,
        &p,
        &p_cfg,
        container_config(&image, "sleeper", &["sleep", "3600"]),
    ))
    .await;
    until_pool(&mut rt, 1, 0).await;
    let old = pool_dirs(&env);
    assert_eq!(old.len(), 1, "{old:?}");
    assert!(!tests::processes_mentioning(&old[0]).is_empty());

    // vcrid is killed; the next one discards the warm VM it left before
    // it serves, and keeps the pod.
    env.kill9();
    env.start().await;
    let mut rt = env.runtime().await;
    assert!(!old[0].exists(), "the old warm VM's run dir is gone");
    let left = until_gone(&old[0]).await;
    assert!(left.is_empty(), "the old warm VM is dead: {left:?}");
    let (code, out) = exec_sh(&mut rt, &sleeper, "echo still-here").await;
    assert_eq!((code, out.trim()), (0, "still-here"));
    until_pool(&mut rt, 1, 0).await;
    let new = pool_dirs(&env);
    assert_eq!(new.len(), 1);
    assert_ne!(new, old);

    // vcrid killed while a pod takes a warm VM: the next start tears the
    // half-made pod down, the warm VM with it; the pod then starts.
    for point in ::cri::fail_points::RUN_POD_SANDBOX_FROM_POOL {
        env.stop();
        env.start_with_env(&[("VC_CRASH_AT", point)]).await;
        let mut rt = env.runtime().await;
        until_pool(&mut rt, 1, 0).await;
        let warm = pool_dirs(&env);
        assert_eq!(warm.len(), 1, "{point}: {warm:?}");
        let crashy = pod_config(&env, "crashy", "default");
        std::fs::create_dir_all(&crashy.log_directory).expect("log dir");
        let err = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(crashy.clone()),
                runtime_handler: String::new(),
            })
            .await
            .expect_err(point);
        assert!(
            matches!(err.code(), tonic::Code::Unavailable | tonic::Code::Unknown),
            "{point}: {err}"
        );
        let ended = env.wait_ended();
        assert_eq!(ended.signal(), Some(9), "{point}: vcrid ended {ended}");
        env.start().await;
        let mut rt = env.runtime().await;
        if warm[0].exists() {
            let listing: Vec<_> = std::fs::read_dir(&warm[0])
                .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            let log = env.log();
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| {
                    l.contains("WARN")
                        || l.contains("ERROR")
                        || l.contains("pool-")
                        || l.contains("recover")
                })
                .collect();
            panic!(
                "{point}: the taken VM's run dir {} is left, holding {listing:?}; vcrid said:\n{}",
                warm[0].display(),
                lines.join("\n")
            );
        }
        let left = until_gone(&warm[0]).await;
        assert!(left.is_empty(), "{point}: {left:?}");
        let pods = rt
            .list_pod_sandbox(cri::ListPodSandboxRequest::default())
            .await
            .expect("ListPodSandbox")
            .into_inner()
            .items;
        assert_eq!(
            pods.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            [p.as_str()],
            "{point}: only the first pod is left"
        );
        let again = run_pod(&mut rt, crashy).await;
        remove_pod(&mut rt, &again).await;
        println!("{point}: crashed there, nothing left after the restart");
    }

    let mut rt = env.runtime().await;
    remove_pod(&mut rt, &p).await;
    let warm = pool_dirs(&env);
    env.stop();
    assert!(
        warm.iter().all(|d| !d.exists()),
        "a graceful stop throws the warm VMs away: {warm:?}"
    );
    env.assert_no_pods_left();
}
