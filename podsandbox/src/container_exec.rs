//! ExecSync: run another process in a running container and collect its
//! output and exit status (CRI ExecSync; the streaming Exec builds on the
//! same agent calls).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    sync::Arc,
    time::Duration,
};

use crate::{
    agent::AgentClient, container::ContainerState, container_log::Stream, sandbox::Runtime, Error,
    Result,
};

/// Output kept per stream; the rest is dropped (CRI caps ExecSync output too).
pub const MAX_EXEC_OUTPUT: usize = 16 << 20;

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Runtime {
    /// Runs `args` in container `id` and waits for it, at most `timeout`
    /// (then the process is killed and the call fails with DeadlineExceeded).
    pub async fn exec_sync(
        &self,
        sandbox_id: &str,
        id: &str,
        args: Vec<String>,
        timeout: Option<Duration>,
    ) -> Result<ExecResult> {
        if args.is_empty() {
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
            .exec_process(id, &exec_id, &args, &[DEFAULT_PATH.to_string()], "")
            .await
            .map_err(|e| Error::from_agent(id, "exec", e))?;
        let run = collect(agent.clone(), id, &exec_id);
        match timeout {
            None => run.await,
            Some(limit) => match tokio::time::timeout(limit, run).await {
                Ok(result) => result,
                Err(_) => {
                    let _ = agent.signal_container(id, &exec_id, 9, false).await;
                    let _ = agent.wait_container(id, &exec_id).await;
                    Err(Error::ExecTimeout {
                        id: id.into(),
                        secs: limit.as_secs_f64(),
                    })
                }
            },
        }
    }
}

/// Drains both streams to their end, then reaps the exit status.
async fn collect(agent: Arc<dyn AgentClient>, id: &str, exec_id: &str) -> Result<ExecResult> {
    let drain = |stream| {
        let agent = agent.clone();
        async move {
            let mut out = Vec::new();
            while let Some(chunk) = agent
                .read_output(id, exec_id, stream)
                .await
                .map_err(|e| Error::from_agent(id, "read", e))?
            {
                let room = MAX_EXEC_OUTPUT.saturating_sub(out.len());
                out.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok::<_, Error>(out)
        }
    };
    let (stdout, stderr) = tokio::try_join!(drain(Stream::Stdout), drain(Stream::Stderr))?;
    let (exit_code, _) = agent
        .wait_container(id, exec_id)
        .await
        .map_err(|e| Error::from_agent(id, "wait", e))?;
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
