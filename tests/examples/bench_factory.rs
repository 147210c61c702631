//! Warm pool benchmark (issue 16), through a real vcrid and real VMs: what
//! refilling the pool takes from running pods. Two pods run a CPU-bound
//! shell loop at once (on this 2-core host they fill both cores); the loop's
//! time is measured with the pool full (nothing booting), and again right
//! after a third pod took the warm VM (the pool boots a new one meanwhile)
//! — with the refill at the default `refill_nice = 19` and at nice 0. Also
//! how long the refill took under that load. Numbers, not assertions.
//!
//!   cargo run --profile release-unwind -p tests --example bench_factory

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::large_futures
)]

use std::time::{Duration, Instant};

use tests::cri::{
    container_config, create_started, exec_sh, pod_config, remove_pod, run_pod, CriEnv, Runtime,
};

const OCTET: u8 = 93;
/// Iterations of the busy loop (a few seconds under TCG).
const LOOP: u32 = 200_000;
const RUNS: usize = 3;

async fn ready(rt: &mut Runtime) -> u64 {
    tests::cri::factory_status(rt).await["ready"]
        .as_u64()
        .unwrap_or(0)
}

async fn until_ready(rt: &mut Runtime) -> Duration {
    let t = Instant::now();
    while ready(rt).await == 0 {
        assert!(t.elapsed() < Duration::from_secs(600), "no warm VM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    t.elapsed()
}

/// Runs the busy loop in both containers at once; the slower one's time.
async fn busy(env: &CriEnv, containers: &[String; 2]) -> f64 {
    let script = format!("i=0; while [ $i -lt {LOOP} ]; do i=$((i+1)); done; echo $i");
    let mut tasks = Vec::new();
    for c in containers {
        let mut rt = env.runtime().await;
        let (c, script) = (c.clone(), script.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let (code, out) = exec_sh(&mut rt, &c, &script).await;
            assert_eq!((code, out.trim()), (0, LOOP.to_string().as_str()));
            t.elapsed().as_secs_f64()
        }));
    }
    let mut worst: f64 = 0.0;
    for t in tasks {
        worst = worst.max(t.await.expect("join"));
    }
    worst
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// (loop seconds with the pool full, during a refill, the refill's time).
async fn measure(nice: i32, image: &str) -> (f64, f64, f64) {
    let mut env = CriEnv::with_config(
        OCTET,
        &format!("\n[factory]\npool = 1\nrefill_nice = {nice}\n"),
    );
    env.start().await;
    env.pull(image).await;
    let mut rt = env.runtime().await;
    let mut busy_ctrs = Vec::new();
    let mut pods = Vec::new();
    for name in ["busy-a", "busy-b"] {
        until_ready(&mut rt).await;
        let cfg = pod_config(&env, name, "bench");
        let pod = run_pod(&mut rt, cfg.clone()).await;
        let c = Box::pin(create_started(
            &mut rt,
            &pod,
            &cfg,
            container_config(image, "sleeper", &["sleep", "3600"]),
        ))
        .await;
        pods.push(pod);
        busy_ctrs.push(c);
    }
    let busy_ctrs: [String; 2] = [busy_ctrs[0].clone(), busy_ctrs[1].clone()];
    let (mut idle, mut refilling, mut refill) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..RUNS {
        until_ready(&mut rt).await;
        idle.push(busy(&env, &busy_ctrs).await);
        // A pod takes the warm VM: the pool boots the next one now.
        let cfg = pod_config(&env, &format!("taker-{i}"), "bench");
        let taker = run_pod(&mut rt, cfg).await;
        let t = Instant::now();
        refilling.push(busy(&env, &busy_ctrs).await);
        until_ready(&mut rt).await;
        refill.push(t.elapsed().as_secs_f64());
        remove_pod(&mut rt, &taker).await;
    }
    for pod in pods {
        remove_pod(&mut rt, &pod).await;
    }
    env.stop();
    env.assert_no_pods_left();
    (median(idle), median(refilling), median(refill))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    tests::become_subreaper();
    let registry = tests::registry::Registry::start().await;
    let image = tests::cri::push_busybox(&registry, "factory").await;
    println!("Warm pool refill against two CPU-bound pods (busybox sh loop of {LOOP}, both at once; median of {RUNS})");
    println!(
        "{:<16} {:>12} {:>14} {:>8} {:>16}",
        "refill_nice", "pool full s", "refilling s", "ratio", "refill took s"
    );
    for nice in [19, 0] {
        let (idle, refilling, refill) = measure(nice, &image).await;
        println!(
            "{nice:<16} {idle:>12.2} {refilling:>14.2} {:>7.2}x {refill:>16.1}",
            refilling / idle
        );
    }
}
