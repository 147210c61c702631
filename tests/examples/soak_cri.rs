//! Leak soak: CYCLES (default 200) RunPodSandbox → CreateContainer →
//! StartContainer → ExecSync → StopPodSandbox → RemovePodSandbox through one
//! vcrid, counting after a warm-up and at the end what each cycle could
//! leak: processes, vcrid's fds and threads, netns, host links, mounts,
//! cgroups, files under vcrid's dirs, vcrid's RSS. Prints the counts and
//! fails if any but RSS grew (RSS is reported: allocators keep pages).
//!
//!   cargo build --profile release-unwind -p cri --bins
//!   cargo run --profile release-unwind -p tests --example soak_cri [-- CYCLES]

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::large_futures
)]

use std::{collections::BTreeMap, path::Path, time::Instant};

use k8s_cri::v1 as cri;
use tests::cri::{container_config, create_started, pod_config, remove_pod, run_pod, CriEnv};

const WARM_UP: usize = 3;

fn count_dir(path: &Path) -> usize {
    std::fs::read_dir(path).map(|rd| rd.count()).unwrap_or(0)
}

fn count_files(path: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            n += 1;
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    n
}

fn status_field(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Everything counted, by name, after a quiet spell: tokio's blocking
/// threads end after 10 s idle, so a thread count is comparable only then.
async fn quiet_snapshot(env: &CriEnv) -> BTreeMap<&'static str, u64> {
    tokio::time::sleep(std::time::Duration::from_secs(12)).await;
    snapshot(env)
}

fn snapshot(env: &CriEnv) -> BTreeMap<&'static str, u64> {
    let pid = env.pid().expect("vcrid runs");
    let dir = env.dir.path();
    let cgroups: usize = podsandbox::cgroup::hierarchies()
        .into_iter()
        .map(|(mount, own)| {
            count_files(&mount.join(own).join(format!("vcrtest{}", env.subnet_octet)))
        })
        .sum();
    let links = std::fs::read_dir("/sys/class/net")
        .map(|rd| rd.count())
        .unwrap_or(0);
    let n = |v: usize| v as u64;
    BTreeMap::from([
        (
            "processes naming vcrid's run dir",
            n(tests::processes_mentioning(&dir.join("run")).len()),
        ),
        (
            "vcrid fds",
            n(count_dir(Path::new(&format!("/proc/{pid}/fd")))),
        ),
        ("vcrid threads", status_field(pid, "Threads:")),
        ("netns", n(count_dir(&dir.join("run/netns")))),
        ("host links", n(links)),
        (
            "mounts under vcrid's dirs",
            n(tests::mounts_under(dir).len()),
        ),
        ("cgroup entries", n(cgroups)),
        ("files under state/", n(count_files(&dir.join("state")))),
        ("files under run/", n(count_files(&dir.join("run")))),
        ("IPs allocated", n(env.ipam_allocations().len())),
        ("iptables lines", n(env.iptables_lines().len())),
        ("vcrid RSS KiB", status_field(pid, "VmRSS:")),
    ])
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let cycles: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("CYCLES: a number"))
        .unwrap_or(200);
    tests::become_subreaper();
    let registry = tests::registry::Registry::start().await;
    let image = tests::cri::push_busybox(&registry, "1").await;
    let mut env = CriEnv::new(78);
    eprintln!("vcrid: {}", tests::workspace_bin("vcrid").display());
    env.start().await;
    env.pull(&image).await;
    let mut rt = env.runtime().await;
    let mut parent = pod_config(&env, "soak", "soak");
    parent.linux = Some(cri::LinuxPodSandboxConfig {
        cgroup_parent: env.cgroup_parent("soak"),
        ..Default::default()
    });
    let mut before = BTreeMap::new();
    let started = Instant::now();
    let mut measured = Instant::now();
    for i in 0..WARM_UP + cycles {
        if i == WARM_UP {
            before = quiet_snapshot(&env).await;
            measured = Instant::now();
        }
        let mut config = parent.clone();
        if let Some(md) = config.metadata.as_mut() {
            md.attempt = u32::try_from(i).expect("attempt");
        }
        let pod = run_pod(&mut rt, config.clone()).await;
        let ctr = create_started(
            &mut rt,
            &pod,
            &config,
            container_config(&image, "app", &["sleep", "3600"]),
        )
        .await;
        let out = rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: ctr,
                cmd: vec!["true".into()],
                timeout: 60,
            })
            .await
            .expect("ExecSync")
            .into_inner();
        assert_eq!(out.exit_code, 0);
        remove_pod(&mut rt, &pod).await;
        if (i + 1) % 10 == 0 {
            eprintln!("{} cycles, {:.0} s", i + 1, started.elapsed().as_secs_f64());
        }
    }
    let secs = measured.elapsed().as_secs_f64();
    let after = quiet_snapshot(&env).await;
    println!();
    println!(
        "soak: {cycles} cycles (RunPodSandbox, CreateContainer, StartContainer, ExecSync, StopPodSandbox, RemovePodSandbox) after {WARM_UP} warm-up cycles, {secs:.0} s ({:.1} s per cycle)",
        secs / cycles as f64
    );
    println!(
        "{:<34} {:>10} {:>10} {:>8}",
        "", "before", "after", "change"
    );
    let mut leaked = Vec::new();
    for (what, b) in &before {
        let a = after[what];
        let change = a as i64 - *b as i64;
        println!("{what:<34} {b:>10} {a:>10} {change:>+8}");
        if change > 0 && *what != "vcrid RSS KiB" {
            leaked.push(*what);
        }
    }
    env.assert_no_pods_left();
    assert!(leaked.is_empty(), "grew over the soak: {leaked:?}");
}
