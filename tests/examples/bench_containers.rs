//! Container benchmark: create+start latency, ExecSync round trip and exec
//! stdout throughput (16 MiB) in a pod VM, next to Debian's `runc` doing the same on
//! the same busybox rootfs in the same run. Numbers, not assertions.
//!
//!   cargo run --release -p tests --example bench_containers [-- RUNS]

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use podsandbox::{container::ContainerConfig, container_log::Stream, Runtime, SandboxConfig};
use tests::TestEnv;

fn stats(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let median = ms(v[v.len() / 2]);
    let p99 = ms(v[((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1]);
    (median, p99)
}

fn report(what: &str, ours: Vec<Duration>, runc: Vec<Duration>) {
    let (om, op) = stats(ours);
    let (rm, rp) = stats(runc);
    println!(
        "{what:<28} vc median {om:8.2} ms p99 {op:8.2} ms | runc median {rm:7.2} ms p99 {rp:7.2} ms | ratio median {:6.1}x p99 {:6.1}x",
        om / rm,
        op / rp
    );
}

/// Runs runc with no pipes: a created container inherits its stdio and
/// would hold a pipe open for its whole life.
fn runc(root: &Path, args: &[&str]) {
    let status = Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("runc (hack/install-deps.sh installs it)");
    assert!(status.success(), "runc {args:?}: {status}");
}

fn runc_bundle(dir: &Path, rootfs: &Path) -> std::path::PathBuf {
    let bundle = dir.join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let out = Command::new("runc")
        .args(["spec", "--bundle"])
        .arg(&bundle)
        .output()
        .expect("runc spec");
    assert!(out.status.success());
    let path = bundle.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] = serde_json::json!(["/bin/sleep", "1000"]);
    spec["root"]["path"] = rootfs.display().to_string().into();
    spec["root"]["readonly"] = false.into();
    std::fs::write(&path, serde_json::to_vec(&spec).unwrap()).unwrap();
    bundle
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(25);
    let env = TestEnv::new();
    let rootfs = tests::busybox_rootfs(env.dir.path());
    let rt = Runtime::new(env.config.clone()).expect("runtime");
    rt.create_sandbox(SandboxConfig {
        id: "bench".into(),
        memory_mib: Some(512),
        ..Default::default()
    })
    .await
    .expect("sandbox");
    rt.start_sandbox("bench").await.expect("start");
    let runc_root = env.dir.path().join("runc-state");
    let bundle = runc_bundle(env.dir.path(), &rootfs);
    let bundle_s = bundle.to_str().unwrap();
    let cfg = |id: String| ContainerConfig {
        id,
        rootfs: podsandbox::container::Rootfs::Dir(rootfs.clone()),
        args: vec!["/bin/sleep".into(), "1000".into()],
        ..Default::default()
    };

    // create + start.
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let id = format!("c{i}");
        let t = Instant::now();
        rt.create_container("bench", cfg(id.clone()))
            .await
            .expect("create");
        rt.start_container("bench", &id).await.expect("start");
        ours.push(t.elapsed());
        rt.kill_container("bench", &id, 9, true)
            .await
            .expect("kill");
        rt.wait_container("bench", &id).await.expect("wait");
        rt.delete_container("bench", &id).await.expect("delete");

        let t = Instant::now();
        runc(&runc_root, &["create", "--bundle", bundle_s, &id]);
        runc(&runc_root, &["start", &id]);
        theirs.push(t.elapsed());
        runc(&runc_root, &["delete", "--force", &id]);
    }
    report("create+start", ours, theirs);

    // ExecSync round trip: `true` in a running container.
    rt.create_container("bench", cfg("svc".into()))
        .await
        .expect("create");
    rt.start_container("bench", "svc").await.expect("start");
    runc(&runc_root, &["create", "--bundle", bundle_s, "svc"]);
    runc(&runc_root, &["start", "svc"]);
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        let r = rt
            .exec_sync("bench", "svc", vec!["/bin/true".into()], None)
            .await
            .expect("exec");
        ours.push(t.elapsed());
        assert_eq!(r.exit_code, 0);
        let t = Instant::now();
        runc(&runc_root, &["exec", "svc", "/bin/true"]);
        theirs.push(t.elapsed());
    }
    report("ExecSync true", ours, theirs);

    // Where an exec's time goes: the ExecProcess call (the guest's OCI
    // runtime sets the process up) against reading its end and exit.
    let (mut start, mut rest) = (Vec::new(), Vec::new());
    for _ in 0..runs.min(10) {
        let t = Instant::now();
        let p = rt
            .exec(
                "bench",
                "svc",
                podsandbox::container_exec::ExecConfig::command(vec!["/bin/true".into()]),
            )
            .await
            .expect("exec");
        start.push(t.elapsed());
        let t = Instant::now();
        for s in [Stream::Stdout, Stream::Stderr] {
            while p.read(s).await.expect("read").is_some() {}
        }
        p.wait().await.expect("wait");
        rest.push(t.elapsed());
    }
    let (sm, _) = stats(start);
    let (rm, _) = stats(rest);
    println!(
        "{:<28} ExecProcess {sm:.1} ms, output + wait {rm:.1} ms (medians)",
        "  of which:"
    );
    // The same bytes inside the guest alone, through a pipe.
    let inside = rt
        .exec_sync(
            "bench",
            "svc",
            vec![
                "/bin/sh".into(),
                "-c".into(),
                "time -f %e sh -c 'dd if=/dev/zero bs=1048576 count=16 2>/dev/null | cat >/dev/null' 2>&1".into(),
            ],
            None,
        )
        .await
        .expect("exec");
    println!(
        "{:<28} 16 MiB through a pipe inside the guest: {} s",
        "  baseline:",
        String::from_utf8_lossy(&inside.stdout).trim()
    );

    // stdout throughput of an exec: 64 MiB through the transport.
    // ExecSync keeps at most 16 MiB per stream.
    let mib = 16;
    let dd = format!("dd if=/dev/zero bs=1048576 count={mib} 2>/dev/null");
    let t = Instant::now();
    let r = rt
        .exec_sync(
            "bench",
            "svc",
            vec!["/bin/sh".into(), "-c".into(), dd.clone()],
            None,
        )
        .await
        .expect("exec dd");
    let ours = t.elapsed();
    assert_eq!(r.stdout.len(), mib << 20);
    let t = Instant::now();
    let out = Command::new("runc")
        .arg("--root")
        .arg(&runc_root)
        .args(["exec", "svc", "/bin/sh", "-c", &dd])
        .stdout(Stdio::piped())
        .output()
        .expect("runc exec dd");
    let theirs = t.elapsed();
    assert_eq!(out.stdout.len(), mib << 20);
    let rate = |d: Duration| mib as f64 / d.as_secs_f64();
    println!(
        "{:<28} vc {:8.1} MiB/s | runc {:8.1} MiB/s | ratio {:.2}x",
        format!("exec stdout ({mib} MiB)"),
        rate(ours),
        rate(theirs),
        rate(ours) / rate(theirs)
    );

    runc(&runc_root, &["delete", "--force", "svc"]);
    rt.kill_container("bench", "svc", 9, true)
        .await
        .expect("kill");
    rt.wait_container("bench", "svc").await.expect("wait");
    rt.delete_container("bench", "svc").await.expect("delete");
    rt.stop_sandbox("bench").await.expect("stop");
    rt.delete_sandbox("bench").await.expect("delete");
}
