//! A pod whose VM has no vsock (`hypervisor.vsock = "serial"`) and shares
//! files over 9p: the agent's API on a virtio-serial port that QEMU
//! serves, no helper process, guest memory private to QEMU. Through the
//! CRI: pod IP and hostPort, exec, logs; PortForward refused by name;
//! after vcrid is SIGKILLed, the next vcrid reaches the same guest over the
//! same port; stop and remove; nothing left.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use k8s_cri::v1 as cri;
use tests::cri::{
    exec_sh, http_get, pod_config, pod_info, remove_pod, run_pod, start_httpd, CriEnv,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_without_vsock_serves_over_the_serial_port_across_a_vcrid_crash() {
    tests::become_subreaper();
    let registry = tests::registry::Registry::start().await;
    let image = tests::cri::push_busybox(&registry, "serial").await;
    let mut env = CriEnv::new(73);
    env.set_hypervisor("vsock = \"serial\"\nshared_fs = \"virtio-9p\"\n");
    env.start().await;
    env.pull(&image).await;
    let mut rt = env.runtime().await;

    let host_port = 18000 + i32::from(env.subnet_octet);
    let mut p_cfg = pod_config(&env, "serial", "default");
    p_cfg.port_mappings = vec![cri::PortMapping {
        protocol: cri::Protocol::Tcp as i32,
        container_port: 80,
        host_port,
        host_ip: String::new(),
    }];
    let pod = run_pod(&mut rt, p_cfg.clone()).await;
    let info = pod_info(&mut rt, &pod).await;
    // QEMU alone: no vsock helper, no virtiofsd — no other process
    // names this pod's run directory.
    let qemu = info["vm"]["pid"].as_i64().expect("pid");
    assert_eq!(processes_naming(&pod), vec![qemu], "{info}");
    let cmdline = tests::cmdline(qemu);
    assert!(cmdline.contains("virtserialport"), "{cmdline}");
    assert!(cmdline.contains("memory-backend-ram,id=mem"), "{cmdline}");
    assert!(!cmdline.contains("share=on"), "{cmdline}");
    assert!(!cmdline.contains("vsock"), "{cmdline}");
    // The agent's socket is the owner's alone, like every VM socket.
    let sock = cmdline
        .split([' ', ','])
        .find_map(|w| {
            w.strip_prefix("path=")
                .filter(|p| p.ends_with("agent.sock"))
        })
        .expect("agent.sock on the command line");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(sock).expect("agent.sock").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "{sock}");

    let web = start_httpd(&mut rt, &pod, &p_cfg, &image, "hello-over-serial").await;
    let ip = info["vm"]["ips"][0].as_str().expect("pod IP").to_string();
    assert!(http_get(&format!("{ip}:80")).contains("hello-over-serial"));
    assert!(http_get(&format!("{}:{host_port}", env.gateway())).contains("hello-over-serial"));
    let (code, out) = exec_sh(&mut rt, &web, "cat /etc/hostname; echo err >&2; exit 3").await;
    assert_eq!((code, out.as_str()), (3, "serial\nerr\n"));

    // No forwarder on this channel: refused when the URL is asked for.
    let err = rt
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: pod.clone(),
            port: vec![80],
        })
        .await
        .expect_err("PortForward must be refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("hypervisor.vsock"), "{err:?}");

    // vcrid dies holding the port's one connection; the next one gets it.
    env.kill9();
    env.start().await;
    let mut rt = env.runtime().await;
    let (code, out) = exec_sh(&mut rt, &web, "cat /www/index.html").await;
    assert_eq!((code, out.trim()), (0, "hello-over-serial"));
    assert_eq!(
        pod_info(&mut rt, &pod).await["vm"]["pid"].as_i64(),
        Some(qemu)
    );
    assert!(http_get(&format!("{ip}:80")).contains("hello-over-serial"));

    remove_pod(&mut rt, &pod).await;
    env.stop();
    env.assert_no_pods_left();
}

/// The pids of the processes whose command line contains `needle`.
fn processes_naming(needle: &str) -> Vec<i64> {
    let mut pids: Vec<i64> = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i64>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect();
    pids.sort_unstable();
    pids
}
