//! CRI benchmark: pod start (RunPodSandbox + CreateContainer + StartContainer
//! of busybox) and ExecSync latency through the CRI, `vcrid` (a VM per pod)
//! next to Debian's containerd + runc on the same machine in the same run,
//! driven by the same client code over their unix sockets. Numbers, not
//! assertions.
//!
//!   cargo build --profile release-unwind -p cri --bins
//!   cargo run --profile release-unwind -p tests --example bench_cri [-- PODS]
//!
//! `BENCH_MODES=template` (any of cold,pool,template; default all) picks the
//! vcrid set-ups; `BENCH_HYPERVISOR='tcg_tb_size_mib = 8'` adds lines (`;`
//! separated) to each one's `[hypervisor]` (`BENCH_FACTORY`: to the pool
//! and template runs' `[factory]`); `BENCH_LOGS=DIR` keeps vcrid's
//! log and the VMs' consoles there.
//!
//! One loopback registry serves a busybox image and a "pause" image (the same
//! layer, `sleep infinity`) that containerd uses as its sandbox image. Both
//! runtimes pull both images first (not timed); then PODS pods (default 20)
//! are started one after the other and timed, 20 ExecSync `true` run in the
//! first pod's container, and every pod is stopped and removed (timed for
//! information only). Guards remove every pod, stop both servers and remove
//! their mounts, bridges and dirs, even when the run fails.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use tests::registry as support;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use k8s_cri::v1 as cri;
use tests::cri::{remove_all_pods_blocking, unix_channel, CriEnv, Images, Runtime};

/// vcrid's subnet is 10.211.<this>.0/24, containerd's 10.212.<this>.0/24.
const OCTET: u8 = 77;
const EXECS: usize = 20;

/// Debian's containerd with its CRI plugin, every path of its own under a
/// temp dir (runc's state too), its own CNI bridge network. Dropping it is
/// the cleanup: pods removed through the CRI, containerd stopped, leftover
/// runc containers and shims killed, mounts detached, the bridge deleted.
struct Containerd {
    dir: tempfile::TempDir,
    socket: PathBuf,
    config: PathBuf,
    bridge: String,
    child: Option<Child>,
    /// `/run/containerd` (where containerd 1.6 puts shim sockets) existed
    /// before: then it is not ours to remove.
    run_dir_existed: bool,
    /// `/var/lib/cni` (libcni's result cache) existed before.
    cni_cache_existed: bool,
    /// The `k8s.io` cgroups (runc's default parent for pods without a
    /// cgroup parent, one per v1 hierarchy) that did not exist before.
    new_cgroups: Vec<PathBuf>,
}

/// `/sys/fs/cgroup/<hierarchy>/k8s.io` for every hierarchy, and whether it exists.
fn k8s_cgroups() -> Vec<(PathBuf, bool)> {
    std::fs::read_dir("/sys/fs/cgroup")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path().join("k8s.io"))
                .map(|p| {
                    let exists = p.is_dir();
                    (p, exists)
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Containerd {
    fn new(registry: &str, octet: u8) -> Self {
        // Short: the grpc socket path must fit a sockaddr_un.
        let dir = tempfile::Builder::new()
            .prefix("ctrb")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let d = dir.path();
        let bridge = format!("vcbctr{octet}");
        let net = format!("ctrbench{octet}");
        // The same network shape as vcrid's (CriEnv), minus the loopback
        // plugin: containerd sets up the pod's `lo` itself.
        let mut list = cni::defaults::default_conflist(&bridge, &format!("10.212.{octet}.0/24"));
        list["name"] = serde_json::json!(net);
        list["plugins"][0]["ipam"]["dataDir"] =
            serde_json::json!(d.join("ipam").display().to_string());
        list["plugins"]
            .as_array_mut()
            .expect("plugins")
            .retain(|p| p["type"] != "loopback");
        std::fs::create_dir_all(d.join("cni")).expect("mkdir cni");
        std::fs::write(
            d.join("cni/10-bench.conflist"),
            serde_json::to_vec_pretty(&list).expect("json"),
        )
        .expect("write conflist");
        let socket = d.join("c.sock");
        let cri = "plugins.\"io.containerd.grpc.v1.cri\"";
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"

[grpc]
  address = "{d}/c.sock"

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[{cri}]
  sandbox_image = "{registry}/pause:1"
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  # No CAP_SYS_RESOURCE here: never ask for an oom_score_adj below ours.
  restrict_oom_score_adj = true

[{cri}.cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{d}/cni"
  max_conf_num = 1

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  BinaryName = "/usr/sbin/runc"
  Root = "{d}/runc"

[{cri}.registry.mirrors."{registry}"]
  endpoint = ["http://{registry}"]
"#,
            d = d.display(),
        );
        let config_path = d.join("config.toml");
        std::fs::write(&config_path, config).expect("write containerd config");
        Self {
            dir,
            socket,
            config: config_path,
            bridge,
            child: None,
            run_dir_existed: Path::new("/run/containerd").exists(),
            cni_cache_existed: Path::new("/var/lib/cni").exists(),
            new_cgroups: k8s_cgroups()
                .into_iter()
                .filter(|(_, exists)| !exists)
                .map(|(p, _)| p)
                .collect(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Starts containerd and waits until its CRI reports runtime and
    /// network ready.
    async fn start(&mut self) -> (Runtime, Images) {
        let log = std::fs::File::create(self.dir.path().join("containerd.log")).expect("log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("containerd (hack/install-deps.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = String::new();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("containerd exited at start ({status}): {}", self.log());
            }
            if let Ok(channel) = unix_channel(&self.socket).await {
                let mut rt = Runtime::new(channel.clone());
                match rt.status(cri::StatusRequest { verbose: false }).await {
                    Ok(s) => {
                        let conds = s.into_inner().status.map(|s| s.conditions);
                        if conds
                            .as_ref()
                            .is_some_and(|c| !c.is_empty() && c.iter().all(|c| c.status))
                        {
                            return (rt, Images::new(channel));
                        }
                        last = format!("{conds:?}");
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            assert!(
                Instant::now() < deadline,
                "containerd's CRI not ready ({last}): {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let d = self.dir.path().to_path_buf();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<_> = log.lines().rev().take(40).collect();
            eprintln!("containerd's log (last lines, newest first):");
            for l in tail {
                eprintln!("  {l}");
            }
        }
        if let Some(mut c) = self.child.take() {
            if c.try_wait().ok().flatten().is_none() {
                remove_all_pods_blocking(&self.socket);
            }
            if let Ok(pid) = i32::try_from(c.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // Containers the CRI could not remove: runc's state is ours.
        let runc_root = d.join("runc/k8s.io");
        if runc_root.is_dir() {
            let out = Command::new("runc")
                .arg("--root")
                .arg(&runc_root)
                .args(["list", "-q"])
                .stderr(Stdio::null())
                .output();
            if let Ok(out) = out {
                for id in String::from_utf8_lossy(&out.stdout).lines() {
                    let _ = Command::new("runc")
                        .arg("--root")
                        .arg(&runc_root)
                        .args(["delete", "--force", id])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }
        // Shims name containerd's socket, under our dir.
        for (pid, _) in tests::processes_mentioning(&d) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let mut mounts = tests::mounts_under(&d);
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
        if !self.run_dir_existed {
            // Empty once every shim is gone; remove_dir keeps anything else.
            let _ = std::fs::remove_dir("/run/containerd/s");
            let _ = std::fs::remove_dir("/run/containerd");
        }
        if !self.cni_cache_existed {
            // Empty once CNI DEL ran for every pod.
            let _ = std::fs::remove_dir("/var/lib/cni/results");
            let _ = std::fs::remove_dir("/var/lib/cni");
        }
        reap_shims();
        // rmdir removes a cgroup only when it is empty.
        for cg in &self.new_cgroups {
            let _ = std::fs::remove_dir(cg);
        }
        // TempDir removes the rest.
    }
}

/// Reaps exited shims: they daemonize, and this (subreaper) process
/// inherits them.
fn reap_shims() {
    let me = std::process::id().to_string();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in rd.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let Some((head, tail)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<_> = tail.split_whitespace().take(2).collect();
        if head.contains("(containerd-shim") && fields == ["Z", me.as_str()] {
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(pid),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
    }
}

/// Pushes busybox (`sh` by default) and a pause image (the same layer,
/// `sleep infinity`); returns their references.
async fn push_images(registry: &support::Registry) -> (String, String) {
    let layer = support::layer(&support::busybox_entries(), support::Comp::Gzip);
    let mut busybox = support::TestImage::new(vec![layer.clone()]);
    busybox.config =
        serde_json::json!({"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"});
    registry.push_image("busybox", "latest", &busybox).await;
    let mut pause = support::TestImage::new(vec![layer]);
    pause.config = serde_json::json!({"Entrypoint": ["/bin/sleep", "infinity"], "Env": ["PATH=/bin"], "WorkingDir": "/"});
    registry.push_image("pause", "1", &pause).await;
    (
        format!("{}/busybox:latest", registry.host()),
        format!("{}/pause:1", registry.host()),
    )
}

fn pod_config(logs: &Path, name: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "bench".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: logs.join(name).display().to_string(),
        dns_config: Some(cri::DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["default.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        labels: HashMap::from([("app".to_string(), "bench".to_string())]),
        // vcrid's pod VM size (as in the end-to-end tests); containerd ignores it.
        annotations: HashMap::from([(
            "io.virtcontainers.memory_mib".to_string(),
            "384".to_string(),
        )]),
        ..Default::default()
    }
}

fn container_config(image: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: "sleeper".into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: vec!["sleep".into(), "3600".into()],
        log_path: "sleeper.log".into(),
        ..Default::default()
    }
}

/// One runtime's samples.
struct Samples {
    pod_start: Vec<Duration>,
    exec: Vec<Duration>,
    /// With every pod running: what kubelet polls.
    pod_status: Vec<Duration>,
    list_pods: Vec<Duration>,
    container_status: Vec<Duration>,
    list_containers: Vec<Duration>,
    teardown: Vec<Duration>,
    /// vcrid only: host PSS per idle pod with every pod up, and with KSM.
    footprint: Option<Footprint>,
}

/// What the pods' VMs hold of the host's memory while idle.
struct Footprint {
    /// Mean PSS of a pod's QEMU and helpers, MiB.
    pss_mib: f64,
    ksm: Option<KsmRun>,
}

/// What KSM did to the same pods.
struct KsmRun {
    pss_mib: f64,
    /// ksmd's CPU time over the run, as a share of one core.
    ksmd_cpu: f64,
    seconds: f64,
    pages_sharing: u64,
}

/// How `measure` runs vcrid.
#[derive(Clone, Copy)]
struct Mode {
    /// Wait for a warm VM before each pod.
    pool: bool,
    /// Measure the pods' PSS once every pod is up (vcrid only).
    footprint: bool,
    /// Then turn KSM on and measure again.
    ksm: bool,
}

const COLD: Mode = Mode {
    pool: false,
    footprint: true,
    ksm: false,
};

/// How many of each status and list call are timed.
const READS: usize = 100;

/// The measurement, the same for both runtimes.
async fn measure(
    what: &str,
    rt: &mut Runtime,
    images: &mut Images,
    refs: &[&str],
    logs: &Path,
    pods: usize,
    mode: Mode,
) -> Samples {
    for image in refs {
        images
            .pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image: (*image).into(),
                    ..Default::default()
                }),
                auth: None,
                sandbox_config: None,
            })
            .await
            .unwrap_or_else(|e| panic!("{what}: PullImage {image}: {e}"));
    }
    let busybox = refs[0];
    let mut ids = Vec::new();
    let mut pod_start = Vec::new();
    eprint!("{what}: starting {pods} pods ");
    for i in 0..pods {
        let config = pod_config(logs, &format!("bench-{i}"));
        std::fs::create_dir_all(&config.log_directory).expect("log dir");
        if mode.pool {
            // The pool refilled (untimed): what a node whose pods arrive
            // slower than a VM boots sees.
            wait_for_warm_vm(rt).await;
        }
        let t = Instant::now();
        let pod = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("{what}: RunPodSandbox: {e}"))
            .into_inner()
            .pod_sandbox_id;
        let ctr = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container_config(busybox)),
                sandbox_config: Some(config),
            })
            .await
            .unwrap_or_else(|e| panic!("{what}: CreateContainer: {e}"))
            .into_inner()
            .container_id;
        rt.start_container(cri::StartContainerRequest {
            container_id: ctr.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("{what}: StartContainer: {e}"));
        pod_start.push(t.elapsed());
        eprint!(".");
        ids.push((pod, ctr));
    }
    eprintln!();
    let footprint = if mode.footprint {
        Some(footprint(rt, &ids, mode.ksm).await)
    } else {
        None
    };
    let mut exec = Vec::new();
    let target = &ids[0].1;
    for _ in 0..EXECS {
        let t = Instant::now();
        let out = rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: target.clone(),
                cmd: vec!["true".into()],
                timeout: 60,
            })
            .await
            .unwrap_or_else(|e| panic!("{what}: ExecSync: {e}"))
            .into_inner();
        exec.push(t.elapsed());
        assert_eq!(out.exit_code, 0, "{what}: ExecSync true: {out:?}");
    }
    let (mut pod_status, mut list_pods) = (Vec::new(), Vec::new());
    let (mut container_status, mut list_containers) = (Vec::new(), Vec::new());
    for i in 0..READS {
        let (pod, ctr) = &ids[i % ids.len()];
        let t = Instant::now();
        rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .await
        .unwrap_or_else(|e| panic!("{what}: PodSandboxStatus: {e}"));
        pod_status.push(t.elapsed());
        let t = Instant::now();
        let listed = rt
            .list_pod_sandbox(cri::ListPodSandboxRequest::default())
            .await
            .unwrap_or_else(|e| panic!("{what}: ListPodSandbox: {e}"))
            .into_inner()
            .items;
        list_pods.push(t.elapsed());
        assert_eq!(listed.len(), ids.len(), "{what}: ListPodSandbox");
        let t = Instant::now();
        rt.container_status(cri::ContainerStatusRequest {
            container_id: ctr.clone(),
            verbose: false,
        })
        .await
        .unwrap_or_else(|e| panic!("{what}: ContainerStatus: {e}"));
        container_status.push(t.elapsed());
        let t = Instant::now();
        let listed = rt
            .list_containers(cri::ListContainersRequest::default())
            .await
            .unwrap_or_else(|e| panic!("{what}: ListContainers: {e}"))
            .into_inner()
            .containers;
        list_containers.push(t.elapsed());
        assert_eq!(listed.len(), ids.len(), "{what}: ListContainers");
    }
    // BENCH_LOGS=DIR: each VM's console, kept after the execs (before teardown removes it).
    if let (Ok(dir), Some(root)) = (std::env::var("BENCH_LOGS"), logs.parent()) {
        let dir = Path::new(&dir).join(what.replace(' ', "-"));
        std::fs::create_dir_all(&dir).expect("BENCH_LOGS");
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "find {} -name 'console.log*' | while read f; do cp \"$f\" {}/$(echo \"$f\" | md5sum | cut -c1-8).$(basename \"$f\"); done",
                root.display(),
                dir.display()
            ))
            .status();
    }
    let mut teardown = Vec::new();
    for (pod, _) in ids {
        let t = Instant::now();
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("{what}: StopPodSandbox: {e}"));
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .unwrap_or_else(|e| panic!("{what}: RemovePodSandbox: {e}"));
        teardown.push(t.elapsed());
    }
    Samples {
        footprint,
        pod_start,
        exec,
        pod_status,
        list_pods,
        container_status,
        list_containers,
        teardown,
    }
}

/// How long idle pods settle before their PSS is read (the last one's
/// guest is still finishing its start).
const SETTLE: Duration = Duration::from_secs(10);

/// The pods' mean PSS, then (with `ksm`) the same after KSM has scanned
/// every page twice.
async fn footprint(rt: &mut Runtime, ids: &[(String, String)], ksm: bool) -> Footprint {
    tokio::time::sleep(SETTLE).await;
    let pss_mib = mean_pss(rt, ids).await;
    let ksm = if ksm {
        let guard = KsmGuard::on();
        let cpu0 = ksmd_cpu_ticks();
        let t = Instant::now();
        let scans = ksm_read("full_scans");
        while ksm_read("full_scans") < scans + 2 {
            assert!(
                t.elapsed() < Duration::from_secs(600),
                "KSM never scanned twice"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let seconds = t.elapsed().as_secs_f64();
        let ticks = ksmd_cpu_ticks() - cpu0;
        let pages_sharing = ksm_read("pages_sharing");
        let pss_mib = mean_pss(rt, ids).await;
        drop(guard);
        Some(KsmRun {
            pss_mib,
            ksmd_cpu: ticks as f64 / clock_ticks() / seconds,
            seconds,
            pages_sharing,
        })
    } else {
        None
    };
    Footprint { pss_mib, ksm }
}

async fn mean_pss(rt: &mut Runtime, ids: &[(String, String)]) -> f64 {
    let mut total = 0.0;
    for (pod, _) in ids {
        total += tests::cri::pod_pss_mib(rt, pod).await;
    }
    total / ids.len() as f64
}

const KSM: &str = "/sys/kernel/mm/ksm";

fn ksm_read(name: &str) -> u64 {
    let path = format!("{KSM}/{name}");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn ksm_write(name: &str, value: &str) {
    let path = format!("{KSM}/{name}");
    std::fs::write(&path, value).unwrap_or_else(|e| panic!("{path} <- {value}: {e}"));
}

/// KSM on, scanning fast, for as long as it lives; then every merged page
/// unmerged and the host's settings back.
struct KsmGuard {
    saved: Vec<(&'static str, String)>,
}

impl KsmGuard {
    fn on() -> Self {
        let saved = ["run", "pages_to_scan", "sleep_millisecs"]
            .into_iter()
            .map(|k| (k, ksm_read(k).to_string()))
            .collect();
        ksm_write("pages_to_scan", "2000");
        ksm_write("sleep_millisecs", "20");
        ksm_write("run", "1");
        Self { saved }
    }
}

impl Drop for KsmGuard {
    fn drop(&mut self) {
        // 2: unmerge every page (synchronous), then the saved settings.
        let _ = std::fs::write(format!("{KSM}/run"), "2");
        for (k, v) in &self.saved {
            let _ = std::fs::write(format!("{KSM}/{k}"), v);
        }
    }
}

/// ksmd's user + system CPU time, in clock ticks.
fn ksmd_cpu_ticks() -> u64 {
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim() != "ksmd" {
            continue;
        }
        let stat = std::fs::read_to_string(entry.path().join("stat")).expect("ksmd stat");
        // Fields after the comm's closing parenthesis: state is field 3,
        // utime 14 and stime 15.
        let rest = stat.rsplit_once(')').expect("stat").1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        return f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    }
    panic!("no ksmd thread: this kernel has no KSM");
}

fn clock_ticks() -> f64 {
    let out = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("CLK_TCK")
}

/// Waits until vcrid's factory (verbose Status) has a warm VM ready.
async fn wait_for_warm_vm(rt: &mut Runtime) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let factory = tests::cri::factory_status(rt).await;
        if factory["ready"].as_u64().unwrap_or(0) > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "no warm VM: {factory}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Median and p99 (nearest rank: the max below 100 samples), in ms.
fn stats(v: &[Duration]) -> (f64, f64) {
    let mut v = v.to_vec();
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let median = if v.len() % 2 == 1 {
        ms(v[v.len() / 2])
    } else {
        (ms(v[v.len() / 2 - 1]) + ms(v[v.len() / 2])) / 2.0
    };
    let rank = ((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len());
    (median, ms(v[rank - 1]))
}

fn row(what: &str, vc: &[Duration], ctr: &[Duration]) {
    let (vm, vp) = stats(vc);
    let (cm, cp) = stats(ctr);
    println!(
        "{what:<34} {vm:>9.1} {vp:>9.1} | {cm:>9.1} {cp:>9.1} | {:>7.1}x {:>7.1}x",
        vm / cm,
        vp / cp
    );
}

fn version(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .unwrap_or_default()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let pods: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("PODS: a number"))
        .unwrap_or(20);
    assert!(pods > 0, "PODS must be at least 1");
    tests::become_subreaper();
    let load_before = loadavg();
    let registry = support::Registry::start().await;
    let (busybox, pause) = push_images(&registry).await;
    let refs = [busybox.as_str(), pause.as_str()];

    eprintln!("vcrid: {}", tests::workspace_bin("vcrid").display());
    // Which vcrid set-ups run (BENCH_MODES, default all three), and lines
    // added to every run's [hypervisor] (BENCH_HYPERVISOR, for experiments).
    let wanted = std::env::var("BENCH_MODES").unwrap_or_else(|_| "cold,pool,template".into());
    let extra_hv = std::env::var("BENCH_HYPERVISOR")
        .map(|h| format!("{}\n", h.replace(';', "\n")))
        .unwrap_or_default();
    // BENCH_FACTORY: lines added to the pool and template runs' [factory].
    let extra_factory = std::env::var("BENCH_FACTORY")
        .map(|h| format!("{}\n", h.replace(';', "\n")))
        .unwrap_or_default();
    let warm = Mode { pool: true, ..COLD };
    let setups: [(&str, &str, &str, Mode); 3] = [
        ("cold", "", "", COLD),
        // A warm pool of one VM (refilled between pods).
        ("pool", "\n[factory]\npool = 1\n", "", warm),
        // A pool of clones of one template VM, then KSM over them.
        (
            "template",
            "\n[factory]\npool = 1\ntemplate = true\n",
            // mem_merge: the clones' RAM is KSM's to merge once KSM runs.
            "vsock = \"serial\"\nshared_fs = \"virtio-9p\"\nmem_merge = true\n",
            Mode { ksm: true, ..warm },
        ),
    ];
    let mut runs: Vec<(&str, Samples, String)> = Vec::new();
    let mut vc_secs = 0.0;
    for (what, extra, hv, mode) in setups {
        if !wanted.split(',').any(|w| w.trim() == what) {
            continue;
        }
        let started = Instant::now();
        let extra = if extra.contains("[factory]") {
            format!("{extra}{extra_factory}")
        } else {
            extra.to_string()
        };
        let (samples, log) = Box::pin(run_vcrid(
            &format!("vcrid {what}"),
            &extra,
            &format!("{hv}{extra_hv}"),
            &refs,
            pods,
            mode,
        ))
        .await;
        vc_secs += started.elapsed().as_secs_f64();
        runs.push((what, samples, log));
    }
    assert!(
        !runs.is_empty(),
        "BENCH_MODES {wanted:?}: none of cold, pool, template"
    );

    let mut ctr = Containerd::new(&registry.host(), OCTET);
    let (mut ctr_rt, mut ctr_images) = ctr.start().await;
    let ctr_logs = ctr.dir.path().join("logs");
    let started = Instant::now();
    let ctrs = Box::pin(measure(
        "containerd",
        &mut ctr_rt,
        &mut ctr_images,
        &refs,
        &ctr_logs,
        pods,
        Mode {
            footprint: false,
            ..COLD
        },
    ))
    .await;
    let ctr_secs = started.elapsed().as_secs_f64();

    // What vcrid's `accel = "auto"` picks on this host.
    let accel = hypervisor::qemu::accel::resolve(
        hypervisor::Accel::Auto,
        &hypervisor::qemu::accel::HostFacts::probe(),
    )
    .map_or("?", |a| a.as_str());
    println!();
    println!(
        "CRI benchmark: {pods} pods started one after the other, {EXECS} ExecSync `true` in one container"
    );
    println!(
        "vcrid: a QEMU VM per pod (accel {accel}, 384 MiB) | baseline: {} + {}",
        version("containerd", "--version"),
        version("runc", "--version")
    );
    println!(
        "p99 is the nearest rank: with fewer than 100 samples it is the max. Load average before: {load_before}, after: {}",
        loadavg()
    );
    println!(
        "{:<34} {:>9} {:>9} | {:>9} {:>9} | {:>17}",
        "", "vcrid", "", "containerd", "", "vcrid/containerd"
    );
    println!(
        "{:<34} {:>9} {:>9} | {:>9} {:>9} | {:>8} {:>8}",
        "ms", "p50", "p99", "p50", "p99", "p50", "p99"
    );
    for (what, samples, _) in &runs {
        let label = match *what {
            "cold" => "pod start (run + create + start)".to_string(),
            "pool" => "pod start, warm pool of 1".to_string(),
            _ => "pod start, pool of template clones".to_string(),
        };
        row(&label, &samples.pod_start, &ctrs.pod_start);
    }
    // The calls below from the first set-up run.
    let (first, vcs, _) = &runs[0];
    println!("(the rows below: vcrid {first})");
    row("ExecSync `true`", &vcs.exec, &ctrs.exec);
    row(
        &format!("PodSandboxStatus ({pods} pods up)"),
        &vcs.pod_status,
        &ctrs.pod_status,
    );
    row("ListPodSandbox", &vcs.list_pods, &ctrs.list_pods);
    row(
        "ContainerStatus",
        &vcs.container_status,
        &ctrs.container_status,
    );
    row(
        "ListContainers",
        &vcs.list_containers,
        &ctrs.list_containers,
    );
    row(
        "stop + remove pod (not asked)",
        &vcs.teardown,
        &ctrs.teardown,
    );
    println!(
        "wall time per runtime (pulls included): vcrid {vc_secs:.1} s, containerd {ctr_secs:.1} s"
    );
    // Where a vcrid pod start goes: the RPCs' own times from vcrid's log.
    for (what, _, log) in &runs {
        per_call(what, log);
    }
    println!("host PSS per idle pod (QEMU + helpers, mean over {pods} pods up, {} s after the last started):", SETTLE.as_secs());
    let base = runs
        .iter()
        .find(|(w, _, _)| *w == "cold")
        .and_then(|(_, s, _)| s.footprint.as_ref())
        .map(|f| f.pss_mib);
    let vs_cold = |pss: f64| base.map_or(String::new(), |b| format!(" ({:.2}x cold)", pss / b));
    for (what, samples, _) in &runs {
        let Some(f) = &samples.footprint else {
            continue;
        };
        println!("  {what:<9} {:>7.1} MiB{}", f.pss_mib, vs_cold(f.pss_mib));
        if let Some(k) = &f.ksm {
            println!(
                "  {:<9} {:>7.1} MiB{} after two full KSM scans in {:.0} s: {} pages sharing, ksmd {:.0}% of a core",
                format!("{what}+KSM"),
                k.pss_mib,
                vs_cold(k.pss_mib),
                k.seconds,
                k.pages_sharing,
                k.ksmd_cpu * 100.0
            );
        }
    }

    // Drop order: containerd, then the registry.
    drop(ctr_rt);
    drop(ctr_images);
    drop(ctr);
}

/// One vcrid run of `measure` with `extra` config tables and `hypervisor`
/// lines; returns its samples and vcrid's log. Nothing of it is left.
async fn run_vcrid(
    what: &str,
    extra: &str,
    hypervisor: &str,
    refs: &[&str],
    pods: usize,
    mode: Mode,
) -> (Samples, String) {
    let mut env = CriEnv::with_config(OCTET, extra);
    env.set_hypervisor(hypervisor);
    env.start().await;
    let mut rt = env.runtime().await;
    let mut images = env.images().await;
    let logs = env.dir.path().join("logs");
    let samples = Box::pin(measure(what, &mut rt, &mut images, refs, &logs, pods, mode)).await;
    let log = env.log();
    // BENCH_LOGS=DIR: vcrid's log, kept.
    if let Ok(dir) = std::env::var("BENCH_LOGS") {
        let dir = Path::new(&dir).join(what.replace(' ', "-"));
        std::fs::create_dir_all(&dir).expect("BENCH_LOGS");
        std::fs::write(dir.join("vcrid.log"), &log).expect("BENCH_LOGS");
    }
    drop(rt);
    drop(images);
    env.stop();
    env.assert_no_pods_left();
    (samples, log)
}

fn per_call(what: &str, log: &str) {
    let parts: Vec<String> = ["RunPodSandbox", "CreateContainer", "StartContainer"]
        .iter()
        .map(|rpc| {
            let mut ms: Vec<f64> = log
                .lines()
                .filter(|l| l.contains(&format!("RuntimeService/{rpc} ")))
                .filter_map(|l| {
                    l.split_whitespace()
                        .find_map(|f| f.strip_prefix("ms="))
                        .and_then(|v| v.parse().ok())
                })
                .collect();
            ms.sort_by(f64::total_cmp);
            match ms.get(ms.len() / 2) {
                Some(m) => format!("{rpc} {m:.0} ms"),
                None => format!("{rpc} ?"),
            }
        })
        .collect();
    println!("  vcrid {what}, per call (medians): {}", parts.join(", "));
}
