//! Links, addresses, routes and tc redirection inside a pod netns, over
//! rtnetlink ([`crate::netlink`]). Every function acts in the calling
//! thread's namespace: call them inside [`crate::NetNs::run`]; `netns` only
//! names it in errors.

use std::net::IpAddr;
use std::path::Path;

use crate::error::{CniError, Result};
use crate::netlink::Rtnl;
use crate::result::IpNet;

fn dev_err<'a>(
    netns: &'a Path,
    device: &'a str,
    action: &'a str,
) -> impl FnOnce(std::io::Error) -> CniError + 'a {
    move |source| CniError::Device {
        device: device.to_string(),
        netns: netns.to_path_buf(),
        action: action.to_string(),
        source,
    }
}

fn rtnl(netns: &Path) -> Result<Rtnl> {
    Rtnl::new().map_err(dev_err(netns, "-", "open a netlink socket"))
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
    let mut nl = rtnl(netns)?;
    let link = nl
        .require_link(dev)
        .map_err(dev_err(netns, dev, "read link"))?;
    let addrs = nl
        .addrs(link.index)
        .map_err(dev_err(netns, dev, "read addresses"))?;
    Ok(LinkInfo {
        mac: link.mac,
        mtu: link.mtu,
        addrs,
    })
}

/// Traffic counters of an interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub rx_bytes: u64,
    pub rx_errors: u64,
    pub tx_bytes: u64,
    pub tx_errors: u64,
}

/// The counters of `dev` in the pod's namespace: for the CNI's veth they are
/// the pod's traffic (the tc redirect passes every frame through it).
pub fn link_stats(netns: &crate::NetNs, dev: &str) -> Result<LinkStats> {
    let path = netns.path().to_path_buf();
    netns.run(|| {
        let mut nl = rtnl(&path)?;
        let link = nl
            .require_link(dev)
            .map_err(dev_err(&path, dev, "read link"))?;
        Ok(link.stats.unwrap_or_default())
    })
}

/// A static ARP / NDP entry of the pod's namespace, for the guest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NeighbourInfo {
    pub ip: IpAddr,
    pub mac: String,
    pub device: String,
}

/// The permanent neighbour entries on `dev` (plugins such as some CNI
/// network providers install them; the bridge plugin does not).
pub(crate) fn neighbours(netns: &Path, dev: &str) -> Result<Vec<NeighbourInfo>> {
    let mut nl = rtnl(netns)?;
    let link = nl
        .require_link(dev)
        .map_err(dev_err(netns, dev, "read link"))?;
    let entries =
        nl.permanent_neighbours(link.index)
            .map_err(dev_err(netns, dev, "read neighbours"))?;
    Ok(entries
        .into_iter()
        .map(|(ip, mac)| NeighbourInfo {
            ip,
            mac,
            device: dev.to_string(),
        })
        .collect())
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

/// The unicast main-table routes of the namespace over `dev` (IPv4, then
/// IPv6 without link-local and multicast ones).
pub(crate) fn routes(netns: &Path, dev: &str) -> Result<Vec<RouteInfo>> {
    let mut nl = rtnl(netns)?;
    let link = nl
        .require_link(dev)
        .map_err(dev_err(netns, dev, "read link"))?;
    let routes = nl.routes().map_err(dev_err(netns, dev, "read routes"))?;
    Ok(routes
        .into_iter()
        .filter(|r| r.oif == Some(link.index))
        .filter(|r| match r.dest.addr {
            IpAddr::V6(a) => (a.segments()[0] & 0xffc0) != 0xfe80 && !a.is_multicast(),
            IpAddr::V4(_) => true,
        })
        .map(|r| RouteInfo {
            dest: r.dest,
            gateway: r.gateway,
            device: dev.to_string(),
            scope: r.scope.to_string(),
        })
        .collect())
}

/// Give `tap` the MTU of `veth`, bring it up, and redirect all ingress
/// traffic of each to the other. Returns the MTU.
pub(crate) fn redirect_both_ways(netns: &Path, veth: &str, tap: &str) -> Result<u32> {
    let mut nl = rtnl(netns)?;
    let v = nl
        .require_link(veth)
        .map_err(dev_err(netns, veth, "read link"))?;
    let t = nl
        .require_link(tap)
        .map_err(dev_err(netns, tap, "read link"))?;
    nl.set_mtu_up(t.index, v.mtu)
        .map_err(dev_err(netns, tap, "set MTU and up"))?;
    for (from, from_name, to) in [(v.index, veth, t.index), (t.index, tap, v.index)] {
        nl.add_ingress_qdisc(from)
            .map_err(dev_err(netns, from_name, "add ingress qdisc"))?;
        nl.add_redirect(from, to).map_err(dev_err(
            netns,
            from_name,
            "add u32 mirred redirect filter",
        ))?;
    }
    Ok(v.mtu)
}

/// Redirect all ingress traffic of `from` to `to` only (a fresh ingress
/// qdisc on `from`, whose old one and filters are removed first).
pub(crate) fn redirect_one_way(netns: &Path, from: &str, to: &str) -> Result<()> {
    let mut nl = rtnl(netns)?;
    let f = nl
        .require_link(from)
        .map_err(dev_err(netns, from, "read link"))?;
    let t = nl
        .require_link(to)
        .map_err(dev_err(netns, to, "read link"))?;
    nl.del_ingress_qdisc(f.index)
        .map_err(dev_err(netns, from, "delete ingress qdisc"))?;
    nl.add_ingress_qdisc(f.index)
        .map_err(dev_err(netns, from, "add ingress qdisc"))?;
    nl.add_redirect(f.index, t.index).map_err(dev_err(
        netns,
        from,
        "add u32 mirred redirect filter",
    ))
}

/// Remove the ingress qdisc (and so its filters) of `dev`; fine if it has none.
pub(crate) fn unredirect_one(netns: &Path, dev: &str) -> Result<()> {
    let mut nl = rtnl(netns)?;
    if let Some(d) = nl.link(dev).map_err(dev_err(netns, dev, "read link"))? {
        nl.del_ingress_qdisc(d.index)
            .map_err(dev_err(netns, dev, "delete ingress qdisc"))?;
    }
    Ok(())
}

/// Move `dev` of the calling thread's namespace into `to` (the path of a
/// netns); `netns` names the namespace it leaves in errors.
pub(crate) fn move_link(netns: &Path, dev: &str, to: &Path) -> Result<()> {
    use std::os::fd::AsFd;
    let target = std::fs::File::open(to).map_err(|source| CniError::Io {
        action: "open netns",
        path: to.to_path_buf(),
        source,
    })?;
    let mut nl = rtnl(netns)?;
    let d = nl
        .require_link(dev)
        .map_err(dev_err(netns, dev, "read link"))?;
    nl.set_netns(d.index, target.as_fd())
        .map_err(dev_err(netns, dev, "move to another netns"))
}

/// Remove the ingress qdiscs (and so their filters) of `veth` and `tap`, and
/// the tap. Missing pieces are fine.
pub(crate) fn unredirect(netns: &Path, veth: &str, tap: &str) -> Result<()> {
    let mut nl = rtnl(netns)?;
    if let Some(v) = nl.link(veth).map_err(dev_err(netns, veth, "read link"))? {
        nl.del_ingress_qdisc(v.index)
            .map_err(dev_err(netns, veth, "delete ingress qdisc"))?;
    }
    if let Some(t) = nl.link(tap).map_err(dev_err(netns, tap, "read link"))? {
        nl.del_ingress_qdisc(t.index)
            .map_err(dev_err(netns, tap, "delete ingress qdisc"))?;
        nl.del_link(t.index)
            .map_err(dev_err(netns, tap, "delete link"))?;
    }
    Ok(())
}

/// Action kinds of the ingress filters of `dev` in `netns` (e.g. `["mirred"]`).
pub fn ingress_filter_actions(netns: &crate::NetNs, dev: &str) -> Result<Vec<String>> {
    let path = netns.path().to_path_buf();
    netns.run(|| {
        let mut nl = rtnl(&path)?;
        let link = nl
            .require_link(dev)
            .map_err(dev_err(&path, dev, "read link"))?;
        nl.ingress_filter_kinds(link.index)
            .map_err(dev_err(&path, dev, "read ingress filters"))
    })
}
