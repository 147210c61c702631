//! Single-use, expiring tokens for the streaming URLs (kubelet's request cache).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{AttachRequest, Error, ExecRequest, PortForwardRequest, Result};

/// A stored request; its variant is the URL path it is valid on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Pending {
    Exec(ExecRequest),
    Attach(AttachRequest),
    PortForward(PortForwardRequest),
}

impl Pending {
    pub(crate) fn path(&self) -> &'static str {
        match self {
            Pending::Exec(_) => "exec",
            Pending::Attach(_) => "attach",
            Pending::PortForward(_) => "portforward",
        }
    }
}

/// Random bytes per token (kubelet uses 8; more costs nothing).
const TOKEN_BYTES: usize = 16;

#[derive(Debug)]
pub(crate) struct TokenCache {
    ttl: Duration,
    max_in_flight: usize,
    entries: Mutex<HashMap<String, (Pending, Instant)>>,
}

impl TokenCache {
    pub(crate) fn new(ttl: Duration, max_in_flight: usize) -> Self {
        Self {
            ttl,
            max_in_flight,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Stores `req` under a new token.
    pub(crate) fn insert(&self, req: Pending) -> Result<String> {
        let mut raw = [0u8; TOKEN_BYTES];
        getrandom::fill(&mut raw).map_err(|e| Error::Random {
            reason: e.to_string(),
        })?;
        let token = data_encoding::BASE64URL_NOPAD.encode(&raw);
        let now = Instant::now();
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.retain(|_, (_, expires)| *expires > now);
        if entries.len() >= self.max_in_flight {
            return Err(Error::TooManyInFlight {
                in_flight: entries.len(),
            });
        }
        entries.insert(token.clone(), (req, now + self.ttl));
        Ok(token)
    }

    /// Takes the request of `token` if it exists, is unexpired and is for `path`. The token is
    /// gone afterwards either way.
    pub(crate) fn consume(&self, path: &str, token: &str) -> Option<Pending> {
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (req, expires) = entries.remove(token)?;
        (expires > Instant::now() && req.path() == path).then_some(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec() -> Pending {
        Pending::Exec(ExecRequest {
            container_id: "c".into(),
            cmd: vec!["true".into()],
            stdout: true,
            ..Default::default()
        })
    }

    #[test]
    fn tokens_are_single_use_url_safe_and_distinct() {
        let cache = TokenCache::new(Duration::from_secs(60), 10);
        let a = cache.insert(exec()).unwrap();
        let b = cache.insert(exec()).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 22);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_eq!(cache.consume("exec", &a), Some(exec()));
        assert_eq!(cache.consume("exec", &a), None);
        // The wrong path burns the token too.
        assert_eq!(cache.consume("attach", &b), None);
        assert_eq!(cache.consume("exec", &b), None);
        assert_eq!(cache.consume("exec", "nonsense"), None);
    }

    #[test]
    fn expired_tokens_are_gone() {
        let cache = TokenCache::new(Duration::ZERO, 10);
        let a = cache.insert(exec()).unwrap();
        assert_eq!(cache.consume("exec", &a), None);
    }

    #[test]
    fn in_flight_tokens_are_bounded() {
        let cache = TokenCache::new(Duration::from_secs(60), 2);
        cache.insert(exec()).unwrap();
        cache.insert(exec()).unwrap();
        let e = cache.insert(exec()).unwrap_err();
        assert_eq!(e.kind(), crate::streaming::ErrorKind::Unavailable);
    }
}
