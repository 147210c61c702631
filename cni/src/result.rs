//! CNI results (spec 1.0.0, 0.4.0 and 0.3.x share this shape) and plugin errors.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An address with its prefix length, e.g. `10.88.0.2/16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl IpNet {
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} has no /prefix"))?;
        let addr: IpAddr = addr.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let prefix_len: u8 = len.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(format!("{s:?}: prefix longer than {max}"));
        }
        Ok(Self { addr, prefix_len })
    }
}

impl Serialize for IpNet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default)]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The netns path for interfaces inside the sandbox; absent for host ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// A parsed ADD result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    #[serde(default)]
    pub cni_version: String,
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

impl CniResult {
    /// Parse a result of spec 1.0.0, 0.4.0 or 0.3.x (0.3's per-IP `version`
    /// field is ignored: the address says it). 0.1/0.2 results (`ip4`/`ip6`)
    /// are refused.
    pub fn parse(value: &serde_json::Value) -> Result<Self, String> {
        if value.get("ip4").is_some() || value.get("ip6").is_some() {
            return Err("a spec 0.1/0.2 result (ip4/ip6) is not supported".into());
        }
        let r: CniResult = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
        for ip in &r.ips {
            if let Some(i) = ip.interface {
                if i >= r.interfaces.len() {
                    return Err(format!(
                        "ip {} names interface #{i} of {}",
                        ip.address,
                        r.interfaces.len()
                    ));
                }
            }
        }
        Ok(r)
    }

    /// The sandbox interface called `ifname`, with its index.
    pub fn sandbox_interface(&self, ifname: &str) -> Option<(usize, &Interface)> {
        self.interfaces
            .iter()
            .enumerate()
            .find(|(_, i)| i.name == ifname && i.sandbox.as_deref().is_some_and(|s| !s.is_empty()))
    }

    /// Pod IPs: IPv4 first, then IPv6.
    pub fn pod_ips(&self) -> Vec<IpAddr> {
        let mut v4: Vec<IpAddr> = self
            .ips
            .iter()
            .map(|i| i.address.addr)
            .filter(IpAddr::is_ipv4)
            .collect();
        v4.extend(
            self.ips
                .iter()
                .map(|i| i.address.addr)
                .filter(IpAddr::is_ipv6),
        );
        v4
    }
}

/// The error a plugin prints on stdout when it fails.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct PluginError {
    #[serde(default)]
    pub code: u32,
    #[serde(default)]
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

impl PluginError {
    /// Parse a failed plugin's stdout; falls back to its stderr/stdout text.
    pub fn from_output(stdout: &[u8], stderr: &[u8]) -> Self {
        if let Ok(e) = serde_json::from_slice::<PluginError>(stdout) {
            if e.code != 0 || !e.msg.is_empty() {
                return e;
            }
        }
        let text = if stderr.iter().any(|b| !b.is_ascii_whitespace()) {
            stderr
        } else {
            stdout
        };
        let msg = String::from_utf8_lossy(text).trim().to_string();
        PluginError {
            code: 999,
            msg: if msg.is_empty() {
                "no error output".into()
            } else {
                msg
            },
            details: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_a_1_0_result() {
        let v = json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "vcr0", "mac": "aa:bb:cc:dd:ee:01"},
                {"name": "veth1", "mac": "aa:bb:cc:dd:ee:02"},
                {"name": "eth0", "mac": "aa:bb:cc:dd:ee:03", "sandbox": "/run/ns/p1"}
            ],
            "ips": [
                {"address": "fd00::5/64", "interface": 2},
                {"address": "10.88.0.5/16", "gateway": "10.88.0.1", "interface": 2}
            ],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.88.0.1"}],
            "dns": {"nameservers": ["10.0.0.10"], "search": ["svc.local"]}
        });
        let r = CniResult::parse(&v).unwrap();
        assert_eq!(r.sandbox_interface("eth0").unwrap().0, 2);
        assert_eq!(r.ips[1].address.prefix_len, 16);
        assert_eq!(r.ips[1].gateway, Some("10.88.0.1".parse().unwrap()));
        assert_eq!(r.routes[0].dst.to_string(), "0.0.0.0/0");
        assert_eq!(r.dns.nameservers, vec!["10.0.0.10"]);
        let ips: Vec<String> = r.pod_ips().iter().map(|i| i.to_string()).collect();
        assert_eq!(ips, vec!["10.88.0.5", "fd00::5"]);
    }

    #[test]
    fn parses_0_3_and_0_4_results_and_refuses_0_2() {
        let v = json!({"cniVersion": "0.3.1",
            "interfaces": [{"name": "eth0", "sandbox": "/n"}],
            "ips": [{"version": "4", "address": "10.1.0.2/24", "interface": 0}]});
        let r = CniResult::parse(&v).unwrap();
        assert_eq!(r.ips[0].address.to_string(), "10.1.0.2/24");
        assert!(r.sandbox_interface("eth0").is_some());
        let v = json!({"cniVersion": "0.2.0", "ip4": {"ip": "10.1.0.2/24"}});
        assert!(CniResult::parse(&v).unwrap_err().contains("0.2"));
    }

    #[test]
    fn refuses_bad_addresses_and_indexes() {
        let v = json!({"ips": [{"address": "10.1.0.2"}]});
        assert!(CniResult::parse(&v).unwrap_err().contains("prefix"));
        let v = json!({"ips": [{"address": "10.1.0.2/33"}]});
        assert!(CniResult::parse(&v).is_err());
        let v = json!({"ips": [{"address": "10.1.0.2/8", "interface": 3}]});
        assert!(CniResult::parse(&v).unwrap_err().contains("#3"));
    }

    #[test]
    fn plugin_errors() {
        let e = PluginError::from_output(
            br#"{"cniVersion":"1.0.0","code":7,"msg":"no IP","details":"range full"}"#,
            b"",
        );
        assert_eq!(
            (e.code, e.msg.as_str(), e.details.as_str()),
            (7, "no IP", "range full")
        );
        let e = PluginError::from_output(b"", b"boom\n");
        assert_eq!((e.code, e.msg.as_str()), (999, "boom"));
        let e = PluginError::from_output(b"", b"");
        assert_eq!(e.msg, "no error output");
    }
}
