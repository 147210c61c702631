//! VM templates (`[factory] template = true`) end to end, through the CRI:
//! one VM is booted and saved; the pool fills with clones of it (its RAM
//! file mapped private, its device state loaded, no boot). A pod from a
//! clone works as a booted one does — pod IP, hostPort, exec, logs, grown
//! to its size, stop and remove — and two clones are two machines: their
//! boot_id, machine-id, MAC and IP differ. Whatever a clone's guest does
//! with its memory, the template's memory file stays as it was saved
//! (clones have no balloon to discard pages with). A `kill -9` of vcrid with a
//! warm clone leaves no clone or template behind after the restart, and
//! the pods run on. A graceful stop leaves no VM, no template file,
//! nothing.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use k8s_cri::v1 as cri;
use tests::cri::{
    container_config, create_started, exec_sh, factory_status, http_get, pod_config, pod_info,
    privileged, privileged_pod_config, pss_kib, remove_pod, run_pod, start_httpd, wait_for_log,
    CriEnv, Runtime,
};

/// Waits (up to 5 minutes: the template boots at nice 19) for `ready`
/// clones in the pool.
async fn until_pool(rt: &mut Runtime, ready: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let f = factory_status(rt).await;
        if f["ready"].as_u64() == Some(ready) {
            return f;
        }
        assert!(Instant::now() < deadline, "the pool never got there: {f}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A started vcrid whose VMs are template clones (`pool` warm ones), the
/// agent over virtio-serial and files over 9p, with busybox pulled as
/// `busybox:<tag>`: the registry (kept alive), the image, the env.
async fn template_env(
    octet: u8,
    pool: u32,
    tag: &str,
) -> (tests::registry::Registry, String, CriEnv) {
    tests::become_subreaper();
    let registry = tests::registry::Registry::start().await;
    let image = tests::cri::push_busybox(&registry, tag).await;
    let mut env = CriEnv::with_config(
        octet,
        &format!("\n[factory]\npool = {pool}\ntemplate = true\n"),
    );
    env.set_hypervisor("vsock = \"serial\"\nshared_fs = \"virtio-9p\"\n");
    env.start().await;
    env.pull(&image).await;
    (registry, image, env)
}

/// The saved templates' files (`run/_templates/*/*`).
fn template_files(env: &CriEnv) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(env.dir.path().join("run/_templates"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

/// The run dirs of warm VMs and of pods that took one (`run/pool-*`).
fn warm_dirs(env: &CriEnv) -> Vec<PathBuf> {
    std::fs::read_dir(env.dir.path().join("run"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("pool-"))
        })
        .collect()
}

fn serving_pod(env: &CriEnv, name: &str, host_port: i32) -> cri::PodSandboxConfig {
    let mut config = pod_config(env, name, "default");
    config.port_mappings = vec![cri::PortMapping {
        protocol: cri::Protocol::Tcp as i32,
        container_port: 80,
        host_port,
        host_ip: String::new(),
    }];
    // Bigger than a clone (256 MiB): the claim grows it.
    config
        .annotations
        .insert("io.virtcontainers.memory_mib".into(), "512".into());
    config
}

/// What a pod's guest says about itself: boot_id, eth0's MAC, its IP.
async fn identity(rt: &mut Runtime, container: &str) -> Vec<String> {
    let (code, out) = exec_sh(
        rt,
        container,
        "cat /proc/sys/kernel/random/boot_id /sys/class/net/eth0/address; ip -4 -o addr show eth0",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    out.lines().map(String::from).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_of_one_template_serve_as_pods_and_are_two_machines() {
    let (_registry, image, mut env) = template_env(74, 1, "template").await;
    let mut rt = env.runtime().await;
    let f = until_pool(&mut rt, 1).await;
    assert_eq!(f["kind"].as_str(), Some("template"), "{f}");
    let files = template_files(&env);
    let names: Vec<_> = files
        .iter()
        .filter_map(|p| p.file_name()?.to_str())
        .collect();
    assert_eq!(names, ["memory", "state", "template.json"], "{files:?}");
    for line in env.log().lines().filter(|l| l.contains("template saved")) {
        println!("{line}");
    }

    // Pod A takes a clone and serves HTTP on a hostPort.
    let host_port = 18000 + i32::from(env.subnet_octet);
    let a_cfg = serving_pod(&env, "tpl-a", host_port);
    let a = run_pod(&mut rt, a_cfg.clone()).await;
    let info = pod_info(&mut rt, &a).await;
    assert_eq!(info["vm"]["origin"], "template", "{info}");
    assert_eq!(info["vm"]["memory_mib"], 512, "grown: {info}");
    let qemu = info["vm"]["pid"].as_i64().expect("pid");
    let cmdline = tests::cmdline(qemu);
    assert!(cmdline.contains("-incoming defer"), "{cmdline}");
    assert!(
        cmdline.contains(&format!("mem-path={},share=off", files[0].display())),
        "the clone maps the template's memory private: {cmdline}"
    );
    // The template was saved once its agent had settled: the clone repeats
    // none of the start-up work (modules, the modules disk, namespaces).
    let console = cmdline
        .split(' ')
        .find_map(|a| a.strip_prefix("file,id=console,path="))
        .and_then(|a| a.split(',').next())
        .expect("the console's path");
    let log = std::fs::read_to_string(console).expect("console");
    assert!(log.contains("personalized"), "{log}");
    assert!(
        !log.contains("modules disk mounted"),
        "the clone did the template's start-up work again: {log}"
    );
    let web = start_httpd(&mut rt, &a, &a_cfg, &image, "hello-from-a-clone").await;
    let a_ip = info["vm"]["ips"][0].as_str().expect("pod IP").to_string();
    assert!(http_get(&format!("{a_ip}:80")).contains("hello-from-a-clone"));
    assert!(http_get(&format!("{}:{host_port}", env.gateway())).contains("hello-from-a-clone"));
    let (code, out) = exec_sh(&mut rt, &web, "cat /etc/hostname").await;
    assert_eq!((code, out.as_str()), (0, "tpl-a\n"));

    // The pool refills with another clone; pod B takes it and reaches A.
    until_pool(&mut rt, 1).await;
    let b_cfg = serving_pod(&env, "tpl-b", host_port + 100);
    let b = run_pod(&mut rt, b_cfg.clone()).await;
    let b_info = pod_info(&mut rt, &b).await;
    assert_eq!(b_info["vm"]["origin"], "template", "{b_info}");
    let client = Box::pin(create_started(
        &mut rt,
        &b,
        &b_cfg,
        container_config(&image, "client", &["sleep", "3600"]),
    ))
    .await;
    let (code, out) = exec_sh(&mut rt, &client, &format!("wget -q -O - http://{a_ip}/")).await;
    assert_eq!((code, out.trim()), (0, "hello-from-a-clone"));
    // Two clones of one template are two machines.
    let (ia, ib) = (
        identity(&mut rt, &web).await,
        identity(&mut rt, &client).await,
    );
    assert_eq!((ia.len(), ib.len()), (3, 3), "{ia:?}\n{ib:?}");
    for i in 0..3 {
        assert_ne!(ia[i], ib[i], "boot_id, MAC and IP differ: {ia:?}\n{ib:?}");
    }
    let machine_ids = [
        info_machine_id(&mut rt, &a).await,
        info_machine_id(&mut rt, &b).await,
    ];
    assert_eq!(machine_ids[0].len(), 32, "{machine_ids:?}");
    assert_ne!(machine_ids[0], machine_ids[1], "machine-ids differ");
    let b_qemu = b_info["vm"]["pid"].as_i64().expect("pid");
    println!(
        "PSS of two clones' QEMU: {} and {} KiB",
        pss_kib(qemu),
        pss_kib(b_qemu)
    );

    // vcrid is killed with a warm clone in the pool: the next one kills
    // and removes that clone and the template before it serves, keeps
    // both pods (their serial channels are dialed again), and saves a
    // template of its own.
    until_pool(&mut rt, 1).await;
    // The pods keep the run dirs their clones started in.
    let pods_cmdlines = [qemu, b_qemu].map(tests::cmdline);
    let warm: Vec<_> = warm_dirs(&env)
        .into_iter()
        .filter(|d| {
            !pods_cmdlines
                .iter()
                .any(|c| c.contains(&d.display().to_string()))
        })
        .collect();
    assert_eq!(warm.len(), 1, "{warm:?}");
    let old_template = template_files(&env);
    env.kill9();
    env.start().await;
    let mut rt = env.runtime().await;
    // The new vcrid's container monitors dial both pods' serial channels
    // as these calls do: all share one connection per pod (a second dial
    // would wait in QEMU's backlog until its handshake timed out).
    let (mut r1, mut r2, mut r3) = (rt.clone(), rt.clone(), rt.clone());
    let outs = tokio::join!(
        exec_sh(&mut r1, &web, "echo a1"),
        exec_sh(&mut r2, &web, "echo a2"),
        exec_sh(&mut r3, &client, "echo b1"),
    );
    assert_eq!(
        [outs.0, outs.1, outs.2].map(|(code, out)| (code, out.trim().to_string())),
        [(0, "a1"), (0, "a2"), (0, "b1")].map(|(c, o)| (c, o.to_string()))
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    // Recovery SIGKILLs it and removes its dir; it is gone once it has died.
    while warm[0].exists() || !tests::processes_mentioning(&warm[0]).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the old warm clone's run dir is left: {:?} {:?}\n{}",
            std::fs::read_dir(&warm[0])
                .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>()),
            tests::processes_mentioning(&warm[0]),
            env.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for file in &old_template {
        assert!(!file.exists(), "{} is left", file.display());
    }
    let (code, out) = exec_sh(&mut rt, &web, "echo still-here").await;
    assert_eq!((code, out.trim()), (0, "still-here"));
    assert!(http_get(&format!("{a_ip}:80")).contains("hello-from-a-clone"));
    until_pool(&mut rt, 1).await;
    assert_ne!(template_files(&env), old_template);

    remove_pod(&mut rt, &a).await;
    remove_pod(&mut rt, &b).await;
    // A graceful stop throws the warm clone and the template away.
    env.stop();
    assert!(
        template_files(&env).is_empty(),
        "{:?}",
        template_files(&env)
    );
    env.assert_no_pods_left();
}

/// A digest of a file's bytes.
fn file_digest(path: &std::path::Path) -> u64 {
    use std::{hash::Hasher, io::Read};
    let mut file = std::fs::File::open(path).expect("open");
    let mut hasher = std::hash::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).expect("read");
        if n == 0 {
            return hasher.finish();
        }
        hasher.write(&buf[..n]);
    }
}

/// The guest's machine-id, as verbose PodSandboxStatus reports it.
async fn info_machine_id(rt: &mut Runtime, pod: &str) -> String {
    let info = pod_info(rt, pod).await;
    info["vm"]["guest"]["machine_id"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Without a pool (`pool = 0`) vcrid saves the template at start and
/// clones each pod's VM from it when the pod starts; a template that no
/// longer loads makes a pod boot and is replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_pool_each_pod_is_a_clone_made_when_it_starts() {
    let (_registry, image, mut env) = template_env(75, 0, "template0").await;
    let mut rt = env.runtime().await;
    let f = factory_status(&mut rt).await;
    assert_eq!(
        (f["kind"].as_str(), f["target"].as_u64()),
        (Some("direct"), Some(0)),
        "{f}"
    );
    // The template is saved in the background from the start.
    let deadline = Instant::now() + Duration::from_secs(300);
    while template_files(&env).len() < 3 {
        assert!(
            Instant::now() < deadline,
            "no template saved: {}",
            env.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // What every clone starts from, before the first clone runs.
    let files = template_files(&env);
    let memory = files
        .iter()
        .find(|p| p.ends_with("memory"))
        .expect("memory");
    let saved = file_digest(memory);

    // Privileged: its container is root in the guest, as a hostile guest
    // is.
    let cfg = privileged_pod_config(&env, "tpl-direct", "default");
    let pod = run_pod(&mut rt, cfg.clone()).await;
    let info = pod_info(&mut rt, &pod).await;
    assert_eq!(info["vm"]["origin"], "template", "{info}");
    assert_eq!(
        info["vm"]["memory_mib"], 256,
        "all its RAM is the template's: {info}"
    );
    let qemu = info["vm"]["pid"].as_i64().expect("pid");
    let cmdline = tests::cmdline(qemu);
    assert!(
        !cmdline.contains("virtio-balloon"),
        "a clone has no balloon to discard the template's pages with: {cmdline}"
    );
    // The container frees what the template's guest had cached, compacts
    // free memory into large blocks and takes and frees 64 MiB: free pages
    // that a guest could report (after 2 s) or inflate a balloon with.
    let c = Box::pin(create_started(
        &mut rt,
        &pod,
        &cfg,
        privileged(container_config(
            &image,
            "echo",
            &[
                "/bin/sh",
                "-c",
                "echo 3 > /proc/sys/vm/drop_caches && echo 1 > /proc/sys/vm/compact_memory \
                 && dd if=/dev/zero of=/dev/null bs=64M count=1 2>/dev/null && echo cloned; sleep 3600",
            ],
        )),
    ))
    .await;
    let log = env.dir.path().join("logs/tpl-direct/echo.log");
    assert!(wait_for_log(&log, "cloned")
        .await
        .contains(" stdout F cloned"));
    let (code, out) = exec_sh(&mut rt, &c, "cat /etc/hostname").await;
    assert_eq!((code, out.as_str()), (0, "tpl-direct\n"));
    // Whatever the clone did with its memory, the template's file is as
    // it was saved: a clone that could punch holes in it would zero the
    // pages other clones run on. (With a balloon, the guest reports free
    // pages 2 s after they are freed: before the fix, this pod changed
    // the file within the 10 s waited here.)
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        file_digest(memory) == saved,
        "a clone changed the template's memory file"
    );
    remove_pod(&mut rt, &pod).await;

    // A template whose device state no longer loads: the pod that finds
    // out boots instead, and a new template is saved for the next one.
    let state = files.iter().find(|p| p.ends_with("state")).expect("state");
    std::fs::write(state, b"not a migration stream").expect("corrupt the state");
    let booted = run_pod(&mut rt, pod_config(&env, "tpl-fallback", "default")).await;
    let info = pod_info(&mut rt, &booted).await;
    assert_eq!(info["vm"]["origin"], "boot", "{info}");
    assert!(
        env.log().contains("cloning the VM template failed"),
        "{}",
        env.log()
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let now = template_files(&env);
        if now.len() == 3 && now[0].parent() != files[0].parent() {
            break;
        }
        assert!(Instant::now() < deadline, "no new template: {now:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cloned = run_pod(&mut rt, pod_config(&env, "tpl-again", "default")).await;
    let info = pod_info(&mut rt, &cloned).await;
    assert_eq!(info["vm"]["origin"], "template", "{info}");
    remove_pod(&mut rt, &booted).await;
    remove_pod(&mut rt, &cloned).await;
    env.stop();
    assert!(
        template_files(&env).is_empty(),
        "{:?}",
        template_files(&env)
    );
    env.assert_no_pods_left();
}
