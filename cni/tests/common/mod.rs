//! Shared test environment: temp conf/cache/netns/state dirs, a private bridge
//! and subnet per test, and a guard that removes everything even on failure.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cni::{Cni, CniConfig, NetNs};
use serde_json::{json, Value};

pub const SYSTEM_BIN: &str = "/usr/lib/cni";

/// One test's world. Dropping it deletes netns mounts, the bridge, iptables
/// rules tagged with its network name and its temp dir.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
    /// Network name: also the tag in every iptables comment the plugins write.
    pub net: String,
    pub bridge: String,
    /// The third octet of 10.123.N.0/24.
    pub octet: u8,
}

impl TestEnv {
    /// `code`: 2–4 letters, unique per test across the suite (names the
    /// bridge `vct<code>` and network `vct-<code>`); `octet`: unique too.
    pub fn new(code: &str, octet: u8) -> Self {
        let env = Self {
            dir: tempfile::tempdir().expect("temp dir"),
            net: format!("vct-{code}"),
            bridge: format!("vct{code}"),
            octet,
        };
        // Leftovers of an earlier killed run of this very test.
        env.cleanup_host();
        for d in ["conf", "cache", "netns", "state", "ipam", "bin"] {
            std::fs::create_dir_all(env.dir.path().join(d)).expect("mkdir");
        }
        env
    }

    pub fn conf_dir(&self) -> PathBuf {
        self.dir.path().join("conf")
    }
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }
    pub fn netns_dir(&self) -> PathBuf {
        self.dir.path().join("netns")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    pub fn ipam_dir(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }
    pub fn bin_dir(&self) -> PathBuf {
        self.dir.path().join("bin")
    }
    pub fn subnet(&self) -> String {
        format!("10.123.{}.0/24", self.octet)
    }
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 123, self.octet, 1)
    }

    /// A bridge plugin config (host-local IPAM in the temp dir).
    pub fn bridge_plugin(&self) -> Value {
        json!({
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": true,
            "ipMasq": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": self.subnet()}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": self.ipam_dir()
            }
        })
    }

    /// The default-style list (bridge, portmap, loopback) on this test's
    /// bridge, subnet and IPAM dir.
    pub fn default_list(&self) -> Value {
        let mut v = cni::defaults::default_conflist(&self.bridge, &self.subnet());
        v["name"] = json!(self.net);
        v["plugins"][0]["ipam"]["dataDir"] = json!(self.ipam_dir());
        v
    }

    pub fn write_conf(&self, file: &str, body: &Value) {
        std::fs::write(
            self.conf_dir().join(file),
            serde_json::to_vec_pretty(body).expect("json"),
        )
        .expect("write conf");
    }

    /// A shell-script plugin in the test's bin dir.
    ///
    /// The executable is written by `install`, not by this process: a write
    /// fd of ours would be inherited by processes other tests fork meanwhile
    /// and make exec fail with ETXTBSY until they exec.
    pub fn script_plugin(&self, name: &str, body: &str) {
        let src = self.dir.path().join(format!("{name}.src"));
        std::fs::write(&src, format!("#!/bin/sh\n{body}\n")).expect("write script");
        let status = Command::new("install")
            .arg("-m755")
            .arg(&src)
            .arg(self.bin_dir().join(name))
            .status()
            .expect("install");
        assert!(status.success(), "install {name}");
    }

    pub fn cni_config(&self, timeout: Duration) -> CniConfig {
        CniConfig {
            conf_dir: self.conf_dir(),
            bin_dirs: vec![self.bin_dir(), SYSTEM_BIN.into()],
            cache_dir: self.cache_dir(),
            timeout,
        }
    }

    pub fn cni(&self) -> Cni {
        Cni::new(self.cni_config(Duration::from_secs(30)))
    }

    /// Files host-local keeps for allocations (IPs and last_reserved_ip).
    pub fn ipam_allocations(&self) -> Vec<String> {
        let dir = self.ipam_dir().join(&self.net);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.parse::<IpAddr>().is_ok())
            .collect()
    }

    /// iptables lines (all tables) that mention this test's network.
    pub fn iptables_lines(&self) -> Vec<String> {
        let needle = format!("name: \\\"{}\\\"", self.net);
        let needle2 = format!("name: \"{}\"", self.net);
        let mut lines = Vec::new();
        for save in ["iptables-save", "ip6tables-save"] {
            let out = Command::new(save).output().expect(save);
            lines.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.contains(&needle) || l.contains(&needle2))
                    .map(|l| format!("{save}: {l}")),
            );
        }
        lines
    }

    /// Interfaces enslaved to the test's bridge (the host ends of veths).
    pub fn bridge_ports(&self) -> Vec<String> {
        let out = Command::new("ip")
            .args(["-j", "link", "show", "master", &self.bridge])
            .output()
            .expect("ip link");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(json!([]));
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l["ifname"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn netns_entries(&self) -> Vec<String> {
        std::fs::read_dir(self.netns_dir())
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Assert the host holds nothing of this test's network but the bridge.
    pub fn assert_clean(&self) {
        assert_eq!(
            self.iptables_lines(),
            Vec::<String>::new(),
            "iptables rules left"
        );
        assert_eq!(
            self.ipam_allocations(),
            Vec::<String>::new(),
            "IP allocations left"
        );
        assert_eq!(
            self.bridge_ports(),
            Vec::<String>::new(),
            "veths left on the bridge"
        );
        assert_eq!(self.netns_entries(), Vec::<String>::new(), "netns left");
    }

    fn cleanup_host(&self) {
        for entry in self.netns_entries() {
            let _ = cni::netns::remove_path(&self.netns_dir().join(entry));
        }
        purge_iptables(&self.net);
        for port in self.bridge_ports() {
            let _ = Command::new("ip").args(["link", "del", &port]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        self.cleanup_host();
    }
}

/// Delete every iptables rule whose comment names network `net`, and the
/// chains those rules lived in or jumped to.
pub fn purge_iptables(net: &str) {
    let tags = [format!("name: \"{net}\""), format!("name: \\\"{net}\\\"")];
    for (ipt, table) in [
        ("iptables", "nat"),
        ("iptables", "filter"),
        ("iptables", "mangle"),
        ("ip6tables", "nat"),
        ("ip6tables", "filter"),
        ("ip6tables", "mangle"),
    ] {
        let Ok(out) = Command::new(ipt).args(["-t", table, "-S"]).output() else {
            continue;
        };
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut chains = Vec::new();
        for line in text
            .lines()
            .filter(|l| l.starts_with("-A ") && tags.iter().any(|t| l.contains(t.as_str())))
        {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let Some(c) = words.get(1) {
                if c.starts_with("CNI-") && !c.starts_with("CNI-HOSTPORT") {
                    chains.push(c.to_string());
                }
            }
            if let Some(i) = words.iter().position(|w| *w == "-j") {
                if let Some(c) = words.get(i + 1) {
                    if c.starts_with("CNI-") && !c.starts_with("CNI-HOSTPORT") {
                        chains.push(c.to_string());
                    }
                }
            }
            let del = format!("{ipt} -t {table} -D {}", &line[3..]);
            let _ = Command::new("sh").args(["-c", &del]).output();
        }
        chains.sort();
        chains.dedup();
        for c in chains {
            let _ = Command::new(ipt).args(["-t", table, "-F", &c]).output();
            let _ = Command::new(ipt).args(["-t", table, "-X", &c]).output();
        }
    }
}

/// A TCP listener inside `ns` (bound on a thread that entered it).
pub fn listen_in(ns: &NetNs, addr: &str) -> TcpListener {
    let addr = addr.to_string();
    ns.run(move || {
        TcpListener::bind(&addr).map_err(|e| cni::CniError::Io {
            action: "bind",
            path: PathBuf::from(addr),
            source: e,
        })
    })
    .expect("listen in netns")
}

/// The pod's global addresses of `dev` as seen inside `ns`.
pub fn addrs_in(ns: &Path, dev: &str) -> Vec<String> {
    let ns = NetNs::open(ns).expect("netns");
    let dev = dev.to_string();
    let out = ns
        .run(move || {
            Command::new("ip")
                .args(["-j", "addr", "show", "dev", &dev])
                .output()
                .map_err(|e| cni::CniError::Io {
                    action: "ip",
                    path: "ip".into(),
                    source: e,
                })
        })
        .expect("ip addr");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(json!([]));
    let mut addrs = Vec::new();
    for link in v.as_array().into_iter().flatten() {
        for a in link["addr_info"].as_array().into_iter().flatten() {
            if a["scope"] == "global" {
                addrs.push(format!(
                    "{}/{}",
                    a["local"].as_str().unwrap_or(""),
                    a["prefixlen"]
                ));
            }
        }
    }
    addrs
}

/// Links in `ns` other than lo.
pub fn links_in(ns: &NetNs) -> Vec<String> {
    let out = ns
        .run(|| {
            Command::new("ip")
                .args(["-j", "link", "show"])
                .output()
                .map_err(|e| cni::CniError::Io {
                    action: "ip",
                    path: "ip".into(),
                    source: e,
                })
        })
        .expect("ip link");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(json!([]));
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str().map(str::to_string))
        .filter(|n| n != "lo")
        .collect()
}

/// Whether `pid` is gone (or a zombie awaiting its reaper).
pub fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
    }
}
