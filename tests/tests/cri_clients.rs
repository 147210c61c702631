//! Real CRI clients of other languages against vcrid: gRPC-Go dialing the
//! way kubelet and crictl of Kubernetes 1.26 do (the socket path goes out as
//! HTTP/2 :authority) and grpcio from PyPI (the path percent-encoded). First
//! against the fake tonic server with and without `cri::grpc_authority`, so
//! that passing proves the layer is what makes them work; then against a
//! real vcrid with a real pod VM.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::large_futures
)]

use std::time::Duration;

use tests::cri::CriEnv;
use tests::interop::{json_of, GoClient, PythonClient};
use tests::registry as support;

const CALL: Duration = Duration::from_secs(120);

/// The fake server (`vc.test.Echo`, and RuntimeService with only Version)
/// on a temp socket, with or without the layer; stops when dropped.
struct Fake {
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    _stop: tokio::sync::oneshot::Sender<()>,
}

fn fake(rewrite: bool) -> Fake {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fake.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(cri::grpc_authority::fake::serve(listener, rewrite, async {
        let _ = stopped.await;
    }));
    Fake {
        _dir: dir,
        socket,
        _stop: stop,
    }
}

#[tokio::test]
async fn go_and_python_clients_fail_without_the_layer_and_work_with_it() {
    let go = GoClient::build();
    let python = PythonClient::build();
    if let Err(why) = &go {
        println!("SKIPPED (Go): {why}");
    }
    if let Err(why) = &python {
        println!("SKIPPED (Python): {why}");
    }
    let without = fake(false);
    let with = fake(true);
    if let Ok(go) = &go {
        let out = go.run(&without.socket, &["version"], CALL).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "Go without the layer: {stderr}");
        assert!(stderr.contains("PROTOCOL_ERROR"), "{stderr}");
        let v = json_of(
            "Go version",
            &go.run(&with.socket, &["version"], CALL).await,
        );
        assert_eq!(
            v["runtime_name"],
            cri::grpc_authority::fake::FAKE_RUNTIME_NAME
        );
        assert_eq!(v["runtime_api_version"], "v1");
    }
    if let Ok(python) = &python {
        let out = python.run(&without.socket, "version", CALL).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "Python without the layer: {stderr}");
        let v = json_of(
            "Python version",
            &python.run(&with.socket, "version", CALL).await,
        );
        assert_eq!(
            v["runtime_name"],
            cri::grpc_authority::fake::FAKE_RUNTIME_NAME
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_and_python_clients_drive_a_real_vcrid() {
    let go = match GoClient::build() {
        Ok(go) => go,
        Err(why) => {
            println!("SKIPPED: {why}");
            return;
        }
    };
    let python = match PythonClient::build() {
        Ok(p) => p,
        Err(why) => {
            println!("SKIPPED: {why}");
            return;
        }
    };
    tests::become_subreaper();
    let registry = support::Registry::start().await;
    let image = tests::cri::push_busybox(&registry, "clients").await;
    let mut env = CriEnv::new(61);
    env.start().await;
    env.pull(&image).await;
    let socket = env.socket.clone();

    let v = json_of("Go version", &go.run(&socket, &["version"], CALL).await);
    assert_eq!(v["runtime_name"], cri::RUNTIME_NAME);
    assert_eq!(v["runtime_api_version"], cri::RUNTIME_API_VERSION);
    let s = json_of("Go status", &go.run(&socket, &["status"], CALL).await);
    assert_eq!(s["conditions"]["RuntimeReady"], true, "{s}");
    assert_eq!(s["conditions"]["NetworkReady"], true, "{s}");

    let v = json_of(
        "Python version",
        &python.run(&socket, "version", CALL).await,
    );
    assert_eq!(v["runtime_name"], cri::RUNTIME_NAME);
    let pods = json_of("Python list", &python.run(&socket, "list-pods", CALL).await);
    assert_eq!(pods["pods"], serde_json::json!([]));

    // The pod flow through gRPC-Go, in a real VM (TCG may be slow).
    let pod = serde_json::json!({
        "metadata": {"name": "goclient", "namespace": "interop", "uid": "goclient-1", "attempt": 0},
        "hostname": "gopod",
        "log_directory": env.dir.path().join("logs/goclient").display().to_string(),
    });
    let ctr = serde_json::json!({
        "metadata": {"name": "waiter", "attempt": 0},
        "image": {"image": image},
        "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"],
        "log_path": "waiter.log",
    });
    let pod_file = env.dir.path().join("go-pod.json");
    let ctr_file = env.dir.path().join("go-ctr.json");
    std::fs::write(&pod_file, pod.to_string()).unwrap();
    std::fs::write(&ctr_file, ctr.to_string()).unwrap();
    let flow = go
        .run(
            &socket,
            &[
                "pod-flow",
                "-pod",
                pod_file.to_str().unwrap(),
                "-container",
                ctr_file.to_str().unwrap(),
            ],
            Duration::from_secs(900),
        )
        .await;
    let flow = json_of("Go pod-flow", &flow);
    assert_eq!(flow["exec_stdout"], "hello from gopod\n", "{flow}");
    assert_eq!(flow["exec_exit_code"], 0, "{flow}");
    assert_eq!(flow["event"], "CONTAINER_STOPPED_EVENT", "{flow}");
    assert_eq!(flow["state_after_stop"], "CONTAINER_EXITED", "{flow}");
    assert_eq!(flow["pods_left"], 0, "{flow}");

    let pods = json_of("Python list", &python.run(&socket, "list-pods", CALL).await);
    assert_eq!(pods["pods"], serde_json::json!([]));
    env.assert_no_pods_left();
}
