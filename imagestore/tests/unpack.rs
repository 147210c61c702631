//! Unpacking: a multi-layer image (gzip, zstd, plain) with whiteouts, opaque
//! dirs, hardlinks, symlinks, devices, xattrs, owners and modes, checked file
//! for file in the overlay view and in the ext4 block image; hostile layers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::os::unix::fs::MetadataExt as _;
use std::process::Command;

use imagestore::{ErrorKind, ImageError, ImageStore};
use support::*;

/// (name, entries, None = refused / Some((path inside the layer, content)) = contained)
type HostileCase<'a> = (&'a str, Vec<E>, Option<(String, &'a [u8])>);

fn getxattr(path: &std::path::Path, name: &str) -> Vec<u8> {
    let mut buf = vec![0u8; 256];
    let n = rustix::fs::lgetxattr(path, name, &mut buf[..]).unwrap();
    buf.truncate(n);
    buf
}

fn multi_layer() -> Vec<Vec<E>> {
    vec![
        vec![
            E::Dir("a", 0o755, 0),
            E::File("a/keep", 0o644, 0, b"keep".to_vec()),
            E::File("a/gone", 0o644, 0, b"gone".to_vec()),
            E::Dir("a/gonedir", 0o700, 0),
            E::File("a/gonedir/inner", 0o644, 0, b"x".to_vec()),
            E::Dir("d", 0o750, 1000),
            E::File("d/x", 0o644, 0, b"x".to_vec()),
            E::File("d/y", 0o644, 0, b"y".to_vec()),
            E::Dir("data", 0o755, 0),
            E::File("data/orig", 0o640, 1000, b"hardlinked".to_vec()),
            E::Hardlink("data/link", "data/orig"),
            E::File("setuid", 0o4755, 0, b"#!/bin/sh\n".to_vec()),
            E::Symlink("abs", "/a/keep"),
            E::Symlink("rel", "a/keep"),
            E::Dir("dev", 0o755, 0),
            E::Char("dev/null", 1, 3),
            E::Fifo("fifo"),
            E::XattrFile("xattr", "user.test", b"value"),
        ],
        vec![
            E::Whiteout("a/gone"),
            E::Whiteout("a/gonedir"),
            E::Opaque("d"),
            E::Dir("d", 0o750, 1000),
            E::File("d/z", 0o600, 1000, b"z".to_vec()),
            E::File("a/new", 0o644, 0, b"new".to_vec()),
        ],
        vec![
            E::File("a/keep", 0o444, 0, b"replaced".to_vec()),
            E::Dir("big", 0o755, 0),
            E::File(
                "big/blob",
                0o644,
                0,
                (0..2_000_000u32).map(|i| (i % 251) as u8).collect(),
            ),
            E::Hardlink("big/blob2", "big/blob"),
        ],
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_layer_rootfs_matches_the_model_as_overlay_and_block_image() {
    if !host_ready() {
        return;
    }
    let reg = Registry::start().await;
    let specs = multi_layer();
    let comps = [Comp::Gzip, Comp::Zstd, Comp::None];
    let layers = specs.iter().zip(comps).map(|(s, c)| layer(s, c)).collect();
    let pushed = reg
        .push_image("test/multi", "1", &TestImage::new(layers))
        .await;
    let sd = StoreDir::new();
    let store = ImageStore::open(sd.config()).unwrap();
    let image = store
        .pull_image(&format!("{}/test/multi:1", reg.host()), None)
        .await
        .unwrap();
    assert_eq!(image.id, pushed.config.to_string());
    let refs: Vec<&[E]> = specs.iter().map(|s| &s[..]).collect();
    let want = model(&refs);

    // Whiteouts are overlay whiteouts in the upper layer's own dir.
    let l1 = store.snapshot_path(&image.chain_ids[1]);
    let wh = std::fs::symlink_metadata(l1.join("a/gone")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(&wh.file_type()) && wh.rdev() == 0);
    assert_eq!(getxattr(&l1.join("d"), "trusted.overlay.opaque"), b"y");
    let l0 = store.snapshot_path(&image.chain_ids[0]);
    assert_eq!(
        std::fs::metadata(l0.join("data/orig")).unwrap().ino(),
        std::fs::metadata(l0.join("data/link")).unwrap().ino()
    );

    let rootfs = store.prepare_rootfs(&image.id, "multi").await.unwrap();
    assert_eq!(read_tree(&rootfs), want);
    // An independent unpacker agrees: skopeo copy + umoci unpack of the same image.
    let work = tempfile::tempdir().unwrap();
    let oci = format!("oci:{}:x", work.path().join("oci").display());
    let st = Command::new("skopeo")
        // Debian's umoci reads no zstd: let skopeo recompress with gzip.
        .args([
            "copy",
            "-q",
            "--src-tls-verify=false",
            "--dest-compress-format=gzip",
            "--dest-compress",
        ])
        .arg(format!("docker://{}/test/multi:1", reg.host()))
        .arg(&oci)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let bundle = work.path().join("bundle");
    let st = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:x", work.path().join("oci").display()))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "umoci: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    assert_eq!(read_tree(&bundle.join("rootfs")), read_tree(&rootfs));
    for (a, b) in [("data/orig", "data/link"), ("big/blob", "big/blob2")] {
        assert_eq!(
            std::fs::metadata(rootfs.join(a)).unwrap().ino(),
            std::fs::metadata(rootfs.join(b)).unwrap().ino(),
            "{a} and {b} are one inode"
        );
    }
    assert_eq!(getxattr(&rootfs.join("xattr"), "user.test"), b"value");
    assert_eq!(
        std::fs::metadata(rootfs.join("data/orig")).unwrap().gid(),
        1000
    );
    // mtimes from the tar headers, directories included (set after their contents).
    for p in ["data/orig", "data", "big", "big/blob", "abs", "dev/null"] {
        assert_eq!(
            std::fs::symlink_metadata(rootfs.join(p)).unwrap().mtime(),
            1_700_000_000,
            "{p}"
        );
    }

    // The same tree in the ext4 block image, and a qcow2 overlay backed by it.
    let qcow2 = store
        .prepare_block_rootfs(&image.id, "multi-block")
        .await
        .unwrap();
    let ext4 = sd
        .dir
        .path()
        .join("blockimages")
        .join(format!("{}.ext4", &image.id[7..]));
    let info = Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(&qcow2)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["backing-filename"], ext4.to_str().unwrap());
    assert_eq!(info["backing-filename-format"], "raw");
    let mnt = tempfile::tempdir().unwrap();
    let st = Command::new("mount")
        .args(["-o", "loop,ro"])
        .arg(&ext4)
        .arg(mnt.path())
        .status()
        .unwrap();
    assert!(st.success());
    let guard = MountGuard(mnt.path().to_path_buf());
    assert_eq!(read_tree(mnt.path()), want);
    assert_eq!(
        std::fs::metadata(mnt.path().join("data/orig"))
            .unwrap()
            .ino(),
        std::fs::metadata(mnt.path().join("data/link"))
            .unwrap()
            .ino()
    );
    drop(guard);

    // A second container reuses the block image; removing the image keeps it while
    // a container uses it, and removing the last container frees it.
    let mtime = std::fs::metadata(&ext4).unwrap().modified().unwrap();
    store
        .prepare_block_rootfs(&image.id, "multi-block2")
        .await
        .unwrap();
    assert_eq!(std::fs::metadata(&ext4).unwrap().modified().unwrap(), mtime);
    store.remove_rootfs("multi-block").await.unwrap();
    assert!(!qcow2.exists());
    store.remove_image(&image.id).await.unwrap();
    assert!(ext4.exists(), "still backing multi-block2");
    assert!(
        rootfs.join("a/keep").exists(),
        "snapshots kept for the overlay container"
    );
    store.remove_rootfs("multi-block2").await.unwrap();
    assert!(!ext4.exists());
    store.remove_rootfs("multi").await.unwrap();
    for c in &image.chain_ids {
        assert!(!store.snapshot_path(c).exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_layers_are_refused_or_contained() {
    if !host_ready() {
        return;
    }
    let reg = Registry::start().await;
    let host = host_dir();
    let h = host.path().to_str().unwrap().to_string();
    std::fs::write(host.path().join("victim"), b"original").unwrap();
    std::fs::write(host.path().join("secret"), b"secret").unwrap();
    let raw = |p: &str, kind, link: &str, data: &[u8]| {
        E::Raw(
            p.as_bytes().to_vec(),
            kind,
            link.as_bytes().to_vec(),
            data.to_vec(),
        )
    };
    use tar::EntryType::{Link, Regular, Symlink};
    let up = "../../../../../../../../..";
    // (name, entries, None = refused / Some((path inside the layer, content)) = contained)
    let cases: Vec<HostileCase> = vec![
        (
            "dotdot",
            vec![raw(&format!("{up}{h}/escaped"), Regular, "", b"pwned")],
            None,
        ),
        (
            "dotdot-middle",
            vec![raw(&format!("a/{up}{h}/escaped"), Regular, "", b"pwned")],
            None,
        ),
        (
            "abs-symlink-write",
            vec![
                raw("evil", Symlink, &h, b""),
                raw("evil/pwned", Regular, "", b"pwned"),
            ],
            None,
        ),
        (
            "abs-symlink-to-root",
            vec![
                raw("evil", Symlink, "/", b""),
                raw(&format!("evil{h}/victim"), Regular, "", b"overwritten"),
            ],
            Some((format!("{h}/victim"), b"overwritten")),
        ),
        (
            "symlink-then-file",
            vec![
                raw("f", Symlink, &format!("{h}/victim"), b""),
                raw("f", Regular, "", b"overwritten"),
            ],
            Some(("f".to_string(), b"overwritten")),
        ),
        (
            "hardlink-to-host",
            vec![raw("hl", Link, &format!("{h}/secret"), b"")],
            None,
        ),
        (
            "hardlink-dotdot",
            vec![raw("hl", Link, &format!("{up}{h}/secret"), b"")],
            None,
        ),
        (
            "hardlink-through-symlink",
            vec![raw("s", Symlink, &h, b""), raw("hl", Link, "s/secret", b"")],
            None,
        ),
        (
            "symlinked-parent",
            vec![
                raw("up", Symlink, up, b""),
                raw(&format!("up{h}/victim"), Regular, "", b"overwritten"),
            ],
            Some((format!("{h}/victim"), b"overwritten")),
        ),
    ];
    let sd = StoreDir::new();
    let store = ImageStore::open(sd.config()).unwrap();
    for (name, entries, contained) in &cases {
        let pushed = reg
            .push_image(
                &format!("hostile/{name}"),
                "1",
                &TestImage::new(vec![layer(entries, Comp::Gzip)]),
            )
            .await;
        let res = store
            .pull_image(&format!("{}/hostile/{name}:1", reg.host()), None)
            .await;
        match (&res, contained) {
            (Err(e), None) => {
                assert!(matches!(e, ImageError::HostileEntry { .. }), "{name}: {e}");
                assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
            }
            (Ok(image), Some((path, content))) => {
                assert_eq!(image.id, pushed.config.to_string());
                let p = store
                    .snapshot_path(&image.chain_ids[0])
                    .join(path.trim_start_matches('/'));
                assert_eq!(std::fs::read(&p).unwrap(), *content, "{name}");
                assert!(!std::fs::symlink_metadata(&p)
                    .unwrap()
                    .file_type()
                    .is_symlink());
            }
            (res, want) => panic!(
                "{name}: got {:?}, want contained {want:?}",
                res.as_ref().map(|i| &i.id).map_err(|e| e.to_string())
            ),
        }
        // The host is untouched.
        assert_eq!(
            std::fs::read(host.path().join("victim")).unwrap(),
            b"original",
            "{name}"
        );
        assert_eq!(
            std::fs::read(host.path().join("secret")).unwrap(),
            b"secret",
            "{name}"
        );
        assert_eq!(
            std::fs::metadata(host.path().join("secret"))
                .unwrap()
                .nlink(),
            1,
            "{name}"
        );
        let mut names: Vec<_> = std::fs::read_dir(host.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["secret", "victim"], "{name}");
    }
    // Nothing of the refused layers is left behind.
    let temp: Vec<_> = std::fs::read_dir(sd.dir.path().join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(temp.is_empty(), "{temp:?}");
}
