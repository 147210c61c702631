//! Reaching the agent's vsock port from the host.

use std::{io, path::PathBuf, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
};

/// Where the agent's vsock port is reachable from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A userspace vsock device's host-side unix socket ("hybrid vsock").
    Hybrid { uds: PathBuf, port: u32 },
    /// Kernel vsock: the guest's context ID.
    Vsock { cid: u32, port: u32 },
    /// The agent's virtio-serial port, served by QEMU on `uds`: the API
    /// only, one connection at a time.
    Serial { uds: PathBuf },
}

/// Why one dial attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// could not connect to the vsock device
    #[error("could not connect to {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: io::Error,
    },
    /// the hybrid vsock handshake did not answer OK: usually nobody listens in the guest yet
    #[error("{endpoint} refused the connection to port {port} (got {reply:?})")]
    Refused {
        endpoint: String,
        port: u32,
        reply: String,
    },
    /// the handshake did not complete in time
    #[error("handshake with {endpoint} timed out")]
    HandshakeTimeout { endpoint: String },
    /// the agent's port forwarder could not reach the port
    #[error("{reason}")]
    Forward { port: u16, reason: String },
    /// the channel carries the agent's API only
    #[error("{endpoint} carries the agent's API only: port forwarding needs a vsock channel (hypervisor.vsock = \"auto\", \"hybrid\" or \"vhost\")")]
    NoForwarding { endpoint: String },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Hybrid { uds, port } => write!(f, "hybrid-vsock://{}:{port}", uds.display()),
            Endpoint::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            Endpoint::Serial { uds } => write!(f, "serial://{}", uds.display()),
        }
    }
}

/// Upper bound on the hybrid handshake; the device answers within microseconds.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Upper bound on the serial port's answer to the auth line. The bytes wait
/// in QEMU until the guest opens the port, so a dial during boot waits for
/// the agent; a caller that waits longer dials again.
const SERIAL_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest reply line we accept from the device ("OK 4294967295\n").
const MAX_REPLY: usize = 32;

/// Opens one connection to the agent's port and returns it as a ttrpc socket,
/// authenticated with the VM's `secret` (see [`crate::auth`]; `None` only for
/// a VM booted before agents required one). A single attempt: callers that
/// wait for a booting guest retry.
pub async fn dial(
    endpoint: &Endpoint,
    secret: Option<&crate::AgentSecret>,
) -> Result<ttrpc::asynchronous::transport::Socket, DialError> {
    if let Endpoint::Serial { uds } = endpoint {
        return dial_serial(endpoint, uds, secret).await;
    }
    let mut socket = connect(endpoint).await?;
    if let Some(secret) = secret {
        tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            socket.write_all(secret.auth_line().as_bytes()),
        )
        .await
        .map_err(|_| DialError::HandshakeTimeout {
            endpoint: endpoint.to_string(),
        })?
        .map_err(|source| DialError::Connect {
            endpoint: endpoint.to_string(),
            source,
        })?;
    }
    Ok(socket)
}

/// The serial port: connect to QEMU's socket, send the hello (see
/// [`crate::serial`]), and wait for the agent's answer with this dial's
/// nonce (read byte by byte: what follows is ttrpc). The agent reads the
/// port only while it serves, so the answer is also the readiness notice.
async fn dial_serial(
    endpoint: &Endpoint,
    uds: &std::path::Path,
    secret: Option<&crate::AgentSecret>,
) -> Result<ttrpc::asynchronous::transport::Socket, DialError> {
    let name = endpoint.to_string();
    let failed = |source| DialError::Connect {
        endpoint: name.clone(),
        source,
    };
    let mut stream = UnixStream::connect(uds).await.map_err(failed)?;
    let nonce = crate::serial::new_nonce();
    let hello = secret
        .map(|s| crate::serial::hello_line(s, &nonce))
        .unwrap_or_default();
    let expected = String::from_utf8_lossy(&crate::serial::answer(nonce.as_bytes()))
        .trim_end()
        .to_string();
    let reply = tokio::time::timeout(SERIAL_ANSWER_TIMEOUT, async {
        stream.write_all(hello.as_bytes()).await?;
        read_answer(&mut stream, &expected).await
    })
    .await
    .map_err(|_| DialError::HandshakeTimeout {
        endpoint: name.clone(),
    })?
    .map_err(failed)?;
    if reply != expected {
        return Err(DialError::Refused {
            endpoint: name.clone(),
            port: crate::AGENT_VSOCK_PORT,
            reply,
        });
    }
    Ok(ttrpc::asynchronous::transport::Socket::from(stream))
}

async fn connect(endpoint: &Endpoint) -> Result<ttrpc::asynchronous::transport::Socket, DialError> {
    match endpoint {
        Endpoint::Serial { .. } => Err(DialError::NoForwarding {
            endpoint: endpoint.to_string(),
        }),
        Endpoint::Hybrid { uds, port } => {
            let name = endpoint.to_string();
            let mut stream =
                UnixStream::connect(uds)
                    .await
                    .map_err(|source| DialError::Connect {
                        endpoint: name.clone(),
                        source,
                    })?;
            let reply =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, hybrid_handshake(&mut stream, *port))
                    .await
                    .map_err(|_| DialError::HandshakeTimeout {
                        endpoint: name.clone(),
                    })?
                    .map_err(|source| DialError::Connect {
                        endpoint: name.clone(),
                        source,
                    })?;
            if !reply.starts_with("OK ") {
                return Err(DialError::Refused {
                    endpoint: name,
                    port: *port,
                    reply,
                });
            }
            Ok(ttrpc::asynchronous::transport::Socket::from(stream))
        }
        Endpoint::Vsock { cid, port } => {
            ttrpc::asynchronous::transport::Socket::connect_vsock(format!("{cid}:{port}"))
                .await
                .map_err(|source| DialError::Connect {
                    endpoint: endpoint.to_string(),
                    source,
                })
        }
    }
}

/// Opens a forwarded connection to TCP `port` on the pod's localhost
/// through the agent's forwarder ([`crate::FORWARD_VSOCK_PORT`] of the VM
/// that `endpoint` names; its own port is replaced). The returned socket
/// carries the connection's bytes.
pub async fn dial_forward(
    endpoint: &Endpoint,
    secret: Option<&crate::AgentSecret>,
    port: u16,
) -> Result<ttrpc::asynchronous::transport::Socket, DialError> {
    let endpoint = match endpoint {
        Endpoint::Hybrid { uds, .. } => Endpoint::Hybrid {
            uds: uds.clone(),
            port: crate::FORWARD_VSOCK_PORT,
        },
        Endpoint::Vsock { cid, .. } => Endpoint::Vsock {
            cid: *cid,
            port: crate::FORWARD_VSOCK_PORT,
        },
        Endpoint::Serial { .. } => {
            return Err(DialError::NoForwarding {
                endpoint: endpoint.to_string(),
            })
        }
    };
    let mut socket = dial(&endpoint, secret).await?;
    let name = endpoint.to_string();
    let reply = tokio::time::timeout(HANDSHAKE_TIMEOUT * 5, async {
        socket
            .write_all(format!("PORT {port}\n").as_bytes())
            .await?;
        read_line(&mut socket, crate::FORWARD_MAX_LINE).await
    })
    .await
    .map_err(|_| DialError::HandshakeTimeout {
        endpoint: name.clone(),
    })?
    .map_err(|source| DialError::Connect {
        endpoint: name,
        source,
    })?;
    match reply.strip_prefix("ERR ") {
        None if reply == "OK" => Ok(socket),
        Some(reason) => Err(DialError::Forward {
            port,
            reason: reason.to_string(),
        }),
        None => Err(DialError::Forward {
            port,
            reason: format!("the agent's forwarder answered {reply:?}"),
        }),
    }
}

/// Waits for the agent's readiness notice on a hybrid vsock device whose
/// host-side socket is `uds` (see [`crate::AGENT_READY_PORT`]). Listens on
/// the device's forwarding socket for that port, accepts connections until
/// one carries [`crate::READY_MESSAGE`], and removes the socket again.
pub async fn wait_ready_hybrid(uds: &std::path::Path, timeout: Duration) -> Result<(), DialError> {
    let path = crate::hybrid_listener_path(uds, crate::AGENT_READY_PORT);
    let endpoint = format!("{}", path.display());
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).map_err(|source| DialError::Connect {
        endpoint: endpoint.clone(),
        source,
    })?;
    let result = tokio::time::timeout(timeout, async {
        loop {
            let (mut stream, _) = listener
                .accept()
                .await
                .map_err(|source| DialError::Connect {
                    endpoint: endpoint.clone(),
                    source,
                })?;
            let mut buf = [0u8; 16];
            let mut got = 0;
            while got < crate::READY_MESSAGE.len() {
                match stream.read(&mut buf[got..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            if &buf[..got] == crate::READY_MESSAGE {
                return Ok(());
            }
        }
    })
    .await
    .map_err(|_| DialError::HandshakeTimeout {
        endpoint: endpoint.clone(),
    })
    .and_then(|r| r);
    let _ = std::fs::remove_file(&path);
    result
}

/// Sends `CONNECT <port>\n` and reads the reply line byte by byte, so that no
/// byte of the ttrpc stream that follows is consumed. Returns the line without
/// its newline; an empty string when the device closed the connection.
async fn hybrid_handshake(stream: &mut UnixStream, port: u32) -> io::Result<String> {
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    read_line(stream, MAX_REPLY).await
}

/// The most bytes of an older connection's frames skipped before the
/// serial port's answer (a few responses; one frame is at most 4 MiB).
const MAX_STALE: usize = 16 << 20;

/// The serial port's answer `expected`, after what may come first: whole
/// ttrpc frames (responses an old connection of the guest still wrote
/// before it saw this host replace its host) and answers to other hosts'
/// hellos (one that gave up left its hello in the port). A frame starts
/// with a 0 byte (its length's high byte), a line with a letter. Returns
/// `expected`, or the first line that is no answer at all.
async fn read_answer<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    expected: &str,
) -> io::Result<String> {
    let mut skipped = 0usize;
    loop {
        let mut first = [0u8; 1];
        if stream.read(&mut first).await? == 0 {
            return Ok(String::new());
        }
        if first[0] != 0 {
            let rest = read_line(stream, crate::serial::HELLO_LINE_MAX).await?;
            let line = format!("{}{rest}", char::from(first[0]));
            if line == expected || !(line == "OK" || line.starts_with("OK ")) {
                return Ok(line);
            }
            skipped += line.len() + 1;
        } else {
            let mut header = [0u8; 9];
            stream.read_exact(&mut header).await?;
            let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            skipped += 10 + len;
            let copied =
                tokio::io::copy(&mut (&mut *stream).take(len as u64), &mut tokio::io::sink())
                    .await?;
            if copied < len as u64 {
                return Ok(String::new());
            }
        }
        if skipped > MAX_STALE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("more than {MAX_STALE} bytes before the agent's answer"),
            ));
        }
    }
}

/// Reads one line of at most `max` bytes, byte by byte so that nothing after
/// it is consumed; without its newline, empty when the peer closed.
async fn read_line<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    max: usize,
) -> io::Result<String> {
    let mut line = Vec::with_capacity(max);
    let mut byte = [0u8; 1];
    while line.len() < max {
        if stream.read(&mut byte).await? == 0 {
            break;
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    async fn fake_device(reply: &'static [u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 13];
            s.read_exact(&mut buf).await.expect("read CONNECT");
            assert_eq!(&buf, b"CONNECT 1024\n");
            if reply.is_empty() {
                return; // the device closes: nobody listens on the port
            }
            s.write_all(reply).await.expect("reply");
            // Keep the stream open until the client is done.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        });
        (dir, path)
    }

    #[tokio::test]
    async fn hybrid_ok_is_accepted() {
        let (_dir, uds) = fake_device(b"OK 1073741824\n").await;
        let ep = Endpoint::Hybrid { uds, port: 1024 };
        assert!(dial(&ep, None).await.is_ok());
    }

    #[tokio::test]
    async fn a_secret_is_the_first_line_after_the_handshake() {
        let dir = tempfile::tempdir().expect("tempdir");
        let uds = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&uds).expect("bind");
        let device = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            assert_eq!(
                read_line(&mut s, 64).await.expect("CONNECT"),
                "CONNECT 1024"
            );
            s.write_all(b"OK 1\n").await.expect("ok");
            read_line(&mut s, crate::auth::AUTH_LINE_MAX)
                .await
                .expect("auth")
        });
        let secret = crate::AgentSecret::generate().expect("random");
        let ep = Endpoint::Hybrid { uds, port: 1024 };
        let _socket = dial(&ep, Some(&secret)).await.expect("dial");
        let line = device.await.expect("join");
        assert!(secret.accepts(line.as_bytes()), "{line}");
    }

    #[tokio::test]
    async fn hybrid_close_is_refused() {
        let (_dir, uds) = fake_device(b"").await;
        let ep = Endpoint::Hybrid { uds, port: 1024 };
        let err = dial(&ep, None).await.err().expect("must fail");
        assert!(
            matches!(err, DialError::Refused { port: 1024, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn readiness_notice_is_awaited_on_the_forwarding_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let uds = dir.path().join("vsock.sock");
        let forward = crate::hybrid_listener_path(&uds, crate::AGENT_READY_PORT);
        assert_eq!(forward, dir.path().join("vsock.sock_1025"));
        let waiter = tokio::spawn({
            let uds = uds.clone();
            async move { wait_ready_hybrid(&uds, Duration::from_secs(5)).await }
        });
        // A connection that says something else does not count.
        loop {
            if let Ok(mut s) = UnixStream::connect(&forward).await {
                s.write_all(b"HELLO\n").await.expect("write");
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        let mut s = UnixStream::connect(&forward).await.expect("connect");
        s.write_all(crate::READY_MESSAGE).await.expect("write");
        waiter.await.expect("join").expect("ready");
        assert!(!forward.exists(), "the socket is removed");
    }

    #[tokio::test]
    async fn readiness_times_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = wait_ready_hybrid(&dir.path().join("v.sock"), Duration::from_millis(50))
            .await
            .expect_err("timeout");
        assert!(matches!(err, DialError::HandshakeTimeout { .. }), "{err}");
    }

    /// A device whose forwarder answers `reply` to the PORT line, then echoes.
    async fn fake_forwarder(reply: &'static [u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let line = read_line(&mut s, 64).await.expect("CONNECT");
            assert_eq!(line, "CONNECT 1026");
            s.write_all(b"OK 1\n").await.expect("ok");
            let line = read_line(&mut s, 64).await.expect("PORT");
            assert_eq!(line, "PORT 8080");
            s.write_all(reply).await.expect("reply");
            let mut buf = [0u8; 4];
            if s.read_exact(&mut buf).await.is_ok() {
                s.write_all(&buf).await.expect("echo");
            }
        });
        (dir, path)
    }

    #[tokio::test]
    async fn forwarded_connections_carry_bytes_after_ok() {
        let (_dir, uds) = fake_forwarder(b"OK\n").await;
        let ep = Endpoint::Hybrid { uds, port: 1024 };
        let mut s = dial_forward(&ep, None, 8080).await.expect("forward");
        s.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"ping");
    }

    #[tokio::test]
    async fn a_forwarder_error_names_the_reason() {
        let (_dir, uds) =
            fake_forwarder(b"ERR connect to localhost:8080 in the pod: refused\n").await;
        let ep = Endpoint::Hybrid { uds, port: 1024 };
        let err = dial_forward(&ep, None, 8080)
            .await
            .err()
            .expect("must fail");
        assert!(
            matches!(err, DialError::Forward { port: 8080, .. }),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "connect to localhost:8080 in the pod: refused"
        );
    }

    /// QEMU's side of a serial port whose guest answers `reply` (its
    /// `NONCE` replaced by the hello's) to the hello; returns the auth line
    /// it got.
    async fn fake_serial(
        reply: &'static [u8],
    ) -> (tempfile::TempDir, PathBuf, tokio::task::JoinHandle<String>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let port = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let line = read_line(&mut s, crate::serial::HELLO_LINE_MAX)
                .await
                .expect("hello");
            let (auth, nonce) = crate::serial::split_hello(line.as_bytes()).expect("a hello");
            let nonce = String::from_utf8_lossy(nonce).into_owned();
            let reply = String::from_utf8_lossy(reply).replace("NONCE", &nonce);
            s.write_all(reply.as_bytes()).await.expect("reply");
            let line = String::from_utf8_lossy(auth).into_owned();
            s.write_all(b"ttrpc").await.expect("after");
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
            line
        });
        (dir, path, port)
    }

    /// A serial dial that succeeds, and the bytes after the answer that
    /// its socket reads first.
    async fn dial_serial_ok(uds: PathBuf, secret: &crate::AgentSecret) -> [u8; 5] {
        let mut socket = dial(&Endpoint::Serial { uds }, Some(secret))
            .await
            .expect("dial");
        let mut buf = [0u8; 5];
        socket.read_exact(&mut buf).await.expect("read");
        buf
    }

    #[tokio::test]
    async fn serial_sends_the_secret_and_waits_for_ok() {
        let (_dir, uds, port) = fake_serial(b"OK NONCE\n").await;
        let secret = crate::AgentSecret::generate().expect("random");
        // Nothing after the answer was consumed.
        assert_eq!(&dial_serial_ok(uds, &secret).await, b"ttrpc");
        let line = port.await.expect("join");
        assert!(secret.accepts(line.as_bytes()), "{line}");
    }

    /// Frames an older connection of the guest still wrote, and answers to
    /// other hosts' hellos, come before this dial's answer: skipped.
    #[tokio::test]
    async fn serial_skips_what_was_for_other_hosts_before_its_answer() {
        let mut stale = vec![0, 0, 0, 3, 0, 0, 0, 1, 2, 0, b'O', b'K', b'\n'];
        stale.extend_from_slice(b"OK 0123abcd\nOK\n");
        stale.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 3, 2, 0]);
        stale.extend_from_slice(b"OK NONCE\n");
        let stale: &'static [u8] = Box::leak(stale.into_boxed_slice());
        let (_dir, uds, _port) = fake_serial(stale).await;
        let secret = crate::AgentSecret::generate().expect("random");
        assert_eq!(&dial_serial_ok(uds, &secret).await, b"ttrpc");
    }

    #[tokio::test]
    async fn serial_without_ok_is_refused() {
        let (_dir, uds, _port) = fake_serial(b"NO\n").await;
        let secret = crate::AgentSecret::generate().expect("random");
        let err = dial(&Endpoint::Serial { uds }, Some(&secret))
            .await
            .err()
            .expect("must fail");
        assert!(matches!(err, DialError::Refused { .. }), "{err}");
    }

    #[tokio::test]
    async fn serial_refuses_port_forwarding_by_name() {
        let ep = Endpoint::Serial {
            uds: "/run/vc/x/agent.sock".into(),
        };
        let err = dial_forward(&ep, None, 8080)
            .await
            .err()
            .expect("must fail");
        assert!(matches!(err, DialError::NoForwarding { .. }), "{err}");
        assert!(err.to_string().contains("hypervisor.vsock"), "{err}");
    }

    #[tokio::test]
    async fn missing_socket_is_a_connect_error() {
        let ep = Endpoint::Hybrid {
            uds: "/nonexistent/vsock.sock".into(),
            port: 1024,
        };
        let err = dial(&ep, None).await.err().expect("must fail");
        assert!(matches!(err, DialError::Connect { .. }), "{err}");
    }
}
