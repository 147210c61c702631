//! The image store: pull, content store, unpack, rootfs. Not built yet (issue 4).
#![forbid(unsafe_code)]
