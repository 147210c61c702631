//! RemoveImage frees exactly the blobs and snapshots no other image or
//! container uses; an absent image is NotFound.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;

use imagestore::{ErrorKind, ImageService, ImageStore, RootfsMode};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_frees_exactly_the_unshared_blobs() {
    if !host_ready() {
        return;
    }
    let reg = Registry::start().await;
    let base = layer(
        &[
            E::Dir("base", 0o755, 0),
            E::File("base/f", 0o644, 0, b"shared".to_vec()),
        ],
        Comp::Gzip,
    );
    let a_top = layer(&[E::File("a", 0o644, 0, b"a".to_vec())], Comp::Gzip);
    let b_top = layer(&[E::File("b", 0o644, 0, b"b".to_vec())], Comp::Zstd);
    let a = reg
        .push_image("test/a", "1", &TestImage::new(vec![base.clone(), a_top]))
        .await;
    let b = reg
        .push_image("test/b", "1", &TestImage::new(vec![base, b_top]))
        .await;
    assert_eq!(a.layers[0], b.layers[0]);

    let sd = StoreDir::new();
    let store: Arc<dyn ImageService> = Arc::new(ImageStore::open(sd.config()).unwrap());
    let ia = store
        .pull(&format!("{}/test/a:1", reg.host()), None)
        .await
        .unwrap();
    let ib = store
        .pull(&format!("{}/test/b:1", reg.host()), None)
        .await
        .unwrap();
    assert_eq!(
        ia.chain_ids[0], ib.chain_ids[0],
        "the base layer is one snapshot"
    );
    let blob = |d: &imagestore::Digest| sd.dir.path().join("blobs/sha256").join(d.hex());
    let snap = |d: &imagestore::Digest| sd.dir.path().join("snapshots").join(d.hex());
    let info_before = store.fs_info().await.unwrap();

    // A container of A keeps A's snapshots after A is removed; blobs go at once.
    let rootfs = store
        .prepare_rootfs(&ia.id, "ca", RootfsMode::SharedDir)
        .await
        .unwrap();
    store
        .remove(&format!("{}/test/a:1", reg.host()))
        .await
        .unwrap();
    for d in [&a.manifest, &a.config, &a.layers[1]] {
        assert!(!blob(d).exists(), "A's own blob {d} freed");
    }
    assert!(blob(&a.layers[0]).exists(), "shared base blob kept");
    for d in [&b.manifest, &b.config, &b.layers[1]] {
        assert!(blob(d).exists(), "B's blob {d} kept");
    }
    assert!(snap(&ia.chain_ids[1]).exists(), "kept for container ca");
    assert_eq!(std::fs::read(rootfs.join("a")).unwrap(), b"a");
    assert_eq!(
        store.status(&ia.id).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        store.remove(&ia.id).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    let gone = store
        .prepare_rootfs(&ia.id, "cx", RootfsMode::SharedDir)
        .await
        .unwrap_err();
    assert_eq!(gone.kind(), ErrorKind::NotFound, "{gone}");
    for bad in ["../escape", "a/b", "", ".."] {
        let e = store
            .prepare_rootfs(&ib.id, bad, RootfsMode::Block)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad:?}: {e}");
    }
    assert!(!sd.dir.path().join("escape").exists());
    store.remove_rootfs("ca").await.unwrap();
    assert!(
        !snap(&ia.chain_ids[1]).exists(),
        "freed with its last container"
    );
    assert!(snap(&ia.chain_ids[0]).exists(), "B still uses the base");
    assert_eq!(store.list(None).await.unwrap().len(), 1);

    // Removing B by digest reference frees everything else.
    store
        .remove(&format!("{}/test/b@{}", reg.host(), b.manifest))
        .await
        .unwrap();
    assert!(store.list(None).await.unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(sd.dir.path().join("blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(sd.dir.path().join("snapshots"))
            .unwrap()
            .count(),
        0
    );
    let info_after = store.fs_info().await.unwrap();
    assert!(info_after.used_bytes < info_before.used_bytes);
    assert!(info_after.inodes_used < info_before.inodes_used);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_block_rootfs_build_one_ext4() {
    if !host_ready() {
        return;
    }
    let reg = Registry::start().await;
    let img = TestImage::new(vec![layer(
        &[E::File("f", 0o644, 0, b"f".to_vec())],
        Comp::Gzip,
    )]);
    reg.push_image("test/block", "1", &img).await;
    let sd = StoreDir::new();
    let store = Arc::new(ImageStore::open(sd.config()).unwrap());
    let image = store
        .pull_image(&format!("{}/test/block:1", reg.host()), None)
        .await
        .unwrap();
    let (a, b) = tokio::join!(
        store.prepare_block_rootfs(&image.id, "b1"),
        store.prepare_block_rootfs(&image.id, "b2")
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a, b);
    let names: Vec<_> = std::fs::read_dir(sd.dir.path().join("blockimages"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [format!("{}.ext4", &image.id[7..])],
        "one block image, no temp left"
    );
    // A removed image keeps its block image while block containers use it.
    store.remove_image(&image.id).await.unwrap();
    store.remove_rootfs("b1").await.unwrap();
    assert!(sd.dir.path().join("blockimages").join(&names[0]).exists());
    store.remove_rootfs("b2").await.unwrap();
    assert!(!sd.dir.path().join("blockimages").join(&names[0]).exists());
    assert_eq!(
        std::fs::read_dir(sd.dir.path().join("containers"))
            .unwrap()
            .count(),
        0
    );
}

/// A bounded writable layer: writes past `writable_layer_max_mib` get
/// ENOSPC, the image is untouched, and removal leaves no mount or loop
/// device behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writable_layer_stops_at_its_size() {
    if !host_ready() {
        return;
    }
    let reg = Registry::start().await;
    let top = layer(&[E::File("f", 0o644, 0, b"image".to_vec())], Comp::Gzip);
    let img = reg
        .push_image("test/bounded", "1", &TestImage::new(vec![top]))
        .await;
    let _ = img;
    let sd = StoreDir::new();
    let mut config = sd.config();
    config.writable_layer_max_mib = Some(8);
    let store = ImageStore::open(config).unwrap();
    let image = store
        .pull_image(&format!("{}/test/bounded:1", reg.host()), None)
        .await
        .unwrap();
    let loops_before = loop_devices();
    let rootfs = store.prepare_rootfs(&image.id, "c1").await.unwrap();
    assert_eq!(std::fs::read(rootfs.join("f")).unwrap(), b"image");
    let big = vec![0x5a_u8; 1 << 20];
    let mut file = std::fs::File::create(rootfs.join("big")).unwrap();
    let mut written = 0usize;
    let err = loop {
        match std::io::Write::write_all(&mut file, &big) {
            Ok(()) => written += big.len(),
            Err(e) => break e,
        }
        assert!(
            written <= 16 << 20,
            "wrote {written} bytes into an 8 MiB layer"
        );
    };
    assert_eq!(err.raw_os_error(), Some(28), "ENOSPC: {err}");
    drop(file);
    eprintln!("wrote {} MiB into an 8 MiB layer", written >> 20);
    assert!(written >= 4 << 20, "only {written} bytes fit");
    // The host's copy of the image is untouched.
    std::fs::write(rootfs.join("f"), b"changed").unwrap();
    assert_eq!(
        std::fs::read(store.snapshot_path(&image.chain_ids[0]).join("f")).unwrap(),
        b"image"
    );
    store.remove_rootfs("c1").await.unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&sd.dir.path().display().to_string()),
        "mounts left: {mounts}"
    );
    assert!(!sd.dir.path().join("containers/c1").exists());
    assert_eq!(loop_devices(), loops_before, "the loop device is released");
}

/// Loop devices with a backing file.
fn loop_devices() -> usize {
    std::fs::read_dir("/sys/block")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
                .filter(|e| e.path().join("loop/backing_file").exists())
                .count()
        })
        .unwrap_or(0)
}
