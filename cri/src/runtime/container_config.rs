//! A CRI ContainerConfig, with its image's config, becomes podsandbox's
//! ContainerConfig: command and args, environment, working dir, user,
//! mounts, security context, resources. Pure functions, unit-tested.

use std::path::{Path, PathBuf};

use k8s_cri::v1 as cri;
use podsandbox::container::{ContainerConfig, Mount, MountPropagation, Resources, Rootfs};

use crate::{
    error::{CriError, Result},
    runtime::container_security::{security, SecurityPolicy},
};

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
    policy: &SecurityPolicy,
) -> Result<ContainerConfig> {
    if !config.devices.is_empty() {
        return Err(CriError::invalid(
            "config.devices",
            "host devices cannot be passed into a pod VM",
        ));
    }
    if !config.cdi_devices.is_empty() {
        return Err(CriError::invalid(
            "config.cdi_devices",
            "host devices cannot be passed into a pod VM",
        ));
    }
    let linux = config.linux.as_ref();
    let sec = security(
        linux.and_then(|l| l.security_context.as_ref()),
        image,
        policy,
    )?;
    let mounts = mounts(&config.mounts)?;
    let cwd = if config.working_dir.is_empty() {
        image.working_dir.clone().filter(|w| !w.is_empty())
    } else {
        Some(config.working_dir.clone())
    };
    Ok(ContainerConfig {
        // The pod's IPC sysctls are added by CreateContainer.
        sysctls: Default::default(),
        id: id.into(),
        user: sec.user,
        additional_gids: sec.additional_gids,
        rootfs,
        args: process_args(config, image)?,
        env: environment(config, image)?,
        cwd,
        readonly_rootfs: sec.readonly_rootfs,
        log_path: log,
        seccomp: sec.seccomp,
        resources: resources(linux.and_then(|l| l.resources.as_ref())),
        tty: config.tty,
        stdin: config.stdin,
        mounts,
        share_pid_namespace: sec.share_pid_namespace,
        share_ipc_namespace: sec.share_ipc_namespace,
        cap_add: sec.cap_add,
        cap_drop: sec.cap_drop,
        cap_ambient: sec.cap_ambient,
        masked_paths: sec.masked_paths,
        readonly_paths: sec.readonly_paths,
        privileged: sec.privileged,
        no_new_privileges: sec.no_new_privileges,
        rlimits: Vec::new(),
    })
}

/// hostPath mounts: private or host-to-container propagation; what a VM
/// cannot do (a mount made in the guest reaching the host, ID-mapped
/// mounts, image volumes) is refused naming the field.
fn mounts(list: &[cri::Mount]) -> Result<Vec<Mount>> {
    let mut mounts = Vec::new();
    for (i, m) in list.iter().enumerate() {
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
        if !m.uid_mappings.is_empty() || !m.gid_mappings.is_empty() {
            return Err(CriError::invalid(
                format!("config.mounts[{i}].uidMappings"),
                "ID-mapped mounts are not supported in a pod VM",
            ));
        }
        let propagation = match cri::MountPropagation::try_from(m.propagation) {
            Ok(cri::MountPropagation::PropagationPrivate) => MountPropagation::Private,
            Ok(cri::MountPropagation::PropagationHostToContainer) => {
                MountPropagation::HostToContainer
            }
            Ok(cri::MountPropagation::PropagationBidirectional) => {
                return Err(CriError::invalid(
                    format!("config.mounts[{i}].propagation"),
                    "BIDIRECTIONAL: a mount made inside a pod VM cannot reach the host (HOST_TO_CONTAINER works)",
                ))
            }
            Err(_) => {
                return Err(CriError::invalid(
                    format!("config.mounts[{i}].propagation"),
                    format!("{} is not a mount propagation", m.propagation),
                ))
            }
        };
        // selinux_relabel: the guest has no SELinux labels, so nothing
        // keeps the container from the volume: honoured as it stands.
        mounts.push(Mount {
            source: PathBuf::from(&m.host_path),
            destination: m.container_path.clone(),
            readonly: m.readonly || m.recursive_read_only,
            propagation,
        });
    }
    Ok(mounts)
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
    fn devices_and_bidirectional_mounts_are_refused() {
        let c = cri::ContainerConfig {
            command: vec!["/bin/true".into()],
            devices: vec![cri::Device {
                container_path: "/dev/kvm".into(),
                host_path: "/dev/kvm".into(),
                permissions: "rw".into(),
            }],
            ..Default::default()
        };
        let err = container_config(
            "c",
            &c,
            &image(),
            Rootfs::Dir(PathBuf::from("/r")),
            None,
            &SecurityPolicy::default(),
        )
        .expect_err("devices");
        assert!(err.to_string().starts_with("config.devices"), "{err}");
        let mount = |propagation: cri::MountPropagation| cri::Mount {
            container_path: "/data".into(),
            host_path: "/srv".into(),
            propagation: propagation as i32,
            ..Default::default()
        };
        let err = mounts(&[mount(cri::MountPropagation::PropagationBidirectional)])
            .expect_err("bidirectional");
        assert!(
            err.to_string().starts_with("config.mounts[0].propagation"),
            "{err}"
        );
        let ok = mounts(&[
            mount(cri::MountPropagation::PropagationPrivate),
            mount(cri::MountPropagation::PropagationHostToContainer),
        ])
        .expect("private and host-to-container");
        assert_eq!(ok[0].propagation, MountPropagation::Private);
        assert_eq!(ok[1].propagation, MountPropagation::HostToContainer);
    }
}
