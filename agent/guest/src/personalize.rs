//! Personalize (API 8): a VM restored from a template's snapshot resumes
//! with the template's memory, so its kernel RNG state, clock, machine ID
//! and agent secret are those of the template and of every other clone.
//! The host sends fresh ones; [`validate`] checks all of them before
//! [`apply`] changes anything.

use std::{fs, io::Write as _, os::fd::AsRawFd as _, path::Path, time::Duration};

use agent::{protocol::agent as pb, AgentSecret};

use crate::{auth::SharedSecret, container::Failure, network};

/// `_IO('R', 0x07)` of linux/random.h: reseed the CRNG from the input
/// pool now (libc does not name it).
const RNDRESEEDCRNG: libc::Ioctl = 0x5207;

/// Where the machine ID goes (systemd's machine-id(5)).
const MACHINE_ID_DIR: &str = "/etc";

/// A PersonalizeRequest that passed [`validate`].
pub struct Identity {
    entropy: Vec<u8>,
    /// Since the epoch; `None` leaves the clock as it is.
    realtime: Option<Duration>,
    machine_id: String,
    secret: AgentSecret,
}

/// The entropy is what the clone's RNG is seeded with: never printed.
impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("entropy", &format_args!("[{} bytes]", self.entropy.len()))
            .field("realtime", &self.realtime)
            .field("machine_id", &self.machine_id)
            .field("secret", &self.secret)
            .finish()
    }
}

/// Checks every field of `r`; an InvalidArgument names the first bad one
/// (and never echoes the secret).
pub fn validate(r: pb::PersonalizeRequest) -> Result<Identity, Failure> {
    let range = agent::PERSONALIZE_ENTROPY_BYTES;
    if !range.contains(&r.entropy.len()) {
        return Err(Failure::InvalidArgument(format!(
            "entropy: {} bytes, not {}..={}",
            r.entropy.len(),
            range.start(),
            range.end()
        )));
    }
    let realtime = match u64::try_from(r.realtime_ns) {
        Ok(0) => None,
        Ok(ns) => Some(Duration::from_nanos(ns)),
        Err(_) => {
            return Err(Failure::InvalidArgument(format!(
                "realtime_ns: {} is before the epoch",
                r.realtime_ns
            )))
        }
    };
    if !agent::valid_machine_id(&r.machine_id) {
        return Err(Failure::InvalidArgument(
            "machine_id: not 32 lower-case hex digits".into(),
        ));
    }
    // Exactly the hex form: from_hex alone would take whitespace around it.
    let secret = Some(&r.secret)
        .filter(|s| s.len() == 2 * agent::auth::SECRET_BYTES)
        .and_then(|s| AgentSecret::from_hex(s))
        .ok_or_else(|| Failure::InvalidArgument("secret: not 64 hex digits".into()))?;
    Ok(Identity {
        entropy: r.entropy,
        realtime,
        machine_id: r.machine_id,
        secret,
    })
}

/// Applies `id` in this order: the RNG first (what follows may draw on
/// it), then the clock, the machine ID, and last the secret, which the
/// listeners check new connections against from then on.
pub fn apply(id: Identity, secret: &SharedSecret) -> Result<(), Failure> {
    reseed(&id.entropy)?;
    if let Some(since_epoch) = id.realtime {
        set_clock(since_epoch)?;
    }
    write_machine_id(Path::new(MACHINE_ID_DIR), &id.machine_id)?;
    secret.replace(id.secret);
    tracing::info!(machine_id = %id.machine_id, "personalized: RNG reseeded, secret replaced");
    Ok(())
}

fn os_error(what: &str) -> impl FnOnce(std::io::Error) -> Failure + '_ {
    move |e| Failure::Internal(format!("{what}: {e}"))
}

/// Mixes `entropy` into the input pool (uncredited) and makes the CRNG
/// reseed from it at once, instead of at its next scheduled reseed.
fn reseed(entropy: &[u8]) -> Result<(), Failure> {
    let mut urandom = fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(os_error("open /dev/urandom"))?;
    urandom
        .write_all(entropy)
        .map_err(os_error("write /dev/urandom"))?;
    // SAFETY: RNDRESEEDCRNG takes no argument and touches no memory of
    // this process; `urandom` is an open descriptor for the whole call.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) } < 0 {
        let err = std::io::Error::last_os_error();
        // ENODATA: the CRNG is not initialised yet. It is seeded from the
        // pool, which now holds the host's entropy, once it is.
        if err.raw_os_error() != Some(libc::ENODATA) {
            return Err(os_error("RNDRESEEDCRNG")(err));
        }
        tracing::warn!("RNDRESEEDCRNG: the CRNG is not initialised yet");
    }
    Ok(())
}

fn set_clock(since_epoch: Duration) -> Result<(), Failure> {
    let ts = nix::sys::time::TimeSpec::from_duration(since_epoch);
    // SAFETY: clock_settime reads one timespec from a live local.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, ts.as_ref()) } != 0 {
        return Err(os_error("clock_settime")(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// `<dir>/machine-id`, replaced atomically: mode 0444, the ID and a newline.
fn write_machine_id(dir: &Path, id: &str) -> Result<(), Failure> {
    // The initramfs has no /etc of its own.
    fs::create_dir_all(dir).map_err(os_error("create /etc"))?;
    network::write_atomic(&dir.join("machine-id"), format!("{id}\n").as_bytes(), 0o444)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef";

    fn request() -> pb::PersonalizeRequest {
        let mut r = pb::PersonalizeRequest::new();
        r.entropy = vec![7; 64];
        r.realtime_ns = 1_700_000_000_123_456_789;
        r.machine_id = ID.into();
        r.secret = "ab".repeat(32);
        r
    }

    fn refusal(r: pb::PersonalizeRequest) -> String {
        match validate(r) {
            Err(Failure::InvalidArgument(m)) => m,
            other => panic!("not an InvalidArgument: {other:?}"),
        }
    }

    #[test]
    fn a_valid_request_passes() {
        let id = validate(request()).expect("valid");
        assert_eq!(id.entropy.len(), 64);
        assert_eq!(id.realtime, Some(Duration::new(1_700_000_000, 123_456_789)));
        assert_eq!(id.machine_id, ID);
        assert_eq!(
            id.secret,
            AgentSecret::from_hex(&"ab".repeat(32)).expect("hex")
        );
        let mut r = request();
        r.realtime_ns = 0;
        assert_eq!(
            validate(r).expect("valid").realtime,
            None,
            "0 leaves the clock"
        );
        for len in [32, 512] {
            let mut r = request();
            r.entropy = vec![1; len];
            validate(r).expect("a length at a bound");
        }
        let mut r = request();
        r.secret = "AB".repeat(32);
        validate(r).expect("upper-case hex is hex");
    }

    #[test]
    fn each_bad_field_is_named() {
        for len in [0, 31, 513] {
            let mut r = request();
            r.entropy = vec![1; len];
            assert!(refusal(r).starts_with("entropy:"), "{len}");
        }
        let mut r = request();
        r.realtime_ns = -1;
        assert!(refusal(r).starts_with("realtime_ns:"));
        for bad in [
            "",
            &ID[..31],
            &ID.to_uppercase(),
            "g123456789abcdef0123456789abcdef",
        ] {
            let mut r = request();
            r.machine_id = bad.into();
            assert!(refusal(r).starts_with("machine_id:"), "{bad:?}");
        }
        let good = "ab".repeat(32);
        for bad in [
            String::new(),
            good[..62].to_string(),
            format!("{good}\n"),
            format!(" {}", &good[1..]),
            "zz".repeat(32),
        ] {
            let mut r = request();
            r.secret = bad.clone();
            let msg = refusal(r);
            assert!(msg.starts_with("secret:"), "{bad:?}");
            assert!(!msg.contains("abab"), "the message echoes the secret");
        }
        // The first bad field is the one named.
        let mut r = request();
        r.entropy.clear();
        r.secret.clear();
        assert!(refusal(r).starts_with("entropy:"));
    }

    #[test]
    fn debug_shows_neither_the_entropy_nor_the_secret() {
        let text = format!("{:?}", validate(request()).expect("valid"));
        assert!(text.contains("[64 bytes]"), "{text}");
        assert!(!text.contains("7, 7"), "{text}");
        assert!(text.contains("AgentSecret(..)"), "{text}");
    }

    #[test]
    fn the_machine_id_is_replaced_whole_and_read_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let etc = dir.path().join("etc");
        write_machine_id(&etc, ID).expect("first");
        let other = "f".repeat(32);
        write_machine_id(&etc, &other).expect("replaced");
        let path = etc.join("machine-id");
        assert_eq!(
            fs::read_to_string(&path).expect("read"),
            format!("{other}\n")
        );
        let mode = fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o444);
        let names: Vec<_> = fs::read_dir(&etc)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["machine-id"], "no temp file is left");
    }
}
