//! A NIC hot-plugged into a running pod VM (the seed's AddInterface), the
//! guest configured through the agent and reachable over it, then taken out
//! again (RemoveInterface) — with a tap the test opened in a netns of its own.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{process::Command, sync::Arc, time::Duration};

use podsandbox::{NetInterface, Runtime, SandboxConfig, TapFd};
use tests::TestEnv;

/// Removes the test's netns even when the test fails.
struct NsGuard(cni::NetNs);

impl Drop for NsGuard {
    fn drop(&mut self) {
        let _ = self.0.remove();
    }
}

fn in_ns(ns: &cni::NetNs, args: &[&str]) -> std::process::Output {
    Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .args(args)
        .output()
        .expect("nsenter")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nic_is_added_to_a_running_pod_and_removed() {
    let env = TestEnv::new();
    let rt = Runtime::new(env.config.clone()).expect("runtime");
    let ns = NsGuard(cni::NetNs::create(&env.dir.path().join("netns"), "hp").expect("netns"));
    rt.create_sandbox(SandboxConfig {
        id: "hot".into(),
        ..Default::default()
    })
    .await
    .expect("create");
    let result = tokio::time::timeout(Duration::from_secs(300), async {
        let tap = cni::open_tap(&ns.0, "hptap0", false).expect("tap");
        for args in [
            &["ip", "addr", "add", "10.123.0.1/24", "dev", "hptap0"][..],
            &["ip", "link", "set", "hptap0", "up"][..],
        ] {
            let out = in_ns(&ns.0, args);
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let nic = NetInterface {
            name: "net1".into(),
            mac: "0a:58:0a:7b:00:02".into(),
            mtu: 1400,
            ips: vec!["10.123.0.2/24".into()],
            tap: Some(TapFd(Arc::new(tap))),
            ..Default::default()
        };
        let guest = rt.add_interface("hot", nic).await.expect("add interface");
        assert_eq!(guest.name, "net1");
        assert_eq!(guest.mtu, 1400);
        assert_eq!(guest.ips, ["10.123.0.2/24"]);
        let ping = in_ns(
            &ns.0,
            &["busybox", "ping", "-c", "2", "-W", "10", "10.123.0.2"],
        );
        assert!(
            ping.status.success(),
            "the guest answers over the hot-plugged NIC: {}",
            String::from_utf8_lossy(&ping.stdout)
        );
        let (ifaces, routes) = rt.guest_network("hot").await.expect("list");
        assert!(
            ifaces
                .iter()
                .any(|i| i.name == "net1" && i.mac == "0a:58:0a:7b:00:02"),
            "{ifaces:?}"
        );
        assert!(
            routes
                .iter()
                .any(|r| r.dest == "10.123.0.0/24" && r.device == "net1"),
            "{routes:?}"
        );
        // The same MAC again is refused; a second slot exists.
        let again = NetInterface {
            name: "net2".into(),
            mac: "0a:58:0a:7b:00:02".into(),
            mtu: 0,
            ips: Vec::new(),
            tap: Some(TapFd(Arc::new(
                cni::open_tap(&ns.0, "hptap1", false).expect("tap"),
            ))),
            ..Default::default()
        };
        let err = rt
            .add_interface("hot", again)
            .await
            .expect_err("duplicate MAC");
        assert_eq!(err.kind(), podsandbox::ErrorKind::InvalidArgument, "{err}");

        rt.remove_interface("hot", "net1")
            .await
            .expect("remove interface");
        let (ifaces, _) = rt.guest_network("hot").await.expect("list");
        assert!(!ifaces.iter().any(|i| i.name == "net1"), "{ifaces:?}");
        let err = rt.remove_interface("hot", "net1").await.expect_err("gone");
        assert_eq!(err.kind(), podsandbox::ErrorKind::InvalidArgument);
    })
    .await;
    rt.stop_sandbox("hot").await.expect("stop");
    rt.delete_sandbox("hot").await.expect("delete");
    drop(ns);
    result.expect("hot-plug scenario within 5 minutes");
    env.assert_nothing_left("hot");
}
