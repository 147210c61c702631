//! PodNetwork end to end on the host side: netns + CNI (real plugins) +
//! tcfilter, rolled back on failure and torn down without leftovers (root).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs::File;
use std::io::Read;
use std::net::{IpAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use cni::{
    open_tap, CniError, ErrorKind, Interworking, InterworkingModel, NetNs, NetworkPlugin,
    PodIdentity, PodNetwork, PodNetworkRequest, PortMapping, TcFilter,
};
use common::TestEnv;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use serde_json::json;

fn pod_network(env: &TestEnv, model: InterworkingModel) -> PodNetwork {
    PodNetwork::new(env.cni(), env.netns_dir(), env.state_dir(), model.build())
}

fn request(id: &str) -> PodNetworkRequest {
    PodNetworkRequest {
        sandbox_id: id.into(),
        pod: PodIdentity {
            namespace: "default".into(),
            name: format!("pod-{id}"),
            uid: format!("uid-{id}"),
        },
        port_mappings: vec![PortMapping {
            host_port: 18090,
            container_port: 80,
            protocol: "tcp".into(),
            host_ip: String::new(),
        }],
        ..Default::default()
    }
}

fn run_in(ns: &NetNs, program: &str, args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let program = program.to_string();
    let out = ns
        .run(move || {
            Command::new(&program)
                .args(&args)
                .output()
                .map_err(|e| CniError::Io {
                    action: "run",
                    path: program.clone().into(),
                    source: e,
                })
        })
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn tcfilter_pod_setup_redirects_veth_traffic_to_the_tap_and_teardown_leaves_nothing() {
    let env = TestEnv::new("f", 6);
    env.write_conf("10-default.conflist", &env.default_list());
    let net = pod_network(&env, InterworkingModel::TcFilter);
    let status = net.setup(&request("pf")).await.unwrap();

    // Plain data for the VM.
    assert_eq!(status.netns, env.netns_dir().join("pf"));
    assert_eq!(status.network_name, env.net);
    let iface = &status.interfaces[0];
    assert_eq!(iface.tap_name.as_deref(), Some("tap0_vc"));
    assert_eq!(iface.guest_name, "eth0");
    assert_eq!(iface.gateway, Some(IpAddr::V4(env.gateway())));
    assert_eq!(iface.ips.len(), 1);
    assert_eq!(iface.ips[0].prefix_len, 24);
    let pod_ip = iface.ips[0].addr;
    assert_eq!(status.pod_ips, vec![pod_ip]);
    let ns = NetNs::open(&status.netns).unwrap();
    let eth0: serde_json::Value =
        serde_json::from_str(&run_in(&ns, "ip", &["-j", "link", "show", "dev", "eth0"])).unwrap();
    assert_eq!(eth0[0]["address"].as_str(), Some(iface.mac.as_str()));
    let tap: serde_json::Value = serde_json::from_str(&run_in(
        &ns,
        "ip",
        &["-j", "link", "show", "dev", "tap0_vc"],
    ))
    .unwrap();
    assert_eq!(
        tap[0]["mtu"].as_u64(),
        Some(u64::from(iface.mtu)),
        "tap takes the veth's MTU"
    );
    let default = status
        .routes
        .iter()
        .find(|r| r.dest.prefix_len == 0)
        .expect("default route");
    assert_eq!(
        (default.gateway, default.device.as_str()),
        (Some(IpAddr::V4(env.gateway())), "eth0")
    );
    assert!(status
        .routes
        .iter()
        .any(|r| r.dest.to_string() == env.subnet() && r.scope == "link"));
    for dev in ["eth0", "tap0_vc"] {
        let filters = run_in(&ns, "tc", &["filter", "show", "dev", dev, "ingress"]);
        assert!(
            filters.contains("mirred") && filters.contains("Redirect"),
            "{dev}: {filters}"
        );
    }
    assert!(
        env.iptables_lines().iter().any(|l| l.contains("18090")),
        "hostPort rule"
    );
    assert_eq!(net.status("pf").await.unwrap(), status);
    assert_eq!(
        net.setup(&request("pf")).await.unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );

    // The redirect: what the host sends toward the pod IP arrives on the tap,
    // as plain Ethernet frames, or behind a 10-byte virtio_net_hdr with vnet_hdr.
    for (vnet_hdr, offset) in [(false, 0usize), (true, 10)] {
        let frame =
            frame_toward(&ns, pod_ip, vnet_hdr).expect("a frame toward the pod IP on the tap");
        let ethertype = u16::from_be_bytes([frame[offset + 12], frame[offset + 13]]);
        assert!(
            ethertype == 0x0806 || ethertype == 0x0800,
            "vnet_hdr={vnet_hdr}: ethertype {ethertype:#06x} at {offset}+12"
        );
    }

    let taps = cni::open_pod_taps(&status, true).unwrap();
    assert_eq!(taps.len(), 1);
    assert_eq!(taps[0].0, "eth0");
    drop(taps);

    // Detach alone removes the filters, qdiscs and the tap; attach again.
    TcFilter.detach(&ns, "eth0").unwrap();
    assert_eq!(common::links_in(&ns), vec!["eth0".to_string()]);
    assert!(!run_in(&ns, "tc", &["qdisc", "show", "dev", "eth0"]).contains("ingress"));
    TcFilter.detach(&ns, "eth0").unwrap();
    TcFilter.attach(&ns, "eth0").unwrap();

    net.teardown("pf").await.unwrap();
    assert_eq!(
        net.status("pf").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    net.teardown("pf").await.unwrap();
    assert!(!status.netns.exists());
    env.assert_clean();
}

#[tokio::test]
async fn a_failed_setup_rolls_back_every_step() {
    let env = TestEnv::new("g", 7);
    env.script_plugin(
        "vc-fail",
        r#"cat >/dev/null
[ "$CNI_COMMAND" = ADD ] || exit 0
echo '{"code":100,"msg":"half-way failure"}'
exit 1"#,
    );
    let mut list = env.default_list();
    list["plugins"]
        .as_array_mut()
        .unwrap()
        .insert(1, json!({"type": "vc-fail"}));
    env.write_conf("10-default.conflist", &list);
    let net = pod_network(&env, InterworkingModel::TcFilter);
    let err = net.setup(&request("pg")).await.unwrap_err();
    assert!(err.to_string().contains("vc-fail"), "{err}");
    assert_eq!(
        net.status("pg").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert!(std::fs::read_dir(env.state_dir()).unwrap().next().is_none());
    assert!(std::fs::read_dir(env.cache_dir().join("results"))
        .map(|mut d| d.next().is_none())
        .unwrap_or(true));
    env.assert_clean();
}

#[tokio::test]
async fn the_none_model_gives_no_tap_and_two_pods_get_their_own_ips() {
    let env = TestEnv::new("h", 8);
    env.write_conf("10-default.conflist", &env.default_list());
    let net = pod_network(&env, InterworkingModel::None);
    let mut a = request("ph1");
    a.port_mappings.clear();
    let mut b = request("ph2");
    b.port_mappings.clear();
    let sa = net.setup(&a).await.unwrap();
    let sb = net.setup(&b).await.unwrap();
    assert_eq!(sa.interfaces[0].tap_name, None);
    assert_ne!(sa.pod_ips, sb.pod_ips);
    assert_eq!(env.ipam_allocations().len(), 2);
    let ns = NetNs::open(&sa.netns).unwrap();
    assert_eq!(common::links_in(&ns), vec!["eth0".to_string()]);
    net.teardown("ph1").await.unwrap();
    net.teardown("ph2").await.unwrap();
    env.assert_clean();
}

#[tokio::test]
async fn teardown_after_the_netns_vanished_releases_the_ip() {
    // A host reboot empties /run: the netns is gone, the cache is not.
    // (Debian's bridge 1.1.1 finds ipMasq rules through the device in the
    // netns, so with ipMasq they would stay: see the README.)
    let env = TestEnv::new("i", 9);
    let mut bridge = env.bridge_plugin();
    bridge["ipMasq"] = json!(false);
    env.write_conf(
        "10-test.conflist",
        &json!({"cniVersion": "1.0.0", "name": env.net, "plugins": [bridge, {"type": "loopback"}]}),
    );
    let net = pod_network(&env, InterworkingModel::TcFilter);
    let mut req = request("pi");
    req.port_mappings.clear();
    let status = net.setup(&req).await.unwrap();
    assert_eq!(env.ipam_allocations().len(), 1);
    cni::netns::remove_path(&status.netns).unwrap();
    net.teardown("pi").await.unwrap();
    // The kernel destroys an unreferenced netns (and with it the veth pair)
    // asynchronously: wait for that, bounded, before checking.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !env.bridge_ports().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        net.status("pi").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    env.assert_clean();
}

#[tokio::test]
async fn dual_stack_pod_ips_come_back_v4_first_with_v6_routes() {
    let env = TestEnv::new("k", 11);
    let mut list = env.default_list();
    let v6 = format!("fd12:3:{}::/64", env.octet);
    list["plugins"][0]["ipam"]["ranges"] = json!([[{"subnet": env.subnet()}], [{"subnet": v6}]]);
    list["plugins"][0]["ipam"]["routes"] = json!([{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]);
    env.write_conf("10-default.conflist", &list);
    let net = pod_network(&env, InterworkingModel::TcFilter);
    let mut req = request("pk");
    req.port_mappings.clear();
    let status = net.setup(&req).await.unwrap();
    assert_eq!(status.pod_ips.len(), 2, "{:?}", status.pod_ips);
    assert!(
        status.pod_ips[0].is_ipv4() && status.pod_ips[1].is_ipv6(),
        "{:?}",
        status.pod_ips
    );
    let ips = &status.interfaces[0].ips;
    assert_eq!(ips.len(), 2, "{ips:?}");
    assert!(ips[0].is_ipv4() && !ips[1].is_ipv4());
    assert_eq!(ips[1].prefix_len, 64);
    assert!(
        status
            .routes
            .iter()
            .any(|r| r.dest.to_string() == "::/0" && r.gateway.is_some()),
        "{:?}",
        status.routes
    );
    assert!(status
        .routes
        .iter()
        .all(|r| !r.dest.to_string().starts_with("fe80")));
    assert!(
        env.iptables_lines()
            .iter()
            .any(|l| l.starts_with("ip6tables-save")),
        "ipMasq makes IPv6 rules too"
    );
    net.teardown("pk").await.unwrap();
    env.assert_clean();
}

/// Open the tap, send UDP toward `pod_ip` from the host until a frame that
/// names it comes out of the tap (bounded by 10 s), and return that frame.
fn frame_toward(ns: &NetNs, pod_ip: IpAddr, vnet_hdr: bool) -> Option<Vec<u8>> {
    let fd = open_tap(ns, "tap0_vc", vnet_hdr)
        .unwrap_or_else(|e| panic!("open_tap vnet_hdr={vnet_hdr}: {e:?} / {e}"));
    frame_on(fd, pod_ip)
}

/// A frame toward `pod_ip` read from the tap `fd` (traffic sent meanwhile).
fn frame_on(fd: std::os::fd::OwnedFd, pod_ip: IpAddr) -> Option<Vec<u8>> {
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).unwrap();
    let mut tap_file = File::from(fd);
    let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
    let IpAddr::V4(v4) = pod_ip else {
        panic!("v4 expected")
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        let _ = sock.send_to(b"hello", (pod_ip, 9));
        std::thread::sleep(Duration::from_millis(100));
        while let Ok(n) = tap_file.read(&mut buf) {
            if buf[..n].windows(4).any(|w| w == v4.octets()) {
                return Some(buf[..n].to_vec());
            }
        }
    }
    None
}

#[tokio::test]
async fn static_neighbours_of_the_netns_come_back_for_the_guest() {
    let env = TestEnv::new("m", 13);
    // A chained plugin that installs a permanent ARP entry and passes the
    // previous result on.
    env.script_plugin(
        "vc-neigh",
        r#"[ "$CNI_COMMAND" = ADD ] || { cat >/dev/null; exit 0; }
exec python3 -c '
import json, os, subprocess, sys
conf = json.load(sys.stdin)
subprocess.run(["nsenter", "--net=" + os.environ["CNI_NETNS"], "ip", "neigh", "add",
                "10.123.13.50", "lladdr", "02:00:00:00:13:50", "dev", os.environ["CNI_IFNAME"],
                "nud", "permanent"], check=True)
print(json.dumps(conf["prevResult"]))
'"#,
    );
    let mut bridge = env.bridge_plugin();
    bridge["ipMasq"] = json!(false);
    env.write_conf(
        "10-test.conflist",
        &json!({"cniVersion": "1.0.0", "name": env.net, "plugins": [bridge, {"type": "vc-neigh"}]}),
    );
    let net = pod_network(&env, InterworkingModel::TcFilter);
    let mut req = request("pm");
    req.port_mappings.clear();
    let status = net.setup(&req).await.unwrap();
    assert_eq!(
        status.neighbours,
        vec![cni::NeighbourInfo {
            ip: "10.123.13.50".parse().unwrap(),
            mac: "02:00:00:00:13:50".into(),
            device: "eth0".into(),
        }]
    );
    net.teardown("pm").await.unwrap();
    env.assert_clean();
}

#[tokio::test]
async fn a_held_tap_takes_the_veths_traffic_when_adopted_and_gives_it_back() {
    let env = TestEnv::new("n", 14);
    env.write_conf("10-default.conflist", &env.default_list());
    let net = pod_network(&env, InterworkingModel::TcFilter);
    let status = net.setup(&request("ph")).await.unwrap();
    let ns = NetNs::open(&status.netns).unwrap();
    let pod_ip = status.interfaces[0].ips[0].addr;

    let holding = cni::HoldingNetns::new().unwrap();
    let name = cni::held_tap_name("pool-00000000deadbeef");
    let held = holding.hold_tap(&name, false).unwrap();
    assert!(cni::link_stats(&ns, &name).is_err(), "held outside the pod");
    // Adopting what is not held fails and leaves the pod's own tap connected.
    assert!(holding.adopt("vcwnosuch", &ns, "eth0").is_err());
    assert!(frame_toward(&ns, pod_ip, false).is_some());

    holding.adopt(&name, &ns, "eth0").unwrap();
    assert!(cni::link_stats(&ns, &name).is_ok(), "moved into the pod");
    assert!(
        frame_on(held.try_clone().unwrap(), pod_ip).is_some(),
        "the veth's traffic goes to the held tap"
    );

    cni::held::restore(&ns, "eth0", &name).unwrap();
    assert!(cni::link_stats(&ns, &name).is_err(), "the held tap left");
    assert!(
        frame_toward(&ns, pod_ip, false).is_some(),
        "the pod's own tap has the traffic again"
    );
    drop(held);

    // A held tap lives as long as its descriptor, wherever it is.
    let other = cni::held_tap_name("pool-00000000feedf00d");
    let fd = holding.hold_tap(&other, false).unwrap();
    holding.adopt(&other, &ns, "eth0").unwrap();
    drop(fd);
    assert!(
        cni::link_stats(&ns, &other).is_err(),
        "gone with its descriptor"
    );

    net.teardown("ph").await.unwrap();
    assert!(!status.netns.exists());
}
