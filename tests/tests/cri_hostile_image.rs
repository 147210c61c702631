//! A hostile image end to end through vcrid (issue 14): a layer with
//! `trusted.overlay.*` xattrs (PAX records), device nodes (a copy of
//! /dev/null and of /dev/mem), a setuid-root file, a symlink pointing at a
//! host directory, and a deep directory chain;
//! its container also grows a 2,000-deep chain in its rootfs at run time.
//! The image pulls, the container runs, the host is unaffected, and removal
//! leaves nothing.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::large_futures
)]

use std::os::unix::fs::FileTypeExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use tests::cri::{container_config, create_started, pod_config, remove_pod, run_pod, CriEnv};
use tests::registry::{busybox_entries, layer, Comp, TestImage, TestLayer};

/// Depth of the chain inside the layer: each tar entry carries its whole
/// path, and the unpacker resolves it in one `openat2` (PATH_MAX), so a
/// layer cannot hold a 20,000-deep chain. The container grows another one in
/// its upper dir, as deep as the guest's busybox `cd` goes (it chdirs by the
/// whole logical path: PATH_MAX again, about 2,045 levels); safefs's own test
/// covers 20,000.
const LAYER_CHAIN_DEPTH: usize = 1_000;
const RUNTIME_CHAIN_DEPTH: usize = 2_000;

fn hostile_layer(host_dir: &Path) -> TestLayer {
    let mut b = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(size);
        h
    };
    // Overlay's own xattrs: a directory marked opaque, a file redirected.
    b.append_pax_extensions([("SCHILY.xattr.trusted.overlay.opaque", &b"y"[..])])
        .unwrap();
    b.append_data(
        &mut header(tar::EntryType::Directory, 0o755, 0),
        "opq/",
        &[][..],
    )
    .unwrap();
    b.append_pax_extensions([
        ("SCHILY.xattr.trusted.overlay.redirect", &b"/etc"[..]),
        ("SCHILY.xattr.trusted.evil", &b"1"[..]),
    ])
    .unwrap();
    b.append_data(
        &mut header(tar::EntryType::Regular, 0o644, 3),
        "redir",
        &b"xyz"[..],
    )
    .unwrap();
    // Device nodes: /dev/null's 1:3 and /dev/mem's 1:1.
    for (name, minor) in [("evilnull", 3), ("evilmem", 1)] {
        let mut h = header(tar::EntryType::Char, 0o666, 0);
        h.set_device_major(1).unwrap();
        h.set_device_minor(minor).unwrap();
        b.append_data(&mut h, name, &[][..]).unwrap();
    }
    // A setuid-root program.
    let script = b"#!/bin/sh\nid -u\n";
    b.append_data(
        &mut header(tar::EntryType::Regular, 0o4755, script.len() as u64),
        "suid",
        &script[..],
    )
    .unwrap();
    // A symlink at a host directory (a file written through it is refused
    // at unpack: imagestore's tests cover that; here the image must pull).
    let mut h = header(tar::EntryType::Symlink, 0o777, 0);
    b.append_link(&mut h, "escape", host_dir).unwrap();
    // The chain (long names as GNU long-name records).
    let mut path = String::from("chain");
    b.append_data(
        &mut header(tar::EntryType::Directory, 0o755, 0),
        &path,
        &[][..],
    )
    .unwrap();
    for _ in 0..LAYER_CHAIN_DEPTH {
        path.push_str("/d");
        b.append_data(
            &mut header(tar::EntryType::Directory, 0o755, 0),
            &path,
            &[][..],
        )
        .unwrap();
    }
    TestLayer {
        tar: b.into_inner().unwrap(),
        comp: Comp::None,
        docker: false,
    }
}

/// Every path under `root` (not following symlinks) with its metadata.
fn walk(root: &Path) -> Vec<(PathBuf, std::fs::Metadata)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if md.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
        out.push((p, md));
    }
    out
}

fn xattr_names(p: &Path) -> Vec<String> {
    let mut buf = vec![0u8; 64 << 10];
    match rustix::fs::llistxattr(p, &mut buf) {
        Ok(n) => buf[..n]
            .split(|&c| c == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// The mount options (per-mount and superblock) of the mount at `target`.
fn mount_options(target: &Path) -> Option<String> {
    let target = target.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(&target))
        .map(|l| l.split(' ').nth(5).unwrap_or("").to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_image_runs_and_leaves_the_host_alone() {
    tests::become_subreaper();
    let registry = tests::registry::Registry::start().await;
    // Where the layer's symlink points: must stay empty.
    let host_dir = tempfile::Builder::new()
        .prefix("vcr-hostile-host-")
        .tempdir_in("/tmp")
        .unwrap();
    let mut image = TestImage::new(vec![
        layer(&busybox_entries(), Comp::Gzip),
        hostile_layer(host_dir.path()),
    ]);
    image.config = serde_json::json!({"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"});
    let pushed = registry.push_image("hostile", "1", &image).await;
    let reference = format!("{}/hostile:1", registry.host());

    let mut env = CriEnv::new(64);
    env.start().await;
    let image_ref = env.pull(&reference).await;
    assert_eq!(image_ref, pushed.config.to_string());

    let store = env.dir.path().join("state/images");
    let diff_ids: Vec<_> = image
        .layers
        .iter()
        .map(|l| imagestore::Digest::of(&l.tar))
        .collect();
    let chains = imagestore::chain_ids(&diff_ids);
    let snapshot = store.join("snapshots").join(chains[1].hex());
    assert!(snapshot.is_dir(), "no snapshot {}", snapshot.display());

    // The snapshot on the host: no trusted.* xattr anywhere, the chain is
    // there, nothing went through the symlink.
    let files = walk(&store.join("snapshots"));
    let trusted: Vec<_> = files
        .iter()
        .flat_map(|(p, _)| xattr_names(p).into_iter().map(move |x| (p.clone(), x)))
        .filter(|(_, x)| x.starts_with("trusted."))
        .collect();
    assert!(
        trusted.is_empty(),
        "trusted xattrs on the host: {trusted:?}"
    );
    let depth = files
        .iter()
        .filter(|(p, md)| md.is_dir() && p.starts_with(snapshot.join("chain")))
        .count();
    assert_eq!(depth, LAYER_CHAIN_DEPTH + 1, "chain in the snapshot");
    let host_left: Vec<_> = std::fs::read_dir(host_dir.path())
        .unwrap()
        .flatten()
        .collect();
    assert!(
        host_left.is_empty(),
        "written outside the layer: {host_left:?}"
    );
    for name in ["evilnull", "evilmem"] {
        let p = snapshot.join(name);
        match std::fs::symlink_metadata(&p) {
            Err(_) => {}
            Ok(md) => {
                assert!(md.file_type().is_char_device(), "{name}: {md:?}");
                // vcrid keeps the store's snapshots on a nodev,nosuid mount:
                // the node does not open as a device on the host either.
                let opened = std::fs::File::open(&p);
                assert!(
                    matches!(&opened, Err(e) if e.raw_os_error() == Some(libc_eacces())),
                    "{name} on the host: {opened:?}"
                );
            }
        }
    }

    let mut rt = env.runtime().await;
    let pod_cfg = pod_config(&env, "hostile", "security");
    let pod = run_pod(&mut rt, pod_cfg.clone()).await;
    let script = format!(
        "ls /chain | head; cat /evilmem | head -c 16 > /dev/null; echo mem=$?; \
         ls -l /suid; echo x > /escape/pwned; mkdir /deep && cd /deep && i=0; \
         while [ $i -lt {RUNTIME_CHAIN_DEPTH} ]; do mkdir d && cd d || break; i=$((i+1)); done; \
         echo depth=$i; echo done; sleep 3600"
    );
    let ctr = create_started(
        &mut rt,
        &pod,
        &pod_cfg,
        container_config(&image_ref, "hostile", &["/bin/sh", "-c", &script]),
    )
    .await;
    // The container runs the whole script (the runtime chain takes a while under TCG).
    let log = Path::new(&pod_cfg.log_directory).join("hostile.log");
    let deadline = Instant::now() + Duration::from_secs(600);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("done") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the container did not finish: {text}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        text.contains(&format!("depth={RUNTIME_CHAIN_DEPTH}")),
        "{text}"
    );

    // On the host, through the container's overlay: nodev and nosuid, and
    // the device nodes do not open.
    let rootfs = store.join("containers").join(&ctr).join("rootfs");
    let opts = mount_options(&rootfs).expect("the container's rootfs is mounted");
    assert!(opts.contains("nodev") && opts.contains("nosuid"), "{opts}");
    for name in ["evilnull", "evilmem"] {
        let p = rootfs.join(name);
        if p.exists() || std::fs::symlink_metadata(&p).is_ok() {
            let opened = std::fs::File::open(&p);
            assert!(
                opened.is_err(),
                "{name} opened on the host through the overlay"
            );
        }
    }
    for (p, _) in walk(&rootfs).iter().take(5_000) {
        let xs: Vec<_> = xattr_names(p)
            .into_iter()
            .filter(|x| x.starts_with("trusted."))
            .collect();
        assert!(xs.is_empty(), "{}: {xs:?}", p.display());
    }
    let host_left: Vec<_> = std::fs::read_dir(host_dir.path())
        .unwrap()
        .flatten()
        .collect();
    assert!(
        host_left.is_empty(),
        "written outside the rootfs: {host_left:?}"
    );

    // Removal, with the container's deep chain in its upper dir.
    remove_pod(&mut rt, &pod).await;
    let mut images = env.images().await;
    images
        .remove_image(cri::RemoveImageRequest {
            image: Some(cri::ImageSpec {
                image: image_ref.clone(),
                ..Default::default()
            }),
        })
        .await
        .expect("RemoveImage");
    let left = |d: &str| -> Vec<String> {
        std::fs::read_dir(store.join(d))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(
        left("snapshots").is_empty(),
        "snapshots left: {:?}",
        left("snapshots")
    );
    assert!(
        left("containers").is_empty(),
        "containers left: {:?}",
        left("containers")
    );
    assert!(
        left("blobs/sha256").is_empty(),
        "blobs left: {:?}",
        left("blobs/sha256")
    );
    env.assert_no_pods_left();
    let pid = env.pid().expect("vcrid runs");
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "vcrid died: {}",
        env.log()
    );
    let vlog = env.log();
    assert!(!vlog.contains("panicked"), "vcrid panicked: {vlog}");
}

/// EACCES: what opening a device node on a nodev mount fails with.
fn libc_eacces() -> i32 {
    nix::errno::Errno::EACCES as i32
}
