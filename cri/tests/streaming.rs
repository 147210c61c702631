//! The streaming server end to end over loopback: real HTTP upgrades, this crate's SPDY session
//! in client role and a tokio-tungstenite WebSocket client, against the fake runtime (its
//! commands and a real TCP echo server behind port forwarding).
// Test helpers outside #[test] functions unwrap too: a failure is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cri::streaming::fake::FakeRuntime;
use cri::streaming::spdy::{Headers, Role, Session, SessionConfig, Stream};
use cri::streaming::{
    AttachRequest, ErrorKind, ExecRequest, PortForwardRequest, Server, ServerConfig,
};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

/// Every test is bounded: a hang is a failure, not a stuck CI job.
const T: Duration = Duration::from_secs(20);

async fn start_with(config: ServerConfig) -> (Server, Arc<FakeRuntime>) {
    let fake = FakeRuntime::start().await.unwrap();
    let server = Server::start(config, fake.clone()).await.unwrap();
    (server, fake)
}

async fn start() -> (Server, Arc<FakeRuntime>) {
    start_with(ServerConfig::default()).await
}

fn exec(cmd: &[&str]) -> ExecRequest {
    ExecRequest {
        container_id: "c1".into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty: false,
        stdin: false,
        stdout: true,
        stderr: true,
    }
}

/// `http://host:port/path` → (host:port, /path?query)
fn split_url(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let i = rest.find('/').unwrap();
    (rest[..i].to_string(), rest[i..].to_string())
}

/// A plain HTTP response read by hand.
#[derive(Debug)]
struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends an HTTP/1.1 request and reads the response head byte by byte (nothing of the upgraded
/// protocol behind it is consumed); reads the body unless the answer is 101.
async fn http(url: &str, headers: &[(&str, &str)]) -> (TcpStream, HttpResponse) {
    let (addr, path) = split_url(url);
    let mut tcp = TcpStream::connect(&addr).await.unwrap();
    let mut req = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let b = tcp.read_u8().await.unwrap();
        head.push(b);
    }
    let head = String::from_utf8(head).unwrap();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let mut resp = HttpResponse {
        status,
        headers,
        body: String::new(),
    };
    if status != 101 {
        let len: usize = resp
            .header("content-length")
            .map(|l| l.parse().unwrap())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        tcp.read_exact(&mut body).await.unwrap();
        resp.body = String::from_utf8(body).unwrap();
    }
    (tcp, resp)
}

/// Upgrades to SPDY/3.1 offering `protocols`; the session and the negotiated protocol.
async fn spdy_connect(url: &str, protocols: &[&str]) -> Result<(Session, String), HttpResponse> {
    let mut headers = vec![("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")];
    for p in protocols {
        headers.push(("X-Stream-Protocol-Version", p));
    }
    let (tcp, resp) = http(url, &headers).await;
    if resp.status != 101 {
        return Err(resp);
    }
    let negotiated = resp
        .header("x-stream-protocol-version")
        .unwrap_or("")
        .to_string();
    let config = SessionConfig {
        enforce_peer_window: true,
        ..Default::default()
    };
    let session = Session::new(tcp, Role::Client, config).unwrap();
    Ok((session, negotiated))
}

fn open(session: &Session, stream_type: &str) -> Stream {
    session
        .open(Headers::new().with("streamType", stream_type), false)
        .unwrap()
}

async fn read_to_end(s: &mut Stream) -> Vec<u8> {
    let mut v = Vec::new();
    s.read_to_end(&mut v).await.unwrap();
    v
}

/// What a remote command produced on each stream.
#[derive(Debug, Default)]
struct Output {
    stdout: String,
    stderr: String,
    error: String,
}

struct SpdyCommand<'a> {
    stdin: Option<&'a [u8]>,
    stdout: bool,
    stderr: bool,
    resize: &'a [(u16, u16)],
}

/// Drives a remote command like kubectl does: open the streams, close `error` for writing,
/// send stdin and close it, read everything.
async fn spdy_command(session: Session, c: SpdyCommand<'_>) -> Output {
    let mut error = open(&session, "error");
    error.finish();
    let stdin = c.stdin.map(|_| open(&session, "stdin"));
    let mut stdout = c.stdout.then(|| open(&session, "stdout"));
    let mut stderr = c.stderr.then(|| open(&session, "stderr"));
    let resize = (!c.resize.is_empty()).then(|| open(&session, "resize"));
    if let Some(mut r) = resize {
        for (w, h) in c.resize {
            r.write_all(format!(r#"{{"Width":{w},"Height":{h}}}"#).as_bytes())
                .await
                .unwrap();
        }
        r.finish();
    }
    let write_stdin = async {
        if let (Some(mut s), Some(data)) = (stdin, c.stdin) {
            s.write_all(data).await.unwrap();
            s.shutdown().await.unwrap();
        }
    };
    let read_out = async {
        match stdout.as_mut() {
            Some(s) => read_to_end(s).await,
            None => Vec::new(),
        }
    };
    let read_err = async {
        match stderr.as_mut() {
            Some(s) => read_to_end(s).await,
            None => Vec::new(),
        }
    };
    let (_, out, err, status) =
        tokio::join!(write_stdin, read_out, read_err, read_to_end(&mut error));
    drop((stdout, stderr, error));
    session.close().await;
    Output {
        stdout: String::from_utf8(out).unwrap(),
        stderr: String::from_utf8(err).unwrap(),
        error: String::from_utf8(status).unwrap(),
    }
}

fn out_only() -> SpdyCommand<'static> {
    SpdyCommand {
        stdin: None,
        stdout: true,
        stderr: true,
        resize: &[],
    }
}

fn status(error: &str) -> serde_json::Value {
    serde_json::from_str(error).unwrap_or_else(|e| panic!("status {error:?} is not JSON: {e}"))
}

async fn spdy_exec(server: &Server, req: ExecRequest, proto: &str, c: SpdyCommand<'_>) -> Output {
    let url = server.get_exec(req).unwrap();
    let (session, negotiated) = spdy_connect(&url, &[proto]).await.unwrap();
    assert_eq!(negotiated, proto);
    spdy_command(session, c).await
}

#[tokio::test]
async fn spdy_v4_exec_stdout_stderr_and_exit_codes() {
    tokio::time::timeout(T, async {
        let (server, fake) = start().await;
        let out = spdy_exec(
            &server,
            exec(&["echo", "hello", "world"]),
            "v4.channel.k8s.io",
            out_only(),
        )
        .await;
        assert_eq!(out.stdout, "hello world\n");
        assert_eq!(out.stderr, "");
        assert_eq!(out.error, r#"{"metadata":{},"status":"Success"}"#);

        let out = spdy_exec(
            &server,
            exec(&["stderr", "oops"]),
            "v4.channel.k8s.io",
            out_only(),
        )
        .await;
        assert_eq!(out.stderr, "oops\n");
        assert_eq!(status(&out.error)["status"], "Success");

        // v5 over SPDY is v4.
        let out = spdy_exec(
            &server,
            exec(&["exit", "3"]),
            "v5.channel.k8s.io",
            out_only(),
        )
        .await;
        let st = status(&out.error);
        assert_eq!(st["status"], "Failure");
        assert_eq!(st["reason"], "NonZeroExitCode");
        assert_eq!(st["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(st["details"]["causes"][0]["message"], "3");

        let out = spdy_exec(&server, exec(&["fail"]), "v4.channel.k8s.io", out_only()).await;
        let st = status(&out.error);
        assert_eq!(st["status"], "Failure");
        assert!(
            st["message"]
                .as_str()
                .unwrap()
                .contains("container c1 not found"),
            "{st}"
        );

        assert_eq!(
            fake.calls(),
            [
                r#"exec c1 ["echo", "hello", "world"] tty=false"#,
                r#"exec c1 ["stderr", "oops"] tty=false"#,
                r#"exec c1 ["exit", "3"] tty=false"#,
                r#"exec c1 ["fail"] tty=false"#,
            ]
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn spdy_v4_stdin_goes_through_cat_including_megabytes() {
    tokio::time::timeout(T, async {
        let (server, _fake) = start().await;
        let mut req = exec(&["cat"]);
        req.stdin = true;
        let out = spdy_exec(
            &server,
            req.clone(),
            "v4.channel.k8s.io",
            SpdyCommand {
                stdin: Some(b"some input\n"),
                ..out_only()
            },
        )
        .await;
        assert_eq!(out.stdout, "some input\n");
        assert_eq!(status(&out.error)["status"], "Success");

        // Past every 64 KiB window, both directions.
        let big: Vec<u8> = (0..(1 << 20)).map(|i| b'a' + (i % 26) as u8).collect();
        let out = spdy_exec(
            &server,
            req,
            "v4.channel.k8s.io",
            SpdyCommand {
                stdin: Some(&big),
                ..out_only()
            },
        )
        .await;
        assert!(
            out.stdout.as_bytes() == big.as_slice(),
            "{} bytes back",
            out.stdout.len()
        );
    })
    .await
    .unwrap();
}

/// kubectl's spdystream does no flow control at all (no SETTINGS, no WINDOW_UPDATE, windows
/// ignored): megabytes must still flow both ways without a stall.
#[tokio::test]
async fn spdy_client_without_flow_control_is_not_stalled() {
    tokio::time::timeout(T, async {
        let (server, _fake) = start().await;
        let mut req = exec(&["cat"]);
        req.stdin = true;
        let url = server.get_exec(req).unwrap();
        let mut headers = vec![("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")];
        headers.push(("X-Stream-Protocol-Version", "v4.channel.k8s.io"));
        let (tcp, resp) = http(&url, &headers).await;
        assert_eq!(resp.status, 101);
        let config = SessionConfig {
            flow_control: false,
            ..Default::default()
        };
        let session = Session::new(tcp, Role::Client, config).unwrap();
        let big: Vec<u8> = (0..(2 << 20)).map(|i| b'a' + (i % 26) as u8).collect();
        let out = spdy_command(
            session,
            SpdyCommand {
                stdin: Some(&big),
                ..out_only()
            },
        )
        .await;
        assert!(
            out.stdout.as_bytes() == big.as_slice(),
            "{} bytes back",
            out.stdout.len()
        );
        assert_eq!(status(&out.error)["status"], "Success");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn spdy_v4_tty_delivers_resizes() {
    tokio::time::timeout(T, async {
        let (server, fake) = start().await;
        let req = ExecRequest {
            tty: true,
            stderr: false,
            ..exec(&["resize", "2"])
        };
        let out = spdy_exec(
            &server,
            req,
            "v4.channel.k8s.io",
            SpdyCommand {
                stdin: None,
                stdout: true,
                stderr: false,
                resize: &[(80, 24), (100, 50)],
            },
        )
        .await;
        assert_eq!(out.stdout, "80x24\n100x50\n");
        assert_eq!(status(&out.error)["status"], "Success");
        assert_eq!(fake.calls(), [r#"exec c1 ["resize", "2"] tty=true"#]);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn spdy_v1_exec_reports_errors_as_text() {
    tokio::time::timeout(T, async {
        let (server, _fake) = start().await;
        let out = spdy_exec(
            &server,
            exec(&["echo", "old"]),
            "channel.k8s.io",
            out_only(),
        )
        .await;
        assert_eq!(out.stdout, "old\n");
        assert_eq!(out.error, "", "v1 says nothing on success");
        let out = spdy_exec(&server, exec(&["exit", "3"]), "channel.k8s.io", out_only()).await;
        assert!(
            out.error
                .starts_with("command terminated with non-zero exit code"),
            "{:?}",
            out.error
        );
        assert!(out.error.ends_with("exit code 3"), "{:?}", out.error);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn spdy_attach_with_stdin() {
    tokio::time::timeout(T, async {
        let (server, fake) = start().await;
        let url = server
            .get_attach(AttachRequest {
                container_id: "c2".into(),
                tty: false,
                stdin: true,
                stdout: true,
                stderr: true,
            })
            .unwrap();
        let (session, _) = spdy_connect(&url, &["v4.channel.k8s.io"]).await.unwrap();
        let out = spdy_command(
            session,
            SpdyCommand {
                stdin: Some(b"typed\n"),
                ..out_only()
            },
        )
        .await;
        assert_eq!(out.stdout, "attached c2\ntyped\n");
        assert_eq!(status(&out.error)["status"], "Success");
        assert_eq!(fake.calls(), ["attach c2 tty=false"]);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn attach_over_spdy_v1_and_websocket_v4() {
    tokio::time::timeout(T, async {
        let (server, fake) = start().await;
        let attach = |stdin| AttachRequest {
            container_id: "c3".into(),
            tty: false,
            stdin,
            stdout: true,
            stderr: true,
        };
        let url = server.get_attach(attach(true)).unwrap();
        let (session, negotiated) = spdy_connect(&url, &["channel.k8s.io"]).await.unwrap();
        assert_eq!(negotiated, "channel.k8s.io");
        let out = spdy_command(
            session,
            SpdyCommand {
                stdin: Some(b"over v1\n"),
                ..out_only()
            },
        )
        .await;
        assert_eq!(out.stdout, "attached c3\nover v1\n");
        assert_eq!(out.error, "", "v1 says nothing on success");

        let url = server.get_attach(attach(false)).unwrap();
        let (mut ws, p) = ws_connect(&url, &["v4.channel.k8s.io"]).await.unwrap();
        assert_eq!(p.as_deref(), Some("v4.channel.k8s.io"));
        let chans = ws_collect(&mut ws).await;
        assert_eq!(chans[1], b"attached c3\n");
        assert_eq!(chans[3], br#"{"metadata":{},"status":"Success"}"#);
        assert_eq!(fake.calls(), ["attach c3 tty=false", "attach c3 tty=false"]);
    })
    .await
    .unwrap();
}

async fn spdy_forward_pair(session: &Session, port: &str, request_id: &str) -> (Stream, Stream) {
    let h = |t: &str| {
        Headers::new()
            .with("streamType", t)
            .with("port", port)
            .with("requestID", request_id)
    };
    let error = session.open(h("error"), false).unwrap();
    error.finish();
    let data = session.open(h("data"), false).unwrap();
    (error, data)
}

#[tokio::test]
async fn spdy_port_forward_round_trips_through_the_echo() {
    tokio::time::timeout(T, async {
        let (server, fake) = start().await;
        let url = server
            .get_port_forward(PortForwardRequest {
                pod_sandbox_id: "pod1".into(),
                ports: vec![],
            })
            .unwrap();
        let (session, negotiated) = spdy_connect(&url, &["portforward.k8s.io"]).await.unwrap();
        assert_eq!(negotiated, "portforward.k8s.io");
        // Two forwarded connections on one session, like two local connections of kubectl.
        for (i, port) in ["8080", "9090"].iter().enumerate() {
            let (mut error, data) = spdy_forward_pair(&session, port, &i.to_string()).await;
            let payload: Vec<u8> = (0..200_000u32).map(|x| x as u8).collect();
            let (mut rd, mut wr) = tokio::io::split(data);
            let (_, echoed) = tokio::join!(
                async {
                    wr.write_all(&payload).await.unwrap();
                    // Half-close: the echo ends its side in turn.
                    wr.shutdown().await.unwrap();
                },
                async {
                    let mut v = Vec::new();
                    rd.read_to_end(&mut v).await.unwrap();
                    v
                }
            );
            assert!(echoed == payload, "{} bytes back", echoed.len());
            assert_eq!(read_to_end(&mut error).await, b"", "no error");
        }
        // A port that fails is reported on the error stream.
        let (mut error, _data) = spdy_forward_pair(&session, "1", "2").await;
        let msg = String::from_utf8(read_to_end(&mut error).await).unwrap();
        assert!(msg.contains("error forwarding port 1 to pod pod1"), "{msg}");
        assert!(msg.contains("refused"), "{msg}");
        // A port that is not a port, too.
        let (mut error, _data) = spdy_forward_pair(&session, "http", "3").await;
        let msg = String::from_utf8(read_to_end(&mut error).await).unwrap();
        assert!(msg.contains("invalid port \"http\""), "{msg}");
        session.close().await;
        assert_eq!(
            fake.calls(),
            [
                "port_forward pod1 8080",
                "port_forward pod1 9090",
                "port_forward pod1 1"
            ]
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn spdy_port_forward_is_limited_to_the_requested_ports() {
    tokio::time::timeout(T, async {
        let (server, _fake) = start().await;
        let url = server
            .get_port_forward(PortForwardRequest {
                pod_sandbox_id: "pod1".into(),
                ports: vec![80],
            })
            .unwrap();
        let (session, _) = spdy_connect(&url, &["portforward.k8s.io"]).await.unwrap();
        let (mut error, _data) = spdy_forward_pair(&session, "81", "0").await;
        let msg = String::from_utf8(read_to_end(&mut error).await).unwrap();
        assert!(msg.contains("port 81 was not requested"), "{msg}");
        session.close().await;
    })
    .await
    .unwrap();
}

// ---- WebSocket ----

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

async fn ws_connect(url: &str, protocols: &[&str]) -> Result<(Ws, Option<String>), (u16, String)> {
    let (addr, path) = split_url(url);
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    if !protocols.is_empty() {
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            protocols.join(", ").parse().unwrap(),
        );
    }
    let tcp = TcpStream::connect(&addr).await.unwrap();
    match tokio_tungstenite::client_async(req, tcp).await {
        Ok((ws, resp)) => {
            let p = resp
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap().to_string());
            Ok((ws, p))
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).to_string())
                .unwrap_or_default();
            Err((resp.status().as_u16(), body))
        }
        Err(e) => panic!("WebSocket handshake failed: {e}"),
    }
}

/// Every channel's bytes, in order, until the server closes.
async fn ws_collect(ws: &mut Ws) -> Vec<Vec<u8>> {
    let mut chans = vec![Vec::new(); 256];
    while let Some(msg) = ws.next().await {
        match msg.unwrap() {
            Message::Binary(b) => {
                let (ch, rest) = b.split_first().unwrap();
                chans[usize::from(*ch)].extend_from_slice(rest);
            }
            Message::Close(frame) => {
                // client-go takes anything but a normal close as an error on every stream.
                let code = frame.map(|f| f.code);
                assert_eq!(code, Some(CloseCode::Normal), "close frame {code:?}");
                break;
            }
            _ => {}
        }
    }
    chans
}

fn bin(ch: u8, data: &[u8]) -> Message {
    let mut v = vec![ch];
    v.extend_from_slice(data);
    Message::Binary(Bytes::from(v))
}

#[tokio::test]
async fn websocket_v5_and_v4_exec() {
    tokio::time::timeout(T, async {
        let (server, _fake) = start().await;
        for proto in ["v5.channel.k8s.io", "v4.channel.k8s.io"] {
            let url = server.get_exec(exec(&["echo", "hi"])).unwrap();
            let (mut ws, p) = ws_connect(&url, &[proto]).await.unwrap();
            assert_eq!(p.as_deref(), Some(proto));
            let chans = ws_collect(&mut ws).await;
            assert_eq!(chans[1], b"hi\n");
            assert_eq!(chans[3], br#"{"metadata":{},"status":"Success"}"#);

            let url = server.get_exec(exec(&["exit", "3"])).unwrap();
            let (mut ws, _) = ws_connect(&url, &[proto]).await.unwrap();
            let chans = ws_collect(&mut ws).await;
            let st: serde_json::Value = serde_json::from_slice(&chans[3]).unwrap();
            assert_eq!(st["details"]["causes"][0]["message"], "3");

            let url = server.get_exec(exec(&["stderr", "bad"])).unwrap();
            let (mut ws, _) = ws_connect(&url, &[proto]).await.unwrap();
            assert_eq!(ws_collect(&mut ws).await[2], b"bad\n");
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn websocket_v5_stdin_close_tty_resize_and_attach() {
    tokio::time::timeout(T, async {
        let (server, fake) = start().await;
        // cat: stdin, then v5's "close channel 0" ends it.
        let mut req = exec(&["cat"]);
        req.stdin = true;
        let url = server.get_exec(req).unwrap();
        let (mut ws, _) = ws_connect(&url, &["v5.channel.k8s.io"]).await.unwrap();
        ws.send(bin(0, b"line one\n")).await.unwrap();
        ws.send(bin(0, b"line two\n")).await.unwrap();
        ws.send(bin(255, &[0])).await.unwrap();
        let chans = ws_collect(&mut ws).await;
        assert_eq!(chans[1], b"line one\nline two\n");
        assert_eq!(chans[3], br#"{"metadata":{},"status":"Success"}"#);

        // A terminal: resizes on channel 4.
        let req = ExecRequest {
            tty: true,
            stderr: false,
            ..exec(&["resize", "2"])
        };
        let url = server.get_exec(req).unwrap();
        let (mut ws, _) = ws_connect(&url, &["v5.channel.k8s.io"]).await.unwrap();
        ws.send(bin(4, br#"{"Width":120,"Height":40}"#))
            .await
            .unwrap();
        ws.send(bin(4, br#"{"Width":20,"Height":10}"#))
            .await
            .unwrap();
        let chans = ws_collect(&mut ws).await;
        assert_eq!(chans[1], b"120x40\n20x10\n");

        // Attach.
        let url = server
            .get_attach(AttachRequest {
                container_id: "c9".into(),
                tty: false,
                stdin: true,
                stdout: true,
                stderr: false,
            })
            .unwrap();
        let (mut ws, _) = ws_connect(&url, &["v5.channel.k8s.io"]).await.unwrap();
        ws.send(bin(0, b"hello attach\n")).await.unwrap();
        ws.send(bin(255, &[0])).await.unwrap();
        let chans = ws_collect(&mut ws).await;
        assert_eq!(chans[1], b"attached c9\nhello attach\n");
        assert_eq!(
            fake.calls(),
            [
                r#"exec c1 ["cat"] tty=false"#,
                r#"exec c1 ["resize", "2"] tty=true"#,
                "attach c9 tty=false",
            ]
        );
    })
    .await
    .unwrap();
}

/// client-go closes stdin with the v5 signal whatever version was negotiated.
#[tokio::test]
async fn websocket_v4_honours_the_stdin_close_signal() {
    tokio::time::timeout(T, async {
        let (server, _fake) = start().await;
        let mut req = exec(&["cat"]);
        req.stdin = true;
        let url = server.get_exec(req).unwrap();
        let (mut ws, _) = ws_connect(&url, &["v4.channel.k8s.io"]).await.unwrap();
        ws.send(bin(0, b"v4 input\n")).await.unwrap();
        ws.send(bin(255, &[0])).await.unwrap();
        let chans = ws_collect(&mut ws).await;
        assert_eq!(chans[1], b"v4 input\n");
        assert_eq!(chans[3], br#"{"metadata":{},"status":"Success"}"#);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn websocket_base64_and_plain_channel_protocols() {
    tokio::time::timeout(T, async {
        let (server, _fake) = start().await;
        let url = server.get_exec(exec(&["echo", "b64"])).unwrap();
        let (mut ws, p) = ws_connect(&url, &["base64.channel.k8s.io"]).await.unwrap();
        assert_eq!(p.as_deref(), Some("base64.channel.k8s.io"));
        let mut stdout = Vec::new();
        while let Some(msg) = ws.next().await {
            match msg.unwrap() {
                Message::Text(t) => {
                    let (ch, rest) = t.as_str().split_at(1);
                    if ch == "1" {
                        stdout.extend(data_encoding::BASE64.decode(rest.as_bytes()).unwrap());
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        assert_eq!(stdout, b"b64\n");

        // channel.k8s.io: errors as text.
        let url = server.get_exec(exec(&["exit", "4"])).unwrap();
        let (mut ws, _) = ws_connect(&url, &["channel.k8s.io"]).await.unwrap();
        let chans = ws_collect(&mut ws).await;
        let text = String::from_utf8(chans[3].clone()).unwrap();
        assert!(
            text.starts_with("command terminated with non-zero exit code"),
            "{text}"
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn websocket_port_forward_v4_and_plain() {
    tokio::time::timeout(T, async {
        let (server, fake) = start().await;
        for proto in ["v4.portforward.k8s.io", "portforward.k8s.io"] {
            let url = server
                .get_port_forward(PortForwardRequest {
                    pod_sandbox_id: "pod7".into(),
                    ports: vec![],
                })
                .unwrap();
            let url = format!("{url}?port=8080,1");
            let (mut ws, p) = ws_connect(&url, &[proto]).await.unwrap();
            assert_eq!(p.as_deref(), Some(proto));
            // The first message of every channel is its port, little-endian.
            let mut firsts = Vec::new();
            while firsts.len() < 4 {
                if let Message::Binary(b) = ws.next().await.unwrap().unwrap() {
                    firsts.push(b.to_vec());
                }
            }
            firsts.sort();
            assert_eq!(
                firsts,
                [
                    vec![0, 0x90, 0x1f],
                    vec![1, 0x90, 0x1f],
                    vec![2, 1, 0],
                    vec![3, 1, 0]
                ]
            );
            ws.send(bin(0, b"echo me")).await.unwrap();
            let mut got = Vec::new();
            let mut error_1 = Vec::new();
            while got.len() < 7 || error_1.is_empty() {
                if let Message::Binary(b) = ws.next().await.unwrap().unwrap() {
                    match b[0] {
                        0 => got.extend_from_slice(&b[1..]),
                        3 => error_1.extend_from_slice(&b[1..]),
                        other => panic!("unexpected channel {other}"),
                    }
                }
            }
            assert_eq!(got, b"echo me");
            let e = String::from_utf8(error_1).unwrap();
            assert!(e.contains("error forwarding port 1 to pod pod7"), "{e}");
            ws.close(None).await.unwrap();
            while let Some(Ok(_)) = ws.next().await {}
        }
        let mut calls = fake.calls();
        calls.sort();
        assert_eq!(
            calls,
            [
                "port_forward pod7 1",
                "port_forward pod7 1",
                "port_forward pod7 8080",
                "port_forward pod7 8080"
            ]
        );
    })
    .await
    .unwrap();
}

// ---- Tokens, protocols and refusals ----

#[tokio::test]
async fn tokens_are_single_use_and_unknown_ones_are_404() {
    tokio::time::timeout(T, async {
        let (server, _fake) = start().await;
        let url = server.get_exec(exec(&["echo", "once"])).unwrap();
        assert!(url.starts_with(&format!("http://{}/exec/", server.local_addr())));
        let (session, _) = spdy_connect(&url, &["v4.channel.k8s.io"]).await.unwrap();
        assert_eq!(spdy_command(session, out_only()).await.stdout, "once\n");
        let e = spdy_connect(&url, &["v4.channel.k8s.io"])
            .await
            .unwrap_err();
        assert_eq!(e.status, 404);
        assert!(e.body.contains("not found"), "{}", e.body);

        let addr = server.local_addr();
        for path in [
            "/exec/nonsense",
            "/attach/x",
            "/portforward/",
            "/",
            "/exec/a/b",
            "/other/x",
        ] {
            let (_, r) = http(&format!("http://{addr}{path}"), &[]).await;
            assert_eq!(r.status, 404, "{path}");
        }
        // A token is only valid on its own path (and is used up by the attempt).
        let url = server.get_exec(exec(&["echo", "x"])).unwrap();
        let (_, r) = http(&url.replace("/exec/", "/attach/"), &[]).await;
        assert_eq!(r.status, 404);
        let (_, r) = http(&url, &[]).await;
        assert_eq!(r.status, 404);
        // Over WebSocket too.
        let url = server.get_exec(exec(&["echo", "x"])).unwrap();
        ws_connect(&url, &["v5.channel.k8s.io"]).await.unwrap();
        assert_eq!(
            ws_connect(&url, &["v5.channel.k8s.io"])
                .await
                .unwrap_err()
                .0,
            404
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn expired_tokens_are_404() {
    tokio::time::timeout(T, async {
        let (server, _fake) = start_with(ServerConfig {
            token_ttl: Duration::ZERO,
            ..Default::default()
        })
        .await;
        let url = server.get_exec(exec(&["echo", "late"])).unwrap();
        assert_eq!(
            spdy_connect(&url, &["v4.channel.k8s.io"])
                .await
                .unwrap_err()
                .status,
            404
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn unknown_protocols_and_plain_requests_are_refused_with_a_message() {
    tokio::time::timeout(T, async {
        let (server, fake) = start().await;
        let url = server.get_exec(exec(&["echo", "x"])).unwrap();
        let e = spdy_connect(&url, &["v9.channel.k8s.io"])
            .await
            .unwrap_err();
        assert_eq!(e.status, 403);
        assert!(
            e.body.contains("unable to negotiate protocol"),
            "{}",
            e.body
        );
        assert!(e.body.contains("v9.channel.k8s.io"), "{}", e.body);
        assert_eq!(
            e.header("x-accepted-stream-protocol-versions"),
            Some("v5.channel.k8s.io")
        );

        let url = server
            .get_port_forward(PortForwardRequest {
                pod_sandbox_id: "p".into(),
                ports: vec![],
            })
            .unwrap();
        let e = spdy_connect(&url, &["v4.channel.k8s.io"])
            .await
            .unwrap_err();
        assert_eq!(e.status, 403);

        let url = server.get_exec(exec(&["echo", "x"])).unwrap();
        let (status, body) = ws_connect(&url, &["v1.bogus.k8s.io"]).await.unwrap_err();
        assert_eq!(status, 400);
        assert!(body.contains("no supported WebSocket protocol"), "{body}");

        let url = server.get_exec(exec(&["echo", "x"])).unwrap();
        let (_, r) = http(&url, &[]).await;
        assert_eq!(r.status, 400);
        assert!(r.body.contains("Upgrade"), "{}", r.body);

        let url = server
            .get_port_forward(PortForwardRequest {
                pod_sandbox_id: "p".into(),
                ports: vec![],
            })
            .unwrap();
        let (status, body) = ws_connect(&url, &["v4.portforward.k8s.io"])
            .await
            .unwrap_err();
        assert_eq!(status, 400);
        assert!(body.contains("\"port\" is required"), "{body}");
        assert!(fake.calls().is_empty(), "nothing ran: {:?}", fake.calls());
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn invalid_requests_get_no_url() {
    let (server, _fake) = start().await;
    let e = server.get_exec(ExecRequest::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let e = server
        .get_attach(AttachRequest {
            container_id: "c".into(),
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let e = server
        .get_port_forward(PortForwardRequest::default())
        .unwrap_err();
    assert!(e.to_string().contains("pod_sandbox_id"), "{e}");
}

#[tokio::test]
async fn a_client_that_never_opens_its_streams_is_hung_up_on() {
    tokio::time::timeout(T, async {
        let (server, fake) = start_with(ServerConfig {
            stream_creation_timeout: Duration::from_millis(300),
            ..Default::default()
        })
        .await;
        let url = server.get_exec(exec(&["echo", "x"])).unwrap();
        let (mut session, _) = spdy_connect(&url, &["v4.channel.k8s.io"]).await.unwrap();
        // Only the error stream: stdout and stderr never come.
        let _error = open(&session, "error");
        session.closed().await;
        assert!(session.accept().await.is_none());
        assert!(fake.calls().is_empty());
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn garbage_after_the_upgrade_does_not_hurt_the_server() {
    tokio::time::timeout(T, async {
        let (server, _fake) = start().await;
        let url = server.get_exec(exec(&["echo", "x"])).unwrap();
        let (mut tcp, resp) = http(
            &url,
            &[
                ("Connection", "Upgrade"),
                ("Upgrade", "SPDY/3.1"),
                ("X-Stream-Protocol-Version", "v4.channel.k8s.io"),
            ],
        )
        .await;
        assert_eq!(resp.status, 101);
        tcp.write_all(&[
            0x80, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x0a, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
        ])
        .await
        .unwrap();
        // The server gives up on this connection...
        let mut rest = Vec::new();
        let _ = tcp.read_to_end(&mut rest).await;
        // ...and goes on serving others.
        let out = spdy_exec(
            &server,
            exec(&["echo", "still here"]),
            "v4.channel.k8s.io",
            out_only(),
        )
        .await;
        assert_eq!(out.stdout, "still here\n");
        // A WebSocket sending nonsense frames is ignored, too.
        let url = server.get_exec(exec(&["echo", "ws"])).unwrap();
        let (mut ws, _) = ws_connect(&url, &["v5.channel.k8s.io"]).await.unwrap();
        ws.send(Message::Binary(Bytes::new())).await.unwrap();
        ws.send(Message::text("text on a binary protocol"))
            .await
            .unwrap();
        ws.send(bin(4, b"{not json")).await.unwrap();
        ws.send(bin(77, b"no such channel")).await.unwrap();
        assert_eq!(ws_collect(&mut ws).await[1], b"ws\n");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn dropping_the_server_ends_its_connections() {
    tokio::time::timeout(T, async {
        let (server, _fake) = start().await;
        let url = server.get_exec(exec(&["echo", "x"])).unwrap();
        let (mut session, _) = spdy_connect(&url, &["v4.channel.k8s.io"]).await.unwrap();
        let url = server.get_exec(exec(&["cat"])).unwrap();
        let (mut ws, _) = ws_connect(&url, &["v5.channel.k8s.io"]).await.unwrap();
        let addr = server.local_addr();
        drop(server);
        // Both connections are closed by the server side, and nobody listens any more.
        session.closed().await;
        while let Some(Ok(_)) = ws.next().await {}
        // (The listener goes with the accept task's cancellation: wait for it, bounded by T.)
        while TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn streams_the_request_did_not_ask_for_do_not_reach_the_runtime() {
    tokio::time::timeout(T, async {
        let (server, _fake) = start().await;
        // cat without stdin in the request: the client's stdin stream is accepted but not used,
        // so cat sees no stdin and prints nothing.
        let out = spdy_exec(
            &server,
            exec(&["cat"]),
            "v4.channel.k8s.io",
            SpdyCommand {
                stdin: Some(b"ignored"),
                ..out_only()
            },
        )
        .await;
        assert_eq!(out.stdout, "");
        assert_eq!(status(&out.error)["status"], "Success");
    })
    .await
    .unwrap();
}
