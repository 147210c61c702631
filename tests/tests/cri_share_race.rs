//! A hostile guest against the host's mounts (the class of Kata's
//! CVE-2020-2026): a privileged container mounts the pod's shared
//! filesystem itself and, in a loop, tries to replace every entry the host
//! creates for other containers (their dirs, `rootfs`, `mounts`, each
//! volume's mount point) with symlinks to a host "canary" directory, while
//! the test creates containers with hostPath volumes. The host builds its
//! mount points where the guest cannot write, so: every attempt fails, the
//! canary is never written nor mounted on, and every volume arrives.
//! (Inside a container's rootfs mount the guest writes as it likes: a
//! privileged container owns its pod's VM; only the host is guarded here.)

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::large_futures
)]

use k8s_cri::v1 as cri;
use tests::cri::{
    container_config, create_started, privileged, privileged_pod_config, push_busybox, remove_pod,
    run_pod, CriEnv,
};

/// The attacker: mounts the share (the same virtio-fs tag the agent
/// mounts) and races the host until `/tmp/stop` exists; counts its
/// attempts and the ones that succeeded.
const ATTACKER: &str = r#"
mkdir -p /tmp/share && mount -t virtiofs vcshared /tmp/share || { echo "ATTACK-NOMOUNT"; exit 1; }
tries=0; won=0
attempt() { tries=$((tries+1)); if "$@" 2>/dev/null; then won=$((won+1)); echo "ATTACK-WON $*"; fi; }
while [ ! -e /tmp/stop ]; do
  attempt ln -s /CANARY /tmp/share/guessed-id
  for d in /tmp/share/*; do
    [ -d "$d" ] || continue
    attempt ln -s /CANARY "$d/mounts"
    for n in rootfs mounts mounts/0 mounts/1; do
      [ -e "$d/$n" ] || continue
      attempt mv "$d/$n" "$d/$n.moved"
      attempt rmdir "$d/$n"
      attempt ln -s /CANARY "$d/$n.link"
      # Where the host makes a mount point, the guest must make nothing.
      [ "$n" = mounts ] && attempt ln -s /CANARY "$d/$n/9"
    done
  done
  echo "ATTACK-ROUND tries=$tries won=$won"
done
echo "ATTACK-DONE tries=$tries won=$won"
sleep 3600
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_racing_the_hosts_mounts_reaches_nothing_outside() {
    tests::become_subreaper();
    let mut env = CriEnv::new(66);
    let canary = env.dir.path().join("canary");
    std::fs::create_dir_all(&canary).expect("canary");
    let volume = env.dir.path().join("volume");
    std::fs::create_dir_all(&volume).expect("volume");
    std::fs::write(volume.join("marker"), b"volume-ok\n").expect("marker");
    let registry = tests::registry::Registry::start().await;
    let image = push_busybox(&registry, "race").await;
    env.start().await;
    env.pull(&image).await;
    let mut rt = env.runtime().await;

    let pod_cfg = privileged_pod_config(&env, "race", "security");
    let pod = run_pod(&mut rt, pod_cfg.clone()).await;
    let script = ATTACKER.replace("/CANARY", &canary.display().to_string());
    let attacker = privileged(container_config(
        &image,
        "attacker",
        &["/bin/sh", "-c", &script],
    ));
    let attacker = create_started(&mut rt, &pod, &pod_cfg, attacker).await;
    let log = std::path::Path::new(&pod_cfg.log_directory).join("attacker.log");
    tests::cri::wait_for_log(&log, "ATTACK-ROUND").await;

    // Victims, created while the attacker loops: each with two volumes.
    let mut victims = Vec::new();
    for i in 0..4 {
        let mut c = container_config(&image, &format!("victim{i}"), &["/bin/sleep", "3600"]);
        c.mounts = vec![
            cri::Mount {
                container_path: "/vol".into(),
                host_path: volume.display().to_string(),
                ..Default::default()
            },
            cri::Mount {
                container_path: "/vol-ro".into(),
                host_path: volume.display().to_string(),
                readonly: true,
                ..Default::default()
            },
        ];
        let created = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(c),
                sandbox_config: Some(pod_cfg.clone()),
            })
            .await;
        let id = match created {
            Ok(r) => r.into_inner().container_id,
            Err(status) => panic!(
                "victim {i}: {status:?}\nattacker: {}\nvcrid: {}",
                std::fs::read_to_string(&log).unwrap_or_default(),
                env.log()
            ),
        };
        rt.start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .expect("StartContainer");
        let out = rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.clone(),
                cmd: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "cat /vol/marker /vol-ro/marker && ls /".into(),
                ],
                timeout: 60,
            })
            .await
            .expect("ExecSync")
            .into_inner();
        assert_eq!(
            out.exit_code,
            0,
            "victim {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with("volume-ok\nvolume-ok\n"),
            "victim {i} sees its volumes: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        victims.push(id);
    }
    // Removing victims while the attacker races is part of the host's work too.
    for id in &victims {
        rt.stop_container(cri::StopContainerRequest {
            container_id: id.clone(),
            timeout: 0,
        })
        .await
        .expect("StopContainer");
        rt.remove_container(cri::RemoveContainerRequest {
            container_id: id.clone(),
        })
        .await
        .expect("RemoveContainer");
    }
    let stop = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: attacker.clone(),
            cmd: vec!["/bin/touch".into(), "/tmp/stop".into()],
            timeout: 30,
        })
        .await
        .expect("ExecSync")
        .into_inner();
    assert_eq!(stop.exit_code, 0);
    let text = tests::cri::wait_for_log(&log, "ATTACK-DONE").await;
    let done = text
        .lines()
        .find(|l| l.contains("ATTACK-DONE"))
        .expect("done line");
    eprintln!("attacker: {done}");
    assert!(
        !text.contains("ATTACK-WON"),
        "the guest changed the share: {text}"
    );
    let tries: u64 = done
        .split("tries=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("tries");
    assert!(tries > 100, "the attacker raced for real: {done}");

    // The canary: no file, no mount, on the host.
    let entries: Vec<_> = std::fs::read_dir(&canary)
        .expect("canary")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(entries.is_empty(), "the canary was written: {entries:?}");
    let mounts = tests::mounts_under(&canary);
    assert!(mounts.is_empty(), "mounted on the canary: {mounts:?}");
    assert_eq!(
        std::fs::read(volume.join("marker")).expect("marker"),
        b"volume-ok\n"
    );

    remove_pod(&mut rt, &pod).await;
    env.assert_no_pods_left();
    env.stop();
}
