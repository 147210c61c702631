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
    fd: AsyncFd<File>,
    /// Dropped with the port (after `fd`, so the port is closed by then):
    /// tells the listener the connection is over.
    released: Option<tokio::sync::oneshot::Sender<()>>,
}

impl SerialPort {
    fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)?;
        // SAFETY: `file` owns its descriptor, which stays open and the
        // same for as long as the AsyncFd (its only owner) exists.
        unsafe { AsyncFd::register(file) }
            .map(|fd| Self { fd, released: None })
            .map_err(|e| e.into_parts().1)
    }
}

impl AsyncRead for SerialPort {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| fd.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(err)) => return Poll::Ready(Err(err)),
                Err(_would_block) => continue,
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
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
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

/// Opens the port and waits for a host that knows the secret.
async fn offer(path: &Path, secret: &SharedSecret) -> Offer {
    let mut port = match SerialPort::open(path) {
        Ok(port) => port,
        // The previous connection still holds it.
        Err(err) if err.raw_os_error() == Some(libc::EBUSY) => return Offer::Retry(REOPEN_PAUSE),
        Err(err) => {
            tracing::warn!(path = %path.display(), "opening the agent's serial port: {err}");
            return Offer::Retry(NO_HOST_PAUSE);
        }
    };
    // No timeout: a host that connects writes its auth line at once, and
    // one that is not there yet costs nothing while we wait for it.
    match crate::auth::read_line(&mut port).await {
        // No host is connected (or it went away before a line).
        Ok(line) if line.is_empty() => Offer::Retry(NO_HOST_PAUSE),
        Ok(line) if secret.accepts(&line) => match port.write_all(agent::SERIAL_OK).await {
            Ok(()) => Offer::Accepted(port),
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
        loop {
            match offer(&path, &secret).await {
                Offer::Accepted(mut port) => {
                    let (released, over) = tokio::sync::oneshot::channel();
                    port.released = Some(released);
                    if tx.send(port).await.is_err() {
                        return; // the server is gone
                    }
                    // Nothing to offer while the server holds the port:
                    // wait for the connection to end rather than poll
                    // the port (every wake-up costs an emulated guest).
                    let _ = over.await;
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
