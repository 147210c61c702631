//! The fail points of vcrid's multi-step calls, in the order their steps
//! run (vcrid's own and podsandbox's; see `podsandbox::failpoint`). The
//! unit tests arm each to fail (`runtime/step_failures.rs`), the end-to-end
//! tests to SIGKILL vcrid there (`tests/tests/cri_crash.rs`).

/// RunPodSandbox: network, VM spawned, guest ready, sandbox created and started.
pub const RUN_POD_SANDBOX: &[&str] = &[
    "run_pod_sandbox.network_set_up",
    "create_sandbox.vm_spawned",
    "create_sandbox.guest_ready",
    "run_pod_sandbox.sandbox_created",
    "run_pod_sandbox.sandbox_started",
];

/// RunPodSandbox with a warm pool: a warm VM taken (its record saved,
/// nothing of the pod's done to it yet), then configured for the pod.
pub const RUN_POD_SANDBOX_FROM_POOL: &[&str] =
    &["create_sandbox.claimed", "create_sandbox.guest_ready"];

/// CreateContainer: rootfs prepared, container made in the guest, recorded
/// by podsandbox.
pub const CREATE_CONTAINER: &[&str] = &[
    "create_container.rootfs_prepared",
    "create_container.guest_created",
    "create_container.container_created",
];
