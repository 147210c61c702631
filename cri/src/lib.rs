//! The CRI server `vcrid`: RuntimeService and ImageService over gRPC. Not built yet (issue 6).
#![forbid(unsafe_code)]
