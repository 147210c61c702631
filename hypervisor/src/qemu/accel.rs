//! Choosing the accelerator: KVM only where it really runs guests.
//!
//! `/dev/kvm` alone proves little: on a nested host without hardware
//! virtualisation in /proc/cpuinfo, KVM may be emulated and run guests at a
//! few MIPS, far slower than TCG. `auto` therefore wants both the CPU flag and
//! a usable device node; an explicit `kvm` only wants the device node.

use std::fs::OpenOptions;

use crate::{Accel, HypervisorError, Result};

/// The accelerator in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    Kvm,
    Tcg,
}

impl Resolved {
    pub fn as_str(self) -> &'static str {
        match self {
            Resolved::Kvm => "kvm",
            Resolved::Tcg => "tcg",
        }
    }
}

/// What the host offers, gathered once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// `vmx` or `svm` among the CPU flags.
    pub hw_virt: bool,
    /// `Ok` if /dev/kvm opens read-write, else why not.
    pub kvm_device: std::result::Result<(), String>,
}

impl HostFacts {
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let kvm_device = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map(drop)
            .map_err(|e| format!("/dev/kvm: {e}"));
        Self {
            hw_virt: has_hw_virt(&cpuinfo),
            kvm_device,
        }
    }
}

fn has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|f| f == "vmx" || f == "svm")
}

pub fn resolve(requested: Accel, host: &HostFacts) -> Result<Resolved> {
    match requested {
        Accel::Tcg => Ok(Resolved::Tcg),
        Accel::Kvm => match &host.kvm_device {
            Ok(()) => Ok(Resolved::Kvm),
            Err(reason) => Err(HypervisorError::KvmUnavailable {
                reason: reason.clone(),
            }),
        },
        Accel::Auto if host.hw_virt && host.kvm_device.is_ok() => Ok(Resolved::Kvm),
        Accel::Auto => Ok(Resolved::Tcg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(hw_virt: bool, kvm: bool) -> HostFacts {
        HostFacts {
            hw_virt,
            kvm_device: if kvm {
                Ok(())
            } else {
                Err("/dev/kvm: missing".into())
            },
        }
    }

    #[test]
    fn auto_needs_both_flag_and_device() {
        assert_eq!(
            resolve(Accel::Auto, &host(true, true)).ok(),
            Some(Resolved::Kvm)
        );
        // This machine: /dev/kvm exists but no vmx/svm (emulated, ~2 MIPS).
        assert_eq!(
            resolve(Accel::Auto, &host(false, true)).ok(),
            Some(Resolved::Tcg)
        );
        assert_eq!(
            resolve(Accel::Auto, &host(true, false)).ok(),
            Some(Resolved::Tcg)
        );
    }

    #[test]
    fn forced_choices() {
        assert_eq!(
            resolve(Accel::Tcg, &host(true, true)).ok(),
            Some(Resolved::Tcg)
        );
        assert_eq!(
            resolve(Accel::Kvm, &host(false, true)).ok(),
            Some(Resolved::Kvm)
        );
        let err = resolve(Accel::Kvm, &host(true, false)).expect_err("no device");
        assert!(err.to_string().contains("/dev/kvm: missing"), "{err}");
    }

    #[test]
    fn cpu_flags_are_matched_as_words() {
        assert!(has_hw_virt("processor: 0\nflags\t\t: fpu vme vmx sse\n"));
        assert!(has_hw_virt("flags : svm"));
        assert!(!has_hw_virt("flags : fpu vmxnope sse\n"));
        assert!(!has_hw_virt("model name : vmx in the name\n"));
    }
}
