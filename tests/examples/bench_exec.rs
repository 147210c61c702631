//! ExecSync against the guest's own floor (issue 16, item 4), in one pod VM
//! through a real vcrid: the median ExecSync of `/bin/true` next to what a
//! fork + exec of `/bin/true` costs inside the same container (a busybox
//! shell loop, timed in the guest), the floor's parts (the loop, a fork, an
//! exec from the shared rootfs and from the guest's tmpfs), and
//! CreateContainer + StartContainer of an unpacked image next to it.
//! Numbers, not assertions.
//!
//!   cargo run --profile release-unwind -p tests --example bench_exec
//!
//! `BENCH_HYPERVISOR='kernel_params = "..."'` adds lines (`;` separated) to
//! vcrid's `[hypervisor]`, as for bench_cri.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::large_futures
)]

use std::time::Instant;

use k8s_cri::v1 as cri;
use tests::cri::{
    busybox_env, container_config, create_started, exec_sh, privileged, privileged_pod_config,
    remove_pod, run_pod, BusyboxEnv,
};

const EXECS: usize = 20;
const LOOP: usize = 50;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    tests::become_subreaper();
    // BENCH_HYPERVISOR: lines (`;` separated) for the `[hypervisor]` table,
    // as bench_cri takes them (for A/B experiments).
    let hypervisor = std::env::var("BENCH_HYPERVISOR")
        .map(|h| format!("{}\n", h.replace(';', "\n")))
        .unwrap_or_default();
    let BusyboxEnv {
        mut env,
        registry: _registry,
        image,
        mut rt,
    } = busybox_env(92, &hypervisor, "exec").await;
    let cfg = privileged_pod_config(&env, "exec", "bench");
    let pod = run_pod(&mut rt, cfg.clone()).await;
    let mut creates = Vec::new();
    let mut id = String::new();
    for i in 0..3 {
        let t = Instant::now();
        id = create_started(
            &mut rt,
            &pod,
            &cfg,
            container_config(&image, &format!("c{i}"), &["/bin/sleep", "3600"]),
        )
        .await;
        creates.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let mut execs = Vec::new();
    for _ in 0..EXECS {
        let t = Instant::now();
        let out = rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.clone(),
                cmd: vec!["/bin/true".into()],
                timeout: 60,
            })
            .await
            .expect("ExecSync")
            .into_inner();
        assert_eq!(out.exit_code, 0);
        execs.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    // The guest's floor: fork + exec of /bin/true by a process already in
    // the container, timed by the guest's clock.
    let script = format!(
        "a=$(cat /proc/uptime); i=0; while [ $i -lt {LOOP} ]; do /bin/true; i=$((i+1)); done; b=$(cat /proc/uptime); echo ${{a%% *}} ${{b%% *}}"
    );
    let (code, out) = exec_sh(&mut rt, &id, &script).await;
    assert_eq!(code, 0, "{out}");
    let mut t = out
        .split_whitespace()
        .map(|v| v.parse::<f64>().expect("uptime"));
    let (a, b) = (t.next().expect("start"), t.next().expect("end"));
    let floor_ms = (b - a) * 1000.0 / LOOP as f64;
    // Where the floor goes, in a privileged container of the same pod (it
    // may mount a tmpfs): a fork alone (a subshell), exec of the same
    // binary from the guest's tmpfs instead of the shared rootfs, and a
    // shell builtin (no fork, no exec) as the loop's own cost.
    let priv_id = create_started(
        &mut rt,
        &pod,
        &cfg,
        privileged(container_config(&image, "p", &["/bin/sleep", "3600"])),
    )
    .await;
    let mut parts = Vec::new();
    for (name, body) in [
        ("loop only", ":"),
        ("fork only", "( : )"),
        ("fork+exec from rootfs", "/bin/true"),
        ("fork+exec from tmpfs", "/x/true"),
    ] {
        let script = format!(
            "mkdir -p /x && (grep -q ' /x ' /proc/mounts || mount -t tmpfs t /x) && cp /bin/true /x/true && a=$(cat /proc/uptime); i=0; while [ $i -lt {LOOP} ]; do {body}; i=$((i+1)); done; b=$(cat /proc/uptime); echo ${{a%% *}} ${{b%% *}}"
        );
        let (code, out) = exec_sh(&mut rt, &priv_id, &script).await;
        assert_eq!(code, 0, "{out}");
        let v: Vec<f64> = out
            .split_whitespace()
            .map(|v| v.parse::<f64>().unwrap_or_else(|_| panic!("{name}: {out}")))
            .collect();
        parts.push((name, (v[1] - v[0]) * 1000.0 / LOOP as f64));
    }
    // What the guest kernel turned on against CPU side channels (their
    // cost is per syscall and context switch).
    let (_, vulns) = exec_sh(
        &mut rt,
        &priv_id,
        "cd /sys/devices/system/cpu/vulnerabilities && grep -v '^Not affected' * | tr '\\n' ';'",
    )
    .await;
    remove_pod(&mut rt, &pod).await;
    env.stop();
    let exec = median(execs);
    println!(
        "ExecSync /bin/true: median {exec:.1} ms of {EXECS}; the guest's fork+exec floor {floor_ms:.1} ms ({:.1}x)",
        exec / floor_ms.max(0.01)
    );
    println!("  guest mitigations: {}", vulns.trim());
    for (name, ms) in parts {
        println!("  guest {name}: {ms:.1} ms per iteration");
    }
    println!(
        "CreateContainer+StartContainer (image unpacked, pod running): median {:.0} ms of {}",
        median(creates.clone()),
        creates.len()
    );
}
