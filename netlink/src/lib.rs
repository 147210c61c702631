//! The one rtnetlink request loop of virtcontainers, shared by the host
//! (`cni`, inside a pod's netns) and the guest (`vc-agent`, the VM's only
//! netns): a socket in the calling thread's network namespace, one request
//! at a time, its replies collected until the kernel's DONE, ACK or error.
//!
//! Only the loop lives here, with the few attribute readers both sides
//! need ([`format_mac`], [`route_ip`], [`route_table`], [`address_ip`]); the typed operations (links, addresses, routes,
//! neighbours, tc) and their error types stay with their callers. Errors
//! are `io::Error`s: the kernel's refusals carry their errno
//! ([`io::Error::raw_os_error`]), replies that do not parse are
//! [`io::ErrorKind::InvalidData`].
#![forbid(unsafe_code)]

use std::io;

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

mod attrs;
mod reply;

pub use attrs::{address_ip, format_mac, route_ip, route_table};

/// The largest reply datagram read; a larger one is an error, never
/// parsed truncated. (The kernel's dump datagrams are at most 32 KiB.)
pub const RECV_BUFFER_LEN: usize = 64 * 1024;

/// One rtnetlink socket in the network namespace of the thread that opened
/// it, used for one request at a time.
#[derive(Debug)]
pub struct Rtnl {
    sock: Socket,
    seq: u32,
    rbuf: Vec<u8>,
}

impl Rtnl {
    /// Opens a socket bound to a port of its own and connected to the kernel.
    pub fn new() -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            sock,
            seq: 0,
            rbuf: vec![0; RECV_BUFFER_LEN],
        })
    }

    /// Sends `msg` with `NLM_F_REQUEST | flags` and returns the replies:
    /// with `NLM_F_DUMP` every part up to DONE, with `NLM_F_ACK` every reply
    /// up to the ACK, with neither the one reply (all its parts if it is
    /// multi-part). An error from the kernel (a NACK, or a dump that ended
    /// with one) is the `io::Error` of its errno.
    pub fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut packet = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(msg));
        packet.header.flags = NLM_F_REQUEST | flags;
        packet.header.sequence_number = seq;
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf[..]);
        self.sock.send(&buf, 0)?;

        let until = reply::Until::of(flags);
        let mut replies = Vec::new();
        loop {
            // MSG_TRUNC: the datagram's real length, so a longer one is seen.
            let size = self.sock.recv(&mut &mut self.rbuf[..], libc::MSG_TRUNC)?;
            let Some(datagram) = self.rbuf.get(..size) else {
                return Err(reply::bad(format!(
                    "netlink reply of {size} bytes is larger than the {RECV_BUFFER_LEN}-byte buffer"
                )));
            };
            if reply::read_datagram(datagram, seq, until, &mut replies)? {
                return Ok(replies);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};
    use netlink_packet_route::address::{AddressAttribute, AddressMessage};
    use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
    use netlink_packet_route::AddressFamily;

    fn get_link(name: &str) -> RouteNetlinkMessage {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.into()));
        RouteNetlinkMessage::GetLink(m)
    }

    fn links(nl: &mut Rtnl) -> Vec<LinkMessage> {
        let all = RouteNetlinkMessage::GetLink(LinkMessage::default());
        nl.request(all, NLM_F_DUMP)
            .expect("dump links")
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .collect()
    }

    fn name(l: &LinkMessage) -> Option<&str> {
        l.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.as_str()),
            _ => None,
        })
    }

    // Runs unprivileged, in whatever netns the test runs in.
    #[test]
    fn a_link_dump_includes_lo_and_one_socket_serves_many_requests() {
        let mut nl = Rtnl::new().expect("socket");
        for _ in 0..3 {
            let links = links(&mut nl);
            assert!(links.iter().any(|l| name(l) == Some("lo")), "{links:?}");
        }
    }

    #[test]
    fn a_missing_link_is_its_errno_with_or_without_ack() {
        let mut nl = Rtnl::new().expect("socket");
        for flags in [NLM_F_ACK, 0] {
            let err = nl
                .request(get_link("vc-no-such0"), flags)
                .expect_err("missing link");
            assert!(
                matches!(err.raw_os_error(), Some(libc::ENODEV | libc::ENOENT)),
                "flags {flags}: {err:?}"
            );
        }
        // The socket is still good afterwards.
        assert!(!links(&mut nl).is_empty());
    }

    #[test]
    fn a_get_without_ack_returns_its_one_reply() {
        let mut nl = Rtnl::new().expect("socket");
        let replies = nl.request(get_link("lo"), 0).expect("get lo");
        assert_eq!(replies.len(), 1, "{replies:?}");
        let with_ack = nl.request(get_link("lo"), NLM_F_ACK).expect("get lo, ack");
        assert_eq!(with_ack.len(), 1, "{with_ack:?}");
        for r in replies.iter().chain(&with_ack) {
            assert!(
                matches!(r, RouteNetlinkMessage::NewLink(l) if name(l) == Some("lo")),
                "{r:?}"
            );
        }
    }

    /// In a fresh netns of a thread of its own (needs CAP_SYS_ADMIN: root
    /// in CI; skipped with the reason elsewhere): lo up, an address added
    /// once (the second time EEXIST), read back by a dump.
    #[test]
    fn acked_changes_in_a_fresh_netns() {
        let thread = std::thread::spawn(|| {
            if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
                eprintln!("skipped: unshare(CLONE_NEWNET): {e} (needs CAP_SYS_ADMIN)");
                return;
            }
            let mut nl = Rtnl::new().expect("socket");
            let lo = links(&mut nl);
            assert_eq!(lo.len(), 1, "a fresh netns has only lo: {lo:?}");
            let index = lo[0].header.index;
            assert!(!lo[0].header.flags.contains(LinkFlags::Up));

            let mut up = LinkMessage::default();
            up.header.index = index;
            up.header.flags = LinkFlags::Up;
            up.header.change_mask = LinkFlags::Up;
            let acked = nl
                .request(RouteNetlinkMessage::SetLink(up), NLM_F_ACK)
                .expect("set lo up");
            assert!(acked.is_empty(), "{acked:?}");
            assert!(links(&mut nl)[0].header.flags.contains(LinkFlags::Up));

            let ip = "10.255.0.1".parse().expect("ip");
            let add = || {
                let mut a = AddressMessage::default();
                a.header.family = AddressFamily::Inet;
                a.header.prefix_len = 32;
                a.header.index = index;
                a.attributes.push(AddressAttribute::Local(ip));
                RouteNetlinkMessage::NewAddress(a)
            };
            let flags = NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
            nl.request(add(), flags).expect("add address");
            let again = nl.request(add(), flags).expect_err("add it again");
            assert_eq!(again.raw_os_error(), Some(libc::EEXIST), "{again:?}");
            let addrs = nl
                .request(
                    RouteNetlinkMessage::GetAddress(AddressMessage::default()),
                    NLM_F_DUMP,
                )
                .expect("dump addresses");
            let found = addrs.iter().any(|m| {
                matches!(m, RouteNetlinkMessage::NewAddress(a)
                    if a.header.index == index && address_ip(a) == Some(ip))
            });
            assert!(found, "{addrs:?}");
        });
        thread.join().expect("netns thread");
    }
}
