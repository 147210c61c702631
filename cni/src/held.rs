//! Taps held for warm VMs. A warm VM (booted before its pod is known) gets
//! its NIC at boot, on a tap that waits in a namespace no pod sees; when a
//! sandbox claims the VM, the tap moves into the pod's namespace and the
//! veth's traffic is redirected to it instead of to the pod's own tap. The
//! guest then only takes the veth's MAC and addresses on a NIC it already
//! has, instead of finding a hot-plugged one (~0.3 s of PCIe hot-plug under
//! TCG, and the NIC's first bring-up).
//!
//! The holding namespace is kept by a descriptor of this process (no mount):
//! it goes with the process. A held tap is not persistent: it goes when the
//! VM that holds its descriptor does. Nothing of either can outlive them.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sched::{unshare, CloneFlags};

use crate::error::{CniError, Result};
use crate::interworking::tap_name_for;
use crate::link;
use crate::netns::NetNs;
use crate::tap;

/// The name of warm VM `vm_id`'s held tap: `vcw` and the last 12 letters
/// and digits of the ID (pool IDs end in 16 random hex digits).
pub fn held_tap_name(vm_id: &str) -> String {
    let tail: Vec<char> = vm_id.chars().filter(char::is_ascii_alphanumeric).collect();
    let tail: String = tail[tail.len().saturating_sub(12)..].iter().collect();
    format!("vcw{tail}")
}

/// A network namespace of this process's own, where held taps wait.
#[derive(Debug)]
pub struct HoldingNetns {
    /// Keeps the namespace alive; `ns` names it through /proc/self/fd.
    _file: File,
    ns: NetNs,
}

impl HoldingNetns {
    pub fn new() -> Result<Self> {
        let file = std::thread::Builder::new()
            .name("netns-hold".into())
            .spawn(|| -> Result<File> {
                unshare(CloneFlags::CLONE_NEWNET).map_err(|source| CniError::Netns {
                    path: "(holding)".into(),
                    action: "unshare(CLONE_NEWNET)",
                    source,
                })?;
                File::open("/proc/thread-self/ns/net")
                    .map_err(CniError::io("open", "/proc/thread-self/ns/net"))
            })
            .map_err(|_| CniError::Thread {
                what: "creating the holding netns".into(),
            })?
            .join()
            .map_err(|_| CniError::Thread {
                what: "creating the holding netns".into(),
            })??;
        let ns = NetNs::open(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
        Ok(Self { _file: file, ns })
    }

    /// Creates the held tap `name` and returns its descriptor, the only
    /// one: the tap goes when it (and every copy) is closed.
    pub fn hold_tap(&self, name: &str, vnet_hdr: bool) -> Result<OwnedFd> {
        self.ns.run(|| tap::create_held(name, vnet_hdr))
    }

    /// Moves the held tap `held` into `pod` and redirects `veth`'s traffic
    /// to it (and its traffic to `veth`) instead of to the pod's own tap,
    /// which stays, unconnected, for [`restore`]. On error the pod's own tap
    /// is connected again.
    pub fn adopt(&self, held: &str, pod: &NetNs, veth: &str) -> Result<()> {
        let pod_path = pod.path().to_path_buf();
        let adopted = (|| {
            pod.run(|| link::unredirect_one(&pod_path, veth))?;
            let holding = self.ns.path().to_path_buf();
            self.ns.run(|| link::move_link(&holding, held, &pod_path))?;
            pod.run(|| link::redirect_both_ways(&pod_path, veth, held))
                .map(drop)
        })();
        if let Err(err) = adopted {
            if let Err(undo) = restore(pod, veth, held) {
                tracing::warn!(netns = %pod_path.display(), error = %undo, "undoing a failed tap adoption");
            }
            return Err(err);
        }
        Ok(())
    }
}

/// Undoes [`HoldingNetns::adopt`]: the held tap `held` leaves the pod (it is
/// deleted; its VM is being thrown away) and `veth`'s traffic goes to the
/// pod's own tap again. Pieces already undone are fine.
pub fn restore(pod: &NetNs, veth: &str, held: &str) -> Result<()> {
    let path = pod.path().to_path_buf();
    let own = tap_name_for(veth);
    pod.run(|| {
        link::unredirect(&path, veth, held)?;
        link::redirect_one_way(&path, veth, &own)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_tap_names_fit_and_differ() {
        let a = held_tap_name("pool-18ef0063ca4a67ba");
        let b = held_tap_name("pool-18f100667868f281");
        assert_eq!(a, "vcw0063ca4a67ba");
        assert!(a.len() <= 15 && b.len() <= 15);
        assert_ne!(a, b);
        assert_eq!(held_tap_name("x"), "vcwx");
    }
}
