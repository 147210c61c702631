//! RunPodSandbox and CreateContainer failing at each of their steps (fail
//! points armed to return an error), with the fakes: each failure leaves no
//! VM, network, sandbox, container, rootfs, record or name behind, and the
//! same request then succeeds. And a crash's leftovers — resources whose
//! record was never written — are removed by the next start's reconcile.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::large_futures
)]

use std::sync::Arc;

use cni::fake::FakeNetwork;
use hypervisor::fake::Op;
use imagestore::{fake::FakeImageService, ImageService as _};
use k8s_cri::v1 as cri;
use podsandbox::fake::{FakeDialer, FakeVms};

use crate::{
    config::{Config, RootfsKind},
    server::Cri,
};

use crate::fail_points::{CREATE_CONTAINER as CONTAINER_POINTS, RUN_POD_SANDBOX as POD_POINTS};

struct Harness {
    dir: tempfile::TempDir,
    cri: Cri,
    vms: Arc<FakeVms>,
    dialer: FakeDialer,
    net: Arc<FakeNetwork>,
    images: Arc<FakeImageService>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        podsandbox::fake::detach_mounts_under(self.dir.path());
    }
}

fn config(dir: &std::path::Path) -> Config {
    let mut config = Config {
        state_dir: dir.join("state"),
        run_dir: dir.join("run"),
        ..Default::default()
    };
    config.network.conf_dir = dir.join("cni");
    config.network.write_default_conflist = false;
    config.images.rootfs = RootfsKind::Block;
    config
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("rootfs")).expect("mkdir");
        let vms = Arc::new(FakeVms::default());
        let net = Arc::new(FakeNetwork::new().without_taps());
        let images = Arc::new(FakeImageService::in_dir(&dir.path().join("rootfs")));
        let dialer = FakeDialer::new(true);
        let cri = Self::cri_over(dir.path(), &vms, &dialer, &net, &images);
        Self {
            dir,
            cri,
            vms,
            dialer,
            net,
            images,
        }
    }

    /// A vcrid over these dirs and fakes: what a restart makes.
    fn cri_over(
        dir: &std::path::Path,
        vms: &Arc<FakeVms>,
        dialer: &FakeDialer,
        net: &Arc<FakeNetwork>,
        images: &Arc<FakeImageService>,
    ) -> Cri {
        let config = config(dir);
        let runtime = podsandbox::Runtime::with_parts(
            config.runtime(),
            vms.clone(),
            Arc::new(dialer.clone()),
        )
        .expect("runtime");
        let cni = cni::Cni::new(config.cni());
        Cri::with_parts(config, runtime, images.clone(), net.clone(), cni).expect("cri")
    }

    fn restart(&mut self) {
        self.cri = Self::cri_over(
            self.dir.path(),
            &self.vms,
            &self.dialer,
            &self.net,
            &self.images,
        );
    }

    fn arm(&self, point: &str) {
        self.cri.inner.runtime.fail_points().error_at(point);
    }

    fn disarm(&self) {
        self.cri.inner.runtime.fail_points().disarm();
    }

    async fn run_pod(&self, name: &str) -> crate::error::Result<String> {
        self.cri
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(pod_config(name)),
                runtime_handler: String::new(),
            })
            .await
            .map(|r| r.pod_sandbox_id)
    }

    async fn create(&self, pod: &str, name: &str) -> crate::error::Result<String> {
        self.cri
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(cri::ContainerConfig {
                    metadata: Some(cri::ContainerMetadata {
                        name: name.into(),
                        attempt: 0,
                    }),
                    image: Some(cri::ImageSpec {
                        image: "busybox".into(),
                        ..Default::default()
                    }),
                    command: vec!["sleep".into(), "1".into()],
                    ..Default::default()
                }),
                sandbox_config: Some(pod_config("web")),
            })
            .await
            .map(|r| r.container_id)
    }

    /// No pod of any kind is left: records, sandboxes, networks, run dirs,
    /// and every VM ever made has been stopped.
    async fn assert_no_pods(&self, context: &str) {
        assert!(self.cri.inner.store.pods().is_empty(), "{context}: pods");
        let sandboxes = self.cri.inner.runtime.list_sandboxes().await.expect("list");
        assert!(sandboxes.is_empty(), "{context}: sandboxes {sandboxes:?}");
        assert!(self.net.pods().is_empty(), "{context}: networks");
        for (id, vm) in self.vms.all() {
            assert!(
                vm.calls().contains(&Op::Stop),
                "{context}: VM of {id} not stopped: {:?}",
                vm.calls()
            );
        }
        let run: Vec<_> = std::fs::read_dir(self.dir.path().join("run"))
            .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(run.is_empty(), "{context}: run dirs {run:?}");
    }

    /// The pod has no container of any kind: records, in the sandbox,
    /// rootfs, shared-dir entries.
    async fn assert_no_containers(&self, pod: &str, context: &str) {
        assert!(
            self.cri.inner.store.containers().is_empty(),
            "{context}: records"
        );
        let in_vm = self
            .cri
            .inner
            .runtime
            .list_containers(pod)
            .await
            .expect("list");
        assert!(in_vm.is_empty(), "{context}: in the sandbox {in_vm:?}");
        let rootfs = self.images.rootfs_ids().expect("rootfs");
        assert!(rootfs.is_empty(), "{context}: rootfs {rootfs:?}");
        let shared: Vec<_> =
            std::fs::read_dir(self.dir.path().join("run").join(pod).join("shared"))
                .expect("shared dir")
                .flatten()
                .map(|e| e.file_name())
                .collect();
        assert!(shared.is_empty(), "{context}: shared {shared:?}");
    }
}

fn pod_config(name: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "steps".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_pod_that_fails_at_any_step_leaves_nothing_and_can_be_retried() {
    for point in POD_POINTS {
        let h = Harness::new();
        h.arm(point);
        let err = h.run_pod("web").await.expect_err(point);
        assert_eq!(err.code(), tonic::Code::Internal, "{point}: {err}");
        assert!(err.to_string().contains(point), "{point}: {err}");
        h.assert_no_pods(point).await;
        h.disarm();
        let id = h.run_pod("web").await.expect("the retry succeeds");
        assert_eq!(h.cri.inner.store.pods().len(), 1, "{point}");
        assert_eq!(h.net.pods(), vec![id], "{point}");
    }
}

#[tokio::test]
async fn a_container_that_fails_at_any_step_leaves_nothing_and_can_be_retried() {
    for point in CONTAINER_POINTS {
        let h = Harness::new();
        h.images.pull("busybox", None).await.expect("pull");
        let pod = h.run_pod("web").await.expect("pod");
        h.arm(point);
        let err = h.create(&pod, "app").await.expect_err(point);
        assert_eq!(err.code(), tonic::Code::Internal, "{point}: {err}");
        assert!(err.to_string().contains(point), "{point}: {err}");
        h.assert_no_containers(&pod, point).await;
        if *point != "create_container.rootfs_prepared" {
            let calls = h.dialer.calls();
            let created = calls.iter().position(|c| *c == "create_container");
            let removed = calls.iter().rposition(|c| *c == "remove_container");
            assert!(
                matches!((created, removed), (Some(c), Some(r)) if r > c),
                "{point}: the guest's container is removed: {calls:?}"
            );
        }
        h.disarm();
        h.create(&pod, "app").await.expect("the retry succeeds");
        assert_eq!(h.cri.inner.store.containers().len(), 1, "{point}");
    }
}

#[tokio::test]
async fn a_failed_undo_keeps_the_pod_notready_with_the_reason() {
    let h = Harness::new();
    h.arm("run_pod_sandbox.sandbox_started");
    h.net.fail_on("teardown");
    let err = h.run_pod("web").await.expect_err("injected");
    assert!(err.to_string().contains("sandbox_started"), "{err}");
    let pods = h.cri.inner.store.pods();
    assert_eq!(pods.len(), 1, "the pod is kept");
    let id = pods[0].id.clone();
    let status = h
        .cri
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.clone(),
            verbose: false,
        })
        .await
        .expect("status");
    let st = status.status.expect("status");
    assert_eq!(st.state, cri::PodSandboxState::SandboxNotready as i32);
    let reason = status.info.get("cleanup_error").expect("reason in info");
    assert!(reason.contains("tearing the network down"), "{reason}");
    // The name stays taken until the pod is removed (kubelet removes NOTREADY pods).
    let again = h.run_pod("web").await.expect_err("name held");
    assert_eq!(again.code(), tonic::Code::AlreadyExists, "{again}");
    // A remove that fails again keeps it, with the new reason.
    let err = h
        .cri
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .expect_err("teardown still fails");
    assert!(err.to_string().contains("teardown"), "{err}");
    let kept = h.cri.inner.store.pod(&id).expect("kept");
    assert!(
        kept.cleanup_error
            .as_deref()
            .is_some_and(|e| e.starts_with("RemovePodSandbox: ")),
        "{kept:?}"
    );
}

#[tokio::test]
async fn start_up_removes_what_no_record_names() {
    let mut h = Harness::new();
    h.images.pull("busybox", None).await.expect("pull");
    let kept_pod = h.run_pod("kept").await.expect("pod");
    let kept_container = h.create(&kept_pod, "kept").await.expect("container");
    let lost_container = h.create(&kept_pod, "lost").await.expect("container");
    let lost_pod = h.run_pod("lost").await.expect("pod");
    // What a crash before the records were written leaves: the resources
    // without their CRI records.
    let cri_dir = h.dir.path().join("state/cri");
    std::fs::remove_file(cri_dir.join(format!("pods/{lost_pod}.json"))).expect("rm");
    std::fs::remove_file(cri_dir.join(format!("containers/{lost_container}.json"))).expect("rm");
    // And a rootfs whose container record never was.
    h.images
        .prepare_rootfs("busybox", "stray", imagestore::RootfsMode::Block)
        .await
        .expect("rootfs");
    h.restart();
    let removed = h.cri.recover().await.expect("recover");
    assert_eq!(removed.sandboxes, vec![lost_pod.clone()]);
    assert_eq!(removed.networks, vec![lost_pod.clone()]);
    assert_eq!(removed.containers, vec![lost_container.clone()]);
    let mut rootfs = removed.rootfs.clone();
    rootfs.sort();
    let mut want = vec![lost_container.clone(), "stray".to_string()];
    want.sort();
    assert_eq!(rootfs, want);
    // What the records name is untouched.
    assert_eq!(h.net.pods(), vec![kept_pod.clone()]);
    let left: Vec<String> = h
        .cri
        .inner
        .runtime
        .list_containers(&kept_pod)
        .await
        .expect("list")
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(left, vec![kept_container.clone()]);
    assert_eq!(
        h.images.rootfs_ids().expect("rootfs"),
        vec![kept_container.clone()]
    );
    // A second start finds nothing more to do.
    h.restart();
    assert!(h.cri.recover().await.expect("recover").is_empty());
}
