//! Seccomp profiles of a container: RuntimeDefault (vcrid's own), and
//! Localhost ones read from the node, in the OCI format or Docker's (the
//! format kubelet's and containerd's users write: `archMap`, per-rule
//! `includes`/`excludes` by capability, architecture and kernel version),
//! turned into one typed OCI `linux.seccomp` for the guest.

use std::path::{Path, PathBuf};

use podsandbox::oci::{Capability, LinuxSeccomp, LinuxSeccompAction};
use serde::Deserialize;

/// The largest profile read (Docker's default is ~20 KiB).
const MAX_PROFILE_BYTES: u64 = 1 << 20;

/// The guest's architecture as Docker profiles name it in `arches`.
const GUEST_ARCHES: &[&str] = &["amd64", "x86_64"];

/// The guest kernel's version, for `minKernel` conditions.
const GUEST_KERNEL: (u32, u32) = (6, 1);

/// RuntimeDefault: allow all but the calls that reach past a container
/// (kernel modules, kexec, reboot, handles, keyrings, bpf, perf, ...), the
/// spirit of Docker's default profile as a short deny list.
pub fn runtime_default() -> Result<LinuxSeccomp, String> {
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
    serde_json::from_value(serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{ "names": denied, "action": "SCMP_ACT_ERRNO", "errnoRet": 1 }],
    }))
    .map_err(|e| format!("the RuntimeDefault profile: {e}"))
}

/// Reads the profile at `path`, which must resolve beneath one of `dirs`,
/// for a container with capabilities `caps`. `Err` says why it cannot be
/// used (never quoting the file: it is the node's).
pub fn load_localhost(
    path: &str,
    dirs: &[PathBuf],
    caps: &[Capability],
) -> Result<LinuxSeccomp, String> {
    let asked = Path::new(path);
    if !asked.is_absolute() {
        return Err(format!("{path:?} is not an absolute path"));
    }
    let resolved = std::fs::canonicalize(asked).map_err(|e| format!("{path:?}: {e}"))?;
    let allowed = dirs.iter().any(|d| {
        std::fs::canonicalize(d)
            .map(|d| resolved.starts_with(&d) && resolved != d)
            .unwrap_or(false)
    });
    if !allowed {
        return Err(format!(
            "{path:?} is not beneath a directory vcrid reads profiles from (security.seccomp_profile_dirs: {})",
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let file = std::fs::File::open(&resolved).map_err(|e| format!("{path:?}: {e}"))?;
    let mut text = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(file, MAX_PROFILE_BYTES + 1),
        &mut text,
    )
    .map_err(|e| format!("{path:?}: {e}"))?;
    if text.len() as u64 > MAX_PROFILE_BYTES {
        return Err(format!("{path:?} is larger than {MAX_PROFILE_BYTES} bytes"));
    }
    parse(&text, caps).map_err(|e| format!("{path:?}: {e}"))
}

/// A profile's text, OCI or Docker format, for a container with `caps`.
pub fn parse(text: &[u8], caps: &[Capability]) -> Result<LinuxSeccomp, String> {
    let profile: Profile =
        serde_json::from_slice(text).map_err(|e| format!("not a seccomp profile: {e}"))?;
    profile.into_oci(caps)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Profile {
    default_action: LinuxSeccompAction,
    #[serde(default)]
    default_errno_ret: Option<u32>,
    #[serde(default)]
    architectures: Vec<serde_json::Value>,
    #[serde(default)]
    arch_map: Vec<ArchMap>,
    #[serde(default)]
    flags: Vec<serde_json::Value>,
    #[serde(default)]
    listener_path: Option<String>,
    #[serde(default)]
    listener_metadata: Option<String>,
    #[serde(default)]
    syscalls: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ArchMap {
    architecture: String,
    #[serde(default)]
    sub_architectures: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Rule {
    #[serde(default)]
    names: Vec<String>,
    #[serde(default)]
    name: Option<String>,
    action: LinuxSeccompAction,
    #[serde(default)]
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Vec<serde_json::Value>,
    #[serde(default)]
    includes: Condition,
    #[serde(default)]
    excludes: Condition,
    #[serde(default, rename = "comment")]
    _comment: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Condition {
    #[serde(default)]
    caps: Vec<String>,
    #[serde(default)]
    arches: Vec<String>,
    #[serde(default)]
    min_kernel: Option<String>,
}

fn has_cap(caps: &[Capability], name: &str) -> Result<bool, String> {
    let cap = podsandbox::oci::parse_capability(name).map_err(|e| e.to_string())?;
    Ok(caps.contains(&cap))
}

fn kernel_at_least(version: &str) -> Result<bool, String> {
    let mut parts = version.split('.').map(str::parse::<u32>);
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => Ok(GUEST_KERNEL >= (major, minor)),
        (Some(Ok(major)), None) => Ok(GUEST_KERNEL.0 >= major),
        _ => Err(format!("minKernel {version:?} is not a kernel version")),
    }
}

impl Rule {
    /// Whether the rule applies to this container (Docker's semantics:
    /// every `includes` holds, no `excludes` does).
    fn applies(&self, caps: &[Capability]) -> Result<bool, String> {
        let arch = |a: &String| GUEST_ARCHES.contains(&a.as_str());
        let inc = &self.includes;
        if !inc.arches.is_empty() && !inc.arches.iter().any(arch) {
            return Ok(false);
        }
        for c in &inc.caps {
            if !has_cap(caps, c)? {
                return Ok(false);
            }
        }
        if let Some(v) = &inc.min_kernel {
            if !kernel_at_least(v)? {
                return Ok(false);
            }
        }
        let exc = &self.excludes;
        if exc.arches.iter().any(arch) {
            return Ok(false);
        }
        for c in &exc.caps {
            if has_cap(caps, c)? {
                return Ok(false);
            }
        }
        if let Some(v) = &exc.min_kernel {
            if kernel_at_least(v)? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

impl Profile {
    fn into_oci(self, caps: &[Capability]) -> Result<LinuxSeccomp, String> {
        if self.listener_path.is_some() || self.listener_metadata.is_some() {
            return Err("listenerPath: seccomp notify agents are not supported in a pod VM".into());
        }
        let notify = |a: LinuxSeccompAction| a == LinuxSeccompAction::ScmpActNotify;
        if notify(self.default_action) || self.syscalls.iter().any(|r| notify(r.action)) {
            return Err("SCMP_ACT_NOTIFY needs a seccomp agent, which a pod VM has not".into());
        }
        let mut architectures = self.architectures;
        if !self.arch_map.is_empty() {
            architectures.clear();
            for m in &self.arch_map {
                if m.architecture == "SCMP_ARCH_X86_64" {
                    architectures.push(serde_json::Value::String(m.architecture.clone()));
                    architectures.extend(
                        m.sub_architectures
                            .iter()
                            .map(|a| serde_json::Value::String(a.clone())),
                    );
                }
            }
        }
        let mut syscalls = Vec::new();
        for (i, rule) in self.syscalls.iter().enumerate() {
            if !rule
                .applies(caps)
                .map_err(|e| format!("syscalls[{i}]: {e}"))?
            {
                continue;
            }
            let mut names = rule.names.clone();
            names.extend(rule.name.iter().cloned());
            if names.is_empty() {
                return Err(format!("syscalls[{i}] names no system call"));
            }
            let mut entry = serde_json::json!({ "names": names, "action": rule.action });
            if let Some(e) = rule.errno_ret {
                entry["errnoRet"] = e.into();
            }
            if !rule.args.is_empty() {
                entry["args"] = rule.args.clone().into();
            }
            syscalls.push(entry);
        }
        let mut oci = serde_json::json!({ "defaultAction": self.default_action });
        if let Some(e) = self.default_errno_ret {
            oci["defaultErrnoRet"] = e.into();
        }
        if !architectures.is_empty() {
            oci["architectures"] = architectures.into();
        }
        if !self.flags.is_empty() {
            oci["flags"] = self.flags.into();
        }
        if !syscalls.is_empty() {
            oci["syscalls"] = syscalls.into();
        }
        serde_json::from_value(oci).map_err(|e| format!("not a valid OCI seccomp profile: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(p: &LinuxSeccomp) -> serde_json::Value {
        serde_json::to_value(p).expect("serializes")
    }

    #[test]
    fn oci_profiles_pass_through() {
        let p = parse(
            br#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64"],
                 "syscalls":[{"names":["sethostname"],"action":"SCMP_ACT_ERRNO","errnoRet":13}]}"#,
            &[],
        )
        .expect("profile");
        let j = json(&p);
        assert_eq!(j["defaultAction"], "SCMP_ACT_ALLOW");
        assert_eq!(j["syscalls"][0]["names"][0], "sethostname");
        assert_eq!(j["syscalls"][0]["errnoRet"], 13);
    }

    #[test]
    fn docker_profiles_resolve_arch_map_and_conditions() {
        let p = parse(
            br#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":1,
                 "archMap":[{"architecture":"SCMP_ARCH_X86_64","subArchitectures":["SCMP_ARCH_X86","SCMP_ARCH_X32"]},
                            {"architecture":"SCMP_ARCH_AARCH64","subArchitectures":["SCMP_ARCH_ARM"]}],
                 "syscalls":[
                   {"names":["read","write"],"action":"SCMP_ACT_ALLOW","comment":"always"},
                   {"names":["mount"],"action":"SCMP_ACT_ALLOW","includes":{"caps":["CAP_SYS_ADMIN"]}},
                   {"names":["ptrace"],"action":"SCMP_ACT_ALLOW","includes":{"minKernel":"4.8"}},
                   {"names":["newer"],"action":"SCMP_ACT_ALLOW","includes":{"minKernel":"9.0"}},
                   {"names":["arm_only"],"action":"SCMP_ACT_ALLOW","includes":{"arches":["arm64"]}},
                   {"names":["chown"],"action":"SCMP_ACT_ALLOW","excludes":{"caps":["CAP_CHOWN"]}}
                 ]}"#,
            &[Capability::Chown],
        )
        .expect("profile");
        let j = json(&p);
        assert_eq!(
            j["architectures"],
            serde_json::json!(["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"])
        );
        let names: Vec<&str> = j["syscalls"]
            .as_array()
            .expect("rules")
            .iter()
            .filter_map(|r| r["names"][0].as_str())
            .collect();
        assert_eq!(names, ["read", "ptrace"]);
        let admin = parse(
            br#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["mount"],"action":"SCMP_ACT_ALLOW","includes":{"caps":["CAP_SYS_ADMIN"]}}]}"#,
            &[Capability::SysAdmin],
        )
        .expect("profile");
        assert_eq!(json(&admin)["syscalls"][0]["names"][0], "mount");
    }

    #[test]
    fn what_cannot_be_honoured_is_refused() {
        for bad in [
            &br#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#[..],
            br#"{"defaultAction":"SCMP_ACT_ALLOW","listenerPath":"/run/agent.sock"}"#,
            br#"{"defaultAction":"SCMP_ACT_ALLOW","unknownField":1}"#,
            br#"{"defaultAction":"SCMP_ACT_SOMETIMES"}"#,
            br#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"action":"SCMP_ACT_ERRNO"}]}"#,
            br#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["x"],"action":"SCMP_ACT_ERRNO","includes":{"caps":["CAP_FLY"]}}]}"#,
            b"not json",
        ] {
            assert!(parse(bad, &[]).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn localhost_profiles_come_only_from_the_configured_dirs() {
        let dir = tempfile::tempdir().expect("tmp");
        let allowed = dir.path().join("seccomp");
        std::fs::create_dir_all(&allowed).expect("mkdir");
        let good = allowed.join("p.json");
        std::fs::write(&good, br#"{"defaultAction":"SCMP_ACT_ALLOW"}"#).expect("write");
        let outside = dir.path().join("elsewhere.json");
        std::fs::write(&outside, br#"{"defaultAction":"SCMP_ACT_ALLOW"}"#).expect("write");
        let escape = allowed.join("link.json");
        std::os::unix::fs::symlink(&outside, &escape).expect("symlink");
        let dirs = [allowed.clone()];
        let path = |p: &Path| p.display().to_string();
        assert!(load_localhost(&path(&good), &dirs, &[]).is_ok());
        for bad in [
            path(&outside),
            path(&escape),
            "relative.json".into(),
            path(&allowed.join("missing.json")),
            path(&allowed),
        ] {
            assert!(load_localhost(&bad, &dirs, &[]).is_err(), "{bad}");
        }
        assert!(runtime_default().is_ok());
    }
}
