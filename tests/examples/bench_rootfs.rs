//! Rootfs benchmark: sequential read of one 128 MiB file of an image from
//! inside a pod VM, from (a) the shared-dir rootfs (host overlay over
//! virtio-fs) and (b) the block rootfs (qcow2 over the image's ext4 image, a
//! SCSI disk), next to the host reading the same file from the overlay in
//! the same run; plus the block rootfs's preparation time (ext4 build once
//! per image, qcow2 per container). Numbers, not assertions.
//!
//!   cargo run --profile release-unwind -p tests --example bench_rootfs

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    io::Read as _,
    path::Path,
    time::{Duration, Instant},
};

use imagestore::ImageStore;
use podsandbox::{
    container::{ContainerConfig, Rootfs},
    DiskFormat, Runtime, SandboxConfig,
};
use tests::registry::{busybox_entries, layer, Comp, Registry, TestImage, E};
use tests::TestEnv;

const MIB: usize = 128;
const WARM_RUNS: usize = 3;

/// Deterministic incompressible bytes (xorshift).
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn host_read(path: &Path) -> f64 {
    let mut f = std::fs::File::open(path).expect("open");
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut n = 0usize;
    loop {
        let r = f.read(&mut buf).expect("read");
        if r == 0 {
            break;
        }
        n += r;
    }
    assert_eq!(n, MIB << 20);
    MIB as f64 / t.elapsed().as_secs_f64()
}

/// MiB/s of `dd` reading the file inside container `id`, timed by the
/// guest (busybox `time`), so the exec round trip is not counted.
async fn guest_read(rt: &Runtime, id: &str) -> f64 {
    let script = "time -f %e dd if=/data/big of=/dev/null bs=1048576 2>/dev/null";
    let r = rt
        .exec_sync(
            "bench",
            id,
            vec!["/bin/sh".into(), "-c".into(), format!("{script} 2>&1")],
            None,
        )
        .await
        .expect("exec dd");
    assert_eq!(r.exit_code, 0, "{}", String::from_utf8_lossy(&r.stderr));
    let out = String::from_utf8_lossy(&r.stdout);
    let secs: f64 = out
        .trim()
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no time in {out:?}"));
    MIB as f64 / secs.max(0.005)
}

fn drop_host_caches() -> bool {
    std::fs::write("/proc/sys/vm/drop_caches", b"3").is_ok()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let reg = Registry::start().await;
    let data = vec![
        E::Dir("data", 0o755, 0),
        E::File("data/big", 0o644, 0, noise(MIB << 20)),
    ];
    let image = TestImage::new(vec![
        layer(&busybox_entries(), Comp::Gzip),
        layer(&data, Comp::None),
    ]);
    reg.push_image("bench/rootfs", "1", &image).await;

    let env = TestEnv::new();
    let store = ImageStore::open(imagestore::StoreConfig {
        root: env.dir.path().join("images"),
        ..Default::default()
    })
    .expect("store");
    let img = store
        .pull_image(&format!("{}/bench/rootfs:1", reg.host()), None)
        .await
        .expect("pull");

    // The host, reading the file from the same overlay the guest gets.
    let host_dir = store.prepare_rootfs(&img.id, "host").await.expect("host");
    let cold_ok = drop_host_caches();
    let host_cold = host_read(&host_dir.join("data/big"));
    let host_warm = median(
        (0..WARM_RUNS)
            .map(|_| host_read(&host_dir.join("data/big")))
            .collect(),
    );

    // Block rootfs preparation.
    let t = Instant::now();
    let qcow2 = store
        .prepare_block_rootfs(&img.id, "blk")
        .await
        .expect("block rootfs");
    let first_block = t.elapsed();
    let t = Instant::now();
    let other = store
        .prepare_block_rootfs(&img.id, "blk2")
        .await
        .expect("second block rootfs");
    let second_block = t.elapsed();
    let _ = other;

    let rt = Runtime::new(env.config.clone()).expect("runtime");
    rt.create_sandbox(SandboxConfig {
        id: "bench".into(),
        memory_mib: Some(1024),
        ..Default::default()
    })
    .await
    .expect("sandbox");
    rt.start_sandbox("bench").await.expect("start");
    let dir_rootfs = store.prepare_rootfs(&img.id, "dir").await.expect("dir");
    let cfg = |id: &str, rootfs: Rootfs| ContainerConfig {
        id: id.into(),
        rootfs,
        args: vec!["/bin/sleep".into(), "1000".into()],
        ..Default::default()
    };
    let mut rows = Vec::new();
    for (name, id, rootfs) in [
        ("shared dir (virtio-fs)", "dir", Rootfs::Dir(dir_rootfs)),
        (
            "block (qcow2 on SCSI)",
            "blk",
            Rootfs::Block {
                image: qcow2.clone(),
                format: DiskFormat::Qcow2,
                fstype: "ext4".into(),
            },
        ),
    ] {
        let t = Instant::now();
        rt.create_container("bench", cfg(id, rootfs))
            .await
            .expect("create");
        rt.start_container("bench", id).await.expect("start");
        let create: Duration = t.elapsed();
        let cold = guest_read(&rt, id).await;
        let mut warm = Vec::new();
        for _ in 0..WARM_RUNS {
            warm.push(guest_read(&rt, id).await);
        }
        rows.push((name, create, cold, median(warm)));
    }

    println!(
        "sequential read of a {MIB} MiB file (dd bs=1M), guest cold = first read in the VM, warm = median of {WARM_RUNS} re-reads"
    );
    println!(
        "{:<26} cold {host_cold:8.1} MiB/s{} | warm {host_warm:8.1} MiB/s",
        "host (overlay dir)",
        if cold_ok {
            ""
        } else {
            " (host caches not dropped)"
        }
    );
    for (name, create, cold, warm) in &rows {
        println!(
            "{name:<26} cold {cold:8.1} MiB/s ({:.3}x host warm) | warm {warm:8.1} MiB/s ({:.3}x) | create+start {:.0} ms",
            cold / host_warm,
            warm / host_warm,
            create.as_secs_f64() * 1e3
        );
    }
    println!(
        "block rootfs preparation: first container {:.0} ms (ext4 image built), next {:.0} ms (qcow2 overlay only)",
        first_block.as_secs_f64() * 1e3,
        second_block.as_secs_f64() * 1e3
    );

    for id in ["dir", "blk"] {
        rt.kill_container("bench", id, 9, true).await.expect("kill");
        rt.wait_container("bench", id).await.expect("wait");
        rt.delete_container("bench", id).await.expect("delete");
    }
    rt.stop_sandbox("bench").await.expect("stop");
    rt.delete_sandbox("bench").await.expect("delete");
    for c in ["host", "dir", "blk", "blk2"] {
        store.remove_rootfs(c).await.expect("remove rootfs");
    }
}
