//! A sandbox's network, as plain data handed in by the caller.
//!
//! podsandbox knows no CNI: the caller (vcrid, virtc) sets up the pod's
//! network namespace, connects a tap to its veth, and passes here the tap's
//! descriptor with what the guest's NIC must become (the veth's MAC, MTU and
//! addresses) and the namespace's routes. The VM gets the tap at boot; once
//! the agent answers, the guest takes the addresses and routes, and the pod's
//! hostname, /etc/hosts and /etc/resolv.conf are written for its containers.

use std::{
    fmt,
    net::IpAddr,
    os::fd::{AsRawFd, OwnedFd},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// An open tap descriptor. Compared by descriptor number; never persisted.
#[derive(Clone)]
pub struct TapFd(pub Arc<OwnedFd>);

impl fmt::Debug for TapFd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TapFd({})", self.0.as_raw_fd())
    }
}

impl PartialEq for TapFd {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_raw_fd() == other.0.as_raw_fd()
    }
}

impl Eq for TapFd {}

/// One NIC of the pod VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInterface {
    /// The name in the guest ("eth0").
    pub name: String,
    /// "aa:bb:cc:dd:ee:ff": the veth's, so the guest takes its place.
    pub mac: String,
    pub mtu: u32,
    /// Addresses in CIDR form ("10.88.0.5/16").
    pub ips: Vec<String>,
    /// The tap the VM gets for this NIC (at create; not kept in the record).
    #[serde(skip)]
    pub tap: Option<TapFd>,
    /// Where that tap is (for a warm VM's NIC to take its place).
    #[serde(skip)]
    pub place: Option<TapPlace>,
    /// The MAC the guest NIC has now, when it is to take `mac` (a warm VM's
    /// NIC, plugged before its pod was known).
    #[serde(skip)]
    pub current_mac: Option<String>,
}

/// Where a pod's tap is: the netns and the veth it is connected to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TapPlace {
    pub netns: std::path::PathBuf,
    pub veth: String,
}

/// The MAC of a warm VM's NIC until a sandbox claims the VM (locally
/// administered; only ever on a tap no pod sees).
pub const WARM_NIC_MAC: &str = "02:76:63:00:00:01";

/// NICs for warm VMs: a tap held where no pod sees it, to boot the VM with,
/// and its move into a pod when a sandbox claims the VM. Without it warm
/// VMs boot without a NIC and get the pod's by hot-plug.
pub trait WarmNics: Send + Sync + fmt::Debug {
    /// A tap for warm VM `vm_id` (its only descriptor: the tap goes with it).
    fn hold(&self, vm_id: &str) -> std::result::Result<OwnedFd, String>;
    /// Puts warm VM `vm_id`'s tap in `place`, carrying the veth's traffic
    /// instead of the pod's own tap. On error the pod's own tap carries it.
    fn adopt(&self, vm_id: &str, place: &TapPlace) -> std::result::Result<(), String>;
    /// Undoes [`adopt`](Self::adopt) (the VM is being thrown away).
    fn restore(&self, vm_id: &str, place: &TapPlace) -> std::result::Result<(), String>;
}

impl NetInterface {
    /// The VM's NIC for this interface: its tap, MAC and MTU; `None`
    /// without a tap.
    pub fn vm_nic(&self) -> Option<hypervisor::Nic> {
        self.tap.as_ref().map(|tap| hypervisor::Nic {
            tap: tap.0.clone(),
            mac: self.mac.clone(),
            mtu: self.mtu,
        })
    }
}

/// A route of the pod's network namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRoute {
    /// CIDR; empty for the default route.
    pub dest: String,
    /// Empty for a link route.
    pub gateway: String,
    /// The guest interface name.
    pub device: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
}

/// A permanent neighbour entry of the pod's network namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetNeighbor {
    pub ip: String,
    pub mac: String,
    /// The guest interface name.
    pub device: String,
}

/// The pod's DNS settings (CRI `DNSConfig`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsConfig {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

/// Everything network a sandbox is created with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxNetwork {
    pub interfaces: Vec<NetInterface>,
    pub routes: Vec<NetRoute>,
    #[serde(default)]
    pub neighbors: Vec<NetNeighbor>,
    /// `net.*` sysctls of the pod's network namespace, which is the guest's.
    #[serde(default)]
    pub sysctls: std::collections::BTreeMap<String, String>,
}

impl SandboxNetwork {
    /// Checks what can be checked before a VM boots, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |detail: String| Err(Error::InvalidNetwork { detail });
        for (i, nic) in self.interfaces.iter().enumerate() {
            if !hypervisor::valid_mac(&nic.mac) {
                return bad(format!(
                    "interfaces[{i}].mac {:?} is not a MAC address",
                    nic.mac
                ));
            }
            if nic.tap.is_none() {
                return bad(format!("interfaces[{i}] has no tap descriptor"));
            }
            if nic.name.is_empty() || nic.name.len() > 15 || nic.name.contains(['/', ' ', ':']) {
                return bad(format!(
                    "interfaces[{i}].name {:?} is not an interface name",
                    nic.name
                ));
            }
            for ip in &nic.ips {
                if parse_cidr(ip).is_none() {
                    return bad(format!(
                        "interfaces[{i}].ips: {ip:?} is not an address in CIDR form"
                    ));
                }
            }
        }
        for (i, route) in self.routes.iter().enumerate() {
            if !route.dest.is_empty() && parse_cidr(&route.dest).is_none() {
                return bad(format!("routes[{i}].dest {:?} is not a CIDR", route.dest));
            }
            if !route.gateway.is_empty() && route.gateway.parse::<IpAddr>().is_err() {
                return bad(format!(
                    "routes[{i}].gateway {:?} is not an IP address",
                    route.gateway
                ));
            }
            if !self.interfaces.iter().any(|n| n.name == route.device) {
                return bad(format!(
                    "routes[{i}].device {:?} is none of the sandbox's interfaces",
                    route.device
                ));
            }
        }
        for (i, n) in self.neighbors.iter().enumerate() {
            if n.ip.parse::<IpAddr>().is_err() || !hypervisor::valid_mac(&n.mac) {
                return bad(format!(
                    "neighbors[{i}] ({} at {}) is not an IP and a MAC address",
                    n.ip, n.mac
                ));
            }
            if !self.interfaces.iter().any(|nic| nic.name == n.device) {
                return bad(format!(
                    "neighbors[{i}].device {:?} is none of the sandbox's interfaces",
                    n.device
                ));
            }
        }
        Ok(())
    }

    /// The pod's IPs, IPv4 first (PodSandboxStatus lists the primary first).
    pub fn pod_ips(&self) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self
            .interfaces
            .iter()
            .flat_map(|n| n.ips.iter().filter_map(|ip| parse_cidr(ip).map(|(a, _)| a)))
            .collect();
        ips.sort_by_key(|ip| ip.is_ipv6());
        ips
    }
}

fn parse_cidr(text: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = text.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((addr, len))
}

/// The pod's /etc files, as the guest writes them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxFiles {
    pub hostname: String,
    pub hosts: String,
    pub resolv_conf: String,
}

impl SandboxFiles {
    /// hostname; hosts with localhost and the pod's first IP under its
    /// hostname (as kubelet writes it); resolv.conf from `dns` (left out,
    /// and the image's own kept, when there is none).
    pub fn new(hostname: &str, pod_ips: &[IpAddr], dns: Option<&DnsConfig>) -> Result<Self> {
        check_hostname(hostname).map_err(|detail| Error::InvalidNetwork {
            detail: format!("hostname {hostname:?} {detail}"),
        })?;
        let mut hosts = String::from(
            "# Kubernetes-managed hosts file (virtcontainers).\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
        );
        if let Some(ip) = pod_ips.first() {
            hosts.push_str(&format!("{ip}\t{hostname}\n"));
        }
        let resolv_conf = match dns {
            None => String::new(),
            Some(dns) => resolv_conf(dns)?,
        };
        Ok(Self {
            hostname: hostname.to_string(),
            hosts,
            resolv_conf,
        })
    }
}

/// The longest host name the guest kernel takes (`HOST_NAME_MAX`).
pub const HOSTNAME_MAX: usize = 64;

/// An RFC 1123 host name: dot-separated labels of 1-63 letters, digits and
/// hyphens, none starting or ending with a hyphen, at most [`HOSTNAME_MAX`]
/// bytes in all (what `sethostname(2)` accepts). `Err` says what is wrong.
pub fn check_hostname(hostname: &str) -> std::result::Result<(), String> {
    if hostname.is_empty() {
        return Err("is empty".into());
    }
    if hostname.len() > HOSTNAME_MAX {
        return Err(format!(
            "is {} bytes long; a host name has at most {HOSTNAME_MAX}",
            hostname.len()
        ));
    }
    for label in hostname.split('.') {
        let bad = label.is_empty()
            || label.len() > 63
            || label.starts_with('-')
            || label.ends_with('-')
            || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if bad {
            return Err(format!(
                "is not an RFC 1123 host name (label {label:?}: 1-63 letters, digits or '-', not starting or ending with '-')"
            ));
        }
    }
    Ok(())
}

/// resolv.conf from a DNS config, each value checked so that no line can be
/// smuggled in.
fn resolv_conf(dns: &DnsConfig) -> Result<String> {
    let bad = |what: &str, v: &str| Error::InvalidNetwork {
        detail: format!("dns_config.{what}: {v:?} is not valid"),
    };
    let mut out = String::new();
    for s in &dns.servers {
        if s.parse::<IpAddr>().is_err() {
            return Err(bad("servers", s));
        }
        out.push_str(&format!("nameserver {s}\n"));
    }
    for (what, list, key) in [
        ("searches", &dns.searches, "search"),
        ("options", &dns.options, "options"),
    ] {
        if list.is_empty() {
            continue;
        }
        if let Some(v) = list
            .iter()
            .find(|v| v.is_empty() || v.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(bad(what, v));
        }
        out.push_str(&format!("{key} {}\n", list.join(" ")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tap() -> TapFd {
        TapFd(Arc::new(
            std::fs::File::open("/dev/null").expect("open").into(),
        ))
    }

    fn net() -> SandboxNetwork {
        SandboxNetwork {
            interfaces: vec![NetInterface {
                name: "eth0".into(),
                mac: "0a:58:0a:58:00:05".into(),
                mtu: 1500,
                ips: vec!["fd00::5/64".into(), "10.88.0.5/16".into()],
                tap: Some(tap()),
                ..Default::default()
            }],
            routes: vec![NetRoute {
                dest: String::new(),
                gateway: "10.88.0.1".into(),
                device: "eth0".into(),
                source: String::new(),
            }],
            neighbors: vec![NetNeighbor {
                ip: "10.88.0.9".into(),
                mac: "0a:58:0a:58:00:09".into(),
                device: "eth0".into(),
            }],
            sysctls: Default::default(),
        }
    }

    #[test]
    fn validation_names_the_field() {
        assert!(net().validate().is_ok());
        type Spoil = fn(&mut SandboxNetwork);
        let cases: [(&str, Spoil); 6] = [
            ("neighbors[0] (10.88.0.9 at x)", |n| {
                n.neighbors[0].mac = "x".into()
            }),
            ("interfaces[0].mac", |n| n.interfaces[0].mac = "x".into()),
            ("interfaces[0] has no tap", |n| n.interfaces[0].tap = None),
            ("interfaces[0].ips", |n| {
                n.interfaces[0].ips[0] = "10.0.0.1".into()
            }),
            ("routes[0].gateway", |n| n.routes[0].gateway = "gw".into()),
            ("routes[0].device", |n| n.routes[0].device = "eth1".into()),
        ];
        for (want, spoil) in cases {
            let mut n = net();
            spoil(&mut n);
            let err = n.validate().expect_err(want).to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn pod_ips_put_ipv4_first() {
        let ips = net().pod_ips();
        assert_eq!(ips.len(), 2);
        assert_eq!(ips[0].to_string(), "10.88.0.5");
        assert_eq!(ips[1].to_string(), "fd00::5");
    }

    #[test]
    fn files_from_dns_config_refuse_smuggled_lines() {
        let dns = DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec![
                "default.svc.cluster.local".into(),
                "svc.cluster.local".into(),
            ],
            options: vec!["ndots:5".into()],
        };
        let ip: IpAddr = "10.88.0.5".parse().expect("ip");
        let files = SandboxFiles::new("web", &[ip], Some(&dns)).expect("files");
        assert_eq!(
            files.resolv_conf,
            "nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local\noptions ndots:5\n"
        );
        assert!(files.hosts.contains("10.88.0.5\tweb\n"));
        assert!(files.hosts.contains("127.0.0.1\tlocalhost\n"));
        let evil = DnsConfig {
            searches: vec!["a\nnameserver 6.6.6.6".into()],
            ..dns.clone()
        };
        let err = SandboxFiles::new("web", &[ip], Some(&evil)).expect_err("newline");
        assert!(err.to_string().contains("dns_config.searches"), "{err}");
        let evil = DnsConfig {
            servers: vec!["evil".into()],
            ..dns
        };
        assert!(SandboxFiles::new("web", &[ip], Some(&evil)).is_err());
        assert!(SandboxFiles::new("a b", &[ip], None).is_err());
        for good in ["web", "Web-1", "a.b-c.d", &"a".repeat(63), "x1.example.com"] {
            assert_eq!(check_hostname(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "-web",
            "web-",
            "a..b",
            "a_b",
            &"a".repeat(64),
            &format!("{}.{}", "a".repeat(40), "b".repeat(30)),
        ] {
            assert!(check_hostname(bad).is_err(), "{bad}");
        }
        assert_eq!(
            SandboxFiles::new("web", &[], None)
                .expect("files")
                .resolv_conf,
            ""
        );
    }
}
