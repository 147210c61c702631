//! A pod's VM follows its containers while it runs: a pod that declared no
//! resources boots at the defaults (1 vCPU, 256 MiB); CreateContainer of a
//! container with limits hot-plugs vCPUs (ACPI) and memory (virtio-mem) so
//! the guest has them; the cgroup limit inside still holds (an allocation
//! within it runs, one past it is OOMKilled); UpdateContainerResources
//! grows the VM further; removing a container gives its memory back
//! (unplugged; vCPUs stay under TCG, see `hypervisor::qemu::resize`); a
//! request beyond the maximum is
//! refused naming the field, leaving the pod as it was.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::large_futures
)]

use std::time::Instant;

use k8s_cri::v1 as cri;
use tests::cri::{
    busybox_env, container_config, container_status, create_started, exec_sh, limits, pod_config,
    pod_info, remove_pod, run_pod, BusyboxEnv, Runtime,
};

fn with_limits(
    mut c: cri::ContainerConfig,
    r: cri::LinuxContainerResources,
) -> cri::ContainerConfig {
    c.linux.get_or_insert_with(Default::default).resources = Some(r);
    c
}

/// A started `sleep 3600` container with `r`.
async fn sleeper(
    rt: &mut Runtime,
    pod: &str,
    cfg: &cri::PodSandboxConfig,
    image: &str,
    name: &str,
    r: cri::LinuxContainerResources,
) -> String {
    let c = with_limits(container_config(image, name, &["/bin/sleep", "3600"]), r);
    create_started(rt, pod, cfg, c).await
}

/// `nproc` and MemTotal (KiB) as the container sees them.
async fn guest_size(rt: &mut Runtime, id: &str) -> (u32, u64) {
    let (code, text) = exec_sh(rt, id, "nproc; grep MemTotal /proc/meminfo").await;
    assert_eq!(code, 0, "{text}");
    let mut lines = text.lines();
    let cpus = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect(&text);
    let mem = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .expect(&text);
    (cpus, mem)
}

/// The VM's size as PodSandboxStatus (verbose) reports it.
async fn vm_size(rt: &mut Runtime, pod: &str) -> (u64, u64) {
    let detail = pod_info(rt, pod).await;
    (
        detail["vm"]["vcpus"].as_u64().expect("vcpus"),
        detail["vm"]["memory_mib"].as_u64().expect("memory_mib"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_vm_grows_and_shrinks_with_its_containers() {
    tests::become_subreaper();
    let BusyboxEnv {
        mut env,
        registry: _registry,
        image,
        mut rt,
    } = busybox_env(69, "max_memory_mib = 4096\nmax_vcpus = 4\n", "hotplug").await;

    // No declared resources: the defaults.
    let cfg = pod_config(&env, "hotplug", "hotplug");
    let pod = run_pod(&mut rt, cfg.clone()).await;
    assert_eq!(vm_size(&mut rt, &pod).await, (1, 256));

    // 2 CPUs and 1 GiB: the VM grows to 2 vCPUs and 1024 + 128 MiB.
    let started = Instant::now();
    let big = sleeper(&mut rt, &pod, &cfg, &image, "big", limits(2000, 1024)).await;
    eprintln!(
        "create+start with hot-plug of 1 vCPU + 896 MiB: {:?}",
        started.elapsed()
    );
    assert_eq!(vm_size(&mut rt, &pod).await, (2, 1152));
    let (cpus, mem_kib) = guest_size(&mut rt, &big).await;
    assert_eq!(cpus, 2);
    assert!(mem_kib >= 1024 * 1024, "MemTotal {mem_kib} kB");

    // Within the container's limit, 800 MiB are allocated and touched.
    let (code, text) = exec_sh(
        &mut rt,
        &big,
        "dd if=/dev/zero of=/dev/null bs=800M count=1 2>&1 && echo allocated",
    )
    .await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("allocated"), "{text}");

    // Past its own limit a container is OOM-killed, by its cgroup (the VM
    // has room: it grew by this container's 512 MiB too).
    let hungry = create_started(
        &mut rt,
        &pod,
        &cfg,
        with_limits(
            container_config(
                &image,
                "hungry",
                &[
                    "/bin/dd",
                    "if=/dev/zero",
                    "of=/dev/null",
                    "bs=700M",
                    "count=1",
                ],
            ),
            limits(0, 512),
        ),
    )
    .await;
    assert_eq!(vm_size(&mut rt, &pod).await, (2, 1664));
    let status = loop {
        let s = container_status(&mut rt, &hungry).await;
        if s.state == cri::ContainerState::ContainerExited as i32 {
            break s;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(status.reason, "OOMKilled", "{status:?}");
    assert_eq!(status.exit_code, 137);
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: hungry.clone(),
    })
    .await
    .expect("RemoveContainer");
    assert_eq!(
        vm_size(&mut rt, &pod).await,
        (2, 1152),
        "its 512 MiB given back"
    );

    // UpdateContainerResources to 3 CPUs and 2 GiB: the guest sees them.
    let started = Instant::now();
    rt.update_container_resources(cri::UpdateContainerResourcesRequest {
        container_id: big.clone(),
        linux: Some(limits(3000, 2048)),
        ..Default::default()
    })
    .await
    .expect("UpdateContainerResources");
    eprintln!(
        "update with hot-plug of 1 vCPU + 1 GiB: {:?}",
        started.elapsed()
    );
    assert_eq!(vm_size(&mut rt, &pod).await, (3, 2176));
    let (cpus, mem_kib) = guest_size(&mut rt, &big).await;
    assert_eq!(cpus, 3);
    assert!(mem_kib >= 2048 * 1024, "MemTotal {mem_kib} kB");
    let applied = container_status(&mut rt, &big).await;
    let r = applied.resources.and_then(|r| r.linux).expect("resources");
    assert_eq!(
        (r.memory_limit_in_bytes, r.cpu_quota),
        (2048 << 20, 300_000)
    );

    // A second container grows the VM by its request; removing it shrinks
    // the VM back: its memory is unplugged.
    let second = sleeper(&mut rt, &pod, &cfg, &image, "second", limits(1000, 512)).await;
    assert_eq!(vm_size(&mut rt, &pod).await, (4, 2688));
    assert_eq!(guest_size(&mut rt, &second).await.0, 4);
    let grown_kib = guest_size(&mut rt, &big).await.1;
    rt.stop_container(cri::StopContainerRequest {
        container_id: second.clone(),
        timeout: 0,
    })
    .await
    .expect("StopContainer");
    // TERM ended it; the KILL that follows at once (timeout 0) meets that
    // exit, which is no error (agent/guest/src/container_kill.rs).
    let stopped = container_status(&mut rt, &second).await;
    assert_eq!(
        (stopped.state, stopped.exit_code),
        (cri::ContainerState::ContainerExited as i32, 143),
        "{stopped:?}"
    );
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: second.clone(),
    })
    .await
    .expect("RemoveContainer");
    // Under TCG (all this machine runs) QEMU cannot unplug a vCPU: the VM
    // keeps its 4; on KVM it would go back to 3.
    assert_eq!(vm_size(&mut rt, &pod).await, (4, 2176));
    let (cpus, shrunk_kib) = guest_size(&mut rt, &big).await;
    assert_eq!(cpus, 4);
    assert!(
        shrunk_kib + 500 * 1024 <= grown_kib,
        "MemTotal {grown_kib} kB → {shrunk_kib} kB"
    );

    // Beyond max_memory_mib: refused, naming the field; nothing changes.
    let err = rt
        .update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: big.clone(),
            linux: Some(limits(3000, 8192)),
            ..Default::default()
        })
        .await
        .expect_err("beyond max_memory_mib");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("memory_limit_in_bytes"), "{err:?}");
    assert_eq!(vm_size(&mut rt, &pod).await, (4, 2176));
    let err = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(with_limits(
                container_config(&image, "greedy", &["/bin/true"]),
                limits(2000, 0),
            )),
            sandbox_config: Some(cfg.clone()),
        })
        .await
        .expect_err("beyond max_vcpus");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("cpu_quota"), "{err:?}");

    remove_pod(&mut rt, &pod).await;
    env.assert_no_pods_left();
    env.stop();
}

/// microvm has no CPU or memory hot-plug: a container that would need the
/// VM to grow is refused saying so (FailedPrecondition), nothing is left of
/// it, and a pod that declares its resources is sized at boot instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_refuses_to_grow_and_sizes_at_boot() {
    tests::become_subreaper();
    let BusyboxEnv {
        mut env,
        registry: _registry,
        image,
        mut rt,
    } = busybox_env(
        70,
        "machine = \"microvm\"\nmax_memory_mib = 2048\nmax_vcpus = 2\n",
        "microvm",
    )
    .await;

    let cfg = pod_config(&env, "small", "microvm");
    let pod = run_pod(&mut rt, cfg.clone()).await;
    let err = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(with_limits(
                container_config(&image, "big", &["/bin/sleep", "3600"]),
                limits(1000, 1024),
            )),
            sandbox_config: Some(cfg.clone()),
        })
        .await
        .expect_err("microvm cannot grow");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains("microvm has no CPU or memory hot-plug"),
        "{err:?}"
    );
    let listed = rt
        .list_containers(cri::ListContainersRequest { filter: None })
        .await
        .expect("ListContainers")
        .into_inner()
        .containers;
    assert!(listed.is_empty(), "{listed:?}");
    // Within the boot size a container with limits is fine.
    let fits = sleeper(&mut rt, &pod, &cfg, &image, "fits", limits(1000, 64)).await;
    assert_eq!(guest_size(&mut rt, &fits).await.0, 1);
    remove_pod(&mut rt, &pod).await;

    // Declared resources size the VM at boot.
    let mut cfg = pod_config(&env, "declared", "microvm");
    cfg.linux = Some(cri::LinuxPodSandboxConfig {
        resources: Some(limits(2000, 1024)),
        ..Default::default()
    });
    let pod = run_pod(&mut rt, cfg.clone()).await;
    let id = sleeper(&mut rt, &pod, &cfg, &image, "big", limits(2000, 1024)).await;
    let (cpus, mem_kib) = guest_size(&mut rt, &id).await;
    assert_eq!(cpus, 2);
    assert!(mem_kib >= 1024 * 1024, "MemTotal {mem_kib} kB");
    remove_pod(&mut rt, &pod).await;
    env.assert_no_pods_left();
    env.stop();
}
