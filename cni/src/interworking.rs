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
///
/// A single-queue tap takes one fd at a time (`EBUSY` otherwise). A process
/// forked elsewhere in this process holds a copy of a just-closed fd until it
/// execs, so `EBUSY` is retried for up to a second before it is returned.
pub fn open_tap(netns: &NetNs, tap_name: &str, vnet_hdr: bool) -> Result<OwnedFd> {
    netns.run(|| {
        let mut tries = 0;
        loop {
            match tap::attach(tap_name, vnet_hdr) {
                Err(CniError::Device { source, .. })
                    if source.raw_os_error() == Some(libc::EBUSY) && tries < 20 =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => return other,
            }
        }
    })
}

/// The default model.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcFilter;

impl Interworking for TcFilter {
    fn name(&self) -> &'static str {
        "tcfilter"
    }

    fn attach(&self, netns: &NetNs, veth: &str) -> Result<Option<Endpoint>> {
        let tap_name = tap_name_for(veth);
        let ns = netns.path().to_path_buf();
        netns.run(|| {
            tap::create_persistent(&tap_name, true)?;
            match link::redirect_both_ways(&ns, veth, &tap_name) {
                Ok(mtu) => Ok(Some(Endpoint {
                    tap_name: tap_name.clone(),
                    mtu,
                })),
                Err(e) => {
                    if let Err(undo) = link::unredirect(&ns, veth, &tap_name) {
                        tracing::warn!(netns = %ns.display(), error = %undo, "undoing a failed tcfilter attach");
                    }
                    Err(e)
                }
            }
        })
    }

    fn detach(&self, netns: &NetNs, veth: &str) -> Result<()> {
        let tap_name = tap_name_for(veth);
        let ns = netns.path().to_path_buf();
        match netns.run(|| link::unredirect(&ns, veth, &tap_name)) {
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
