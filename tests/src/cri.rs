//! A real `vcrid` for end-to-end tests: its own state, run, CNI and image
//! dirs in a temp dir, a CNI bridge network of its own (bridge name, subnet,
//! IPAM dir), and a guard that — pass or fail — removes every pod through
//! the CRI, stops vcrid, kills what is left and removes the bridge and dirs.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient,
};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{guest_dir, mounts_under, processes_mentioning, workspace_bin};

pub type Runtime = RuntimeServiceClient<Channel>;
pub type Images = ImageServiceClient<Channel>;

/// One vcrid and everything it may leave behind.
#[derive(Debug)]
pub struct CriEnv {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub config_path: PathBuf,
    /// The CNI network: its name, bridge, /24 and host-local data dir.
    pub net: String,
    pub bridge: String,
    pub subnet_octet: u8,
    vcrid: Option<Child>,
}

impl CriEnv {
    /// A fresh environment; `octet` picks the test's subnet 10.211.<octet>.0/24
    /// (distinct per test so tests may run in parallel).
    pub fn new(octet: u8) -> Self {
        Self::with_config(octet, "")
    }

    /// Like [`CriEnv::new`], with `extra` (whole TOML tables, such as
    /// `[images]\nrootfs = "block"`) appended to vcrid's config.
    pub fn with_config(octet: u8, extra: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vcr")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let guest = guest_dir();
        let net = format!("vcrtest{octet}");
        let bridge = format!("vcrt{octet}");
        let conf_dir = dir.path().join("cni");
        std::fs::create_dir_all(&conf_dir).expect("mkdir cni");
        let mut list = cni::defaults::default_conflist(&bridge, &format!("10.211.{octet}.0/24"));
        list["name"] = serde_json::json!(net);
        list["plugins"][0]["ipam"]["dataDir"] =
            serde_json::json!(dir.path().join("ipam").display().to_string());
        std::fs::write(
            conf_dir.join("10-test.conflist"),
            serde_json::to_vec_pretty(&list).expect("json"),
        )
        .expect("write conflist");
        let socket = dir.path().join("vcrid.sock");
        let config_path = dir.path().join("config.toml");
        let config = format!(
            "listen = \"unix://{}\"\nstate_dir = {:?}\nrun_dir = {:?}\ncgroup_root = \"own\"\n\n[hypervisor]\nkernel = {:?}\ninitrd = {:?}\n\n[agent]\ndial_timeout_ms = 60000\n\n[network]\nconf_dir = {:?}\nwrite_default_conflist = false\n\n[annotations]\nallowed = [\"io.virtcontainers.memory_mib\"]\n",
            socket.display(),
            dir.path().join("state"),
            dir.path().join("run"),
            guest.join("vmlinux"),
            guest.join("initramfs.cpio"),
            conf_dir,
        ) + extra;
        std::fs::write(&config_path, config).expect("write config");
        Self {
            dir,
            socket,
            config_path,
            net,
            bridge,
            subnet_octet: octet,
            vcrid: None,
        }
    }

    /// Adds `lines` (`key = value` lines) at the top of vcrid's
    /// `[hypervisor]` section; call before [`CriEnv::start`].
    pub fn set_hypervisor(&self, lines: &str) {
        let config = std::fs::read_to_string(&self.config_path).expect("config");
        let config = config.replacen("[hypervisor]\n", &format!("[hypervisor]\n{lines}"), 1);
        std::fs::write(&self.config_path, config).expect("config");
    }

    /// A cgroup parent of this environment's own (under the test's cgroup,
    /// as `cgroup_root = "own"` roots it), checked by
    /// [`CriEnv::assert_no_pods_left`].
    pub fn cgroup_parent(&self, pod: &str) -> String {
        format!("/vcrtest{}/{pod}", self.subnet_octet)
    }

    pub fn gateway(&self) -> String {
        format!("10.211.{}.1", self.subnet_octet)
    }

    /// Starts `vcrid serve` and waits until its socket answers.
    pub async fn start(&mut self) {
        self.start_with_env(&[]).await;
    }

    /// [`CriEnv::start`] with extra environment variables (such as
    /// podsandbox's `VC_CRASH_AT` fail point).
    pub async fn start_with_env(&mut self, vars: &[(&str, &str)]) {
        assert!(self.vcrid.is_none(), "vcrid already runs");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("vcrid.log"))
            .expect("log");
        let child = Command::new(workspace_bin("vcrid"))
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            // VCRID_LOG (benchmarks, debugging) replaces the default filter.
            .env(
                "RUST_LOG",
                std::env::var("VCRID_LOG").unwrap_or_else(|_| "info,vcrid=debug,cri=debug".into()),
            )
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn vcrid");
        self.vcrid = Some(child);
        // vcrid binds its socket before it recovers the state a previous
        // vcrid left (connections wait in the backlog): answering an RPC is
        // what says recovery is over.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self
                .vcrid
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("vcrid exited at start ({status}): {}", self.log());
            }
            if self.answers().await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "vcrid did not answer: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The running vcrid's PID.
    pub fn pid(&self) -> Option<u32> {
        self.vcrid.as_ref().map(Child::id)
    }

    /// vcrid's own log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vcrid.log")).unwrap_or_default()
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.vcrid.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits (up to 60 s) for vcrid to end by itself — a fail point's
    /// SIGKILL — and returns how it ended.
    pub fn wait_ended(&mut self) -> std::process::ExitStatus {
        let mut child = self.vcrid.take().expect("vcrid runs");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("vcrid did not end: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait: a graceful stop (pods keep running).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.vcrid.take() {
            if let Ok(pid) = i32::try_from(c.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether vcrid answers a Version call (within 5 s).
    async fn answers(&self) -> bool {
        let Ok(channel) = unix_channel(&self.socket).await else {
            return false;
        };
        let mut client = RuntimeServiceClient::new(channel);
        let call = client.version(k8s_cri::v1::VersionRequest::default());
        matches!(
            tokio::time::timeout(Duration::from_secs(5), call).await,
            Ok(Ok(_))
        )
    }

    async fn channel(&self) -> Channel {
        unix_channel(&self.socket).await.expect("connect to vcrid")
    }

    pub async fn runtime(&self) -> Runtime {
        RuntimeServiceClient::new(self.channel().await)
    }

    pub async fn images(&self) -> Images {
        ImageServiceClient::new(self.channel().await)
    }

    /// Lines of `iptables-save` that mention this test's network.
    pub fn iptables_lines(&self) -> Vec<String> {
        let out = Command::new("iptables-save")
            .output()
            .expect("iptables-save");
        let subnet = format!("10.211.{}.", self.subnet_octet);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(&self.net) || l.contains(&subnet))
            .map(String::from)
            .collect()
    }

    /// Addresses host-local still has allocated in this test's network.
    pub fn ipam_allocations(&self) -> Vec<String> {
        let dir = self.dir.path().join("ipam").join(&self.net);
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("10."))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Interfaces enslaved to this test's bridge (one veth per live pod).
    pub fn bridge_ports(&self) -> Vec<String> {
        let dir = format!("/sys/class/net/{}/brif", self.bridge);
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Asserts nothing of any pod is left: processes, mounts, netns files,
    /// veths, IP allocations, iptables rules, pod state.
    pub fn assert_no_pods_left(&self) {
        let procs: Vec<_> = processes_mentioning(&self.dir.path().join("run"));
        assert!(procs.is_empty(), "processes left: {procs:?}");
        // The image store's own nodev,nosuid binds stay with the store.
        let store = self.dir.path().join("state/images");
        let own = [store.join("snapshots"), store.join("containers")];
        let mounts: Vec<_> = mounts_under(self.dir.path())
            .into_iter()
            .filter(|m| !own.iter().any(|o| Path::new(m) == o))
            .collect();
        assert!(mounts.is_empty(), "mounts left: {mounts:?}");
        let netns: Vec<_> = std::fs::read_dir(self.dir.path().join("run/netns"))
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(netns.is_empty(), "netns left: {netns:?}");
        assert!(
            self.bridge_ports().is_empty(),
            "veths left: {:?}",
            self.bridge_ports()
        );
        assert!(
            self.ipam_allocations().is_empty(),
            "IPs still allocated: {:?}",
            self.ipam_allocations()
        );
        assert!(
            self.iptables_lines().is_empty(),
            "iptables rules left: {:?}",
            self.iptables_lines()
        );
        for (mount, own) in podsandbox::cgroup::hierarchies() {
            let parent = mount
                .join(own)
                .join(format!("vcrtest{}", self.subnet_octet));
            assert!(!parent.exists(), "cgroup left: {}", parent.display());
        }
        for sub in [
            "state/sandboxes",
            "state/cri/pods",
            "state/cri/containers",
            "run",
        ] {
            let left: Vec<_> = std::fs::read_dir(self.dir.path().join(sub))
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| n != "netns" && n != "vcrid.sock")
                        .collect()
                })
                .unwrap_or_default();
            assert!(left.is_empty(), "{sub} left: {left:?}");
        }
    }

    /// Stop and remove every pod through the CRI (best effort, bounded).
    fn remove_all_pods(&self) {
        remove_all_pods_blocking(&self.socket);
    }
}

/// A gRPC channel to a CRI server on a unix socket (vcrid, or containerd
/// for the benchmark's baseline).
pub async fn unix_channel(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = socket.to_path_buf();
    Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
}

/// Stops and removes every pod of the CRI server on `socket` (best effort,
/// bounded to 120 s), from a thread of its own: callable from a `Drop`.
pub fn remove_all_pods_blocking(socket: &Path) {
    let this = CriClientOnly {
        socket: socket.to_path_buf(),
    };
    let done = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let _ = tokio::time::timeout(Duration::from_secs(120), this.remove_all()).await;
        });
    });
    let _ = done.join();
}

/// Enough of the environment to talk to vcrid from the cleanup thread.
struct CriClientOnly {
    socket: PathBuf,
}

impl CriClientOnly {
    async fn remove_all(&self) {
        if tokio::net::UnixStream::connect(&self.socket).await.is_err() {
            return;
        }
        let Ok(channel) = unix_channel(&self.socket).await else {
            return;
        };
        let mut rt = RuntimeServiceClient::new(channel);
        let Ok(pods) = rt
            .list_pod_sandbox(k8s_cri::v1::ListPodSandboxRequest { filter: None })
            .await
        else {
            return;
        };
        for pod in pods.into_inner().items {
            let _ = rt
                .stop_pod_sandbox(k8s_cri::v1::StopPodSandboxRequest {
                    pod_sandbox_id: pod.id.clone(),
                })
                .await;
            let _ = rt
                .remove_pod_sandbox(k8s_cri::v1::RemovePodSandboxRequest {
                    pod_sandbox_id: pod.id,
                })
                .await;
        }
    }
}

/// How much of vcrid's log a failed test prints.
const LOG_TAIL_LINES: usize = 200;
/// And of each VM's console and QEMU log.
const CONSOLE_TAIL_LINES: usize = 40;

impl Drop for CriEnv {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The evidence goes with the failure (the dir is removed).
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- the last {} lines of vcrid's log ---\n{}\n--- end of vcrid's log ---",
                LOG_TAIL_LINES.min(lines.len()),
                lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
            );
            for vm in std::fs::read_dir(self.dir.path().join("run"))
                .into_iter()
                .flatten()
                .flatten()
            {
                for log in ["console.log", "qemu.log"] {
                    let text = std::fs::read_to_string(vm.path().join(log)).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    eprintln!(
                        "--- the last lines of {}'s {log} ---\n{}",
                        vm.file_name().to_string_lossy(),
                        lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..].join("\n")
                    );
                }
            }
        }
        if self.vcrid.is_none() {
            // Pods (or half-made ones) outlived a killed vcrid: start one,
            // whose recovery and RemovePodSandbox remove them.
            self.start_quietly();
        }
        self.remove_all_pods();
        self.stop();
        for (pid, _) in processes_mentioning(self.dir.path()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        crate::reap_orphaned_vmms();
        let mut mounts = mounts_under(self.dir.path());
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
    }
}

impl CriEnv {
    /// Starts vcrid without waiting in async code (for the drop guard).
    fn start_quietly(&mut self) {
        let child = Command::new(workspace_bin("vcrid"))
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        if let Ok(child) = child {
            self.vcrid = Some(child);
            for _ in 0..400 {
                if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// RunPodSandbox (its log directory made first); the pod's ID.
pub async fn run_pod(rt: &mut Runtime, config: k8s_cri::v1::PodSandboxConfig) -> String {
    std::fs::create_dir_all(&config.log_directory).expect("log dir");
    rt.run_pod_sandbox(k8s_cri::v1::RunPodSandboxRequest {
        config: Some(config),
        runtime_handler: String::new(),
    })
    .await
    .expect("RunPodSandbox")
    .into_inner()
    .pod_sandbox_id
}

/// StopPodSandbox then RemovePodSandbox.
pub async fn remove_pod(rt: &mut Runtime, pod: &str) {
    rt.stop_pod_sandbox(k8s_cri::v1::StopPodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .expect("StopPodSandbox");
    rt.remove_pod_sandbox(k8s_cri::v1::RemovePodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .expect("RemovePodSandbox");
}

/// CreateContainer then StartContainer; the container's ID.
pub async fn create_started(
    rt: &mut Runtime,
    pod: &str,
    sandbox: &k8s_cri::v1::PodSandboxConfig,
    config: k8s_cri::v1::ContainerConfig,
) -> String {
    let id = rt
        .create_container(k8s_cri::v1::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(sandbox.clone()),
        })
        .await
        .expect("CreateContainer")
        .into_inner()
        .container_id;
    rt.start_container(k8s_cri::v1::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .expect("StartContainer");
    id
}

/// Starts busybox `httpd` on port 80 in `pod`, serving `text` at `/`,
/// and waits until its log says it serves; the container's ID.
pub async fn start_httpd(
    rt: &mut Runtime,
    pod: &str,
    sandbox: &k8s_cri::v1::PodSandboxConfig,
    image: &str,
    text: &str,
) -> String {
    let script = format!(
        "mkdir -p /www && echo {text} > /www/index.html && echo serving && exec httpd -f -p 80 -h /www"
    );
    let config = container_config(image, "httpd", &["/bin/sh", "-c", &script]);
    let id = Box::pin(create_started(rt, pod, sandbox, config)).await;
    let log = Path::new(&sandbox.log_directory).join("httpd.log");
    let out = wait_for_log(&log, "serving").await;
    assert!(out.contains(" stdout F serving"), "{out}");
    id
}

/// The busybox image every CRI test runs (root, `sh` by default), pushed
/// as `busybox:<tag>`; returns its reference.
pub async fn push_busybox(registry: &crate::registry::Registry, tag: &str) -> String {
    use crate::registry::{busybox_entries, layer, Comp, TestImage};
    let mut image = TestImage::new(vec![layer(&busybox_entries(), Comp::Gzip)]);
    image.config = serde_json::json!({"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"});
    registry.push_image("busybox", tag, &image).await;
    format!("{}/busybox:{tag}", registry.host())
}

impl CriEnv {
    /// PullImage through this vcrid; the image ID.
    pub async fn pull(&self, image: &str) -> String {
        self.images()
            .await
            .pull_image(k8s_cri::v1::PullImageRequest {
                image: Some(k8s_cri::v1::ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                auth: None,
                sandbox_config: None,
            })
            .await
            .expect("PullImage")
            .into_inner()
            .image_ref
    }
}

/// Reads `path` (a CRI log file) until it holds `needle` or 60 s pass.
pub async fn wait_for_log(path: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in {}: {text:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// ContainerStatus (not verbose) of `id`.
pub async fn container_status(rt: &mut Runtime, id: &str) -> k8s_cri::v1::ContainerStatus {
    rt.container_status(k8s_cri::v1::ContainerStatusRequest {
        container_id: id.into(),
        verbose: false,
    })
    .await
    .expect("ContainerStatus")
    .into_inner()
    .status
    .expect("status")
}

/// A pod config as kubelet sends one: metadata (uid `uid-<name>`), host
/// name, and a log directory under the environment's dir.
pub fn pod_config(env: &CriEnv, name: &str, namespace: &str) -> k8s_cri::v1::PodSandboxConfig {
    k8s_cri::v1::PodSandboxConfig {
        metadata: Some(k8s_cri::v1::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: namespace.into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: env.dir.path().join("logs").join(name).display().to_string(),
        ..Default::default()
    }
}

/// [`pod_config`] of a privileged pod (its containers may be privileged).
pub fn privileged_pod_config(
    env: &CriEnv,
    name: &str,
    namespace: &str,
) -> k8s_cri::v1::PodSandboxConfig {
    let mut config = pod_config(env, name, namespace);
    config.linux = Some(k8s_cri::v1::LinuxPodSandboxConfig {
        security_context: Some(k8s_cri::v1::LinuxSandboxSecurityContext {
            privileged: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    config
}

/// `config`, privileged.
pub fn privileged(mut config: k8s_cri::v1::ContainerConfig) -> k8s_cri::v1::ContainerConfig {
    config.linux = Some(k8s_cri::v1::LinuxContainerConfig {
        security_context: Some(k8s_cri::v1::LinuxContainerSecurityContext {
            privileged: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    config
}

/// A busybox container config running `command`, logging to `<name>.log`.
pub fn container_config(image: &str, name: &str, command: &[&str]) -> k8s_cri::v1::ContainerConfig {
    k8s_cri::v1::ContainerConfig {
        metadata: Some(k8s_cri::v1::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(k8s_cri::v1::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

/// A started vcrid with busybox pulled: the environment, the registry it
/// was pulled from (kept running), the image and a RuntimeService client.
#[allow(missing_debug_implementations)] // the registry is a running server
pub struct BusyboxEnv {
    pub env: CriEnv,
    pub registry: crate::registry::Registry,
    pub image: String,
    pub rt: Runtime,
}

/// [`CriEnv::new`] with `hypervisor` lines ([`CriEnv::set_hypervisor`]),
/// started, busybox pushed as `tag` and pulled.
pub async fn busybox_env(octet: u8, hypervisor: &str, tag: &str) -> BusyboxEnv {
    let mut env = CriEnv::new(octet);
    env.set_hypervisor(hypervisor);
    let registry = crate::registry::Registry::start().await;
    let image = push_busybox(&registry, tag).await;
    env.start().await;
    env.pull(&image).await;
    let rt = env.runtime().await;
    BusyboxEnv {
        env,
        registry,
        image,
        rt,
    }
}

/// The `info` of verbose PodSandboxStatus, parsed: `vm` holds the
/// VM's pid, helper_pids, vcpus and memory_mib.
pub async fn pod_info(rt: &mut Runtime, pod: &str) -> serde_json::Value {
    let info = rt
        .pod_sandbox_status(k8s_cri::v1::PodSandboxStatusRequest {
            pod_sandbox_id: pod.into(),
            verbose: true,
        })
        .await
        .expect("PodSandboxStatus")
        .into_inner()
        .info;
    serde_json::from_str(info.get("info").expect("verbose info")).expect("json")
}

/// The host PSS (`smaps_rollup`) of a pod's VMM and its helpers, in MiB.
pub async fn pod_pss_mib(rt: &mut Runtime, pod: &str) -> f64 {
    let v = pod_info(rt, pod).await;
    let mut pids = vec![v["vm"]["pid"].as_i64().expect("pid")];
    if let Some(h) = v["vm"]["helper_pids"].as_array() {
        pids.extend(h.iter().filter_map(serde_json::Value::as_i64));
    }
    let kib: u64 = pids.into_iter().map(pss_kib).sum();
    kib as f64 / 1024.0
}

/// A process's proportional set size in KiB (`smaps_rollup`).
pub fn pss_kib(pid: i64) -> u64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/smaps_rollup: {e}"));
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no Pss in /proc/{pid}/smaps_rollup"))
}

/// The PID of a pod's QEMU, from verbose PodSandboxStatus.
pub async fn qemu_pid(rt: &mut Runtime, pod: &str) -> i32 {
    let pid = pod_info(rt, pod).await["vm"]["pid"]
        .as_i64()
        .expect("the VM's pid");
    i32::try_from(pid).expect("pid")
}

/// CPU and memory limits as kubelet sends them (`cpu_period` 100 ms).
pub fn limits(millicpus: i64, memory_mib: i64) -> k8s_cri::v1::LinuxContainerResources {
    k8s_cri::v1::LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: millicpus * 100,
        memory_limit_in_bytes: memory_mib << 20,
        ..Default::default()
    }
}

/// `/bin/sh -c script` in a container through ExecSync: exit code and
/// stdout followed by stderr.
pub async fn exec_sh(rt: &mut Runtime, id: &str, script: &str) -> (i32, String) {
    let out = rt
        .exec_sync(k8s_cri::v1::ExecSyncRequest {
            container_id: id.into(),
            cmd: vec!["/bin/sh".into(), "-c".into(), script.into()],
            timeout: 300,
        })
        .await
        .expect("ExecSync")
        .into_inner();
    (
        out.exit_code,
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// GET / over plain TCP (no client library: a raw request), retried for
/// up to ~20 s until it answers 200.
pub fn http_get(addr: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut last = String::new();
    for _ in 0..100 {
        match std::net::TcpStream::connect_timeout(
            &addr.parse().expect("addr"),
            Duration::from_secs(5),
        ) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(10))).ok();
                s.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("send");
                let mut body = String::new();
                let _ = s.read_to_string(&mut body);
                if body.contains("200") {
                    return body;
                }
                last = body;
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("GET {addr} failed: {last}");
}

/// The VM factory's status from verbose Status (`info.factory`).
pub async fn factory_status(rt: &mut Runtime) -> serde_json::Value {
    let info = rt
        .status(k8s_cri::v1::StatusRequest { verbose: true })
        .await
        .expect("Status")
        .into_inner()
        .info;
    serde_json::from_str(info.get("factory").map_or("{}", String::as_str)).expect("json")
}
