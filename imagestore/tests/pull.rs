//! Pulls from a real docker-registry: by tag, by digest, through an index,
//! through a mirror, with basic auth; corrupted blobs; concurrent pulls; restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;

use imagestore::{
    AuthConfig, ErrorKind, HostConfig, ImageError, ImageService as _, ImageStore, ImageUser,
    Platform,
};
use support::*;

fn busybox_image() -> (TestImage, Vec<E>) {
    let entries = busybox_entries();
    (TestImage::new(vec![layer(&entries, Comp::Gzip)]), entries)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_by_tag_digest_and_index_then_run_busybox() {
    if !host_ready() {
        return;
    }
    let reg = Registry::start().await;
    let (img, entries) = busybox_image();
    let amd = reg.push_image("test/busybox", "amd64-only", &img).await;
    let mut arm_img = TestImage::new(vec![layer(
        &[E::File("arm", 0o644, 0, b"arm".to_vec())],
        Comp::Gzip,
    )]);
    arm_img.arch = "arm64".into();
    let arm = reg.push_image("test/busybox", "arm64-only", &arm_img).await;
    let index = reg
        .push_index("test/busybox", "1.0", &[("arm64", &arm), ("amd64", &amd)])
        .await;

    let sd = StoreDir::new();
    let store = ImageStore::open(sd.config()).unwrap();
    let host = reg.host();

    // By tag of an index: the host's platform is chosen.
    let image = store
        .pull_image(&format!("{host}/test/busybox:1.0"), None)
        .await
        .unwrap();
    assert_eq!(image.id, amd.config.to_string());
    assert_eq!(image.repo_tags, vec![format!("{host}/test/busybox:1.0")]);
    assert_eq!(
        image.repo_digests,
        vec![format!("{host}/test/busybox@{index}")]
    );
    assert_eq!(image.user(), ImageUser::Uid(1000));
    assert_eq!(
        image.config.cmd.as_deref(),
        Some(&["/bin/sh".to_string()][..])
    );
    assert_eq!(image.config.stop_signal.as_deref(), Some("SIGQUIT"));
    for b in [&index, &amd.manifest, &amd.config, &amd.layers[0]] {
        assert!(store.blob_path(b).is_file(), "blob {b} stored");
    }

    // By digest of the platform manifest: same image, one more repo digest.
    let by_digest = store
        .pull_image(&format!("{host}/test/busybox@{}", amd.manifest), None)
        .await
        .unwrap();
    assert_eq!(by_digest.id, image.id);
    assert!(by_digest
        .repo_digests
        .contains(&format!("{host}/test/busybox@{}", amd.manifest)));
    assert_eq!(store.list_images(None).len(), 1);
    assert_eq!(
        store
            .image_status(&format!("{host}/test/busybox@{index}"))
            .unwrap()
            .id,
        image.id
    );
    assert_eq!(store.image_status(&image.id).unwrap().id, image.id);
    assert_eq!(
        store
            .list_images(Some(&format!("{host}/test/busybox:1.0")))
            .len(),
        1
    );
    assert!(store
        .list_images(Some(&format!("{host}/test/busybox:2.0")))
        .is_empty());
    assert_eq!(
        store.image_status("nope:1").unwrap_err().kind(),
        ErrorKind::NotFound
    );

    // A wrong digest is refused.
    let wrong = imagestore::Digest::of(b"other");
    let e = store
        .pull_image(&format!("{host}/test/busybox@{wrong}"), None)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");

    // The rootfs matches the layer and runs busybox; writes land in the upper dir only.
    let rootfs = store.prepare_rootfs(&image.id, "c1").await.unwrap();
    assert_eq!(read_tree(&rootfs), model(&[&entries]));
    // On the host the image's device nodes and set-id files are inert.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let options = mountinfo
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.get(4).map(std::path::Path::new) == Some(rootfs.as_path()))
        .and_then(|f| f.get(5).map(|o| o.to_string()))
        .unwrap_or_else(|| panic!("{} is not mounted", rootfs.display()));
    for flag in ["nodev", "nosuid"] {
        assert!(
            options.split(',').any(|o| o == flag),
            "{flag} missing: {options}"
        );
    }
    let out = std::process::Command::new("chroot")
        .arg(&rootfs)
        .args([
            "/bin/sh",
            "-c",
            "echo hello > /tmp/written && cat /tmp/written && id -u",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n0\n");
    let upper = sd.dir.path().join("containers/c1/upper/tmp/written");
    assert_eq!(std::fs::read(&upper).unwrap(), b"hello\n");
    let snapshot = store.snapshot_path(&image.chain_ids[0]);
    assert!(!snapshot.join("tmp/written").exists());
    assert_eq!(
        store
            .prepare_rootfs(&image.id, "c1")
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::AlreadyExists
    );
    store.remove_rootfs("c1").await.unwrap();
    assert!(!sd.dir.path().join("containers/c1").exists());
    assert_eq!(
        store.remove_rootfs("c1").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );

    // Another platform from the same index.
    let sd2 = StoreDir::new();
    let arm_store = ImageStore::open(sd2.config())
        .unwrap()
        .with_platform(Platform {
            architecture: "arm64".into(),
            os: "linux".into(),
            variant: None,
        });
    let arm_image = arm_store
        .pull_image(&format!("{host}/test/busybox:1.0"), None)
        .await
        .unwrap();
    assert_eq!(arm_image.id, arm.config.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_through_mirror_and_docker_media_types() {
    if !host_ready() {
        return;
    }
    let mirror = Registry::start().await;
    let mut img = TestImage::new(vec![layer(
        &[E::File("hello", 0o644, 0, b"hi".to_vec())],
        Comp::Gzip,
    )]);
    img.layers[0].docker = true;
    img.manifest_type = "application/vnd.docker.distribution.manifest.v2+json".into();
    let pushed = mirror.push_image("library/busybox", "latest", &img).await;

    let sd = StoreDir::new();
    let mut cfg = sd.config();
    // docker.io served by the local registry; never the internet.
    cfg.registries.hosts.insert(
        "docker.io".into(),
        HostConfig {
            mirrors: vec![mirror.base()],
            skip_upstream: true,
            plain_http: false,
        },
    );
    let store = ImageStore::open(cfg).unwrap();
    let image = store.pull_image("busybox", None).await.unwrap();
    assert_eq!(image.id, pushed.config.to_string());
    assert_eq!(
        image.repo_tags,
        vec!["docker.io/library/busybox:latest".to_string()]
    );
    assert_eq!(store.image_status("busybox").unwrap().id, image.id);
    assert_eq!(
        store
            .image_status("docker.io/library/busybox:latest")
            .unwrap()
            .id,
        image.id
    );
    let missing = store.pull_image("busybox:nope", None).await.unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound, "{missing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_with_basic_auth() {
    if !host_ready() {
        return;
    }
    let reg = Registry::start_with(Some(("alice", "wonderland"))).await;
    let img = TestImage::new(vec![layer(
        &[E::File("secret", 0o600, 0, b"s".to_vec())],
        Comp::Zstd,
    )]);
    let pushed = reg.push_image("private/app", "v1", &img).await;
    let reference = format!("{}/private/app:v1", reg.host());

    let sd = StoreDir::new();
    let store = ImageStore::open(sd.config()).unwrap();
    let anon = store.pull_image(&reference, None).await.unwrap_err();
    assert!(
        matches!(anon, ImageError::Unauthorized { status: 401, .. }),
        "{anon}"
    );
    let wrong = AuthConfig {
        username: "alice".into(),
        password: "nope".into(),
        ..Default::default()
    };
    let e = store.pull_image(&reference, Some(wrong)).await.unwrap_err();
    assert!(matches!(e, ImageError::Unauthorized { .. }), "{e}");
    assert!(store.list_images(None).is_empty());

    let good = AuthConfig {
        username: "alice".into(),
        password: "wonderland".into(),
        ..Default::default()
    };
    let image = store.pull_image(&reference, Some(good)).await.unwrap();
    assert_eq!(image.id, pushed.config.to_string());

    // The `auth` field (base64 user:password) works too, in a fresh store.
    let sd2 = StoreDir::new();
    let store2 = ImageStore::open(sd2.config()).unwrap();
    let b64 = AuthConfig {
        auth: "YWxpY2U6d29uZGVybGFuZA==".into(),
        ..Default::default()
    };
    assert_eq!(
        store2.pull_image(&reference, Some(b64)).await.unwrap().id,
        image.id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_blob_is_a_digest_error_and_nothing_is_stored() {
    if !host_ready() {
        return;
    }
    let reg = Registry::start().await;
    let img = TestImage::new(vec![
        layer(&[E::File("a", 0o644, 0, vec![b'a'; 10_000])], Comp::Gzip),
        layer(&[E::File("b", 0o644, 0, vec![b'b'; 10_000])], Comp::None),
    ]);
    let pushed = reg.push_image("test/corrupt", "1", &img).await;
    // Flip bytes of the second layer in the registry's storage; same length.
    let data_path = reg.blob_data_path(&pushed.layers[1]);
    let mut data = std::fs::read(&data_path).unwrap();
    let n = data.len();
    data[n - 2000] ^= 0xff;
    std::fs::write(&data_path, &data).unwrap();

    let sd = StoreDir::new();
    let store = ImageStore::open(sd.config()).unwrap();
    let e = store
        .pull_image(&format!("{}/test/corrupt:1", reg.host()), None)
        .await
        .unwrap_err();
    match &e {
        ImageError::DigestMismatch { expected, .. } => {
            assert_eq!(expected, &pushed.layers[1].to_string())
        }
        other => panic!("expected a digest mismatch, got {other}"),
    }
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    assert!(!store.blob_path(&pushed.layers[1]).exists());
    assert!(
        !store.blob_path(&pushed.manifest).exists(),
        "no manifest for an incomplete image"
    );
    assert_eq!(
        std::fs::read_dir(sd.dir.path().join("blobs/ingest"))
            .unwrap()
            .count(),
        0
    );
    assert!(store.list_images(None).is_empty());
    let snapshots: Vec<_> = std::fs::read_dir(sd.dir.path().join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        snapshots.iter().all(|s| !s.starts_with('.')),
        "no temp snapshot left: {snapshots:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_download_each_blob_once_and_restart_keeps_images() {
    if !host_ready() {
        return;
    }
    let reg = Registry::start().await;
    let layers: Vec<_> = (0..4)
        .map(|i| {
            layer(
                &[E::File(
                    ["l0", "l1", "l2", "l3"][i],
                    0o644,
                    0,
                    vec![i as u8; 300_000],
                )],
                Comp::Gzip,
            )
        })
        .collect();
    let pushed = reg
        .push_image("test/concurrent", "1", &TestImage::new(layers))
        .await;
    let reference = format!("{}/test/concurrent:1", reg.host());

    let sd = StoreDir::new();
    let store = Arc::new(ImageStore::open(sd.config()).unwrap());
    let (a, b) = tokio::join!(store.pull(&reference, None), store.pull(&reference, None));
    assert_eq!(a.unwrap().id, b.unwrap().id);
    for d in pushed.layers.iter().chain([&pushed.config]) {
        assert_eq!(reg.blob_gets(d), 1, "blob {d} fetched once");
    }
    let before = store.fs_info().await.unwrap();
    assert!(
        before.used_bytes > 1_000_000 / 4 && before.inodes_used > 8,
        "{before:?}"
    );
    // One store per root.
    let second = ImageStore::open(sd.config()).unwrap_err();
    assert!(matches!(second, ImageError::RootInUse { .. }), "{second}");
    drop(store);
    // Leftovers of a crash between writing content and recording it are swept at open.
    let orphan_blob = sd.dir.path().join("blobs/sha256").join("ab".repeat(32));
    let orphan_snapshot = sd.dir.path().join("snapshots").join("cd".repeat(32));
    std::fs::write(&orphan_blob, b"orphan").unwrap();
    std::fs::create_dir_all(orphan_snapshot.join("etc")).unwrap();

    let store = ImageStore::open(sd.config()).unwrap();
    assert!(!orphan_blob.exists() && !orphan_snapshot.exists());
    let image = store.image_status(&reference).unwrap();
    for c in &image.chain_ids {
        assert!(
            store.snapshot_path(c).is_dir(),
            "recorded snapshots survive the sweep"
        );
    }
    assert_eq!(image.id, pushed.config.to_string());
    // A re-pull after the restart fetches nothing again.
    store.pull_image(&reference, None).await.unwrap();
    for d in &pushed.layers {
        assert_eq!(reg.blob_gets(d), 1);
    }
    let rootfs = store
        .prepare_rootfs(&reference, "after-restart")
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(rootfs.join("l3")).unwrap(),
        vec![3u8; 300_000]
    );
    store.remove_rootfs("after-restart").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_with_bearer_tokens() {
    if !host_ready() {
        return;
    }
    let reg = Registry::start().await;
    let img = TestImage::new(vec![layer(
        &[E::File("t", 0o644, 0, b"t".to_vec())],
        Comp::Gzip,
    )]);
    let pushed = reg.push_image("private/tok", "1", &img).await;
    let proxy = TokenProxy::start(reg.base(), "bob", "builder").await;
    let reference = format!("{}/private/tok:1", proxy.host());
    let count = || {
        proxy
            .token_requests
            .load(std::sync::atomic::Ordering::SeqCst)
    };

    let cases = [
        ("anonymous", None, false),
        (
            "wrong password",
            Some(AuthConfig {
                username: "bob".into(),
                password: "x".into(),
                ..Default::default()
            }),
            false,
        ),
        (
            "basic for a token",
            Some(AuthConfig {
                username: "bob".into(),
                password: "builder".into(),
                ..Default::default()
            }),
            true,
        ),
        (
            "identity token",
            Some(AuthConfig {
                identity_token: PROXY_REFRESH.into(),
                ..Default::default()
            }),
            true,
        ),
        (
            "registry token",
            Some(AuthConfig {
                registry_token: PROXY_TOKEN.into(),
                ..Default::default()
            }),
            true,
        ),
    ];
    for (name, auth, ok) in cases {
        let sd = StoreDir::new();
        let store = ImageStore::open(sd.config()).unwrap();
        let before = count();
        let res = store.pull_image(&reference, auth).await;
        match res {
            Ok(image) => {
                assert!(ok, "{name} must fail");
                assert_eq!(image.id, pushed.config.to_string(), "{name}");
            }
            Err(e) => {
                assert!(!ok, "{name}: {e}");
                assert!(matches!(e, ImageError::Unauthorized { .. }), "{name}: {e}");
            }
        }
        let asked = count() - before;
        match name {
            "registry token" => assert_eq!(asked, 0, "a registry token is used as is"),
            "anonymous" => assert_eq!(asked, 1),
            // One token per pull session, reused for every blob.
            _ => assert_eq!(asked, 1, "{name}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_layers_mount_beyond_one_page_of_options() {
    if !host_ready() {
        return;
    }
    let reg = Registry::start().await;
    let names: Vec<&'static str> = (0..60)
        .map(|i| &*Box::leak(format!("f{i}").into_boxed_str()))
        .collect();
    let layers = names
        .iter()
        .map(|n| layer(&[E::File(n, 0o644, 0, n.as_bytes().to_vec())], Comp::Gzip))
        .collect();
    reg.push_image("test/many", "1", &TestImage::new(layers))
        .await;
    let sd = StoreDir::new();
    let store = ImageStore::open(sd.config()).unwrap();
    let image = store
        .pull_image(&format!("{}/test/many:1", reg.host()), None)
        .await
        .unwrap();
    assert_eq!(image.chain_ids.len(), 60);
    let rootfs = store.prepare_rootfs(&image.id, "many").await.unwrap();
    for n in &names {
        assert_eq!(std::fs::read(rootfs.join(n)).unwrap(), n.as_bytes());
    }
    store.remove_rootfs("many").await.unwrap();
}

/// A registry that stalls mid-blob fails its pull after the progress timeout,
/// naming the blob and the registry; meanwhile nothing else waits for it:
/// another image's rootfs is prepared and removed (a collection, which takes
/// the store's lock exclusively) and another image is removed. What the pull
/// leased is spared by that collection, and freed once the pull failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_download_times_out_and_holds_up_nothing_else() {
    use std::time::{Duration, Instant};
    if !host_ready() {
        return;
    }
    let reg = Registry::start().await;
    let (busybox, _) = busybox_image();
    reg.push_image("test/a", "1", &busybox).await;
    let shared = layer(&[E::File("o", 0o644, 0, vec![b'o'; 1000])], Comp::None);
    let c = TestImage::new(vec![shared.clone()]);
    reg.push_image("test/c", "1", &c).await;
    let big = layer(&[E::File("big", 0o644, 0, vec![b'b'; 1 << 20])], Comp::None);
    let slow = reg
        .push_image("test/slow", "1", &TestImage::new(vec![shared, big]))
        .await;
    let proxy = StallProxy::start(reg.base(), slow.layers[1].clone()).await;

    let sd = StoreDir::new();
    let mut cfg = sd.config();
    let timeout = Duration::from_secs(5);
    cfg.pull_progress_timeout_secs = Some(timeout.as_secs());
    let store = Arc::new(ImageStore::open(cfg).unwrap());
    let a = store
        .pull_image(&format!("{}/test/a:1", reg.host()), None)
        .await
        .unwrap();
    let c = store
        .pull_image(&format!("{}/test/c:1", reg.host()), None)
        .await
        .unwrap();
    let shared_blob = store.blob_path(&c.layers[0]);
    let shared_snapshot = store.snapshot_path(&c.chain_ids[0]);

    let started = Instant::now();
    let slow_pull = tokio::spawn({
        let (store, r) = (store.clone(), format!("{}/test/slow:1", proxy.host()));
        async move { store.pull_image(&r, None).await }
    });
    tokio::time::timeout(Duration::from_secs(20), proxy.stalled.notified())
        .await
        .expect("the slow blob's download did not start");

    // Well within the progress timeout, each of these completes.
    let quick = Duration::from_secs(2);
    tokio::time::timeout(quick, store.prepare_rootfs(&a.id, "c1"))
        .await
        .expect("prepare_rootfs waited for the stalled pull")
        .unwrap();
    tokio::time::timeout(quick, store.remove_rootfs("c1"))
        .await
        .expect("remove_rootfs (a collection) waited for the stalled pull")
        .unwrap();
    tokio::time::timeout(quick, store.remove_image(&c.id))
        .await
        .expect("remove_image waited for the stalled pull")
        .unwrap();
    assert!(!slow_pull.is_finished(), "the slow pull is still stalled");
    assert!(
        shared_blob.is_file() && shared_snapshot.is_dir(),
        "the collection freed what the in-flight pull leased"
    );

    let e = slow_pull.await.unwrap().unwrap_err();
    let took = started.elapsed();
    let msg = e.to_string();
    assert!(matches!(e, ImageError::Stalled { .. }), "{e:?}");
    assert!(
        msg.contains(slow.layers[1].as_str()) && msg.contains(&proxy.host()),
        "{msg}"
    );
    assert_eq!(e.kind(), ErrorKind::DeadlineExceeded);
    assert!(took >= timeout && took < timeout * 4, "{took:?}");
    // Nothing of the failed pull stays; the other image is untouched.
    let names = |d: &str| -> Vec<String> {
        std::fs::read_dir(sd.dir.path().join(d))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert!(
        names("blobs/ingest").is_empty(),
        "{:?}",
        names("blobs/ingest")
    );
    assert!(
        !shared_blob.exists() && !shared_snapshot.exists(),
        "leftovers of the failed pull"
    );
    let images = store.list_images(None);
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].id, a.id);
    let mut blobs = names("blobs/sha256");
    blobs.sort();
    let mut want: Vec<String> = a.blobs.iter().map(|d| d.hex().to_string()).collect();
    want.sort();
    assert_eq!(blobs, want);
    assert_eq!(names("snapshots").len(), a.chain_ids.len());
}
