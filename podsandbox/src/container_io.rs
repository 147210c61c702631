//! IOStream, WinsizeProcess and WaitProcess: the stdio and exit of one
//! process in a container — its init process or an exec.

use std::sync::Arc;

use crate::{
    agent::AgentClient, container::ContainerState, container_log::Stream, sandbox::Runtime, Error,
    Result,
};

/// The stdio of a container process. Cheap to clone: clones talk to the
/// same process (one task may write stdin while another reads output).
#[derive(Debug, Clone)]
pub struct ProcessIo {
    agent: Arc<dyn AgentClient>,
    container: String,
    /// Empty for the container's init process.
    exec_id: String,
    tty: bool,
}

impl ProcessIo {
    pub(crate) fn new(
        agent: Arc<dyn AgentClient>,
        container: &str,
        exec_id: &str,
        tty: bool,
    ) -> Self {
        Self {
            agent,
            container: container.into(),
            exec_id: exec_id.into(),
            tty,
        }
    }

    /// The exec's ID; empty for the init process.
    pub fn exec_id(&self) -> &str {
        &self.exec_id
    }

    /// Whether stdio is a terminal (then stderr is empty: all is on stdout).
    pub fn tty(&self) -> bool {
        self.tty
    }

    /// The next chunk of output, blocking until there is some; `None` once
    /// the stream has ended.
    pub async fn read(&self, stream: Stream) -> Result<Option<Vec<u8>>> {
        self.agent
            .read_output(&self.container, &self.exec_id, stream)
            .await
            .map_err(|e| Error::from_agent(&self.container, "read the output of", e))
    }

    pub async fn write_stdin(&self, data: &[u8]) -> Result<()> {
        self.agent
            .write_stdin(&self.container, &self.exec_id, data)
            .await
            .map_err(|e| Error::from_agent(&self.container, "write to", e))
    }

    /// The process reads end-of-file on stdin.
    pub async fn close_stdin(&self) -> Result<()> {
        self.agent
            .close_stdin(&self.container, &self.exec_id)
            .await
            .map_err(|e| Error::from_agent(&self.container, "close stdin of", e))
    }

    /// The terminal's window size (the seed's WinsizeProcess).
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        self.agent
            .resize_terminal(&self.container, &self.exec_id, rows, cols)
            .await
            .map_err(|e| Error::from_agent(&self.container, "resize the terminal of", e))
    }

    pub async fn signal(&self, signal: u32) -> Result<()> {
        self.agent
            .signal_container(&self.container, &self.exec_id, signal, false)
            .await
            .map_err(|e| Error::from_agent(&self.container, "signal", e))
    }

    /// Blocks until the process exits: its exit status (128 + signal when
    /// killed). Any number of callers may wait.
    pub async fn wait(&self) -> Result<i32> {
        self.agent
            .wait_container(&self.container, &self.exec_id)
            .await
            .map(|(code, _)| code)
            .map_err(|e| Error::from_agent(&self.container, "wait for", e))
    }
}

impl Runtime {
    /// The init process's stdio (the seed's IOStream): write its stdin (when
    /// the container was created with `stdin`) and resize its terminal.
    /// Its output goes to the container's log; reading it here competes with
    /// the log copy.
    pub async fn container_io(&self, sandbox_id: &str, id: &str) -> Result<ProcessIo> {
        let (s, idx, agent) = self
            .container_agent(
                sandbox_id,
                id,
                "attach to",
                &[
                    ContainerState::Created,
                    ContainerState::Running,
                    ContainerState::Paused,
                ],
            )
            .await?;
        let tty = s.record.containers[idx].tty;
        Ok(ProcessIo::new(agent, id, "", tty))
    }
}
