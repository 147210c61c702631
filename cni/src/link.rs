//! Reading and changing links, addresses, routes and tc inside a namespace,
//! by running iproute2 (`ip -j`, `tc`) on a thread that entered it.
//!
//! Design note: iproute2 is a documented dependency (Debian `iproute2`);
//! netlink through `rtnetlink` would avoid the processes, at the cost of a
//! large async dependency tree for a handful of calls per pod.

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use serde::Deserialize;

use crate::error::{CniError, Result};
use crate::result::IpNet;

/// Run `program args` in the calling thread's netns; stdout on success.
pub(crate) fn run(netns: &Path, program: &str, args: &[&str]) -> Result<Vec<u8>> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| CniError::Device {
            device: args
                .iter()
                .skip_while(|a| **a != "dev")
                .nth(1)
                .unwrap_or(&"-")
                .to_string(),
            netns: netns.to_path_buf(),
            action: format!("run {command}"),
            source,
        })?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(CniError::Command {
            command,
            netns: netns.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Like [`run`], but a "no such device / qdisc" failure counts as done.
pub(crate) fn run_idempotent(netns: &Path, program: &str, args: &[&str]) -> Result<()> {
    match run(netns, program, args) {
        Ok(_) => Ok(()),
        Err(CniError::Command { stderr, .. })
            if stderr.contains("Cannot find")
                || stderr.contains("does not exist")
                || stderr.contains("No such")
                || stderr.contains("Invalid handle") =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

#[derive(Debug, Deserialize)]
struct IpAddrInfo {
    family: String,
    local: IpAddr,
    prefixlen: u8,
    #[serde(default)]
    scope: String,
}

#[derive(Debug, Deserialize)]
struct IpLink {
    mtu: u32,
    #[serde(default)]
    address: String,
    #[serde(default)]
    addr_info: Vec<IpAddrInfo>,
}

/// A link as the guest should see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LinkInfo {
    pub mac: String,
    pub mtu: u32,
    /// Global-scope addresses, IPv4 first.
    pub addrs: Vec<IpNet>,
}

pub(crate) fn link_info(netns: &Path, dev: &str) -> Result<LinkInfo> {
    let out = run(netns, "ip", &["-j", "addr", "show", "dev", dev])?;
    let links: Vec<IpLink> = serde_json::from_slice(&out).map_err(|source| CniError::Decode {
        path: format!("`ip -j addr show dev {dev}` in {}", netns.display()).into(),
        source,
    })?;
    let link = links.into_iter().next().ok_or_else(|| CniError::Command {
        command: format!("ip -j addr show dev {dev}"),
        netns: netns.to_path_buf(),
        stderr: "no such link".into(),
    })?;
    let mut addrs: Vec<IpNet> = link
        .addr_info
        .iter()
        .filter(|a| {
            a.scope != "link" && a.scope != "host" && (a.family == "inet" || a.family == "inet6")
        })
        .map(|a| IpNet {
            addr: a.local,
            prefix_len: a.prefixlen,
        })
        .collect();
    addrs.sort_by_key(|a| !a.is_ipv4());
    Ok(LinkInfo {
        mac: link.address,
        mtu: link.mtu,
        addrs,
    })
}

#[derive(Debug, Deserialize)]
struct IpRoute {
    dst: String,
    #[serde(default)]
    gateway: Option<IpAddr>,
    #[serde(default)]
    dev: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default, rename = "type")]
    route_type: Option<String>,
}

/// A route of the pod's namespace.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RouteInfo {
    /// Destination, `0.0.0.0/0` / `::/0` for the default route.
    pub dest: IpNet,
    pub gateway: Option<IpAddr>,
    pub device: String,
    /// `link` for on-link routes, `universe` otherwise.
    pub scope: String,
}

/// The unicast routes of the namespace over `devs` (IPv4, then IPv6 without
/// link-local ones).
pub(crate) fn routes(netns: &Path, devs: &[&str]) -> Result<Vec<RouteInfo>> {
    let mut all = Vec::new();
    for (flag, default) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
        let out = run(netns, "ip", &["-j", flag, "route", "show"])?;
        let routes: Vec<IpRoute> =
            serde_json::from_slice(&out).map_err(|source| CniError::Decode {
                path: format!("`ip -j {flag} route show` in {}", netns.display()).into(),
                source,
            })?;
        for r in routes {
            let Some(dev) = r.dev else { continue };
            if !devs.contains(&dev.as_str()) {
                continue;
            }
            if r.route_type.as_deref().is_some_and(|t| t != "unicast") {
                continue;
            }
            let dst = if r.dst == "default" {
                default.to_string()
            } else {
                r.dst
            };
            let dst = if dst.contains('/') {
                dst
            } else if flag == "-4" {
                format!("{dst}/32")
            } else {
                format!("{dst}/128")
            };
            let Ok(dest) = dst.parse::<IpNet>() else {
                continue;
            };
            if let IpAddr::V6(a) = dest.addr {
                if (a.segments()[0] & 0xffc0) == 0xfe80 || a.is_multicast() {
                    continue;
                }
            }
            all.push(RouteInfo {
                dest,
                gateway: r.gateway,
                device: dev,
                scope: r.scope.unwrap_or_else(|| "universe".into()),
            });
        }
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ip_json() {
        let j = br#"[{"ifindex":2,"ifname":"eth0","mtu":1400,"address":"aa:bb:cc:00:11:22",
            "addr_info":[{"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"},
                         {"family":"inet6","local":"fd00::2","prefixlen":64,"scope":"global"},
                         {"family":"inet","local":"10.88.0.2","prefixlen":16,"scope":"global"}]}]"#;
        let links: Vec<IpLink> = serde_json::from_slice(j).unwrap();
        assert_eq!(links[0].mtu, 1400);
        assert_eq!(links[0].addr_info.len(), 3);
        let r = br#"[{"dst":"default","gateway":"10.88.0.1","dev":"eth0","flags":[]},
                     {"dst":"10.88.0.0/16","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"10.88.0.2","flags":[]}]"#;
        let routes: Vec<IpRoute> = serde_json::from_slice(r).unwrap();
        assert_eq!(routes[0].gateway, Some("10.88.0.1".parse().unwrap()));
        assert_eq!(routes[1].scope.as_deref(), Some("link"));
    }
}
