//! Every agent request type decoded from mutated and random bytes (what a
//! compromised or buggy host could send over vsock), and what decodes run
//! through the agent's own checks and conversions that need no VM: IDs,
//! the rootfs path, the OCI spec and its bind mounts, an exec's process,
//! cgroup resources, MACs, addresses, CIDRs, sysctls, sandbox files, a
//! clone's identity.
//! Each returns a value or an InvalidArgument — never a panic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use agent::protocol::agent as pb;
use libcontainer::oci_spec::runtime::{Process, Spec};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use protobuf::Message;

use crate::container::{self, Failure};
use crate::network;
use crate::personalize;

fn config() -> Config {
    Config {
        cases: 3000,
        rng_seed: RngSeed::Fixed(0xa9e7_0001),
        failure_persistence: None,
        ..Config::default()
    }
}

/// Ok, or the InvalidArgument a request's fault must be.
fn checked<T>(what: &str, r: Result<T, Failure>) -> Result<(), TestCaseError> {
    match r {
        Ok(_) | Err(Failure::InvalidArgument(_)) => Ok(()),
        Err(other) => Err(TestCaseError::fail(format!("{what}: {other:?}"))),
    }
}

fn spec_json() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"args": ["/bin/sh"], "cwd": "/", "env": ["PATH=/bin", "A=b"], "terminal": false,
                    "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs"},
        "hostname": "pod",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "source": format!("{}/vol/data", agent::SHARED_FS_GUEST_PATH), "options": ["rbind", "ro"]},
            {"destination": "/etc/x", "source": "/etc/passwd", "options": ["bind"]}
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}], "cgroupsPath": "/vc/c1",
                  "resources": {"memory": {"limit": 268435456, "swap": 536870912}, "cpu": {"shares": 512, "quota": 50000, "period": 100000}}}
    }))
    .unwrap()
}

fn resources_json() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "memory": {"limit": 268435456, "reservation": 1000, "swap": -1},
        "cpu": {"shares": 2, "quota": -1, "period": 100000, "cpus": "0-1", "mems": "0"},
        "pids": {"limit": 100}
    }))
    .unwrap()
}

/// A valid request of every type, encoded, with a name.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut create = pb::CreateContainerRequest::new();
    create.container_id = "c1".into();
    create.oci_spec = spec_json();
    create.rootfs_shared_path = "containers/c1/rootfs".into();
    create.stdin = true;
    let mut block = pb::BlockRootfs::new();
    block.scsi_target = 1;
    block.fstype = "ext4".into();
    create.rootfs_block = protobuf::MessageField::some(block);
    let mut exec = pb::ExecProcessRequest::new();
    exec.container_id = "c1".into();
    exec.exec_id = "e1".into();
    exec.args = vec!["/bin/ls".into(), "-l".into()];
    exec.env = vec!["A=c".into(), "NOEQ".into()];
    exec.cwd = "/tmp".into();
    let mut update = pb::UpdateContainerRequest::new();
    update.container_id = "c1".into();
    update.resources = resources_json();
    let mut iface = pb::Interface::new();
    iface.name = "eth0".into();
    iface.hw_addr = "02:42:ac:11:00:02".into();
    iface.mtu = 1500;
    let mut ip = pb::IPAddress::new();
    ip.address = "10.211.79.5".into();
    ip.prefix_len = 24;
    iface.ip_addresses.push(ip);
    let mut upd_iface = pb::UpdateInterfaceRequest::new();
    upd_iface.interface = protobuf::MessageField::some(iface);
    let mut route = pb::Route::new();
    route.dest = "10.0.0.0/8".into();
    route.gateway = "10.211.79.1".into();
    route.device = "eth0".into();
    let mut routes = pb::UpdateRoutesRequest::new();
    routes.routes.push(route);
    let mut neigh = pb::ArpNeighbor::new();
    neigh.ip_address = "10.211.79.1".into();
    neigh.hw_addr = "02:42:ac:11:00:01".into();
    neigh.device = "eth0".into();
    let mut neighs = pb::AddArpNeighborsRequest::new();
    neighs.neighbors.push(neigh);
    let mut sysctls = pb::SetSysctlsRequest::new();
    sysctls
        .sysctls
        .insert("net.ipv4.ip_forward".into(), "1".into());
    sysctls
        .sysctls
        .insert("net.ipv4.conf.eth0/100.forwarding".into(), "0".into());
    let mut files = pb::SetSandboxFilesRequest::new();
    files.hostname = "pod".into();
    files.hosts = "127.0.0.1 localhost\n".into();
    files.resolv_conf = "nameserver 10.96.0.10\n".into();
    let mut identity = pb::PersonalizeRequest::new();
    identity.entropy = vec![0x5a; 64];
    identity.realtime_ns = 1_700_000_000_000_000_000;
    identity.machine_id = "0123456789abcdef0123456789abcdef".into();
    identity.secret = "0f".repeat(32);
    let mut ctr = pb::ContainerRequest::new();
    ctr.container_id = "c1".into();
    ctr.exec_id = "e1".into();
    let mut signal = pb::SignalProcessRequest::new();
    signal.container_id = "c1".into();
    signal.signal = 15;
    let mut remove = pb::RemoveContainerRequest::new();
    remove.container_id = "c1".into();
    let mut read = pb::ReadStreamRequest::new();
    read.container_id = "c1".into();
    read.max_bytes = 4096;
    let mut write = pb::WriteStreamRequest::new();
    write.container_id = "c1".into();
    write.data = b"input\n".to_vec();
    let mut resize = pb::TtyWinResizeRequest::new();
    resize.container_id = "c1".into();
    resize.rows = 24;
    resize.cols = 80;
    vec![
        ("CreateContainer", create.write_to_bytes().unwrap()),
        ("ExecProcess", exec.write_to_bytes().unwrap()),
        ("UpdateContainer", update.write_to_bytes().unwrap()),
        ("UpdateInterface", upd_iface.write_to_bytes().unwrap()),
        ("UpdateRoutes", routes.write_to_bytes().unwrap()),
        ("AddArpNeighbors", neighs.write_to_bytes().unwrap()),
        ("SetSysctls", sysctls.write_to_bytes().unwrap()),
        ("SetSandboxFiles", files.write_to_bytes().unwrap()),
        ("Personalize", identity.write_to_bytes().unwrap()),
        ("Container", ctr.write_to_bytes().unwrap()),
        ("SignalProcess", signal.write_to_bytes().unwrap()),
        ("RemoveContainer", remove.write_to_bytes().unwrap()),
        ("ReadStream", read.write_to_bytes().unwrap()),
        ("WriteStream", write.write_to_bytes().unwrap()),
        ("TtyWinResize", resize.write_to_bytes().unwrap()),
    ]
}

fn template() -> Process {
    serde_json::from_value(serde_json::json!({
        "args": ["/bin/sh"], "cwd": "/", "env": ["PATH=/bin", "A=b"], "user": {"uid": 0, "gid": 0}
    }))
    .unwrap()
}

/// Decodes `bytes` as request type `name` and runs what the agent runs on
/// it before touching the guest. Whether it decoded.
fn exercise(name: &str, bytes: &[u8], dir: &std::path::Path) -> Result<bool, TestCaseError> {
    macro_rules! decode {
        ($t:ty) => {
            match <$t>::parse_from_bytes(bytes) {
                Ok(r) => r,
                Err(_) => return Ok(false),
            }
        };
    }
    match name {
        "CreateContainer" => {
            let r = decode!(pb::CreateContainerRequest);
            checked("container id", container::check_id(&r.container_id))?;
            checked("rootfs", container::shared_path(&r.rootfs_shared_path))?;
            if let Ok(mut spec) = serde_json::from_slice::<Spec>(&r.oci_spec) {
                checked("mounts", container::check_mounts(&mut spec))?;
                if let Some(p) = spec.process() {
                    let mut exec = pb::ExecProcessRequest::new();
                    exec.args = vec!["true".into()];
                    let _ = container::exec_process(p, &exec);
                }
            }
        }
        "ExecProcess" => {
            let r = decode!(pb::ExecProcessRequest);
            checked("container id", container::check_id(&r.container_id))?;
            checked("exec id", container::check_id(&r.exec_id))?;
            let p = container::exec_process(&template(), &r);
            prop_assert_eq!(p.args().clone(), Some(r.args.clone()));
        }
        "UpdateContainer" => {
            let r = decode!(pb::UpdateContainerRequest);
            checked("container id", container::check_id(&r.container_id))?;
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&r.resources) {
                checked("resources", container::cgroup_writes(&v))?;
            }
        }
        "UpdateInterface" => {
            let r = decode!(pb::UpdateInterfaceRequest);
            let i = r.interface.into_option().unwrap_or_default();
            checked("mac", network::parse_mac(&i.hw_addr))?;
            for a in &i.ip_addresses {
                checked("address", network::parse_ip(&a.address, "address"))?;
            }
        }
        "UpdateRoutes" => {
            let r = decode!(pb::UpdateRoutesRequest);
            for route in &r.routes {
                checked("dest", network::parse_cidr(&route.dest))?;
                checked("gateway", network::parse_ip(&route.gateway, "gateway"))?;
                checked("source", network::parse_ip(&route.source, "source"))?;
            }
        }
        "AddArpNeighbors" => {
            let r = decode!(pb::AddArpNeighborsRequest);
            for n in &r.neighbors {
                checked("ip", network::parse_ip(&n.ip_address, "neighbor"))?;
                checked("mac", network::parse_mac(&n.hw_addr))?;
            }
        }
        "SetSysctls" => {
            let r = decode!(pb::SetSysctlsRequest);
            // An empty root: nothing exists there, so nothing is written.
            checked("sysctls", network::set_sysctls_in(dir, &r.sysctls))?;
            prop_assert!(
                std::fs::read_dir(dir).unwrap().next().is_none(),
                "a sysctl file was made"
            );
        }
        "SetSandboxFiles" => {
            let r = decode!(pb::SetSandboxFilesRequest);
            let files = dir.join("files");
            checked("sandbox files", network::set_sandbox_files_in(&files, &r))?;
            let _ = std::fs::remove_dir_all(&files);
        }
        "Personalize" => {
            let r = decode!(pb::PersonalizeRequest);
            checked("personalize", personalize::validate(r))?;
        }
        "Container" => {
            let r = decode!(pb::ContainerRequest);
            checked("id", container::check_id(&r.container_id))?;
        }
        "SignalProcess" => {
            let r = decode!(pb::SignalProcessRequest);
            checked("id", container::check_id(&r.container_id))?;
        }
        "RemoveContainer" => {
            let r = decode!(pb::RemoveContainerRequest);
            checked("id", container::check_id(&r.container_id))?;
        }
        "ReadStream" => {
            decode!(pb::ReadStreamRequest);
        }
        "WriteStream" => {
            decode!(pb::WriteStreamRequest);
        }
        "TtyWinResize" => {
            decode!(pb::TtyWinResizeRequest);
        }
        other => prop_assert!(false, "no case for {}", other),
    }
    Ok(true)
}

proptest! {
    #![proptest_config(config())]

    /// Valid requests with bytes flipped, overwritten, inserted, cut.
    #[test]
    fn mutated_requests_decode_or_fail_cleanly(
        which in any::<prop::sample::Index>(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..5),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let seeds = seeds();
        let (name, seed) = &seeds[which.index(seeds.len())];
        let mut v = seed.clone();
        for (at, byte, op) in edits {
            let i = at.index(v.len().max(1));
            match op {
                0 if !v.is_empty() => v[i] ^= byte,
                1 => v.insert(i.min(v.len()), byte),
                2 => v.truncate(i),
                _ if !v.is_empty() => v[i] = byte,
                _ => {}
            }
        }
        exercise(name, &v, dir.path())?;
    }

    /// Arbitrary bytes as each request type.
    #[test]
    fn random_bytes_as_every_request_type(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let dir = tempfile::tempdir().unwrap();
        for (name, _) in seeds() {
            exercise(name, &bytes, dir.path())?;
        }
    }

    /// The strings the checks parse, arbitrary.
    #[test]
    fn arbitrary_strings_through_the_checks(s in "\\PC{0,40}", t in "[0-9a-f:./A-Z-]{0,40}") {
        for text in [&s, &t] {
            checked("id", container::check_id(text))?;
            checked("rootfs", container::shared_path(text))?;
            checked("mac", network::parse_mac(text))?;
            checked("ip", network::parse_ip(text, "x"))?;
            checked("cidr", network::parse_cidr(text))?;
        }
    }
}

/// The seeds decode and pass (so the mutations start from requests that
/// reach the checks, not from decode errors).
#[test]
fn the_seed_requests_decode_and_pass_the_checks() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in seeds() {
        assert!(
            exercise(name, &bytes, dir.path()).unwrap(),
            "{name} did not decode"
        );
    }
    let mut spec: Spec = serde_json::from_slice(&spec_json()).unwrap();
    // The bind mount from /etc is refused; the shared one is not on this host.
    assert!(matches!(
        container::check_mounts(&mut spec),
        Err(Failure::InvalidArgument(_))
    ));
    let v: serde_json::Value = serde_json::from_slice(&resources_json()).unwrap();
    assert!(!container::cgroup_writes(&v).unwrap().is_empty());
}
