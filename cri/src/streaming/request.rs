//! The requests the CRI server hands to the streaming server (mirrors of the CRI messages).

use super::{Error, Result};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecRequest {
    pub container_id: String,
    pub cmd: Vec<String>,
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttachRequest {
    pub container_id: String,
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortForwardRequest {
    pub pod_sandbox_id: String,
    /// Ports the client may forward; empty allows any.
    pub ports: Vec<i32>,
}

fn invalid(request: &'static str, field: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidRequest {
        request,
        field,
        reason: reason.into(),
    }
}

/// The streams a request asks for, after the CRI rules (a TTY merges stderr into stdout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Streams {
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

fn check_streams(request: &'static str, s: Streams) -> Result<()> {
    if !(s.stdin || s.stdout || s.stderr) {
        return Err(invalid(
            request,
            "stdin/stdout/stderr",
            "are all false, one must be set",
        ));
    }
    if s.tty && s.stderr {
        return Err(invalid(
            request,
            "stderr",
            "cannot be set with tty (a terminal has no separate stderr)",
        ));
    }
    Ok(())
}

impl ExecRequest {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.container_id.is_empty() {
            return Err(invalid("Exec", "container_id", "is empty"));
        }
        if self.cmd.is_empty() {
            return Err(invalid("Exec", "cmd", "is empty"));
        }
        check_streams("Exec", self.streams())
    }

    pub(crate) fn streams(&self) -> Streams {
        Streams {
            tty: self.tty,
            stdin: self.stdin,
            stdout: self.stdout,
            stderr: self.stderr,
        }
    }
}

impl AttachRequest {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.container_id.is_empty() {
            return Err(invalid("Attach", "container_id", "is empty"));
        }
        check_streams("Attach", self.streams())
    }

    pub(crate) fn streams(&self) -> Streams {
        Streams {
            tty: self.tty,
            stdin: self.stdin,
            stdout: self.stdout,
            stderr: self.stderr,
        }
    }
}

impl PortForwardRequest {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.pod_sandbox_id.is_empty() {
            return Err(invalid("PortForward", "pod_sandbox_id", "is empty"));
        }
        if let Some(p) = self.ports.iter().find(|p| !(1..=65535).contains(*p)) {
            return Err(invalid(
                "PortForward",
                "port",
                format!("{p} is outside 1-65535"),
            ));
        }
        Ok(())
    }

    /// Whether the client may forward `port`.
    pub(crate) fn allows(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.contains(&i32::from(port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let e = ExecRequest::default().validate().unwrap_err();
        assert!(e.to_string().contains("container_id"), "{e}");
        let e = ExecRequest {
            container_id: "c".into(),
            cmd: vec!["sh".into()],
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("stdin/stdout/stderr"), "{e}");
        let e = AttachRequest {
            container_id: "c".into(),
            tty: true,
            stdout: true,
            stderr: true,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("stderr"), "{e}");
        let e = PortForwardRequest {
            pod_sandbox_id: "p".into(),
            ports: vec![0],
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("port"), "{e}");
        assert_eq!(e.kind(), crate::streaming::ErrorKind::InvalidArgument);
    }
}
