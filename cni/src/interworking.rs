//! Interworking models: how the CNI's veth in the pod netns is connected to
//! the VM. `tcfilter` (default) puts a tap next to the veth and redirects all
//! traffic between them with tc (ingress qdiscs + u32 match-all filters with
//! `mirred egress redirect`; the `matchall` classifier is not available on
//! every kernel); `none` connects nothing.

use std::fmt;
use std::os::fd::OwnedFd;
use std::str::FromStr;

use crate::error::{CniError, Result};
use crate::link;
use crate::netns::NetNs;
use crate::tap;

/// What the VM gets for one veth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub tap_name: String,
    pub mtu: u32,
}

/// Connects a veth to the VM and disconnects it. Blocking: async callers
/// use `spawn_blocking`.
pub trait Interworking: Send + Sync + fmt::Debug {
    fn name(&self) -> &'static str;
    /// Connect `veth` in `netns`; `None` when this model gives the VM no device.
    fn attach(&self, netns: &NetNs, veth: &str) -> Result<Option<Endpoint>>;
    /// Undo [`attach`](Self::attach); idempotent, and fine when the netns is gone.
    fn detach(&self, netns: &NetNs, veth: &str) -> Result<()>;
}

/// The configured model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InterworkingModel {
    #[default]
    TcFilter,
    None,
}

impl InterworkingModel {
    pub fn build(self) -> Box<dyn Interworking> {
        match self {
            InterworkingModel::TcFilter => Box::new(TcFilter),
            InterworkingModel::None => Box::new(NoInterworking),
        }
    }
}

impl FromStr for InterworkingModel {
    type Err = CniError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tcfilter" => Ok(Self::TcFilter),
            "none" => Ok(Self::None),
            other => Err(CniError::InvalidArgument {
                what: "interworking model",
                value: other.to_string(),
                reason: "expected tcfilter or none".into(),
            }),
        }
    }
}

/// The tap that goes with a veth: `eth0` → `tap0_vc`, `eth3` → `tap3_vc`,
/// anything else → `tap_<name>` cut to 15 bytes.
pub fn tap_name_for(veth: &str) -> String {
    match veth.strip_prefix("eth") {
        Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => format!("tap{n}_vc"),
        _ => {
            let mut s = format!("tap_{veth}");
            s.truncate(15);
            s
        }
    }
}

/// Open the tap `tap_name` in `netns` for the hypervisor (`-netdev tap,fd=N`).
/// `vnet_hdr` must match what the hypervisor is told (`vnet_hdr=on|off`).
pub fn open_tap(netns: &NetNs, tap_name: &str, vnet_hdr: bool) -> Result<OwnedFd> {
    netns.run(|| tap::attach(tap_name, vnet_hdr))
}

/// The default model.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcFilter;

fn redirect(ns: &std::path::Path, from: &str, to: &str) -> Result<()> {
    link::run(ns, "tc", &["qdisc", "add", "dev", from, "ingress"])?;
    link::run(
        ns,
        "tc",
        &[
            "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match",
            "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
        ],
    )?;
    Ok(())
}

fn teardown(ns: &std::path::Path, veth: &str, tap: &str) -> Result<()> {
    // Deleting the ingress qdisc deletes its filters.
    let a = link::run_idempotent(ns, "tc", &["qdisc", "del", "dev", veth, "ingress"]);
    let b = link::run_idempotent(ns, "tc", &["qdisc", "del", "dev", tap, "ingress"]);
    let c = link::run_idempotent(ns, "ip", &["link", "del", "dev", tap]);
    a.and(b).and(c)
}

impl Interworking for TcFilter {
    fn name(&self) -> &'static str {
        "tcfilter"
    }

    fn attach(&self, netns: &NetNs, veth: &str) -> Result<Option<Endpoint>> {
        let tap_name = tap_name_for(veth);
        let ns = netns.path().to_path_buf();
        netns.run(|| {
            let info = link::link_info(&ns, veth)?;
            tap::create_persistent(&tap_name, true)?;
            let mtu = info.mtu.to_string();
            let wired = link::run(&ns, "ip", &["link", "set", "dev", &tap_name, "mtu", &mtu, "up"])
                .and_then(|_| redirect(&ns, veth, &tap_name))
                .and_then(|()| redirect(&ns, &tap_name, veth));
            if let Err(e) = wired {
                if let Err(undo) = teardown(&ns, veth, &tap_name) {
                    tracing::warn!(netns = %ns.display(), error = %undo, "undoing a failed tcfilter attach");
                }
                return Err(e);
            }
            Ok(Some(Endpoint {
                tap_name: tap_name.clone(),
                mtu: info.mtu,
            }))
        })
    }

    fn detach(&self, netns: &NetNs, veth: &str) -> Result<()> {
        let tap_name = tap_name_for(veth);
        let ns = netns.path().to_path_buf();
        match netns.run(|| teardown(&ns, veth, &tap_name)) {
            Err(CniError::NetnsNotFound { .. }) => Ok(()),
            other => other,
        }
    }
}

/// No interworking: the VM gets no network device.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoInterworking;

impl Interworking for NoInterworking {
    fn name(&self) -> &'static str {
        "none"
    }
    fn attach(&self, _netns: &NetNs, _veth: &str) -> Result<Option<Endpoint>> {
        Ok(None)
    }
    fn detach(&self, _netns: &NetNs, _veth: &str) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names() {
        assert_eq!(tap_name_for("eth0"), "tap0_vc");
        assert_eq!(tap_name_for("eth12"), "tap12_vc");
        assert_eq!(tap_name_for("net1"), "tap_net1");
        assert_eq!(tap_name_for("averyveryverylongname"), "tap_averyveryve");
        assert_eq!(
            "none".parse::<InterworkingModel>().unwrap(),
            InterworkingModel::None
        );
        assert!("macvtap".parse::<InterworkingModel>().is_err());
    }
}
