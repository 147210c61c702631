//! A fake [`StreamingRuntime`] for tests: commands with canned behaviours and a TCP echo
//! server behind every forwarded port. It records what it was asked.
//!
//! Exec commands (`cmd[0]`): `echo ARGS…` prints its arguments; `stderr ARGS…` prints them on
//! stderr; `cat` copies stdin to stdout; `exit N` exits with N; `resize N` prints `WxH` for the
//! first N terminal sizes; `fail` is a runtime error. Attach prints `attached <id>` then acts
//! like `cat`. Port forward connects to the echo server; port 1 fails (connection refused).

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::{BoxDuplex, BoxWriter, ErrorKind, RuntimeError, StreamIo, StreamingRuntime};

#[derive(Debug)]
pub struct FakeRuntime {
    calls: Mutex<Vec<String>>,
    echo_addr: std::net::SocketAddr,
    echo: JoinHandle<()>,
}

impl FakeRuntime {
    /// Starts the echo server on loopback.
    pub async fn start() -> std::io::Result<Arc<FakeRuntime>> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let echo_addr = listener.local_addr()?;
        let echo = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    Ok((mut c, _)) = listener.accept() => {
                        conns.spawn(async move {
                            let (mut r, mut w) = c.split();
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                            let _ = w.shutdown().await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(Arc::new(FakeRuntime {
            calls: Mutex::new(Vec::new()),
            echo_addr,
            echo,
        }))
    }

    /// Every call so far, e.g. `exec c1 [echo, hi] tty=false`.
    pub fn calls(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn record(&self, call: String) {
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(call);
    }
}

impl Drop for FakeRuntime {
    fn drop(&mut self) {
        self.echo.abort();
    }
}

fn io_err(e: std::io::Error) -> RuntimeError {
    RuntimeError::new(ErrorKind::Unavailable, format!("stream I/O: {e}"))
}

async fn write_to(w: &mut Option<BoxWriter>, data: &[u8]) -> Result<(), RuntimeError> {
    if let Some(w) = w {
        w.write_all(data).await.map_err(io_err)?;
        w.flush().await.map_err(io_err)?;
    }
    Ok(())
}

async fn cat(io: &mut StreamIo) -> Result<(), RuntimeError> {
    if let (Some(r), Some(w)) = (io.stdin.as_mut(), io.stdout.as_mut()) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = r.read(&mut buf).await.map_err(io_err)?;
            if n == 0 {
                break;
            }
            w.write_all(&buf[..n]).await.map_err(io_err)?;
        }
        w.flush().await.map_err(io_err)?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl StreamingRuntime for FakeRuntime {
    async fn exec(
        &self,
        container_id: &str,
        cmd: &[String],
        mut io: StreamIo,
    ) -> Result<i32, RuntimeError> {
        self.record(format!("exec {container_id} {cmd:?} tty={}", io.tty));
        let args = cmd.get(1..).unwrap_or_default().join(" ");
        match cmd.first().map(String::as_str) {
            Some("echo") => write_to(&mut io.stdout, format!("{args}\n").as_bytes()).await?,
            Some("stderr") => write_to(&mut io.stderr, format!("{args}\n").as_bytes()).await?,
            Some("cat") => cat(&mut io).await?,
            Some("exit") => return Ok(args.trim().parse().unwrap_or(1)),
            Some("resize") => {
                let n: usize = args.trim().parse().unwrap_or(1);
                let Some(mut rx) = io.resize.take() else {
                    return Err(RuntimeError::new(
                        ErrorKind::InvalidArgument,
                        "no resize channel",
                    ));
                };
                for _ in 0..n {
                    let Some(size) = rx.recv().await else { break };
                    write_to(
                        &mut io.stdout,
                        format!("{}x{}\n", size.width, size.height).as_bytes(),
                    )
                    .await?;
                }
            }
            Some("fail") => {
                return Err(RuntimeError::new(
                    ErrorKind::NotFound,
                    format!("container {container_id} not found"),
                ))
            }
            other => {
                return Err(RuntimeError::new(
                    ErrorKind::InvalidArgument,
                    format!("fake runtime has no command {other:?}"),
                ))
            }
        }
        Ok(0)
    }

    async fn attach(&self, container_id: &str, mut io: StreamIo) -> Result<(), RuntimeError> {
        self.record(format!("attach {container_id} tty={}", io.tty));
        write_to(
            &mut io.stdout,
            format!("attached {container_id}\n").as_bytes(),
        )
        .await?;
        cat(&mut io).await
    }

    async fn port_forward(
        &self,
        pod_sandbox_id: &str,
        port: u16,
        mut stream: BoxDuplex,
    ) -> Result<(), RuntimeError> {
        self.record(format!("port_forward {pod_sandbox_id} {port}"));
        if port == 1 {
            return Err(RuntimeError::new(
                ErrorKind::Unavailable,
                format!("connection to port {port} refused"),
            ));
        }
        let mut tcp = tokio::net::TcpStream::connect(self.echo_addr)
            .await
            .map_err(io_err)?;
        tokio::io::copy_bidirectional(&mut stream, &mut tcp)
            .await
            .map_err(io_err)?;
        Ok(())
    }
}
