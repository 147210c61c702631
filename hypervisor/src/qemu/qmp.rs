//! A minimal QMP client: one connection per exchange, line-delimited JSON.

use std::{path::Path, time::Duration};

use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{
        unix::{OwnedReadHalf, OwnedWriteHalf},
        UnixStream,
    },
};

use crate::{HypervisorError, Result};

/// Bound on one QMP exchange; QEMU answers in milliseconds unless wedged.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    path: std::path::PathBuf,
    /// Events that arrived while a command waited for its reply, for
    /// [`Qmp::wait_event`] (QEMU may announce an effect before it answers).
    events: Vec<Value>,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation.
    pub async fn connect(path: &Path) -> Result<Self> {
        let io = |source| HypervisorError::QmpIo {
            path: path.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(path).await.map_err(io)?;
        let (read, writer) = stream.into_split();
        let mut qmp = Self {
            reader: BufReader::new(read),
            writer,
            path: path.to_path_buf(),
            events: Vec::new(),
        };
        let greeting = qmp.read_message("greeting").await?;
        if greeting.get("QMP").is_none() {
            return Err(HypervisorError::Qmp {
                command: "greeting".into(),
                detail: greeting.to_string(),
            });
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value; events are skipped.
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut request = json!({ "execute": command });
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        let mut line = request.to_string();
        line.push('\n');
        let io = |source| HypervisorError::QmpIo {
            path: self.path.clone(),
            source,
        };
        self.writer.write_all(line.as_bytes()).await.map_err(io)?;
        loop {
            let message = self.read_message(command).await?;
            if message.get("event").is_some() {
                self.events.push(message);
                continue;
            }
            return parse_reply(command, message);
        }
    }

    /// Hands `fd` to QEMU under `name` (QMP `getfd`, the descriptor rides
    /// the command as SCM_RIGHTS).
    pub async fn send_fd(&mut self, name: &str, fd: std::os::fd::BorrowedFd<'_>) -> Result<()> {
        use std::os::fd::AsRawFd as _;
        let line = format!(
            "{}\n",
            json!({ "execute": "getfd", "arguments": { "fdname": name } })
        );
        let fds = [fd.as_raw_fd()];
        let sent = nix::sys::socket::sendmsg::<nix::sys::socket::UnixAddr>(
            self.writer.as_ref().as_raw_fd(),
            &[std::io::IoSlice::new(line.as_bytes())],
            &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .map_err(|e| HypervisorError::QmpIo {
            path: self.path.clone(),
            source: std::io::Error::from(e),
        })?;
        if sent != line.len() {
            return Err(HypervisorError::Qmp {
                command: "getfd".into(),
                detail: format!("short write ({sent} of {} bytes)", line.len()),
            });
        }
        loop {
            let message = self.read_message("getfd").await?;
            if message.get("event").is_none() {
                return parse_reply("getfd", message).map(drop);
            }
            self.events.push(message);
        }
    }

    /// Waits up to `timeout` for event `name` whose data matches `pred`.
    pub async fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let matches = |m: &Value| {
            m.get("event").and_then(Value::as_str) == Some(name)
                && pred(m.get("data").unwrap_or(&Value::Null))
        };
        if let Some(i) = self.events.iter().position(&matches) {
            return Ok(self.events.remove(i));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if tokio::time::Instant::now() >= deadline {
                return Err(HypervisorError::Qmp {
                    command: name.into(),
                    detail: format!("no {name} event within {}s", timeout.as_secs()),
                });
            }
            match self.read_message(name).await {
                Ok(m) if matches(&m) => return Ok(m),
                Ok(_) => {}
                // read_message's own 5 s bound: keep waiting until ours.
                Err(HypervisorError::Qmp { detail, .. }) if detail.starts_with("no reply") => {}
                Err(e) => return Err(e),
            }
        }
    }

    async fn read_message(&mut self, what: &str) -> Result<Value> {
        let mut line = String::new();
        let read = tokio::time::timeout(QMP_TIMEOUT, self.reader.read_line(&mut line))
            .await
            .map_err(|_| HypervisorError::Qmp {
                command: what.into(),
                detail: "no reply within 5s".into(),
            })?
            .map_err(|source| HypervisorError::QmpIo {
                path: self.path.clone(),
                source,
            })?;
        if read == 0 {
            return Err(HypervisorError::Qmp {
                command: what.into(),
                detail: "QEMU closed the connection".into(),
            });
        }
        serde_json::from_str(&line).map_err(|e| HypervisorError::Qmp {
            command: what.into(),
            detail: format!("bad JSON {line:?}: {e}"),
        })
    }
}

/// `{"return": X}` → X; `{"error": {"class", "desc"}}` → an error naming both.
fn parse_reply(command: &str, message: Value) -> Result<Value> {
    if let Some(ret) = message.get("return") {
        return Ok(ret.clone());
    }
    let detail = match message.get("error") {
        Some(err) => format!(
            "{}: {}",
            err.get("class").and_then(Value::as_str).unwrap_or("Error"),
            err.get("desc")
                .and_then(Value::as_str)
                .unwrap_or("no description")
        ),
        None => format!("unexpected reply {message}"),
    };
    Err(HypervisorError::Qmp {
        command: command.into(),
        detail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[test]
    fn replies_and_errors() {
        assert_eq!(
            parse_reply("x", json!({"return": {"status": "running"}})).ok(),
            Some(json!({"status": "running"}))
        );
        let err = parse_reply(
            "cont",
            json!({"error": {"class": "GenericError", "desc": "boom"}}),
        )
        .expect_err("error");
        assert_eq!(err.to_string(), "QMP cont failed: GenericError: boom");
        assert!(parse_reply("x", json!({"what": 1})).is_err());
    }

    /// A scripted QMP server: greeting, capabilities, then one command with an
    /// event interleaved before its reply.
    #[tokio::test]
    async fn talks_to_a_scripted_server() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .expect("greet");
            let caps = lines.next_line().await.expect("read").expect("line");
            assert!(caps.contains("qmp_capabilities"));
            w.write_all(b"{\"return\": {}}\n").await.expect("w");
            let cmd = lines.next_line().await.expect("read").expect("line");
            assert!(cmd.contains("query-status"));
            w.write_all(b"{\"event\": \"STOP\", \"timestamp\": {}}\n{\"return\": {\"status\": \"paused\"}}\n")
                .await
                .expect("w");
        });
        let mut qmp = Qmp::connect(&path).await.expect("connect");
        let status = qmp.execute("query-status", None).await.expect("status");
        assert_eq!(status["status"], "paused");
        // The event that came before the reply is still there to wait for.
        let event = qmp
            .wait_event("STOP", Duration::from_millis(10), |_| true)
            .await
            .expect("buffered event");
        assert_eq!(event["event"], "STOP");
        server.await.expect("server");
    }
}
