//! Store and registry configuration, in the spirit of containerd's `hosts.toml`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where the store lives and how registries are reached.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StoreConfig {
    /// Root directory: `blobs/`, `snapshots/`, `containers/`, `blockimages/`, `metadata.json`.
    pub root: PathBuf,
    #[serde(default)]
    pub registries: RegistryConfig,
    /// How many layers download at once (default 3).
    #[serde(default)]
    pub max_concurrent_downloads: Option<usize>,
    /// Extra space in an ext4 block image beyond its content, in MiB (default 64 + 20 %).
    #[serde(default)]
    pub block_headroom_mib: Option<u64>,
    /// A download (manifest, token, blob) that receives nothing for this many
    /// seconds is cancelled (DeadlineExceeded); default
    /// [`DEFAULT_PULL_PROGRESS_TIMEOUT`], like kubelet's image pull progress deadline.
    #[serde(default)]
    pub pull_progress_timeout_secs: Option<u64>,
    /// Bind-mount `snapshots/` and `containers/` onto themselves nodev,nosuid
    /// (where their filesystem is not so already): an image's device nodes
    /// and setuid files, and whatever a guest makes in its writable layer,
    /// are inert on the host. vcrid sets it; a tool or test that opens a
    /// store in a temp dir leaves it off (the mounts outlive the store and
    /// are its caller's to remove).
    #[serde(default)]
    pub nodev_mounts: bool,
    /// Each shared-dir container's writable layer is a filesystem of this
    /// many MiB (a sparse loop-mounted ext4): what a guest can write to the
    /// host's disk. `None` or 0: plain directories, bounded by the disk.
    #[serde(default)]
    pub writable_layer_max_mib: Option<u64>,
}

/// How long a download may receive nothing before it is cancelled.
pub const DEFAULT_PULL_PROGRESS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

impl StoreConfig {
    /// The pull progress timeout in effect (at least one second).
    pub fn pull_progress_timeout(&self) -> std::time::Duration {
        self.pull_progress_timeout_secs
            .map_or(DEFAULT_PULL_PROGRESS_TIMEOUT, |s| {
                std::time::Duration::from_secs(s.max(1))
            })
    }
}

/// Per-registry endpoints, keyed by registry host as written in references
/// (`docker.io`, `registry.k8s.io`, `localhost:5000`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RegistryConfig {
    #[serde(default)]
    pub hosts: HashMap<String, HostConfig>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HostConfig {
    /// Mirrors tried in order before the registry itself, as URLs:
    /// `http://127.0.0.1:5000`, `https://mirror.example`.
    #[serde(default)]
    pub mirrors: Vec<String>,
    /// Do not fall back to the registry itself when every mirror failed.
    #[serde(default)]
    pub skip_upstream: bool,
    /// Reach the registry itself over plain HTTP.
    #[serde(default)]
    pub plain_http: bool,
}

/// One base URL to try for a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `https://registry-1.docker.io`, `http://127.0.0.1:5000`.
    pub base: String,
    /// Whether this endpoint is a mirror (sends `?ns=<registry>` like containerd).
    pub mirror: bool,
}

impl RegistryConfig {
    /// The endpoints for a registry, in the order they are tried.
    pub fn endpoints(&self, registry: &str) -> Vec<Endpoint> {
        let host = self.hosts.get(registry);
        let mut out: Vec<Endpoint> = host
            .map(|h| {
                h.mirrors
                    .iter()
                    .map(|m| Endpoint {
                        base: m.trim_end_matches('/').to_string(),
                        mirror: true,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if host.is_some_and(|h| h.skip_upstream) && !out.is_empty() {
            return out;
        }
        let plain = host.is_some_and(|h| h.plain_http) || is_loopback(registry);
        let upstream = if registry == crate::reference::DEFAULT_REGISTRY {
            "registry-1.docker.io"
        } else {
            registry
        };
        out.push(Endpoint {
            base: format!("{}://{upstream}", if plain { "http" } else { "https" }),
            mirror: false,
        });
        out
    }
}

/// `localhost`, `127.0.0.1:5000`, `[::1]:5000`: plain HTTP without configuration, like Docker.
pub fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        registry.split(':').next().unwrap_or(registry)
    };
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_order_and_scheme() {
        let mut cfg = RegistryConfig::default();
        assert_eq!(
            cfg.endpoints("docker.io"),
            vec![Endpoint {
                base: "https://registry-1.docker.io".into(),
                mirror: false
            }]
        );
        assert_eq!(
            cfg.endpoints("127.0.0.1:5000")[0].base,
            "http://127.0.0.1:5000"
        );
        assert_eq!(
            cfg.endpoints("localhost:5000")[0].base,
            "http://localhost:5000"
        );
        assert_eq!(cfg.endpoints("[::1]:5000")[0].base, "http://[::1]:5000");
        assert_eq!(cfg.endpoints("quay.io")[0].base, "https://quay.io");
        cfg.hosts.insert(
            "docker.io".into(),
            HostConfig {
                mirrors: vec!["http://127.0.0.1:5000/".into()],
                ..Default::default()
            },
        );
        let eps = cfg.endpoints("docker.io");
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[0].base, "http://127.0.0.1:5000");
        assert!(eps[0].mirror);
        cfg.hosts.get_mut("docker.io").unwrap().skip_upstream = true;
        assert_eq!(cfg.endpoints("docker.io").len(), 1);
        cfg.hosts.insert(
            "reg.internal".into(),
            HostConfig {
                plain_http: true,
                ..Default::default()
            },
        );
        assert_eq!(cfg.endpoints("reg.internal")[0].base, "http://reg.internal");
    }
}
