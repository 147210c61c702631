//! Errors of the SPDY layer: malformed input from the peer, a dead connection, a reset stream.

use crate::streaming::ErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    /// The connection failed while reading or writing frames.
    #[error("SPDY connection I/O failed")]
    Io(#[source] std::io::Error),
    /// A frame announced a payload larger than this side accepts.
    #[error("SPDY {frame} frame of {length} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        frame: &'static str,
        length: usize,
        max: usize,
    },
    /// A control frame of another SPDY version (only 3 is spoken).
    #[error("SPDY control frame of version {version}, only version 3 is supported")]
    UnsupportedVersion { version: u16 },
    /// A frame whose fixed fields do not fit its length or carry forbidden values.
    #[error("invalid SPDY {frame} frame: {reason}")]
    InvalidFrame { frame: &'static str, reason: String },
    /// A decompressed name/value header block that does not parse.
    #[error("invalid SPDY header block: {reason}")]
    HeaderBlock { reason: String },
    #[error("compressing a SPDY header block failed")]
    Compress(#[source] flate2::CompressError),
    #[error("decompressing a SPDY header block failed")]
    Decompress(#[source] flate2::DecompressError),
    /// The session ended (GOAWAY, connection closed or failed).
    #[error("the SPDY session is closed")]
    SessionClosed,
    /// The peer sent GOAWAY: no new streams may be opened.
    #[error("the SPDY peer is going away, no new streams")]
    GoingAway,
    /// Stream IDs of this side are used up.
    #[error("SPDY stream IDs exhausted")]
    StreamIdsExhausted,
    /// The peer reset the stream.
    #[error("SPDY stream {stream_id} was reset by the peer (status {status})")]
    StreamReset { stream_id: u32, status: u32 },
}

impl SpdyError {
    pub fn kind(&self) -> ErrorKind {
        use SpdyError::*;
        match self {
            FrameTooLarge { .. }
            | UnsupportedVersion { .. }
            | InvalidFrame { .. }
            | HeaderBlock { .. }
            | Decompress(_) => ErrorKind::InvalidArgument,
            Io(_) | SessionClosed | GoingAway | StreamReset { .. } => ErrorKind::Unavailable,
            StreamIdsExhausted => ErrorKind::FailedPrecondition,
            Compress(_) => ErrorKind::Internal,
        }
    }

    pub(crate) fn invalid(frame: &'static str, reason: impl Into<String>) -> Self {
        SpdyError::InvalidFrame {
            frame,
            reason: reason.into(),
        }
    }
}
