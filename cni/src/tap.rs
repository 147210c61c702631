//! Tap devices through `/dev/net/tun`. The only `unsafe` of the crate: the
//! `TUNSETIFF` / `TUNSETPERSIST` ioctls, which nix does not wrap.
//!
//! Every function acts in the network namespace of the calling thread; run
//! them through [`crate::NetNs::run`].
#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::error::{CniError, Result};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags member of the union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn device_err(name: &str, action: &str, source: std::io::Error) -> CniError {
    CniError::Device {
        device: name.to_string(),
        netns: "(current thread's)".into(),
        action: action.to_string(),
        source,
    }
}

/// Open `/dev/net/tun` and attach to (or create) tap `name`.
fn tun_set_iff(name: &str, vnet_hdr: bool) -> Result<OwnedFd> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(CniError::InvalidArgument {
            what: "tap name",
            value: name.to_string(),
            reason: format!("must be 1 to {} bytes", libc::IFNAMSIZ - 1),
        });
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| device_err(name, "open /dev/net/tun", e))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | if vnet_hdr { IFF_VNET_HDR } else { 0 },
        _pad: [0; 22],
    };
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: the fd is an open /dev/net/tun; TUNSETIFF reads and writes a
    // `struct ifreq` (40 bytes), which `req` is in layout and size, and it
    // lives for the whole call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(device_err(
            name,
            "TUNSETIFF",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(OwnedFd::from(file))
}

/// Create tap `name` and make it persistent (it outlives the fd).
pub(crate) fn create_persistent(name: &str, vnet_hdr: bool) -> Result<()> {
    let fd = tun_set_iff(name, vnet_hdr)?;
    // SAFETY: `fd` is a tun fd attached to a device; TUNSETPERSIST takes an
    // integer argument by value and touches no memory of ours.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) };
    if rc < 0 {
        return Err(device_err(
            name,
            "TUNSETPERSIST",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Create tap `name`, not persistent: it goes when the returned descriptor
/// (and every copy of it) is closed.
pub(crate) fn create_held(name: &str, vnet_hdr: bool) -> Result<OwnedFd> {
    tun_set_iff(name, vnet_hdr)
}

/// Attach to the existing tap `name`; the fd carries its frames (with a
/// `virtio_net_hdr` in front when `vnet_hdr`).
pub(crate) fn attach(name: &str, vnet_hdr: bool) -> Result<OwnedFd> {
    tun_set_iff(name, vnet_hdr)
}
