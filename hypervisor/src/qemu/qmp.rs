//! A QMP client: one long-lived connection per VMM ([`QmpSession`]),
//! line-delimited JSON, replies matched to commands by `id`, events kept.

use std::{
    collections::{HashMap, VecDeque},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{
        unix::{OwnedReadHalf, OwnedWriteHalf},
        UnixStream,
    },
    sync::{oneshot, watch},
};

use crate::{HypervisorError, Result};

/// Bound on one QMP exchange; QEMU answers in milliseconds unless wedged.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);

/// How many recent events a session keeps for [`QmpSession::wait_event`].
const EVENT_LOG: usize = 256;

/// One long-lived QMP connection to a VMM: a reader task routes each reply
/// to the command that asked (by QMP `id`) and keeps the events, numbered,
/// so that a caller waits for an event after a mark it took before its
/// command (QEMU may announce an effect before it answers). Commands from
/// several tasks interleave safely. Once QEMU closes the connection every
/// waiter fails at once and [`QmpSession::is_closed`] says so.
#[derive(Debug, Clone)]
pub struct QmpSession {
    shared: Arc<Shared>,
    _reader: Arc<AbortOnDrop>,
}

#[derive(Debug)]
struct Shared {
    path: PathBuf,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Value>>>,
    /// (sequence number, event), oldest first; at most [`EVENT_LOG`].
    events: Mutex<VecDeque<(u64, Value)>>,
    /// The sequence number the next event gets; bumped to wake waiters
    /// (and once more when the connection closes).
    event_seq: watch::Sender<u64>,
    closed: AtomicBool,
}

#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A point in a session's event stream: [`QmpSession::wait_event`] looks
/// only at events after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventMark(u64);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl QmpSession {
    /// Connects, reads the greeting, leaves capabilities negotiation and
    /// starts the reader.
    pub async fn connect(path: &Path) -> Result<Self> {
        let io = |source| HypervisorError::QmpIo {
            path: path.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(path).await.map_err(io)?;
        let (read, writer) = stream.into_split();
        let mut reader = BufReader::new(read);
        let greeting = read_message(&mut reader, path, "greeting").await?;
        if greeting.get("QMP").is_none() {
            return Err(HypervisorError::Qmp {
                command: "greeting".into(),
                detail: greeting.to_string(),
            });
        }
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            writer: tokio::sync::Mutex::new(writer),
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            events: Mutex::new(VecDeque::new()),
            event_seq: watch::channel(0).0,
            closed: AtomicBool::new(false),
        });
        let task = tokio::spawn(read_loop(reader, shared.clone()));
        let session = Self {
            shared,
            _reader: Arc::new(AbortOnDrop(task)),
        };
        session.execute("qmp_capabilities", None).await?;
        Ok(session)
    }

    /// QEMU closed the connection (it exited, or it was replaced).
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst)
    }

    /// The current end of the event stream.
    pub fn mark(&self) -> EventMark {
        EventMark(*self.shared.event_seq.borrow())
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value> {
        if self.is_closed() {
            return Err(closed(command));
        }
        let (id, reply) = self.expect_reply();
        let mut request = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        let mut line = request.to_string();
        line.push('\n');
        let written = self
            .shared
            .writer
            .lock()
            .await
            .write_all(line.as_bytes())
            .await;
        if let Err(source) = written {
            lock(&self.shared.pending).remove(&id);
            return Err(HypervisorError::QmpIo {
                path: self.shared.path.clone(),
                source,
            });
        }
        self.reply(command, id, reply).await
    }

    /// Hands `fd` to QEMU under `name` (QMP `getfd`, the descriptor rides
    /// the command as SCM_RIGHTS).
    pub async fn send_fd(&self, name: &str, fd: std::os::fd::BorrowedFd<'_>) -> Result<()> {
        use std::os::fd::AsRawFd as _;
        if self.is_closed() {
            return Err(closed("getfd"));
        }
        let (id, reply) = self.expect_reply();
        let line = format!(
            "{}\n",
            json!({ "execute": "getfd", "arguments": { "fdname": name }, "id": id })
        );
        let fds = [fd.as_raw_fd()];
        let sent = {
            let writer = self.shared.writer.lock().await;
            nix::sys::socket::sendmsg::<nix::sys::socket::UnixAddr>(
                writer.as_ref().as_raw_fd(),
                &[std::io::IoSlice::new(line.as_bytes())],
                &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
                nix::sys::socket::MsgFlags::empty(),
                None,
            )
        };
        let failed = match sent {
            Ok(n) if n == line.len() => None,
            Ok(n) => Some(HypervisorError::Qmp {
                command: "getfd".into(),
                detail: format!("short write ({n} of {} bytes)", line.len()),
            }),
            Err(e) => Some(HypervisorError::QmpIo {
                path: self.shared.path.clone(),
                source: std::io::Error::from(e),
            }),
        };
        if let Some(err) = failed {
            lock(&self.shared.pending).remove(&id);
            return Err(err);
        }
        self.reply("getfd", id, reply).await.map(drop)
    }

    /// Waits up to `timeout` for event `name` after `since` whose data
    /// matches `pred`.
    pub async fn wait_event(
        &self,
        name: &str,
        since: EventMark,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let matches = |m: &Value| {
            m.get("event").and_then(Value::as_str) == Some(name)
                && pred(m.get("data").unwrap_or(&Value::Null))
        };
        let mut seq = self.shared.event_seq.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let found = lock(&self.shared.events)
                .iter()
                .find(|(n, m)| *n >= since.0 && matches(m))
                .map(|(_, m)| m.clone());
            if let Some(event) = found {
                return Ok(event);
            }
            if self.is_closed() {
                return Err(closed(name));
            }
            match tokio::time::timeout_at(deadline, seq.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(closed(name)),
                Err(_) => {
                    return Err(HypervisorError::Qmp {
                        command: name.into(),
                        detail: format!("no {name} event within {}s", timeout.as_secs()),
                    })
                }
            }
        }
    }

    fn expect_reply(&self) -> (u64, oneshot::Receiver<Value>) {
        let id = self.shared.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        lock(&self.shared.pending).insert(id, tx);
        (id, rx)
    }

    async fn reply(
        &self,
        command: &str,
        id: u64,
        reply: oneshot::Receiver<Value>,
    ) -> Result<Value> {
        if self.is_closed() {
            lock(&self.shared.pending).remove(&id);
            return Err(closed(command));
        }
        match tokio::time::timeout(QMP_TIMEOUT, reply).await {
            Ok(Ok(message)) => parse_reply(command, message),
            Ok(Err(_)) => Err(closed(command)),
            Err(_) => {
                lock(&self.shared.pending).remove(&id);
                Err(HypervisorError::Qmp {
                    command: command.into(),
                    detail: format!("no reply within {}s", QMP_TIMEOUT.as_secs()),
                })
            }
        }
    }
}

/// This process's session of each VMM, by QMP socket: every object that
/// speaks for the same VM (a restored one, another runtime in the same
/// process) shares one connection — QEMU serves one client per socket.
/// Entries whose connection closed are dropped as others are looked up.
type Slot = Arc<tokio::sync::Mutex<Option<QmpSession>>>;
static SESSIONS: std::sync::OnceLock<Mutex<HashMap<PathBuf, Slot>>> = std::sync::OnceLock::new();

/// The open session to the VMM at `path`, connected if there is none.
pub async fn session_for(path: &Path) -> Result<QmpSession> {
    let slot = {
        let mut map = lock(SESSIONS.get_or_init(Default::default));
        map.retain(|p, slot| {
            p == path
                || slot
                    .try_lock()
                    .map(|s| s.as_ref().is_some_and(|s| !s.is_closed()))
                    .unwrap_or(true)
        });
        map.entry(path.to_path_buf()).or_default().clone()
    };
    let mut held = slot.lock().await;
    if let Some(session) = held.as_ref().filter(|s| !s.is_closed()) {
        return Ok(session.clone());
    }
    let session = QmpSession::connect(path).await?;
    *held = Some(session.clone());
    Ok(session)
}

fn closed(what: &str) -> HypervisorError {
    HypervisorError::Qmp {
        command: what.into(),
        detail: "QEMU closed the connection".into(),
    }
}

/// Marks the session closed when the reader ends — at EOF, or dropped with
/// the tokio runtime it ran on — failing every waiter at once.
struct CloseOnDrop(Arc<Shared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        let shared = &self.0;
        shared.closed.store(true, Ordering::SeqCst);
        lock(&shared.pending).clear();
        shared.event_seq.send_modify(|n| *n += 1);
    }
}

/// Routes replies to their commands and keeps events, until EOF.
async fn read_loop(mut reader: BufReader<OwnedReadHalf>, shared: Arc<Shared>) {
    let _close = CloseOnDrop(shared.clone());
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let Ok(message) = serde_json::from_str::<Value>(&line) else {
            tracing::warn!(path = %shared.path.display(), "QMP sent bad JSON: {line:?}");
            continue;
        };
        if message.get("event").is_some() {
            let mut events = lock(&shared.events);
            let seq = *shared.event_seq.borrow();
            events.push_back((seq, message));
            if events.len() > EVENT_LOG {
                events.pop_front();
            }
            drop(events);
            shared.event_seq.send_replace(seq + 1);
            continue;
        }
        let waiter = message
            .get("id")
            .and_then(Value::as_u64)
            .and_then(|id| lock(&shared.pending).remove(&id));
        if let Some(waiter) = waiter {
            let _ = waiter.send(message);
        }
    }
}

async fn read_message(
    reader: &mut BufReader<OwnedReadHalf>,
    path: &Path,
    what: &str,
) -> Result<Value> {
    let mut line = String::new();
    let read = tokio::time::timeout(QMP_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| HypervisorError::Qmp {
            command: what.into(),
            detail: format!("no reply within {}s", QMP_TIMEOUT.as_secs()),
        })?
        .map_err(|source| HypervisorError::QmpIo {
            path: path.to_path_buf(),
            source,
        })?;
    if read == 0 {
        return Err(closed(what));
    }
    serde_json::from_str(&line).map_err(|e| HypervisorError::Qmp {
        command: what.into(),
        detail: format!("bad JSON {line:?}: {e}"),
    })
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
    /// event interleaved before its reply, then EOF.
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
            let id = |line: &str| serde_json::from_str::<Value>(line).expect("json")["id"].clone();
            w.write_all(format!("{}\n", json!({"return": {}, "id": id(&caps)})).as_bytes())
                .await
                .expect("w");
            let cmd = lines.next_line().await.expect("read").expect("line");
            assert!(cmd.contains("query-status"));
            w.write_all(
                format!(
                    "{{\"event\": \"STOP\", \"timestamp\": {{}}}}\n{}\n",
                    json!({"return": {"status": "paused"}, "id": id(&cmd)})
                )
                .as_bytes(),
            )
            .await
            .expect("w");
            // Hold the connection until the client has seen the event.
            let _ = lines.next_line().await;
        });
        let qmp = QmpSession::connect(&path).await.expect("connect");
        let mark = qmp.mark();
        let status = qmp.execute("query-status", None).await.expect("status");
        assert_eq!(status["status"], "paused");
        // The event that came before the reply is there to wait for.
        let event = qmp
            .wait_event("STOP", mark, Duration::from_millis(10), |_| true)
            .await
            .expect("buffered event");
        assert_eq!(event["event"], "STOP");
        // An event before the mark is not waited for.
        let later = qmp.mark();
        let err = qmp
            .wait_event("STOP", later, Duration::from_millis(10), |_| true)
            .await
            .expect_err("no new event");
        assert!(err.to_string().contains("no STOP event"), "{err}");
        assert!(!qmp.is_closed());
        // The server goes away: the session knows, commands fail at once.
        qmp.execute("cont", None).await.expect_err("EOF");
        server.await.expect("server");
        assert!(qmp.is_closed());
        let err = qmp.execute("cont", None).await.expect_err("closed");
        assert!(err.to_string().contains("closed"), "{err}");
    }
}
