//! Processes the VM owns, identified so that a recycled PID is never mistaken
//! for them: a PID plus the start time the kernel recorded for it.

use std::{
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use command_fds::{CommandFdExt, FdMapping};
use nix::{sys::signal::Signal, unistd::Pid};
use serde::{Deserialize, Serialize};

use crate::{HypervisorError, Result};

/// A process we started, as persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    pub pid: i32,
    /// Field 22 of /proc/PID/stat: clock ticks after boot at which it started.
    pub start_time: u64,
}

/// What /proc says about a PID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    state: char,
    start_time: u64,
}

/// Parses /proc/PID/stat. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from the last ')'.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // `state` is field 3; start time is field 22, i.e. 19 further on.
    let start_time = fields.nth(18)?.parse().ok()?;
    Some(Stat { state, start_time })
}

fn read_stat(pid: i32) -> Option<Stat> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .as_deref()
        .and_then(parse_stat)
}

impl ProcessRef {
    /// Identifies a live process.
    pub fn of(pid: i32) -> Option<Self> {
        read_stat(pid).map(|s| Self {
            pid,
            start_time: s.start_time,
        })
    }

    /// Whether this very process still runs (a zombie does not).
    pub fn is_alive(&self) -> bool {
        matches!(read_stat(self.pid), Some(s) if s.start_time == self.start_time && !matches!(s.state, 'Z' | 'X'))
    }

    /// Sends `signal` if the process is still this one; a gone process is fine.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        if !self.is_alive() {
            return Ok(());
        }
        match nix::sys::signal::kill(Pid::from_raw(self.pid), signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(source) => Err(HypervisorError::Signal {
                pid: self.pid,
                source,
            }),
        }
    }

    /// Waits until the process is gone; false if it still runs after `timeout`.
    pub async fn wait_gone(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_alive() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Resolves once the process has exited: woken by the kernel through a
    /// pidfd (no polling), which works for processes that are not our
    /// children (a VMM started by an earlier vcrid). The PID is checked to
    /// be this very process after the pidfd is open, so a recycled PID is
    /// never waited for. Falls back to polling where pidfds do not exist.
    pub async fn exited(&self) {
        let Some(pid) = rustix::process::Pid::from_raw(self.pid) else {
            return;
        };
        let fd = match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::NONBLOCK) {
            Ok(fd) => fd,
            // Gone already.
            Err(rustix::io::Errno::SRCH) => return,
            Err(err) => {
                tracing::debug!(pid = self.pid, "pidfd_open: {err}; polling instead");
                return self.poll_until_gone().await;
            }
        };
        if !self.is_alive() {
            return;
        }
        // Deprecated because a caller could close the fd behind tokio's
        // back; this one owns it (an OwnedFd moved in) for its whole life.
        #[allow(deprecated)]
        let registered = tokio::io::unix::AsyncFd::with_interest(fd, tokio::io::Interest::READABLE);
        match registered {
            // A pidfd becomes readable when its process exits (a zombie
            // counts as exited).
            Ok(fd) => {
                let _ = fd.readable().await;
            }
            Err(err) => {
                tracing::debug!(pid = self.pid, "pidfd: {err}; polling instead");
                self.poll_until_gone().await;
            }
        }
    }

    /// [`ProcessRef::exited`] where there is no pidfd to wait on.
    async fn poll_until_gone(&self) {
        while self.is_alive() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns once it is gone.
    pub async fn terminate(&self, grace: Duration) -> Result<()> {
        self.signal(Signal::SIGTERM)?;
        if self.wait_gone(grace).await {
            return Ok(());
        }
        self.kill().await
    }

    /// SIGKILL; returns once it is gone.
    pub async fn kill(&self) -> Result<()> {
        self.signal(Signal::SIGKILL)?;
        // SIGKILL cannot be ignored; the wait is for the kernel to tear down.
        self.wait_gone(Duration::from_secs(5)).await;
        Ok(())
    }
}

/// Sets the nice value of every thread of `pids` (nice is per thread in
/// Linux: threads made later inherit their creator's, earlier ones keep
/// theirs). Threads
/// that went meanwhile are skipped; other failures are logged: a VM at the
/// wrong priority still works.
pub fn set_nice(pids: &[u32], nice: i32) {
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<i32>().ok())
                .and_then(rustix::process::Pid::from_raw)
            else {
                continue;
            };
            match rustix::process::setpriority_process(Some(tid), nice) {
                Ok(()) | Err(rustix::io::Errno::SRCH) => {}
                Err(err) => tracing::warn!(
                    pid,
                    tid = tid.as_raw_nonzero().get(),
                    nice,
                    "setpriority: {err}"
                ),
            }
        }
    }
}

/// Starts `program` in its own process group (so a terminal's Ctrl-C to the
/// caller does not reach it and it outlives the caller), with stdin closed and
/// stdout and stderr appended to `log`. The child is not waited for here:
/// tokio reaps it when it exits while this process lives.
pub fn spawn_detached(program: &Path, args: &[String], log: &Path) -> Result<ProcessRef> {
    spawn_detached_with_fds(program, args, log, Vec::new())
}

/// [`spawn_detached`], and the child also gets each `(fd, number)` of `fds`
/// as descriptor `number` (the parent's copies close when this returns).
pub fn spawn_detached_with_fds(
    program: &Path,
    args: &[String],
    log: &Path,
    fds: Vec<(OwnedFd, i32)>,
) -> Result<ProcessRef> {
    let io_err = |source| HypervisorError::Io {
        action: "open log",
        path: log.to_path_buf(),
        source,
    };
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_err)?;
    let err = out.try_clone().map_err(io_err)?;
    let mut command = tokio::process::Command::new(program);
    command
        .fd_mappings(
            fds.into_iter()
                .map(|(parent_fd, child_fd)| FdMapping {
                    parent_fd,
                    child_fd,
                })
                .collect(),
        )
        .map_err(|e| HypervisorError::Spawn {
            program: program.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
    let child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(|source| HypervisorError::Spawn {
            program: program.display().to_string(),
            source,
        })?;
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .ok_or_else(|| HypervisorError::StartupFailed {
            program: program.display().to_string(),
            detail: "exited at once".into(),
        })?;
    // Read the start time while the child cannot have been reaped yet.
    let process = ProcessRef::of(pid).ok_or_else(|| HypervisorError::StartupFailed {
        program: program.display().to_string(),
        detail: "exited at once".into(),
    })?;
    drop(child);
    Ok(process)
}

/// The last `lines` non-empty lines of a text file, or "" when it cannot be
/// read. If an earlier line matches `headline` (say, the "Kernel panic" line
/// above a long backtrace), it is kept in front, followed by "...".
pub fn tail_with(path: &Path, lines: usize, headline: Option<&str>) -> String {
    // A rotated log's newest part first, then the log: the last window of
    // each, never the whole file (the guest writes the console).
    let mut bytes = end_of(&rotated(path), TAIL_WINDOW);
    bytes.extend(end_of(path, TAIL_WINDOW));
    let text = String::from_utf8_lossy(&bytes);
    let cleaned: Vec<&str> = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty())
        .collect();
    let start = cleaned.len().saturating_sub(lines);
    let mut out = Vec::with_capacity(lines + 2);
    if let Some(needle) = headline {
        if let Some(pos) = cleaned[..start].iter().rposition(|l| l.contains(needle)) {
            out.push(cleaned[pos]);
            out.push("...");
        }
    }
    out.extend_from_slice(&cleaned[start..]);
    out.join("\n")
}

/// The most of a log [`tail_with`] reads, from each of its two files.
const TAIL_WINDOW: u64 = 64 * 1024;

/// Where a log's older part goes when it is rotated: `<log>.1`.
pub fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// The last `window` bytes of a file (empty if it cannot be read).
fn end_of(path: &Path, window: u64) -> Vec<u8> {
    use std::io::{Read as _, Seek as _};
    let Ok(mut file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if file
        .seek(std::io::SeekFrom::Start(len.saturating_sub(window)))
        .is_err()
    {
        return Vec::new();
    }
    let mut out = Vec::new();
    let _ = file.take(window).read_to_end(&mut out);
    out
}

/// If the log at `path` holds more than `max` bytes, keeps its newest
/// quarter in [`rotated`] (replacing the last one) and truncates it; its
/// writer appends (O_APPEND), so it writes on at the new end. Returns
/// whether it rotated. What is written between the copy and the
/// truncation is lost, as with logrotate's copytruncate.
pub fn rotate_if_over(path: &Path, max: u64) -> std::io::Result<bool> {
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= max {
        return Ok(false);
    }
    let keep = end_of(path, (max / 4).max(1));
    let older = rotated(path);
    let staging = {
        let mut name = older.as_os_str().to_owned();
        name.push(".tmp");
        PathBuf::from(name)
    };
    std::fs::write(&staging, &keep)?;
    std::fs::rename(&staging, &older)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(0)?;
    Ok(true)
}

/// The last `lines` non-empty lines of a text file.
pub fn tail(path: &Path, lines: usize) -> String {
    tail_with(path, lines, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_of_a_process_is_reniced() {
        let mut child = std::process::Command::new("/bin/sleep")
            .arg("30")
            .spawn()
            .expect("spawn");
        let pid = child.id();
        super::set_nice(&[pid], 7);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let _ = child.kill();
        let _ = child.wait();
        // Field 19 (nice), after the command name in parentheses.
        let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        let nice: Vec<&str> = after.split_whitespace().collect();
        assert_eq!(nice.get(16).copied(), Some("7"), "{stat}");
    }

    #[test]
    fn stat_parses_names_with_spaces_and_parens() {
        let text = "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 3 0 98765 1000 200";
        assert_eq!(
            parse_stat(text),
            Some(Stat {
                state: 'S',
                start_time: 98765
            })
        );
    }

    #[test]
    fn a_log_over_its_cap_is_rotated_and_its_tail_reads_both_parts() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("console.log");
        let mut writer = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open");
        for i in 0..2000 {
            writeln!(writer, "line {i}").expect("write");
        }
        assert!(
            !rotate_if_over(&log, 1 << 20).expect("small"),
            "under the cap"
        );
        assert!(rotate_if_over(&log, 4096).expect("rotate"));
        assert_eq!(std::fs::metadata(&log).expect("log").len(), 0);
        let older = std::fs::read_to_string(rotated(&log)).expect("rotated");
        assert!(
            older.len() <= 1024 && older.ends_with("line 1999\n"),
            "{older}"
        );
        // The writer appends at the new end, not at its old offset.
        writeln!(writer, "after").expect("write");
        assert_eq!(std::fs::read_to_string(&log).expect("log"), "after\n");
        assert_eq!(tail(&log, 2), "line 1999\nafter");
        assert!(!rotate_if_over(&dir.path().join("none"), 1).expect("missing"));
    }

    #[test]
    fn stat_rejects_garbage() {
        assert_eq!(parse_stat("1234 (x) S 1"), None);
        assert_eq!(parse_stat(""), None);
    }

    #[test]
    fn self_is_alive_and_a_wrong_start_time_is_not() {
        let me = ProcessRef::of(std::process::id() as i32).expect("own stat");
        assert!(me.is_alive());
        let impostor = ProcessRef {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!impostor.is_alive());
        // Signalling a process that is not ours is a no-op, not an error.
        impostor.signal(Signal::SIGKILL).expect("no-op");
    }

    #[test]
    fn tail_keeps_last_nonempty_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        std::fs::write(&path, "a\r\nb\n\nc\nd\n").expect("write");
        assert_eq!(tail(&path, 2), "c\nd");
        assert_eq!(tail(&path, 10), "a\nb\nc\nd");
        assert_eq!(tail(&dir.path().join("missing"), 3), "");
        std::fs::write(&path, "boot\nKernel panic - not syncing: VFS\nx\ny\nz\n").expect("write");
        assert_eq!(
            tail_with(&path, 2, Some("Kernel panic")),
            "Kernel panic - not syncing: VFS\n...\ny\nz"
        );
        assert_eq!(
            tail_with(&path, 4, Some("Kernel panic")),
            "Kernel panic - not syncing: VFS\nx\ny\nz"
        );
    }

    #[tokio::test]
    async fn detached_child_is_terminated_and_reaped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = spawn_detached(
            Path::new("/bin/sleep"),
            &["30".into()],
            &dir.path().join("log"),
        )
        .expect("spawn");
        assert!(p.is_alive());
        p.terminate(Duration::from_secs(2))
            .await
            .expect("terminate");
        assert!(!p.is_alive());
    }

    #[tokio::test]
    async fn exited_wakes_on_the_exit_of_a_process() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = spawn_detached(
            Path::new("/bin/sleep"),
            &["30".into()],
            &dir.path().join("log"),
        )
        .expect("spawn");
        let waiter = tokio::spawn(async move { p.exited().await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished(), "the process still runs");
        p.signal(Signal::SIGKILL).expect("kill");
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("woken by the exit")
            .expect("join");
        // A process that is gone resolves at once.
        tokio::time::timeout(Duration::from_secs(1), p.exited())
            .await
            .expect("gone already");
    }
}
