//! A hand-made HTTP/1.1 server on loopback for unit tests of the registry
//! client: each request gets the canned reply its path routes to (one request
//! per connection), and every byte of body sent is counted, so a test can show
//! the client stopped reading.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// How a reply's body is sent.
#[derive(Debug, Clone)]
pub(crate) enum Body {
    /// With a `Content-Length`.
    Sized(Vec<u8>),
    /// Chunked, no length announced; ends.
    Chunked(Vec<u8>),
    /// Chunked 64 KiB pieces forever (until the client goes away).
    Endless,
    /// `Content-Length: declared`, then `data`, then nothing, connection open.
    Stall { declared: u64, data: Vec<u8> },
}

#[derive(Debug, Clone)]
pub(crate) struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Body,
}

impl Reply {
    pub fn new(status: u16, body: Body) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body,
        }
    }

    pub fn header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
}

/// The server; stops (with every connection) when dropped.
#[derive(Debug)]
pub(crate) struct Stub {
    pub port: u16,
    sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Stub {
    /// Serves `route(path)` for every request; `path` includes the query.
    pub async fn start(route: impl Fn(&str) -> Reply + Send + Sync + 'static) -> Stub {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let sent = Arc::new(AtomicU64::new(0));
        let (route, counter) = (Arc::new(route), sent.clone());
        let task = tokio::spawn(async move {
            // Dropped with the task on abort: every connection ends too.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((conn, _)) = listener.accept().await {
                let (route, counter) = (route.clone(), counter.clone());
                conns.spawn(async move {
                    let _ = serve(conn, &*route, &counter).await;
                });
            }
        });
        Stub { port, sent, task }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Body bytes written so far, over all connections.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }
}

async fn serve(
    mut conn: tokio::net::TcpStream,
    route: &(dyn Fn(&str) -> Reply + Send + Sync),
    sent: &AtomicU64,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
    let reply = route(&path);
    let mut out = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", reply.status);
    for (k, v) in &reply.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    match &reply.body {
        Body::Sized(b) => out.push_str(&format!("Content-Length: {}\r\n", b.len())),
        Body::Stall { declared, .. } => out.push_str(&format!("Content-Length: {declared}\r\n")),
        Body::Chunked(_) | Body::Endless => out.push_str("Transfer-Encoding: chunked\r\n"),
    }
    out.push_str("\r\n");
    conn.write_all(out.as_bytes()).await?;
    let count = |n: usize| sent.fetch_add(n as u64, Ordering::SeqCst);
    match reply.body {
        Body::Sized(b) => {
            conn.write_all(&b).await?;
            count(b.len());
        }
        Body::Chunked(b) => {
            for piece in b.chunks(16 << 10) {
                conn.write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                    .await?;
                conn.write_all(piece).await?;
                conn.write_all(b"\r\n").await?;
                count(piece.len());
            }
            conn.write_all(b"0\r\n\r\n").await?;
        }
        Body::Endless => {
            let piece = vec![b'x'; 64 << 10];
            loop {
                conn.write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                    .await?;
                conn.write_all(&piece).await?;
                conn.write_all(b"\r\n").await?;
                count(piece.len());
            }
        }
        Body::Stall { data, .. } => {
            conn.write_all(&data).await?;
            count(data.len());
            conn.flush().await?;
            std::future::pending::<()>().await;
        }
    }
    conn.shutdown().await
}
