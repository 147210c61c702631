//! Container rootfs of both kinds through the CRI, in real pod VMs: (a) the
//! host overlay shared over virtio-fs and (b) a qcow2 overlay of the image's
//! ext4 image, attached as a SCSI disk and mounted by the agent. Two
//! containers of one image in one pod: what one writes, the other never sees,
//! and the image's own layers (snapshots, ext4 image) stay as they were.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::large_futures
)]

use std::path::{Path, PathBuf};

use k8s_cri::v1 as cri;
use tests::cri::{create_started, remove_pod, run_pod, CriEnv, Runtime};
use tests::registry as support;

async fn plain_pod(rt: &mut Runtime, env: &CriEnv, name: &str) -> (String, cri::PodSandboxConfig) {
    run_pod_with(rt, env, name, &[], "").await
}

async fn run_pod_with(
    rt: &mut Runtime,
    env: &CriEnv,
    name: &str,
    sysctls: &[(&str, &str)],
    cgroup_parent: &str,
) -> (String, cri::PodSandboxConfig) {
    let log_dir = env.dir.path().join("logs").join(name);
    let cfg = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "rootfs".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_dir.display().to_string(),
        linux: Some(cri::LinuxPodSandboxConfig {
            sysctls: sysctls
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cgroup_parent: cgroup_parent.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = run_pod(rt, cfg.clone()).await;
    (id, cfg)
}

async fn sleeper(
    rt: &mut Runtime,
    pod: &str,
    pod_cfg: &cri::PodSandboxConfig,
    image: &str,
    name: &str,
) -> String {
    let config = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: vec!["/bin/sleep".into(), "3600".into()],
        log_path: format!("{name}.log"),
        ..Default::default()
    };
    create_started(rt, pod, pod_cfg, config).await
}

/// Runs `script` with sh in the container; its stdout, asserting exit 0.
async fn sh(rt: &mut Runtime, id: &str, script: &str) -> String {
    let r = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: vec!["/bin/sh".into(), "-c".into(), script.into()],
            timeout: 60,
        })
        .await
        .expect("ExecSync")
        .into_inner();
    assert_eq!(
        r.exit_code,
        0,
        "{script}: stdout {:?} stderr {:?}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    String::from_utf8_lossy(&r.stdout).into_owned()
}

/// The filesystem type of `/` as the container sees it.
async fn root_fstype(rt: &mut Runtime, id: &str) -> String {
    let mounts = sh(rt, id, "cat /proc/mounts").await;
    // The last mount on / is the one in effect.
    mounts
        .lines()
        .rev()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[1] == "/").then(|| f[2].to_string())
        })
        .unwrap_or_else(|| panic!("no / in {mounts}"))
}

/// Both containers write a file of their own; each sees only its own.
async fn writes_stay_apart(rt: &mut Runtime, a: &str, b: &str) {
    sh(rt, a, "echo from-a > /written-by-a && sync").await;
    sh(rt, b, "echo from-b > /written-by-b && sync").await;
    assert_eq!(sh(rt, a, "cat /written-by-a").await.trim(), "from-a");
    assert_eq!(
        sh(rt, a, "test -e /written-by-b && echo seen || echo absent")
            .await
            .trim(),
        "absent"
    );
    assert_eq!(
        sh(rt, b, "test -e /written-by-a && echo seen || echo absent")
            .await
            .trim(),
        "absent"
    );
    // The image's own files are there and unchanged for both.
    assert!(sh(rt, a, "ls /bin").await.contains("busybox"));
}

async fn remove_container(rt: &mut Runtime, id: &str) {
    rt.stop_container(cri::StopContainerRequest {
        container_id: id.into(),
        timeout: 0,
    })
    .await
    .expect("StopContainer");
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: id.into(),
    })
    .await
    .expect("RemoveContainer");
}

/// Files under `dir` (recursively) whose name ends with `suffix`.
fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(suffix) {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_dir_rootfs_writes_land_in_each_containers_upper_dir() {
    tests::become_subreaper();
    let registry = support::Registry::start().await;
    let image = tests::cri::push_busybox(&registry, "rootfs-dir").await;
    let mut env = CriEnv::new(47);
    env.start().await;
    env.pull(&image).await;
    let mut rt = env.runtime().await;
    // A sysctl that is not the pod's own is refused before anything starts.
    let err = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(cri::PodSandboxConfig {
                metadata: Some(cri::PodSandboxMetadata {
                    name: "bad-sysctl".into(),
                    uid: "uid-bad".into(),
                    namespace: "rootfs".into(),
                    attempt: 0,
                }),
                linux: Some(cri::LinuxPodSandboxConfig {
                    sysctls: [("kernel.pid_max".to_string(), "4096".to_string())].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            runtime_handler: String::new(),
        })
        .await
        .expect_err("a global sysctl");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("kernel.pid_max"),
        "{}",
        err.message()
    );
    // Network sysctls land in the guest, IPC ones in each container.
    let (pod, cfg) = run_pod_with(
        &mut rt,
        &env,
        "dir",
        &[
            ("net.ipv4.ping_group_range", "0 2147483647"),
            ("kernel.shm_rmid_forced", "1"),
        ],
        &env.cgroup_parent("dir"),
    )
    .await;
    // The VM's processes are in the pod's cgroup, in every hierarchy.
    let qemu: Vec<i32> = tests::processes_mentioning(&env.dir.path().join("run"))
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("qemu-system"))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(qemu.len(), 1, "one QEMU: {qemu:?}");
    for (mount, own) in podsandbox::cgroup::hierarchies() {
        let leaf = mount
            .join(own)
            .join(env.cgroup_parent("dir").trim_start_matches('/'))
            .join(format!("vc-{pod}"));
        let procs = std::fs::read_to_string(leaf.join("cgroup.procs")).expect("pod cgroup");
        assert!(
            procs.lines().any(|l| l == qemu[0].to_string()),
            "QEMU {} not in {}",
            qemu[0],
            leaf.display()
        );
        // cgroup v1 memory: the pod accounts most of the VM's own memory —
        // its heap and the guest RAM it touched (not the page cache of its
        // libraries, charged to whoever read them first). What QEMU touched
        // before it was moved in (loading the kernel and initramfs) partly
        // stays with the runtime's cgroup: measured 138 of 214 MiB here.
        if let Ok(usage) = std::fs::read_to_string(leaf.join("memory.usage_in_bytes")) {
            let usage_kib = usage.trim().parse::<u64>().expect("usage") >> 10;
            let status =
                std::fs::read_to_string(format!("/proc/{}/status", qemu[0])).expect("status");
            let kib = |field: &str| -> u64 {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(field))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|n| n.parse().ok())
                    .expect(field)
            };
            let own = kib("RssAnon:") + kib("RssShmem:");
            eprintln!("pod memory cgroup {usage_kib} KiB; QEMU's anon + shmem {own} KiB");
            assert!(
                usage_kib >= own / 2,
                "the pod's memory cgroup holds {usage_kib} KiB of QEMU's {own} KiB"
            );
        }
    }
    let a = sleeper(&mut rt, &pod, &cfg, &image, "a").await;
    let b = sleeper(&mut rt, &pod, &cfg, &image, "b").await;
    assert_eq!(
        sh(&mut rt, &a, "cat /proc/sys/net/ipv4/ping_group_range")
            .await
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["0", "2147483647"]
    );
    assert_eq!(
        sh(&mut rt, &b, "cat /proc/sys/kernel/shm_rmid_forced")
            .await
            .trim(),
        "1"
    );
    let fstype = root_fstype(&mut rt, &a).await;
    assert!(
        fstype == "virtiofs" || fstype == "9p",
        "the shared-dir rootfs is the shared filesystem, got {fstype}"
    );
    writes_stay_apart(&mut rt, &a, &b).await;

    // On the host: each write is in that container's own upper dir, and in
    // no layer snapshot of the image.
    let images = env.dir.path().join("state/images");
    // (The upper dir lives on the container's bounded writable layer.)
    let upper_a = images.join("containers").join(&a).join("layer/upper");
    let upper_b = images.join("containers").join(&b).join("layer/upper");
    assert_eq!(
        std::fs::read_to_string(upper_a.join("written-by-a")).expect("a's upper"),
        "from-a\n"
    );
    assert!(!upper_a.join("written-by-b").exists());
    assert!(upper_b.join("written-by-b").exists());
    assert!(!upper_b.join("written-by-a").exists());
    assert!(
        files_ending(&images.join("snapshots"), "written-by-a").is_empty(),
        "a layer snapshot was written to"
    );

    remove_container(&mut rt, &a).await;
    assert!(!images.join("containers").join(&a).exists());
    remove_container(&mut rt, &b).await;
    remove_pod(&mut rt, &pod).await;
    env.assert_no_pods_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_rootfs_is_a_disk_per_container_and_writes_stay_in_its_overlay() {
    tests::become_subreaper();
    let registry = support::Registry::start().await;
    let image = tests::cri::push_busybox(&registry, "rootfs-block").await;
    let mut env = CriEnv::with_config(48, "\n[images]\nrootfs = \"block\"\n");
    env.start().await;
    env.pull(&image).await;
    let mut rt = env.runtime().await;
    let (pod, cfg) = plain_pod(&mut rt, &env, "block").await;
    let a = sleeper(&mut rt, &pod, &cfg, &image, "a").await;
    let b = sleeper(&mut rt, &pod, &cfg, &image, "b").await;
    assert_eq!(root_fstype(&mut rt, &a).await, "ext4");
    assert_eq!(root_fstype(&mut rt, &b).await, "ext4");
    // Two disks on the guest's SCSI bus, one per container.
    let disks = |s: String| s.split_whitespace().filter(|d| d.starts_with("sd")).count();
    assert_eq!(disks(sh(&mut rt, &a, "ls /sys/block").await), 2);
    writes_stay_apart(&mut rt, &a, &b).await;

    // On the host: one ext4 image for the image, never written to; one
    // qcow2 overlay per container.
    let images = env.dir.path().join("state/images");
    let ext4 = files_ending(&images.join("blockimages"), ".ext4");
    assert_eq!(ext4.len(), 1, "{ext4:?}");
    let listing = std::process::Command::new("debugfs")
        .args(["-R", "ls -l /"])
        .arg(&ext4[0])
        .output()
        .expect("debugfs");
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.contains("bin"), "debugfs sees the image: {listing}");
    assert!(
        !listing.contains("written-by"),
        "the shared ext4 image was written to: {listing}"
    );
    for c in [&a, &b] {
        assert!(images
            .join("containers")
            .join(c)
            .join("rootfs.qcow2")
            .is_file());
    }

    // Removing a container detaches its disk: the guest has one left.
    remove_container(&mut rt, &a).await;
    assert!(!images.join("containers").join(&a).exists());
    assert_eq!(disks(sh(&mut rt, &b, "ls /sys/block").await), 1);
    assert_eq!(sh(&mut rt, &b, "cat /written-by-b").await.trim(), "from-b");
    remove_container(&mut rt, &b).await;
    remove_pod(&mut rt, &pod).await;
    env.assert_no_pods_left();

    // Removing the image frees its block image.
    let mut img = env.images().await;
    img.remove_image(cri::RemoveImageRequest {
        image: Some(cri::ImageSpec {
            image: image.clone(),
            ..Default::default()
        }),
    })
    .await
    .expect("RemoveImage");
    assert!(files_ending(&images.join("blockimages"), ".ext4").is_empty());
}
