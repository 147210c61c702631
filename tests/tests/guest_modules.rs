//! Kernel modules on demand in a real pod VM: a privileged container's
//! `ip link add … type bridge` and `brctl addbr` make the guest kernel ask
//! its modprobe (the agent) for `rtnl-link-bridge` / `bridge`, which it
//! loads from the read-only modules disk; the guest cannot write that disk.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::Path;

use podsandbox::{
    container::{ContainerConfig, Rootfs},
    Runtime, SandboxConfig,
};
use tests::TestEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileged_containers_load_modules_from_a_read_only_disk() {
    tokio::time::timeout(std::time::Duration::from_secs(600), scenario())
        .await
        .expect("the modules scenario did not finish within 10 minutes");
}

fn sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The access mode QEMU opened `image` with: `flags` of its fdinfo.
fn open_mode(pid: i32, image: &Path) -> Vec<u32> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("QEMU's fds");
    fds.flatten()
        .filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == image))
        .map(|fd| {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .expect("fdinfo");
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .expect("flags line");
            u32::from_str_radix(flags.trim(), 8).expect("octal flags") & nix::libc::O_ACCMODE as u32
        })
        .collect()
}

async fn scenario() {
    let env = TestEnv::new();
    let image = tests::guest_dir().join("modules.img");
    assert!(
        image.is_file(),
        "{} is missing: `make guest` builds it",
        image.display()
    );
    assert_eq!(env.config.hypervisor.modules, image);
    let before = sha256(&image);

    let rt = Runtime::new(env.config.clone()).expect("runtime");
    rt.create_sandbox(SandboxConfig {
        id: "pod".into(),
        memory_mib: Some(512),
        ..Default::default()
    })
    .await
    .expect("create sandbox");
    rt.start_sandbox("pod").await.expect("start sandbox");
    let console =
        || std::fs::read_to_string(env.run_dir("pod").join("console.log")).unwrap_or_default();

    // QEMU holds the shared image read-only.
    let pid = rt
        .status_sandbox("pod")
        .await
        .expect("status")
        .pid
        .expect("QEMU runs");
    let modes = open_mode(pid, &image);
    assert!(!modes.is_empty(), "QEMU has {} open", image.display());
    assert!(
        modes.iter().all(|m| *m == nix::libc::O_RDONLY as u32),
        "QEMU opened {} with access modes {modes:?}",
        image.display()
    );

    let rootfs = tests::busybox_rootfs(env.dir.path());
    rt.create_container(
        "pod",
        ContainerConfig {
            id: "priv".into(),
            rootfs: Rootfs::Dir(rootfs),
            args: vec!["/bin/sleep".into(), "1000".into()],
            cap_add: vec!["ALL".into()],
            log_path: Some(env.dir.path().join("priv.log")),
            ..Default::default()
        },
    )
    .await
    .expect("create container");
    rt.start_container("pod", "priv").await.expect("start");
    let sh = |script: &str| {
        let rt = rt.clone();
        let script = script.to_string();
        async move {
            let r = rt
                .exec_sync(
                    "pod",
                    "priv",
                    vec!["/bin/sh".into(), "-c".into(), script.clone()],
                    Some(std::time::Duration::from_secs(120)),
                )
                .await
                .expect("exec");
            (
                r.exit_code,
                String::from_utf8_lossy(&r.stdout).into_owned(),
                String::from_utf8_lossy(&r.stderr).into_owned(),
            )
        }
    };

    // rtnl-link-bridge: an alias of bridge, which needs stp and llc first.
    let (code, out, err) =
        sh("grep -w bridge /proc/modules; ip link add br0 type bridge && ip -o link show br0")
            .await;
    assert_eq!(
        code,
        0,
        "ip link add br0 type bridge: {out}{err}\nconsole:\n{}",
        console()
    );
    assert!(
        !out.starts_with("bridge "),
        "bridge was loaded before: {out}"
    );
    assert!(out.contains("br0"), "{out}");
    let (code, modules, _) = sh("cat /proc/modules").await;
    assert_eq!(code, 0);
    for module in ["bridge", "stp", "llc"] {
        assert!(
            modules
                .lines()
                .any(|l| l.starts_with(&format!("{module} "))),
            "{module} not in /proc/modules:\n{modules}"
        );
    }
    // By module name (SIOCBRADDBR), now loaded; and another alias.
    let (code, out, err) = sh("brctl addbr br1 && ip -o link show br1").await;
    assert_eq!(code, 0, "brctl addbr br1: {out}{err}");
    assert!(out.contains("br1"), "{out}");
    let (code, out, err) = sh("ip link add d0 type dummy && grep -w '^dummy' /proc/modules").await;
    assert_eq!(
        code,
        0,
        "ip link add d0 type dummy: {out}{err}\nconsole:\n{}",
        console()
    );
    // An unknown kind stays unknown (modprobe fails, the kernel says so).
    let (code, out, err) = sh("ip link add x0 type nosuchkind").await;
    assert_ne!(code, 0, "{out}{err}");

    // The guest sees a write-protected disk, and writing it fails even after
    // clearing the guest's own read-only flag.
    let (code, out, err) = sh(
        "for d in /sys/block/*; do \
           [ \"$(cat $d/serial 2>/dev/null)\" = vc-modules ] && echo ${d##*/} $(cat $d/ro) $(cat $d/dev); \
         done",
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let fields: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "one modules disk: {out:?}");
    assert_eq!(fields[1], "1", "/sys/block/{}/ro", fields[0]);
    let (major, minor) = fields[2].split_once(':').expect("MAJ:MIN");
    let (code, out, err) = sh(&format!(
        "mknod /dev/vcmodules b {major} {minor} || exit 100; \
         blockdev --setrw /dev/vcmodules; \
         dd if=/dev/zero of=/dev/vcmodules bs=4096 count=1 conv=notrunc,fsync"
    ))
    .await;
    eprintln!("writing the modules disk from the guest: exit {code}: {out}{err}");
    assert_ne!(code, 100, "mknod: {out}{err}");
    assert_ne!(code, 0, "a write to the modules disk succeeded: {out}{err}");
    // Opened fine: the block layer refused the write itself.
    assert!(err.contains("error writing"), "{out}{err}");
    let (code, out, err) = sh(
        "mkdir -p /mnt/m && mount -t ext4 -o rw /dev/vcmodules /mnt/m 2>&1 || exit 101; \
         grep ' /mnt/m ' /proc/mounts; touch /mnt/m/x; rc=$?; umount /mnt/m; exit $rc",
    )
    .await;
    eprintln!("mounting the modules disk rw in the guest: exit {code}: {out}{err}");
    assert_ne!(code, 0, "the modules disk mounted writable: {out}{err}");
    assert!(
        !out.lines()
            .any(|l| l.contains(" /mnt/m ") && l.contains(" rw,")),
        "{out}"
    );

    rt.stop_sandbox("pod").await.expect("stop");
    rt.delete_sandbox("pod").await.expect("delete");
    assert_eq!(sha256(&image), before, "the modules image changed");
    env.assert_nothing_left("pod");
}
