//! Warm VMs' NICs ([`podsandbox::WarmNics`]) from cni's held taps: a warm
//! VM boots with a tap held in a namespace of vcrid's own, which moves into
//! the pod's namespace when a sandbox claims the VM.

use std::os::fd::OwnedFd;

use podsandbox::TapPlace;

#[derive(Debug)]
pub(crate) struct CniWarmNics {
    holding: cni::HoldingNetns,
}

impl CniWarmNics {
    pub(crate) fn new() -> cni::Result<Self> {
        Ok(Self {
            holding: cni::HoldingNetns::new()?,
        })
    }
}

impl podsandbox::WarmNics for CniWarmNics {
    fn hold(&self, vm_id: &str) -> Result<OwnedFd, String> {
        // vnet_hdr: as the pods' own taps are opened (sandbox_run.rs).
        self.holding
            .hold_tap(&cni::held_tap_name(vm_id), true)
            .map_err(|e| e.to_string())
    }

    fn adopt(&self, vm_id: &str, place: &TapPlace) -> Result<(), String> {
        let pod = cni::NetNs::open(&place.netns).map_err(|e| e.to_string())?;
        self.holding
            .adopt(&cni::held_tap_name(vm_id), &pod, &place.veth)
            .map_err(|e| e.to_string())
    }

    fn restore(&self, vm_id: &str, place: &TapPlace) -> Result<(), String> {
        let pod = cni::NetNs::open(&place.netns).map_err(|e| e.to_string())?;
        cni::held::restore(&pod, &place.veth, &cni::held_tap_name(vm_id)).map_err(|e| e.to_string())
    }
}
