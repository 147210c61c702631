//! TCP throughput and round-trip latency between the host and a plain pod
//! netns on a default-style bridge network (bridge + host-local + portmap +
//! loopback), through the real CNI plugins. The baseline for host ↔ pod VM.
//!
//! Run as root: `cargo run --release -p cni --example bench_netns -- [seconds] [rtt_iters]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cni::{
    Cni, CniConfig, InterworkingModel, NetNs, NetworkPlugin, PodIdentity, PodNetwork,
    PodNetworkRequest,
};

const BRIDGE: &str = "vcbench0";
const NET: &str = "vc-bench";
const CHUNK: usize = 128 * 1024;

/// Removes the pod network, the bridge and the temp dir, even on error.
struct Guard {
    net: Option<PodNetwork>,
    _dir: tempfile::TempDir,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(net) = self.net.take() {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                if let Err(e) = rt.block_on(net.teardown("bench")) {
                    eprintln!("teardown: {e}");
                }
            }
        }
        let _ = Command::new("ip").args(["link", "del", BRIDGE]).output();
    }
}

fn serve(listener: TcpListener) {
    // Connection 1: sink (host → pod), 2: source (pod → host), 3: echo (RTT).
    for (i, conn) in listener.incoming().enumerate() {
        let Ok(mut s) = conn else { return };
        let _ = s.set_nodelay(true);
        match i {
            0 => {
                let mut buf = vec![0u8; CHUNK];
                let mut total = 0u64;
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = s.write_all(&total.to_be_bytes());
            }
            1 => {
                let buf = vec![0x5au8; CHUNK];
                while s.write_all(&buf).is_ok() {}
            }
            _ => {
                let mut b = [0u8; 1];
                while s.read_exact(&mut b).is_ok() {
                    if s.write_all(&b).is_err() {
                        break;
                    }
                }
                return;
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let secs: u64 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(5);
    let rtt_iters: usize = args
        .get(2)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20_000);
    let dir = tempfile::tempdir()?;
    let _ = Command::new("ip").args(["link", "del", BRIDGE]).output();
    let subnet = cni::defaults::pick_subnet(&cni::defaults::host_routes()?)
        .context("no free 10.88-99 /16")?;
    let mut list = cni::defaults::default_conflist(BRIDGE, &subnet);
    list["name"] = NET.into();
    list["plugins"][0]["ipam"]["dataDir"] = dir
        .path()
        .join("ipam")
        .to_string_lossy()
        .into_owned()
        .into();
    let conf = dir.path().join("conf");
    std::fs::create_dir_all(&conf)?;
    std::fs::write(conf.join("10-bench.conflist"), serde_json::to_vec(&list)?)?;
    let cni = Cni::new(CniConfig {
        conf_dir: conf,
        bin_dirs: vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
        cache_dir: dir.path().join("cache"),
        timeout: Duration::from_secs(30),
    });
    let net = PodNetwork::new(
        cni,
        dir.path().join("netns"),
        dir.path().join("state"),
        InterworkingModel::None.build(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let req = PodNetworkRequest {
        sandbox_id: "bench".into(),
        pod: PodIdentity {
            namespace: "bench".into(),
            name: "bench".into(),
            uid: "bench".into(),
        },
        ..Default::default()
    };
    let status = rt.block_on(net.setup(&req))?;
    let _guard = Guard {
        net: Some(net),
        _dir: dir,
    };
    let pod_ip: IpAddr = *status.pod_ips.first().context("no pod IP")?;
    println!(
        "netns {} pod ip {pod_ip} on {subnet} (bridge {BRIDGE}), mtu {}",
        status.netns.display(),
        status.interfaces[0].mtu
    );

    let ns = NetNs::open(&status.netns)?;
    let listener = ns.run(|| {
        TcpListener::bind("0.0.0.0:5201").map_err(|source| cni::CniError::Io {
            action: "bind in the pod netns",
            path: "0.0.0.0:5201".into(),
            source,
        })
    })?;
    let server = std::thread::spawn(move || serve(listener));
    let addr = (pod_ip, 5201).into();
    let dur = Duration::from_secs(secs);

    // Host → pod.
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    let buf = vec![0xa5u8; CHUNK];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < dur {
        c.write_all(&buf)?;
        sent += CHUNK as u64;
    }
    c.shutdown(Shutdown::Write)?;
    let mut ack = [0u8; 8];
    c.read_exact(&mut ack)?;
    let elapsed = start.elapsed().as_secs_f64();
    if u64::from_be_bytes(ack) != sent {
        bail!(
            "server counted {} bytes, sent {sent}",
            u64::from_be_bytes(ack)
        );
    }
    let up = sent as f64 * 8.0 / elapsed / 1e9;

    // Pod → host.
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    let mut rbuf = vec![0u8; CHUNK];
    let start = Instant::now();
    let mut got = 0u64;
    while start.elapsed() < dur {
        let n = c.read(&mut rbuf)?;
        if n == 0 {
            bail!("server closed early");
        }
        got += n as u64;
    }
    let elapsed = start.elapsed().as_secs_f64();
    drop(c);
    let down = got as f64 * 8.0 / elapsed / 1e9;

    // RTT: 1-byte ping-pong.
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    c.set_nodelay(true)?;
    let mut samples = Vec::with_capacity(rtt_iters);
    let mut b = [7u8; 1];
    for _ in 0..rtt_iters {
        let t = Instant::now();
        c.write_all(&b)?;
        c.read_exact(&mut b)?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(c);
    let _ = server.join();
    samples.sort_by(f64::total_cmp);
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p) as usize];

    println!("throughput host->netns: {up:.2} Gbit/s ({secs}s)");
    println!("throughput netns->host: {down:.2} Gbit/s ({secs}s)");
    println!(
        "tcp rtt ({rtt_iters} x 1 byte): mean {mean:.1} us, p50 {:.1} us, p99 {:.1} us",
        pct(0.5),
        pct(0.99)
    );
    println!(
        "{}",
        serde_json::json!({"bench": "host_netns", "tx_gbps": up, "rx_gbps": down, "rtt_us_mean": mean, "rtt_us_p50": pct(0.5), "rtt_us_p99": pct(0.99)})
    );
    Ok(())
}
