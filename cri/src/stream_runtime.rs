//! What the streaming server asks of the pods: exec and attach over the
//! agent's stdio calls, port-forward to the pod's address.
//!
//! - exec: a process started through the agent; stdin, stdout, stderr and
//!   terminal resizes are pumped between the client's streams and the
//!   agent's calls until the process has exited and its output is drained.
//! - attach: stdin and resizes go to the container's init process (whose
//!   stdin stays open when the client leaves, unless `stdin_once`); its output
//!   comes live from the container's monitor (the one reader of the process's
//!   pipes: every chunk goes to the CRI log, then to attached clients), from
//!   the moment of attaching.
//! - port-forward: a TCP connection to the port on the pod's localhost,
//!   made inside the VM by the agent's forwarder (over vsock), so a port
//!   bound only to the guest's loopback is reachable too, as kubelet expects.

use podsandbox::{container_exec::ExecConfig, container_log::Stream};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{
    server::Cri,
    streaming::{BoxDuplex, BoxWriter, ErrorKind, RuntimeError, StreamIo, StreamingRuntime},
};

#[derive(Debug, Clone)]
pub(crate) struct PodStreams {
    pub(crate) cri: Cri,
}

fn kind_of(e: &podsandbox::Error) -> ErrorKind {
    match e.kind() {
        podsandbox::ErrorKind::NotFound => ErrorKind::NotFound,
        podsandbox::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
        podsandbox::ErrorKind::InvalidArgument => ErrorKind::InvalidArgument,
        podsandbox::ErrorKind::FailedPrecondition => ErrorKind::FailedPrecondition,
        podsandbox::ErrorKind::DeadlineExceeded => ErrorKind::DeadlineExceeded,
        podsandbox::ErrorKind::Unavailable => ErrorKind::Unavailable,
        podsandbox::ErrorKind::Internal => ErrorKind::Internal,
    }
}

fn rt_err(e: podsandbox::Error) -> RuntimeError {
    RuntimeError::new(kind_of(&e), e.chain())
}

fn not_found(what: &str, id: &str) -> RuntimeError {
    RuntimeError::new(ErrorKind::NotFound, format!("{what} {id:?} not found"))
}

/// Copies one output stream of a process to a client writer until EOF.
async fn pump_out(p: podsandbox::ProcessIo, stream: Stream, mut out: BoxWriter) {
    loop {
        match p.read(stream).await {
            Ok(Some(data)) => {
                if out.write_all(&data).await.is_err() {
                    // The client left: keep draining so the process never
                    // blocks on a full pipe.
                    while let Ok(Some(_)) = p.read(stream).await {}
                    return;
                }
                let _ = out.flush().await;
            }
            Ok(None) | Err(_) => return,
        }
    }
}

/// Feeds the client's stdin and resizes to a process; the end of the
/// client's stdin closes the process's when `close_on_eof` (an exec, or an
/// attach to a container created with `stdin_once`).
fn spawn_input(
    p: &podsandbox::ProcessIo,
    io: &mut StreamIo,
    close_on_eof: bool,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    if let Some(mut stdin) = io.stdin.take() {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if p.write_stdin(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
            if close_on_eof {
                let _ = p.close_stdin().await;
            }
        }));
    }
    if let Some(mut resize) = io.resize.take() {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(size) = resize.recv().await {
                if let Err(err) = p.resize(size.height, size.width).await {
                    tracing::debug!("resize: {err}");
                }
            }
        }));
    }
    tasks
}

impl PodStreams {
    fn container(&self, id: &str) -> Result<crate::store::ContainerMeta, RuntimeError> {
        self.cri
            .container_meta(id)
            .map_err(|_| not_found("container", id))
    }
}

#[async_trait::async_trait]
impl StreamingRuntime for PodStreams {
    async fn exec(
        &self,
        container_id: &str,
        cmd: &[String],
        mut io: StreamIo,
    ) -> Result<i32, RuntimeError> {
        let c = self.container(container_id)?;
        let process = ExecConfig {
            tty: io.tty,
            stdin: io.stdin.is_some(),
            ..ExecConfig::command(cmd.to_vec())
        };
        let p = self
            .cri
            .inner
            .runtime
            .exec(&c.sandbox_id, &c.id, process)
            .await
            .map_err(rt_err)?;
        let inputs = spawn_input(&p, &mut io, true);
        let mut outputs = Vec::new();
        if let Some(out) = io.stdout.take() {
            outputs.push(tokio::spawn(pump_out(p.clone(), Stream::Stdout, out)));
        }
        if let Some(err) = io.stderr.take() {
            if !p.tty() {
                outputs.push(tokio::spawn(pump_out(p.clone(), Stream::Stderr, err)));
            }
        }
        let code = p.wait().await.map_err(rt_err)?;
        for o in outputs {
            let _ = o.await;
        }
        for i in inputs {
            i.abort();
        }
        Ok(code)
    }

    async fn attach(&self, container_id: &str, mut io: StreamIo) -> Result<(), RuntimeError> {
        let c = self.container(container_id)?;
        let rt = &self.cri.inner.runtime;
        let p = rt
            .container_io(&c.sandbox_id, &c.id)
            .await
            .map_err(rt_err)?;
        // Subscribe before the input starts: nothing the process answers
        // to the client's first bytes is missed.
        let output = rt
            .attach_output(&c.sandbox_id, &c.id)
            .await
            .map_err(rt_err)?;
        let inputs = spawn_input(&p, &mut io, c.config.stdin_once);
        let follow = follow_output(output, io.stdout.take(), io.stderr.take()).await;
        for i in inputs {
            i.abort();
        }
        follow
    }

    async fn port_forward(
        &self,
        pod_sandbox_id: &str,
        port: u16,
        stream: BoxDuplex,
    ) -> Result<(), RuntimeError> {
        let id = self
            .cri
            .inner
            .store
            .resolve_pod(pod_sandbox_id)
            .ok_or_else(|| not_found("pod sandbox", pod_sandbox_id))?;
        let conn = self
            .cri
            .inner
            .runtime
            .port_forward(&id, port)
            .await
            .map_err(rt_err)?;
        // Client → pod until the client closes its side (then half-close
        // towards the pod); pod → client until the pod closes, which ends
        // the forwarded connection (an HTTP/1.0 server closes first).
        let (mut client_rd, mut client_wr) = tokio::io::split(stream);
        let (mut pod_rd, mut pod_wr) = tokio::io::split(conn);
        let upstream = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut client_rd, &mut pod_wr).await;
            let _ = pod_wr.shutdown().await;
        });
        let down = tokio::io::copy(&mut pod_rd, &mut client_wr).await;
        let _ = client_wr.shutdown().await;
        upstream.abort();
        down.map(drop)
            .map_err(|e| RuntimeError::new(ErrorKind::Unavailable, format!("forwarding: {e}")))
    }
}

/// Writes the container's output from now on to the client, by stream,
/// until the output ends (the process exited and its pipes are drained) or
/// the client leaves.
async fn follow_output(
    mut output: tokio::sync::broadcast::Receiver<podsandbox::OutputChunk>,
    mut stdout: Option<BoxWriter>,
    mut stderr: Option<BoxWriter>,
) -> Result<(), RuntimeError> {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let chunk = match output.recv().await {
            Ok(chunk) => chunk,
            Err(RecvError::Lagged(n)) => {
                tracing::debug!("attach: {n} output chunks skipped (client too slow)");
                continue;
            }
            Err(RecvError::Closed) => return Ok(()),
        };
        let out = match chunk.stream {
            Stream::Stdout => stdout.as_mut(),
            Stream::Stderr => stderr.as_mut(),
        };
        if let Some(out) = out {
            if out.write_all(&chunk.data).await.is_err() {
                return Ok(()); // the client left
            }
            let _ = out.flush().await;
        }
    }
}
