//! Makes vcrid's socket speak to gRPC clients whose `:authority` h2 refuses.
//!
//! gRPC-Go dialing a unix socket through a custom dialer (kubelet, crictl and
//! critest up to Kubernetes 1.26) and grpc-java send the socket's path as
//! HTTP/2 `:authority`, grpc-python ≥ 1.57 its percent-encoding, some send it
//! empty. h2 0.4 (under tonic) resets such a stream as malformed before tonic
//! sees it. [`AuthorityRewrite`] wraps each accepted connection: the
//! server→client bytes pass untouched; on the client→server side every header
//! block gets `:authority: localhost` (see [`frames`] and [`hpack`]). A
//! malformed client stream ends that connection with an `InvalidData` error,
//! logged once at warn.

#[cfg(any(test, feature = "testing"))]
pub mod fake;
pub mod frames;
pub mod hpack;
mod huffman;

use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::BytesMut;
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

pub use frames::FrameError;

/// How much is read from the client at once into our own buffer (inside
/// header frames).
const READ_CHUNK: usize = 16 * 1024;
/// How much is read at most straight into the caller's buffer.
const DIRECT_READ: usize = 256 * 1024;

/// An accepted HTTP/2 connection whose client→server header blocks get
/// `:authority: localhost`; everything else is passed as it is.
#[derive(Debug)]
pub struct AuthorityRewrite<T> {
    inner: T,
    rewriter: frames::Rewriter,
    /// Read from the client, not yet through the rewriter.
    input: BytesMut,
    /// Through the rewriter, not yet read by the server.
    output: BytesMut,
    /// Set once the client's stream was refused (logged then).
    failed: Option<String>,
}

impl<T> AuthorityRewrite<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            rewriter: frames::Rewriter::new(),
            input: BytesMut::new(),
            output: BytesMut::new(),
            failed: None,
        }
    }

    /// How many `:authority` fields this connection had replaced so far.
    pub fn rewritten(&self) -> u64 {
        self.rewriter.rewritten()
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

/// The accepted connections of `listener`, each wrapped.
pub fn incoming(
    listener: tokio::net::UnixListener,
) -> impl Stream<Item = io::Result<AuthorityRewrite<tokio::net::UnixStream>>> {
    tokio_stream::wrappers::UnixListenerStream::new(listener).map(|s| s.map(AuthorityRewrite::new))
}

impl<T: AsyncRead + Unpin> AsyncRead for AuthorityRewrite<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        // Whether `input` went through the rewriter since the last read.
        let mut fed = false;
        loop {
            if !this.output.is_empty() {
                let n = buf.remaining().min(this.output.len());
                buf.put_slice(&this.output.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if let Some(why) = &this.failed {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, why.clone())));
            }
            if this.input.is_empty() && this.rewriter.direct() {
                // Straight into the caller's buffer; what passes as it is
                // (payloads, frames other than HEADERS) stays there, the
                // rest goes through the rewriter.
                let n = buf.remaining().min(DIRECT_READ);
                let mut part = ReadBuf::new(buf.initialize_unfilled_to(n));
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut part))?;
                let got = part.filled();
                if got.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                let pass = this.rewriter.pass_prefix(got);
                this.input.extend_from_slice(&got[pass..]);
                buf.advance(pass);
                if pass > 0 {
                    return Poll::Ready(Ok(()));
                }
                fed = false;
                continue;
            } else if !fed {
                fed = true;
                if let Err(e) = this.rewriter.feed(&mut this.input, &mut this.output) {
                    let why = error_chain(&e);
                    tracing::warn!(error = %why, "gRPC connection refused: its HTTP/2 stream cannot be rewritten");
                    this.failed = Some(why);
                    this.input.clear();
                    this.output.clear();
                }
                continue;
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut part = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut part))?;
            if part.filled().is_empty() {
                // EOF: an unfinished frame is dropped, the server sees the end.
                return Poll::Ready(Ok(()));
            }
            this.input.extend_from_slice(part.filled());
            fed = false;
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AuthorityRewrite<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for AuthorityRewrite<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_refused_stream_is_an_error_and_stays_one() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut conn = AuthorityRewrite::new(server);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let e = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("preface"), "{e}");
        assert_eq!(
            conn.read(&mut buf).await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[tokio::test]
    async fn payloads_go_straight_through_and_writes_are_untouched() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut conn = AuthorityRewrite::new(server);
        let mut sent = frames::PREFACE.to_vec();
        let payload: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        sent.extend([0x01, 0x86, 0xa0, 0, 0, 0, 0, 0, 1]); // DATA, 100000 bytes
        sent.extend(&payload);
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            let mut back = vec![0u8; 5];
            client.read_exact(&mut back).await.unwrap();
            (sent, back)
        });
        let mut got = Vec::new();
        let mut buf = vec![0u8; 7000];
        while got.len() < 24 + 9 + payload.len() {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        conn.write_all(b"hello").await.unwrap();
        let (sent, back) = writer.await.unwrap();
        assert_eq!(got, sent);
        assert_eq!(back, b"hello");
        // EOF passes through.
        assert_eq!(conn.read(&mut buf).await.unwrap(), 0);
    }
}
