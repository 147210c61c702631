//! Exec, Attach and PortForward through a real vcrid: the URL from the CRI
//! call, then the streaming server over SPDY/3.1 (kubectl's and crictl's
//! transport) and over WebSocket (v5.channel.k8s.io, v4.portforward.k8s.io),
//! to processes and ports in a real pod VM.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::large_futures
)]

use tests::registry as support;

use std::time::Duration;

use cri::streaming::spdy::{Headers, Role, Session, SessionConfig, Stream};
use futures_util::{SinkExt as _, StreamExt as _};
use k8s_cri::v1 as cri_api;
use tests::cri::{wait_for_log, CriEnv};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest as _, Message};

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

fn split_url(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").expect("http URL");
    let i = rest.find('/').expect("path");
    (rest[..i].to_string(), rest[i..].to_string())
}

/// Upgrades to SPDY/3.1 offering `protocol`, as kubectl does.
async fn spdy(url: &str, protocol: &str) -> Session {
    let (addr, path) = split_url(url);
    let mut tcp = TcpStream::connect(&addr).await.expect("connect");
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: {protocol}\r\nContent-Length: 0\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.expect("send");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tcp.read_u8().await.expect("response head"));
    }
    let head = String::from_utf8_lossy(&head).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("x-stream-protocol-version: {protocol}")),
        "{head}"
    );
    Session::new(tcp, Role::Client, SessionConfig::default()).expect("session")
}

fn open(session: &Session, headers: Headers) -> Stream {
    session.open(headers, false).expect("open stream")
}

async fn read_all(s: &mut Stream) -> Vec<u8> {
    let mut v = Vec::new();
    s.read_to_end(&mut v).await.expect("read");
    v
}

/// Runs an exec over SPDY v4: (stdout, stderr, status JSON).
async fn spdy_exec(url: &str, stdin: Option<&[u8]>) -> (String, String, serde_json::Value) {
    let session = spdy(url, "v4.channel.k8s.io").await;
    let mut error = open(&session, Headers::new().with("streamType", "error"));
    error.finish();
    let input = stdin.map(|_| open(&session, Headers::new().with("streamType", "stdin")));
    let mut stdout = open(&session, Headers::new().with("streamType", "stdout"));
    let mut stderr = open(&session, Headers::new().with("streamType", "stderr"));
    let write = async {
        if let (Some(mut s), Some(data)) = (input, stdin) {
            s.write_all(data).await.expect("stdin");
            s.shutdown().await.expect("close stdin");
        }
    };
    let (_, out, err, status) = tokio::join!(
        write,
        read_all(&mut stdout),
        read_all(&mut stderr),
        read_all(&mut error)
    );
    session.close().await;
    (
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
        serde_json::from_slice(&status).unwrap_or(serde_json::Value::Null),
    )
}

async fn ws(url: &str, protocol: &str) -> Ws {
    let (addr, path) = split_url(url);
    let mut req = format!("ws://{addr}{path}")
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse().expect("header"));
    let tcp = TcpStream::connect(&addr).await.expect("connect");
    let (ws, resp) = tokio_tungstenite::client_async(req, tcp)
        .await
        .expect("WebSocket handshake");
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some(protocol)
    );
    ws
}

fn frame(channel: u8, data: &[u8]) -> Message {
    let mut v = vec![channel];
    v.extend_from_slice(data);
    Message::Binary(v.into())
}

/// Reads binary frames until channel `ch` holds `needle` (or the server closes).
async fn ws_until(ws: &mut Ws, ch: u8, needle: &str) -> Vec<Vec<u8>> {
    let mut chans = vec![Vec::new(); 256];
    while let Some(msg) = ws.next().await {
        if let Message::Binary(b) = msg.expect("frame") {
            if let Some((c, rest)) = b.split_first() {
                chans[usize::from(*c)].extend_from_slice(rest);
            }
        }
        if !needle.is_empty() && String::from_utf8_lossy(&chans[usize::from(ch)]).contains(needle) {
            break;
        }
    }
    chans
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_attach_and_port_forward_over_spdy_and_websocket() {
    // A hang becomes a failure, and the guards still clean up.
    tokio::time::timeout(Duration::from_secs(300), scenario())
        .await
        .expect("the streaming scenario finishes within 5 minutes");
}

async fn scenario() {
    tests::become_subreaper();
    let registry = support::Registry::start().await;
    let image = tests::cri::push_busybox(&registry, "s").await;
    let mut env = CriEnv::new(44);
    env.start().await;
    let mut rt = env.runtime().await;
    env.pull(&image).await;
    let log_dir = env.dir.path().join("logs/stream");
    std::fs::create_dir_all(&log_dir).expect("log dir");
    let pod_cfg = cri_api::PodSandboxConfig {
        metadata: Some(cri_api::PodSandboxMetadata {
            name: "stream".into(),
            uid: "uid-stream".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "stream".into(),
        log_directory: log_dir.display().to_string(),
        ..Default::default()
    };
    let pod = rt
        .run_pod_sandbox(cri_api::RunPodSandboxRequest {
            config: Some(pod_cfg.clone()),
            runtime_handler: String::new(),
        })
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id;
    // One server for the pod network, one on the pod's loopback only.
    let script = "mkdir -p /www /lo && echo forwarded-page > /www/index.html && echo loopback-page > /lo/index.html && { httpd -f -p 80 -h /www & } && { httpd -f -p 127.0.0.1:8081 -h /lo & } && echo ready && while read l; do echo got-$l; done";
    let c = rt
        .create_container(cri_api::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(cri_api::ContainerConfig {
                metadata: Some(cri_api::ContainerMetadata {
                    name: "main".into(),
                    attempt: 0,
                }),
                image: Some(cri_api::ImageSpec {
                    image: image.clone(),
                    ..Default::default()
                }),
                command: vec!["/bin/sh".into(), "-c".into(), script.into()],
                stdin: true,
                log_path: "main.log".into(),
                ..Default::default()
            }),
            sandbox_config: Some(pod_cfg.clone()),
        })
        .await
        .expect("CreateContainer")
        .into_inner()
        .container_id;
    rt.start_container(cri_api::StartContainerRequest {
        container_id: c.clone(),
    })
    .await
    .expect("StartContainer");
    wait_for_log(&log_dir.join("main.log"), "ready").await;

    let exec_url = |cmd: &[&str], stdin: bool, rt: &mut tests::cri::Runtime| {
        let req = cri_api::ExecRequest {
            container_id: c.clone(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            tty: false,
            stdin,
            stdout: true,
            stderr: true,
        };
        let mut rt = rt.clone();
        async move { rt.exec(req).await.expect("Exec").into_inner().url }
    };

    // Exec over SPDY: output, stderr, a non-zero exit as the v4 status.
    let url = exec_url(
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
        false,
        &mut rt,
    )
    .await;
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let (out, err, status) = spdy_exec(&url, None).await;
    assert_eq!((out.as_str(), err.as_str()), ("out\n", "err\n"));
    assert_eq!(status["reason"], "NonZeroExitCode", "{status}");
    assert_eq!(status["details"]["causes"][0]["message"], "3", "{status}");
    // stdin through cat.
    let url = exec_url(&["cat"], true, &mut rt).await;
    let (out, _, status) = spdy_exec(&url, Some(b"hello over spdy\n")).await;
    assert_eq!(out, "hello over spdy\n");
    assert_eq!(status["status"], "Success", "{status}");
    // A URL is single-use.
    let (addr, path) = split_url(&url);
    let mut tcp = TcpStream::connect(&addr).await.expect("connect");
    tcp.write_all(format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\nContent-Length: 0\r\n\r\n").as_bytes())
        .await
        .expect("send");
    let mut head = [0u8; 12];
    tcp.read_exact(&mut head).await.expect("answer");
    assert_eq!(&head, b"HTTP/1.1 404");

    eprintln!("step: exec over WebSocket");
    // Exec over WebSocket v5.
    let url = exec_url(&["sh", "-c", "echo ws-out; hostname"], false, &mut rt).await;
    let mut sock = ws(&url, "v5.channel.k8s.io").await;
    let chans = ws_until(&mut sock, 3, "").await;
    assert_eq!(chans[1], b"ws-out\nstream\n");
    assert_eq!(chans[3], br#"{"metadata":{},"status":"Success"}"#);

    eprintln!("step: attach");
    // Attach over WebSocket v5: stdin reaches the init process, its output comes back.
    let url = rt
        .attach(cri_api::AttachRequest {
            container_id: c.clone(),
            stdin: true,
            tty: false,
            stdout: true,
            stderr: true,
        })
        .await
        .expect("Attach")
        .into_inner()
        .url;
    let mut sock = ws(&url, "v5.channel.k8s.io").await;
    sock.send(frame(0, b"ping\n")).await.expect("stdin");
    let chans = tokio::time::timeout(Duration::from_secs(60), ws_until(&mut sock, 1, "got-ping"))
        .await
        .expect("attach output");
    assert!(String::from_utf8_lossy(&chans[1]).contains("got-ping\n"));
    let _ = sock.close(None).await;

    // PortForward over SPDY and over WebSocket to the pod's httpd.
    let pf_url_for = |rt: &mut tests::cri::Runtime, port: i32| {
        let mut rt = rt.clone();
        let pod = pod.clone();
        async move {
            rt.port_forward(cri_api::PortForwardRequest {
                pod_sandbox_id: pod,
                port: vec![port],
            })
            .await
            .expect("PortForward")
            .into_inner()
            .url
        }
    };
    let pf_url = |rt: &mut tests::cri::Runtime| pf_url_for(rt, 80);
    eprintln!("step: after attach");
    // The attach client left; the container's stdin stays open (no stdin_once).
    let direct = rt
        .exec_sync(cri_api::ExecSyncRequest {
            container_id: c.clone(),
            cmd: vec![
                "wget".into(),
                "-q".into(),
                "-O".into(),
                "-".into(),
                "http://127.0.0.1/".into(),
            ],
            timeout: 30,
        })
        .await
        .expect("the container still runs after the attach ended")
        .into_inner();
    assert_eq!(direct.stdout, b"forwarded-page\n");
    eprintln!("step: port-forward SPDY");
    let url = pf_url(&mut rt).await;
    let session = spdy(&url, "portforward.k8s.io").await;
    let h = |t: &str| {
        Headers::new()
            .with("streamType", t)
            .with("port", "80")
            .with("requestID", "0")
    };
    let mut error = open(&session, h("error"));
    error.finish();
    let mut data = open(&session, h("data"));
    data.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .await
        .expect("request");
    let page = String::from_utf8_lossy(&read_all(&mut data).await).into_owned();
    let errors = String::from_utf8_lossy(&read_all(&mut error).await).into_owned();
    assert!(
        page.contains("forwarded-page"),
        "page {page:?}, error stream {errors:?}"
    );
    session.close().await;

    // A port bound only to the pod's loopback is reachable (the agent
    // connects inside the VM); a closed port is an error on the error stream.
    eprintln!("step: port-forward SPDY to loopback-only and closed ports");
    for (port, want_page, want_error) in [
        ("8081", "loopback-page", ""),
        ("9", "", "connect to localhost:9"),
    ] {
        let url = pf_url_for(&mut rt, port.parse().expect("port")).await;
        let session = spdy(&url, "portforward.k8s.io").await;
        let h = |t: &str| {
            Headers::new()
                .with("streamType", t)
                .with("port", port)
                .with("requestID", "1")
        };
        let mut error = open(&session, h("error"));
        error.finish();
        let mut data = open(&session, h("data"));
        let _ = data.write_all(b"GET / HTTP/1.0\r\n\r\n").await;
        let page = String::from_utf8_lossy(&read_all(&mut data).await).into_owned();
        let errors = String::from_utf8_lossy(&read_all(&mut error).await).into_owned();
        if want_page.is_empty() {
            assert!(
                errors.contains(want_error),
                "port {port}: error stream {errors:?}"
            );
        } else {
            assert!(
                page.contains(want_page),
                "port {port}: page {page:?}, error stream {errors:?}"
            );
        }
        session.close().await;
    }

    let url = pf_url(&mut rt).await;
    eprintln!("step: port-forward WebSocket");
    let mut sock = ws(&format!("{url}?port=80"), "v4.portforward.k8s.io").await;
    // Each channel opens with its port number.
    let mut firsts = 0;
    while firsts < 2 {
        if let Some(Ok(Message::Binary(b))) = sock.next().await {
            assert_eq!(&b[1..], &80u16.to_le_bytes());
            firsts += 1;
        }
    }
    sock.send(frame(0, b"GET / HTTP/1.0\r\n\r\n"))
        .await
        .expect("request");
    let chans = tokio::time::timeout(
        Duration::from_secs(60),
        ws_until(&mut sock, 0, "forwarded-page"),
    )
    .await
    .expect("page");
    assert!(String::from_utf8_lossy(&chans[0]).contains("forwarded-page"));
    let _ = sock.close(None).await;

    tests::cri::remove_pod(&mut rt, &pod).await;
    env.assert_no_pods_left();
}
