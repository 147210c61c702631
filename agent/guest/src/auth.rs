//! The gate in front of the agent's ports: a connection is served only if it
//! comes from the host's context ID and its first line carries the VM's
//! secret (see [`agent::auth`]). Everything else is closed unanswered.

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use agent::AgentSecret;
use tokio::io::AsyncReadExt as _;
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY, VMADDR_CID_HOST};

/// Connections accepted but not yet authenticated, at most: a flood of
/// silent connections cannot hold more.
const MAX_PENDING: usize = 64;

/// The VM's secret, replaceable while the agent serves (Personalize gives
/// a VM cloned from a template its own): the listeners check each new
/// connection's auth line against the secret of that moment; connections
/// already authenticated are never asked again.
#[derive(Clone, Debug)]
pub struct SharedSecret(Arc<RwLock<AgentSecret>>);

impl SharedSecret {
    pub fn new(secret: AgentSecret) -> Self {
        Self(Arc::new(RwLock::new(secret)))
    }

    /// Whether `line` carries the current secret ([`AgentSecret::accepts`]).
    pub fn accepts(&self, line: &[u8]) -> bool {
        // A poisoned lock still holds a whole secret: the writer only
        // assigns one.
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .accepts(line)
    }

    /// From now on, connections must present `new`.
    pub fn replace(&self, new: AgentSecret) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = new;
    }
}

/// The VM's secret from the host (its fw_cfg file); an error when there is
/// none, since the agent then serves nobody.
pub fn secret_from_host() -> anyhow::Result<AgentSecret> {
    let data = crate::fw_cfg::read_file(agent::auth::SECRET_FW_CFG_NAME)
        .map_err(|e| anyhow::anyhow!("reading fw_cfg: {e}"))?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "the host gave no secret (fw_cfg {})",
                agent::auth::SECRET_FW_CFG_NAME
            )
        })?;
    std::str::from_utf8(&data)
        .ok()
        .and_then(AgentSecret::from_hex)
        .ok_or_else(|| anyhow::anyhow!("the host's secret is not 64 hex digits"))
}

/// Listens on vsock `port` and yields only authenticated connections, as a
/// ttrpc listener (the API port's server and the forwarder take one).
pub async fn listen(
    port: u32,
    secret: SharedSecret,
) -> anyhow::Result<ttrpc::asynchronous::transport::Listener> {
    let listener = bind(port).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<VsockStream>(MAX_PENDING);
    let pending = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_PENDING));
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(port, "vsock accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if peer.cid() != VMADDR_CID_HOST {
                tracing::warn!(
                    port,
                    cid = peer.cid(),
                    "refused a connection not from the host"
                );
                continue;
            }
            let Ok(permit) = pending.clone().try_acquire_owned() else {
                tracing::warn!(port, "refused a connection: too many unauthenticated ones");
                continue;
            };
            let (tx, secret) = (tx.clone(), secret.clone());
            tokio::spawn(async move {
                let mut stream = stream;
                let line =
                    tokio::time::timeout(agent::auth::AUTH_TIMEOUT, read_line(&mut stream)).await;
                drop(permit);
                match line {
                    Ok(Ok(line)) if secret.accepts(&line) => {
                        // The receiver goes only with the server.
                        let _ = tx.send(stream).await;
                    }
                    _ => tracing::warn!(port, "refused a connection without the VM's secret"),
                }
            });
        }
    });
    let incoming = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|s| (Ok::<_, std::io::Error>(s), rx))
    });
    Ok(ttrpc::asynchronous::transport::Listener::new(incoming))
}

/// The vsock device appears when its transport module has probed; binding
/// can race with that, so retry briefly.
async fn bind(port: u32) -> anyhow::Result<VsockListener> {
    let mut last = None;
    for _ in 0..100 {
        match VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port)) {
            Ok(listener) => return Ok(listener),
            Err(err) => last = Some(err),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(anyhow::anyhow!(
        "cannot listen on vsock port {port}: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    ))
}

/// Reads the first line byte by byte, so that nothing after it (the ttrpc
/// stream, the forwarder's header) is consumed; at most
/// [`agent::auth::AUTH_LINE_MAX`] bytes.
pub(crate) async fn read_line<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::with_capacity(agent::auth::AUTH_LINE_MAX);
    let mut byte = [0u8; 1];
    while line.len() < agent::auth::AUTH_LINE_MAX {
        if stream.read(&mut byte).await? == 0 || byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_secret_is_the_only_one_accepted_by_every_holder() {
        let (old, new) = (
            AgentSecret::generate().expect("random"),
            AgentSecret::generate().expect("random"),
        );
        let line = |s: &AgentSecret| s.auth_line().trim_end().as_bytes().to_vec();
        let shared = SharedSecret::new(old.clone());
        let listener = shared.clone();
        assert!(listener.accepts(&line(&old)));
        assert!(!listener.accepts(&line(&new)));
        shared.replace(new.clone());
        assert!(listener.accepts(&line(&new)));
        assert!(!listener.accepts(&line(&old)));
        let debug = format!("{shared:?}");
        assert!(debug.contains("AgentSecret(..)"), "{debug}");
        assert!(!debug.contains(&new.to_hex()), "{debug}");
    }
}
