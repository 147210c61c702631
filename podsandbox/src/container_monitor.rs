//! The container monitor: for the whole life of a container's init process,
//! copy its output into the CRI log file (or drain it when there is none, so
//! the process never blocks on a full pipe), then record its exit in the
//! sandbox's state once the last byte is in the log.
//!
//! The monitor is also the one reader of the process's output, so attach
//! gets it from here: every chunk goes to the log first, then to whoever
//! subscribed ([`Runtime::attach_output`]).
//!
//! A long-lived caller (vcrid) runs one monitor task per container, started
//! at creation. A short-lived one (`virtc`, one process per call) calls
//! [`Runtime::monitor_externally`] and runs [`Runtime::monitor_container`]
//! in a process of its own, the way containerd runs a shim.

use std::time::Duration;

use crate::{
    container::{ContainerExit, ContainerState},
    container_log::{LogFile, Stream},
    sandbox::Runtime,
    Error, Result,
};

/// Chunks an attached client may fall behind by before it loses some (the
/// log has them all).
const ATTACH_BACKLOG: usize = 1024;

/// A piece of a container's output, as its process wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    pub stream: Stream,
    pub data: std::sync::Arc<[u8]>,
}

/// After the process exits, how long output may still trickle in (from a
/// child it left behind that holds the pipe) before the copy stops.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(5);

impl Runtime {
    /// Copies the output of container `id` to its log until the process
    /// exits, then records the exit; returns the exit status.
    pub async fn monitor_container(&self, sandbox_id: &str, id: &str) -> Result<i32> {
        let (agent, log_path) = {
            let s = self.locked(sandbox_id).await?;
            let idx = s.container_index(id)?;
            let vm = s.vm()?.clone();
            (
                self.agent(sandbox_id, vm.as_ref()).await?,
                s.record.containers[idx].log_path.clone(),
            )
        };
        // A log that cannot be opened must not stop the draining (a full
        // pipe would block the container) nor the exit recording.
        let log = match &log_path {
            Some(path) => match LogFile::open(path) {
                Ok(log) => Some(log),
                Err(err) => {
                    tracing::error!(sandbox = %sandbox_id, container = %id, path = %path.display(), "cannot open the log, output is dropped: {err}");
                    None
                }
            },
            None => None,
        };
        if let Some(log) = &log {
            self.inner
                .logs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(monitor_key(sandbox_id, id), log.clone());
        }
        let (fanout, _) = tokio::sync::broadcast::channel(ATTACH_BACKLOG);
        self.inner
            .outputs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(monitor_key(sandbox_id, id), fanout.clone());
        let mut copies = Vec::new();
        for stream in [Stream::Stdout, Stream::Stderr] {
            let (agent, log, cid) = (agent.clone(), log.clone(), id.to_string());
            let fanout = fanout.clone();
            copies.push(tokio::spawn(async move {
                let mut out = log.as_ref().map(|l| l.stream(stream));
                loop {
                    match agent.read_output(&cid, "", stream).await {
                        Ok(Some(data)) => {
                            if let Some(Err(err)) = out.as_mut().map(|o| o.push(&data)) {
                                tracing::warn!(container = %cid, "log write: {err}");
                            }
                            // Nobody attached is fine.
                            let _ = fanout.send(OutputChunk {
                                stream,
                                data: data.into(),
                            });
                        }
                        Ok(None) => break,
                        Err(err) => {
                            tracing::debug!(container = %cid, "log copy ends: {err}");
                            break;
                        }
                    }
                }
                if let Some(Err(err)) = out.map(|o| o.finish()) {
                    tracing::warn!(container = %cid, "log write: {err}");
                }
            }));
        }
        let waited = agent.wait_container(id, "").await;
        for mut copy in copies {
            if tokio::time::timeout(DRAIN_AFTER_EXIT, &mut copy)
                .await
                .is_err()
            {
                copy.abort();
            }
        }
        self.inner
            .logs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&monitor_key(sandbox_id, id));
        // The last sender goes: attached clients see the end of the output.
        self.inner
            .outputs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&monitor_key(sandbox_id, id));
        drop(fanout);
        let (code, reason) = waited.map_err(|e| Error::from_agent(id, "wait for", e))?;
        self.record_exit(sandbox_id, id, code, reason).await?;
        Ok(code)
    }

    /// For a caller that makes one process per call (`virtc`): the monitor
    /// of every container runs outside this process (see the module's doc),
    /// and every read goes to disk, since other processes write.
    pub fn monitor_externally(&self) {
        self.inner
            .in_process_monitors
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.inner.store.uncached();
    }

    /// Whether this process owns the state dir (monitors and the VMs'
    /// watchers run here, records are read from memory).
    pub(crate) fn owns_state(&self) -> bool {
        self.inner
            .in_process_monitors
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Starts the in-process monitor of a new container, unless monitors
    /// run elsewhere.
    pub(crate) fn spawn_container_monitor(&self, sandbox_id: &str, id: &str) {
        if !self
            .inner
            .in_process_monitors
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let (rt, sid, cid) = (self.clone(), sandbox_id.to_string(), id.to_string());
        let task = tokio::spawn(async move {
            if let Err(err) = rt.monitor_container(&sid, &cid).await {
                tracing::debug!(sandbox = %sid, container = %cid, "monitor ends: {err}");
            }
        });
        if let Some(old) = self
            .inner
            .monitors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(monitor_key(sandbox_id, id), task)
        {
            old.abort();
        }
    }

    /// Stops the in-process monitor of a container that goes away.
    pub(crate) fn forget_monitor(&self, sandbox_id: &str, id: &str) {
        if let Some(task) = self
            .inner
            .monitors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&monitor_key(sandbox_id, id))
        {
            task.abort();
        }
    }

    /// Marks the container stopped with its exit status (first writer wins).
    pub(crate) async fn record_exit(
        &self,
        sandbox_id: &str,
        id: &str,
        code: i32,
        reason: Option<String>,
    ) -> Result<()> {
        let mut s = self.locked(sandbox_id).await?;
        let Ok(idx) = s.container_index(id) else {
            return Ok(()); // deleted meanwhile
        };
        let c = &mut s.record.containers[idx];
        if c.state == ContainerState::Stopped {
            return Ok(());
        }
        let finished_at_ns = crate::container::now_ns();
        c.state = ContainerState::Stopped;
        c.exit_code = Some(code);
        c.reason = reason;
        c.finished_at_ns = Some(finished_at_ns);
        self.inner.store.save(&s.record)?;
        drop(s);
        tracing::info!(sandbox = %sandbox_id, container = %id, code, "container exited");
        // Nobody listening is fine.
        let _ = self.inner.exits.send(ContainerExit {
            sandbox_id: sandbox_id.into(),
            id: id.into(),
            exit_code: code,
            finished_at_ns,
        });
        Ok(())
    }

    /// Reopens the log file of a running container whose monitor runs in
    /// this process (CRI ReopenContainerLog, after kubelet rotated it).
    pub async fn reopen_container_log(&self, sandbox_id: &str, id: &str) -> Result<()> {
        let status = self.container_status(sandbox_id, id).await?;
        let log = self
            .inner
            .logs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&monitor_key(sandbox_id, id))
            .cloned();
        match (status.state, log) {
            (ContainerState::Running | ContainerState::Paused, Some(log)) => {
                log.reopen().map_err(|source| Error::Io {
                    action: "reopen log",
                    path: status.log_path.unwrap_or_default(),
                    source,
                })
            }
            (state, _) => Err(Error::ContainerWrongState {
                id: id.into(),
                action: "reopen the log of",
                state,
                hint: " (only a running container's log can be reopened)",
            }),
        }
    }

    /// The output of a running container from now on, by stream, as its
    /// process writes it (CRI Attach); the receiver ends with the output. A
    /// receiver that falls more than a backlog behind skips ahead (`Lagged`).
    /// Only where the container's monitor runs in this process.
    pub async fn attach_output(
        &self,
        sandbox_id: &str,
        id: &str,
    ) -> Result<tokio::sync::broadcast::Receiver<OutputChunk>> {
        let status = self.container_status(sandbox_id, id).await?;
        let rx = self
            .inner
            .outputs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&monitor_key(sandbox_id, id))
            .map(|tx| tx.subscribe());
        match (status.state, rx) {
            (ContainerState::Running | ContainerState::Paused, Some(rx)) => Ok(rx),
            (ContainerState::Running | ContainerState::Paused, None) => {
                Err(Error::ContainerWrongState {
                    id: id.into(),
                    action: "attach to",
                    state: status.state,
                    hint: " (its output is read by a monitor in another process)",
                })
            }
            (state, _) => Err(Error::ContainerWrongState {
                id: id.into(),
                action: "attach to",
                state,
                hint: " (only a running container can be attached to)",
            }),
        }
    }

    /// Exits of containers whose monitor runs in this process, as they are
    /// recorded.
    pub fn subscribe_exits(&self) -> tokio::sync::broadcast::Receiver<ContainerExit> {
        self.inner.exits.subscribe()
    }
}

fn monitor_key(sandbox_id: &str, id: &str) -> String {
    format!("{sandbox_id}/{id}")
}
