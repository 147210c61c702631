//! The default network: a bridge conflist written only when the conf dir has
//! no config, on the first private /16 of 10.88–10.99 that no host route uses.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::config::NetworkConfigList;
use crate::error::{CniError, Result};

pub const DEFAULT_BRIDGE: &str = "vcr0";
pub const DEFAULT_NETWORK_NAME: &str = "vc-default";
pub const DEFAULT_CONFLIST_FILE: &str = "10-vc-default.conflist";

/// The default conflist: bridge + host-local IPAM on `subnet` (a default
/// route via the bridge), portmap, loopback.
pub fn default_conflist(bridge: &str, subnet: &str) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": DEFAULT_NETWORK_NAME,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}]
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {"type": "loopback"}
        ]
    })
}

/// An IPv4 route of the host: network and prefix length.
pub type HostRoute = (Ipv4Addr, u8);

/// The host's IPv4 routes from `/proc/net/route` (the default route excluded).
pub fn host_routes() -> Result<Vec<HostRoute>> {
    let path = Path::new("/proc/net/route");
    let text = std::fs::read_to_string(path).map_err(CniError::io("read", path))?;
    Ok(parse_proc_net_route(&text))
}

fn parse_proc_net_route(text: &str) -> Vec<HostRoute> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 8 {
            continue;
        }
        let (Ok(dst), Ok(mask)) = (
            u32::from_str_radix(cols[1], 16),
            u32::from_str_radix(cols[7], 16),
        ) else {
            continue;
        };
        // The file holds them in host (little-endian) byte order.
        // The kernel prints the network-order words as host-order (x86:
        // little-endian) integers: 192.0.2.0 is "000200C0".
        let dst = Ipv4Addr::from(dst.to_le_bytes());
        let len = mask.count_ones() as u8;
        if len == 0 {
            continue;
        }
        out.push((dst, len));
    }
    out
}

fn overlaps(a: HostRoute, b: HostRoute) -> bool {
    let len = a.1.min(b.1);
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    (u32::from(a.0) & mask) == (u32::from(b.0) & mask)
}

/// The first `10.N.0.0/16` (N in 88..=99) that overlaps none of `routes`.
pub fn pick_subnet(routes: &[HostRoute]) -> Option<String> {
    (88u8..=99)
        .map(|n| (Ipv4Addr::new(10, n, 0, 0), 16u8))
        .find(|cand| !routes.iter().any(|r| overlaps(*cand, *r)))
        .map(|(a, l)| format!("{a}/{l}"))
}

/// Write the default conflist into `conf_dir` unless it already has a
/// config; returns the file written, or `None` when one was there.
pub fn ensure_default_conflist(conf_dir: &Path) -> Result<Option<PathBuf>> {
    match NetworkConfigList::load_dir(conf_dir) {
        Ok(_) => return Ok(None),
        Err(CniError::NoConfig { .. }) => {}
        Err(CniError::ConfDir { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
        // A malformed config is the admin's to fix, not ours to bury under a default.
        Err(e) => return Err(e),
    }
    let subnet = pick_subnet(&host_routes()?).ok_or_else(|| CniError::InvalidConfig {
        file: conf_dir.join(DEFAULT_CONFLIST_FILE),
        reason: "every /16 of 10.88.0.0 to 10.99.0.0 overlaps a host route".into(),
    })?;
    let path = conf_dir.join(DEFAULT_CONFLIST_FILE);
    let body = default_conflist(DEFAULT_BRIDGE, &subnet);
    let bytes = serde_json::to_vec_pretty(&body).map_err(|source| CniError::Decode {
        path: path.clone(),
        source,
    })?;
    crate::write_atomic(&path, &bytes)?;
    tracing::info!(file = %path.display(), %subnet, "wrote the default CNI network config");
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_route() {
        let text =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
            eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            cni0\t0000580A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";
        let routes = parse_proc_net_route(text);
        assert_eq!(
            routes,
            vec![
                (Ipv4Addr::new(192, 0, 2, 0), 24),
                (Ipv4Addr::new(10, 88, 0, 0), 16)
            ]
        );
    }

    #[test]
    fn picks_the_first_free_subnet() {
        assert_eq!(pick_subnet(&[]).as_deref(), Some("10.88.0.0/16"));
        let used = [
            (Ipv4Addr::new(10, 88, 0, 0), 16),
            (Ipv4Addr::new(10, 89, 3, 0), 24),
        ];
        assert_eq!(pick_subnet(&used).as_deref(), Some("10.90.0.0/16"));
        assert_eq!(pick_subnet(&[(Ipv4Addr::new(10, 0, 0, 0), 8)]), None);
    }

    #[test]
    fn writes_only_into_an_empty_conf_dir() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("net.d");
        let written = ensure_default_conflist(&conf).unwrap().unwrap();
        let list = NetworkConfigList::load_dir(&conf).unwrap();
        assert_eq!(list.source, written);
        let types: Vec<&str> = list
            .plugins
            .iter()
            .map(|p| p.plugin_type.as_str())
            .collect();
        assert_eq!(types, vec!["bridge", "portmap", "loopback"]);
        assert!(list.plugins[1].has_capability("portMappings"));
        // A second call leaves it alone, and so does any existing config.
        assert_eq!(ensure_default_conflist(&conf).unwrap(), None);
        let other = tempfile::tempdir().unwrap();
        std::fs::write(
            other.path().join("00-mine.conf"),
            br#"{"cniVersion":"1.0.0","name":"m","type":"bridge"}"#,
        )
        .unwrap();
        assert_eq!(ensure_default_conflist(other.path()).unwrap(), None);
        assert_eq!(std::fs::read_dir(other.path()).unwrap().count(), 1);
    }
}
