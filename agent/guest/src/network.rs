//! The guest's side of pod networking: interfaces, routes and neighbours set
//! over rtnetlink, and the pod's hostname / hosts / resolv.conf files.
//!
//! The host gives the guest what the pod's network namespace holds (the
//! veth's MAC, addresses, MTU, routes); the guest's NIC takes the veth's
//! place, so the CNI plugin never learns that a VM is there. Calls are
//! synchronous netlink round trips; the RPC layer runs them on a blocking
//! thread.

use std::{
    net::IpAddr,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use agent::protocol::agent as pb;
use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    link::{LinkAttribute, LinkFlags, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    },
    AddressFamily, RouteNetlinkMessage,
};
use rtnl::{address_ip, format_mac, route_ip, route_table};

use crate::container::Failure;

type Result<T> = std::result::Result<T, Failure>;

/// How long UpdateInterface waits for a NIC whose driver is still loading.
const NIC_APPEAR_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// One rtnetlink socket (the workspace's request loop, [`rtnl::Rtnl`]),
/// used for one request at a time; its errors name what was being done.
struct Netlink {
    nl: rtnl::Rtnl,
}

impl Netlink {
    fn open() -> Result<Self> {
        let nl = rtnl::Rtnl::new().map_err(|e| internal("netlink socket", e))?;
        Ok(Self { nl })
    }

    /// Sends `msg` with `flags` and collects the replies (up to the ACK, or
    /// the end of a dump: [`rtnl::Rtnl::request`]). A netlink error becomes
    /// an error naming `what`.
    fn request(
        &mut self,
        what: &str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        self.nl
            .request(msg, flags)
            .map_err(|e| netlink_failure(what, e))
    }

    fn links(&mut self) -> Result<Vec<LinkMessage>> {
        let replies = self.request(
            "list links",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .collect())
    }

    fn addresses(&mut self) -> Result<Vec<AddressMessage>> {
        let replies = self.request(
            "list addresses",
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => Some(a),
                _ => None,
            })
            .collect())
    }

    fn routes(&mut self) -> Result<Vec<RouteMessage>> {
        let mut all = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut msg = RouteMessage::default();
            msg.header.address_family = family;
            let replies = self.request(
                "list routes",
                RouteNetlinkMessage::GetRoute(msg),
                NLM_F_DUMP,
            )?;
            all.extend(replies.into_iter().filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => Some(r),
                _ => None,
            }));
        }
        Ok(all)
    }
}

fn internal(what: &str, err: std::io::Error) -> Failure {
    Failure::Internal(format!("{what}: {err}"))
}

/// The kernel's refusal by its errno; anything else (the socket, a reply
/// that does not parse) is internal.
fn netlink_failure(what: &str, err: std::io::Error) -> Failure {
    match err.raw_os_error() {
        Some(libc::EINVAL | libc::ERANGE | libc::ENETUNREACH) => {
            Failure::InvalidArgument(format!("{what}: {err}"))
        }
        Some(libc::EEXIST) => Failure::AlreadyExists(format!("{what}: {err}")),
        Some(libc::ENODEV | libc::ESRCH) => Failure::NotFound(format!("{what}: {err}")),
        _ => internal(what, err),
    }
}

fn invalid(msg: String) -> Failure {
    Failure::InvalidArgument(msg)
}

/// "aa:bb:cc:dd:ee:ff" → 6 bytes.
pub(crate) fn parse_mac(text: &str) -> Result<Vec<u8>> {
    let bytes: Option<Vec<u8>> = text
        .split(':')
        .map(|p| {
            if p.len() == 2 {
                u8::from_str_radix(p, 16).ok()
            } else {
                None
            }
        })
        .collect();
    match bytes {
        Some(b) if b.len() == 6 => Ok(b),
        _ => Err(invalid(format!(
            "hardware address {text:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"
        ))),
    }
}

pub(crate) fn parse_ip(text: &str, what: &str) -> Result<IpAddr> {
    text.parse()
        .map_err(|_| invalid(format!("{what} {text:?} is not an IP address")))
}

/// "10.0.0.0/24" → (address, prefix length).
pub(crate) fn parse_cidr(text: &str) -> Result<(IpAddr, u8)> {
    let (addr, len) = text
        .split_once('/')
        .ok_or_else(|| invalid(format!("route destination {text:?} is not in CIDR form")))?;
    let addr = parse_ip(addr, "route destination")?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    match len.parse::<u8>() {
        Ok(len) if len <= max => Ok((addr, len)),
        _ => Err(invalid(format!(
            "route destination {text:?} has a bad prefix length"
        ))),
    }
}

fn family(ip: &IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn link_name(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn link_mac(link: &LinkMessage) -> Option<Vec<u8>> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(a) => Some(a.clone()),
        _ => None,
    })
}

fn link_mtu(link: &LinkMessage) -> u32 {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
        .unwrap_or(0)
}

fn describe(link: &LinkMessage, addrs: &[AddressMessage]) -> pb::Interface {
    let mut iface = pb::Interface::new();
    iface.name = link_name(link);
    iface.hw_addr = link_mac(link).map(|m| format_mac(&m)).unwrap_or_default();
    iface.mtu = link_mtu(link);
    iface.up = link.header.flags.contains(LinkFlags::Up);
    for addr in addrs.iter().filter(|a| a.header.index == link.header.index) {
        let Some(ip) = address_ip(addr) else { continue };
        // Kernel-made IPv6 link-local addresses are not the pod's.
        if let IpAddr::V6(v6) = ip {
            if v6.segments()[0] & 0xffc0 == 0xfe80 {
                continue;
            }
        }
        let mut a = pb::IPAddress::new();
        a.address = ip.to_string();
        a.prefix_len = u32::from(addr.header.prefix_len);
        iface.ip_addresses.push(a);
    }
    iface
}

/// Every interface of the guest, loopback included.
pub fn list_interfaces() -> Result<Vec<pb::Interface>> {
    let mut nl = Netlink::open()?;
    let links = nl.links()?;
    let addrs = nl.addresses()?;
    Ok(links.iter().map(|l| describe(l, &addrs)).collect())
}

/// See `UpdateInterface` in agent.proto.
pub fn update_interface(want: &pb::Interface) -> Result<pb::Interface> {
    let mac = parse_mac(&want.hw_addr)?;
    // A warm VM's NIC has a MAC of its own until its pod is known.
    let (find, find_text) = if want.current_hw_addr.is_empty() {
        (mac.clone(), &want.hw_addr)
    } else {
        (parse_mac(&want.current_hw_addr)?, &want.current_hw_addr)
    };
    if want.name.is_empty() || want.name.len() > 15 || want.name.contains(['/', ' ', ':']) {
        return Err(invalid(format!(
            "interface name {:?} is not a valid Linux interface name",
            want.name
        )));
    }
    let ips = want
        .ip_addresses
        .iter()
        .map(|a| {
            let ip = parse_ip(&a.address, "interface address")?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            match u8::try_from(a.prefix_len) {
                Ok(len) if len <= max => Ok((ip, len)),
                _ => Err(invalid(format!(
                    "address {}/{} has a bad prefix length",
                    a.address, a.prefix_len
                ))),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let mut nl = Netlink::open()?;
    // virtio_net loads in the background once the agent serves (see
    // build-guest.sh): a NIC may appear a moment after the first call.
    let asked = std::time::Instant::now();
    let deadline = asked + NIC_APPEAR_TIMEOUT;
    let link = loop {
        let links = nl.links()?;
        if let Some(link) = links
            .into_iter()
            .find(|l| link_mac(l).as_deref() == Some(&find[..]))
        {
            break link;
        }
        if std::time::Instant::now() >= deadline {
            return Err(Failure::NotFound(format!(
                "no guest interface has hardware address {} (waited {}s)",
                find_text,
                NIC_APPEAR_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    tracing::debug!(
        mac = %find_text,
        waited_ms = asked.elapsed().as_millis() as u64,
        "update interface: NIC found"
    );
    let link = &link;
    let index = link.header.index;
    let what = format!("interface {} ({})", want.name, want.hw_addr);
    let mut marks: Vec<(&str, u64)> = Vec::new();
    let mut mark = |step| marks.push((step, asked.elapsed().as_millis() as u64));

    // A link is renamed only while down; the rest (virtio-net takes a new
    // MAC live) keeps an up link up, and its receive buffers filled.
    let rename = link_name(link) != want.name;
    if rename {
        set_link(&mut nl, &what, index, LinkFlags::empty(), Vec::new())?;
    }
    let mut attrs = Vec::new();
    if rename {
        attrs.push(LinkAttribute::IfName(want.name.clone()));
    }
    if want.mtu > 0 && link_mtu(link) != want.mtu {
        attrs.push(LinkAttribute::Mtu(want.mtu));
    }
    if find != mac {
        attrs.push(LinkAttribute::Address(mac.clone()));
    }
    if !attrs.is_empty() {
        set_link(&mut nl, &what, index, LinkFlags::empty(), attrs)?;
    }
    mark("set");
    for old in nl
        .addresses()?
        .into_iter()
        .filter(|a| a.header.index == index)
    {
        nl.request(
            &format!("{what}: remove address"),
            RouteNetlinkMessage::DelAddress(old),
            NLM_F_ACK,
        )?;
    }
    for (ip, len) in ips {
        nl.request(
            &format!("{what}: add address {ip}/{len}"),
            RouteNetlinkMessage::NewAddress(address_message(index, ip, len)),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )?;
    }
    mark("addressed");
    set_link(&mut nl, &what, index, LinkFlags::Up, Vec::new())?;
    mark("up");
    let links = nl.links()?;
    let addrs = nl.addresses()?;
    mark("described");
    tracing::debug!(?marks, "update interface: done (ms since asked)");
    links
        .iter()
        .find(|l| l.header.index == index)
        .map(|l| describe(l, &addrs))
        .ok_or_else(|| Failure::Internal(format!("{what} vanished")))
}

fn set_link(
    nl: &mut Netlink,
    what: &str,
    index: u32,
    flags: LinkFlags,
    attributes: Vec<LinkAttribute>,
) -> Result<()> {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    if attributes.is_empty() {
        msg.header.flags = flags;
        msg.header.change_mask = LinkFlags::Up;
    }
    msg.attributes = attributes;
    nl.request(what, RouteNetlinkMessage::SetLink(msg), NLM_F_ACK)?;
    Ok(())
}

fn address_message(index: u32, ip: IpAddr, prefix_len: u8) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = family(&ip);
    msg.header.prefix_len = prefix_len;
    msg.header.index = index;
    msg.attributes.push(AddressAttribute::Local(ip));
    msg.attributes.push(AddressAttribute::Address(ip));
    if let IpAddr::V4(v4) = ip {
        let host_bits = u32::MAX.checked_shr(u32::from(prefix_len)).unwrap_or(0);
        let brd = std::net::Ipv4Addr::from(u32::from(v4) | host_bits);
        msg.attributes.push(AddressAttribute::Broadcast(brd));
    }
    msg
}

/// Routes of the main table, loopback's and IPv6 link-local ones left out.
pub fn list_routes() -> Result<Vec<pb::Route>> {
    let mut nl = Netlink::open()?;
    let names: Vec<(u32, String)> = nl
        .links()?
        .iter()
        .map(|l| (l.header.index, link_name(l)))
        .collect();
    Ok(nl
        .routes()?
        .iter()
        .filter_map(|r| describe_route(r, &names))
        .collect())
}

fn describe_route(route: &RouteMessage, names: &[(u32, String)]) -> Option<pb::Route> {
    if route_table(route) != u32::from(RouteHeader::RT_TABLE_MAIN)
        || route.header.kind != RouteType::Unicast
    {
        return None;
    }
    let mut out = pb::Route::new();
    for attr in &route.attributes {
        match attr {
            RouteAttribute::Destination(a) => {
                let ip = route_ip(a)?;
                out.dest = format!("{ip}/{}", route.header.destination_prefix_length);
            }
            RouteAttribute::Gateway(a) => out.gateway = route_ip(a)?.to_string(),
            RouteAttribute::PrefSource(a) => out.source = route_ip(a)?.to_string(),
            RouteAttribute::Oif(index) => {
                out.device = names
                    .iter()
                    .find(|(i, _)| i == index)
                    .map(|(_, n)| n.clone())
                    .unwrap_or_default();
            }
            _ => {}
        }
    }
    if out.device == "lo" || out.dest.starts_with("fe80:") || out.dest.starts_with("ff00:") {
        return None;
    }
    out.scope = u32::from(u8::from(route.header.scope));
    Some(out)
}

/// See `UpdateRoutes` in agent.proto.
pub fn update_routes(routes: &[pb::Route]) -> Result<Vec<pb::Route>> {
    let mut nl = Netlink::open()?;
    let links = nl.links()?;
    let index_of = |name: &str| {
        links
            .iter()
            .find(|l| link_name(l) == name)
            .map(|l| l.header.index)
            .ok_or_else(|| {
                Failure::NotFound(format!("route device {name:?} is not a guest interface"))
            })
    };
    // Check every route before changing anything.
    let mut wanted = Vec::new();
    for r in routes {
        let index = index_of(&r.device)?;
        let dest = if r.dest.is_empty() || r.dest == "default" {
            None
        } else {
            Some(parse_cidr(&r.dest)?)
        };
        let gateway = if r.gateway.is_empty() {
            None
        } else {
            Some(parse_ip(&r.gateway, "route gateway")?)
        };
        let source = if r.source.is_empty() {
            None
        } else {
            Some(parse_ip(&r.source, "route source")?)
        };
        let fam = dest
            .map(|(ip, _)| family(&ip))
            .or(gateway.as_ref().map(family))
            .unwrap_or(AddressFamily::Inet);
        wanted.push((index, dest, gateway, source, fam, r));
    }
    let lo = links
        .iter()
        .filter(|l| l.header.flags.contains(LinkFlags::Loopback))
        .map(|l| l.header.index)
        .collect::<Vec<_>>();
    for old in nl.routes()? {
        let oif = old.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        let is_v6_link_local = old.attributes.iter().any(|a| {
            matches!(a, RouteAttribute::Destination(RouteAddress::Inet6(v6)) if v6.segments()[0] & 0xffc0 == 0xfe80 || v6.segments()[0] & 0xff00 == 0xff00)
        });
        if route_table(&old) != u32::from(RouteHeader::RT_TABLE_MAIN)
            || old.header.kind != RouteType::Unicast
            || oif.is_none_or(|i| lo.contains(&i))
            || is_v6_link_local
        {
            continue;
        }
        match nl.request(
            "remove route",
            RouteNetlinkMessage::DelRoute(old),
            NLM_F_ACK,
        ) {
            // Removing an address earlier may have taken its routes along.
            Ok(_) | Err(Failure::NotFound(_)) => {}
            Err(err) => return Err(err),
        }
    }
    // Link routes first: a gateway must be reachable when its route is added.
    wanted.sort_by_key(|w| w.2.is_some());
    for (index, dest, gateway, source, fam, r) in wanted {
        let mut msg = RouteMessage::default();
        msg.header.address_family = fam;
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.kind = RouteType::Unicast;
        msg.header.scope = if r.scope != 0 {
            RouteScope::from(u8::try_from(r.scope).unwrap_or(0))
        } else if gateway.is_none() {
            RouteScope::Link
        } else {
            RouteScope::Universe
        };
        if let Some((ip, len)) = dest {
            msg.header.destination_prefix_length = len;
            msg.attributes
                .push(RouteAttribute::Destination(RouteAddress::from(ip)));
        }
        if let Some(gw) = gateway {
            msg.attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
        }
        if let Some(src) = source {
            msg.attributes
                .push(RouteAttribute::PrefSource(RouteAddress::from(src)));
        }
        msg.attributes.push(RouteAttribute::Oif(index));
        let what = format!(
            "add route {} via {} dev {}",
            if r.dest.is_empty() {
                "default"
            } else {
                &r.dest
            },
            if r.gateway.is_empty() {
                "-"
            } else {
                &r.gateway
            },
            r.device
        );
        nl.request(
            &what,
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )?;
    }
    drop(nl);
    list_routes()
}

/// See `AddArpNeighbors` in agent.proto.
pub fn add_neighbors(neighbors: &[pb::ArpNeighbor]) -> Result<()> {
    let mut nl = Netlink::open()?;
    let links = nl.links()?;
    for n in neighbors {
        let ip = parse_ip(&n.ip_address, "neighbour address")?;
        let mac = parse_mac(&n.hw_addr)?;
        let index = links
            .iter()
            .find(|l| link_name(l) == n.device)
            .map(|l| l.header.index)
            .ok_or_else(|| {
                Failure::NotFound(format!(
                    "neighbour device {:?} is not a guest interface",
                    n.device
                ))
            })?;
        let mut msg = NeighbourMessage::default();
        msg.header.family = family(&ip);
        msg.header.ifindex = index;
        msg.header.state = NeighbourState::Permanent;
        msg.header.kind = RouteType::Unicast;
        msg.attributes
            .push(NeighbourAttribute::Destination(match ip {
                IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
                IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
            }));
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac));
        nl.request(
            &format!("add neighbour {} dev {}", n.ip_address, n.device),
            RouteNetlinkMessage::NewNeighbour(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )?;
    }
    Ok(())
}

/// See `SetSysctls` in agent.proto: each `net.*` key written under /proc/sys.
pub fn set_sysctls(sysctls: &std::collections::HashMap<String, String>) -> Result<()> {
    set_sysctls_in(Path::new("/proc/sys"), sysctls)
}

pub(crate) fn set_sysctls_in(
    root: &Path,
    sysctls: &std::collections::HashMap<String, String>,
) -> Result<()> {
    let mut keys: Vec<&String> = sysctls.keys().collect();
    keys.sort();
    for key in keys {
        let value = &sysctls[key];
        let rel = sysctl_path(key)?;
        if value.contains(['\n', '\0']) {
            return Err(invalid(format!(
                "sysctl {key}: value {value:?} is not one line"
            )));
        }
        let path = root.join(&rel);
        // Never create: a name that is not there is not a sysctl.
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, value.as_bytes()))
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    invalid(format!("sysctl {key} does not exist in the guest"))
                }
                _ => invalid(format!("sysctl {key}={value:?}: {e}")),
            })?;
    }
    Ok(())
}

/// `net.ipv4.ip_forward` or `net/ipv4/ip_forward` → `net/ipv4/ip_forward`.
/// In the dotted form a `/` stands for a dot inside a component (a VLAN
/// interface `eth0.100` is `net.ipv4.conf.eth0/100.forwarding`), as sysctl(8)
/// and kubelet have it.
fn sysctl_path(key: &str) -> Result<PathBuf> {
    let bad = || {
        invalid(format!(
            "sysctl {key:?}: only net.* names of [A-Za-z0-9_.-/] are set guest-wide"
        ))
    };
    if key.is_empty()
        || key.len() > 255
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/'))
    {
        return Err(bad());
    }
    let parts: Vec<String> = if key.starts_with("net.") {
        key.split('.').map(|p| p.replace('/', ".")).collect()
    } else if key.starts_with("net/") {
        key.split('/').map(str::to_string).collect()
    } else {
        return Err(bad());
    };
    if parts.iter().any(|p| p.is_empty() || p == "." || p == "..") {
        return Err(bad());
    }
    Ok(parts.iter().collect())
}

/// See `SetSandboxFiles` in agent.proto. Each file is replaced atomically, so a
/// container starting meanwhile sees the old or the new file, never half.
pub fn set_sandbox_files(req: &pb::SetSandboxFilesRequest) -> Result<()> {
    set_sandbox_files_in(Path::new(agent::SANDBOX_FILES_GUEST_PATH), req)
}

pub(crate) fn set_sandbox_files_in(dir: &Path, req: &pb::SetSandboxFilesRequest) -> Result<()> {
    if req.hostname.contains(['\n', '\0', '/']) || req.hostname.len() > 253 {
        return Err(invalid(format!(
            "hostname {:?} is not a valid host name",
            req.hostname
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| internal(&format!("create {}", dir.display()), e))?;
    let hostname = if req.hostname.is_empty() {
        String::new()
    } else {
        format!("{}\n", req.hostname)
    };
    for (name, data) in [
        ("hostname", hostname.as_str()),
        ("hosts", req.hosts.as_str()),
        ("resolv.conf", req.resolv_conf.as_str()),
    ] {
        if data.is_empty() {
            continue;
        }
        write_atomic(&dir.join(name), data.as_bytes(), 0o644)?;
    }
    Ok(())
}

/// Replaces `path` with a file of `data` and `mode`: written beside it,
/// then renamed over it, so a reader sees the old file or the new one.
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::io::Write as _;
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let io = |e| internal(&format!("write {}", path.display()), e);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)
}

/// The files a container of this pod gets bind-mounted, by destination, if
/// the agent has them.
pub fn sandbox_file_mounts() -> Vec<(&'static str, PathBuf)> {
    let dir = Path::new(agent::SANDBOX_FILES_GUEST_PATH);
    [
        ("/etc/hostname", "hostname"),
        ("/etc/hosts", "hosts"),
        ("/etc/resolv.conf", "resolv.conf"),
    ]
    .into_iter()
    .map(|(dest, name)| (dest, dir.join(name)))
    .filter(|(_, src)| src.is_file())
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_names_become_proc_paths_inside_net() {
        let p = |k: &str| sysctl_path(k).map(|p| p.display().to_string());
        assert_eq!(
            p("net.ipv4.ip_forward").ok().as_deref(),
            Some("net/ipv4/ip_forward")
        );
        assert_eq!(
            p("net.ipv4.conf.eth0/100.forwarding").ok().as_deref(),
            Some("net/ipv4/conf/eth0.100/forwarding")
        );
        assert_eq!(
            p("net/ipv4/conf/eth0.100/forwarding").ok().as_deref(),
            Some("net/ipv4/conf/eth0.100/forwarding")
        );
        for bad in [
            "kernel.shmmax",
            "net..x",
            "net./../../etc",
            "net/../kernel/x",
            "net.a b",
            "",
            "net/",
        ] {
            assert!(sysctl_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sysctls_are_written_and_unknown_ones_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("net/ipv4")).expect("mkdir");
        std::fs::write(dir.path().join("net/ipv4/ip_forward"), "0").expect("write");
        let mut m = std::collections::HashMap::new();
        m.insert("net.ipv4.ip_forward".to_string(), "1".to_string());
        set_sysctls_in(dir.path(), &m).expect("set");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("net/ipv4/ip_forward")).expect("read"),
            "1"
        );
        m.insert("net.ipv4.nope".to_string(), "1".to_string());
        let err = set_sysctls_in(dir.path(), &m).expect_err("unknown");
        assert!(
            format!("{err:?}").contains("net.ipv4.nope does not exist"),
            "{err:?}"
        );
    }

    #[test]
    fn macs_parse_and_print() {
        assert_eq!(
            parse_mac("0A:58:0a:58:00:05").ok(),
            Some(vec![0x0a, 0x58, 0x0a, 0x58, 0, 5])
        );
        assert_eq!(
            format_mac(&[0x0a, 0x58, 0x0a, 0x58, 0, 5]),
            "0a:58:0a:58:00:05"
        );
        for bad in [
            "",
            "0a:58",
            "0a:58:0a:58:00:5",
            "zz:58:0a:58:00:05",
            "0a:58:0a:58:00:05:06",
        ] {
            assert!(
                matches!(parse_mac(bad), Err(Failure::InvalidArgument(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn cidrs_parse_with_bounds() {
        assert_eq!(
            parse_cidr("10.88.0.0/16").ok(),
            Some(("10.88.0.0".parse().expect("ip"), 16))
        );
        assert!(parse_cidr("fd00::/64").is_ok());
        for bad in [
            "10.88.0.0",
            "10.88.0.0/33",
            "fd00::/129",
            "x/8",
            "10.0.0.0/-1",
        ] {
            assert!(
                matches!(parse_cidr(bad), Err(Failure::InvalidArgument(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn sandbox_files_are_written_and_bad_hostnames_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut req = pb::SetSandboxFilesRequest::new();
        req.hostname = "web-0".into();
        req.resolv_conf = "nameserver 10.96.0.10\nsearch default.svc.cluster.local\n".into();
        set_sandbox_files_in(dir.path(), &req).expect("write");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("hostname")).expect("read"),
            "web-0\n"
        );
        assert!(std::fs::read_to_string(dir.path().join("resolv.conf"))
            .expect("read")
            .contains("nameserver 10.96.0.10"));
        assert!(
            !dir.path().join("hosts").exists(),
            "empty hosts is left out"
        );
        req.hostname = "a/b".into();
        assert!(matches!(
            set_sandbox_files_in(dir.path(), &req),
            Err(Failure::InvalidArgument(_))
        ));
    }
}
