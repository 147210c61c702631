//! The Linux security context through the CRI, checked from inside real pod
//! VMs: masked and read-only paths (an exec sees them too), supplemental
//! groups with the image's own memberships, seccomp (RuntimeDefault shows
//! `Seccomp: 2`, a Localhost profile blocks what it names, in both the
//! field's and the deprecated path's form), a privileged container (the
//! guest's devices, every capability, a writable /sys, kernel modules
//! loaded on demand), host-to-container
//! mount propagation; and every combination a VM cannot honour refused with
//! InvalidArgument naming its field. The first pod has a 68-character
//! mixed-case name and no hostname, as the CRI validation suite sends.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::large_futures
)]

use std::{
    collections::BTreeSet,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use k8s_cri::v1 as cri;
use tests::cri::{create_started, remove_pod, run_pod, CriEnv, Runtime};
use tests::registry::{self as support, busybox_entries, layer, Comp, TestImage, E};
use tonic::Code;

/// The pod name the CRI validation suite gives its pods (68 characters,
/// upper case): no hostname comes with it.
const SUITE_POD: &str = "create-PodSandbox-for-container-d81bed96-edb7-11f1-9de8-de90307c4893";

fn pod_config(env: &CriEnv, name: &str, privileged: bool) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{}", name.len()),
            namespace: "security".into(),
            attempt: 0,
        }),
        log_directory: env
            .dir
            .path()
            .join("logs")
            .join(name.len().to_string())
            .display()
            .to_string(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                privileged,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container(
    image: &str,
    name: &str,
    sc: cri::LinuxContainerSecurityContext,
) -> cri::ContainerConfig {
    cri::ContainerConfig {
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
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(sc),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `script` under sh in the container: exit code, stdout, stderr.
async fn sh(rt: &mut Runtime, id: &str, script: &str) -> (i32, String, String) {
    let r = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: vec!["/bin/sh".into(), "-c".into(), script.into()],
            timeout: 60,
        })
        .await
        .expect("ExecSync")
        .into_inner();
    (
        r.exit_code,
        String::from_utf8_lossy(&r.stdout).into_owned(),
        String::from_utf8_lossy(&r.stderr).into_owned(),
    )
}

async fn sh_ok(rt: &mut Runtime, id: &str, script: &str) -> String {
    let (code, out, err) = sh(rt, id, script).await;
    assert_eq!(code, 0, "{script}: stdout {out:?} stderr {err:?}");
    out
}

/// What an exec's security context must share with its container's init
/// process (`sleep`, found by its cgroup): ids, groups, umask, the five
/// capability sets, no_new_privs (or stricter: see the script), seccomp,
/// signal dispositions and mask,
/// namespaces, cgroup, limits and OOM score. Prints what differs.
const SAME_AS_INIT: &str = r#"me=$(cat /proc/self/cgroup); init=
for p in /proc/[0-9]*; do
  [ "$(cat $p/cgroup 2>/dev/null)" = "$me" ] && [ "$(cat $p/comm 2>/dev/null)" = sleep ] && init=$p
done
[ -n "$init" ] || { echo "no init in $me"; exit 0; }
for f in Uid Gid Groups Umask CapInh CapPrm CapEff CapBnd CapAmb NoNewPrivs Seccomp Seccomp_filters SigIgn SigBlk; do
  a=$(grep "^$f:" /proc/self/status); b=$(grep "^$f:" $init/status)
  [ "$a" = "$b" ] && continue
  # Stricter, never looser: an exec installs seccomp after its capabilities
  # are dropped, with no_new_privs where that needs it (the init before).
  [ "$f" = NoNewPrivs ] && [ "${a##*[[:space:]]}" = 1 ] && [ "$(grep '^Seccomp:' /proc/self/status | tr -dc 0-9)" = 2 ] && continue
  echo "$f: exec [$a] init [$b]"
done
for n in ipc mnt net pid uts cgroup; do
  a=$(readlink /proc/self/ns/$n); b=$(readlink $init/ns/$n)
  [ "$a" = "$b" ] || echo "ns $n: exec $a init $b"
done
for f in cgroup limits oom_score_adj; do
  [ "$(cat /proc/self/$f)" = "$(cat $init/$f)" ] || echo "$f differs"
done"#;

async fn assert_same_as_init(rt: &mut Runtime, id: &str) {
    let diff = sh_ok(rt, id, SAME_AS_INIT).await;
    assert_eq!(diff, "", "the exec's context differs from its init's");
}

/// CreateContainer's error for `config` in `pod`.
async fn refused(
    rt: &mut Runtime,
    pod: &str,
    pod_cfg: &cri::PodSandboxConfig,
    config: cri::ContainerConfig,
) -> tonic::Status {
    rt.create_container(cri::CreateContainerRequest {
        pod_sandbox_id: pod.into(),
        config: Some(config),
        sandbox_config: Some(pod_cfg.clone()),
    })
    .await
    .expect_err("CreateContainer must refuse")
}

fn assert_invalid(status: &tonic::Status, field: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with(field),
        "the message names {field}: {:?}",
        status.message()
    );
}

fn seccomp_profile(kind: cri::security_profile::ProfileType, path: &str) -> cri::SecurityProfile {
    cri::SecurityProfile {
        profile_type: kind as i32,
        localhost_ref: path.into(),
    }
}

/// A tmpfs at `dir`, shared (as kubelet's volume dirs are); unmounted by
/// the environment's guard if the test fails.
/// Waits (up to 60 s) until `path` in container `id` reads `want`;
/// fails with `what` and the last read otherwise.
async fn until_read(rt: &mut Runtime, id: &str, path: &str, want: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, out, _) = sh(rt, id, &format!("cat {path}")).await;
        if code == 0 && out.trim() == want {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {out:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn shared_tmpfs(dir: &Path) {
    std::fs::create_dir_all(dir).expect("mkdir");
    for args in [vec!["-t", "tmpfs", "tmpfs"], vec!["--make-shared"]] {
        let status = Command::new("mount")
            .args(&args)
            .arg(dir)
            .status()
            .expect("mount");
        assert!(status.success(), "mount {args:?} {}", dir.display());
    }
}

#[tokio::test]
#[allow(deprecated)] // seccomp_profile_path: older kubelets send it
async fn the_security_context_is_enforced_in_the_guest() {
    use cri::security_profile::ProfileType;
    tests::become_subreaper();
    let mut env = CriEnv::with_config(52, "");
    let profiles = env.dir.path().join("seccomp");
    std::fs::create_dir_all(&profiles).expect("mkdir");
    // The config names the profile dir (Localhost paths outside are refused).
    let mut config = std::fs::read_to_string(&env.config_path).expect("config");
    config.push_str(&format!(
        "\n[security]\nseccomp_profile_dirs = [{:?}]\n",
        profiles.display().to_string()
    ));
    std::fs::write(&env.config_path, config).expect("config");
    let deny_hostname = profiles.join("deny-sethostname.json");
    std::fs::write(
        &deny_hostname,
        br#"{"defaultAction":"SCMP_ACT_ALLOW","archMap":[{"architecture":"SCMP_ARCH_X86_64","subArchitectures":["SCMP_ARCH_X86"]}],
             "syscalls":[{"names":["sethostname"],"action":"SCMP_ACT_ERRNO","errnoRet":13,"comment":"EACCES"}]}"#,
    )
    .expect("profile");
    let outside = env.dir.path().join("outside.json");
    std::fs::write(&outside, br#"{"defaultAction":"SCMP_ACT_ALLOW"}"#).expect("profile");

    let registry = support::Registry::start().await;
    let mut image = TestImage::new(vec![
        layer(&busybox_entries(), Comp::Gzip),
        layer(
            &[
                E::Dir("etc", 0o755, 0),
                E::File(
                    "etc/group",
                    0o644,
                    0,
                    b"root:x:0:\nuser:x:1000:\nwheel:x:10:user\naudio:x:29:other,user\nnope:x:77:other\n"
                        .to_vec(),
                ),
            ],
            Comp::Gzip,
        ),
    ]);
    image.config = serde_json::json!({"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"});
    registry.push_image("secbox", "1", &image).await;
    let image = format!("{}/secbox:1", registry.host());
    env.start().await;
    env.pull(&image).await;
    let mut rt = env.runtime().await;

    // A host name vcrid chose never fails a pod; one asked for is checked.
    let mut bad_host = pod_config(&env, "bad-host", false);
    bad_host.hostname = "not_a_host".into();
    std::fs::create_dir_all(&bad_host.log_directory).expect("log dir");
    let status = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(bad_host),
            runtime_handler: String::new(),
        })
        .await
        .expect_err("an invalid host name");
    assert_invalid(&status, "config.hostname");
    let plain_cfg = pod_config(&env, SUITE_POD, false);
    let plain = run_pod(&mut rt, plain_cfg.clone()).await;

    // Propagation: the host mounts under the volume after the container
    // started; the container sees it.
    let volume = env.dir.path().join("volume");
    shared_tmpfs(&volume);
    let mut groups = container(
        &image,
        "groups",
        cri::LinuxContainerSecurityContext {
            run_as_user: Some(cri::Int64Value { value: 1000 }),
            supplemental_groups: vec![1234],
            seccomp: Some(seccomp_profile(ProfileType::RuntimeDefault, "")),
            ..Default::default()
        },
    );
    groups.mounts = vec![cri::Mount {
        container_path: "/vol".into(),
        host_path: volume.display().to_string(),
        propagation: cri::MountPropagation::PropagationHostToContainer as i32,
        ..Default::default()
    }];
    let groups = create_started(&mut rt, &plain, &plain_cfg, groups).await;
    let node = nix::unistd::gethostname()
        .expect("hostname")
        .into_string()
        .expect("utf-8");
    assert_eq!(
        sh_ok(&mut rt, &groups, "hostname").await.trim(),
        node,
        "no hostname asked for: the node's, as containerd gives it"
    );
    let ids: BTreeSet<String> = sh_ok(&mut rt, &groups, "id -G")
        .await
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(
        ids,
        ["1000", "10", "29", "1234"].map(String::from).into(),
        "primary, the image's memberships of user, supplemental"
    );
    assert_eq!(sh_ok(&mut rt, &groups, "id -u").await.trim(), "1000");
    assert_same_as_init(&mut rt, &groups).await;
    let status = sh_ok(&mut rt, &groups, "grep '^Seccomp:' /proc/self/status").await;
    assert_eq!(status.split_whitespace().nth(1), Some("2"), "{status}");
    let sub = volume.join("sub");
    std::fs::create_dir_all(&sub).expect("mkdir sub");
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(&sub)
        .status()
        .expect("mount");
    assert!(status.success());
    std::fs::write(sub.join("hello"), "from-the-host\n").expect("write");
    until_read(
        &mut rt,
        &groups,
        "/vol/sub/hello",
        "from-the-host",
        "a mount made on the host after the start never reached the container",
    )
    .await;
    // The guest keeps a shared file's pages across opens (virtiofsd's
    // cache=always) and revalidates its attributes within a second: the
    // host rewriting a file the container has just read, same size, new
    // content, is seen, as kubelet's updates of a volume must be.
    std::fs::write(sub.join("hello"), "FROM-THE-HOST\n").expect("rewrite");
    until_read(
        &mut rt,
        &groups,
        "/vol/sub/hello",
        "FROM-THE-HOST",
        "a file the host rewrote kept its old content in the container",
    )
    .await;

    // Masked and read-only paths replace the defaults; an exec sees them.
    let paths = create_started(
        &mut rt,
        &plain,
        &plain_cfg,
        container(
            &image,
            "paths",
            cri::LinuxContainerSecurityContext {
                masked_paths: vec!["/proc/version".into(), "/proc/kcore".into()],
                readonly_paths: vec!["/proc/sys".into(), "/tmp".into()],
                ..Default::default()
            },
        ),
    )
    .await;
    assert_eq!(
        sh_ok(&mut rt, &paths, "cat /proc/version").await,
        "",
        "masked"
    );
    let (code, _, err) = sh(&mut rt, &paths, "touch /tmp/x").await;
    assert_ne!(code, 0, "/tmp is read-only");
    assert!(err.contains("Read-only file system"), "{err}");
    let (code, _, _) = sh(&mut rt, &paths, "echo 1 > /proc/sys/net/ipv4/ip_forward").await;
    assert_ne!(code, 0, "/proc/sys is read-only");
    assert!(
        sh_ok(&mut rt, &groups, "cat /proc/version")
            .await
            .starts_with("Linux version"),
        "another container keeps /proc/version"
    );

    // Localhost seccomp: the profile blocks sethostname (EACCES), in both
    // forms; with the same capabilities and no profile it works.
    let admin = |name: &str, seccomp, path: &str| {
        container(
            &image,
            name,
            cri::LinuxContainerSecurityContext {
                capabilities: Some(cri::Capability {
                    add_capabilities: vec!["SYS_ADMIN".into()],
                    ..Default::default()
                }),
                seccomp,
                seccomp_profile_path: path.into(),
                ..Default::default()
            },
        )
    };
    let mut own_namespaces = admin(
        "free",
        Some(seccomp_profile(ProfileType::Unconfined, "")),
        "",
    );
    if let Some(sc) = own_namespaces
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
    {
        sc.namespace_options = Some(cri::NamespaceOption {
            pid: cri::NamespaceMode::Container as i32,
            ipc: cri::NamespaceMode::Container as i32,
            ..Default::default()
        });
    }
    let free = create_started(&mut rt, &plain, &plain_cfg, own_namespaces).await;
    // PID and IPC: the pod's unless a container asks for its own (none
    // given means POD, as containerd reads it).
    for ns in ["ipc", "pid"] {
        let script = format!("readlink /proc/self/ns/{ns}");
        let a = sh_ok(&mut rt, &groups, &script).await;
        let b = sh_ok(&mut rt, &paths, &script).await;
        let own = sh_ok(&mut rt, &free, &script).await;
        assert_eq!(a.trim(), b.trim(), "{ns}: one namespace for the pod");
        assert_ne!(a.trim(), own.trim(), "{ns}: CONTAINER gets its own");
    }
    sh_ok(
        &mut rt,
        &free,
        "hostname renamed && test \"$(hostname)\" = renamed",
    )
    .await;
    let status = sh_ok(&mut rt, &free, "grep '^Seccomp:' /proc/self/status").await;
    assert_eq!(status.split_whitespace().nth(1), Some("0"), "{status}");
    assert_same_as_init(&mut rt, &free).await;
    let blocked_new = create_started(
        &mut rt,
        &plain,
        &plain_cfg,
        admin(
            "blocked-new",
            Some(seccomp_profile(
                ProfileType::Localhost,
                &deny_hostname.display().to_string(),
            )),
            "",
        ),
    )
    .await;
    let blocked_old = create_started(
        &mut rt,
        &plain,
        &plain_cfg,
        admin(
            "blocked-old",
            None,
            &format!("localhost/{}", deny_hostname.display()),
        ),
    )
    .await;
    for id in [&blocked_new, &blocked_old] {
        let (code, _, err) = sh(&mut rt, id, "hostname renamed").await;
        assert_ne!(code, 0, "the profile blocks sethostname");
        assert!(
            err.contains("Permission denied"),
            "EACCES from the profile: {err}"
        );
        let status = sh_ok(&mut rt, id, "grep '^Seccomp:' /proc/self/status").await;
        assert_eq!(status.split_whitespace().nth(1), Some("2"), "{status}");
    }

    // What a VM cannot honour is refused, naming the field.
    let sc = |f: &dyn Fn(&mut cri::LinuxContainerSecurityContext)| {
        let mut s = cri::LinuxContainerSecurityContext::default();
        f(&mut s);
        container(&image, "refused", s)
    };
    let cases: Vec<(cri::ContainerConfig, &str)> = vec![
        (
            sc(&|s| s.run_as_group = Some(cri::Int64Value { value: 10 })),
            "config.linux.security_context.run_as_group",
        ),
        (
            sc(&|s| s.privileged = true),
            "config.linux.security_context.privileged",
        ),
        (
            sc(&|s| {
                s.seccomp = Some(seccomp_profile(
                    ProfileType::Localhost,
                    &outside.display().to_string(),
                ))
            }),
            "config.linux.security_context.seccomp.localhost_ref",
        ),
        (
            sc(&|s| s.seccomp_profile_path = "localhost/relative.json".into()),
            "config.linux.security_context.seccomp_profile_path",
        ),
        (
            sc(&|s| s.seccomp_profile_path = "runtime/weird".into()),
            "config.linux.security_context.seccomp_profile_path",
        ),
        (
            sc(&|s| s.apparmor = Some(seccomp_profile(ProfileType::Localhost, "my-profile"))),
            "config.linux.security_context.apparmor",
        ),
        (
            sc(&|s| {
                s.selinux_options = Some(cri::SeLinuxOption {
                    level: "s0:c1,c2".into(),
                    ..Default::default()
                })
            }),
            "config.linux.security_context.selinux_options",
        ),
        (
            sc(&|s| {
                s.capabilities = Some(cri::Capability {
                    add_capabilities: vec!["CAP_TELEPATHY".into()],
                    ..Default::default()
                })
            }),
            "config.linux.security_context.capabilities.add_capabilities[0]",
        ),
        (
            {
                let mut c = sc(&|_| {});
                c.mounts = vec![cri::Mount {
                    container_path: "/vol".into(),
                    host_path: volume.display().to_string(),
                    propagation: cri::MountPropagation::PropagationBidirectional as i32,
                    ..Default::default()
                }];
                c
            },
            "config.mounts[0].propagation",
        ),
    ];
    for (config, field) in cases {
        let status = refused(&mut rt, &plain, &plain_cfg, config).await;
        assert_invalid(&status, field);
    }

    // Privileged, in a privileged pod: the guest's devices (a serial port
    // among them, and one made with mknod in /dev opens: the device cgroup
    // allows all; the shared rootfs itself stays nodev), every capability,
    // a writable /sys, no seccomp.
    let priv_cfg = pod_config(&env, "privileged-pod", true);
    let privileged_pod = run_pod(&mut rt, priv_cfg.clone()).await;
    let root = create_started(
        &mut rt,
        &privileged_pod,
        &priv_cfg,
        container(
            &image,
            "root",
            cri::LinuxContainerSecurityContext {
                privileged: true,
                seccomp: Some(seccomp_profile(ProfileType::RuntimeDefault, "")),
                ..Default::default()
            },
        ),
    )
    .await;
    sh_ok(
        &mut rt,
        &root,
        "test -c /dev/ttyS0 && stty -F /dev/ttyS0 >/dev/null",
    )
    .await;
    sh_ok(
        &mut rt,
        &root,
        "mknod /dev/made-serial c 4 64 && stty -F /dev/made-serial >/dev/null",
    )
    .await;
    let caps = sh_ok(&mut rt, &root, "grep '^CapEff:' /proc/self/status").await;
    assert_eq!(
        caps.split_whitespace().nth(1),
        Some("000001ffffffffff"),
        "every capability of a 6.1 kernel: {caps}"
    );
    assert_same_as_init(&mut rt, &root).await;
    // Kernel modules on demand: brctl needs `bridge`, which the guest's
    // modprobe loads from its read-only module tree.
    sh_ok(&mut rt, &root, "brctl addbr vcbr0 && ip link show vcbr0").await;
    let modules = sh_ok(&mut rt, &root, "cat /proc/modules").await;
    assert!(
        modules.lines().any(|l| l.starts_with("bridge ")),
        "bridge loaded: {modules}"
    );
    let sys = sh_ok(&mut rt, &root, "grep ' /sys sysfs ' /proc/mounts").await;
    assert!(sys.contains(" rw,"), "a writable /sys: {sys}");
    let status = sh_ok(&mut rt, &root, "grep '^Seccomp:' /proc/self/status").await;
    assert_eq!(status.split_whitespace().nth(1), Some("0"), "{status}");
    assert!(
        !sh_ok(&mut rt, &root, "cat /proc/version").await.is_empty(),
        "nothing masked"
    );

    remove_pod(&mut rt, &privileged_pod).await;
    remove_pod(&mut rt, &plain).await;
    let _ = Command::new("umount").arg(&sub).status();
    let _ = Command::new("umount").arg(&volume).status();
    drop(rt);
    env.stop();
    env.assert_no_pods_left();
}
