//! VM sizing benchmark (issue 15), through a real vcrid and real VMs:
//!
//! 1. hot-plug latency: UpdateContainerResources that adds 1 vCPU, then one
//!    that adds 1 GiB — the call returns once QEMU has the device and the
//!    guest has onlined it — and how long until the guest shows it
//!    (`nproc` / MemTotal through ExecSync, less an ExecSync's own time);
//! 2. pod start (RunPodSandbox + CreateContainer + StartContainer) of a
//!    default pod, of a pod declaring 2 GiB and 2 CPUs (sized at boot), and
//!    of a default pod with `resource_hotplug = false` (the baseline without
//!    the hot-plug devices and with multi-threaded TCG);
//! 3. host PSS (QEMU + helpers, `smaps_rollup`) of an idle default pod and
//!    of an idle pod with a 2 GiB limit after its workload touched 1.5 GiB
//!    and exited, with free page reporting on and off.
//!
//! Numbers, not assertions.
//!
//!   cargo run --profile release-unwind -p tests --example bench_sizing

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::large_futures
)]

use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use tests::cri::{
    busybox_env, container_config, create_started, exec_sh, limits, pod_config, remove_pod,
    run_pod, BusyboxEnv, CriEnv, Runtime,
};

const RUNS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn exec(rt: &mut Runtime, id: &str, script: &str) -> String {
    let (code, out) = exec_sh(rt, id, script).await;
    assert_eq!(code, 0, "{out}");
    out
}

async fn env_with(
    octet: u8,
    hypervisor: &str,
) -> (CriEnv, Runtime, String, tests::registry::Registry) {
    let BusyboxEnv {
        env,
        registry,
        image,
        rt,
    } = busybox_env(octet, hypervisor, "sizing").await;
    (env, rt, image, registry)
}

/// Pod start of `n` pods with `linux` sandbox resources, ms each.
async fn pod_starts(
    env: &CriEnv,
    rt: &mut Runtime,
    image: &str,
    name: &str,
    linux: Option<cri::LinuxPodSandboxConfig>,
) -> Vec<f64> {
    let mut times = Vec::new();
    for i in 0..RUNS {
        let mut cfg = pod_config(env, &format!("{name}-{i}"), "bench");
        cfg.linux = linux.clone();
        let t = Instant::now();
        let pod = run_pod(rt, cfg.clone()).await;
        create_started(
            rt,
            &pod,
            &cfg,
            container_config(image, "c", &["/bin/sleep", "3600"]),
        )
        .await;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        remove_pod(rt, &pod).await;
    }
    times
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    tests::become_subreaper();
    let (mut env, mut rt, image, _registry) =
        env_with(90, "max_memory_mib = 4096\nmax_vcpus = 4\n").await;

    // 1. Hot-plug latency.
    let cfg = pod_config(&env, "hotplug", "bench");
    let pod = run_pod(&mut rt, cfg.clone()).await;
    let id = create_started(
        &mut rt,
        &pod,
        &cfg,
        container_config(&image, "c", &["/bin/sleep", "3600"]),
    )
    .await;
    let t = Instant::now();
    exec(&mut rt, &id, "true").await;
    let exec_ms = t.elapsed().as_secs_f64() * 1000.0;
    let mut cpu_ms = Vec::new();
    let mut cpu_seen_ms = Vec::new();
    let mut mem_ms = Vec::new();
    let mut mem_seen_ms = Vec::new();
    for step in 1..=3i64 {
        let t = Instant::now();
        rt.update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: id.clone(),
            linux: Some(limits(1000 * (step + 1), 128 * step)),
            ..Default::default()
        })
        .await
        .expect("update cpu");
        cpu_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        let want = (step + 1).to_string();
        loop {
            if exec(&mut rt, &id, "nproc").await.trim() == want {
                break;
            }
        }
        cpu_seen_ms.push(t.elapsed().as_secs_f64() * 1000.0 - exec_ms);
        let before: u64 = exec(&mut rt, &id, "awk '/MemTotal/{print $2}' /proc/meminfo")
            .await
            .trim()
            .parse()
            .unwrap();
        let t = Instant::now();
        rt.update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: id.clone(),
            linux: Some(limits(1000 * (step + 1), 128 * step + 1024)),
            ..Default::default()
        })
        .await
        .expect("update memory");
        mem_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        loop {
            let now: u64 = exec(&mut rt, &id, "awk '/MemTotal/{print $2}' /proc/meminfo")
                .await
                .trim()
                .parse()
                .unwrap();
            if now >= before + 1000 * 1024 {
                break;
            }
        }
        mem_seen_ms.push(t.elapsed().as_secs_f64() * 1000.0 - exec_ms);
        // Back down for the next round (memory unplugged; vCPUs stay under TCG).
        rt.update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: id.clone(),
            linux: Some(limits(1000 * (step + 1), 128 * step)),
            ..Default::default()
        })
        .await
        .expect("update down");
    }
    remove_pod(&mut rt, &pod).await;
    println!(
        "hot-plug of 1 vCPU: call {:.0} ms (median of {}), visible in the guest {:.0} ms",
        median(cpu_ms.clone()),
        cpu_ms.len(),
        median(cpu_seen_ms)
    );
    println!("hot-plug of 1 GiB: call {:.0} ms, visible in the guest {:.0} ms (ExecSync itself: {exec_ms:.0} ms, subtracted)", median(mem_ms), median(mem_seen_ms));

    // 2. Pod start.
    let default = pod_starts(&env, &mut rt, &image, "default", None).await;
    let big = pod_starts(
        &env,
        &mut rt,
        &image,
        "big",
        Some(cri::LinuxPodSandboxConfig {
            resources: Some(limits(2000, 2048)),
            ..Default::default()
        }),
    )
    .await;

    // 3. Idle PSS.
    let idle = |name: &str| pod_config(&env, name, "bench");
    let cfg = idle("idle-default");
    let small = run_pod(&mut rt, cfg.clone()).await;
    create_started(
        &mut rt,
        &small,
        &cfg,
        container_config(&image, "c", &["/bin/sleep", "3600"]),
    )
    .await;
    let cfg = idle("idle-2g");
    let large = run_pod(&mut rt, cfg.clone()).await;
    let mut c = container_config(&image, "c", &["/bin/sleep", "3600"]);
    c.linux.get_or_insert_with(Default::default).resources = Some(limits(1000, 2048));
    let large_c = create_started(&mut rt, &large, &cfg, c).await;
    exec(
        &mut rt,
        &large_c,
        "dd if=/dev/zero of=/dev/null bs=1500M count=1 2>/dev/null",
    )
    .await;
    let right_after = tests::cri::pod_pss_mib(&mut rt, &large).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    let small_pss = tests::cri::pod_pss_mib(&mut rt, &small).await;
    let large_pss = tests::cri::pod_pss_mib(&mut rt, &large).await;
    remove_pod(&mut rt, &small).await;
    remove_pod(&mut rt, &large).await;
    env.stop();
    drop(env);

    // Baselines: hot-plug off (pod start), free page reporting off (PSS).
    let (mut env, mut rt, image, _registry2) = env_with(
        91,
        "resource_hotplug = false\nfree_page_reporting = false\n",
    )
    .await;
    let plain = pod_starts(&env, &mut rt, &image, "plain", None).await;
    // Without hot-plug the VM needs its size at boot: declare it.
    let mut cfg2 = pod_config(&env, "idle-2g-noreport", "bench");
    cfg2.linux = Some(cri::LinuxPodSandboxConfig {
        resources: Some(limits(1000, 2048)),
        ..Default::default()
    });
    let pod = run_pod(&mut rt, cfg2.clone()).await;
    let mut c = container_config(&image, "c", &["/bin/sleep", "3600"]);
    c.linux.get_or_insert_with(Default::default).resources = Some(limits(1000, 2048));
    let cid = create_started(&mut rt, &pod, &cfg2, c).await;
    exec(
        &mut rt,
        &cid,
        "dd if=/dev/zero of=/dev/null bs=1500M count=1 2>/dev/null",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    let noreport_pss = tests::cri::pod_pss_mib(&mut rt, &pod).await;
    remove_pod(&mut rt, &pod).await;
    env.stop();

    let p = |v: &[f64]| median(v.to_vec());
    println!(
        "pod start (run+create+start, median of {RUNS}): default {:.0} ms, declared 2 CPUs/2 GiB {:.0} ms ({:.2}x), hot-plug off {:.0} ms (default/off {:.2}x)",
        p(&default),
        p(&big),
        p(&big) / p(&default),
        p(&plain),
        p(&default) / p(&plain)
    );
    println!(
        "idle PSS: default pod {small_pss:.0} MiB; 2 GiB pod after touching 1.5 GiB: {right_after:.0} MiB at once, {large_pss:.0} MiB 20 s later ({:.2}x the default pod); without free page reporting {noreport_pss:.0} MiB ({:.2}x)",
        large_pss / small_pss,
        noreport_pss / small_pss
    );
}
