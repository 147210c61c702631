//! The sandbox state machine.
//!
//! ```text
//!                create                  start
//!   (none) ───────────────► ready ─────────────────► running ◄───┐
//!      ▲    (VM booted,       │                      │   │       │ resume
//!      │     agent up)        │                pause │   │       │
//!      │                      │                      ▼   │       │
//!      │                      │                    paused ───────┘
//!      │                      │ stop / VM exit       │   │ stop / VM exit
//!      │                      ▼                      │   ▼
//!      └──── delete ────── stopped ◄─────────────────┴── (running: stop / VM exit)
//! ```
//!
//! `creating` exists only while create runs (or after a crash in it); delete
//! finishes such a sandbox. `ready` may be deleted directly (its VM is
//! stopped first); `running` and `paused` must be stopped first.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Creating,
    Ready,
    Running,
    Paused,
    Stopped,
}

/// What is done to a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Create finished: VM booted and agent answered.
    Created,
    Start,
    Pause,
    Resume,
    Stop,
    /// The VM exited without being asked.
    VmExited,
    Delete,
}

impl Action {
    pub fn verb(self) -> &'static str {
        match self {
            Action::Created => "finish creating",
            Action::Start => "start",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Stop => "stop",
            Action::VmExited => "mark exited",
            Action::Delete => "delete",
        }
    }
}

impl SandboxState {
    /// The single transition function: the state after `action`, or `None`
    /// when `action` is not allowed in this state. `Delete` maps to the
    /// state in which the record is removed.
    pub fn next(self, action: Action) -> Option<SandboxState> {
        use Action as A;
        use SandboxState as S;
        match (self, action) {
            (S::Creating, A::Created) => Some(S::Ready),
            (S::Ready, A::Start) => Some(S::Running),
            (S::Running, A::Pause) => Some(S::Paused),
            (S::Paused, A::Resume) => Some(S::Running),
            (S::Creating | S::Ready | S::Running | S::Paused, A::Stop | A::VmExited) => {
                Some(S::Stopped)
            }
            (S::Creating | S::Ready | S::Stopped, A::Delete) => Some(S::Stopped),
            _ => None,
        }
    }

    /// Whether the VM is supposed to be up in this state.
    pub fn vm_expected(self) -> bool {
        matches!(
            self,
            SandboxState::Ready | SandboxState::Running | SandboxState::Paused
        )
    }

    /// A hint for the refusal of `action` in this state.
    pub fn hint(self, action: Action) -> &'static str {
        match (self, action) {
            (SandboxState::Running | SandboxState::Paused, Action::Delete) => " (stop it first)",
            (SandboxState::Stopped, Action::Start | Action::Resume | Action::Pause) => {
                " (a stopped sandbox cannot be restarted; delete it and create a new one)"
            }
            _ => "",
        }
    }
}

impl std::fmt::Display for SandboxState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `pad` honours width and alignment in tables.
        f.pad(match self {
            SandboxState::Creating => "creating",
            SandboxState::Ready => "ready",
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Stopped => "stopped",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{Action as A, SandboxState as S};

    #[test]
    fn the_happy_path() {
        let mut s = S::Creating;
        for (action, want) in [
            (A::Created, S::Ready),
            (A::Start, S::Running),
            (A::Pause, S::Paused),
            (A::Resume, S::Running),
            (A::Stop, S::Stopped),
        ] {
            s = s.next(action).expect("allowed");
            assert_eq!(s, want);
        }
        assert!(s.next(A::Delete).is_some());
    }

    #[test]
    fn refusals() {
        assert_eq!(S::Running.next(A::Delete), None);
        assert_eq!(S::Paused.next(A::Delete), None);
        assert_eq!(S::Stopped.next(A::Start), None);
        assert_eq!(S::Ready.next(A::Pause), None);
        assert_eq!(S::Running.next(A::Start), None);
        assert_eq!(S::Running.next(A::Resume), None);
        assert_eq!(S::Stopped.next(A::Stop), None);
        assert_eq!(S::Stopped.next(A::VmExited), None);
        assert_eq!(S::Running.hint(A::Delete), " (stop it first)");
    }

    #[test]
    fn a_dying_vm_stops_every_live_state() {
        for s in [S::Creating, S::Ready, S::Running, S::Paused] {
            assert_eq!(s.next(A::VmExited), Some(S::Stopped));
        }
    }
}
