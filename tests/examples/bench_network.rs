//! Pod networking benchmark: TCP throughput (both directions) and TCP
//! connect round trips between the host and a pod VM (vcrid, CNI bridge,
//! tc-filter tap), next to the host and a plain network namespace on the
//! same CNI network, with the same busybox servers on both sides.
//!
//! `cargo run --profile release-unwind -p tests --example bench_network -- [MiB] [connects]`

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::large_futures
)]

use tests::registry as support;

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use k8s_cri::v1 as cri;
use tests::cri::CriEnv;

/// Servers in a plain netns, killed on drop.
struct NetnsServers(Vec<Child>);

impl Drop for NetnsServers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn connect(addr: SocketAddr) -> TcpStream {
    for _ in 0..200 {
        if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            return s;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("cannot connect to {addr}");
}

/// GET /big: MiB/s host ← server.
fn download(ip: &str, mib: usize) -> f64 {
    let start = Instant::now();
    let mut s = connect(format!("{ip}:80").parse().unwrap());
    s.write_all(b"GET /big HTTP/1.0\r\n\r\n").unwrap();
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n;
    }
    assert!(total >= mib << 20, "short download: {total}");
    mib as f64 / start.elapsed().as_secs_f64()
}

/// Sends `mib` MiB to nc on :5001 until it closes: MiB/s host → server.
fn upload(ip: &str, mib: usize) -> f64 {
    let buf = vec![7u8; 1 << 20];
    let start = Instant::now();
    let mut s = connect(format!("{ip}:5001").parse().unwrap());
    for _ in 0..mib {
        s.write_all(&buf).unwrap();
    }
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let rate = mib as f64 / start.elapsed().as_secs_f64();
    // nc is restarted by its loop; give it a moment.
    std::thread::sleep(Duration::from_millis(300));
    rate
}

/// Median TCP connect time (one SYN / SYN-ACK round trip) in µs.
fn connect_rtt(ip: &str, n: usize) -> f64 {
    let addr: SocketAddr = format!("{ip}:80").parse().unwrap();
    drop(connect(addr));
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        v.push(t.elapsed().as_secs_f64() * 1e6);
        drop(s);
    }
    median(v)
}

fn measure(ip: &str, mib: usize, connects: usize) -> (f64, f64, f64) {
    let down = median((0..3).map(|_| download(ip, mib)).collect());
    let up = median((0..3).map(|_| upload(ip, mib)).collect());
    (down, up, connect_rtt(ip, connects))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(32);
    let connects: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(200);
    tests::become_subreaper();
    let registry = support::Registry::start().await;
    let image = tests::cri::push_busybox(&registry, "net").await;

    let mut env = CriEnv::new(60);
    env.start().await;
    let mut rt = env.runtime().await;
    env.pull(&image).await;

    // Baseline: a plain netns on the same CNI network, busybox servers in it.
    let net = cni::PodNetwork::new(
        cni::Cni::new(cni::CniConfig {
            conf_dir: env.dir.path().join("cni"),
            cache_dir: env.dir.path().join("bench-cache"),
            ..Default::default()
        }),
        env.dir.path().join("bench-netns"),
        env.dir.path().join("bench-state"),
        cni::InterworkingModel::None.build(),
    );
    use cni::NetworkPlugin as _;
    let status = net
        .setup(&cni::PodNetworkRequest {
            sandbox_id: "plainns".into(),
            pod: cni::PodIdentity {
                namespace: "bench".into(),
                name: "plain".into(),
                uid: "u".into(),
            },
            ..Default::default()
        })
        .await
        .expect("netns");
    let ns_ip = status.pod_ips[0].to_string();
    let www = env.dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("big"), vec![0u8; mib << 20]).unwrap();
    let nsenter = |cmd: &[&str]| {
        Command::new("nsenter")
            .arg(format!("--net={}", status.netns.display()))
            .args(cmd)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nsenter")
    };
    let plain = {
        let servers = NetnsServers(vec![
            nsenter(&[
                "busybox",
                "httpd",
                "-f",
                "-p",
                "80",
                "-h",
                &www.display().to_string(),
            ]),
            nsenter(&[
                "sh",
                "-c",
                "while true; do busybox nc -l -p 5001 > /dev/null; done",
            ]),
        ]);
        let r = measure(&ns_ip, mib, connects);
        drop(servers);
        r
    };
    net.teardown("plainns").await.expect("teardown netns");

    // The pod VM, same servers.
    let pod_cfg = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "netbench".into(),
            uid: "u".into(),
            namespace: "bench".into(),
            attempt: 0,
        }),
        hostname: "netbench".into(),
        annotations: HashMap::from([(
            "io.virtcontainers.memory_mib".to_string(),
            "512".to_string(),
        )]),
        ..Default::default()
    };
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_cfg.clone()),
            runtime_handler: String::new(),
        })
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id;
    let ip = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .await
        .expect("status")
        .into_inner()
        .status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .expect("pod ip");
    for (name, script) in [
        ("httpd", format!("mkdir -p /srv && dd if=/dev/zero of=/srv/big bs=1M count={mib} 2>/dev/null && exec httpd -f -p 80 -h /srv")),
        ("sink", "while true; do nc -l -p 5001 > /dev/null; done".to_string()),
    ] {
        let id = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(cri::ContainerConfig {
                    metadata: Some(cri::ContainerMetadata { name: name.into(), attempt: 0 }),
                    image: Some(cri::ImageSpec { image: image.clone(), ..Default::default() }),
                    command: vec!["/bin/sh".into(), "-c".into(), script],
                    ..Default::default()
                }),
                sandbox_config: Some(pod_cfg.clone()),
            })
            .await
            .expect("create")
            .into_inner()
            .container_id;
        rt.start_container(cri::StartContainerRequest { container_id: id }).await.expect("start");
    }
    // Wait until the file is complete (httpd answers only after dd).
    let ipc = ip.clone();
    tokio::task::spawn_blocking(move || drop(connect(format!("{ipc}:80").parse().unwrap())))
        .await
        .unwrap();
    let vm = {
        let ip = ip.clone();
        tokio::task::spawn_blocking(move || measure(&ip, mib, connects))
            .await
            .unwrap()
    };
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("stop");
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .expect("remove");

    println!("pod networking, {mib} MiB transfers (median of 3), TCP connect median of {connects}");
    println!(
        "{:<28} {:>14} {:>14} {:>14}",
        "", "host<-pod MiB/s", "host->pod MiB/s", "connect µs"
    );
    println!(
        "{:<28} {:>14.1} {:>14.1} {:>14.1}",
        "plain netns (baseline)", plain.0, plain.1, plain.2
    );
    println!(
        "{:<28} {:>14.1} {:>14.1} {:>14.1}",
        "pod VM (tc-filter tap)", vm.0, vm.1, vm.2
    );
    println!(
        "{:<28} {:>14.3} {:>14.3} {:>14.2}",
        "ratio VM / netns",
        vm.0 / plain.0,
        vm.1 / plain.1,
        vm.2 / plain.2
    );
}
