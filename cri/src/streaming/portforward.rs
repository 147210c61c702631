//! Port forwarding over SPDY (`portforward.k8s.io`).
//!
//! For each forwarded connection the client opens a pair of streams with the same `port` and
//! `requestID` headers: `streamType: error` and `streamType: data`. When both are there the
//! data stream is handed to the runtime; a failure is written as text on the error stream.
//! The session lasts until the client hangs up.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;

use super::server::Inner;
use super::spdy::{frame::rst, Headers, Role, Session, Stream};
use super::{BoxDuplex, PortForwardRequest};

#[derive(Default)]
struct Pair {
    error: Option<Stream>,
    data: Option<Stream>,
    port: String,
    since: Option<Instant>,
}

/// Parses a forwarded port and checks the request allows it.
pub(crate) fn check_port(req: &PortForwardRequest, port: &str) -> Result<u16, String> {
    let p: u16 = port
        .parse()
        .map_err(|_| format!("invalid port {port:?}: not a number in 1-65535"))?;
    if p == 0 {
        return Err("invalid port 0: must be in 1-65535".into());
    }
    if !req.allows(p) {
        return Err(format!(
            "port {p} was not requested for pod {} (requested: {:?})",
            req.pod_sandbox_id, req.ports
        ));
    }
    Ok(p)
}

/// Forwards one connection; returns the error text for the client, if any.
pub(crate) async fn forward(
    inner: &Inner,
    req: &PortForwardRequest,
    port: u16,
    stream: BoxDuplex,
) -> Option<String> {
    match inner
        .runtime
        .port_forward(&req.pod_sandbox_id, port, stream)
        .await
    {
        Ok(()) => None,
        Err(e) => {
            tracing::warn!(pod = %req.pod_sandbox_id, port, error = %e, "port forward failed");
            Some(format!(
                "error forwarding port {port} to pod {}: {e}",
                req.pod_sandbox_id
            ))
        }
    }
}

pub(crate) async fn serve_spdy<T>(inner: Arc<Inner>, req: PortForwardRequest, io: T)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let mut session = match Session::new(io, Role::Server, inner.config.spdy.clone()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot start a SPDY session");
            return;
        }
    };
    let req = Arc::new(req);
    let timeout = inner.config.stream_creation_timeout;
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut forwards = JoinSet::new();
    let mut tick = tokio::time::interval(timeout.min(std::time::Duration::from_secs(1)));
    loop {
        tokio::select! {
            s = session.accept() => {
                let Some(stream) = s else { break };
                let h = stream.headers();
                let kind = h.get("streamtype").unwrap_or("").to_string();
                let port = h.get("port").unwrap_or("").to_string();
                // Old clients send no requestID: pair by stream ID (data = error + 2).
                let id = match (h.get("requestid"), kind.as_str()) {
                    (Some(id), _) => id.to_string(),
                    (None, "data") => stream.id().saturating_sub(2).to_string(),
                    (None, _) => stream.id().to_string(),
                };
                if kind != "error" && kind != "data" {
                    tracing::debug!(stream_type = %kind, "unexpected port-forward stream refused");
                    stream.reset(rst::REFUSED_STREAM);
                    continue;
                }
                stream.reply(Headers::new(), false);
                let pair = pairs.entry(id.clone()).or_default();
                pair.since.get_or_insert_with(Instant::now);
                if pair.port.is_empty() {
                    pair.port = port;
                }
                let slot = if kind == "error" { &mut pair.error } else { &mut pair.data };
                if slot.is_some() {
                    stream.reset(rst::PROTOCOL_ERROR);
                    continue;
                }
                *slot = Some(stream);
                if pair.error.is_some() && pair.data.is_some() {
                    if let Some(Pair { error: Some(error), data: Some(data), port, .. }) = pairs.remove(&id) {
                        let inner = inner.clone();
                        let req = req.clone();
                        forwards.spawn(async move {
                            run_pair(&inner, &req, &port, error, data).await;
                        });
                    }
                }
            }
            Some(_) = forwards.join_next(), if !forwards.is_empty() => {}
            _ = tick.tick() => {
                let now = Instant::now();
                pairs.retain(|id, p| {
                    let expired = p.since.is_some_and(|s| now.duration_since(s) > timeout);
                    if expired {
                        tracing::info!(request = %id, "timed out waiting for the other stream of a port-forward pair");
                        if let Some(mut e) = p.error.take() {
                            tokio::spawn(async move {
                                let _ = e.write_all(b"timed out waiting for the data stream").await;
                                let _ = e.shutdown().await;
                            });
                        }
                    }
                    !expired
                });
            }
        }
    }
    // The client said GOAWAY: let running forwards finish, then hang up.
    while forwards.join_next().await.is_some() {}
    session.close().await;
}

async fn run_pair(
    inner: &Inner,
    req: &PortForwardRequest,
    port: &str,
    mut error: Stream,
    data: Stream,
) {
    let failure = match check_port(req, port) {
        Ok(p) => forward(inner, req, p, Box::new(data)).await,
        Err(e) => Some(e),
    };
    if let Some(msg) = failure {
        let _ = error.write_all(msg.as_bytes()).await;
    }
    let _ = error.shutdown().await;
}
