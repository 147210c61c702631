//! A CRI ContainerConfig, with its image's config, becomes podsandbox's
//! ContainerConfig: command and args, environment, working dir, user,
//! mounts, security context, resources. Pure functions, unit-tested.

use std::path::{Path, PathBuf};

use k8s_cri::v1 as cri;
use podsandbox::container::{ContainerConfig, Mount, Resources, Rootfs};

use crate::error::{CriError, Result};

/// What the image says (its OCI config), as far as a container needs it.
#[derive(Debug, Clone, Default)]
pub struct ImageDefaults {
    pub user: Option<String>,
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: Option<String>,
    /// The image's `/etc/passwd` and `/etc/group`, for user names.
    pub etc_passwd: Option<String>,
    pub etc_group: Option<String>,
}

/// The process to run, Docker's way: the container's command replaces the
/// image's entrypoint (and drops its cmd); its args replace the image's cmd.
pub fn process_args(config: &cri::ContainerConfig, image: &ImageDefaults) -> Result<Vec<String>> {
    let args = if !config.command.is_empty() {
        let mut a = config.command.clone();
        a.extend(config.args.iter().cloned());
        a
    } else {
        let mut a = image.entrypoint.clone();
        if config.args.is_empty() {
            a.extend(image.cmd.iter().cloned());
        } else {
            a.extend(config.args.iter().cloned());
        }
        a
    };
    if args.is_empty() {
        return Err(CriError::invalid(
            "config.command",
            "no command: neither the container nor its image gives one",
        ));
    }
    Ok(args)
}

/// The image's environment with the container's on top (same key: the
/// container's wins, in place).
pub fn environment(config: &cri::ContainerConfig, image: &ImageDefaults) -> Result<Vec<String>> {
    let mut env: Vec<String> = image.env.clone();
    for (i, kv) in config.envs.iter().enumerate() {
        if kv.key.is_empty() || kv.key.contains('=') || kv.key.contains('\0') {
            return Err(CriError::invalid(
                format!("config.envs[{i}].key"),
                format!("{:?} is not an environment variable name", kv.key),
            ));
        }
        let entry = format!("{}={}", kv.key, kv.value);
        let prefix = format!("{}=", kv.key);
        match env.iter_mut().find(|e| e.starts_with(&prefix)) {
            Some(slot) => *slot = entry,
            None => env.push(entry),
        }
    }
    Ok(env)
}

/// uid and gid: the security context's, else the image's user (numeric,
/// or a name looked up in the image's /etc/passwd and /etc/group).
pub fn user(
    sc: Option<&cri::LinuxContainerSecurityContext>,
    image: &ImageDefaults,
) -> Result<Option<(u32, u32)>> {
    let (passwd, group) = (image.etc_passwd.as_deref(), image.etc_group.as_deref());
    let uid_from = |v: i64, field: &str| {
        u32::try_from(v).map_err(|_| CriError::invalid(field, format!("{v} is not a valid ID")))
    };
    if let Some(sc) = sc {
        if let Some(uid) = &sc.run_as_user {
            let uid = uid_from(uid.value, "config.linux.security_context.run_as_user")?;
            let gid = match &sc.run_as_group {
                Some(g) => uid_from(g.value, "config.linux.security_context.run_as_group")?,
                None => primary_gid(passwd, uid).unwrap_or(0),
            };
            return Ok(Some((uid, gid)));
        }
        if !sc.run_as_username.is_empty() {
            let (uid, gid) = lookup_user(passwd, &sc.run_as_username).ok_or_else(|| {
                CriError::invalid(
                    "config.linux.security_context.run_as_username",
                    format!("{:?} is not in the image's /etc/passwd", sc.run_as_username),
                )
            })?;
            return Ok(Some((uid, gid)));
        }
    }
    let Some(spec) = image.user.as_deref().filter(|u| !u.is_empty()) else {
        return Ok(None);
    };
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let (uid, passwd_gid) = match u.parse::<u32>() {
        Ok(uid) => (uid, primary_gid(passwd, uid)),
        Err(_) => {
            let (uid, gid) = lookup_user(passwd, u).ok_or_else(|| {
                CriError::invalid(
                    "image user",
                    format!("user {u:?} of the image is not in its /etc/passwd"),
                )
            })?;
            (uid, Some(gid))
        }
    };
    let gid = match g {
        None => passwd_gid.unwrap_or(0),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup_group(group, g).ok_or_else(|| {
                CriError::invalid(
                    "image user",
                    format!("group {g:?} of the image is not in its /etc/group"),
                )
            })?,
        },
    };
    Ok(Some((uid, gid)))
}

fn lookup_user(passwd: Option<&str>, name: &str) -> Option<(u32, u32)> {
    passwd?.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

fn primary_gid(passwd: Option<&str>, uid: u32) -> Option<u32> {
    passwd?.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && f[2].parse::<u32>().ok() == Some(uid)).then(|| f[3].parse().ok())?
    })
}

fn lookup_group(group: Option<&str>, name: &str) -> Option<u32> {
    group?.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 3 && f[0] == name).then(|| f[2].parse().ok())?
    })
}

/// `log_directory` + `log_path`, the latter relative and without `..`.
pub fn log_path(log_directory: &str, log_path: &str) -> Result<Option<PathBuf>> {
    if log_path.is_empty() {
        return Ok(None);
    }
    if log_directory.is_empty() {
        return Err(CriError::invalid(
            "config.log_path",
            "is set but the pod has no log_directory",
        ));
    }
    let rel = Path::new(log_path);
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(CriError::invalid(
            "config.log_path",
            format!("{log_path:?} must be relative to the pod's log directory, without '..'"),
        ));
    }
    Ok(Some(Path::new(log_directory).join(rel)))
}

pub fn resources(r: Option<&cri::LinuxContainerResources>) -> Resources {
    let Some(r) = r else {
        return Resources::default();
    };
    let positive = |v: i64| (v > 0).then_some(v);
    Resources {
        memory_limit_bytes: positive(r.memory_limit_in_bytes),
        cpu_shares: (r.cpu_shares > 0).then_some(r.cpu_shares as u64),
        cpu_quota: positive(r.cpu_quota),
        cpu_period: (r.cpu_period > 0).then_some(r.cpu_period as u64),
        cpuset_cpus: (!r.cpuset_cpus.is_empty()).then(|| r.cpuset_cpus.clone()),
        pids_limit: None,
    }
}

/// The whole podsandbox config, the rootfs already prepared.
pub fn container_config(
    id: &str,
    config: &cri::ContainerConfig,
    image: &ImageDefaults,
    rootfs: Rootfs,
    log: Option<PathBuf>,
) -> Result<ContainerConfig> {
    if !config.devices.is_empty() {
        return Err(CriError::invalid(
            "config.devices",
            "host devices cannot be passed into a pod VM",
        ));
    }
    let linux = config.linux.as_ref();
    let sc = linux.and_then(|l| l.security_context.as_ref());
    let mut mounts = Vec::new();
    for (i, m) in config.mounts.iter().enumerate() {
        if m.host_path.is_empty() || !m.container_path.starts_with('/') {
            return Err(CriError::invalid(
                format!("config.mounts[{i}]"),
                "needs a host_path and an absolute container_path",
            ));
        }
        if m.image.as_ref().is_some_and(|i| !i.image.is_empty()) {
            return Err(CriError::invalid(
                format!("config.mounts[{i}].image"),
                "image volumes are not supported",
            ));
        }
        mounts.push(Mount {
            source: PathBuf::from(&m.host_path),
            destination: m.container_path.clone(),
            readonly: m.readonly || m.recursive_read_only,
        });
    }
    let seccomp = match sc.and_then(|s| s.seccomp.as_ref()) {
        None => None,
        Some(p) => match cri::security_profile::ProfileType::try_from(p.profile_type) {
            Ok(cri::security_profile::ProfileType::Unconfined) => None,
            Ok(cri::security_profile::ProfileType::RuntimeDefault) => {
                Some(runtime_default_seccomp())
            }
            _ => {
                return Err(CriError::invalid(
                    "config.linux.security_context.seccomp",
                    "Localhost profiles are not supported (use RuntimeDefault or Unconfined)",
                ))
            }
        },
    };
    let (mut cap_add, cap_drop) = sc
        .and_then(|s| s.capabilities.as_ref())
        .map(|c| (c.add_capabilities.clone(), c.drop_capabilities.clone()))
        .unwrap_or_default();
    if sc.is_some_and(|s| s.privileged) {
        // Privileged inside the VM: every capability of the guest, never the host's.
        cap_add = vec!["ALL".into()];
    }
    let share_pid = sc
        .and_then(|s| s.namespace_options.as_ref())
        .is_some_and(|n| n.pid == cri::NamespaceMode::Pod as i32);
    let cwd = if config.working_dir.is_empty() {
        image.working_dir.clone().filter(|w| !w.is_empty())
    } else {
        Some(config.working_dir.clone())
    };
    Ok(ContainerConfig {
        // The pod's IPC sysctls are added by CreateContainer.
        sysctls: Default::default(),
        id: id.into(),
        user: user(sc, image)?,
        rootfs,
        args: process_args(config, image)?,
        env: environment(config, image)?,
        cwd,
        readonly_rootfs: sc.is_some_and(|s| s.readonly_rootfs),
        log_path: log,
        seccomp,
        resources: resources(linux.and_then(|l| l.resources.as_ref())),
        tty: config.tty,
        stdin: config.stdin,
        mounts,
        share_pid_namespace: share_pid,
        cap_add,
        cap_drop,
        no_new_privileges: sc.is_some_and(|s| s.no_new_privs),
        rlimits: Vec::new(),
    })
}

/// RuntimeDefault: allow all but the calls that reach past a container
/// (kernel modules, kexec, reboot, handles, keyrings, bpf, perf, ...), the
/// spirit of Docker's default profile as a short deny list.
fn runtime_default_seccomp() -> serde_json::Value {
    let denied = [
        "kexec_load",
        "kexec_file_load",
        "init_module",
        "finit_module",
        "delete_module",
        "reboot",
        "open_by_handle_at",
        "name_to_handle_at",
        "add_key",
        "request_key",
        "keyctl",
        "bpf",
        "perf_event_open",
        "ptrace",
        "process_vm_readv",
        "process_vm_writev",
        "swapon",
        "swapoff",
        "acct",
        "lookup_dcookie",
        "userfaultfd",
        "quotactl",
        "mount",
        "umount2",
        "pivot_root",
        "unshare",
        "setns",
        "settimeofday",
        "clock_settime",
        "stime",
    ];
    serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{ "names": denied, "action": "SCMP_ACT_ERRNO", "errnoRet": 1 }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageDefaults {
        ImageDefaults {
            user: None,
            env: vec!["PATH=/bin".into(), "A=1".into()],
            entrypoint: vec!["/entry".into()],
            cmd: vec!["--serve".into()],
            working_dir: Some("/srv".into()),
            etc_passwd: None,
            etc_group: None,
        }
    }

    #[test]
    fn command_and_args_follow_docker() {
        let mut c = cri::ContainerConfig::default();
        assert_eq!(
            process_args(&c, &image()).expect("args"),
            ["/entry", "--serve"]
        );
        c.args = vec!["x".into()];
        assert_eq!(process_args(&c, &image()).expect("args"), ["/entry", "x"]);
        c.command = vec!["/bin/sh".into()];
        assert_eq!(process_args(&c, &image()).expect("args"), ["/bin/sh", "x"]);
        let err = process_args(&cri::ContainerConfig::default(), &ImageDefaults::default())
            .expect_err("nothing to run");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn container_env_overrides_the_image_in_place() {
        let c = cri::ContainerConfig {
            envs: vec![
                cri::KeyValue {
                    key: "A".into(),
                    value: "2".into(),
                },
                cri::KeyValue {
                    key: "B".into(),
                    value: "x=y".into(),
                },
            ],
            ..Default::default()
        };
        assert_eq!(
            environment(&c, &image()).expect("env"),
            ["PATH=/bin", "A=2", "B=x=y"]
        );
        let bad = cri::ContainerConfig {
            envs: vec![cri::KeyValue {
                key: "A=B".into(),
                value: String::new(),
            }],
            ..Default::default()
        };
        assert!(environment(&bad, &image())
            .expect_err("bad key")
            .to_string()
            .starts_with("config.envs[0].key"));
    }

    #[test]
    fn users_come_from_the_context_or_the_image() {
        let mut img = image();
        img.etc_passwd = Some("root:x:0:0::/:/bin/sh\nweb:x:33:34::/:/bin/sh\n".into());
        img.etc_group = Some("root:x:0:\nstaff:x:50:\n".into());
        assert_eq!(user(None, &img).expect("user"), None);
        img.user = Some("web".into());
        assert_eq!(user(None, &img).expect("user"), Some((33, 34)));
        img.user = Some("web:staff".into());
        assert_eq!(user(None, &img).expect("user"), Some((33, 50)));
        img.user = Some("1000".into());
        assert_eq!(user(None, &img).expect("user"), Some((1000, 0)));
        img.user = Some("nobody".into());
        assert!(user(None, &img).is_err());
        let sc = cri::LinuxContainerSecurityContext {
            run_as_user: Some(cri::Int64Value { value: 33 }),
            ..Default::default()
        };
        assert_eq!(user(Some(&sc), &img).expect("user"), Some((33, 34)));
    }

    #[test]
    fn log_paths_stay_in_the_log_directory() {
        assert_eq!(
            log_path("/var/log/pods/p", "c/0.log").expect("path"),
            Some(PathBuf::from("/var/log/pods/p/c/0.log"))
        );
        assert_eq!(log_path("/x", "").expect("none"), None);
        for bad in ["../x.log", "/etc/passwd", "a/../../b"] {
            assert!(log_path("/var/log/pods/p", bad).is_err(), "{bad}");
        }
        assert!(log_path("", "c.log").is_err());
    }

    #[test]
    fn devices_and_localhost_seccomp_are_refused() {
        let c = cri::ContainerConfig {
            command: vec!["/bin/true".into()],
            devices: vec![cri::Device {
                container_path: "/dev/kvm".into(),
                host_path: "/dev/kvm".into(),
                permissions: "rw".into(),
            }],
            ..Default::default()
        };
        let err = container_config("c", &c, &image(), Rootfs::Dir(PathBuf::from("/r")), None)
            .expect_err("devices");
        assert!(err.to_string().starts_with("config.devices"), "{err}");
    }
}
