//! The agent's authentication of the host.
//!
//! Every connection to the agent's ports ([`crate::AGENT_VSOCK_PORT`],
//! [`crate::FORWARD_VSOCK_PORT`]) starts with one line, `AUTH <hex>\n`,
//! carrying the VM's secret: 32 random bytes the host makes for each VM and
//! hands the guest out of band, as a QEMU fw_cfg file
//! ([`SECRET_FW_CFG_NAME`]; the command line names the file, never the
//! secret). The agent also accepts connections from the host's context ID
//! only, so neither another VM nor a process of this guest reaches it; the
//! secret keeps out a host user who can open a kernel vsock socket (any
//! user, wherever `/dev/vhost-vsock` exists).

use std::time::Duration;

/// The fw_cfg file that carries the secret (QEMU wants `opt/<domain>/…`).
pub const SECRET_FW_CFG_NAME: &str = "opt/io.virtcontainers/agent-secret";

/// Bytes of randomness in a secret.
pub const SECRET_BYTES: usize = 32;

/// The longest authentication line the agent reads (`AUTH ` + 64 hex + `\n`).
pub const AUTH_LINE_MAX: usize = 5 + 2 * SECRET_BYTES + 1;

/// How long a connection may take to authenticate.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(5);

/// A VM's agent secret. Never printed: `Debug` says only that it is one.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentSecret([u8; SECRET_BYTES]);

impl std::fmt::Debug for AgentSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentSecret(..)")
    }
}

impl AgentSecret {
    /// A new secret from the kernel's random source.
    pub fn generate() -> std::io::Result<Self> {
        use std::io::Read as _;
        let mut bytes = [0u8; SECRET_BYTES];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(Self(bytes))
    }

    /// Parses the hex form ([`AgentSecret::to_hex`]); surrounding
    /// whitespace is allowed (a file may end in a newline).
    pub fn from_hex(text: &str) -> Option<Self> {
        let text = text.trim().as_bytes();
        if text.len() != 2 * SECRET_BYTES {
            return None;
        }
        let mut bytes = [0u8; SECRET_BYTES];
        for (byte, pair) in bytes.iter_mut().zip(text.chunks_exact(2)) {
            *byte = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
        }
        Some(Self(bytes))
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        use std::fmt::Write as _;
        self.0.iter().fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    /// The line a connection starts with.
    pub fn auth_line(&self) -> String {
        format!("AUTH {}\n", self.to_hex())
    }

    /// Whether `line` (without its newline) is this secret's authentication
    /// line; compares in constant time.
    pub fn accepts(&self, line: &[u8]) -> bool {
        let Some(hex) = line.strip_prefix(b"AUTH ") else {
            return false;
        };
        let Some(theirs) = std::str::from_utf8(hex).ok().and_then(Self::from_hex) else {
            return false;
        };
        self.0
            .iter()
            .zip(theirs.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_acceptance() {
        let s = AgentSecret::generate().expect("random");
        let hex = s.to_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(AgentSecret::from_hex(&format!("{hex}\n")), Some(s.clone()));
        let line = s.auth_line();
        assert!(s.accepts(line.trim_end().as_bytes()));
        let other = AgentSecret::generate().expect("random");
        assert_ne!(s, other);
        assert!(!other.accepts(line.trim_end().as_bytes()));
        assert!(!s.accepts(b"AUTH "));
        assert!(!s.accepts(hex.as_bytes()), "the prefix is required");
        assert!(!s.accepts(format!("AUTH {}", &hex[..62]).as_bytes()));
        assert!(AgentSecret::from_hex(&"g".repeat(64)).is_none());
        assert_eq!(format!("{s:?}"), "AgentSecret(..)");
        assert_eq!(line.len(), AUTH_LINE_MAX);
    }
}
