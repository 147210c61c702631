//! `vcrid check`: can this host run pods? One line per part, required or
//! optional, with what was found.

use std::path::Path;

use crate::config::Config;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub part: &'static str,
    pub required: bool,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub items: Vec<Item>,
}

impl Report {
    /// Every required part is there.
    pub fn ok(&self) -> bool {
        self.items.iter().all(|i| i.ok || !i.required)
    }

    pub fn table(&self) -> String {
        let width = self.items.iter().map(|i| i.part.len()).max().unwrap_or(0);
        let mut out = String::new();
        for i in &self.items {
            let mark = match (i.ok, i.required) {
                (true, _) => "ok",
                (false, true) => "MISSING",
                (false, false) => "absent",
            };
            out.push_str(&format!("{:<width$}  {:<7}  {}\n", i.part, mark, i.detail));
        }
        out.push_str(if self.ok() {
            "ready: this host can run pods\n"
        } else {
            "not ready: a required part is missing\n"
        });
        out
    }
}

fn file(part: &'static str, required: bool, path: &Path) -> Item {
    let ok = !path.as_os_str().is_empty() && path.is_file();
    Item {
        part,
        required,
        ok,
        detail: if path.as_os_str().is_empty() {
            "not configured and no built guest image found (make build)".into()
        } else {
            path.display().to_string()
        },
    }
}

/// An error with its sources, on one line.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

pub fn check(config: &Config) -> Report {
    let hv = &config.hypervisor;
    let mut items = vec![
        file("QEMU", true, &hv.qemu_path),
        file("guest kernel", true, &hv.kernel),
        file("guest initramfs", true, &hv.initrd),
    ];
    let kvm = hypervisor::qemu::accel::HostFacts::probe();
    items.push(Item {
        part: "accelerator",
        required: true,
        ok: true,
        detail: match hypervisor::qemu::accel::resolve(hv.accel, &kvm) {
            Ok(r) => format!("{} (config: {:?})", r.as_str(), hv.accel),
            Err(err) => format!("{err}"),
        },
    });
    let vhost_vsock = Path::new("/dev/vhost-vsock").exists();
    let hybrid = hv.vhost_device_vsock_path.is_file();
    let serial = hv.vsock == hypervisor::VsockBackend::Serial;
    items.push(Item {
        part: "vsock",
        required: !serial,
        ok: vhost_vsock || hybrid,
        detail: if serial {
            "not used: the agent is on a virtio-serial port (hypervisor.vsock = \"serial\"; no port forwarding)".into()
        } else if vhost_vsock {
            "kernel vhost-vsock (/dev/vhost-vsock)".into()
        } else {
            format!("hybrid: {}", hv.vhost_device_vsock_path.display())
        },
    });
    items.push(file(
        "virtiofsd",
        hv.shared_fs == hypervisor::SharedFs::VirtioFs,
        &hv.virtiofsd_path,
    ));
    let factory = config.factory.check(hv);
    items.push(Item {
        part: "VM factory",
        required: true,
        ok: factory.is_ok(),
        detail: match factory {
            Err(err) => err,
            Ok(()) if config.factory.pool == 0 && config.factory.template => format!(
                "template: each pod's VM ({} vCPU, {} MiB) is a clone of one saved VM, made when the pod starts (factory.pool = 0)",
                hv.default_vcpus, hv.default_memory_mib
            ),
            Ok(()) if config.factory.pool == 0 => {
                "direct: each pod boots its VM (factory.pool = 0)".into()
            }
            Ok(()) => format!(
                "pool of {} warm VMs ({} vCPU, {} MiB; {} at nice {})",
                config.factory.pool,
                hv.default_vcpus,
                hv.default_memory_mib,
                if config.factory.template {
                    "clones of one saved template VM"
                } else {
                    "booted"
                },
                config.factory.refill_nice
            ),
        },
    });
    let plugins: Vec<String> = ["bridge", "host-local", "portmap", "loopback"]
        .into_iter()
        .filter(|p| !config.network.bin_dirs.iter().any(|d| d.join(p).is_file()))
        .map(String::from)
        .collect();
    items.push(Item {
        part: "CNI plugins",
        required: true,
        ok: plugins.is_empty(),
        detail: if plugins.is_empty() {
            format!(
                "bridge, host-local, portmap, loopback in {:?}",
                config.network.bin_dirs
            )
        } else {
            format!(
                "missing {} in {:?}",
                plugins.join(", "),
                config.network.bin_dirs
            )
        },
    });
    let conf = cni::Cni::new(config.cni()).load();
    items.push(Item {
        part: "CNI config",
        required: !config.network.write_default_conflist,
        ok: conf.is_ok(),
        detail: match conf {
            Ok(list) => format!("{} in {}", list.name, config.network.conf_dir.display()),
            Err(err) if config.network.write_default_conflist => {
                format!(
                    "{} (vcrid serve writes a default bridge config)",
                    chain(&err)
                )
            }
            Err(err) => chain(&err),
        },
    });
    let cgroup2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    items.push(Item {
        part: "cgroups",
        required: false,
        ok: cgroup2,
        detail: if cgroup2 {
            "cgroup v2 (containers' limits live in the guest)".into()
        } else {
            "no cgroup v2 on the host (not needed: limits live in the guest)".into()
        },
    });
    Report { items }
}
