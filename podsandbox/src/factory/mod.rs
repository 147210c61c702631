//! The VM factory: where a new sandbox's VM comes from.
//!
//! - **Direct** (`[factory] pool = 0`): every sandbox boots its own VM when
//!   it is created.
//! - **Pool** (`pool = N`, [`pool::Pool`]): N VMs of the default size are
//!   booted ahead of demand, at a low CPU priority, to the point where their
//!   agent answers. CreateSandbox claims one (see `sandbox_claim.rs`): the
//!   VM's priority goes back to normal, it joins the pod's cgroup, grows to
//!   the pod's size (CPU and memory hot-plug), gets the pod's NICs by
//!   hot-plug and the pod's addresses, routes, sysctls, hostname and DNS
//!   from its agent. An empty pool (or a pod the pool cannot serve) boots
//!   cold, as Direct does; the pool refills in the background.
//! - **Template** (`pool = N`, `template = true`): the same pool, filled with
//!   clones of one saved VM instead of boots (see `vm_template.rs`): each
//!   clone maps the template's RAM file private and loads its device state,
//!   so the clones share every page none of them writes.
//!
//! The pool is behind [`Factory`], and what it needs of its owner — boot a
//! warm VM, throw one away — behind [`Warmer`], so its logic (refill,
//! replace a VM that died idle, back off on failures, shut down) is
//! unit-tested without VMs.

pub mod pool;

use std::sync::Arc;

use async_trait::async_trait;
use hypervisor::Hypervisor;
use serde::{Deserialize, Serialize};

/// Where a sandbox's VM came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmOrigin {
    /// Booted for the sandbox when it was created.
    #[default]
    Boot,
    /// Claimed from the factory's pool of warm VMs.
    Pool,
    /// Claimed from the pool, a clone of the saved VM template.
    Template,
}

impl std::fmt::Display for VmOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmOrigin::Boot => "boot",
            VmOrigin::Pool => "pool",
            VmOrigin::Template => "template",
        })
    }
}

/// What a factory holds now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FactoryStatus {
    /// "direct", "pool", or "template" (a pool of clones).
    pub kind: String,
    /// How many warm VMs it keeps.
    pub target: u32,
    /// Warm VMs ready to be claimed.
    pub ready: u32,
    /// Whether one is booting now.
    pub booting: bool,
    /// Warm VMs booted, claimed, and lost (died or failed to boot) since
    /// the factory started.
    pub booted: u64,
    pub claimed: u64,
    pub lost: u64,
    /// The last failure to boot a warm VM, if the last boot failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A warm VM: booted, agent answering, no sandbox's yet.
#[derive(Debug, Clone)]
pub struct WarmVm {
    /// The ID it booted under (its run dir's name).
    pub id: String,
    pub vm: Arc<dyn Hypervisor>,
}

/// What a pool needs from its owner (the runtime).
#[async_trait]
pub trait Warmer: Send + Sync {
    /// Boots a VM of the default size under `id` until its agent answers,
    /// at a low CPU priority. On error nothing of it is left.
    async fn warm(&self, id: &str) -> crate::Result<Arc<dyn Hypervisor>>;
    /// Throws away the warm VM `id` (`vm` if there is one to stop): its
    /// processes and its run dir.
    async fn discard(&self, id: &str, vm: Option<&dyn Hypervisor>);
}

/// Hands out warm VMs, if it has any.
#[async_trait]
pub trait Factory: Send + Sync + std::fmt::Debug {
    /// A warm VM for a new sandbox, if one is ready. It is the caller's
    /// from here on (to claim, or to discard).
    fn take(&self) -> Option<WarmVm>;
    fn status(&self) -> FactoryStatus;
    /// Starts keeping VMs warm with `warmer`.
    fn start(&self, warmer: Arc<dyn Warmer>);
    /// Stops refilling and throws away every warm VM (a boot in flight
    /// among them). Claimed VMs are not the factory's any more.
    async fn shutdown(&self);
}

/// No warm VMs: every sandbox boots its own.
#[derive(Debug, Default)]
pub struct Direct;

#[async_trait]
impl Factory for Direct {
    fn take(&self) -> Option<WarmVm> {
        None
    }
    fn status(&self) -> FactoryStatus {
        FactoryStatus {
            kind: "direct".into(),
            ..Default::default()
        }
    }
    fn start(&self, _warmer: Arc<dyn Warmer>) {}
    async fn shutdown(&self) {}
}

/// The factory `config` asks for.
pub fn from_config(config: &crate::config::FactoryConfig) -> Arc<dyn Factory> {
    if config.pool == 0 {
        Arc::new(Direct)
    } else if config.template {
        Arc::new(pool::Pool::of_clones(config.pool))
    } else {
        Arc::new(pool::Pool::new(config.pool))
    }
}
