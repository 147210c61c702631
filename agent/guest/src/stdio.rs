//! Stdio of container processes: pipes or a terminal, read and written by
//! the host through ReadStdout / ReadStderr / WriteStdin / CloseStdin /
//! TtyWinResize.
//!
//! Transport choice: the streams ride the ttrpc connection the host already
//! has (one call per chunk, up to 1 MiB each) rather than extra vsock ports
//! per stream. One connection means one place for flow control and no port
//! bookkeeping; the cost is a round trip per chunk (measured in the issue 3
//! note).

use std::{
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tokio::io::unix::AsyncFd;

use crate::container::Failure;

type Result<T> = std::result::Result<T, Failure>;

fn internal(what: &str, err: impl std::fmt::Display) -> Failure {
    Failure::Internal(format!("{what}: {err}"))
}

/// A non-blocking file descriptor (pipe end or terminal master) driven by
/// tokio.
#[derive(Debug)]
pub struct Stream {
    fd: AsyncFd<OwnedFd>,
}

impl Stream {
    fn new(fd: OwnedFd) -> Result<Self> {
        let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(|e| internal("fcntl", e))?;
        fcntl(
            fd.as_raw_fd(),
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
        )
        .map_err(|e| internal("fcntl", e))?;
        // SAFETY: an OwnedFd stays open and keeps its descriptor number for
        // as long as it is owned, here by the AsyncFd.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| internal("register fd", e))?;
        Ok(Self { fd })
    }

    /// Up to `buf.len()` bytes; 0 at the end. A terminal whose other side
    /// is closed reports EIO: that is its end too.
    pub async fn read(&self, buf: &mut [u8]) -> Result<usize> {
        loop {
            let mut guard = self.fd.readable().await.map_err(|e| internal("poll", e))?;
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_raw_fd(), buf).map_err(std::io::Error::from)
            }) {
                Ok(Ok(n)) => return Ok(n),
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(internal("read", e)),
                Err(_would_block) => continue,
            }
        }
    }

    pub async fn write_all(&self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await.map_err(|e| internal("poll", e))?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(Into::into)) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    return Err(Failure::FailedPrecondition(
                        "stdin is closed: the process has exited or closed it".into(),
                    ))
                }
                Ok(Err(e)) => return Err(internal("write", e)),
                Err(_would_block) => {}
            }
        }
        Ok(())
    }

    fn raw(&self) -> RawFd {
        self.fd.get_ref().as_raw_fd()
    }
}

/// The agent's ends of one process's stdio.
#[derive(Debug, Default)]
pub struct ProcessIo {
    pub stdout: Option<Arc<Stream>>,
    /// None with a terminal: its output is all on stdout.
    pub stderr: Option<Arc<Stream>>,
    /// None unless stdin was asked for, and once closed.
    pub stdin: Option<Arc<Stream>>,
    /// The terminal master, for window size changes.
    pub terminal: Option<Arc<Stream>>,
}

impl ProcessIo {
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        let Some(master) = &self.terminal else {
            return Err(Failure::FailedPrecondition(
                "the process has no terminal".into(),
            ));
        };
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which
        // points at a live local; the fd is owned by `master`.
        if unsafe { libc::ioctl(master.raw(), libc::TIOCSWINSZ, &size) } < 0 {
            return Err(internal("TIOCSWINSZ", std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// The child's ends, handed to libcontainer.
#[derive(Debug)]
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Stdio before the process exists: pipes, or a console socket on which
/// libcontainer will send the terminal's master.
#[derive(Debug)]
pub enum Pending {
    Pipes(ProcessIo),
    /// The console socket, and whether stdin stays open.
    Terminal(ConsoleSocket, bool),
}

impl Pending {
    /// Once the process is built: the agent's ends.
    pub fn finish(self) -> Result<ProcessIo> {
        match self {
            Pending::Pipes(io) => Ok(io),
            Pending::Terminal(socket, stdin) => {
                let master = socket.receive()?;
                let stdin = if stdin {
                    let dup = master
                        .try_clone()
                        .map_err(|e| internal("dup terminal", e))?;
                    Some(Arc::new(Stream::new(dup)?))
                } else {
                    None
                };
                let master = Arc::new(Stream::new(master)?);
                Ok(ProcessIo {
                    stdout: Some(master.clone()),
                    stderr: None,
                    stdin,
                    terminal: Some(master),
                })
            }
        }
    }
}

/// Sets up stdio for a new process: a terminal (returns the console socket
/// path libcontainer must connect to) or pipes (returns the child's ends).
pub fn prepare(
    terminal: bool,
    stdin: bool,
) -> Result<(Pending, Option<PathBuf>, Option<ChildStdio>)> {
    if terminal {
        let socket = ConsoleSocket::bind()?;
        let path = socket.path.clone();
        return Ok((Pending::Terminal(socket, stdin), Some(path), None));
    }
    let (stdout_r, stdout) = pipe()?;
    let (stderr_r, stderr) = pipe()?;
    let (stdin_w, child_stdin) = if stdin {
        let (r, w) = pipe()?;
        (Some(Arc::new(Stream::new(w)?)), r)
    } else {
        let null = std::fs::File::open("/dev/null").map_err(|e| internal("/dev/null", e))?;
        (None, null.into())
    };
    let io = ProcessIo {
        stdout: Some(Arc::new(Stream::new(stdout_r)?)),
        stderr: Some(Arc::new(Stream::new(stderr_r)?)),
        stdin: stdin_w,
        terminal: None,
    };
    Ok((
        Pending::Pipes(io),
        None,
        Some(ChildStdio {
            stdin: child_stdin,
            stdout,
            stderr,
        }),
    ))
}

/// (read end, write end), both close-on-exec (libcontainer dups the
/// child's ends onto 0, 1, 2).
fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| internal("pipe", e))?;
    // 1 MiB instead of 64 KiB: fewer, larger reads per host round trip.
    // Best effort (the limit is /proc/sys/fs/pipe-max-size).
    let _ = fcntl(r.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
    Ok((r, w))
}

const PIPE_SIZE: i32 = 1 << 20;

const CONSOLE_DIR: &str = "/run/vc/console";

/// A listening unix socket for libcontainer's console-socket protocol: the
/// container process sends the terminal master over it (SCM_RIGHTS).
#[derive(Debug)]
pub struct ConsoleSocket {
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
}

impl ConsoleSocket {
    fn bind() -> Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        std::fs::create_dir_all(CONSOLE_DIR).map_err(|e| internal("mkdir console dir", e))?;
        let path =
            Path::new(CONSOLE_DIR).join(format!("{}.sock", NEXT.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path)
            .map_err(|e| internal("console socket", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| internal("console socket", e))?;
        Ok(Self { listener, path })
    }

    /// The master libcontainer sent; called after the process was built
    /// (it connected and sent during the build), so waiting is short.
    fn receive(self) -> Result<OwnedFd> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match self.listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(internal("console socket", "no connection"));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(internal("console socket accept", e)),
            }
        };
        stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(Duration::from_secs(10))))
            .map_err(|e| internal("console socket", e))?;
        let mut name = [0u8; 64];
        let mut iov = [std::io::IoSliceMut::new(&mut name)];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let msg = nix::sys::socket::recvmsg::<()>(
            stream.as_fd().as_raw_fd(),
            &mut iov,
            Some(&mut space),
            nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| internal("console socket recvmsg", e))?;
        let mut received = None;
        for cmsg in msg.cmsgs().map_err(|e| internal("console socket", e))? {
            if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = cmsg {
                for fd in fds {
                    // SAFETY: SCM_RIGHTS just installed `fd` in this
                    // process; nothing else owns it.
                    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                    received.get_or_insert(owned);
                }
            }
        }
        received.ok_or_else(|| internal("console socket", "no terminal was sent"))
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
