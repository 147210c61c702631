//! Errors of the streaming server, each with a [`ErrorKind`] for the CRI server's status mapping.

use std::net::SocketAddr;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The class of an error, mapped to a gRPC code in one place by the CRI server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    FailedPrecondition,
    Unavailable,
    DeadlineExceeded,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A streaming request that cannot be served (names the field).
    #[error("invalid {request} request: {field} {reason}")]
    InvalidRequest {
        request: &'static str,
        field: &'static str,
        reason: String,
    },
    /// Too many URLs handed out and not yet used.
    #[error("{in_flight} streaming requests are waiting to be used, the limit; try again later")]
    TooManyInFlight { in_flight: usize },
    /// The operating system's random source failed.
    #[error("cannot draw a random streaming token: {reason}")]
    Random { reason: String },
    #[error("cannot listen on {addr} for streaming")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidRequest { .. } => ErrorKind::InvalidArgument,
            Error::TooManyInFlight { .. } => ErrorKind::Unavailable,
            Error::Random { .. } | Error::Bind { .. } => ErrorKind::Internal,
        }
    }
}
