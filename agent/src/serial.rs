//! The serial port's handshake (see [`crate::SERIAL_PORT_NAME`]).
//!
//! The host starts a connection with its hello, the auth line plus a nonce
//! (`AUTH <secret hex> <nonce>\n`), and the agent answers `OK <nonce>\n`.
//! The port does not tell the guest which host a line came from: a host
//! that gave up waiting (its dial timed out) leaves its line in the port,
//! and the agent answers it once it reads it, when the port may be another
//! host's. The nonce lets a host tell its own answer from such a one.

use crate::auth::{AgentSecret, AUTH_LINE_MAX};

/// The longest nonce the agent takes (hex digits).
pub const NONCE_MAX: usize = 32;

/// The longest hello the agent reads (with its newline).
pub const HELLO_LINE_MAX: usize = AUTH_LINE_MAX + 1 + NONCE_MAX;

/// The host's hello.
pub fn hello_line(secret: &AgentSecret, nonce: &str) -> String {
    format!("AUTH {} {nonce}\n", secret.to_hex())
}

/// A nonce no other dial of this process has used: a counter, the PID and
/// the time (unique, not secret: the secret authenticates).
pub fn new_nonce() -> String {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:08x}{:08x}{n:x}", std::process::id(), nanos)
        .chars()
        .take(NONCE_MAX)
        .collect()
}

/// A hello (without its newline) as its auth line and nonce; `None` when
/// the nonce is malformed. A hello without a nonce (a host from before
/// nonces) is answered `OK`.
pub fn split_hello(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let auth_len = line
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b' ')
        .nth(1)
        .map_or(line.len(), |(i, _)| i);
    let (auth, rest) = line.split_at(auth_len);
    let nonce = rest.strip_prefix(b" ").unwrap_or(rest);
    let good = nonce.len() <= NONCE_MAX && nonce.iter().all(u8::is_ascii_hexdigit);
    good.then_some((auth, nonce))
}

/// The agent's answer to an accepted hello with `nonce`.
pub fn answer(nonce: &[u8]) -> Vec<u8> {
    let mut out = b"OK".to_vec();
    if !nonce.is_empty() {
        out.push(b' ');
        out.extend_from_slice(nonce);
    }
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hello_is_split_answered_and_checked() {
        let secret = AgentSecret::generate().expect("random");
        let nonce = new_nonce();
        assert!(!nonce.is_empty() && nonce.len() <= NONCE_MAX, "{nonce}");
        assert_ne!(nonce, new_nonce(), "each dial its own");
        let hello = hello_line(&secret, &nonce);
        assert!(hello.len() <= HELLO_LINE_MAX, "{}", hello.len());
        let (auth, got) = split_hello(hello.trim_end().as_bytes()).expect("well formed");
        assert!(secret.accepts(auth));
        assert_eq!(got, nonce.as_bytes());
        assert_eq!(answer(got), format!("OK {nonce}\n").into_bytes());
        // A host from before nonces.
        let old = secret.auth_line();
        let (auth, got) = split_hello(old.trim_end().as_bytes()).expect("well formed");
        assert!(secret.accepts(auth));
        assert_eq!(answer(got), b"OK\n");
        // Malformed nonces are refused.
        for bad in [
            " zz",
            " 0123 45",
            &format!(" {}", "0".repeat(NONCE_MAX + 1)),
        ] {
            let line = format!("{}{bad}", old.trim_end());
            assert!(split_hello(line.as_bytes()).is_none(), "{line}");
        }
    }
}
