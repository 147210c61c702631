//! A recording, fail-on-demand [`NetworkPlugin`] for unit tests of callers.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;

use async_trait::async_trait;

use crate::error::{CniError, Result};
use crate::link::RouteInfo;
use crate::network::{InterfaceInfo, NetworkPlugin, NetworkStatus, PodNetworkRequest};
use crate::result::{Dns, IpNet};

/// One call the fake was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeCall {
    Setup(String),
    Teardown(String),
    Status(String),
}

#[derive(Debug, Default)]
struct Inner {
    calls: Vec<FakeCall>,
    pods: HashMap<String, NetworkStatus>,
    next_host: u8,
    fail: Vec<&'static str>,
    no_taps: bool,
}

/// Hands out 10.99.0.N addresses; `fail_on("setup" | "teardown" | "status")`
/// makes that call fail.
#[derive(Debug, Default)]
pub struct FakeNetwork {
    inner: Mutex<Inner>,
}

impl FakeNetwork {
    pub fn new() -> Self {
        Self::default()
    }

    /// Pods get no tap (a caller's unit test cannot open a real one).
    pub fn without_taps(self) -> Self {
        self.lock().no_taps = true;
        self
    }

    /// Make every later `op` call fail.
    pub fn fail_on(&self, op: &'static str) -> &Self {
        self.lock().fail.push(op);
        self
    }

    pub fn calls(&self) -> Vec<FakeCall> {
        self.lock().calls.clone()
    }

    /// The sandboxes currently set up.
    pub fn pods(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().pods.keys().cloned().collect();
        v.sort();
        v
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl NetworkPlugin for FakeNetwork {
    async fn setup(&self, req: &PodNetworkRequest) -> Result<NetworkStatus> {
        let mut g = self.lock();
        g.calls.push(FakeCall::Setup(req.sandbox_id.clone()));
        if g.fail.contains(&"setup") {
            return Err(CniError::Injected {
                what: "setup".into(),
            });
        }
        if g.pods.contains_key(&req.sandbox_id) {
            return Err(CniError::PodExists {
                id: req.sandbox_id.clone(),
            });
        }
        g.next_host = g.next_host.wrapping_add(1).max(2);
        let ip = IpAddr::V4(Ipv4Addr::new(10, 99, 0, g.next_host));
        let gw = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 1));
        let status = NetworkStatus {
            sandbox_id: req.sandbox_id.clone(),
            netns: format!("/fake/netns/{}", req.sandbox_id).into(),
            network_name: "fake".into(),
            interfaces: vec![InterfaceInfo {
                tap_name: (!g.no_taps).then(|| "tap0_vc".into()),
                guest_name: "eth0".into(),
                mac: format!("02:00:0a:63:00:{:02x}", g.next_host),
                mtu: 1500,
                ips: vec![IpNet {
                    addr: ip,
                    prefix_len: 16,
                }],
                gateway: Some(gw),
            }],
            routes: vec![RouteInfo {
                dest: IpNet {
                    addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    prefix_len: 0,
                },
                gateway: Some(gw),
                device: "eth0".into(),
                scope: "universe".into(),
            }],
            neighbours: Vec::new(),
            dns: Dns::default(),
            pod_ips: vec![ip],
        };
        g.pods.insert(req.sandbox_id.clone(), status.clone());
        Ok(status)
    }

    async fn teardown(&self, sandbox_id: &str) -> Result<()> {
        let mut g = self.lock();
        g.calls.push(FakeCall::Teardown(sandbox_id.to_string()));
        if g.fail.contains(&"teardown") {
            return Err(CniError::Injected {
                what: "teardown".into(),
            });
        }
        g.pods.remove(sandbox_id);
        Ok(())
    }

    fn sandboxes(&self) -> Result<Vec<String>> {
        Ok(self.pods())
    }

    async fn status(&self, sandbox_id: &str) -> Result<NetworkStatus> {
        let mut g = self.lock();
        g.calls.push(FakeCall::Status(sandbox_id.to_string()));
        if g.fail.contains(&"status") {
            return Err(CniError::Injected {
                what: "status".into(),
            });
        }
        g.pods
            .get(sandbox_id)
            .cloned()
            .ok_or_else(|| CniError::PodNotFound {
                id: sandbox_id.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_and_fails_on_demand() {
        let fake = FakeNetwork::new();
        let req = PodNetworkRequest {
            sandbox_id: "p1".into(),
            ..Default::default()
        };
        let st = fake.setup(&req).await.unwrap();
        assert_eq!(st.pod_ips, vec!["10.99.0.2".parse::<IpAddr>().unwrap()]);
        assert!(matches!(
            fake.setup(&req).await,
            Err(CniError::PodExists { .. })
        ));
        assert_eq!(fake.status("p1").await.unwrap(), st);
        fake.teardown("p1").await.unwrap();
        assert!(fake.pods().is_empty());
        fake.fail_on("setup");
        assert!(fake.setup(&req).await.is_err());
        assert_eq!(fake.calls().len(), 5);
    }
}
