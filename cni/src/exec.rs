//! Running one plugin binary: the `CNI_*` environment, config on stdin, a
//! deadline that kills the plugin's whole process group.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::{CniError, Result};
use crate::result::PluginError;

/// The `CNI_COMMAND` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CniCommand {
    Add,
    Check,
    Del,
}

impl CniCommand {
    pub fn as_str(self) -> &'static str {
        match self {
            CniCommand::Add => "ADD",
            CniCommand::Check => "CHECK",
            CniCommand::Del => "DEL",
        }
    }
}

/// One invocation of a plugin.
#[derive(Debug)]
pub(crate) struct Invocation<'a> {
    pub plugin: &'a str,
    pub binary: &'a Path,
    pub command: CniCommand,
    pub container_id: &'a str,
    pub netns: &'a Path,
    pub if_name: &'a str,
    pub cni_args: &'a str,
    pub cni_path: &'a str,
    pub stdin: Vec<u8>,
    pub timeout: Duration,
}

/// Find `plugin` in `dirs` (first match wins).
pub(crate) fn find_plugin(plugin: &str, dirs: &[PathBuf]) -> Result<PathBuf> {
    dirs.iter()
        .map(|d| d.join(plugin))
        .find(|p| p.is_file())
        .ok_or_else(|| CniError::PluginNotFound {
            plugin: plugin.to_string(),
            dirs: dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(":"),
        })
}

/// Run the plugin; its stdout on success, a [`CniError`] naming it otherwise.
pub(crate) async fn invoke(inv: Invocation<'_>) -> Result<Vec<u8>> {
    let spawn_err = |source| CniError::PluginSpawn {
        plugin: inv.plugin.to_string(),
        command: inv.command.as_str(),
        source,
    };
    let path_env = std::env::var("PATH")
        .unwrap_or_else(|_| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    let mut child = tokio::process::Command::new(inv.binary)
        .env_clear()
        .env("PATH", path_env)
        .env("CNI_COMMAND", inv.command.as_str())
        .env("CNI_CONTAINERID", inv.container_id)
        .env("CNI_NETNS", inv.netns)
        .env("CNI_IFNAME", inv.if_name)
        .env("CNI_ARGS", inv.cni_args)
        .env("CNI_PATH", inv.cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(spawn_err)?;
    let pid = child.id().map(|p| Pid::from_raw(p as i32));
    let mut stdin = child.stdin.take();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let input = inv.stdin;
    let run = async {
        let write = async {
            if let Some(mut s) = stdin.take() {
                // A plugin may exit without reading its config; that is its business.
                let _ = s.write_all(&input).await;
            }
        };
        let mut out = Vec::new();
        let mut err = Vec::new();
        let read_out = async {
            if let Some(s) = stdout.as_mut() {
                let _ = s.read_to_end(&mut out).await;
            }
        };
        let read_err = async {
            if let Some(s) = stderr.as_mut() {
                let _ = s.read_to_end(&mut err).await;
            }
        };
        let ((), (), (), status) = tokio::join!(write, read_out, read_err, child.wait());
        (status, out, err)
    };
    let outcome = tokio::time::timeout(inv.timeout, run).await;
    let (status, out, err) = match outcome {
        Ok(done) => done,
        Err(_) => {
            if let Some(pid) = pid {
                let _ = killpg(pid, Signal::SIGKILL);
            }
            let _ = child.wait().await;
            return Err(CniError::PluginTimeout {
                plugin: inv.plugin.to_string(),
                command: inv.command.as_str(),
                timeout: inv.timeout,
            });
        }
    };
    let status = status.map_err(spawn_err)?;
    if status.success() {
        return Ok(out);
    }
    let e = PluginError::from_output(&out, &err);
    Err(CniError::PluginFailed {
        plugin: inv.plugin.to_string(),
        command: inv.command.as_str(),
        code: e.code,
        msg: e.msg,
        details: if e.details.is_empty() {
            String::new()
        } else {
            format!(": {}", e.details)
        },
    })
}
