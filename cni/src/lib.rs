//! Pod networking for virtcontainers: a network namespace per pod, CNI
//! plugins run into it, and an interworking model (TC-filter redirection by
//! default) that gives the pod's VM a tap carrying the veth's traffic.
//!
//! - [`NetNs`]: named netns under the runtime's own dir.
//! - [`Cni`]: ADD / CHECK / DEL of the first config list, with a result cache.
//! - [`Interworking`]: `tcfilter` / `none`; [`open_tap`] for the hypervisor.
//! - [`NetworkPlugin`] / [`PodNetwork`]: all of it for one pod sandbox.
//! - [`defaults::ensure_default_conflist`]: a bridge network when none is set up.
#![deny(unsafe_code)]

pub mod cni;
pub mod config;
pub mod defaults;
mod error;
mod exec;
#[cfg(any(test, feature = "testing"))]
pub mod fake;
pub mod held;
pub mod interworking;
mod link;
mod netlink;
pub mod netns;
pub mod network;
pub mod result;
mod tap;

use std::io::Write;
use std::path::Path;

pub use crate::cni::{
    AddResult, Bandwidth, CapabilityArgs, Cni, CniConfig, DnsCapability, IpRange, PodIdentity,
    PortMapping, RuntimeConf,
};
pub use config::{NetworkConfigList, PluginConfig};
pub use error::{CniError, ErrorKind, Result};
pub use exec::CniCommand;
pub use held::{held_tap_name, HoldingNetns};
pub use interworking::{
    open_tap, tap_name_for, Endpoint, Interworking, InterworkingModel, NoInterworking, TcFilter,
};
pub use link::{ingress_filter_actions, link_stats, LinkStats, NeighbourInfo, RouteInfo};
pub use netns::NetNs;
pub use network::{
    open_pod_taps, pod_netns, InterfaceInfo, NetworkPlugin, NetworkStatus, PodNetwork,
    PodNetworkRequest, DEFAULT_NETNS_DIR, DEFAULT_STATE_DIR,
};
pub use result::{CniResult, Dns, IpNet};

/// IDs and names that become file names, interface names or `CNI_ARGS`:
/// 1..=128 of `[A-Za-z0-9_.-]`, not starting with `.` or `-`.
pub(crate) fn valid_name(what: &'static str, value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && !value.starts_with(['.', '-'])
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(CniError::InvalidArgument {
            what,
            value: value.to_string(),
            reason: "must be 1 to 128 of [A-Za-z0-9_.-], not starting with '.' or '-'".into(),
        })
    }
}

/// Write `path` atomically: temp file, fsync, rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(CniError::io("create dir", dir))?;
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        CniError::io("write", path)(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("id", "abc-1.2_3").is_ok());
        for bad in ["", ".x", "-x", "a/b", "a;b", "a b"] {
            assert!(valid_name("id", bad).is_err(), "{bad:?}");
        }
    }
}
