//! StartContainer: run the created container's process and copy its output
//! into the CRI log file (from this process, for as long as it lives).

use crate::{
    container::{ContainerState, ContainerStatus},
    container_log::{LogFile, Stream},
    sandbox::Runtime,
    Error, Result,
};

impl Runtime {
    pub async fn start_container(&self, sandbox_id: &str, id: &str) -> Result<ContainerStatus> {
        let (mut s, idx, agent) = self
            .container_agent(sandbox_id, id, "start", &[ContainerState::Created])
            .await?;
        // Drain the output before the process can fill its pipes.
        if let Some(path) = s.record.containers[idx].log_path.clone() {
            let log = LogFile::open(&path).map_err(|source| Error::Io {
                action: "open log",
                path: path.clone(),
                source,
            })?;
            let mut tasks = Vec::new();
            for stream in [Stream::Stdout, Stream::Stderr] {
                let (agent, log, cid) = (agent.clone(), log.clone(), id.to_string());
                tasks.push(tokio::spawn(async move {
                    let mut out = log.stream(stream);
                    loop {
                        match agent.read_output(&cid, "", stream).await {
                            Ok(Some(data)) => {
                                if let Err(err) = out.push(&data) {
                                    tracing::warn!(container = %cid, "log write: {err}");
                                }
                            }
                            Ok(None) => break,
                            Err(err) => {
                                tracing::debug!(container = %cid, "log copy ends: {err}");
                                break;
                            }
                        }
                    }
                    if let Err(err) = out.finish() {
                        tracing::warn!(container = %cid, "log write: {err}");
                    }
                }));
            }
            self.inner
                .copiers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(copier_key(sandbox_id, id), tasks);
        }
        agent
            .start_container(id)
            .await
            .map_err(|e| Error::from_agent(id, "start", e))?;
        s.record.containers[idx].state = ContainerState::Running;
        self.inner.store.save(&s.record)?;
        tracing::info!(sandbox = %sandbox_id, container = %id, "container running");
        Ok(s.record.containers[idx].status(sandbox_id))
    }
}

pub(crate) fn copier_key(sandbox_id: &str, id: &str) -> String {
    format!("{sandbox_id}/{id}")
}
