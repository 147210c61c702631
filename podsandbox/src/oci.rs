//! The OCI runtime spec the guest agent runs a container from, built as
//! typed `oci_spec` values (the guest parses the same types back).
//!
//! Its own mount, PID, IPC and UTS namespaces (the VM's network), the usual
//! API filesystems, masked and read-only paths (runc's defaults unless the
//! caller gives its own), capabilities, user and groups, rlimits, seccomp,
//! cgroup limits. A privileged container gets every capability, a writable
//! `/sys`, nothing masked; the guest adds its devices.

use std::collections::HashMap;

pub use oci_spec::runtime::{
    Capabilities, Capability, LinuxResources, LinuxSeccomp, LinuxSeccompAction, Spec,
};
use oci_spec::runtime::{
    LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxMemoryBuilder,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, Mount,
    MountBuilder, PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, RootBuilder, SpecBuilder,
    UserBuilder,
};

use crate::container::{ContainerConfig, MountPropagation, Resources};

/// A spec that cannot be built from what the caller gave (an unknown
/// capability or rlimit, a value `oci_spec` refuses).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

type Result<T> = std::result::Result<T, SpecError>;

fn built<T>(what: &str, r: std::result::Result<T, oci_spec::OciSpecError>) -> Result<T> {
    r.map_err(|e| SpecError(format!("OCI {what}: {e}")))
}

/// The capabilities a container process keeps by default (Docker's and
/// containerd's set).
pub const DEFAULT_CAPS: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// Every capability the guest kernel (6.1) knows.
pub const ALL_CAPS: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::DacReadSearch,
    Capability::Fowner,
    Capability::Fsetid,
    Capability::Kill,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setpcap,
    Capability::LinuxImmutable,
    Capability::NetBindService,
    Capability::NetBroadcast,
    Capability::NetAdmin,
    Capability::NetRaw,
    Capability::IpcLock,
    Capability::IpcOwner,
    Capability::SysModule,
    Capability::SysRawio,
    Capability::SysChroot,
    Capability::SysPtrace,
    Capability::SysPacct,
    Capability::SysAdmin,
    Capability::SysBoot,
    Capability::SysNice,
    Capability::SysResource,
    Capability::SysTime,
    Capability::SysTtyConfig,
    Capability::Mknod,
    Capability::Lease,
    Capability::AuditWrite,
    Capability::AuditControl,
    Capability::Setfcap,
    Capability::MacOverride,
    Capability::MacAdmin,
    Capability::Syslog,
    Capability::WakeAlarm,
    Capability::BlockSuspend,
    Capability::AuditRead,
    Capability::Perfmon,
    Capability::Bpf,
    Capability::CheckpointRestore,
];

/// runc's (and containerd's) masked paths.
pub const DEFAULT_MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// runc's (and containerd's) read-only paths.
pub const DEFAULT_READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// A capability by name: `CAP_NET_RAW`, `NET_RAW` or `net_raw`.
pub fn parse_capability(name: &str) -> Result<Capability> {
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    ALL_CAPS
        .iter()
        .copied()
        .find(|c| c.to_string() == bare)
        .ok_or_else(|| SpecError(format!("{name:?} is not a Linux capability")))
}

/// The capability set: the defaults, less `drop`, plus `add` (`ALL` in
/// `drop` starts from none, in `add` gives all).
pub fn capabilities(add: &[String], drop: &[String]) -> Result<Vec<Capability>> {
    let is_all = |c: &String| c.eq_ignore_ascii_case("ALL");
    let dropped: Vec<Capability> = drop
        .iter()
        .filter(|c| !is_all(c))
        .map(|c| parse_capability(c))
        .collect::<Result<_>>()?;
    let added: Vec<Capability> = add
        .iter()
        .filter(|c| !is_all(c))
        .map(|c| parse_capability(c))
        .collect::<Result<_>>()?;
    if add.iter().any(is_all) {
        return Ok(ALL_CAPS.to_vec());
    }
    let mut caps: Vec<Capability> = if drop.iter().any(is_all) {
        Vec::new()
    } else {
        DEFAULT_CAPS
            .iter()
            .copied()
            .filter(|c| !dropped.contains(c))
            .collect()
    };
    for c in added {
        if !caps.contains(&c) {
            caps.push(c);
        }
    }
    Ok(caps)
}

impl Resources {
    /// The OCI `linux.resources` object.
    pub fn to_oci(&self) -> Result<LinuxResources> {
        let mut r = LinuxResourcesBuilder::default();
        if let Some(limit) = self.memory_limit_bytes {
            r = r.memory(built(
                "memory",
                LinuxMemoryBuilder::default().limit(limit).build(),
            )?);
        }
        if self.cpu_shares.is_some()
            || self.cpu_quota.is_some()
            || self.cpu_period.is_some()
            || self.cpuset_cpus.is_some()
        {
            let mut cpu = LinuxCpuBuilder::default();
            if let Some(v) = self.cpu_shares {
                cpu = cpu.shares(v);
            }
            if let Some(v) = self.cpu_quota {
                cpu = cpu.quota(v);
            }
            if let Some(v) = self.cpu_period {
                cpu = cpu.period(v);
            }
            if let Some(v) = &self.cpuset_cpus {
                cpu = cpu.cpus(v.clone());
            }
            r = r.cpu(built("cpu", cpu.build())?);
        }
        if let Some(limit) = self.pids_limit {
            r = r.pids(built(
                "pids",
                LinuxPidsBuilder::default().limit(limit).build(),
            )?);
        }
        built("resources", r.build())
    }
}

fn mount(destination: &str, typ: &str, source: &str, options: &[&str]) -> Result<Mount> {
    built(
        "mount",
        MountBuilder::default()
            .destination(destination)
            .typ(typ)
            .source(source)
            .options(options.iter().map(|o| o.to_string()).collect::<Vec<_>>())
            .build(),
    )
}

/// Bind mounts of the container's shared mount sources: `shared` are their
/// paths as the guest sees them.
fn bind_mounts(config: &ContainerConfig, shared: &[String]) -> Result<Vec<Mount>> {
    config
        .mounts
        .iter()
        .zip(shared)
        .map(|(m, source)| {
            let propagation = match m.propagation {
                MountPropagation::Private => "rprivate",
                MountPropagation::HostToContainer => "rslave",
            };
            let access = if m.readonly { "ro" } else { "rw" };
            mount(
                &m.destination,
                "bind",
                source,
                &["rbind", propagation, access],
            )
        })
        .collect()
}

fn rlimit_type(name: &str) -> Result<PosixRlimitType> {
    serde_json::from_value(serde_json::Value::String(name.to_ascii_uppercase()))
        .map_err(|_| SpecError(format!("{name:?} is not a POSIX rlimit")))
}

/// The spec for `config`; `root.path` is set by the agent. `mount_sources`
/// are the guest paths of `config.mounts`, in order.
pub fn spec(config: &ContainerConfig, hostname: &str, mount_sources: &[String]) -> Result<Spec> {
    let (uid, gid) = config.user.unwrap_or((0, 0));
    let caps: Capabilities = if config.privileged {
        ALL_CAPS.iter().copied().collect()
    } else {
        capabilities(&config.cap_add, &config.cap_drop)?
            .into_iter()
            .collect()
    };
    let ambient: Capabilities = config
        .cap_ambient
        .iter()
        .map(|c| parse_capability(c))
        .collect::<Result<_>>()?;
    let mut bounding = caps;
    bounding.extend(ambient.iter().copied());
    // Every field set: the builders start from oci_spec's defaults (which
    // carry capabilities, rlimits and no_new_privileges of their own).
    let mut capabilities = built(
        "capabilities",
        LinuxCapabilitiesBuilder::default()
            .bounding(bounding.clone())
            .effective(bounding.clone())
            .permitted(bounding)
            .build(),
    )?;
    let ambient = (!ambient.is_empty()).then_some(ambient);
    capabilities.set_inheritable(ambient.clone());
    capabilities.set_ambient(ambient);
    let mut env = config.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(
            0,
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
    }
    let mut user = UserBuilder::default().uid(uid).gid(gid);
    if !config.additional_gids.is_empty() {
        user = user.additional_gids(config.additional_gids.clone());
    }
    let mut process = built(
        "process",
        ProcessBuilder::default()
            .terminal(config.tty)
            .user(built("user", user.build())?)
            .args(config.args.clone())
            .env(env)
            .cwd(config.cwd.clone().unwrap_or_else(|| "/".into()))
            .capabilities(capabilities)
            .build(),
    )?;
    // Only when set: libcontainer 0.7 reads a present `false` as true for
    // seccomp ordering (it would install the profile after dropping
    // CAP_SYS_ADMIN, without no_new_privs, and fail).
    process.set_no_new_privileges(config.no_new_privileges.then_some(true));
    process.set_rlimits(None);
    if !config.rlimits.is_empty() {
        let rlimits = config
            .rlimits
            .iter()
            .map(|(kind, soft, hard)| {
                built(
                    "rlimit",
                    PosixRlimitBuilder::default()
                        .typ(rlimit_type(kind)?)
                        .soft(*soft)
                        .hard(*hard)
                        .build(),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        process.set_rlimits(Some(rlimits));
    }

    let sysfs_access = if config.privileged { "rw" } else { "ro" };
    let mut mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", sysfs_access],
        )?,
    ];
    mounts.extend(bind_mounts(config, mount_sources)?);

    let namespace = |typ| {
        built(
            "namespace",
            LinuxNamespaceBuilder::default().typ(typ).build(),
        )
    };
    let (masked, readonly) = if config.privileged {
        (Vec::new(), Vec::new())
    } else {
        (
            config
                .masked_paths
                .clone()
                .unwrap_or_else(|| DEFAULT_MASKED_PATHS.iter().map(|p| p.to_string()).collect()),
            config.readonly_paths.clone().unwrap_or_else(|| {
                DEFAULT_READONLY_PATHS
                    .iter()
                    .map(|p| p.to_string())
                    .collect()
            }),
        )
    };
    let mut linux = built(
        "linux",
        LinuxBuilder::default()
            .namespaces(vec![
                namespace(LinuxNamespaceType::Pid)?,
                namespace(LinuxNamespaceType::Ipc)?,
                namespace(LinuxNamespaceType::Uts)?,
                namespace(LinuxNamespaceType::Mount)?,
            ])
            .cgroups_path(format!("/vc/{}", config.id))
            .masked_paths(masked)
            .readonly_paths(readonly)
            .build(),
    )?;
    linux.set_seccomp(config.seccomp.clone().filter(|_| !config.privileged));
    linux.set_resources(if config.resources.is_empty() {
        None
    } else {
        Some(config.resources.to_oci()?)
    });
    if !config.sysctls.is_empty() {
        linux.set_sysctl(Some(
            config
                .sysctls
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<HashMap<_, _>>(),
        ));
    }
    built(
        "spec",
        SpecBuilder::default()
            .version("1.0.2")
            .process(process)
            .root(built(
                "root",
                RootBuilder::default()
                    .path("rootfs")
                    .readonly(config.readonly_rootfs)
                    .build(),
            )?)
            .hostname(
                hostname
                    .chars()
                    .take(crate::network::HOSTNAME_MAX)
                    .collect::<String>(),
            )
            .mounts(mounts)
            .linux(linux)
            .build(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::Mount as HostMount;
    use serde_json::json;

    fn json_of(spec: &Spec) -> serde_json::Value {
        serde_json::to_value(spec).expect("spec serializes")
    }

    #[test]
    fn spec_carries_the_process_and_isolation() {
        let cfg = ContainerConfig {
            id: "c1".into(),
            args: vec!["/bin/echo".into(), "hello".into()],
            env: vec!["A=b".into()],
            user: Some((1000, 1000)),
            additional_gids: vec![10, 20],
            readonly_rootfs: true,
            ..Default::default()
        };
        let spec = json_of(&super::spec(&cfg, "pod1", &[]).expect("spec"));
        assert_eq!(spec["process"]["args"], json!(["/bin/echo", "hello"]));
        assert_eq!(
            spec["process"]["user"],
            json!({"uid": 1000, "gid": 1000, "additionalGids": [10, 20]})
        );
        assert_eq!(spec["process"]["cwd"], "/");
        assert!(spec["process"]["env"][0]
            .as_str()
            .is_some_and(|p| p.starts_with("PATH=")));
        assert_eq!(spec["process"]["env"][1], "A=b");
        assert!(spec["process"].get("noNewPrivileges").is_none());
        assert!(
            spec["process"].get("rlimits").is_none(),
            "no defaults leak in"
        );
        let caps = &spec["process"]["capabilities"];
        assert!(caps.get("ambient").is_none() && caps.get("inheritable").is_none());
        assert_eq!(
            caps["bounding"].as_array().map(Vec::len),
            Some(DEFAULT_CAPS.len())
        );
        assert_eq!(spec["root"]["readonly"], true);
        assert_eq!(spec["hostname"], "pod1");
        let ns: Vec<&str> = spec["linux"]["namespaces"]
            .as_array()
            .expect("namespaces")
            .iter()
            .filter_map(|n| n["type"].as_str())
            .collect();
        assert_eq!(
            ns,
            ["pid", "ipc", "uts", "mount"],
            "no network namespace: the pod shares the VM's"
        );
        assert_eq!(spec["linux"]["cgroupsPath"], "/vc/c1");
        assert!(spec["linux"].get("seccomp").is_none());
        assert!(spec["linux"].get("resources").is_none());
        assert_eq!(
            spec["linux"]["maskedPaths"].as_array().map(Vec::len),
            Some(DEFAULT_MASKED_PATHS.len())
        );
        let limited = ContainerConfig {
            resources: Resources {
                memory_limit_bytes: Some(32 << 20),
                ..Default::default()
            },
            ..cfg.clone()
        };
        assert_eq!(
            json_of(&super::spec(&limited, "pod1", &[]).expect("spec"))["linux"]["resources"]
                ["memory"]["limit"],
            32 << 20
        );
        let profile: LinuxSeccomp =
            serde_json::from_value(json!({"defaultAction": "SCMP_ACT_ALLOW"})).expect("profile");
        let with = ContainerConfig {
            seccomp: Some(profile),
            ..cfg
        };
        assert_eq!(
            json_of(&super::spec(&with, "pod1", &[]).expect("spec"))["linux"]["seccomp"]
                ["defaultAction"],
            "SCMP_ACT_ALLOW"
        );
    }

    #[test]
    fn capabilities_add_and_drop() {
        let caps = capabilities(
            &["sys_admin".into()],
            &["NET_RAW".into(), "CAP_KILL".into()],
        )
        .expect("caps");
        assert!(caps.contains(&Capability::SysAdmin));
        assert!(!caps.contains(&Capability::NetRaw));
        assert!(!caps.contains(&Capability::Kill));
        assert!(caps.contains(&Capability::Chown));
        assert_eq!(capabilities(&[], &["ALL".into()]).expect("none"), []);
        assert_eq!(
            capabilities(&["CAP_CHOWN".into()], &["all".into()]).expect("one"),
            [Capability::Chown]
        );
        assert_eq!(
            capabilities(&["ALL".into()], &[]).expect("all").len(),
            ALL_CAPS.len()
        );
        let err = capabilities(&["CAP_FLY".into()], &[]).expect_err("unknown");
        assert!(err.0.contains("CAP_FLY"), "{err}");
        assert_eq!(
            parse_capability("net_bind_service"),
            Ok(Capability::NetBindService)
        );
    }

    #[test]
    fn privileged_gets_every_capability_a_writable_sys_and_nothing_masked() {
        let profile: LinuxSeccomp =
            serde_json::from_value(json!({"defaultAction": "SCMP_ACT_ERRNO"})).expect("profile");
        let cfg = ContainerConfig {
            id: "p".into(),
            args: vec!["sh".into()],
            privileged: true,
            cap_drop: vec!["ALL".into()],
            seccomp: Some(profile),
            masked_paths: Some(vec!["/proc/kcore".into()]),
            ..Default::default()
        };
        let spec = json_of(&super::spec(&cfg, "pod", &[]).expect("spec"));
        assert_eq!(
            spec["process"]["capabilities"]["bounding"]
                .as_array()
                .map(Vec::len),
            Some(ALL_CAPS.len())
        );
        let sys = spec["mounts"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["destination"] == "/sys"))
            .cloned()
            .expect("/sys");
        assert!(sys["options"]
            .as_array()
            .is_some_and(|o| o.contains(&json!("rw"))));
        assert_eq!(spec["linux"]["maskedPaths"], json!([]));
        assert_eq!(spec["linux"]["readonlyPaths"], json!([]));
        assert!(
            spec["linux"].get("seccomp").is_none(),
            "privileged: unconfined"
        );
    }

    #[test]
    fn masked_and_readonly_paths_replace_the_defaults() {
        let cfg = ContainerConfig {
            id: "c".into(),
            args: vec!["sh".into()],
            masked_paths: Some(vec!["/proc/version".into()]),
            readonly_paths: Some(vec!["/etc".into()]),
            cap_ambient: vec!["NET_BIND_SERVICE".into()],
            ..Default::default()
        };
        let spec = json_of(&super::spec(&cfg, "pod", &[]).expect("spec"));
        assert_eq!(spec["linux"]["maskedPaths"], json!(["/proc/version"]));
        assert_eq!(spec["linux"]["readonlyPaths"], json!(["/etc"]));
        assert_eq!(
            spec["process"]["capabilities"]["ambient"],
            json!(["CAP_NET_BIND_SERVICE"])
        );
    }

    #[test]
    fn mounts_rlimits_tty_and_resources_reach_the_spec() {
        let cfg = ContainerConfig {
            id: "c1".into(),
            args: vec!["sh".into()],
            tty: true,
            no_new_privileges: true,
            mounts: vec![
                HostMount {
                    source: "/srv/data".into(),
                    destination: "/data".into(),
                    readonly: true,
                    propagation: MountPropagation::Private,
                },
                HostMount {
                    source: "/srv/live".into(),
                    destination: "/live".into(),
                    readonly: false,
                    propagation: MountPropagation::HostToContainer,
                },
            ],
            rlimits: vec![("RLIMIT_NOFILE".into(), 512, 1024)],
            resources: Resources {
                cpu_quota: Some(50_000),
                cpu_period: Some(100_000),
                pids_limit: Some(64),
                ..Default::default()
            },
            ..Default::default()
        };
        let spec = json_of(
            &super::spec(
                &cfg,
                "pod1",
                &[
                    "/run/vc/shared/c1/mounts/0".into(),
                    "/run/vc/shared/c1/mounts/1".into(),
                ],
            )
            .expect("spec"),
        );
        assert_eq!(spec["process"]["terminal"], true);
        assert_eq!(spec["process"]["noNewPrivileges"], true);
        assert_eq!(
            spec["process"]["rlimits"],
            json!([{ "type": "RLIMIT_NOFILE", "soft": 512, "hard": 1024 }])
        );
        let find = |dest: &str| {
            spec["mounts"]
                .as_array()
                .and_then(|m| m.iter().find(|m| m["destination"] == dest))
                .cloned()
                .expect("the bind mount")
        };
        assert_eq!(find("/data")["source"], "/run/vc/shared/c1/mounts/0");
        assert_eq!(find("/data")["options"], json!(["rbind", "rprivate", "ro"]));
        assert_eq!(find("/live")["options"], json!(["rbind", "rslave", "rw"]));
        assert_eq!(
            spec["linux"]["resources"],
            json!({ "cpu": { "quota": 50_000, "period": 100_000 }, "pids": { "limit": 64 } })
        );
        let bad = ContainerConfig {
            rlimits: vec![("RLIMIT_WISHES".into(), 1, 1)],
            ..cfg
        };
        assert!(spec_err(&bad).contains("RLIMIT_WISHES"));
    }

    fn spec_err(cfg: &ContainerConfig) -> String {
        super::spec(cfg, "pod", &[]).expect_err("refused").0
    }
}
