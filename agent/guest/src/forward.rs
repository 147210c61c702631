//! The port forwarder (vsock port [`agent::FORWARD_VSOCK_PORT`]): each
//! connection names a TCP port and is then spliced to a connection to that
//! port on the guest's loopback, the pod's localhost.

use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// How long a host may take to send its header line.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the forwarder until the listener fails.
pub fn spawn(mut listener: ttrpc::asynchronous::transport::Listener) {
    tokio::spawn(async move {
        while let Some(conn) = listener.next().await {
            match conn {
                Ok(socket) => {
                    tokio::spawn(async move {
                        if let Err(e) = forward(socket).await {
                            tracing::debug!("port-forward: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("port-forward listener: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
}

async fn forward<S>(mut host: S) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let line = tokio::time::timeout(HEADER_TIMEOUT, read_line(&mut host))
        .await
        .map_err(|_| "no header line".to_string())??;
    let target = match parse_header(&line) {
        Ok(port) => connect(port).await,
        Err(e) => Err(e),
    };
    let mut pod = match target {
        Ok(s) => s,
        Err(e) => {
            let _ = host.write_all(format!("ERR {e}\n").as_bytes()).await;
            let _ = host.shutdown().await;
            return Err(e);
        }
    };
    host.write_all(b"OK\n")
        .await
        .map_err(|e| format!("reply: {e}"))?;
    let (mut host_rd, mut host_wr) = tokio::io::split(host);
    let (mut pod_rd, mut pod_wr) = pod.split();
    // Host → pod until the host half-closes; pod → host until the pod
    // closes, which ends the forwarded connection.
    let up = async {
        let _ = tokio::io::copy(&mut host_rd, &mut pod_wr).await;
        let _ = pod_wr.shutdown().await;
    };
    let down = async {
        let r = tokio::io::copy(&mut pod_rd, &mut host_wr).await;
        let _ = host_wr.shutdown().await;
        r
    };
    tokio::pin!(up, down);
    tokio::select! {
        r = &mut down => return r.map(drop).map_err(|e| format!("forwarding: {e}")),
        () = &mut up => {}
    }
    // The host is done sending; the answer may still be coming.
    down.await.map(drop).map_err(|e| format!("forwarding: {e}"))
}

/// `PORT <n>` → n (1-65535).
fn parse_header(line: &str) -> Result<u16, String> {
    line.strip_prefix("PORT ")
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("bad header {line:?} (want PORT <1-65535>)"))
}

async fn connect(port: u16) -> Result<tokio::net::TcpStream, String> {
    match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
        Ok(s) => Ok(s),
        Err(v4) => tokio::net::TcpStream::connect(("::1", port))
            .await
            .map_err(|_| format!("connect to localhost:{port} in the pod: {v4}")),
    }
}

/// One line, byte by byte so nothing after it is consumed.
async fn read_line<S: AsyncRead + Unpin>(s: &mut S) -> Result<String, String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = s.read(&mut b).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed before the header line".into());
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        if line.len() > agent::FORWARD_MAX_LINE {
            return Err("header line too long".into());
        }
    }
    String::from_utf8(line).map_err(|_| "header is not UTF-8".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_name_a_port() {
        assert_eq!(parse_header("PORT 8080"), Ok(8080));
        for bad in ["PORT 0", "PORT 70000", "PORT", "port 80", "PORT -1", ""] {
            assert!(parse_header(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_connection_is_spliced_to_a_loopback_port() {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = server.local_addr().expect("addr").port();
        tokio::spawn(async move {
            let (mut s, _) = server.accept().await.expect("accept");
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.expect("read");
            s.write_all(&buf).await.expect("echo");
        });
        let (mut host, agent_side) = tokio::io::duplex(1024);
        let task = tokio::spawn(forward(agent_side));
        host.write_all(format!("PORT {port}\nping").as_bytes())
            .await
            .expect("write");
        let mut reply = [0u8; 7];
        host.read_exact(&mut reply).await.expect("read");
        assert_eq!(&reply, b"OK\nping");
        drop(host);
        task.await.expect("join").expect("forward");
    }

    #[tokio::test]
    async fn a_closed_port_is_an_error_line() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = free.local_addr().expect("addr").port();
        drop(free);
        let (mut host, agent_side) = tokio::io::duplex(1024);
        let task = tokio::spawn(forward(agent_side));
        host.write_all(format!("PORT {port}\n").as_bytes())
            .await
            .expect("write");
        let mut reply = String::new();
        host.read_to_string(&mut reply).await.expect("read");
        assert!(reply.starts_with("ERR connect to localhost:"), "{reply}");
        assert!(task.await.expect("join").is_err());
    }
}
