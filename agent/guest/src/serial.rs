//! The agent's API on a virtio-serial port, for VMs without vsock
//! (`vc.channel=serial` on the kernel command line; the host's
//! `hypervisor.vsock = "serial"`).
//!
//! A port is one byte stream, and QEMU's unix socket behind it takes one
//! host at a time. The guest knows only whether a host is connected (a
//! read returns 0 while none is and nothing is left to read). So the port is
//! opened once, for the agent's lifetime, and the connections are made on
//! it one after another: the listener reads a host's hello (the auth line
//! vsock connections start with, see [`crate::auth`], and a nonce), answers
//! it (see [`agent::serial`]) and hands a [`SerialConn`] to the ttrpc
//! server; when that connection ends the listener reads the next line.
//!
//! The port is never closed between hosts: closing it discards what the
//! port holds, and a new host's line can be there already (QEMU passes a
//! host's bytes on while the guest has the port open; a fork of the agent
//! between its fork and exec holds the port open too).
//!
//! A connection ends when a read returns 0 (its host went away), or when a
//! new host's line comes on it: a new host can connect before this guest
//! saw the old one go (the host's close and the next connect both arrive
//! before the connection reads again, so no read returns 0). Its line is
//! told apart there: a served host sends ttrpc frames, whose first byte
//! (the high byte of a length of at most 4 MiB) is 0, and an auth line
//! starts with a letter. So a connection's reads follow the frames
//! ([`Frames`]); where a line starts instead, the connection ends (its reads
//! return 0, its writes fail, so nothing of it reaches the new host) and
//! the line's first bytes go back to the listener.

use std::{
    fs::File,
    future::Future as _,
    io::{Read as _, Write as _},
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{ready, Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::auth::SharedSecret;

/// Where the kernel lists virtio-serial ports (`<port>/name`).
const PORTS: &str = "/sys/class/virtio-ports";
/// How long the port may take to appear once its module is loaded.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the port is looked at while no host is connected.
const NO_HOST_PAUSE: Duration = Duration::from_millis(100);
/// How often a write is tried again while the port is full.
const WRITE_RETRY: Duration = Duration::from_millis(2);
/// The reader thread's reads, and how many it reads ahead.
const READ_CHUNK: usize = 64 * 1024;
const READ_AHEAD_CHUNKS: usize = 16;

/// A ttrpc frame's header: length (u32, big-endian), stream ID (u32), type,
/// flags.
const FRAME_HEADER_LEN: usize = 10;

/// Where a served connection is in the host's ttrpc frames.
#[derive(Debug, Default)]
struct Frames {
    header: [u8; FRAME_HEADER_LEN],
    /// Bytes of the current header read so far.
    have: usize,
    /// Bytes of the current frame's body still to come.
    body_left: usize,
}

impl Frames {
    /// How many of `bytes`, which follow what was fed before, are frames
    /// of the served host: all of them, or those before a byte that starts
    /// something else at a frame boundary (a new host's auth line).
    fn frames_prefix(&mut self, bytes: &[u8]) -> usize {
        let mut i = 0;
        while i < bytes.len() {
            if self.body_left > 0 {
                let take = self.body_left.min(bytes.len() - i);
                self.body_left -= take;
                i += take;
                continue;
            }
            if self.have == 0 && bytes[i] != 0 {
                return i;
            }
            self.header[self.have] = bytes[i];
            self.have += 1;
            i += 1;
            if self.have == FRAME_HEADER_LEN {
                let [a, b, c, d, ..] = self.header;
                self.body_left = u32::from_be_bytes([a, b, c, d]) as usize;
                self.have = 0;
            }
        }
        bytes.len()
    }
}

/// Whether the kernel command line puts the agent on the serial port.
pub fn selected(cmdline: &str) -> bool {
    cmdline
        .split_whitespace()
        .filter_map(|p| p.strip_prefix(agent::CHANNEL_PARAM))
        .filter_map(|rest| rest.strip_prefix('='))
        .any(|value| value == "serial")
}

/// The device node of the port named `name` under `ports` (a sysfs
/// directory of `vportXpY/name` files), if it has appeared.
fn find_port(ports: &Path, name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(ports).ok()?;
    entries.flatten().find_map(|entry| {
        let wanted = std::fs::read_to_string(entry.path().join("name"))
            .map(|n| n.trim_end() == name)
            .unwrap_or(false);
        wanted.then(|| Path::new("/dev").join(entry.file_name()))
    })
}

/// Waits for the agent's port (the module's probe is asynchronous).
async fn wait_for_port() -> anyhow::Result<PathBuf> {
    let deadline = tokio::time::Instant::now() + PROBE_TIMEOUT;
    loop {
        if let Some(path) = find_port(Path::new(PORTS), agent::SERIAL_PORT_NAME) {
            if path.exists() {
                return Ok(path);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "no virtio-serial port named {} appeared in {}s",
                agent::SERIAL_PORT_NAME,
                PROBE_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What the port's reader thread passes on.
enum Event {
    Data(Vec<u8>),
    /// The host that sent the data before went away.
    NoHost,
}

/// The port, open for the agent's lifetime, written in place.
///
/// It is read by a thread of its own, which waits in poll(2): the port
/// reports "hang-up" while no host is connected, which tokio's reactor
/// keeps as a final state once seen (every later wait would return at
/// once, and the agent would spin through a host's reconnection).
struct Port {
    file: File,
    /// The connection that may write (0: none, the listener's turn).
    writer: AtomicU64,
}

/// The port's bytes from the reader thread, with what of the last chunk is
/// still to be consumed. Held by the listener, lent to a connection.
struct Incoming {
    rx: tokio::sync::mpsc::Receiver<Event>,
    chunk: Vec<u8>,
    at: usize,
}

impl Incoming {
    fn rest(&self) -> &[u8] {
        self.chunk.get(self.at..).unwrap_or_default()
    }
}

impl Port {
    fn open(path: &Path) -> std::io::Result<(Arc<Self>, Incoming)> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)?;
        Self::from_file(file)
    }

    /// `file` must be non-blocking. Starts the reader thread.
    fn from_file(file: File) -> std::io::Result<(Arc<Self>, Incoming)> {
        let port = Arc::new(Self {
            file,
            writer: AtomicU64::new(0),
        });
        let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD_CHUNKS);
        let reader = port.clone();
        std::thread::Builder::new()
            .name("serial-reader".into())
            .spawn(move || reader.read_loop(&tx))?;
        Ok((
            port,
            Incoming {
                rx,
                chunk: Vec::new(),
                at: 0,
            },
        ))
    }

    /// The reader thread: the port's bytes and hosts' departures, until
    /// nobody listens.
    fn read_loop(&self, tx: &tokio::sync::mpsc::Sender<Event>) {
        let mut host = false;
        // Reads of 0 in a row: one is not proof that the host went. The
        // guest can take a new host's first bytes before the notice that
        // it connected (they come on different queues), and reads 0 in
        // between; a host that went is seen gone again a pause later.
        let mut zero_reads = 0u32;
        let mut buf = vec![0u8; READ_CHUNK];
        while !tx.is_closed() {
            let mut pfd = libc::pollfd {
                fd: self.file.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the duration of the call.
            let _ = unsafe { libc::poll(&mut pfd, 1, -1) };
            let sent = match (&self.file).read(&mut buf) {
                Ok(0) => {
                    // No host is connected: say so once, then look again
                    // now and then (nothing wakes a wait for a host).
                    zero_reads += 1;
                    let gone = host && zero_reads >= 2;
                    let sent = !gone || tx.blocking_send(Event::NoHost).is_ok();
                    if gone {
                        host = false;
                    }
                    std::thread::sleep(NO_HOST_PAUSE);
                    sent
                }
                Ok(n) => {
                    host = true;
                    zero_reads = 0;
                    tx.blocking_send(Event::Data(buf[..n].to_vec())).is_ok()
                }
                Err(err)
                    if matches!(
                        err.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    zero_reads = 0;
                    true
                }
                Err(err) => {
                    tracing::warn!("reading the agent's serial port: {err}");
                    std::thread::sleep(NO_HOST_PAUSE);
                    true
                }
            };
            if !sent {
                return;
            }
        }
    }

    /// One write; while the port is full (or no host takes it), tried
    /// again every [`WRITE_RETRY`].
    fn poll_write(
        &self,
        cx: &mut Context<'_>,
        buf: &[u8],
        retry: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    ) -> Poll<std::io::Result<usize>> {
        loop {
            if let Some(sleep) = retry {
                ready!(sleep.as_mut().poll(cx));
                *retry = None;
            }
            match (&self.file).write(buf) {
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                    *retry = Some(Box::pin(tokio::time::sleep(WRITE_RETRY)));
                }
                other => return Poll::Ready(other),
            }
        }
    }

    /// All of `bytes`, for the listener (no connection writes meanwhile).
    async fn write_all(&self, mut bytes: &[u8]) -> std::io::Result<()> {
        let mut retry = None;
        while !bytes.is_empty() {
            let n = std::future::poll_fn(|cx| self.poll_write(cx, bytes, &mut retry)).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            bytes = &bytes[n..];
        }
        Ok(())
    }
}

/// One host's connection on the port.
pub struct SerialConn {
    port: Arc<Port>,
    /// This connection's number (never 0).
    id: u64,
    frames: Frames,
    /// The port's bytes, while this connection is served.
    incoming: Option<Incoming>,
    /// Gets `incoming` back when the connection ends.
    over: Option<tokio::sync::oneshot::Sender<Incoming>>,
    retry: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl SerialConn {
    /// Connection `id` (never 0) on `port`, reading `incoming`, which the
    /// receiver gets back when it ends; from now on it is the port's writer.
    fn new(
        port: &Arc<Port>,
        incoming: Incoming,
        id: u64,
    ) -> (Self, tokio::sync::oneshot::Receiver<Incoming>) {
        port.writer.store(id, Ordering::Release);
        let (over_tx, over) = tokio::sync::oneshot::channel();
        let conn = Self {
            port: port.clone(),
            id,
            frames: Frames::default(),
            incoming: Some(incoming),
            over: Some(over_tx),
            retry: None,
        };
        (conn, over)
    }

    /// Ends the connection: no more reads or writes; the listener reads on
    /// (from where this connection stopped: a new host's line, if one came).
    fn end(&mut self) {
        let _ = self
            .port
            .writer
            .compare_exchange(self.id, 0, Ordering::AcqRel, Ordering::Acquire);
        if let (Some(incoming), Some(over)) = (self.incoming.take(), self.over.take()) {
            let _ = over.send(incoming);
        }
    }
}

impl Drop for SerialConn {
    fn drop(&mut self) {
        self.end();
    }
}

impl AsyncRead for SerialConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            let Some(incoming) = this.incoming.as_mut() else {
                return Poll::Ready(Ok(())); // ended
            };
            let rest = incoming.rest();
            if !rest.is_empty() {
                let n = rest.len().min(buf.remaining());
                let ours = this.frames.frames_prefix(&rest[..n]);
                buf.put_slice(&rest[..ours]);
                incoming.at += ours;
                if ours < n {
                    tracing::info!(
                        "a new host connected before the old one was seen to go: ending the old connection"
                    );
                    this.end();
                }
                // 0 bytes when the line came first: the end.
                return Poll::Ready(Ok(()));
            }
            match ready!(incoming.rx.poll_recv(cx)) {
                Some(Event::Data(chunk)) => {
                    incoming.chunk = chunk;
                    incoming.at = 0;
                }
                // The host went away (or the reader thread did).
                Some(Event::NoHost) | None => {
                    this.end();
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl AsyncWrite for SerialConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.port.writer.load(Ordering::Acquire) != this.id {
            // Ended: the port is the next host's.
            return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        this.port.poll_write(cx, buf, &mut this.retry)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The next host's auth line (without its newline); `None` once the
/// reader thread is gone. Whole ttrpc frames before it are skipped (what
/// a host whose connection ended still sent); a host that goes away
/// mid-line takes its part of the line with it.
async fn read_auth_line(incoming: &mut Incoming) -> Option<Vec<u8>> {
    let mut frames = Frames::default();
    let mut line = Vec::with_capacity(agent::serial::HELLO_LINE_MAX);
    loop {
        while let Some(&byte) = incoming.rest().first() {
            incoming.at += 1;
            if line.is_empty() && frames.frames_prefix(&[byte]) == 1 {
                continue;
            }
            if byte == b'\n' {
                return Some(line);
            }
            line.push(byte);
            if line.len() > agent::serial::HELLO_LINE_MAX {
                tracing::warn!("a serial host sent a line too long to be an auth line");
                line.clear();
            }
        }
        match incoming.rx.recv().await? {
            Event::Data(chunk) => {
                incoming.chunk = chunk;
                incoming.at = 0;
            }
            Event::NoHost => {
                line.clear();
                frames = Frames::default();
            }
        }
    }
}

/// The API's listener on the serial port: authenticated connections, one
/// at a time.
pub async fn listen(
    secret: SharedSecret,
) -> anyhow::Result<ttrpc::asynchronous::transport::Listener> {
    let path = wait_for_port().await.context("the agent's serial port")?;
    tracing::debug!(path = %path.display(), "agent serial port");
    let (port, mut incoming) =
        Port::open(&path).with_context(|| format!("opening {}", path.display()))?;
    // Capacity 1: a connection is made only once the server took the
    // last one and it ended.
    let (tx, rx) = tokio::sync::mpsc::channel::<SerialConn>(1);
    tokio::spawn(async move {
        let mut id = 0u64;
        loop {
            let Some(line) = read_auth_line(&mut incoming).await else {
                tracing::error!("the agent's serial port is no longer read");
                return;
            };
            let Some(nonce) = agent::serial::split_hello(&line)
                .filter(|(auth, _)| secret.accepts(auth))
                .map(|(_, nonce)| nonce)
            else {
                tracing::warn!("refused a serial connection without the VM's secret");
                continue;
            };
            // A host whose dial gave up may have left this hello: the
            // nonce tells the host that is there now it was not its own.
            if let Err(err) = port.write_all(&agent::serial::answer(nonce)).await {
                tracing::warn!("answering on the agent's serial port: {err}");
                continue;
            }
            id += 1;
            tracing::debug!(connection = id, "serial host accepted");
            let (conn, over) = SerialConn::new(&port, incoming, id);
            if tx.send(conn).await.is_err() {
                return; // the server is gone
            }
            // The connection reads until it ends.
            incoming = match over.await {
                Ok(incoming) => incoming,
                Err(_) => return, // unreachable: a connection always gives it back
            };
            tracing::debug!(
                connection = id,
                next_host = !incoming.rest().is_empty(),
                "serial connection over"
            );
        }
    });
    let incoming = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|conn| (Ok::<_, std::io::Error>(conn), rx))
    });
    Ok(ttrpc::asynchronous::transport::Listener::new(incoming))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_channel_is_chosen_by_its_parameter_only() {
        assert!(selected("console=ttyS0 vc.channel=serial quiet"));
        assert!(!selected("console=ttyS0 quiet"));
        assert!(!selected("vc.channel=vsock"));
        assert!(!selected("vc.channelx=serial"));
        assert!(!selected("vc.channel=serialx"));
    }

    /// A frame: header (length, stream 1, type 1, flags 0) and body.
    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&[0, 0, 0, 1, 1, 0]);
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn frames_are_followed_across_reads_up_to_a_line() {
        let mut stream = frame(b"AUTH in a body is data");
        stream.extend(frame(b""));
        stream.extend(frame(&[0; 300]));
        let frames_end = stream.len();
        stream.extend_from_slice(b"AUTH 00\n");
        // Any split of the stream into reads finds the same boundary.
        for chunk in [1, 3, 7, 10, 64, stream.len()] {
            let mut frames = Frames::default();
            let mut at = 0;
            for piece in stream.chunks(chunk) {
                let ours = frames.frames_prefix(piece);
                at += ours;
                if ours < piece.len() {
                    break;
                }
            }
            assert_eq!(at, frames_end, "reads of {chunk}");
        }
    }

    fn port_pair() -> (Arc<Port>, Incoming, std::os::unix::net::UnixStream) {
        let (guest, host) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        guest.set_nonblocking(true).expect("nonblocking");
        let (port, incoming) =
            Port::from_file(File::from(std::os::fd::OwnedFd::from(guest))).expect("port");
        (port, incoming, host)
    }

    /// A new host's line on a connection ends it: its reads give the
    /// frames before the line, then 0; its writes fail; the listener reads
    /// the line from where the connection stopped.
    #[tokio::test]
    async fn a_new_hosts_line_ends_the_connection_and_goes_to_the_listener() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (port, incoming, mut host) = port_pair();
        let (mut conn, over) = SerialConn::new(&port, incoming, 1);
        conn.write_all(b"answer")
            .await
            .expect("the connection writes");
        let sent = frame(b"old request");
        host.write_all(&sent).expect("write");
        host.write_all(b"AUTH 0123").expect("write");
        let mut got = Vec::new();
        let mut buf = [0u8; 7];
        loop {
            let n = conn.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, sent);
        assert_eq!(conn.read(&mut buf).await.expect("read"), 0, "stays ended");
        let err = conn
            .write_all(b"late answer")
            .await
            .expect_err("write fails");
        assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
        let mut incoming = over.await.expect("over");
        assert!(incoming.rest().starts_with(b"A"));
        host.write_all(b"abcd\n").expect("write");
        let line = read_auth_line(&mut incoming).await.expect("line");
        assert_eq!(line, b"AUTH 0123abcd");
        let mut answer = [0u8; 6];
        std::io::Read::read_exact(&mut host, &mut answer).expect("answer");
        assert_eq!(&answer, b"answer");
    }

    /// The listener skips whole frames before a line (what an ended
    /// connection's host still sent) and starts again when a line is
    /// longer than an auth line; a connection ends when its host goes, and
    /// when the server lets it go.
    #[tokio::test]
    async fn the_listener_skips_frames_and_connections_end() {
        use tokio::io::AsyncReadExt as _;
        let (port, mut incoming, mut host) = port_pair();
        let mut stream = frame(b"AUTH inside a frame\n");
        stream.extend(frame(b""));
        stream.extend_from_slice(b"AUTH x\n");
        host.write_all(&stream).expect("write");
        assert_eq!(
            read_auth_line(&mut incoming).await.expect("line"),
            b"AUTH x"
        );
        let long = vec![b'A'; agent::serial::HELLO_LINE_MAX + 5];
        host.write_all(&long).expect("write");
        host.write_all(b"\n").expect("write");
        let line = read_auth_line(&mut incoming).await.expect("line");
        assert!(line.len() < agent::serial::HELLO_LINE_MAX, "{}", line.len());
        // Let go without an end: the port goes back to the listener.
        let (c, over) = SerialConn::new(&port, incoming, 7);
        drop(c);
        let incoming = over.await.expect("over");
        assert_eq!(port.writer.load(Ordering::Acquire), 0);
        // The host goes away: the connection's reads end.
        let (mut c, over) = SerialConn::new(&port, incoming, 8);
        host.write_all(&frame(b"last")).expect("write");
        drop(host);
        let mut all = Vec::new();
        c.read_to_end(&mut all).await.expect("read");
        assert_eq!(all, frame(b"last"));
        over.await.expect("over");
    }

    #[test]
    fn the_port_is_found_by_its_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (entry, name) in [
            ("vport1p1", "other.port"),
            ("vport2p1", agent::SERIAL_PORT_NAME),
        ] {
            std::fs::create_dir(dir.path().join(entry)).expect("mkdir");
            std::fs::write(dir.path().join(entry).join("name"), format!("{name}\n")).expect("name");
        }
        assert_eq!(
            find_port(dir.path(), agent::SERIAL_PORT_NAME),
            Some(PathBuf::from("/dev/vport2p1"))
        );
        assert_eq!(find_port(dir.path(), "missing"), None);
        assert_eq!(find_port(&dir.path().join("none"), "x"), None);
    }
}
