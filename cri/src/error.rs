//! Errors of the CRI server, and their gRPC codes: the one place where any
//! failure becomes a `tonic::Status`.

use std::path::PathBuf;

use tonic::{Code, Status};

pub type Result<T, E = CriError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// A request field is missing or malformed.
    #[error("{field}: {detail}")]
    InvalidArgument { field: String, detail: String },
    #[error("{what} {id:?} not found")]
    NotFound { what: &'static str, id: String },
    /// A pod or container name is taken (kubelet retries with a new attempt).
    #[error("{what} name {name:?} is reserved for {id}")]
    NameReserved {
        what: &'static str,
        name: String,
        id: String,
    },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error(transparent)]
    Sandbox(#[from] podsandbox::Error),
    #[error(transparent)]
    Image(#[from] imagestore::ImageError),
    #[error(transparent)]
    Network(#[from] cni::CniError),
    #[error(transparent)]
    Streaming(#[from] crate::streaming::Error),
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Internal(String),
}

impl CriError {
    pub fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Self {
        CriError::InvalidArgument {
            field: field.into(),
            detail: detail.into(),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            CriError::InvalidArgument { .. } => Code::InvalidArgument,
            CriError::NotFound { .. } => Code::NotFound,
            CriError::NameReserved { .. } => Code::AlreadyExists,
            CriError::FailedPrecondition(_) => Code::FailedPrecondition,
            CriError::Unimplemented(_) => Code::Unimplemented,
            CriError::Sandbox(e) => match e.kind() {
                podsandbox::ErrorKind::NotFound => Code::NotFound,
                podsandbox::ErrorKind::AlreadyExists => Code::AlreadyExists,
                podsandbox::ErrorKind::InvalidArgument => Code::InvalidArgument,
                podsandbox::ErrorKind::FailedPrecondition => Code::FailedPrecondition,
                podsandbox::ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
                podsandbox::ErrorKind::Unavailable => Code::Unavailable,
                podsandbox::ErrorKind::Internal => Code::Internal,
            },
            CriError::Image(e) => match e.kind() {
                imagestore::ErrorKind::NotFound => Code::NotFound,
                imagestore::ErrorKind::AlreadyExists => Code::AlreadyExists,
                imagestore::ErrorKind::InvalidArgument => Code::InvalidArgument,
                imagestore::ErrorKind::FailedPrecondition => Code::FailedPrecondition,
                imagestore::ErrorKind::Unavailable => Code::Unavailable,
                imagestore::ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
                imagestore::ErrorKind::Internal => Code::Internal,
            },
            CriError::Network(e) => match e.kind() {
                cni::ErrorKind::NotFound => Code::NotFound,
                cni::ErrorKind::AlreadyExists => Code::AlreadyExists,
                cni::ErrorKind::InvalidArgument => Code::InvalidArgument,
                cni::ErrorKind::FailedPrecondition => Code::FailedPrecondition,
                cni::ErrorKind::Unavailable => Code::Unavailable,
                cni::ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
                cni::ErrorKind::Internal => Code::Internal,
            },
            CriError::Streaming(e) => match e.kind() {
                crate::streaming::ErrorKind::NotFound => Code::NotFound,
                crate::streaming::ErrorKind::AlreadyExists => Code::AlreadyExists,
                crate::streaming::ErrorKind::InvalidArgument => Code::InvalidArgument,
                crate::streaming::ErrorKind::FailedPrecondition => Code::FailedPrecondition,
                crate::streaming::ErrorKind::Unavailable => Code::Unavailable,
                crate::streaming::ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
                crate::streaming::ErrorKind::Internal => Code::Internal,
            },
            CriError::Io { .. } | CriError::Internal(_) => Code::Internal,
        }
    }

    /// The message with every `#[source]` appended.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        // A `transparent` variant shows its inner error and forwards its
        // `source` too: the chain goes on from the inner error's source.
        let mut source = std::error::Error::source(self);
        while let Some(err) = source {
            text.push_str(": ");
            text.push_str(&err.to_string());
            source = err.source();
        }
        text
    }
}

/// The longest status message sent, in bytes. Messages quote request
/// fields (IDs, names, paths) that may be megabytes long; the message goes
/// out percent-encoded in an HTTP/2 header, and a header list past the
/// client's limit (16 KiB in hyper's h2) makes it drop the whole connection
/// (GOAWAY `ENHANCE_YOUR_CALM`), failing every other call on it.
pub const MAX_STATUS_MESSAGE: usize = 1024;

/// `text` cut to at most [`MAX_STATUS_MESSAGE`] bytes (on a character
/// boundary), saying how much was cut.
fn bounded(mut text: String) -> String {
    if text.len() <= MAX_STATUS_MESSAGE {
        return text;
    }
    let total = text.len();
    let mut end = MAX_STATUS_MESSAGE - 40;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(&format!("... ({} more bytes)", total - end));
    text
}

impl From<CriError> for Status {
    fn from(err: CriError) -> Self {
        Status::new(err.code(), bounded(err.chain()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_messages() {
        let s = Status::from(CriError::invalid(
            "config.metadata.name",
            "must not be empty",
        ));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "config.metadata.name: must not be empty");
        let s = Status::from(CriError::NotFound {
            what: "pod sandbox",
            id: "abc".into(),
        });
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(s.message(), "pod sandbox \"abc\" not found");
        let s = Status::from(CriError::Sandbox(podsandbox::Error::NotFound {
            id: "x".into(),
        }));
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(s.message(), "sandbox x not found");
        // The inner error's own source is in the message once.
        let s = Status::from(CriError::Sandbox(podsandbox::Error::Hypervisor {
            id: "x".into(),
            source: hypervisor::HypervisorError::NoHotplugSlot { slots: 2 },
        }));
        assert_eq!(
            s.message(),
            "sandbox x: no free hot-plug slot: all 2 are in use (hypervisor.hotplug_slots)"
        );
        let io = CriError::Io {
            action: "write",
            path: "/x".into(),
            source: std::io::Error::from_raw_os_error(28),
        };
        assert_eq!(
            Status::from(io).message(),
            "write /x: No space left on device (os error 28)"
        );
    }

    #[test]
    fn a_message_quoting_a_huge_request_field_is_cut() {
        // A 64 KiB container ID (the CRI fuzz test's input) once came back
        // whole in grpc-message, and the client dropped the connection.
        for id in ["a".repeat(65_536), "\u{e9}".repeat(40_000)] {
            let s = Status::from(CriError::NotFound {
                what: "container",
                id: id.clone(),
            });
            assert!(
                s.message().len() <= MAX_STATUS_MESSAGE,
                "{}",
                s.message().len()
            );
            assert!(
                s.message().starts_with("container \""),
                "{}",
                &s.message()[..20]
            );
            assert!(s.message().ends_with("more bytes)"), "{}", s.message());
        }
        let short = Status::from(CriError::invalid("f", "x".repeat(MAX_STATUS_MESSAGE - 3)));
        assert_eq!(short.message().len(), MAX_STATUS_MESSAGE);
        assert!(!short.message().contains("more bytes"));
    }
}
