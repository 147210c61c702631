//! The guest agent serves only the host: a connection to its API port or
//! its port forwarder that does not begin with the VM's secret is closed
//! unanswered; the same connection with the secret is served.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use agent::{AgentSecret, Endpoint};
use podsandbox::{Runtime, SandboxConfig};
use tests::TestEnv;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Connects to `port` through the hybrid vsock device and returns the
/// stream after the device's `OK`.
async fn connect(uds: &std::path::Path, port: u32) -> tokio::net::UnixStream {
    let mut s = tokio::net::UnixStream::connect(uds)
        .await
        .expect("connect to the vsock device");
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .expect("CONNECT");
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte).await.expect("device reply") == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    assert!(line.starts_with(b"OK "), "device: {line:?}");
    s
}

/// Sends `first` and expects the agent to close the connection without a
/// byte of answer (well within its authentication timeout).
async fn refused(uds: &std::path::Path, port: u32, first: &[u8]) {
    let mut s = connect(uds, port).await;
    // A write may fail once the agent has closed: that is a refusal too.
    let _ = s.write_all(first).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        agent::auth::AUTH_TIMEOUT + Duration::from_secs(10),
        s.read_to_end(&mut buf),
    )
    .await
    .expect("the agent closes an unauthenticated connection");
    // A reset instead of an orderly close is a refusal as well.
    if read.is_ok() {
        assert!(
            buf.is_empty(),
            "port {port} answered {:?} to {first:?}",
            String::from_utf8_lossy(&buf)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_connections_without_the_vms_secret() {
    let env = TestEnv::new();
    let rt = Runtime::new(env.config.clone()).expect("runtime");
    let id = "auth";
    rt.create_sandbox(SandboxConfig {
        id: id.into(),
        ..Default::default()
    })
    .await
    .expect("create");
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(env.state_dir(id).join("state.json")).expect("record"),
    )
    .expect("record parses");
    let secret = AgentSecret::from_hex(
        record["vm"]["agent_secret"]
            .as_str()
            .expect("the record keeps the VM's secret"),
    )
    .expect("64 hex digits");
    let uds = env.run_dir(id).join("vsock.sock");
    // The secret is on no command line of the VM's processes.
    for (pid, cmdline) in env.processes() {
        assert!(
            !cmdline.contains(&secret.to_hex()),
            "pid {pid} carries the secret: {cmdline}"
        );
    }

    // The ttrpc API: a request right away, a wrong secret, a bare line.
    let ttrpc_header = [0u8, 0, 0, 16, 0, 0, 0, 1, 1, 0];
    refused(&uds, agent::AGENT_VSOCK_PORT, &ttrpc_header).await;
    let wrong = AgentSecret::generate().expect("random").auth_line();
    refused(&uds, agent::AGENT_VSOCK_PORT, wrong.as_bytes()).await;
    refused(&uds, agent::AGENT_VSOCK_PORT, b"AUTH\n").await;
    // The port forwarder: its header without the secret gets no OK/ERR.
    refused(&uds, agent::FORWARD_VSOCK_PORT, b"PORT 22\n").await;
    refused(
        &uds,
        agent::FORWARD_VSOCK_PORT,
        format!("{}PORT 22\n", wrong).as_bytes(),
    )
    .await;

    // With the secret, the same ports serve.
    let ep = Endpoint::Hybrid {
        uds: uds.clone(),
        port: agent::AGENT_VSOCK_PORT,
    };
    let socket = agent::dial(&ep, Some(&secret)).await.expect("dial");
    let client = agent::ttrpc::asynchronous::Client::new(socket);
    let health = agent::protocol::agent_ttrpc::HealthClient::new(client);
    let reply = health
        .check(
            agent::ttrpc::context::with_timeout(Duration::from_secs(10).as_nanos() as i64),
            &agent::protocol::agent::CheckRequest::new(),
        )
        .await
        .expect("an authenticated check is answered");
    assert_eq!(
        reply.status.enum_value_or_default(),
        agent::protocol::agent::check_response::ServingStatus::SERVING
    );
    // Nothing listens on port 22 in the guest: the forwarder answers ERR,
    // which proves it read the header after the secret.
    let err = agent::dial_forward(&ep, Some(&secret), 22)
        .await
        .err()
        .expect("nothing listens on 22");
    assert!(
        matches!(err, agent::DialError::Forward { port: 22, .. }),
        "{err}"
    );
    // Still serving after the refusals.
    rt.status_sandbox(id).await.expect("status");

    if std::path::Path::new("/dev/vhost-vsock").exists() {
        eprintln!("note: kernel vsock exists here, but this test boots hybrid vsock only");
    } else {
        eprintln!(
            "skipped: the kernel vsock half (peer CID check from a host socket): this host has no /dev/vhost-vsock"
        );
    }
    rt.stop_sandbox(id).await.expect("stop");
    rt.delete_sandbox(id).await.expect("delete");
    env.assert_nothing_left(id);
}
