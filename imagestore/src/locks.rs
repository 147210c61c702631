//! Per-key async locks: concurrent pulls of one blob (or one layer snapshot)
//! wait on a single download / unpack instead of repeating it. And leases:
//! what in-flight work uses, spared by garbage collection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use crate::digest::Digest;

#[derive(Debug, Default)]
pub(crate) struct KeyedLocks {
    map: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    pub async fn lock(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            map.retain(|_, w| w.strong_count() > 0);
            match map.get(key).and_then(Weak::upgrade) {
                Some(m) => m,
                None => {
                    let m = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(key.to_string(), Arc::downgrade(&m));
                    m
                }
            }
        };
        m.lock_owned().await
    }
}

/// What in-flight operations (pulls, rootfs preparation) have fetched,
/// unpacked or are about to use but not yet recorded in the metadata: garbage
/// collection spares it (containerd's leases, kept in memory; a crash leaves
/// only orphans, which `open` sweeps).
///
/// Taking a lease and checking what is present must not interleave with a
/// collection, so leases are taken under the gc lock, shared and briefly
/// ([`crate::store::ImageStore::lease`]); a collection holds it exclusively.
#[derive(Debug, Default)]
pub(crate) struct Leases {
    map: Mutex<HashMap<String, usize>>,
}

/// Lease keys: a blob, a snapshot, a block image.
pub(crate) fn blob_key(d: &Digest) -> String {
    format!("blob/{}", d.hex())
}
pub(crate) fn snapshot_key(chain_id: &Digest) -> String {
    format!("snapshot/{}", chain_id.hex())
}
pub(crate) fn block_key(image_hex: &str) -> String {
    format!("block/{image_hex}")
}

impl Leases {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether some in-flight operation holds `key`.
    pub fn held(&self, key: &str) -> bool {
        self.map().contains_key(key)
    }
}

/// A set of held lease keys, released on drop.
#[derive(Debug)]
pub(crate) struct Lease<'a> {
    leases: &'a Leases,
    keys: Vec<String>,
}

impl<'a> Lease<'a> {
    pub fn new(leases: &'a Leases) -> Self {
        Lease {
            leases,
            keys: Vec::new(),
        }
    }

    /// The blobs and snapshots this lease holds.
    pub fn blobs_and_snapshots(&self) -> (Vec<Digest>, Vec<Digest>) {
        let parse = |prefix: &str| -> Vec<Digest> {
            self.keys
                .iter()
                .filter_map(|k| k.strip_prefix(prefix))
                .filter_map(|hex| Digest::parse(&format!("sha256:{hex}")).ok())
                .collect()
        };
        (parse("blob/"), parse("snapshot/"))
    }

    /// Adds keys; call with the gc lock held (shared).
    pub fn extend(&mut self, keys: impl IntoIterator<Item = String>) {
        let mut map = self.leases.map();
        for k in keys {
            *map.entry(k.clone()).or_insert(0) += 1;
            self.keys.push(k);
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut map = self.leases.map();
        for k in &self.keys {
            if let Some(n) = map.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    map.remove(k);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_count_and_release() {
        let leases = Leases::default();
        let mut a = Lease::new(&leases);
        a.extend(["x".to_string(), "y".to_string()]);
        {
            let mut b = Lease::new(&leases);
            b.extend(["x".to_string()]);
            assert!(leases.held("x") && leases.held("y"));
        }
        assert!(leases.held("x"), "still held by the first");
        drop(a);
        assert!(!leases.held("x") && !leases.held("y"));
    }
}
