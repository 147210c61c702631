//! The `:authority` rewrite end to end: a real tonic server (the fake
//! `vc.test.Echo` service behind `cri::grpc_authority`) and a real `h2`
//! client. h2 itself only sends authorities it can parse, so the client's
//! connection goes through `Patch`, which swaps the literal h2 writes for
//! "www.example.com" (its Huffman form, RFC 7541 C.4.1) for the authority
//! under test — "/run/x.sock", its percent-encoding, or "" — as gRPC-Go,
//! grpc-java or grpc-python would send it. The client's later requests refer
//! to it through the HPACK dynamic table, which the layer must follow.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    future::poll_fn,
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{ready, Context, Poll},
    time::Duration,
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{UnixListener, UnixStream},
};

/// `:authority: www.example.com` as h2 writes it: literal with incremental
/// indexing, name index 1, Huffman-coded value.
const PLACEHOLDER: &[u8] = &[
    0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
];
const AUTHORITIES: [&str; 3] = ["/run/x.sock", "%2Frun%2Fx.sock", ""];

/// The client's side of a connection: rewrites the placeholder authority in
/// the HEADERS frames it writes, counting how often.
struct Patch {
    inner: UnixStream,
    replacement: Vec<u8>,
    pending: BytesMut,
    out: BytesMut,
    preface_left: usize,
    patched: Arc<AtomicUsize>,
}

impl Patch {
    fn new(inner: UnixStream, authority: &str, patched: Arc<AtomicUsize>) -> Self {
        assert!(authority.len() < 127);
        let mut replacement = vec![0x41, authority.len() as u8];
        replacement.extend_from_slice(authority.as_bytes());
        Self {
            inner,
            replacement,
            pending: BytesMut::new(),
            out: BytesMut::new(),
            preface_left: 24,
            patched,
        }
    }

    fn process(&mut self) {
        let n = self.preface_left.min(self.pending.len());
        self.out.extend_from_slice(&self.pending.split_to(n));
        self.preface_left -= n;
        if self.preface_left > 0 {
            return;
        }
        while self.pending.len() >= 9 {
            let len = (usize::from(self.pending[0]) << 16)
                | (usize::from(self.pending[1]) << 8)
                | usize::from(self.pending[2]);
            if self.pending.len() < 9 + len {
                return;
            }
            let mut frame = self.pending.split_to(9 + len);
            if frame[3] == 0x1 {
                let payload = &frame[9..];
                if let Some(at) = payload
                    .windows(PLACEHOLDER.len())
                    .position(|w| w == PLACEHOLDER)
                {
                    let mut p = payload[..at].to_vec();
                    p.extend_from_slice(&self.replacement);
                    p.extend_from_slice(&payload[at + PLACEHOLDER.len()..]);
                    let mut f = BytesMut::new();
                    f.put_uint(p.len() as u64, 3);
                    f.extend_from_slice(&frame[3..9]);
                    f.extend_from_slice(&p);
                    frame = f;
                    self.patched.fetch_add(1, Ordering::SeqCst);
                }
            }
            self.out.extend_from_slice(&frame);
        }
    }

    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out))?;
            self.out.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Patch {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Patch {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        this.pending.extend_from_slice(buf);
        this.process();
        if let Poll::Ready(Err(e)) = this.drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// A fake server on a socket in a temp dir; stops when dropped.
struct Server {
    _dir: tempfile::TempDir,
    path: PathBuf,
    _stop: tokio::sync::oneshot::Sender<()>,
}

fn start(rewrite: bool) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(cri::grpc_authority::fake::serve(listener, rewrite, async {
        let _ = stopped.await;
    }));
    Server {
        _dir: dir,
        path,
        _stop: stop,
    }
}

type Client = h2::client::SendRequest<Bytes>;

async fn connect(path: &Path, authority: &str) -> (Client, Arc<AtomicUsize>) {
    let patched = Arc::new(AtomicUsize::new(0));
    let io = Patch::new(
        UnixStream::connect(path).await.unwrap(),
        authority,
        patched.clone(),
    );
    let (client, conn) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    (client, patched)
}

#[derive(Debug)]
struct Reply {
    messages: Vec<Bytes>,
    grpc_status: String,
}

/// One gRPC call: `message` sent under flow control, the response read
/// releasing capacity as it goes.
async fn call(client: &Client, method: &str, message: &[u8]) -> Result<Reply, h2::Error> {
    let mut client = client.clone().ready().await?;
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://www.example.com/vc.test.Echo/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut send) = client.send_request(req, false)?;
    let mut data = BytesMut::with_capacity(5 + message.len());
    data.put_u8(0);
    data.put_u32(message.len() as u32);
    data.extend_from_slice(message);
    let mut data = data.freeze();
    while !data.is_empty() {
        send.reserve_capacity(data.len().min(1 << 20));
        let cap = poll_fn(|cx| send.poll_capacity(cx))
            .await
            .expect("stream closed while sending")?;
        let chunk = data.split_to(cap.min(data.len()));
        send.send_data(chunk, data.is_empty())?;
    }
    let response = response.await?;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        body.flow_control().release_capacity(chunk.len())?;
        buf.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await?.expect("trailers");
    let mut messages = Vec::new();
    while !buf.is_empty() {
        assert_eq!(buf.get_u8(), 0, "uncompressed");
        let len = buf.get_u32() as usize;
        messages.push(buf.split_to(len).freeze());
    }
    Ok(Reply {
        messages,
        grpc_status: trailers
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default(),
    })
}

const T: Duration = Duration::from_secs(60);

#[tokio::test]
async fn socket_path_percent_encoded_and_empty_authorities_are_served() {
    let server = start(true);
    for authority in AUTHORITIES {
        let (client, patched) = connect(&server.path, authority).await;
        // Three calls on one connection: the first sends the authority as
        // a literal (indexed), the others refer to the table entry.
        for i in 0..3u8 {
            let msg = vec![i; 100];
            let reply = tokio::time::timeout(T, call(&client, "Unary", &msg))
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("authority {authority:?}: {e}"));
            assert_eq!(reply.grpc_status, "0");
            assert_eq!(reply.messages, [Bytes::from(msg)]);
        }
        assert_eq!(patched.load(Ordering::SeqCst), 1, "{authority:?}");
    }
}

#[tokio::test]
async fn without_the_layer_h2_refuses_all_three_authorities() {
    let server = start(false);
    for authority in AUTHORITIES {
        let (client, patched) = connect(&server.path, authority).await;
        let err = tokio::time::timeout(T, call(&client, "Unary", b"x"))
            .await
            .unwrap()
            .expect_err(authority);
        assert_eq!(patched.load(Ordering::SeqCst), 1);
        assert_eq!(err.reason(), Some(h2::Reason::PROTOCOL_ERROR), "{err}");
    }
    // The placeholder itself is a fine authority: the server works.
    let (client, _) = connect(&server.path, "www.example.com").await;
    let reply = call(&client, "Unary", b"ok").await.unwrap();
    assert_eq!(reply.messages, [Bytes::from_static(b"ok")]);
}

#[tokio::test]
async fn a_16_mib_response_arrives_whole() {
    let server = start(true);
    let (client, _) = connect(&server.path, "/run/x.sock").await;
    let n: u64 = 16 << 20;
    let reply = tokio::time::timeout(T, call(&client, "Big", &n.to_be_bytes()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.grpc_status, "0");
    assert_eq!(reply.messages.len(), 1);
    let big = &reply.messages[0];
    assert_eq!(big.len(), 16 << 20);
    assert!(big.iter().enumerate().all(|(i, &b)| b == i as u8));
}

#[tokio::test]
async fn server_streaming_delivers_every_message() {
    let server = start(true);
    let (client, _) = connect(&server.path, "%2Frun%2Fx.sock").await;
    let mut req = Vec::new();
    req.put_u32(200);
    req.put_u32(3000);
    let reply = tokio::time::timeout(T, call(&client, "Stream", &req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.grpc_status, "0");
    assert_eq!(reply.messages.len(), 200);
    for (i, m) in reply.messages.iter().enumerate() {
        assert_eq!(m.len(), 3000);
        assert!(m.iter().all(|&b| b == i as u8));
    }
}

#[tokio::test]
async fn a_hundred_concurrent_streams_on_one_connection() {
    let server = start(true);
    let (client, _) = connect(&server.path, "").await;
    let calls: Vec<_> = (0..100u32)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let msg: Vec<u8> = format!("call {i} ").repeat(i as usize + 1).into_bytes();
                let reply = call(&client, "Unary", &msg).await.unwrap();
                assert_eq!(reply.grpc_status, "0");
                assert_eq!(reply.messages, [Bytes::from(msg)]);
            })
        })
        .collect();
    for c in calls {
        tokio::time::timeout(T, c).await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn a_large_upload_goes_through_under_flow_control() {
    let server = start(true);
    let (client, _) = connect(&server.path, "/run/x.sock").await;
    let upload: Vec<u8> = (0..(20u32 << 20)).map(|i| (i % 251) as u8).collect();
    let total: u64 = upload.iter().map(|&b| u64::from(b)).sum();
    let reply = tokio::time::timeout(T, call(&client, "Sum", &upload))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.grpc_status, "0");
    let mut m = reply.messages[0].clone();
    assert_eq!(m.get_u64(), upload.len() as u64);
    assert_eq!(m.get_u64(), total);
}

#[tokio::test]
async fn garbage_ends_the_connection_and_the_server_keeps_serving() {
    let server = start(true);
    let mut raw = UnixStream::connect(&server.path).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // SETTINGS (empty), then HEADERS with a bad HPACK index.
    raw.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    raw.write_all(&[0, 0, 1, 1, 4, 0, 0, 0, 1, 0xff])
        .await
        .unwrap();
    let mut sink = Vec::new();
    tokio::time::timeout(T, raw.read_to_end(&mut sink))
        .await
        .expect("the server closes the connection")
        .unwrap();
    let (client, _) = connect(&server.path, "/run/x.sock").await;
    let reply = call(&client, "Unary", b"still here").await.unwrap();
    assert_eq!(reply.messages, [Bytes::from_static(b"still here")]);
}
