//! Container logs in the CRI format, one line per record:
//!
//! ```text
//! 2016-10-06T00:17:09.669794202Z stdout F a full line
//! 2016-10-06T00:17:09.669794202Z stderr P the first 16 KiB of a very long l
//! ```
//!
//! `F` ends a line, `P` is part of one that continues in the next record (a
//! line longer than [`MAX_LINE`]). Output that ends without a newline is
//! written as a full line when its stream closes, so nothing printed just
//! before exit is lost. The file can be reopened after a rotation.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

/// Longest record body; longer lines are split into `P` records.
pub const MAX_LINE: usize = 16 * 1024;

/// Which stream a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// The log file of one container, shared by its streams.
#[derive(Debug, Clone)]
pub struct LogFile {
    path: PathBuf,
    file: Arc<Mutex<File>>,
}

impl LogFile {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            path: path.to_path_buf(),
            file: Arc::new(Mutex::new(open_append(path)?)),
        })
    }

    /// Reopens the path (after the log was rotated away).
    pub fn reopen(&self) -> std::io::Result<()> {
        let fresh = open_append(&self.path)?;
        *self.file.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// A line splitter writing `stream`'s records to this file.
    pub fn stream(&self, stream: Stream) -> LogStream {
        LogStream {
            file: self.clone(),
            stream,
            pending: Vec::new(),
        }
    }

    fn record(&self, stream: Stream, tag: char, body: &[u8]) -> std::io::Result<()> {
        let mut line = Vec::with_capacity(body.len() + 48);
        line.extend_from_slice(rfc3339_nanos(SystemTime::now()).as_bytes());
        line.push(b' ');
        line.extend_from_slice(stream.name().as_bytes());
        line.push(b' ');
        line.push(tag as u8);
        line.push(b' ');
        line.extend_from_slice(body);
        line.push(b'\n');
        // One write per record, under the lock: records never interleave.
        self.file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_all(&line)
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

/// Splits one stream's bytes into records.
#[derive(Debug)]
pub struct LogStream {
    file: LogFile,
    stream: Stream,
    pending: Vec<u8>,
}

impl LogStream {
    /// Takes the next chunk of output.
    pub fn push(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while let Some(pos) = data.iter().position(|&b| b == b'\n') {
            self.pending.extend_from_slice(&data[..pos]);
            self.flush_full_line()?;
            data = &data[pos + 1..];
        }
        self.pending.extend_from_slice(data);
        while self.pending.len() > MAX_LINE {
            let rest = self.pending.split_off(MAX_LINE);
            self.file.record(self.stream, 'P', &self.pending)?;
            self.pending = rest;
        }
        Ok(())
    }

    /// The stream closed: whatever is left is a full line.
    pub fn finish(mut self) -> std::io::Result<()> {
        if !self.pending.is_empty() {
            self.flush_full_line()?;
        }
        Ok(())
    }

    fn flush_full_line(&mut self) -> std::io::Result<()> {
        let body = std::mem::take(&mut self.pending);
        let mut chunks = body.chunks(MAX_LINE).peekable();
        if chunks.peek().is_none() {
            return self.file.record(self.stream, 'F', b"");
        }
        while let Some(chunk) = chunks.next() {
            let tag = if chunks.peek().is_some() { 'P' } else { 'F' };
            self.file.record(self.stream, tag, chunk)?;
        }
        Ok(())
    }
}

/// `2016-10-06T00:17:09.669794202Z`.
pub fn rfc3339_nanos(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps() {
        let t = UNIX_EPOCH + Duration::new(1_475_713_029, 669_794_202);
        assert_eq!(rfc3339_nanos(t), "2016-10-06T00:17:09.669794202Z");
        assert_eq!(rfc3339_nanos(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(&rfc3339_nanos(leap)[..10], "2000-02-29");
    }

    fn records(path: &Path) -> Vec<(String, String, String)> {
        std::fs::read_to_string(path)
            .expect("read")
            .lines()
            .map(|l| {
                let mut parts = l.splitn(4, ' ');
                let ts = parts.next().expect("ts");
                assert!(ts.ends_with('Z') && ts.len() == 30, "{ts}");
                (
                    parts.next().expect("stream").to_string(),
                    parts.next().expect("tag").to_string(),
                    parts.next().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn lines_partials_and_the_tail_at_exit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.log");
        let log = LogFile::open(&path).expect("open");
        let mut out = log.stream(Stream::Stdout);
        let mut err = log.stream(Stream::Stderr);
        out.push(b"hel").expect("push");
        out.push(b"lo\nworld\n\nno newline").expect("push");
        err.push(b"oops\n").expect("push");
        out.finish().expect("finish");
        err.finish().expect("finish");
        let r = records(&path);
        let want = [
            ("stdout", "F", "hello"),
            ("stdout", "F", "world"),
            ("stdout", "F", ""),
            ("stderr", "F", "oops"),
            ("stdout", "F", "no newline"),
        ];
        assert_eq!(r.len(), want.len(), "{r:?}");
        for (got, want) in r.iter().zip(want) {
            assert_eq!((got.0.as_str(), got.1.as_str(), got.2.as_str()), want);
        }
    }

    #[test]
    fn long_lines_are_cut_into_partial_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.log");
        let log = LogFile::open(&path).expect("open");
        let mut out = log.stream(Stream::Stdout);
        let long = vec![b'x'; MAX_LINE * 2 + 10];
        out.push(&long).expect("push");
        out.push(b"\n").expect("push");
        // The same, arriving in one chunk with its newline.
        let mut one = long.clone();
        one.push(b'\n');
        out.push(&one).expect("push");
        out.finish().expect("finish");
        let r = records(&path);
        let tags: Vec<&str> = r.iter().map(|x| x.1.as_str()).collect();
        assert_eq!(tags, ["P", "P", "F", "P", "P", "F"]);
        assert_eq!(r.iter().map(|x| x.2.len()).sum::<usize>(), 2 * long.len());
    }

    #[test]
    fn reopen_follows_a_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.log");
        let log = LogFile::open(&path).expect("open");
        let mut out = log.stream(Stream::Stdout);
        out.push(b"before\n").expect("push");
        std::fs::rename(&path, dir.path().join("c.log.1")).expect("rotate");
        log.reopen().expect("reopen");
        out.push(b"after\n").expect("push");
        assert_eq!(records(&path)[0].2, "after");
        assert_eq!(records(&dir.path().join("c.log.1"))[0].2, "before");
    }
}
