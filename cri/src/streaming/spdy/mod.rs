//! A small SPDY/3.1 implementation: the frame codec, header compression and a session with
//! streams and flow control, in server and client role. Just what Kubernetes' streaming
//! protocols use (spdystream speaks SPDY/3 framing under the `SPDY/3.1` upgrade token).

mod error;
pub mod frame;
mod headers;
mod session;

pub use error::SpdyError;
pub use frame::{Frame, FrameDecoder, FrameEncoder};
pub use headers::{dictionary, Headers};
pub use session::{Role, Session, SessionConfig, Stream, DEFAULT_WINDOW};
