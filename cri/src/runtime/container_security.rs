//! A container's Linux security context, field by field: each is applied
//! (in the OCI spec the guest runs) or refused with InvalidArgument naming
//! it — never dropped. containerd's behaviour where the CRI is silent.
//!
//! | field | here |
//! |---|---|
//! | `capabilities` (add, drop, ambient) | the process's sets; unknown names refused |
//! | `privileged` | every capability and device of the guest, writable `/sys`, nothing masked, no seccomp; only in a privileged pod |
//! | `namespace_options` | pid and ipc POD (the pod's, made in the guest on first use) or CONTAINER; network POD; NODE, TARGET and user namespaces refused; absent means POD, as in containerd |
//! | `selinux_options` | refused when set (the guest has no SELinux) |
//! | `run_as_user`, `run_as_group`, `run_as_username` | uid/gid; a group without a user is refused unless the image's user is numeric |
//! | `readonly_rootfs`, `no_new_privs` | as asked |
//! | `supplemental_groups` (+ policy) | additional gids: the primary gid, the image's `/etc/group` memberships (Merge) and these |
//! | `masked_paths`, `readonly_paths` | replace runc's defaults when given |
//! | `seccomp`, `seccomp_profile_path` | RuntimeDefault, Unconfined, Localhost (read from `security.seccomp_profile_dirs`) |
//! | `apparmor`, `apparmor_profile` | RuntimeDefault/Unconfined accepted (the guest has no AppArmor: the VM is the confinement); Localhost refused |

use std::path::PathBuf;

use k8s_cri::v1 as cri;
use podsandbox::oci::{Capability, LinuxSeccomp};

use crate::{
    error::{CriError, Result},
    runtime::{container_config::ImageDefaults, seccomp},
};

const SC: &str = "config.linux.security_context";

/// What the node and the pod allow a container.
#[derive(Debug, Clone, Default)]
pub struct SecurityPolicy {
    /// Where Localhost seccomp profiles may be read from.
    pub seccomp_profile_dirs: Vec<PathBuf>,
    /// The pod's own security context asks for privileged.
    pub pod_privileged: bool,
}

/// The security context, resolved.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Security {
    pub user: Option<(u32, u32)>,
    pub additional_gids: Vec<u32>,
    pub seccomp: Option<LinuxSeccomp>,
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    pub cap_ambient: Vec<String>,
    pub masked_paths: Option<Vec<String>>,
    pub readonly_paths: Option<Vec<String>>,
    pub privileged: bool,
    pub no_new_privileges: bool,
    pub readonly_rootfs: bool,
    pub share_pid_namespace: bool,
    pub share_ipc_namespace: bool,
}

fn field(name: &str) -> String {
    format!("{SC}.{name}")
}

pub fn security(
    sc: Option<&cri::LinuxContainerSecurityContext>,
    image: &ImageDefaults,
    policy: &SecurityPolicy,
) -> Result<Security> {
    let default = cri::LinuxContainerSecurityContext::default();
    let sc = sc.unwrap_or(&default);
    if sc.privileged && !policy.pod_privileged {
        return Err(CriError::invalid(
            field("privileged"),
            "a privileged container needs a privileged pod (config.linux.security_context.privileged of the pod sandbox)",
        ));
    }
    if let Some(se) = &sc.selinux_options {
        if !(se.user.is_empty()
            && se.role.is_empty()
            && se.r#type.is_empty()
            && se.level.is_empty())
        {
            return Err(CriError::invalid(
                field("selinux_options"),
                "the pod VM's guest has no SELinux: a label cannot be applied",
            ));
        }
    }
    let (share_pid_namespace, share_ipc_namespace) = namespaces(sc.namespace_options.as_ref())?;
    apparmor(sc)?;
    let (cap_add, cap_drop, cap_ambient) = sc
        .capabilities
        .as_ref()
        .map(|c| {
            (
                c.add_capabilities.clone(),
                c.drop_capabilities.clone(),
                c.add_ambient_capabilities.clone(),
            )
        })
        .unwrap_or_default();
    for (name, list) in [
        ("capabilities.add_capabilities", &cap_add),
        ("capabilities.drop_capabilities", &cap_drop),
        ("capabilities.add_ambient_capabilities", &cap_ambient),
    ] {
        for (i, c) in list.iter().enumerate() {
            if c.eq_ignore_ascii_case("ALL") && !name.ends_with("ambient_capabilities") {
                continue;
            }
            podsandbox::oci::parse_capability(c)
                .map_err(|e| CriError::invalid(format!("{}[{i}]", field(name)), e.to_string()))?;
        }
    }
    let caps: Vec<Capability> = if sc.privileged {
        podsandbox::oci::ALL_CAPS.to_vec()
    } else {
        podsandbox::oci::capabilities(&cap_add, &cap_drop)
            .map_err(|e| CriError::invalid(field("capabilities"), e.to_string()))?
    };
    let seccomp = if sc.privileged {
        // As runc and containerd: a privileged container is unconfined.
        None
    } else {
        seccomp_profile(sc, policy, &caps)?
    };
    let (user, additional_gids) = user_and_groups(sc, image)?;
    let paths = |v: &Vec<String>, name: &str| -> Result<Option<Vec<String>>> {
        if v.is_empty() {
            return Ok(None);
        }
        for (i, p) in v.iter().enumerate() {
            if !p.starts_with('/') || p.split('/').any(|c| c == "..") {
                return Err(CriError::invalid(
                    format!("{}[{i}]", field(name)),
                    format!("{p:?} is not an absolute path without '..'"),
                ));
            }
        }
        Ok(Some(v.clone()))
    };
    Ok(Security {
        user,
        additional_gids,
        seccomp,
        cap_add,
        cap_drop,
        cap_ambient,
        masked_paths: paths(&sc.masked_paths, "masked_paths")?,
        readonly_paths: paths(&sc.readonly_paths, "readonly_paths")?,
        privileged: sc.privileged,
        no_new_privileges: sc.no_new_privs,
        readonly_rootfs: sc.readonly_rootfs,
        share_pid_namespace,
        share_ipc_namespace,
    })
}

/// Namespace modes a container in a pod VM can have; whether it shares
/// the pod's PID and IPC namespaces. None given: every mode is POD (the
/// proto's zero), as containerd reads it.
fn namespaces(ns: Option<&cri::NamespaceOption>) -> Result<(bool, bool)> {
    let default = cri::NamespaceOption::default();
    let ns = ns.unwrap_or(&default);
    let mode = |m: i32| cri::NamespaceMode::try_from(m).ok();
    use cri::NamespaceMode::{Container, Node, Pod, Target};
    match mode(ns.network) {
        Some(Pod) => {}
        _ => return Err(CriError::invalid(
            field("namespace_options.network"),
            "a container shares its pod VM's network (POD): the VM is the pod's network namespace",
        )),
    }
    let share_ipc = match mode(ns.ipc) {
        Some(Pod) => true,
        Some(Container) => false,
        Some(Node) => {
            return Err(CriError::invalid(
                field("namespace_options.ipc"),
                "NODE: a pod VM cannot share the host's IPC namespace",
            ))
        }
        _ => {
            return Err(CriError::invalid(
                field("namespace_options.ipc"),
                "is not a mode of an IPC namespace",
            ))
        }
    };
    if ns
        .userns_options
        .as_ref()
        .is_some_and(|u| u.mode != Node as i32)
    {
        return Err(CriError::invalid(
            field("namespace_options.userns_options"),
            "user namespaces are not supported in a pod VM (the VM is the isolation boundary)",
        ));
    }
    match mode(ns.pid) {
        Some(Pod) => Ok((true, share_ipc)),
        Some(Container) => Ok((false, share_ipc)),
        Some(Node) => Err(CriError::invalid(
            field("namespace_options.pid"),
            "NODE: a pod VM cannot share the host's PID namespace",
        )),
        Some(Target) => Err(CriError::invalid(
            field("namespace_options.target_id"),
            format!(
                "TARGET ({:?}): joining another container's PID namespace is not supported",
                ns.target_id
            ),
        )),
        None => Err(CriError::invalid(
            field("namespace_options.pid"),
            "is not a mode of a PID namespace",
        )),
    }
}

// The deprecated `apparmor_profile` is still what older kubelets send.
#[allow(deprecated)]
fn apparmor(sc: &cri::LinuxContainerSecurityContext) -> Result<()> {
    use cri::security_profile::ProfileType;
    match &sc.apparmor {
        Some(p) => match ProfileType::try_from(p.profile_type) {
            Ok(ProfileType::RuntimeDefault | ProfileType::Unconfined) => Ok(()),
            _ => Err(CriError::invalid(
                field("apparmor"),
                "the pod VM's guest has no AppArmor: a Localhost profile cannot be loaded",
            )),
        },
        None => match sc.apparmor_profile.as_str() {
            "" | "runtime/default" | "unconfined" => Ok(()),
            other => Err(CriError::invalid(
                field("apparmor_profile"),
                format!("{other:?}: the pod VM's guest has no AppArmor (runtime/default and unconfined only)"),
            )),
        },
    }
}

// The deprecated `seccomp_profile_path` is still what older kubelets send.
#[allow(deprecated)]
fn seccomp_profile(
    sc: &cri::LinuxContainerSecurityContext,
    policy: &SecurityPolicy,
    caps: &[Capability],
) -> Result<Option<LinuxSeccomp>> {
    use cri::security_profile::ProfileType;
    let default = || {
        seccomp::runtime_default()
            .map(Some)
            .map_err(CriError::Internal)
    };
    let localhost = |path: &str, name: &str| {
        seccomp::load_localhost(path, &policy.seccomp_profile_dirs, caps)
            .map(Some)
            .map_err(|e| CriError::invalid(field(name), e))
    };
    match &sc.seccomp {
        Some(p) => match ProfileType::try_from(p.profile_type) {
            Ok(ProfileType::RuntimeDefault) => default(),
            Ok(ProfileType::Unconfined) => Ok(None),
            Ok(ProfileType::Localhost) => localhost(&p.localhost_ref, "seccomp.localhost_ref"),
            Err(_) => Err(CriError::invalid(
                field("seccomp.profile_type"),
                format!("{} is not a profile type", p.profile_type),
            )),
        },
        None => match sc.seccomp_profile_path.as_str() {
            "" | "unconfined" => Ok(None),
            "runtime/default" | "docker/default" => default(),
            path => match path.strip_prefix("localhost/") {
                Some(file) => localhost(file, "seccomp_profile_path"),
                None => Err(CriError::invalid(
                    field("seccomp_profile_path"),
                    format!("{path:?} is not runtime/default, docker/default, unconfined or localhost/<path>"),
                )),
            },
        },
    }
}

/// uid and gid (the security context's, else the image's user: numeric or
/// a name in the image's /etc/passwd and /etc/group) and the additional
/// gids: the primary one, the image's memberships of the user (unless the
/// policy is Strict) and `supplemental_groups`, without repeats.
fn user_and_groups(
    sc: &cri::LinuxContainerSecurityContext,
    image: &ImageDefaults,
) -> Result<UserAndGroups> {
    let Some((uid, gid)) = user(sc, image)? else {
        if !sc.supplemental_groups.is_empty() {
            // Root, from the image's default: still gets the groups.
            let mut gids = vec![0];
            add_groups(&mut gids, sc)?;
            return Ok((Some((0, 0)), gids));
        }
        return Ok((None, Vec::new()));
    };
    let mut gids = vec![gid];
    let strict = sc.supplemental_groups_policy == cri::SupplementalGroupsPolicy::Strict as i32;
    if !strict {
        let name = if sc.run_as_username.is_empty() {
            user_name(image.etc_passwd.as_deref(), uid)
        } else {
            Some(sc.run_as_username.clone())
        };
        if let Some(name) = name {
            for g in member_gids(image.etc_group.as_deref(), &name) {
                if !gids.contains(&g) {
                    gids.push(g);
                }
            }
        }
    }
    add_groups(&mut gids, sc)?;
    Ok((Some((uid, gid)), gids))
}

/// uid and gid (none: the image's default, root), and the additional gids.
type UserAndGroups = (Option<(u32, u32)>, Vec<u32>);

fn add_groups(gids: &mut Vec<u32>, sc: &cri::LinuxContainerSecurityContext) -> Result<()> {
    for (i, g) in sc.supplemental_groups.iter().enumerate() {
        let g = u32::try_from(*g).map_err(|_| {
            CriError::invalid(
                format!("{}[{i}]", field("supplemental_groups")),
                format!("{g} is not a valid group ID"),
            )
        })?;
        if !gids.contains(&g) {
            gids.push(g);
        }
    }
    Ok(())
}

/// uid and gid: the security context's, else the image's user (numeric,
/// or a name looked up in the image's /etc/passwd and /etc/group).
pub fn user(
    sc: &cri::LinuxContainerSecurityContext,
    image: &ImageDefaults,
) -> Result<Option<(u32, u32)>> {
    let (passwd, group) = (image.etc_passwd.as_deref(), image.etc_group.as_deref());
    let id = |v: i64, name: &str| {
        u32::try_from(v)
            .map_err(|_| CriError::invalid(field(name), format!("{v} is not a valid ID")))
    };
    let run_as_group = sc
        .run_as_group
        .as_ref()
        .map(|g| id(g.value, "run_as_group"))
        .transpose()?;
    if let Some(uid) = &sc.run_as_user {
        let uid = id(uid.value, "run_as_user")?;
        let gid = run_as_group.unwrap_or_else(|| primary_gid(passwd, uid).unwrap_or(0));
        return Ok(Some((uid, gid)));
    }
    if !sc.run_as_username.is_empty() {
        let (uid, gid) = lookup_user(passwd, &sc.run_as_username).ok_or_else(|| {
            CriError::invalid(
                field("run_as_username"),
                format!("{:?} is not in the image's /etc/passwd", sc.run_as_username),
            )
        })?;
        return Ok(Some((uid, run_as_group.unwrap_or(gid))));
    }
    let image_user = image.user.as_deref().filter(|u| !u.is_empty());
    if let Some(gid) = run_as_group {
        // A group for a user nobody named: only a numeric image user is one.
        let numeric = image_user
            .map(|u| u.split_once(':').map_or(u, |(u, _)| u))
            .and_then(|u| u.parse::<u32>().ok());
        return match numeric {
            Some(uid) => Ok(Some((uid, gid))),
            None => Err(CriError::invalid(
                field("run_as_group"),
                "is set without run_as_user or run_as_username (and the image's user is not numeric)",
            )),
        };
    }
    let Some(spec) = image_user else {
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

fn fields(line: &str) -> Vec<&str> {
    line.split(':').collect()
}

fn lookup_user(passwd: Option<&str>, name: &str) -> Option<(u32, u32)> {
    passwd?.lines().find_map(|l| {
        let f = fields(l);
        (f.len() >= 4 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

fn user_name(passwd: Option<&str>, uid: u32) -> Option<String> {
    passwd?.lines().find_map(|l| {
        let f = fields(l);
        (f.len() >= 4 && f[2].parse::<u32>().ok() == Some(uid)).then(|| f[0].to_string())
    })
}

fn primary_gid(passwd: Option<&str>, uid: u32) -> Option<u32> {
    passwd?.lines().find_map(|l| {
        let f = fields(l);
        (f.len() >= 4 && f[2].parse::<u32>().ok() == Some(uid)).then(|| f[3].parse().ok())?
    })
}

fn lookup_group(group: Option<&str>, name: &str) -> Option<u32> {
    group?.lines().find_map(|l| {
        let f = fields(l);
        (f.len() >= 3 && f[0] == name).then(|| f[2].parse().ok())?
    })
}

/// The gids of the groups whose member list names `user`.
fn member_gids(group: Option<&str>, user: &str) -> Vec<u32> {
    let Some(group) = group else {
        return Vec::new();
    };
    group
        .lines()
        .filter_map(|l| {
            let f = fields(l);
            (f.len() >= 4 && f[3].split(',').any(|m| m.trim() == user))
                .then(|| f[2].parse().ok())?
        })
        .collect()
}

#[cfg(test)]
#[allow(deprecated)]
mod tests {
    use super::*;

    fn image() -> ImageDefaults {
        ImageDefaults {
            etc_passwd: Some("root:x:0:0::/:/bin/sh\nweb:x:33:34::/:/bin/sh\n".into()),
            etc_group: Some("root:x:0:\nwww:x:34:\nstaff:x:50:web,other\nadm:x:4:web\n".into()),
            ..Default::default()
        }
    }

    fn policy() -> SecurityPolicy {
        SecurityPolicy::default()
    }

    fn err_field(r: Result<Security>) -> String {
        let e = r.expect_err("refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        e.to_string()
    }

    #[test]
    fn users_come_from_the_context_or_the_image() {
        let mut img = image();
        let none = cri::LinuxContainerSecurityContext::default();
        assert_eq!(user(&none, &img).expect("user"), None);
        img.user = Some("web".into());
        assert_eq!(user(&none, &img).expect("user"), Some((33, 34)));
        img.user = Some("web:staff".into());
        assert_eq!(user(&none, &img).expect("user"), Some((33, 50)));
        img.user = Some("1000".into());
        assert_eq!(user(&none, &img).expect("user"), Some((1000, 0)));
        img.user = Some("nobody".into());
        assert!(user(&none, &img).is_err());
        let sc = cri::LinuxContainerSecurityContext {
            run_as_user: Some(cri::Int64Value { value: 33 }),
            ..Default::default()
        };
        assert_eq!(user(&sc, &img).expect("user"), Some((33, 34)));
        let named = cri::LinuxContainerSecurityContext {
            run_as_username: "web".into(),
            run_as_group: Some(cri::Int64Value { value: 7 }),
            ..Default::default()
        };
        assert_eq!(user(&named, &img).expect("user"), Some((33, 7)));
    }

    #[test]
    fn a_group_without_a_user_is_refused_unless_the_image_user_is_numeric() {
        let sc = cri::LinuxContainerSecurityContext {
            run_as_group: Some(cri::Int64Value { value: 7 }),
            ..Default::default()
        };
        let e = err_field(security(Some(&sc), &image(), &policy()));
        assert!(
            e.starts_with("config.linux.security_context.run_as_group"),
            "{e}"
        );
        let mut img = image();
        img.user = Some("web".into());
        assert!(security(Some(&sc), &img, &policy()).is_err());
        img.user = Some("1000".into());
        let s = security(Some(&sc), &img, &policy()).expect("numeric image user");
        assert_eq!(s.user, Some((1000, 7)));
    }

    #[test]
    fn supplemental_groups_merge_with_the_image_memberships() {
        let sc = cri::LinuxContainerSecurityContext {
            run_as_user: Some(cri::Int64Value { value: 33 }),
            supplemental_groups: vec![1234, 50],
            ..Default::default()
        };
        let s = security(Some(&sc), &image(), &policy()).expect("merge");
        assert_eq!(s.additional_gids, [34, 50, 4, 1234]);
        let strict = cri::LinuxContainerSecurityContext {
            supplemental_groups_policy: cri::SupplementalGroupsPolicy::Strict as i32,
            ..sc.clone()
        };
        let s = security(Some(&strict), &image(), &policy()).expect("strict");
        assert_eq!(s.additional_gids, [34, 1234, 50]);
        let root = cri::LinuxContainerSecurityContext {
            supplemental_groups: vec![5],
            ..Default::default()
        };
        let s = security(Some(&root), &image(), &policy()).expect("root");
        assert_eq!((s.user, s.additional_gids), (Some((0, 0)), vec![0, 5]));
        let bad = cri::LinuxContainerSecurityContext {
            supplemental_groups: vec![-1],
            ..Default::default()
        };
        assert!(err_field(security(Some(&bad), &image(), &policy()))
            .starts_with("config.linux.security_context.supplemental_groups[0]"));
    }

    #[test]
    fn seccomp_forms() {
        use k8s_cri::v1::security_profile::ProfileType;
        let with = |profile: Option<cri::SecurityProfile>, path: &str| {
            security(
                Some(&cri::LinuxContainerSecurityContext {
                    seccomp: profile,
                    seccomp_profile_path: path.into(),
                    ..Default::default()
                }),
                &image(),
                &policy(),
            )
        };
        let p = |t: ProfileType| {
            Some(cri::SecurityProfile {
                profile_type: t as i32,
                localhost_ref: String::new(),
            })
        };
        assert!(with(p(ProfileType::RuntimeDefault), "")
            .expect("rd")
            .seccomp
            .is_some());
        assert!(with(p(ProfileType::Unconfined), "")
            .expect("u")
            .seccomp
            .is_none());
        assert!(with(None, "").expect("none").seccomp.is_none());
        assert!(with(None, "unconfined").expect("u").seccomp.is_none());
        assert!(with(None, "runtime/default").expect("rd").seccomp.is_some());
        assert!(with(None, "docker/default").expect("dd").seccomp.is_some());
        assert!(err_field(with(None, "sometimes")).contains("seccomp_profile_path"));
        // Localhost outside the allowed dirs (none configured here).
        let e = err_field(with(
            Some(cri::SecurityProfile {
                profile_type: ProfileType::Localhost as i32,
                localhost_ref: "/etc/passwd".into(),
            }),
            "",
        ));
        assert!(
            e.starts_with("config.linux.security_context.seccomp.localhost_ref"),
            "{e}"
        );
        assert!(!e.contains("root:x"), "never quotes the file: {e}");
        assert!(err_field(with(None, "localhost//etc/passwd")).contains("seccomp_profile_path"));
    }

    #[test]
    fn privileged_needs_a_privileged_pod_and_is_unconfined() {
        let sc = cri::LinuxContainerSecurityContext {
            privileged: true,
            seccomp: Some(cri::SecurityProfile::default()),
            ..Default::default()
        };
        assert!(err_field(security(Some(&sc), &image(), &policy()))
            .starts_with("config.linux.security_context.privileged"));
        let pod = SecurityPolicy {
            pod_privileged: true,
            ..policy()
        };
        let s = security(Some(&sc), &image(), &pod).expect("privileged pod");
        assert!(s.privileged);
        assert!(s.seccomp.is_none());
    }

    #[test]
    fn what_a_vm_cannot_honour_is_refused_by_field() {
        let cases: Vec<(cri::LinuxContainerSecurityContext, &str)> = vec![
            (
                cri::LinuxContainerSecurityContext {
                    selinux_options: Some(cri::SeLinuxOption {
                        r#type: "spc_t".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "selinux_options",
            ),
            (
                cri::LinuxContainerSecurityContext {
                    apparmor_profile: "localhost/mine".into(),
                    ..Default::default()
                },
                "apparmor_profile",
            ),
            (
                cri::LinuxContainerSecurityContext {
                    apparmor: Some(cri::SecurityProfile {
                        profile_type: cri::security_profile::ProfileType::Localhost as i32,
                        localhost_ref: "mine".into(),
                    }),
                    ..Default::default()
                },
                "apparmor",
            ),
            (
                cri::LinuxContainerSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        pid: cri::NamespaceMode::Target as i32,
                        target_id: "abc".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "namespace_options.target_id",
            ),
            (
                cri::LinuxContainerSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Node as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "namespace_options.network",
            ),
            (
                cri::LinuxContainerSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        userns_options: Some(cri::UserNamespace {
                            mode: cri::NamespaceMode::Pod as i32,
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "namespace_options.userns_options",
            ),
            (
                cri::LinuxContainerSecurityContext {
                    capabilities: Some(cri::Capability {
                        add_capabilities: vec!["CAP_FLY".into()],
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "capabilities.add_capabilities[0]",
            ),
            (
                cri::LinuxContainerSecurityContext {
                    masked_paths: vec!["relative".into()],
                    ..Default::default()
                },
                "masked_paths[0]",
            ),
        ];
        for (sc, name) in cases {
            let e = err_field(security(Some(&sc), &image(), &policy()));
            assert!(
                e.starts_with(&format!("config.linux.security_context.{name}")),
                "{name}: {e}"
            );
        }
        let fine = cri::LinuxContainerSecurityContext {
            apparmor: Some(cri::SecurityProfile {
                profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
                localhost_ref: String::new(),
            }),
            masked_paths: vec!["/proc/kcore".into()],
            capabilities: Some(cri::Capability {
                add_capabilities: vec!["NET_ADMIN".into()],
                drop_capabilities: vec!["ALL".into()],
                add_ambient_capabilities: vec!["NET_BIND_SERVICE".into()],
            }),
            namespace_options: Some(cri::NamespaceOption {
                pid: cri::NamespaceMode::Pod as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        let s = security(Some(&fine), &image(), &policy()).expect("fine");
        assert!(s.share_pid_namespace && s.share_ipc_namespace);
        let own = cri::LinuxContainerSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                pid: cri::NamespaceMode::Container as i32,
                ipc: cri::NamespaceMode::Container as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        let s = security(Some(&own), &image(), &policy()).expect("own");
        assert!(!s.share_pid_namespace && !s.share_ipc_namespace);
        let s = security(None, &image(), &policy()).expect("none given");
        assert!(
            s.share_pid_namespace && s.share_ipc_namespace,
            "POD, as containerd"
        );
        let s = security(Some(&fine), &image(), &policy()).expect("fine");
        assert_eq!(s.masked_paths, Some(vec!["/proc/kcore".to_string()]));
        assert_eq!(s.cap_ambient, ["NET_BIND_SERVICE"]);
    }
}
