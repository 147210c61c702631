//! Exec and attach over SPDY (Kubernetes' `remotecommand` protocol, v1 to v4).
//!
//! The client opens one stream per standard stream, named by the `streamType` header
//! (`error`, `stdin`, `stdout`, `stderr`, `resize`). The server waits for the ones the request
//! asked for, runs the command, closes stdout/stderr, and writes how it ended on `error`:
//! a JSON `metav1.Status` from v4 on, the bare error text before.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::request::Streams;
use super::server::Inner;
use super::spdy::{frame::rst, Headers, Role, Session, Stream};
use super::status::Outcome;
use super::token::Pending;
use super::{BoxReader, BoxWriter, PortForwardRequest, StreamIo, TermSize};

/// The protocol generations; later ones add resize (v3) and the JSON status (v4). v5 is
/// WebSocket only (it adds closing a single channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Version {
    V1,
    V2,
    V3,
    V4,
    V5,
}

impl Version {
    pub(crate) fn json_status(self) -> bool {
        self >= Version::V4
    }

    pub(crate) fn status_bytes(self, outcome: &Outcome) -> Vec<u8> {
        if self.json_status() {
            outcome.v4_json()
        } else {
            outcome.plain()
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub(crate) enum Command {
    Exec {
        container_id: String,
        cmd: Vec<String>,
    },
    Attach {
        container_id: String,
    },
}

impl Command {
    /// The command and streams of an exec or attach request; a port-forward request back.
    pub(crate) fn from_pending(p: Pending) -> Result<(Command, Streams), PortForwardRequest> {
        match p {
            Pending::Exec(r) => {
                let streams = r.streams();
                let cmd = Command::Exec {
                    container_id: r.container_id,
                    cmd: r.cmd,
                };
                Ok((cmd, streams))
            }
            Pending::Attach(r) => {
                let streams = r.streams();
                Ok((
                    Command::Attach {
                        container_id: r.container_id,
                    },
                    streams,
                ))
            }
            Pending::PortForward(r) => Err(r),
        }
    }

    fn container_id(&self) -> &str {
        match self {
            Command::Exec { container_id, .. } | Command::Attach { container_id } => container_id,
        }
    }

    /// Runs the command through the runtime; never fails, the outcome says how it ended.
    pub(crate) async fn run(&self, inner: &Inner, io: StreamIo) -> Outcome {
        match self {
            Command::Exec { container_id, cmd } => {
                match inner.runtime.exec(container_id, cmd, io).await {
                    Ok(0) => Outcome::Success,
                    Ok(code) => Outcome::ExitCode {
                        cmd: cmd.clone(),
                        code,
                    },
                    Err(e) => {
                        tracing::warn!(container = %container_id, error = %e, "exec failed");
                        Outcome::Error(format!("exec in container {container_id} failed: {e}"))
                    }
                }
            }
            Command::Attach { container_id } => {
                match inner.runtime.attach(container_id, io).await {
                    Ok(()) => Outcome::Success,
                    Err(e) => {
                        tracing::warn!(container = %container_id, error = %e, "attach failed");
                        Outcome::Error(format!("attach to container {container_id} failed: {e}"))
                    }
                }
            }
        }
    }
}

/// Reads `{"Width":w,"Height":h}` objects off a byte stream into `tx` until it ends.
pub(crate) async fn pump_resize<R: AsyncRead + Unpin>(mut r: R, tx: mpsc::Sender<TermSize>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<TermSize>();
        let mut consumed = 0;
        loop {
            match it.next() {
                Some(Ok(size)) => {
                    consumed = it.byte_offset();
                    if tx.send(size).await.is_err() {
                        return;
                    }
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "malformed resize message, resize stream ignored");
                    return;
                }
                None => {
                    consumed = buf.len();
                    break;
                }
            }
        }
        buf.drain(..consumed);
        if buf.len() > 64 * 1024 {
            tracing::debug!("resize message over 64 KiB, resize stream ignored");
            return;
        }
    }
}

#[derive(Default)]
struct Gathered {
    error: Option<Stream>,
    stdin: Option<Stream>,
    stdout: Option<Stream>,
    stderr: Option<Stream>,
    resize: Option<Stream>,
}

impl Gathered {
    fn complete(&self, want: &Want) -> bool {
        self.error.is_some()
            && (!want.stdin || self.stdin.is_some())
            && (!want.stdout || self.stdout.is_some())
            && (!want.stderr || self.stderr.is_some())
            && (!want.resize || self.resize.is_some())
    }
}

struct Want {
    stdin: bool,
    stdout: bool,
    stderr: bool,
    resize: bool,
}

/// Serves one exec or attach connection after the SPDY upgrade.
pub(crate) async fn serve_spdy<T>(
    inner: Arc<Inner>,
    cmd: Command,
    streams: Streams,
    version: Version,
    io: T,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let mut session = match Session::new(io, Role::Server, inner.config.spdy.clone()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot start a SPDY session");
            return;
        }
    };
    let want = Want {
        stdin: streams.stdin,
        stdout: streams.stdout,
        stderr: streams.stderr && !streams.tty,
        resize: streams.tty && version >= Version::V3,
    };
    let Some(mut got) = gather(&mut session, &want, inner.config.stream_creation_timeout).await
    else {
        session.close().await;
        return;
    };
    let resize = got.resize.take().map(|r| {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(pump_resize(r, tx));
        rx
    });
    // Only what the request asked for reaches the runtime, whatever else the client opened.
    let io = StreamIo {
        tty: streams.tty,
        stdin: got
            .stdin
            .take()
            .filter(|_| want.stdin)
            .map(|s| Box::new(s) as BoxReader),
        stdout: got
            .stdout
            .take()
            .filter(|_| want.stdout)
            .map(|s| Box::new(s) as BoxWriter),
        stderr: got
            .stderr
            .take()
            .filter(|_| want.stderr)
            .map(|s| Box::new(s) as BoxWriter),
        resize,
    };
    let outcome = tokio::select! {
        o = cmd.run(&inner, io) => Some(o),
        // The client left: the runtime call is dropped.
        _ = session.closed() => None,
    };
    let Some(outcome) = outcome else {
        tracing::debug!(container = %cmd.container_id(), "streaming client went away");
        return;
    };
    if let Some(mut error) = got.error.take() {
        let status = version.status_bytes(&outcome);
        if !status.is_empty() {
            let _ = error.write_all(&status).await;
        }
        let _ = error.shutdown().await;
    }
    session.close().await;
}

/// Accepts streams until those `want` asks for (and `error`) are there.
async fn gather(session: &mut Session, want: &Want, timeout: Duration) -> Option<Gathered> {
    let mut got = Gathered::default();
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    while !got.complete(want) {
        let stream = tokio::select! {
            s = session.accept() => s?,
            _ = &mut deadline => {
                tracing::info!(?timeout, "timed out waiting for the client to create streams");
                return None;
            }
        };
        let kind = stream.headers().get("streamtype").unwrap_or("").to_string();
        let slot = match kind.as_str() {
            "error" => &mut got.error,
            "stdin" => &mut got.stdin,
            "stdout" => &mut got.stdout,
            "stderr" => &mut got.stderr,
            "resize" => &mut got.resize,
            _ => {
                tracing::debug!(stream_type = %kind, "unexpected stream type refused");
                stream.reset(rst::REFUSED_STREAM);
                continue;
            }
        };
        if slot.is_some() {
            tracing::debug!(stream_type = %kind, "duplicate stream refused");
            stream.reset(rst::REFUSED_STREAM);
            continue;
        }
        stream.reply(Headers::new(), false);
        *slot = Some(stream);
    }
    Some(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resize_messages_split_anywhere_are_parsed() {
        let (mut w, r) = tokio::io::duplex(64);
        let (tx, mut rx) = mpsc::channel(16);
        let task = tokio::spawn(pump_resize(r, tx));
        let msgs = br#"{"Width":80,"Height":24}{"Width":100,"Height":50}"#;
        for chunk in msgs.chunks(7) {
            w.write_all(chunk).await.unwrap();
        }
        assert_eq!(
            rx.recv().await,
            Some(TermSize {
                width: 80,
                height: 24
            })
        );
        assert_eq!(
            rx.recv().await,
            Some(TermSize {
                width: 100,
                height: 50
            })
        );
        w.write_all(b"garbage").await.unwrap();
        drop(w);
        assert_eq!(rx.recv().await, None);
        task.await.unwrap();
    }
}
