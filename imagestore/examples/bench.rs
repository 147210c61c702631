//! Pull + unpack benchmark against a local docker-registry, next to
//! `skopeo copy docker://… oci:…` + `umoci unpack` in the same run, plus block
//! image preparation.
//!
//! Run: `cargo run --release -p imagestore --example bench` (root; BENCH_RUNS=N, default 3).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use imagestore::ImageStore;
use support::*;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Deterministic pseudo-random bytes (xorshift), incompressible like binaries.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
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

/// ~200 MB in 5 layers: per layer 20 files of 2 MB, half noise, half text.
fn big_image() -> TestImage {
    let mut layers = Vec::new();
    for l in 0..5u64 {
        let mut entries = vec![E::Dir(
            Box::leak(format!("layer{l}").into_boxed_str()),
            0o755,
            0,
        )];
        for f in 0..20u64 {
            let data = if f % 2 == 0 {
                noise(l * 100 + f + 1, 2 << 20)
            } else {
                format!("line {l} {f} of some compressible text\n")
                    .repeat((2 << 20) / 32)
                    .into_bytes()
            };
            let p: &'static str = Box::leak(format!("layer{l}/file{f}").into_boxed_str());
            entries.push(E::File(p, 0o644, 0, data));
        }
        layers.push(layer(&entries, Comp::Gzip));
    }
    TestImage::new(layers)
}

fn skopeo_umoci(reference: &str, work: &std::path::Path) -> Duration {
    let oci = work.join("oci");
    let bundle = work.join("bundle");
    let t = Instant::now();
    let st = Command::new("skopeo")
        .args(["copy", "-q", "--src-tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:bench", oci.display()))
        .status()
        .unwrap();
    assert!(st.success(), "skopeo copy failed");
    let st = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:bench", oci.display()))
        .arg(&bundle)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "umoci unpack failed");
    t.elapsed()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let reg = Registry::start().await;
    let busybox = TestImage::new(vec![layer(&busybox_entries(), Comp::Gzip)]);
    reg.push_image("bench/busybox", "1", &busybox).await;
    let big = big_image();
    let compressed: usize = big.layers.iter().map(|l| l.blob().len()).sum();
    let raw: usize = big.layers.iter().map(|l| l.tar.len()).sum();
    reg.push_image("bench/big", "1", &big).await;
    println!(
        "images: busybox ({} KB compressed), big: 5 layers, {} MB uncompressed, {} MB compressed; {runs} runs each",
        busybox.layers[0].blob().len() / 1024,
        raw >> 20,
        compressed >> 20
    );

    for (name, repo) in [
        ("busybox", "bench/busybox"),
        ("200MB/5 layers", "bench/big"),
    ] {
        let reference = format!("{}/{repo}:1", reg.host());
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let sd = StoreDir::new();
            let store = ImageStore::open(sd.config()).unwrap();
            let t = Instant::now();
            store.pull_image(&reference, None).await.unwrap();
            ours.push(t.elapsed());
            drop(store);
            drop(sd);
            let work = tempfile::tempdir().unwrap();
            theirs.push(skopeo_umoci(&reference, work.path()));
        }
        let (o, s) = (median(ours), median(theirs));
        println!(
            "{name:>16}: imagestore pull+unpack {:>8.1} ms | skopeo copy + umoci unpack {:>8.1} ms | ratio {:.2}x",
            o.as_secs_f64() * 1e3,
            s.as_secs_f64() * 1e3,
            s.as_secs_f64() / o.as_secs_f64()
        );
    }

    // Block image: ext4 build once per image, then a qcow2 overlay per container.
    let (mut builds, mut overlays) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let sd = StoreDir::new();
        let store = ImageStore::open(sd.config()).unwrap();
        let image = store
            .pull_image(&format!("{}/bench/big:1", reg.host()), None)
            .await
            .unwrap();
        let t = Instant::now();
        store.prepare_block_rootfs(&image.id, "c1").await.unwrap();
        builds.push(t.elapsed());
        let t = Instant::now();
        store.prepare_block_rootfs(&image.id, "c2").await.unwrap();
        overlays.push(t.elapsed());
        store.remove_rootfs("c1").await.unwrap();
        store.remove_rootfs("c2").await.unwrap();
    }
    println!(
        "     block image: ext4 build (mkfs.ext4 -d, 200 MB) {:.1} ms median | per-container qcow2 overlay {:.1} ms median",
        median(builds).as_secs_f64() * 1e3,
        median(overlays).as_secs_f64() * 1e3
    );
}
