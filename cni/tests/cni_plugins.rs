//! The CNI runner against Debian's real plugins in real namespaces (root).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::time::Duration;

use cni::{Cni, CniError, ErrorKind, NetNs, PodIdentity, RuntimeConf};
use common::TestEnv;
use serde_json::json;

fn pod() -> PodIdentity {
    PodIdentity {
        namespace: "default".into(),
        name: "web".into(),
        uid: "uid-1".into(),
    }
}

#[tokio::test]
async fn bridge_add_check_del_and_the_host_reaches_the_pod() {
    let env = TestEnv::new("a", 1);
    env.write_conf(
        "10-test.conflist",
        &json!({"cniVersion": "1.0.0", "name": env.net, "plugins": [
            env.bridge_plugin(),
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {"type": "loopback"}
        ]}),
    );
    let ns = NetNs::create(&env.netns_dir(), "pa").unwrap();
    let mut rt = RuntimeConf::for_pod("pa", ns.path(), &pod());
    rt.capabilities.port_mappings = vec![cni::PortMapping {
        host_port: 18081,
        container_port: 80,
        protocol: "tcp".into(),
        host_ip: String::new(),
    }];
    let cni = env.cni();
    let added = cni.add(&rt).await.unwrap();

    // The result: eth0 in the sandbox with an address of the subnet.
    let (idx, eth0) = added
        .result
        .sandbox_interface("eth0")
        .expect("eth0 in result");
    assert_eq!(eth0.sandbox.as_deref(), Some(ns.path().to_str().unwrap()));
    let ip = added
        .result
        .ips
        .iter()
        .find(|i| i.interface == Some(idx))
        .expect("ip");
    assert_eq!(ip.gateway, Some(IpAddr::V4(env.gateway())));
    assert!(ip
        .address
        .to_string()
        .starts_with(&format!("10.123.{}.", env.octet)));
    assert_eq!(
        common::addrs_in(ns.path(), "eth0"),
        vec![ip.address.to_string()]
    );
    assert_eq!(env.ipam_allocations(), vec![ip.address.addr.to_string()]);
    assert!(
        !env.iptables_lines().is_empty(),
        "ipMasq and portmap rules expected"
    );
    assert!(
        env.iptables_lines().iter().any(|l| l.contains("18081")),
        "hostPort DNAT rule expected: {:?}",
        env.iptables_lines()
    );
    assert_eq!(env.bridge_ports().len(), 1);

    // The host reaches a server in the pod by its IP.
    let listener = common::listen_in(&ns, "0.0.0.0:8080");
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        s.write_all(&b).unwrap();
    });
    let mut c = TcpStream::connect_timeout(&(ip.address.addr, 8080).into(), Duration::from_secs(5))
        .unwrap();
    c.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    server.join().unwrap();

    // CHECK passes (Debian's portmap 1.1.1 CHECK is broken: skipped).
    cni.check(&rt, cni::cni::CHECK_SKIP_DEFAULT).await.unwrap();
    // A second ADD of the same attachment is refused, not run.
    assert_eq!(
        cni.add(&rt).await.unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );

    cni.del(&rt).await.unwrap();
    assert!(!cni.has_cached(&rt));
    assert_eq!(common::links_in(&ns), Vec::<String>::new());
    // DEL is idempotent.
    cni.del(&rt).await.unwrap();
    ns.remove().unwrap();
    ns.remove().unwrap();
    env.assert_clean();
}

#[tokio::test]
async fn del_after_a_restart_uses_the_cache() {
    let env = TestEnv::new("b", 2);
    env.write_conf(
        "10-test.conflist",
        &json!({"cniVersion": "0.4.0", "name": env.net, "plugins": [env.bridge_plugin()]}),
    );
    let ns = NetNs::create(&env.netns_dir(), "pb").unwrap();
    let rt = RuntimeConf::for_pod("pb", ns.path(), &pod());
    let added = env.cni().add(&rt).await.unwrap();
    assert_eq!(added.result.cni_version, "0.4.0");
    assert_eq!(env.ipam_allocations().len(), 1);

    // "Restart": a new Cni, same cache, and the config is gone meanwhile.
    std::fs::remove_file(env.conf_dir().join("10-test.conflist")).unwrap();
    let restarted = Cni::new(env.cni_config(Duration::from_secs(30)));
    assert_eq!(
        restarted.cached_result(&rt).unwrap().unwrap().ips,
        added.result.ips,
        "the cached result is the ADD result"
    );
    restarted.del(&rt).await.unwrap();
    ns.remove().unwrap();
    env.assert_clean();
}

#[tokio::test]
async fn a_plugin_failing_half_way_leaves_nothing() {
    let env = TestEnv::new("c", 3);
    env.script_plugin(
        "vc-fail",
        r#"cat >/dev/null
if [ "$CNI_COMMAND" = ADD ]; then
  echo '{"cniVersion":"1.0.0","code":11,"msg":"refusing on purpose","details":"test"}'
  exit 1
fi
exit 0"#,
    );
    env.write_conf(
        "10-test.conflist",
        &json!({"cniVersion": "1.0.0", "name": env.net, "plugins": [
            env.bridge_plugin(), {"type": "vc-fail"}
        ]}),
    );
    let ns = NetNs::create(&env.netns_dir(), "pc").unwrap();
    let rt = RuntimeConf::for_pod("pc", ns.path(), &pod());
    let cni = env.cni();
    let err = cni.add(&rt).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, CniError::PluginFailed { code: 11, .. }),
        "{err:?}"
    );
    assert!(
        msg.contains("vc-fail") && msg.contains("refusing on purpose"),
        "{msg}"
    );
    assert!(!cni.has_cached(&rt));
    assert_eq!(
        common::links_in(&ns),
        Vec::<String>::new(),
        "eth0 left in the netns"
    );
    ns.remove().unwrap();
    env.assert_clean();
}

#[tokio::test]
async fn bad_config_dirs_and_files_are_named() {
    let env = TestEnv::new("d", 4);
    let rt = RuntimeConf::for_pod("pd", &env.netns_dir().join("pd"), &pod());

    // Missing conf dir.
    let mut cfg = env.cni_config(Duration::from_secs(5));
    cfg.conf_dir = env.dir.path().join("nope");
    let err = Cni::new(cfg).add(&rt).await.unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);

    // Empty conf dir (other files are ignored).
    std::fs::write(env.conf_dir().join("README"), "x").unwrap();
    let err = env.cni().add(&rt).await.unwrap_err();
    assert!(matches!(err, CniError::NoConfig { .. }), "{err:?}");

    // Malformed JSON: the first file in lexical order is the one used and named.
    std::fs::write(
        env.conf_dir().join("05-broken.conflist"),
        "{\"cniVersion\": ",
    )
    .unwrap();
    env.write_conf(
        "10-ok.conflist",
        &json!({"cniVersion": "1.0.0", "name": env.net, "plugins": [env.bridge_plugin()]}),
    );
    let err = env.cni().add(&rt).await.unwrap_err();
    assert!(err.to_string().contains("05-broken.conflist"), "{err}");
    std::fs::remove_file(env.conf_dir().join("05-broken.conflist")).unwrap();

    // Unknown plugin type: named, and nothing ran (no cache, no allocation).
    env.write_conf(
        "05-unknown.conflist",
        &json!({"cniVersion": "1.0.0", "name": env.net, "plugins": [env.bridge_plugin(), {"type": "no-such-plugin"}]}),
    );
    let err = env.cni().add(&rt).await.unwrap_err();
    assert!(
        matches!(&err, CniError::PluginNotFound { plugin, .. } if plugin == "no-such-plugin"),
        "{err:?}"
    );
    assert!(err.to_string().contains("no-such-plugin"));
    assert!(!env.cni().has_cached(&rt));
    env.assert_clean();
}

#[tokio::test]
async fn a_hanging_plugin_times_out_and_its_process_group_is_killed() {
    let env = TestEnv::new("e", 5);
    let pids = env.dir.path().join("pids");
    env.script_plugin(
        "vc-hang",
        &format!(
            r#"cat >/dev/null
[ "$CNI_COMMAND" = ADD ] || exit 0
sleep 300 &
echo "$$ $!" > {}
wait"#,
            pids.display()
        ),
    );
    env.write_conf(
        "10-test.conflist",
        &json!({"cniVersion": "1.0.0", "name": env.net, "plugins": [{"type": "vc-hang"}]}),
    );
    let ns = NetNs::create(&env.netns_dir(), "pe").unwrap();
    let rt = RuntimeConf::for_pod("pe", ns.path(), &pod());
    let cni = Cni::new(env.cni_config(Duration::from_millis(1500)));
    let err = cni.add(&rt).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DeadlineExceeded, "{err:?}");
    assert!(err.to_string().contains("vc-hang"), "{err}");
    let text = std::fs::read_to_string(&pids).unwrap();
    let ids: Vec<i32> = text
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    for pid in ids {
        // SIGKILL is delivered when the process next runs: wait (bounded).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !common::process_gone(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            common::process_gone(pid),
            "plugin process {pid} survived the timeout"
        );
    }
    assert!(!cni.has_cached(&rt));
    ns.remove().unwrap();
    env.assert_clean();
}

#[tokio::test]
async fn spec_0_3_1_lists_add_and_del_without_prev_result() {
    let env = TestEnv::new("j", 10);
    env.write_conf("10-test.conf", &{
        let mut p = env.bridge_plugin();
        p["cniVersion"] = json!("0.3.1");
        p["name"] = json!(env.net);
        p
    });
    let ns = NetNs::create(&env.netns_dir(), "pj").unwrap();
    let rt = RuntimeConf::for_pod("pj", ns.path(), &pod());
    let cni = env.cni();
    let added = cni.add(&rt).await.unwrap();
    assert_eq!(added.result.cni_version, "0.3.1");
    assert_eq!(added.result.pod_ips().len(), 1);
    // CHECK does not exist before 0.4.0: nothing is run, nothing fails.
    cni.check(&rt, &[]).await.unwrap();
    cni.del(&rt).await.unwrap();
    ns.remove().unwrap();
    env.assert_clean();
}

#[tokio::test]
async fn the_bandwidth_capability_reaches_the_plugin_and_del_removes_its_shaping() {
    let env = TestEnv::new("l", 12);
    // Only this test uses the bandwidth plugin: its ifb devices are ours.
    let _ifbs = IfbGuard;
    let mut bridge = env.bridge_plugin();
    bridge["ipMasq"] = json!(false);
    env.write_conf(
        "10-test.conflist",
        &json!({"cniVersion": "1.0.0", "name": env.net, "plugins": [
            bridge, {"type": "bandwidth", "capabilities": {"bandwidth": true}}
        ]}),
    );
    let ns = NetNs::create(&env.netns_dir(), "pl").unwrap();
    let mut rt = RuntimeConf::for_pod("pl", ns.path(), &pod());
    rt.capabilities.bandwidth = Some(cni::Bandwidth {
        ingress_rate: 8_000_000,
        ingress_burst: 80_000_000,
        egress_rate: 8_000_000,
        egress_burst: 80_000_000,
    });
    let cni = env.cni();
    cni.add(&rt).await.unwrap();
    let ports = env.bridge_ports();
    assert_eq!(ports.len(), 1);
    let qdisc = std::process::Command::new("tc")
        .args(["qdisc", "show", "dev", &ports[0]])
        .output()
        .unwrap();
    let qdisc = String::from_utf8_lossy(&qdisc.stdout).into_owned();
    assert!(
        qdisc.contains("tbf"),
        "the bandwidth plugin shapes the host veth: {qdisc}"
    );
    let ifbs_before = ifb_links();
    assert!(!ifbs_before.is_empty(), "egress shaping uses an ifb device");

    cni.del(&rt).await.unwrap();
    let left: Vec<String> = ifb_links()
        .into_iter()
        .filter(|l| l.starts_with("bwp"))
        .collect();
    assert_eq!(left, Vec::<String>::new(), "ifb devices left");
    ns.remove().unwrap();
    env.assert_clean();
}

fn ifb_links() -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-j", "link", "show", "type", "ifb"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or(json!([]));
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str().map(str::to_string))
        .filter(|n| n.starts_with("bwp"))
        .collect()
}

/// Deletes the bandwidth plugin's `bwp*` ifb devices even if the test fails.
struct IfbGuard;
impl Drop for IfbGuard {
    fn drop(&mut self) {
        for l in ifb_links() {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &l])
                .output();
        }
    }
}
