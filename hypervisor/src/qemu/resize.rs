//! CPU and memory hot-plug of a running q35 VM: vCPUs by ACPI hot-plug
//! (`device_add` of the CPU types `query-hotpluggable-cpus` offers), memory
//! by the `requested-size` of the VM's virtio-mem device `vmem0`, which the
//! guest driver plugs and unplugs in 2 MiB blocks.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{qmp::QmpSession, Qemu};
use crate::{HypervisorError, Result, VmSize};

/// How long the guest driver may take to plug what was asked (it does so in
/// a few hundred milliseconds per GiB under TCG; a guest without the driver
/// never does).
const MEMORY_PLUG_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an unplug may take: the guest must migrate pages off the blocks;
/// past this the VM keeps what is left and the next resize tries again.
const MEMORY_UNPLUG_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the guest may take to eject an unplugged vCPU.
const CPU_UNPLUG_TIMEOUT: Duration = Duration::from_secs(10);
/// virtio-mem's block size on x86 (the THP size): requests are multiples.
pub(super) const MEMORY_BLOCK_MIB: u32 = 2;
const VIRTIO_MEM: &str = "/machine/peripheral/vmem0";
/// QOM paths of CPUs added with an `id` (the hot-plugged ones).
const PERIPHERAL: &str = "/machine/peripheral/";

/// One entry of `query-hotpluggable-cpus`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct CpuSlot {
    /// The CPU model's QOM type (`max-x86_64-cpu`).
    pub kind: String,
    /// Topology properties (`socket-id`, `core-id`, `thread-id`, ...).
    pub props: serde_json::Map<String, Value>,
    /// Where the CPU is when present.
    pub qom_path: Option<String>,
}

impl CpuSlot {
    /// The ID a hot-plugged CPU was given (`vcpu-<socket>-<core>-<thread>`).
    fn device_id(&self) -> String {
        let part = |key: &str| {
            self.props
                .get(key)
                .and_then(Value::as_u64)
                .map_or_else(|| "x".to_string(), |v| v.to_string())
        };
        format!(
            "vcpu-{}-{}-{}",
            part("socket-id"),
            part("core-id"),
            part("thread-id")
        )
    }

    fn order(&self) -> (u64, u64, u64) {
        let get = |key: &str| self.props.get(key).and_then(Value::as_u64).unwrap_or(0);
        (get("socket-id"), get("core-id"), get("thread-id"))
    }

    /// Whether this CPU was hot-plugged (so can be unplugged again).
    fn hotplugged(&self) -> bool {
        self.qom_path
            .as_deref()
            .is_some_and(|p| p.starts_with(PERIPHERAL))
    }
}

pub(super) fn parse_cpu_slots(reply: &Value) -> Result<Vec<CpuSlot>> {
    let bad = |detail: &str| HypervisorError::Qmp {
        command: "query-hotpluggable-cpus".into(),
        detail: detail.into(),
    };
    let entries = reply
        .as_array()
        .ok_or_else(|| bad("the reply is not a list"))?;
    let mut slots = entries
        .iter()
        .map(|e| {
            Ok(CpuSlot {
                kind: e
                    .get("type")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("an entry has no type"))?
                    .to_string(),
                props: e
                    .get("props")
                    .and_then(Value::as_object)
                    .cloned()
                    .ok_or_else(|| bad("an entry has no props"))?,
                qom_path: e
                    .get("qom-path")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    slots.sort_by_key(CpuSlot::order);
    Ok(slots)
}

/// The CPUs to add (the lowest free slots) or to remove (the highest
/// hot-plugged ones) to go from what `slots` holds to `want`.
pub(super) fn plan_cpus(slots: &[CpuSlot], want: u32) -> (Vec<CpuSlot>, Vec<CpuSlot>) {
    let present = slots.iter().filter(|s| s.qom_path.is_some()).count();
    let want = usize::try_from(want).unwrap_or(usize::MAX);
    if want > present {
        let add = slots
            .iter()
            .filter(|s| s.qom_path.is_none())
            .take(want - present)
            .cloned()
            .collect();
        (add, Vec::new())
    } else {
        let remove = slots
            .iter()
            .rev()
            .filter(|s| s.hotplugged())
            .take(present - want)
            .cloned()
            .collect();
        (Vec::new(), remove)
    }
}

/// The virtio-mem device a VM of `boot_mib` gets to grow to `max_mib`:
/// whole 128 MiB guest memory blocks (a partial one would be unusable).
pub(crate) fn device_mib(boot_mib: u32, max_mib: u32) -> u32 {
    const GUEST_BLOCK_MIB: u32 = 128;
    max_mib.saturating_sub(boot_mib) / GUEST_BLOCK_MIB * GUEST_BLOCK_MIB
}

/// virtio-mem's requested size for a VM of `memory_mib` that booted with
/// `boot_mib`, within the device's `device_mib` (whole blocks).
pub(super) fn requested_mib(memory_mib: u32, boot_mib: u32, device_mib: u32) -> u32 {
    let extra = memory_mib.saturating_sub(boot_mib).min(device_mib);
    extra.div_ceil(MEMORY_BLOCK_MIB) * MEMORY_BLOCK_MIB
}

impl Qemu {
    /// Whether this VM was booted with hot-plug (the machine and the config).
    pub(super) fn can_resize(&self) -> Result<()> {
        if self.config.machine != crate::MachineType::Q35 {
            return Err(HypervisorError::Unsupported {
                what: "resizing a running VM",
                why: "microvm has no CPU or memory hot-plug; its pods are sized at boot",
            });
        }
        if !self.config.resource_hotplug {
            return Err(HypervisorError::Unsupported {
                what: "resizing a running VM",
                why: "hypervisor.resource_hotplug is off; pods are sized at boot",
            });
        }
        Ok(())
    }

    pub(super) async fn resize_inner(&self, size: VmSize) -> Result<VmSize> {
        self.can_resize()?;
        let (boot, id) = {
            let state = self.lock();
            (state.boot_size(), state.id.clone())
        };
        let max_vcpus = self.config.max_vcpus().max(boot.vcpus);
        if size.vcpus == 0 || size.vcpus > max_vcpus {
            return Err(HypervisorError::BadVcpus {
                got: size.vcpus,
                max: max_vcpus,
            });
        }
        if size.memory_mib > self.config.max_memory_mib.max(boot.memory_mib) {
            return Err(HypervisorError::MemoryTooLarge {
                got: size.memory_mib,
                max: self.config.max_memory_mib,
            });
        }
        let qmp = self.session().await?;
        let _serial = self.resize_lock.lock().await;
        let vcpus = self.resize_cpus(&qmp, size.vcpus.max(boot.vcpus)).await?;
        self.lock().vcpus = vcpus;
        let memory_mib = self
            .resize_memory(&qmp, size.memory_mib.max(boot.memory_mib), boot.memory_mib)
            .await?;
        self.lock().memory_mib = memory_mib;
        let now = VmSize { vcpus, memory_mib };
        tracing::info!(%id, asked = %size, %now, "VM resized");
        Ok(now)
    }

    async fn resize_cpus(&self, qmp: &QmpSession, want: u32) -> Result<u32> {
        let slots = parse_cpu_slots(&qmp.execute("query-hotpluggable-cpus", None).await?)?;
        if usize::try_from(want).unwrap_or(usize::MAX) > slots.len() {
            // A VM booted with less room (before hot-plug, or with a
            // smaller max_vcpus then).
            return Err(HypervisorError::NoRoom {
                what: "vCPUs",
                want,
                room: u32::try_from(slots.len()).unwrap_or(u32::MAX),
            });
        }
        let (add, mut remove) = plan_cpus(&slots, want);
        if !remove.is_empty() && self.accel() == super::accel::Resolved::Tcg {
            // A VM that can hot-plug vCPUs runs single-threaded TCG (see
            // `cmdline::hotplug_vcpus`), and QEMU 7.2 aborts unplugging a
            // vCPU there (its shared thread joins itself). The VM keeps
            // them; on one thread they cannot take more host CPU anyway.
            tracing::info!(
                keep = remove.len(),
                "vCPUs are not unplugged under TCG; the VM keeps them"
            );
            remove.clear();
        }
        for slot in &add {
            let mut args = slot.props.clone();
            args.insert("driver".into(), Value::String(slot.kind.clone()));
            args.insert("id".into(), Value::String(slot.device_id()));
            qmp.execute("device_add", Some(Value::Object(args))).await?;
        }
        for slot in &remove {
            let device = slot.device_id();
            let mark = qmp.mark();
            qmp.execute("device_del", Some(json!({ "id": device })))
                .await?;
            // The guest ejects it (ACPI): it offlines the CPU first.
            if let Err(err) = qmp
                .wait_event("DEVICE_DELETED", mark, CPU_UNPLUG_TIMEOUT, |d| {
                    d.get("device").and_then(Value::as_str) == Some(device.as_str())
                })
                .await
            {
                tracing::warn!(%device, "vCPU not ejected by the guest: {err}");
                break;
            }
        }
        let slots = parse_cpu_slots(&qmp.execute("query-hotpluggable-cpus", None).await?)?;
        Ok(
            u32::try_from(slots.iter().filter(|s| s.qom_path.is_some()).count())
                .unwrap_or(u32::MAX),
        )
    }

    async fn resize_memory(&self, qmp: &QmpSession, want: u32, boot: u32) -> Result<u32> {
        let device = self.lock().hotplug_memory_mib;
        if want > boot + device {
            return Err(HypervisorError::NoRoom {
                what: "MiB of memory",
                want,
                room: boot + device,
            });
        }
        if device == 0 {
            return Ok(boot);
        }
        let requested = requested_mib(want, boot, device);
        let plugged = plugged_mib(qmp).await?;
        if plugged == requested {
            return Ok(boot + plugged);
        }
        qmp.execute(
            "qom-set",
            Some(json!({
                "path": VIRTIO_MEM, "property": "requested-size",
                "value": u64::from(requested) << 20,
            })),
        )
        .await?;
        let growing = requested > plugged;
        let timeout = if growing {
            MEMORY_PLUG_TIMEOUT
        } else {
            MEMORY_UNPLUG_TIMEOUT
        };
        let deadline = Instant::now() + timeout;
        loop {
            let plugged = plugged_mib(qmp).await?;
            if plugged == requested {
                return Ok(boot + plugged);
            }
            if Instant::now() >= deadline {
                if growing {
                    return Err(HypervisorError::ResizeTimeout {
                        what: "memory",
                        secs: timeout.as_secs(),
                        detail: format!(
                            "the guest plugged {plugged} of {requested} MiB (is its virtio_mem driver loaded?)"
                        ),
                    });
                }
                tracing::warn!(
                    plugged,
                    requested,
                    "the guest did not give back all the memory asked for in time; it keeps trying"
                );
                return Ok(boot + plugged);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// What the guest has plugged of the virtio-mem device (MiB).
async fn plugged_mib(qmp: &QmpSession) -> Result<u32> {
    let size = qmp
        .execute(
            "qom-get",
            Some(json!({ "path": VIRTIO_MEM, "property": "size" })),
        )
        .await?;
    let bytes = size.as_u64().ok_or_else(|| HypervisorError::Qmp {
        command: "qom-get".into(),
        detail: format!("virtio-mem size {size} is not a number"),
    })?;
    Ok(u32::try_from(bytes >> 20).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots() -> Vec<CpuSlot> {
        parse_cpu_slots(&json!([
            {"props": {"core-id": 0, "thread-id": 0, "socket-id": 3}, "vcpus-count": 1, "type": "max-x86_64-cpu"},
            {"props": {"core-id": 0, "thread-id": 0, "socket-id": 2}, "vcpus-count": 1, "type": "max-x86_64-cpu",
             "qom-path": "/machine/peripheral/vcpu-2-0-0"},
            {"props": {"core-id": 0, "thread-id": 0, "socket-id": 1}, "vcpus-count": 1, "type": "max-x86_64-cpu"},
            {"props": {"core-id": 0, "thread-id": 0, "socket-id": 0}, "vcpus-count": 1, "type": "max-x86_64-cpu",
             "qom-path": "/machine/unattached/device[0]"}
        ]))
        .unwrap()
    }

    #[test]
    fn cpus_are_added_lowest_first_and_removed_highest_first() {
        let s = slots();
        let (add, remove) = plan_cpus(&s, 4);
        assert!(remove.is_empty());
        assert_eq!(
            add.iter().map(CpuSlot::device_id).collect::<Vec<_>>(),
            ["vcpu-1-0-0", "vcpu-3-0-0"]
        );
        let (add, remove) = plan_cpus(&s, 3);
        assert_eq!(add.len(), 1);
        assert!(remove.is_empty());
        let (add, remove) = plan_cpus(&s, 1);
        assert!(add.is_empty());
        assert_eq!(
            remove.iter().map(CpuSlot::device_id).collect::<Vec<_>>(),
            ["vcpu-2-0-0"]
        );
    }

    #[test]
    fn boot_cpus_are_never_removed() {
        let (_, remove) = plan_cpus(&slots(), 0);
        assert_eq!(remove.len(), 1, "only the hot-plugged one: {remove:?}");
    }

    #[test]
    fn a_bad_reply_is_an_error_not_a_panic() {
        assert!(parse_cpu_slots(&json!({"not": "a list"})).is_err());
        assert!(parse_cpu_slots(&json!([{"props": {}}])).is_err());
    }

    #[test]
    fn the_device_is_whole_guest_blocks() {
        assert_eq!(device_mib(256, 16384), 16128);
        assert_eq!(device_mib(300, 1000), 640);
        assert_eq!(device_mib(1000, 1000), 0);
        assert_eq!(device_mib(2000, 1000), 0);
    }

    #[test]
    fn memory_requests_are_whole_blocks_within_the_device() {
        assert_eq!(requested_mib(256, 256, 1024), 0);
        assert_eq!(requested_mib(200, 256, 1024), 0);
        assert_eq!(requested_mib(1153, 256, 4096), 898);
        assert_eq!(requested_mib(9000, 256, 1024), 1024);
    }
}
