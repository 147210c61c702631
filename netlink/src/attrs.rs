//! Attribute readers the host and the guest both need.

use std::net::IpAddr;

use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};

/// 6 bytes → "aa:bb:cc:dd:ee:ff" (any length, lower-case hex).
pub fn format_mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// An IPv4 or IPv6 route address; `None` for other families.
pub fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The route's table: RTA_TABLE when present (tables above 255), else the
/// header's.
pub fn route_table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table))
}

/// The interface's own address: IFA_LOCAL (IFA_ADDRESS is the peer's on
/// point-to-point links), else IFA_ADDRESS (all IPv6 sends).
pub fn address_ip(addr: &AddressMessage) -> Option<IpAddr> {
    let local = addr.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    local.or_else(|| {
        addr.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::route::RouteHeader;

    #[test]
    fn macs_print_in_lower_case_hex() {
        assert_eq!(
            format_mac(&[0x0a, 0x58, 0x0A, 0xff, 0, 5]),
            "0a:58:0a:ff:00:05"
        );
        assert_eq!(format_mac(&[]), "");
    }

    #[test]
    fn the_table_attribute_wins_over_the_header() {
        let mut r = RouteMessage::default();
        r.header.table = RouteHeader::RT_TABLE_MAIN;
        assert_eq!(route_table(&r), 254);
        r.attributes.push(RouteAttribute::Table(1000));
        assert_eq!(route_table(&r), 1000);
    }

    #[test]
    fn the_local_address_wins_over_the_peer() {
        let local: IpAddr = "10.0.0.2".parse().expect("ip");
        let peer: IpAddr = "10.0.0.1".parse().expect("ip");
        let mut a = AddressMessage::default();
        assert_eq!(address_ip(&a), None);
        a.attributes.push(AddressAttribute::Address(peer));
        assert_eq!(address_ip(&a), Some(peer));
        a.attributes.push(AddressAttribute::Local(local));
        assert_eq!(address_ip(&a), Some(local));
        assert_eq!(
            route_ip(&RouteAddress::Inet("10.0.0.1".parse().expect("ip"))),
            Some(peer)
        );
    }
}
