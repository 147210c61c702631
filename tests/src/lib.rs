//! Support for the end-to-end tests in `tests/tests/`: a throwaway
//! environment per test (state and run dirs in a temp dir, the guest image
//! from `make build`), and a guard that — pass or fail — kills every process
//! started under that environment and removes its directories.
//!
//! Missing parts (no guest image, no QEMU) fail the tests with the reason:
//! `make test` installs and builds them, so their absence is a bug.

// Test support: a failed setup step should stop the test loudly.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use podsandbox::RuntimeConfig;

pub mod cri;
pub mod fuzz;
pub mod interop;

/// The image store's test support, shared: a real `docker-registry` on a
/// free loopback port, a push client and image builders.
#[path = "../../imagestore/tests/support/mod.rs"]
#[allow(missing_debug_implementations, clippy::new_without_default)]
pub mod registry;

/// The source tree's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The guest image directory, or a panic that says how to make it.
pub fn guest_dir() -> PathBuf {
    let dir = repo_root().join("build/guest");
    for file in ["vmlinux", "initramfs.cpio"] {
        assert!(
            dir.join(file).is_file(),
            "{} is missing: run `make build` (or `make test`, which builds it) first",
            dir.join(file).display()
        );
    }
    dir
}

/// A host binary of this workspace (`target/<profile>/NAME`), built by `make build`.
pub fn workspace_bin(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps/.
    let exe = std::env::current_exe().unwrap_or_default();
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let bin = profile_dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing: run `make build` first",
        bin.display()
    );
    bin
}

/// `virtc --config <config> <args>`, expected to succeed; its stdout.
pub fn virtc_ok(config: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(workspace_bin("virtc"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run virtc");
    assert!(
        out.status.success(),
        "virtc {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One test's private world. Dropping it is the leak guard.
#[derive(Debug)]
pub struct TestEnv {
    pub dir: tempfile::TempDir,
    pub config: RuntimeConfig,
}

impl TestEnv {
    pub fn new() -> Self {
        // Short paths: unix sockets live under the run dir.
        let dir = tempfile::Builder::new()
            .prefix("vct")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let guest = guest_dir();
        let mut config = RuntimeConfig {
            state_dir: dir.path().join("state"),
            run_dir: dir.path().join("run"),
            ..RuntimeConfig::default()
        };
        config.hypervisor.kernel = guest.join("vmlinux");
        config.hypervisor.initrd = guest.join("initramfs.cpio");
        // As podsandbox resolves an empty `modules`: the image next to the
        // kernel when it was built.
        if guest.join("modules.img").is_file() {
            config.hypervisor.modules = guest.join("modules.img");
        }
        assert!(
            config.hypervisor.qemu_path.is_file(),
            "{} is missing: run hack/install-deps.sh",
            config.hypervisor.qemu_path.display()
        );
        // Generous under a loaded CI machine; a healthy boot takes ~2 s.
        config.agent.dial_timeout_ms = 60_000;
        Self { dir, config }
    }

    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.config.run_dir.join(id)
    }

    pub fn state_dir(&self, id: &str) -> PathBuf {
        self.config.state_dir.join("sandboxes").join(id)
    }

    /// Processes whose command line mentions this environment's directory:
    /// QEMU and every helper name their sockets under it.
    pub fn processes(&self) -> Vec<(i32, String)> {
        processes_mentioning(self.dir.path())
    }

    /// Asserts that nothing of sandbox `id` is left: no process, no run dir,
    /// no state.
    pub fn assert_nothing_left(&self, id: &str) {
        let procs = self.processes();
        assert!(procs.is_empty(), "processes left behind: {procs:?}");
        let mounts = mounts_under(self.dir.path());
        assert!(mounts.is_empty(), "mounts left behind: {mounts:?}");
        assert!(
            !self.run_dir(id).exists(),
            "run dir {} left behind",
            self.run_dir(id).display()
        );
        assert!(
            !self.state_dir(id).exists(),
            "state dir {} left behind",
            self.state_dir(id).display()
        );
    }

    /// Writes the config as TOML, for the CLI tests.
    pub fn write_config(&self) -> PathBuf {
        let path = self.dir.path().join("config.toml");
        let text = toml_of(&self.config);
        std::fs::write(&path, text).expect("write config");
        path
    }
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let leftovers = self.processes();
        for (pid, _) in &leftovers {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        for (pid, _) in &leftovers {
            // Ours (directly or by reparenting to a subreaper) can be reaped.
            for _ in 0..100 {
                match nix::sys::wait::waitpid(
                    nix::unistd::Pid::from_raw(*pid),
                    Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                ) {
                    Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    _ => break,
                }
            }
        }
        reap_orphaned_vmms();
        // Detach before TempDir removes the tree: never delete through a mount.
        let mut mounts = mounts_under(self.dir.path());
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in &mounts {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        if !leftovers.is_empty() && !std::thread::panicking() {
            eprintln!("leak guard killed {leftovers:?}");
        }
        // TempDir's own drop removes the directories.
    }
}

/// What /proc says about one process.
#[derive(Debug, Clone)]
struct Proc {
    pid: i32,
    comm: String,
    state: String,
    ppid: String,
    cmdline: String,
}

/// Every process but this one.
fn procs() -> Vec<Proc> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
            if pid == me {
                return None;
            }
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let (head, tail) = stat.rsplit_once(')')?;
            let comm = head.split_once('(')?.1.to_string();
            let mut fields = tail.split_whitespace();
            let state = fields.next()?.to_string();
            let ppid = fields.next()?.to_string();
            let cmdline = read_cmdline(i64::from(pid)).unwrap_or_default();
            Some(Proc {
                pid,
                comm,
                state,
                ppid,
                cmdline,
            })
        })
        .collect()
}

/// A process's argv joined by spaces; None once it is gone.
fn read_cmdline(pid: i64) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        String::from_utf8_lossy(&raw)
            .replace('\0', " ")
            .trim()
            .to_string(),
    )
}

/// The argv of a process the test knows is running (a pod's QEMU), joined
/// by spaces, to assert what it was started with.
pub fn cmdline(pid: i64) -> String {
    read_cmdline(pid).unwrap_or_else(|| panic!("no /proc/{pid}/cmdline: the process is gone"))
}

/// Live (non-zombie) processes whose argv mentions `needle`.
pub fn processes_mentioning(needle: &Path) -> Vec<(i32, String)> {
    let needle = needle.to_string_lossy().into_owned();
    procs()
        .into_iter()
        .filter(|p| p.state != "Z" && p.state != "X" && p.cmdline.contains(&needle))
        .map(|p| (p.pid, p.cmdline))
        .collect()
}

/// Reaps exited QEMU and helper processes that were reparented to this
/// (subreaper) process. Only those: other tests' children keep their statuses.
pub fn reap_orphaned_vmms() {
    let me = std::process::id().to_string();
    for p in procs() {
        if p.state == "Z"
            && p.ppid == me
            && (p.comm.starts_with("qemu-system") || p.comm.starts_with("vhost-device"))
        {
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(p.pid),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
    }
}

/// Makes this test process the reaper of orphans it causes (VMs started by
/// `virtc` calls outlive them), so the leak guard can reap them.
pub fn become_subreaper() {
    let _ = nix::sys::prctl::set_child_subreaper(true);
}

/// A TOML rendering of the fields tests change.
fn toml_of(c: &RuntimeConfig) -> String {
    let hv = &c.hypervisor;
    format!(
        "state_dir = {:?}\nrun_dir = {:?}\n\n[hypervisor]\nkernel = {:?}\ninitrd = {:?}\nkernel_params = {:?}\n\n[agent]\ndial_timeout_ms = {}\n",
        c.state_dir, c.run_dir, hv.kernel, hv.initrd, hv.kernel_params, c.agent.dial_timeout_ms
    )
}

/// A minimal container rootfs: Debian's busybox-static and its applets.
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("busybox-rootfs");
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("busybox-static is installed by hack/install-deps.sh");
    // Every applet this busybox has, as /bin/<applet>.
    let list = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("busybox --list");
    let applets = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(
        applets.lines().any(|a| a == "sh"),
        "busybox applets: {applets}"
    );
    for applet in applets.lines().filter(|a| !a.is_empty() && *a != "busybox") {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("symlink");
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("passwd");
    root
}

/// Mount points at or below `dir` (a leak check and cleanup target).
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&prefix))
        .map(String::from)
        .collect()
}

/// Builds a throwaway initramfs whose /init (busybox sh) runs `script`:
/// a guest that boots but has no agent.
pub fn busybox_initrd(dir: &Path, script: &str) -> PathBuf {
    let root = dir.join("bbroot");
    std::fs::create_dir_all(root.join("bin")).expect("mkdir");
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("busybox-static is installed by hack/install-deps.sh");
    std::fs::write(root.join("init"), format!("#!/bin/busybox sh\n{script}\n"))
        .expect("write init");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("init"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let out = dir.join("busybox.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | cpio --quiet -o -H newc > {}",
            root.display(),
            out.display()
        ))
        .status()
        .expect("run cpio");
    assert!(status.success(), "cpio failed");
    out
}
