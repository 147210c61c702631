//! Fail points: named places between the steps of a multi-step operation
//! (RunPodSandbox, CreateContainer, and podsandbox's own create steps) where
//! a test makes the operation fail, to prove that a failure — or a crash —
//! at that step leaves nothing behind.
//!
//! Two ways to arm one:
//! - [`FailPoints::error_at`]: the step returns an injected error (unit
//!   tests with the fakes: the rollback path runs);
//! - the environment variable [`CRASH_ENV`]`=<name>`, honoured by debug
//!   builds only: the process SIGKILLs itself at the step, as `kill -9` at
//!   the worst moment would (end-to-end tests: the recovery at the next
//!   start runs). Release builds ignore the variable.

use std::sync::{Arc, Mutex};

/// The variable that makes a debug build kill itself at a fail point.
pub const CRASH_ENV: &str = "VC_CRASH_AT";

/// What an armed point does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Error,
    Crash,
}

/// A set of armed fail points (at most one); cheap to clone, shared.
#[derive(Debug, Clone, Default)]
pub struct FailPoints {
    armed: Arc<Mutex<Option<(String, Action)>>>,
}

/// The error an armed point returns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("injected failure at fail point {point}")]
pub struct Injected {
    pub point: &'static str,
}

impl FailPoints {
    /// Points armed from [`CRASH_ENV`] (debug builds), else none.
    pub fn from_env() -> Self {
        let points = Self::default();
        if cfg!(debug_assertions) {
            if let Some(name) = std::env::var(CRASH_ENV).ok().filter(|n| !n.is_empty()) {
                tracing::warn!(point = %name, "fail point armed: this process kills itself there");
                points.arm(&name, Action::Crash);
            }
        }
        points
    }

    /// Arms `point` to return [`Injected`].
    pub fn error_at(&self, point: &str) {
        self.arm(point, Action::Error);
    }

    /// No point fails any more.
    pub fn disarm(&self) {
        *self.armed.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn arm(&self, point: &str, action: Action) {
        *self.armed.lock().unwrap_or_else(|e| e.into_inner()) = Some((point.to_string(), action));
    }

    /// Passes `point`: nothing unless it is armed.
    pub fn hit(&self, point: &'static str) -> Result<(), Injected> {
        let action = match &*self.armed.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((name, action)) if name == point => *action,
            _ => return Ok(()),
        };
        match action {
            Action::Error => Err(Injected { point }),
            Action::Crash => {
                tracing::warn!(point, "fail point reached: SIGKILL");
                // What `kill -9` does, at exactly this step.
                let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
                // Not reached; if it were, failing the step is the next best thing.
                Err(Injected { point })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_armed_point_fails() {
        let points = FailPoints::default();
        assert_eq!(points.hit("a"), Ok(()));
        points.clone().error_at("a");
        assert_eq!(points.hit("b"), Ok(()));
        assert_eq!(points.hit("a"), Err(Injected { point: "a" }));
    }
}
