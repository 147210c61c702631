//! The CRI server `vcrid`: RuntimeService and ImageService over gRPC (issue 6). Today it holds the
//! streaming server that Exec, Attach and PortForward hand out URLs for.
#![forbid(unsafe_code)]

pub mod streaming;
