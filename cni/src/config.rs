//! Loading the network configuration: the first `*.conflist` (or single-plugin
//! `*.conf` / `*.json`) in lexical order from the conf dir.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{CniError, Result};

/// Spec versions this runtime speaks to plugins (and parses results of).
pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0", "0.4.0", "0.3.1", "0.3.0"];

/// A network configuration list.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfigList {
    /// Network name (the `name` field).
    pub name: String,
    pub cni_version: String,
    pub disable_check: bool,
    pub plugins: Vec<PluginConfig>,
    /// The file it came from.
    pub source: PathBuf,
    /// The file's JSON as read, cached with each ADD so DEL uses what ADD used.
    pub raw: Value,
}

/// One plugin of a list: its `type` and its whole JSON object.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    pub plugin_type: String,
    pub raw: Map<String, Value>,
}

impl PluginConfig {
    /// Whether the plugin declares capability `name` (e.g. `portMappings`).
    pub fn has_capability(&self, name: &str) -> bool {
        self.raw
            .get("capabilities")
            .and_then(|c| c.get(name))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }
}

impl NetworkConfigList {
    /// Parse a file's bytes: a list (with `plugins`) or a single plugin config.
    pub fn from_bytes(file: &Path, bytes: &[u8]) -> Result<Self> {
        let raw: Value =
            serde_json::from_slice(bytes).map_err(|source| CniError::MalformedConfig {
                file: file.to_path_buf(),
                source,
            })?;
        Self::from_value(file, raw)
    }

    pub fn from_value(file: &Path, raw: Value) -> Result<Self> {
        let invalid = |reason: String| CniError::InvalidConfig {
            file: file.to_path_buf(),
            reason,
        };
        let obj = raw
            .as_object()
            .ok_or_else(|| invalid("not a JSON object".into()))?;
        let name = obj
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| invalid("missing \"name\"".into()))?
            .to_string();
        crate::valid_name("network name", &name).map_err(|e| invalid(e.to_string()))?;
        let cni_version = obj
            .get("cniVersion")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("missing \"cniVersion\"".into()))?
            .to_string();
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(invalid(format!(
                "cniVersion {cni_version:?} is not supported (supported: {})",
                SUPPORTED_VERSIONS.join(", ")
            )));
        }
        let disable_check = obj
            .get("disableCheck")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let plugin_values: Vec<Value> = match obj.get("plugins") {
            Some(Value::Array(list)) => list.clone(),
            Some(_) => return Err(invalid("\"plugins\" is not an array".into())),
            // A single-plugin .conf: the object itself is the plugin.
            None => vec![raw.clone()],
        };
        if plugin_values.is_empty() {
            return Err(invalid("\"plugins\" is empty".into()));
        }
        let mut plugins = Vec::with_capacity(plugin_values.len());
        for (i, p) in plugin_values.into_iter().enumerate() {
            let Value::Object(map) = p else {
                return Err(invalid(format!("plugin #{i} is not an object")));
            };
            let plugin_type = map
                .get("type")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| invalid(format!("plugin #{i} has no \"type\"")))?
                .to_string();
            if plugin_type.contains('/') || plugin_type.starts_with('.') {
                return Err(invalid(format!(
                    "plugin type {plugin_type:?} is not a plain name"
                )));
            }
            plugins.push(PluginConfig {
                plugin_type,
                raw: map,
            });
        }
        Ok(Self {
            name,
            cni_version,
            disable_check,
            plugins,
            source: file.to_path_buf(),
            raw,
        })
    }

    /// Load the first config of `dir` in lexical order.
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let entries = std::fs::read_dir(dir).map_err(|source| CniError::ConfDir {
            dir: dir.to_path_buf(),
            source,
        })?;
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| CniError::ConfDir {
                dir: dir.to_path_buf(),
                source,
            })?;
            let path = entry.path();
            let is_conf = matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("conflist" | "conf" | "json")
            );
            if is_conf && path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        let file = files.into_iter().next().ok_or_else(|| CniError::NoConfig {
            dir: dir.to_path_buf(),
        })?;
        let bytes = std::fs::read(&file).map_err(|source| CniError::ReadConfig {
            file: file.clone(),
            source,
        })?;
        Self::from_bytes(&file, &bytes)
    }
}

/// Whether `version` is 0.4.0 or later (CHECK and prevResult on DEL exist).
pub fn at_least_040(version: &str) -> bool {
    !version.starts_with("0.1") && !version.starts_with("0.2") && !version.starts_with("0.3")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_list_and_a_single_plugin_conf() {
        let list = br#"{"cniVersion":"1.0.0","name":"net","plugins":[
            {"type":"bridge","bridge":"b0"},
            {"type":"portmap","capabilities":{"portMappings":true}}]}"#;
        let c = NetworkConfigList::from_bytes(Path::new("/x/10.conflist"), list).unwrap();
        assert_eq!(c.name, "net");
        assert_eq!(c.plugins.len(), 2);
        assert_eq!(c.plugins[0].plugin_type, "bridge");
        assert!(c.plugins[1].has_capability("portMappings"));
        assert!(!c.plugins[0].has_capability("portMappings"));

        let single = br#"{"cniVersion":"0.4.0","name":"one","type":"bridge"}"#;
        let c = NetworkConfigList::from_bytes(Path::new("/x/a.conf"), single).unwrap();
        assert_eq!(c.plugins.len(), 1);
        assert_eq!(c.plugins[0].plugin_type, "bridge");
    }

    #[test]
    fn bad_configs_name_the_file_and_reason() {
        let f = Path::new("/x/bad.conflist");
        let e = NetworkConfigList::from_bytes(f, b"{not json").unwrap_err();
        assert!(e.to_string().contains("/x/bad.conflist"), "{e}");
        let e = NetworkConfigList::from_bytes(f, br#"{"cniVersion":"1.0.0","plugins":[]}"#)
            .unwrap_err();
        assert!(e.to_string().contains("name"), "{e}");
        let e = NetworkConfigList::from_bytes(
            f,
            br#"{"cniVersion":"9.9.9","name":"n","plugins":[{"type":"a"}]}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("9.9.9"), "{e}");
        let e = NetworkConfigList::from_bytes(
            f,
            br#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"../x"}]}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("../x"), "{e}");
    }

    #[test]
    fn version_gate() {
        assert!(at_least_040("1.0.0"));
        assert!(at_least_040("0.4.0"));
        assert!(!at_least_040("0.3.1"));
    }
}
