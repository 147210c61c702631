//! Exec, attach and port forwarding over WebSocket.
//!
//! Every message carries one channel: binary protocols prefix the payload with the channel
//! byte, `base64.*` protocols send text whose first character is the channel digit and the
//! rest base64. Remote command channels: 0 stdin, 1 stdout, 2 stderr, 3 error (the status at
//! the end), 4 resize; `v5.channel.k8s.io` adds 255 = "close channel N". Port forwarding: for
//! the i-th port, channel 2i carries data and 2i+1 errors, and the server's first message on
//! each starts with the port number (u16 little-endian).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use data_encoding::BASE64;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, UPGRADE};
use hyper::upgrade::Upgraded;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, DuplexStream, WriteHalf};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::portforward::{check_port, forward};
use super::remotecommand::{Command, Version};
use super::request::Streams;
use super::server::{header_values, negotiate, plain, Body, Inner};
use super::token::Pending;
use super::{BoxReader, BoxWriter, PortForwardRequest, StreamIo, TermSize};

type Ws = WebSocketStream<TokioIo<Upgraded>>;

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
const CLOSE: u8 = 255;

/// The largest WebSocket message (and frame) a client may send. kubectl
/// and kubelet write stdin and port-forward data in 32 KiB chunks;
/// tungstenite's defaults (64 MiB messages, 16 MiB frames) let one
/// connection make vcrid buffer 64 MiB.
pub(crate) const MAX_MESSAGE: usize = 1 << 20;

/// The server side's limits.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

/// How channels are put into messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Binary,
    Base64,
}

const REMOTECOMMAND: &[(&str, (Version, Framing))] = &[
    ("v5.channel.k8s.io", (Version::V5, Framing::Binary)),
    ("v4.channel.k8s.io", (Version::V4, Framing::Binary)),
    ("v4.base64.channel.k8s.io", (Version::V4, Framing::Base64)),
    ("channel.k8s.io", (Version::V1, Framing::Binary)),
    ("base64.channel.k8s.io", (Version::V1, Framing::Base64)),
];

const PORTFORWARD: &[(&str, Framing)] = &[
    ("v4.portforward.k8s.io", Framing::Binary),
    ("portforward.k8s.io", Framing::Binary),
    ("v4.base64.portforward.k8s.io", Framing::Base64),
];

impl Framing {
    fn encode(self, channel: u8, data: &[u8]) -> Message {
        match self {
            Framing::Binary => {
                let mut v = Vec::with_capacity(data.len() + 1);
                v.push(channel);
                v.extend_from_slice(data);
                Message::Binary(Bytes::from(v))
            }
            Framing::Base64 => Message::text(format!(
                "{}{}",
                char::from(b'0' + channel % 10),
                BASE64.encode(data)
            )),
        }
    }

    /// The channel and payload of a data message; `None` for control or malformed messages.
    fn decode(self, msg: &Message) -> Option<(u8, Vec<u8>)> {
        match (self, msg) {
            (Framing::Binary, Message::Binary(b)) => {
                let (ch, rest) = b.split_first()?;
                Some((*ch, rest.to_vec()))
            }
            (Framing::Base64, Message::Text(t)) => {
                let s = t.as_str();
                let ch = s
                    .as_bytes()
                    .first()?
                    .checked_sub(b'0')
                    .filter(|c| *c < 10)?;
                let data = BASE64.decode(s.get(1..)?.as_bytes()).ok()?;
                Some((ch, data))
            }
            _ => None,
        }
    }
}

/// Answers a WebSocket upgrade request and starts the handler.
pub(crate) fn upgrade(
    inner: Arc<Inner>,
    pending: Pending,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let headers = req.headers();
    let key = headers
        .get("sec-websocket-key")
        .map(|k| k.as_bytes().to_vec());
    let version_ok = headers
        .get("sec-websocket-version")
        .is_some_and(|v| v.as_bytes() == b"13");
    let Some(key) = key.filter(|_| version_ok) else {
        return plain(
            StatusCode::BAD_REQUEST,
            "unable to upgrade: a WebSocket upgrade needs Sec-WebSocket-Key and Sec-WebSocket-Version: 13",
        );
    };
    let client = header_values(headers, "sec-websocket-protocol");
    enum Plan {
        Remote(Command, Streams, Version, Framing),
        Forward(PortForwardRequest, Vec<u16>, Framing),
    }
    let (chosen, plan) = match Command::from_pending(pending) {
        Ok((cmd, streams)) => {
            let (chosen, (version, framing)) = if client.is_empty() {
                (None, (Version::V1, Framing::Binary))
            } else {
                match negotiate(&client, REMOTECOMMAND) {
                    Some((p, v)) => (Some(p), v),
                    None => return refuse(&client, REMOTECOMMAND.iter().map(|(p, _)| *p)),
                }
            };
            (chosen, Plan::Remote(cmd, streams, version, framing))
        }
        Err(r) => {
            let (chosen, framing) = if client.is_empty() {
                (None, Framing::Binary)
            } else {
                match negotiate(&client, PORTFORWARD) {
                    Some((p, f)) => (Some(p), f),
                    None => return refuse(&client, PORTFORWARD.iter().map(|(p, _)| *p)),
                }
            };
            let ports = match ports(&r, req.uri().query()) {
                Ok(p) => p,
                Err(e) => return plain(StatusCode::BAD_REQUEST, e),
            };
            (chosen, Plan::Forward(r, ports, framing))
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let task_inner = inner.clone();
    inner.spawn(async move {
        let ws = match on_upgrade.await {
            Ok(u) => {
                WebSocketStream::from_raw_socket(TokioIo::new(u), Role::Server, Some(ws_config()))
                    .await
            }
            Err(e) => {
                tracing::debug!(error = %e, "WebSocket upgrade failed");
                return;
            }
        };
        match plan {
            Plan::Remote(cmd, streams, version, framing) => {
                serve_remotecommand(task_inner, cmd, streams, version, framing, ws).await
            }
            Plan::Forward(req, ports, framing) => {
                serve_portforward(task_inner, req, ports, framing, ws).await
            }
        }
    });
    let mut resp = Response::new(Body::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(&key)) {
        h.insert("sec-websocket-accept", accept);
    }
    if let Some(p) = chosen {
        h.insert("sec-websocket-protocol", HeaderValue::from_static(p));
    }
    resp
}

fn refuse<'a>(client: &[String], server: impl Iterator<Item = &'a str>) -> Response<Body> {
    let server: Vec<&str> = server.collect();
    plain(
        StatusCode::BAD_REQUEST,
        format!(
            "unable to upgrade: no supported WebSocket protocol: client asked for {client:?}, server accepts {server:?}"
        ),
    )
}

/// The ports to forward: the `port` query parameters (kubelet's form, repeated or
/// comma-separated), else the request's own ports.
fn ports(req: &PortForwardRequest, query: Option<&str>) -> Result<Vec<u16>, String> {
    let mut raw: Vec<String> = Vec::new();
    for pair in query.unwrap_or("").split('&') {
        if let Some(v) = pair.strip_prefix("port=") {
            if v.is_empty() {
                return Err("query parameter \"port\" cannot be empty".into());
            }
            raw.extend(v.split(',').map(str::to_string));
        }
    }
    if raw.is_empty() {
        raw = req.ports.iter().map(|p| p.to_string()).collect();
    }
    if raw.is_empty() {
        return Err("query parameter \"port\" is required".into());
    }
    if raw.len() > 64 {
        return Err(format!("{} ports asked for, at most 64", raw.len()));
    }
    raw.iter().map(|p| check_port(req, p)).collect()
}

/// Sends queued messages, then closes the WebSocket when every sender is gone. The close
/// frame says 1000 (normal): client-go reads anything else as an error on every stream, the
/// error stream included.
async fn write_loop(mut sink: SplitSink<Ws, Message>, mut rx: mpsc::Receiver<Message>) {
    while let Some(m) = rx.recv().await {
        if sink.send(m).await.is_err() {
            return;
        }
    }
    let normal = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    let _ = sink.send(Message::Close(Some(normal))).await;
    let _ = sink.close().await;
}

/// Copies a byte stream into messages on `channel`.
async fn pump_out<R: AsyncRead + Unpin>(
    mut r: R,
    channel: u8,
    framing: Framing,
    tx: mpsc::Sender<Message>,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send(framing.encode(channel, &buf[..n])).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// After the last message: wait (bounded) for the client's close so it sees a clean close.
async fn finish(writer: tokio::task::JoinHandle<()>, reader: tokio::task::JoinHandle<()>) {
    let _ = writer.await;
    let abort = reader.abort_handle();
    if tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .is_err()
    {
        abort.abort();
    }
}

async fn serve_remotecommand(
    inner: Arc<Inner>,
    cmd: Command,
    streams: Streams,
    version: Version,
    framing: Framing,
    ws: Ws,
) {
    let (sink, source) = ws.split();
    let (out_tx, out_rx) = mpsc::channel::<Message>(32);
    let writer = tokio::spawn(write_loop(sink, out_rx));

    let (stdin_ours, stdin_theirs) = pipe(streams.stdin);
    let (resize_tx, resize_rx) = if streams.tty {
        let (tx, rx) = mpsc::channel(16);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let mut pumps = JoinSet::new();
    let mut out = |wanted: bool, channel: u8| -> Option<BoxWriter> {
        let (theirs, ours) = pipe(wanted);
        let ours = ours?;
        pumps.spawn(pump_out(ours, channel, framing, out_tx.clone()));
        theirs.map(|t| Box::new(t) as BoxWriter)
    };
    let stdout = out(streams.stdout, STDOUT);
    let stderr = out(streams.stderr && !streams.tty, STDERR);
    let mut reader = tokio::spawn(read_remotecommand(source, framing, stdin_ours, resize_tx));
    let io = StreamIo {
        tty: streams.tty,
        stdin: stdin_theirs.map(|s| Box::new(s) as BoxReader),
        stdout,
        stderr,
        resize: resize_rx,
    };
    let outcome = tokio::select! {
        o = cmd.run(&inner, io) => o,
        _ = &mut reader => {
            tracing::debug!("streaming WebSocket client went away");
            writer.abort();
            return;
        }
    };
    // Everything the command wrote goes out before the status.
    while pumps.join_next().await.is_some() {}
    let status = version.status_bytes(&outcome);
    if !status.is_empty() {
        let _ = out_tx.send(framing.encode(ERROR, &status)).await;
    }
    drop(out_tx);
    finish(writer, reader).await;
}

/// A pipe when `wanted`: (the end the server drives, the end the runtime gets).
fn pipe(wanted: bool) -> (Option<DuplexStream>, Option<DuplexStream>) {
    if wanted {
        let (a, b) = tokio::io::duplex(64 * 1024);
        (Some(a), Some(b))
    } else {
        (None, None)
    }
}

async fn read_remotecommand(
    mut source: SplitStream<Ws>,
    framing: Framing,
    mut stdin: Option<DuplexStream>,
    resize: Option<mpsc::Sender<TermSize>>,
) {
    while let Some(msg) = source.next().await {
        let msg = match msg {
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(m) => m,
        };
        let Some((channel, data)) = framing.decode(&msg) else {
            continue;
        };
        match channel {
            STDIN => {
                if let Some(w) = stdin.as_mut() {
                    if w.write_all(&data).await.is_err() {
                        stdin = None;
                    }
                }
            }
            RESIZE => {
                if let Some(tx) = &resize {
                    match serde_json::from_slice::<TermSize>(&data) {
                        Ok(size) => {
                            let _ = tx.send(size).await;
                        }
                        Err(e) => tracing::debug!(error = %e, "malformed resize message ignored"),
                    }
                }
            }
            // v5's "close channel": the client is done with stdin, EOF for the command.
            // Honoured on older versions too: client-go sends it whatever was negotiated, and
            // channel 255 means nothing else there.
            CLOSE if data.first() == Some(&STDIN) => {
                if let Some(mut w) = stdin.take() {
                    let _ = w.shutdown().await;
                }
            }
            _ => {}
        }
    }
}

async fn serve_portforward(
    inner: Arc<Inner>,
    req: PortForwardRequest,
    ports: Vec<u16>,
    framing: Framing,
    ws: Ws,
) {
    let (sink, source) = ws.split();
    let (out_tx, out_rx) = mpsc::channel::<Message>(32);
    let writer = tokio::spawn(write_loop(sink, out_rx));
    let req = Arc::new(req);
    let mut writers: Vec<Option<WriteHalf<DuplexStream>>> = Vec::new();
    let mut forwards = JoinSet::new();
    for (i, port) in ports.iter().copied().enumerate() {
        let data_ch = (2 * i) as u8;
        let err_ch = data_ch + 1;
        for ch in [data_ch, err_ch] {
            let _ = out_tx.send(framing.encode(ch, &port.to_le_bytes())).await;
        }
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let (rd, wr) = tokio::io::split(ours);
        writers.push(Some(wr));
        let (inner, req, tx) = (inner.clone(), req.clone(), out_tx.clone());
        forwards.spawn(async move {
            let pump = tokio::spawn(pump_out(rd, data_ch, framing, tx.clone()));
            if let Some(msg) = forward(&inner, &req, port, Box::new(theirs)).await {
                let _ = tx.send(framing.encode(err_ch, msg.as_bytes())).await;
            }
            let _ = pump.await;
        });
    }
    drop(out_tx);
    let mut reader = tokio::spawn(read_portforward(source, framing, writers));
    tokio::select! {
        _ = async { while forwards.join_next().await.is_some() {} } => {}
        _ = &mut reader => {
            // The client closed: its write sides are shut, let the forwards drain.
            while forwards.join_next().await.is_some() {}
        }
    }
    finish(writer, reader).await;
}

async fn read_portforward(
    mut source: SplitStream<Ws>,
    framing: Framing,
    mut writers: Vec<Option<WriteHalf<DuplexStream>>>,
) {
    while let Some(msg) = source.next().await {
        let msg = match msg {
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(m) => m,
        };
        let Some((channel, data)) = framing.decode(&msg) else {
            continue;
        };
        if channel % 2 != 0 {
            continue;
        }
        let i = usize::from(channel / 2);
        if let Some(slot) = writers.get_mut(i) {
            if let Some(w) = slot.as_mut() {
                if w.write_all(&data).await.is_err() {
                    *slot = None;
                }
            }
        }
    }
    for w in writers.iter_mut().flatten() {
        let _ = w.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_round_trips() {
        for f in [Framing::Binary, Framing::Base64] {
            let m = f.encode(STDERR, b"oops\0\xff");
            assert_eq!(f.decode(&m), Some((STDERR, b"oops\0\xff".to_vec())));
        }
        assert_eq!(Framing::Binary.decode(&Message::Binary(Bytes::new())), None);
        assert_eq!(Framing::Base64.decode(&Message::text("x!!")), None);
        assert_eq!(Framing::Base64.decode(&Message::text("1!!")), None);
    }

    #[test]
    fn ports_come_from_the_query_or_the_request() {
        let req = PortForwardRequest {
            pod_sandbox_id: "p".into(),
            ports: vec![],
        };
        assert_eq!(
            ports(&req, Some("port=80,8080&port=9")),
            Ok(vec![80, 8080, 9])
        );
        assert!(ports(&req, None).is_err());
        assert!(ports(&req, Some("port=")).is_err());
        assert!(ports(&req, Some("port=0")).is_err());
        assert!(ports(&req, Some("port=70000")).is_err());
        let req = PortForwardRequest {
            pod_sandbox_id: "p".into(),
            ports: vec![22],
        };
        assert_eq!(ports(&req, None), Ok(vec![22]));
        assert!(ports(&req, Some("port=23")).unwrap_err().contains("23"));
    }

    mod prop {
        use super::*;
        use futures_util::StreamExt;
        use proptest::prelude::*;
        use proptest::test_runner::{Config, RngSeed};
        use tokio::io::AsyncWriteExt;

        fn config(cases: u32) -> Config {
            Config {
                cases,
                rng_seed: RngSeed::Fixed(0x7e55_0c37),
                failure_persistence: None,
                ..Config::default()
            }
        }

        /// A client frame: FIN and opcode, the mask bit, a 7-, 16- or
        /// 64-bit length that may claim more than follows, masked payload.
        fn client_frame(opcode: u8, fin: bool, claimed: Option<u64>, payload: &[u8]) -> Vec<u8> {
            let mut v = vec![(u8::from(fin) << 7) | (opcode & 0x0f)];
            let len = claimed.unwrap_or(payload.len() as u64);
            match len {
                0..=125 => v.push(0x80 | len as u8),
                126..=0xffff => {
                    v.push(0x80 | 126);
                    v.extend_from_slice(&(len as u16).to_be_bytes());
                }
                _ => {
                    v.push(0x80 | 127);
                    v.extend_from_slice(&len.to_be_bytes());
                }
            }
            let mask = [0x37, 0xfa, 0x21, 0x3d];
            v.extend_from_slice(&mask);
            v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            v
        }

        /// What the server side (vcrid's config) makes of `input`: the
        /// messages read until the end or the first error, and that error.
        fn serve(input: Vec<u8>) -> (Vec<Message>, Option<String>) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (mut client, server) = tokio::io::duplex(1 << 16);
                let writer = tokio::spawn(async move {
                    let _ = client.write_all(&input).await;
                    let _ = client.shutdown().await;
                    // Keep the pipe open until the server has read it all.
                    let mut sink = Vec::new();
                    let _ = tokio::io::AsyncReadExt::read_to_end(&mut client, &mut sink).await;
                });
                let mut ws =
                    WebSocketStream::from_raw_socket(server, Role::Server, Some(ws_config())).await;
                let mut messages = Vec::new();
                let mut error = None;
                while let Ok(next) =
                    tokio::time::timeout(std::time::Duration::from_secs(5), ws.next()).await
                {
                    match next {
                        Some(Ok(m)) => messages.push(m),
                        Some(Err(e)) => {
                            error = Some(e.to_string());
                            break;
                        }
                        None => break,
                    }
                }
                drop(ws);
                let _ = writer.await;
                (messages, error)
            })
        }

        proptest! {
            #![proptest_config(config(500))]

            /// Channel frames, mutated: every message either decodes to a
            /// channel and data or is refused by `Framing::decode` — no panic.
            #[test]
            fn mutated_client_frames_never_panic(
                frames in proptest::collection::vec((0u8..16, any::<bool>(), proptest::collection::vec(any::<u8>(), 0..300)), 1..5),
                flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
            ) {
                let mut wire = Vec::new();
                for (op, fin, payload) in &frames {
                    let op = [0x1, 0x2, 0x0, 0x8, 0x9, 0xa][usize::from(*op) % 6];
                    wire.extend(client_frame(op, *fin, None, payload));
                }
                for (at, b) in flips {
                    let i = at % wire.len();
                    wire[i] ^= b;
                }
                let (messages, _) = serve(wire);
                for m in &messages {
                    for f in [Framing::Binary, Framing::Base64] {
                        if let Some((ch, data)) = f.decode(m) {
                            prop_assert!(f != Framing::Base64 || ch < 10);
                            prop_assert!(data.len() <= MAX_MESSAGE);
                        }
                    }
                }
            }

            /// A frame header claiming more than the limit is refused from
            /// the header (nothing that large is ever buffered).
            #[test]
            fn a_claimed_length_over_the_limit_is_refused(len in (MAX_MESSAGE as u64 + 1)..u64::MAX / 2, op in prop_oneof![Just(1u8), Just(2u8)]) {
                let (messages, error) = serve(client_frame(op, true, Some(len), b"short"));
                prop_assert!(messages.is_empty());
                let error = error.unwrap_or_default();
                prop_assert!(error.contains("too long") || error.contains("Space limit"), "{}", error);
            }
        }

        /// Fragments adding up past the limit are refused too.
        #[test]
        fn a_message_over_the_limit_in_fragments_is_refused() {
            let chunk = vec![7u8; 256 * 1024];
            let mut wire = client_frame(0x2, false, None, &chunk);
            for _ in 0..4 {
                wire.extend(client_frame(0x0, false, None, &chunk));
            }
            wire.extend(client_frame(0x0, true, None, b"end"));
            let (messages, error) = serve(wire);
            assert!(messages.is_empty(), "{} messages", messages.len());
            assert!(error.is_some_and(|e| e.contains("too long")));
            // ...and one just under the limit is read whole.
            let mut wire = client_frame(0x2, false, None, &chunk);
            wire.extend(client_frame(0x0, true, None, &chunk[..1000]));
            let (messages, error) = serve(wire);
            assert_eq!(messages.len(), 1, "{error:?}");
            assert_eq!(
                Framing::Binary
                    .decode(&messages[0])
                    .map(|(c, d)| (c, d.len())),
                Some((7, chunk.len() + 999))
            );
        }
    }
}
