//! The host's typed rtnetlink operations in the calling thread's network
//! namespace (create [`Rtnl`] inside [`crate::NetNs::run`]): links,
//! addresses, routes, ingress qdiscs and u32 + mirred redirect filters. The
//! request loop is the workspace's one ([`rtnl::Rtnl`]), shared with the guest.

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};
use netlink_packet_route::address::{AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteAttribute, RouteMessage, RouteScope, RouteType};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionMirrorOption, TcActionOption, TcActionType, TcAttribute,
    TcFilterU32Option, TcHandle, TcMessage, TcMirror, TcMirrorActionType, TcOption, TcU32Key,
    TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnl::{address_ip, format_mac, route_ip, route_table};

use crate::result::IpNet;

/// `ETH_P_ALL` in network byte order, as `tcm_info`'s protocol half wants it.
const ETH_P_ALL_BE: u32 = 0x0003u16.to_be() as u32;
const TCA_ACT_TAB: u16 = 1;
const RT_TABLE_MAIN: u8 = 254;

/// One netlink socket in the current thread's netns.
pub(crate) struct Rtnl {
    nl: rtnl::Rtnl,
}

/// What we read of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Link {
    pub index: u32,
    pub mtu: u32,
    pub mac: String,
    /// The kernel's 64-bit counters.
    pub stats: Option<crate::link::LinkStats>,
}

/// A route as read from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    pub dest: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub scope: &'static str,
}

impl Rtnl {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            nl: rtnl::Rtnl::new()?,
        })
    }

    /// A change or a single get: acknowledged by the kernel.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.nl.request(msg, flags | NLM_F_ACK)
    }

    fn dump(&mut self, msg: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.nl.request(msg, NLM_F_DUMP)
    }

    /// The link called `name`, or `None`.
    pub fn link(&mut self, name: &str) -> io::Result<Option<Link>> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        let replies = match self.request(RouteNetlinkMessage::GetLink(m), 0) {
            Ok(r) => r,
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(None),
            Err(e) => return Err(e),
        };
        for r in replies {
            if let RouteNetlinkMessage::NewLink(l) = r {
                let mut link = Link {
                    index: l.header.index,
                    mtu: 0,
                    mac: String::new(),
                    stats: None,
                };
                for a in l.attributes {
                    match a {
                        LinkAttribute::Mtu(m) => link.mtu = m,
                        LinkAttribute::Address(bytes) => link.mac = format_mac(&bytes),
                        LinkAttribute::Stats64(st) => {
                            link.stats = Some(crate::link::LinkStats {
                                rx_bytes: st.rx_bytes,
                                rx_errors: st.rx_errors,
                                tx_bytes: st.tx_bytes,
                                tx_errors: st.tx_errors,
                            })
                        }
                        _ => {}
                    }
                }
                return Ok(Some(link));
            }
        }
        Ok(None)
    }

    pub fn require_link(&mut self, name: &str) -> io::Result<Link> {
        self.link(name)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no link {name}")))
    }

    /// Set `index`'s MTU and bring it up.
    pub fn set_mtu_up(&mut self, index: u32, mtu: u32) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        m.attributes.push(LinkAttribute::Mtu(mtu));
        self.request(RouteNetlinkMessage::SetLink(m), 0).map(drop)
    }

    /// Move link `index` into the namespace of `netns` (an open netns file).
    pub fn set_netns(&mut self, index: u32, netns: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::NetNsFd(netns.as_raw_fd()));
        self.request(RouteNetlinkMessage::SetLink(m), 0).map(drop)
    }

    pub fn del_link(&mut self, index: u32) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        self.request(RouteNetlinkMessage::DelLink(m), 0).map(drop)
    }

    /// Global-scope addresses of `index`, IPv4 first.
    pub fn addrs(&mut self, index: u32) -> io::Result<Vec<IpNet>> {
        let replies = self.dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))?;
        let mut out = Vec::new();
        for r in replies {
            let RouteNetlinkMessage::NewAddress(a) = r else {
                continue;
            };
            if a.header.index != index || a.header.scope != AddressScope::Universe {
                continue;
            }
            if let Some(addr) = address_ip(&a) {
                out.push(IpNet {
                    addr,
                    prefix_len: a.header.prefix_len,
                });
            }
        }
        out.sort_by_key(|a| !a.is_ipv4());
        Ok(out)
    }

    /// Unicast routes of the main table, IPv4 then IPv6.
    pub fn routes(&mut self) -> io::Result<Vec<Route>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut m = RouteMessage::default();
            m.header.address_family = family;
            let replies = self.dump(RouteNetlinkMessage::GetRoute(m))?;
            for r in replies {
                let RouteNetlinkMessage::NewRoute(r) = r else {
                    continue;
                };
                if r.header.kind != RouteType::Unicast
                    || route_table(&r) != u32::from(RT_TABLE_MAIN)
                {
                    continue;
                }
                let mut dst = None;
                let mut gateway = None;
                let mut oif = None;
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Destination(d) => dst = route_ip(d),
                        RouteAttribute::Gateway(g) => gateway = route_ip(g),
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        _ => {}
                    }
                }
                let addr = match (dst, family) {
                    (Some(a), _) => a,
                    (None, AddressFamily::Inet) => IpAddr::from([0u8; 4]),
                    (None, _) => IpAddr::from([0u16; 8]),
                };
                out.push(Route {
                    dest: IpNet {
                        addr,
                        prefix_len: r.header.destination_prefix_length,
                    },
                    gateway,
                    oif,
                    scope: match r.header.scope {
                        RouteScope::Link => "link",
                        RouteScope::Host => "host",
                        RouteScope::Site => "site",
                        _ => "universe",
                    },
                });
            }
        }
        Ok(out)
    }

    /// Permanent (static) neighbour entries on `index`: (IP, MAC).
    pub fn permanent_neighbours(&mut self, index: u32) -> io::Result<Vec<(IpAddr, String)>> {
        let replies = self.dump(RouteNetlinkMessage::GetNeighbour(
            NeighbourMessage::default(),
        ))?;
        let mut out = Vec::new();
        for r in replies {
            let RouteNetlinkMessage::NewNeighbour(n) = r else {
                continue;
            };
            if n.header.ifindex != index || n.header.state != NeighbourState::Permanent {
                continue;
            }
            let mut ip = None;
            let mut mac = None;
            for a in &n.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                        ip = Some(IpAddr::V4(*v4))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                        ip = Some(IpAddr::V6(*v6))
                    }
                    NeighbourAttribute::LinkLayerAddress(b) => mac = Some(format_mac(b)),
                    _ => {}
                }
            }
            if let (Some(ip), Some(mac)) = (ip, mac) {
                out.push((ip, mac));
            }
        }
        Ok(out)
    }

    fn ingress_qdisc(index: u32) -> TcMessage {
        let mut m = TcMessage::with_index(index as i32);
        m.header.handle = TcHandle {
            major: 0xffff,
            minor: 0,
        };
        m.header.parent = TcHandle::INGRESS;
        m.attributes.push(TcAttribute::Kind("ingress".into()));
        m
    }

    pub fn add_ingress_qdisc(&mut self, index: u32) -> io::Result<()> {
        self.request(
            RouteNetlinkMessage::NewQueueDiscipline(Self::ingress_qdisc(index)),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// Delete the ingress qdisc of `index` (and so its filters); `Ok` if none.
    pub fn del_ingress_qdisc(&mut self, index: u32) -> io::Result<()> {
        match self.request(
            RouteNetlinkMessage::DelQueueDiscipline(Self::ingress_qdisc(index)),
            0,
        ) {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL | libc::ENOENT | libc::ENODEV)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// `tc filter add dev <from> parent ffff: protocol all u32 match u32 0 0
    /// action mirred egress redirect dev <to>`.
    pub fn add_redirect(&mut self, from: u32, to: u32) -> io::Result<()> {
        let mut m = TcMessage::with_index(from as i32);
        m.header.parent = TcHandle {
            major: 0xffff,
            minor: 0,
        };
        // Priority 0: the kernel picks one; protocol: all.
        m.header.info = ETH_P_ALL_BE;
        let mut sel = TcU32Selector::default();
        sel.flags = TcU32SelectorFlags::Terminal;
        sel.nkeys = 1;
        sel.keys = vec![TcU32Key::default()];
        let mut mirror = TcMirror::default();
        mirror.generic.action = TcActionType::Stolen;
        mirror.eaction = TcMirrorActionType::EgressRedir;
        mirror.ifindex = to;
        let mut action = TcAction::default();
        action.tab = TCA_ACT_TAB;
        action.attributes = vec![
            TcActionAttribute::Kind("mirred".into()),
            TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
                mirror,
            ))]),
        ];
        m.attributes.push(TcAttribute::Kind("u32".into()));
        m.attributes.push(TcAttribute::Options(vec![
            TcOption::U32(TcFilterU32Option::Selector(sel)),
            TcOption::U32(TcFilterU32Option::Action(vec![action])),
        ]));
        self.request(
            RouteNetlinkMessage::NewTrafficFilter(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// Kinds of the actions of the filters on `index`'s ingress (for tests).
    pub fn ingress_filter_kinds(&mut self, index: u32) -> io::Result<Vec<String>> {
        let mut m = TcMessage::with_index(index as i32);
        m.header.parent = TcHandle {
            major: 0xffff,
            minor: 0,
        };
        let replies = self.dump(RouteNetlinkMessage::GetTrafficFilter(m))?;
        let mut kinds = Vec::new();
        for r in replies {
            let RouteNetlinkMessage::NewTrafficFilter(f) = r else {
                continue;
            };
            for a in f.attributes {
                if let TcAttribute::Options(opts) = a {
                    for o in opts {
                        if let TcOption::U32(TcFilterU32Option::Action(acts)) = o {
                            for act in acts {
                                for aa in act.attributes {
                                    if let TcActionAttribute::Kind(k) = aa {
                                        kinds.push(k);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(kinds)
    }
}
