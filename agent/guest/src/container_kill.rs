//! Signals to a container's init process: libcontainer's kill, without its
//! race with the init's own exit.
//!
//! `Container::kill` first looks at the init (`refresh_status`): it opens
//! `/proc/<pid>`, then reads `/proc/<pid>/stat`. An init that the reaper
//! collects between the two fails the kill with "File not found:
//! /proc/<pid>/stat", and the kill does nothing. A stop with a short grace
//! period walks into that window: its SIGKILL follows the SIGTERM by a few
//! milliseconds, about when the init that SIGTERM ended is reaped, and
//! StopContainer failed with "the agent refused signal: signal: File not
//! found: /proc/133/stat".
//!
//! An init that has ended has nothing left to signal (its status comes
//! through WaitProcess), so a failed kill is looked at again: if the init
//! has ended, a signal to it alone has done its job, as one to an exec that
//! is gone does (ESRCH); a signal to all the container's processes is sent
//! once more, now through libcontainer's stopped-container path, which
//! signals whatever is left in the cgroup. A live init keeps the error.

use libcontainer::{
    container::{Container, ContainerStatus},
    error::LibcontainerError,
};
use nix::sys::signal::Signal;

/// What a signal needs of a container: libcontainer's, or a fake in tests.
pub trait Killable {
    /// libcontainer's kill: `signal` to the init, or to every process of
    /// the container's cgroup (`all`).
    fn kill(&mut self, signal: Signal, all: bool) -> Result<(), LibcontainerError>;
    /// Whether the init has exited (a zombie, or reaped), looked at afresh.
    fn ended(&mut self) -> bool;
}

impl Killable for Container {
    fn kill(&mut self, signal: Signal, all: bool) -> Result<(), LibcontainerError> {
        Container::kill(self, signal, all)
    }

    fn ended(&mut self) -> bool {
        // The init gone by now, refresh_status finds no /proc/<pid> (or a
        // zombie's): Stopped. Its own error would be the same race again,
        // which a reaped PID cannot run twice: then the first error stands.
        self.refresh_status().is_ok() && self.status() == ContainerStatus::Stopped
    }
}

/// Sends `signal` to the init of `container` (or to all its processes),
/// tolerating the init's exit meanwhile (see the module's comment).
pub fn signal_init(
    container: &mut impl Killable,
    signal: Signal,
    all: bool,
) -> Result<(), LibcontainerError> {
    let Err(err) = container.kill(signal, all) else {
        return Ok(());
    };
    if !container.ended() {
        return Err(err);
    }
    tracing::debug!(?signal, all, "the init ended while it was signalled: {err}");
    if all {
        container.kill(signal, all)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// A container whose kills answer from a script and whose init ends
    /// when told; records the kills it was asked for.
    #[derive(Default)]
    struct Fake {
        answers: VecDeque<Result<(), LibcontainerError>>,
        ended: bool,
        kills: Vec<(Signal, bool)>,
        looked: usize,
    }

    impl Fake {
        fn answering(answers: Vec<Result<(), LibcontainerError>>, ended: bool) -> Self {
            Self {
                answers: answers.into(),
                ended,
                ..Self::default()
            }
        }
    }

    impl Killable for Fake {
        fn kill(&mut self, signal: Signal, all: bool) -> Result<(), LibcontainerError> {
            self.kills.push((signal, all));
            self.answers.pop_front().unwrap_or(Ok(()))
        }

        fn ended(&mut self) -> bool {
            self.looked += 1;
            self.ended
        }
    }

    /// What libcontainer's kill returns when the init is reaped between
    /// its open of /proc/<pid> and its read of the stat file (the procfs
    /// error itself is not constructible here; the message is the same).
    fn reaped_meanwhile() -> Result<(), LibcontainerError> {
        Err(LibcontainerError::Other(
            "File not found: /proc/133/stat".into(),
        ))
    }

    #[test]
    fn a_kill_all_that_races_the_inits_exit_is_sent_again() {
        // StopContainer's SIGKILL after its SIGTERM ended the init.
        let mut c = Fake::answering(vec![reaped_meanwhile(), Ok(())], true);
        signal_init(&mut c, Signal::SIGKILL, true).expect("the stop's SIGKILL succeeds");
        assert_eq!(
            c.kills,
            [(Signal::SIGKILL, true), (Signal::SIGKILL, true)],
            "sent again: what is left in the cgroup still gets it"
        );
    }

    #[test]
    fn a_signal_to_an_init_that_ended_has_done_its_job() {
        let mut c = Fake::answering(vec![reaped_meanwhile()], true);
        signal_init(&mut c, Signal::SIGTERM, false).expect("an ended init is no error");
        assert_eq!(c.kills, [(Signal::SIGTERM, false)], "not sent twice");
        // libcontainer's refusal of a stopped container, too.
        let mut c = Fake::answering(
            vec![Err(LibcontainerError::IncorrectStatus(
                ContainerStatus::Stopped,
            ))],
            true,
        );
        signal_init(&mut c, Signal::SIGTERM, false).expect("an ended init is no error");
    }

    #[test]
    fn a_live_inits_error_stands() {
        let mut c = Fake::answering(
            vec![Err(LibcontainerError::OtherSyscall(
                nix::errno::Errno::EPERM,
            ))],
            false,
        );
        let err = signal_init(&mut c, Signal::SIGKILL, true).expect_err("refused");
        assert!(
            matches!(
                err,
                LibcontainerError::OtherSyscall(nix::errno::Errno::EPERM)
            ),
            "{err:?}"
        );
        assert_eq!(c.kills.len(), 1, "not retried");
    }

    #[test]
    fn a_retry_that_fails_says_why() {
        let mut c = Fake::answering(
            vec![
                reaped_meanwhile(),
                Err(LibcontainerError::Other("freeze: busy".into())),
            ],
            true,
        );
        let err = signal_init(&mut c, Signal::SIGKILL, true).expect_err("the retry failed");
        assert!(err.to_string().contains("freeze: busy"), "{err}");
    }

    #[test]
    fn a_delivered_signal_looks_no_further() {
        let mut c = Fake::answering(vec![Ok(())], false);
        signal_init(&mut c, Signal::SIGTERM, false).expect("sent");
        assert_eq!((c.kills.len(), c.looked), (1, 0));
    }

    /// libcontainer's own container: `ended` sees a zombie and a reaped
    /// init as ended, and a signal to one that is gone succeeds.
    #[test]
    fn libcontainers_container_ends_with_its_init() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("spawn sleep");
        let pid = i32::try_from(child.id()).expect("pid");
        let mut c = Container::new(
            "c1",
            ContainerStatus::Running,
            Some(pid),
            dir.path(),
            dir.path(),
        )
        .expect("container");
        assert!(!Killable::ended(&mut c), "a live init");
        child.kill().expect("kill");
        // A zombie until waited for.
        while std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(Killable::ended(&mut c), "a zombie init");
        child.wait().expect("wait");
        assert!(Killable::ended(&mut c), "a reaped init");
        signal_init(&mut c, Signal::SIGTERM, false).expect("an ended init is no error");
    }
}
