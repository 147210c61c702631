//! The agent's API on a virtio-serial port, for VMs without vsock
//! (`vc.channel=serial` on the kernel command line; the host's
//! `hypervisor.vsock = "serial"`).
//!
//! A port is one byte stream that the guest can open once at a time: the
//! host side is QEMU's unix socket, one client at a time. So the listener
//! yields one connection after another: it opens the port, waits for the
//! host's auth line (the same one vsock connections start with, see
//! [`crate::auth`]), answers [`agent::SERIAL_OK`] and hands the port to the
//! ttrpc server; when that connection ends (the host went away: a read
//! returns 0 once the host side is closed and drained) the port is closed,
//! which discards what was left in it, and opened again for the next host.
//!
//! A new host can connect before this guest saw the old one go: the port's
//! close and open both arrive before the connection reads again, so no read
//! returns 0, and the new host's auth line arrives on the old connection.
//! It is told apart there: a served host sends ttrpc frames, whose first
//! byte (the high byte of a length of at most 4 MiB) is 0, and an auth line
//! starts with a letter. So the served connection's reads follow the
//! frames ([`Frames`]); where a line starts instead, the old connection
//! ends (its reads return 0, its writes fail, so nothing of it reaches the
//! new host) and the line is carried over to the listener, which answers
//! it as if it had read it on a fresh open.

use std::{
    fs::File,
    io::{Read as _, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    pin::Pin,
    task::{ready, Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use tokio::io::{unix::AsyncFd, AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};

use crate::auth::SharedSecret;

/// Where the kernel lists virtio-serial ports (`<port>/name`).
const PORTS: &str = "/sys/class/virtio-ports";
/// How long the port may take to appear once its module is loaded.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause before opening the port again: if it is still held (EBUSY),
/// or no host is connected (EOF at once).
const REOPEN_PAUSE: Duration = Duration::from_millis(20);
const NO_HOST_PAUSE: Duration = Duration::from_millis(100);
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

/// One open of the port, as an async byte stream.
pub struct SerialPort {
    /// `None` only while being dropped.
    fd: Option<AsyncFd<File>>,
    /// Whether a host is served on it (its reads follow the frames).
    served: bool,
    frames: Frames,
    /// Once a new host's line began on this connection: what of it came.
    next_host: Option<Vec<u8>>,
    /// Whether this connection is over (reads return 0).
    ended: bool,
    /// Told, once the port is closed, that the connection is over, with a
    /// new host's auth line if one came on it.
    released: Option<tokio::sync::oneshot::Sender<Option<Vec<u8>>>>,
}

impl SerialPort {
    fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)?;
        Self::from_file(file)
    }

    /// `file` must be non-blocking.
    fn from_file(file: File) -> std::io::Result<Self> {
        // SAFETY: `file` owns its descriptor, which stays open and the
        // same for as long as the AsyncFd (its only owner) exists.
        unsafe { AsyncFd::register(file) }
            .map(|fd| Self {
                fd: Some(fd),
                served: false,
                frames: Frames::default(),
                next_host: None,
                ended: false,
                released: None,
            })
            .map_err(|e| e.into_parts().1)
    }

    fn fd(&self) -> std::io::Result<&AsyncFd<File>> {
        self.fd
            .as_ref()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotConnected))
    }

    /// One read from the port into `into`.
    fn poll_read_port(
        &self,
        cx: &mut Context<'_>,
        into: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let fd = self.fd()?;
        loop {
            let mut guard = ready!(fd.poll_read_ready(cx))?;
            match guard.try_io(|fd| fd.get_ref().read(into)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    /// The new host's auth line, if one came complete on this connection.
    fn next_host_line(&mut self) -> Option<Vec<u8>> {
        let mut line = self.next_host.take()?;
        let end = line.iter().position(|b| *b == b'\n')?;
        line.truncate(end);
        Some(line)
    }
}

impl Drop for SerialPort {
    fn drop(&mut self) {
        // Closed before the listener hears of it and opens it again.
        drop(self.fd.take());
        if let Some(released) = self.released.take() {
            let line = self.next_host_line();
            let _ = released.send(line);
        }
    }
}

impl AsyncRead for SerialPort {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ended {
                return Poll::Ready(Ok(()));
            }
            if let Some(line) = &this.next_host {
                // Read the rest of the new host's line, then end.
                if line.contains(&b'\n') || line.len() > agent::auth::AUTH_LINE_MAX {
                    this.ended = true;
                    continue;
                }
                let mut chunk = [0u8; 128];
                let n = ready!(this.poll_read_port(cx, &mut chunk))?;
                match (n, &mut this.next_host) {
                    (0, _) => {
                        // That host went too.
                        this.next_host = None;
                        this.ended = true;
                    }
                    (n, Some(line)) => line.extend_from_slice(&chunk[..n]),
                    (_, None) => this.ended = true,
                }
                continue;
            }
            let unfilled = buf.initialize_unfilled();
            let n = ready!(this.poll_read_port(cx, unfilled))?;
            if !this.served || n == 0 {
                buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            let ours = this.frames.frames_prefix(&unfilled[..n]);
            if ours < n {
                tracing::info!(
                    "a new host connected before the old one was seen to go: ending the old connection"
                );
                this.next_host = Some(unfilled[ours..n].to_vec());
            }
            if ours > 0 {
                buf.advance(ours);
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncWrite for SerialPort {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.ended || self.next_host.is_some() {
            // The port is the new host's now.
            return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        let fd = self.fd()?;
        loop {
            let mut guard = ready!(fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| fd.get_ref().write(buf)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// What happened to one open of the port.
enum Offer {
    /// The host authenticated: serve it.
    Accepted(SerialPort),
    /// Try again after this long.
    Retry(Duration),
}

/// Opens the port and waits for a host that knows the secret: the one
/// whose auth line `carried` holds (it came on the previous connection), or
/// the next one to write.
async fn offer(path: &Path, secret: &SharedSecret, carried: &mut Option<Vec<u8>>) -> Offer {
    let mut port = match SerialPort::open(path) {
        Ok(port) => port,
        // The previous connection still holds it.
        Err(err) if err.raw_os_error() == Some(libc::EBUSY) => return Offer::Retry(REOPEN_PAUSE),
        Err(err) => {
            tracing::warn!(path = %path.display(), "opening the agent's serial port: {err}");
            return Offer::Retry(NO_HOST_PAUSE);
        }
    };
    let line = match carried.take() {
        Some(line) => Ok(line),
        // No timeout: a host that connects writes its auth line at once,
        // and one that is not there yet costs nothing while we wait for it.
        None => crate::auth::read_line(&mut port).await,
    };
    match line {
        // No host is connected (or it went away before a line).
        Ok(line) if line.is_empty() => Offer::Retry(NO_HOST_PAUSE),
        Ok(line) if secret.accepts(&line) => match port.write_all(agent::SERIAL_OK).await {
            Ok(()) => {
                port.served = true;
                Offer::Accepted(port)
            }
            Err(err) => {
                tracing::warn!("answering on the agent's serial port: {err}");
                Offer::Retry(REOPEN_PAUSE)
            }
        },
        Ok(_) => {
            tracing::warn!("refused a serial connection without the VM's secret");
            Offer::Retry(REOPEN_PAUSE)
        }
        Err(err) => {
            tracing::warn!("reading the agent's serial port: {err}");
            Offer::Retry(NO_HOST_PAUSE)
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
    // Capacity 1: the next open waits until the server took this one (and
    // then fails with EBUSY until the server dropped it).
    let (tx, rx) = tokio::sync::mpsc::channel::<SerialPort>(1);
    tokio::spawn(async move {
        let mut carried = None;
        loop {
            match offer(&path, &secret, &mut carried).await {
                Offer::Accepted(mut port) => {
                    let (released, over) = tokio::sync::oneshot::channel();
                    port.released = Some(released);
                    if tx.send(port).await.is_err() {
                        return; // the server is gone
                    }
                    // Nothing to offer while the server holds the port:
                    // wait for the connection to end rather than poll
                    // the port (every wake-up costs an emulated guest).
                    carried = over.await.unwrap_or_default();
                }
                Offer::Retry(pause) => tokio::time::sleep(pause).await,
            }
        }
    });
    let incoming = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|port| (Ok::<_, std::io::Error>(port), rx))
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

    /// A new host's line on a served connection ends it: its reads give
    /// the frames before the line, then 0; its writes fail; the line goes
    /// to the listener.
    #[tokio::test]
    async fn a_new_hosts_line_ends_the_served_connection_and_is_carried_over() {
        use std::os::unix::net::UnixStream;
        use tokio::io::AsyncReadExt as _;
        let (guest, mut host) = UnixStream::pair().expect("socketpair");
        guest.set_nonblocking(true).expect("nonblocking");
        let mut port =
            SerialPort::from_file(File::from(std::os::fd::OwnedFd::from(guest))).expect("port");
        port.served = true;
        let (released, over) = tokio::sync::oneshot::channel();
        port.released = Some(released);
        let mut sent = frame(b"old request");
        host.write_all(&sent).expect("write");
        host.write_all(b"AUTH 0123").expect("write");
        let mut got = Vec::new();
        let mut buf = [0u8; 7];
        loop {
            let n = port.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.len() == sent.len() {
                // The rest of the line comes later.
                host.write_all(b"abcd\n").expect("write");
            }
        }
        assert_eq!(got, sent);
        assert_eq!(port.read(&mut buf).await.expect("read"), 0, "stays ended");
        let err = port
            .write_all(b"late answer")
            .await
            .expect_err("write fails");
        assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
        drop(port);
        assert_eq!(
            over.await.expect("released"),
            Some(b"AUTH 0123abcd".to_vec())
        );
        // An unserved port (the auth line's own read) is not followed.
        let (guest, mut host) = UnixStream::pair().expect("socketpair");
        guest.set_nonblocking(true).expect("nonblocking");
        let mut port =
            SerialPort::from_file(File::from(std::os::fd::OwnedFd::from(guest))).expect("port");
        sent = b"AUTH x\n".to_vec();
        host.write_all(&sent).expect("write");
        let line = crate::auth::read_line(&mut port).await.expect("line");
        assert_eq!(line, b"AUTH x");
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
