//! Named network namespaces (root).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use cni::{CniError, ErrorKind, NetNs};

fn current_netns() -> std::path::PathBuf {
    std::fs::read_link("/proc/thread-self/ns/net").unwrap()
}

/// Removes the namespace even when the test fails.
struct Remove(std::path::PathBuf);
impl Drop for Remove {
    fn drop(&mut self) {
        let _ = cni::netns::remove_path(&self.0);
    }
}

#[test]
fn create_enter_and_remove_a_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::create(dir.path(), "n1").unwrap();
    let _guard = Remove(ns.path().to_path_buf());
    let host = current_netns();
    let inside = ns.run(|| Ok(current_netns())).unwrap();
    assert_ne!(inside, host, "run() must execute inside the new namespace");
    // The namespace stays the same across entries, and the caller never moved.
    assert_eq!(ns.run(|| Ok(current_netns())).unwrap(), inside);
    assert_eq!(current_netns(), host);
    // Only loopback inside.
    let devs = ns
        .run(|| {
            std::fs::read_to_string("/proc/thread-self/net/dev").map_err(|e| CniError::Io {
                action: "read",
                path: "/proc/thread-self/net/dev".into(),
                source: e,
            })
        })
        .unwrap();
    let names: Vec<&str> = devs
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(names, vec!["lo"]);

    let again = NetNs::create(dir.path(), "n1").unwrap_err();
    assert_eq!(again.kind(), ErrorKind::AlreadyExists);

    ns.remove().unwrap();
    assert!(!ns.path().exists());
    ns.remove().unwrap();
    let gone = ns.run(|| Ok(())).unwrap_err();
    assert_eq!(gone.kind(), ErrorKind::NotFound, "{gone}");
    assert_eq!(
        NetNs::open(ns.path()).unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn bad_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["", "../x", "a/b", ".hidden"] {
        let e = NetNs::create(dir.path(), bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad:?}");
    }
}
