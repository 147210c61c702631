//! EnterContainer and ExecSync: run another process in a running container,
//! streamed ([`Runtime::exec`], CRI Exec) or collected with its exit status
//! ([`Runtime::exec_sync`], CRI ExecSync).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use crate::{
    container::ContainerState, container_io::ProcessIo, container_log::Stream, sandbox::Runtime,
    Error, Result,
};

/// Output kept per stream; the rest is dropped (CRI caps ExecSync output too).
pub const MAX_EXEC_OUTPUT: usize = 16 << 20;

/// A process to run in a container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecConfig {
    pub args: Vec<String>,
    /// `KEY=value`, added to (or replacing keys of) the container's own.
    pub env: Vec<String>,
    /// The container's working directory when `None`.
    pub cwd: Option<String>,
    /// A terminal for stdio (stdout then carries stderr too).
    pub tty: bool,
    /// Keep stdin open for [`ProcessIo::write_stdin`].
    pub stdin: bool,
}

impl ExecConfig {
    pub fn command(args: Vec<String>) -> Self {
        Self {
            args,
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Runtime {
    /// Starts a process in running container `id` and hands back its stdio
    /// and exit (the seed's EnterContainer).
    pub async fn exec(&self, sandbox_id: &str, id: &str, process: ExecConfig) -> Result<ProcessIo> {
        if process.args.is_empty() {
            return Err(Error::InvalidContainer {
                id: id.into(),
                detail: "exec: no command".into(),
            });
        }
        // The lock is held only to check the state: the exec may run long.
        let (_, _, agent) = self
            .container_agent(sandbox_id, id, "exec in", &[ContainerState::Running])
            .await?;
        let exec_id = next_exec_id();
        agent
            .exec_process(id, &exec_id, &process)
            .await
            .map_err(|e| Error::from_agent(id, "exec", e))?;
        Ok(ProcessIo::new(agent, id, &exec_id, process.tty))
    }

    /// Runs `args` in container `id` and waits for it, at most `timeout`
    /// (then the process is killed and the call fails with DeadlineExceeded).
    pub async fn exec_sync(
        &self,
        sandbox_id: &str,
        id: &str,
        args: Vec<String>,
        timeout: Option<Duration>,
    ) -> Result<ExecResult> {
        let process = self.exec(sandbox_id, id, ExecConfig::command(args)).await?;
        let run = collect(&process);
        match timeout {
            None => run.await,
            Some(limit) => match tokio::time::timeout(limit, run).await {
                Ok(result) => result,
                Err(_) => {
                    let _ = process.signal(9).await;
                    let _ = process.wait().await;
                    Err(Error::ExecTimeout {
                        id: id.into(),
                        secs: limit.as_secs_f64(),
                    })
                }
            },
        }
    }
}

/// Drains both streams to their end and reaps the exit status, all three
/// asked at once (the agent forgets an exec only once it has exited and
/// both streams reached their end, whichever comes last): a round trip to
/// the guest fewer than waiting after the streams.
async fn collect(process: &ProcessIo) -> Result<ExecResult> {
    let drain = |stream| async move {
        let mut out = Vec::new();
        while let Some(chunk) = process.read(stream).await? {
            let room = MAX_EXEC_OUTPUT.saturating_sub(out.len());
            out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        Ok::<_, Error>(out)
    };
    let (stdout, stderr, exit_code) =
        tokio::try_join!(drain(Stream::Stdout), drain(Stream::Stderr), process.wait())?;
    Ok(ExecResult {
        exit_code,
        stdout,
        stderr,
    })
}

fn next_exec_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "exec-{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
