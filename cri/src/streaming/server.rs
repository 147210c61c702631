//! The loopback HTTP server: token URLs, the upgrade to SPDY/3.1 or WebSocket, protocol
//! negotiation, and handing the connection to the protocol handlers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, CONNECTION, UPGRADE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::remotecommand::{self, Command, Version};
use super::spdy::SessionConfig;
use super::token::{Pending, TokenCache};
use super::{
    portforward, websocket, AttachRequest, Error, ExecRequest, PortForwardRequest, Result,
    StreamingRuntime,
};

pub(crate) const PROTOCOL_HEADER: &str = "x-stream-protocol-version";
const ACCEPTED_PROTOCOLS_HEADER: &str = "x-accepted-stream-protocol-versions";

/// Remote command protocols over SPDY, best first. v5 only matters for WebSocket (its stream
/// close signal); over SPDY, where streams half-close natively, it is v4 (newer clients and the
/// API server's stream translator offer it first).
const SPDY_REMOTECOMMAND: &[(&str, Version)] = &[
    ("v5.channel.k8s.io", Version::V5),
    ("v4.channel.k8s.io", Version::V4),
    ("v3.channel.k8s.io", Version::V3),
    ("v2.channel.k8s.io", Version::V2),
    ("channel.k8s.io", Version::V1),
];
pub(crate) const SPDY_PORTFORWARD: &str = "portforward.k8s.io";

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where to listen; port 0 picks a free one. Keep it on loopback: the tokens are the only
    /// access control.
    pub addr: SocketAddr,
    /// How long a URL stays valid (kubelet: 1 minute).
    pub token_ttl: Duration,
    /// URLs handed out and not yet used, beyond which new ones are refused.
    pub max_in_flight: usize,
    /// How long the client may take to open its streams after the upgrade (kubelet: 30 s).
    pub stream_creation_timeout: Duration,
    /// SPDY session settings (windows, close timeout).
    pub spdy: SessionConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            token_ttl: Duration::from_secs(60),
            max_in_flight: 1000,
            stream_creation_timeout: Duration::from_secs(30),
            spdy: SessionConfig::default(),
        }
    }
}

pub(crate) struct Inner {
    pub(crate) runtime: Arc<dyn StreamingRuntime>,
    pub(crate) config: ServerConfig,
    tokens: TokenCache,
    shutdown: watch::Sender<bool>,
}

/// The streaming server. Dropping it stops the listener and ends every open stream.
pub struct Server {
    inner: Arc<Inner>,
    addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("addr", &self.addr).finish()
    }
}

impl Server {
    /// Binds the listener and starts serving.
    pub async fn start(config: ServerConfig, runtime: Arc<dyn StreamingRuntime>) -> Result<Server> {
        let listener = TcpListener::bind(config.addr)
            .await
            .map_err(|source| Error::Bind {
                addr: config.addr,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: config.addr,
            source,
        })?;
        let (shutdown, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            runtime,
            tokens: TokenCache::new(config.token_ttl, config.max_in_flight),
            config,
            shutdown,
        });
        let accept = tokio::spawn(accept_loop(inner.clone(), listener));
        tracing::info!(%addr, "streaming server listening");
        Ok(Server {
            inner,
            addr,
            accept: Some(accept),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stores an Exec request and returns its URL.
    pub fn get_exec(&self, req: ExecRequest) -> Result<String> {
        req.validate()?;
        self.url(Pending::Exec(req))
    }

    /// Stores an Attach request and returns its URL.
    pub fn get_attach(&self, req: AttachRequest) -> Result<String> {
        req.validate()?;
        self.url(Pending::Attach(req))
    }

    /// Stores a PortForward request and returns its URL.
    pub fn get_port_forward(&self, req: PortForwardRequest) -> Result<String> {
        req.validate()?;
        self.url(Pending::PortForward(req))
    }

    fn url(&self, req: Pending) -> Result<String> {
        let path = req.path();
        let token = self.inner.tokens.insert(req)?;
        // Bound to every address: hand out loopback, where the node's kubelet is.
        let mut addr = self.addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(if addr.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        Ok(format!("http://{addr}/{path}/{token}"))
    }

    /// Stops listening and ends every connection.
    pub async fn shutdown(mut self) {
        let _ = self.inner.shutdown.send(true);
        if let Some(accept) = self.accept.take() {
            accept.abort();
            let _ = accept.await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.inner.shutdown.send(true);
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
    }
}

impl Inner {
    /// Runs `work` until it ends or the server shuts down.
    pub(crate) fn spawn<F>(self: &Arc<Self>, work: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut stop = self.shutdown.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                _ = work => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
}

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "streaming server accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let conn_inner = inner.clone();
        inner.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let inner = conn_inner.clone();
                async move { Ok::<_, Infallible>(handle(inner, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "streaming HTTP connection ended with an error");
            }
        });
    }
}

pub(crate) type Body = Full<Bytes>;

pub(crate) fn plain(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    let mut message = message.into();
    message.push('\n');
    let mut resp = Response::new(Full::new(Bytes::from(message)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Every value of a header, comma lists split, in order.
pub(crate) fn header_values(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

/// The first client protocol the server supports (client order, like kubelet).
pub(crate) fn negotiate<'a, T: Copy>(
    client: &[String],
    server: &'a [(&'a str, T)],
) -> Option<(&'a str, T)> {
    client
        .iter()
        .find_map(|c| server.iter().find(|(s, _)| s == c).copied())
}

async fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let mut parts = path.trim_start_matches('/').split('/');
    let (kind, token) = match (parts.next(), parts.next(), parts.next()) {
        (Some(k @ ("exec" | "attach" | "portforward")), Some(t), None) if !t.is_empty() => (k, t),
        _ => {
            return plain(
                StatusCode::NOT_FOUND,
                format!("no streaming endpoint at {path}"),
            )
        }
    };
    if req.method() != Method::GET && req.method() != Method::POST {
        return plain(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} is not allowed on {kind}, use GET or POST", req.method()),
        );
    }
    let Some(pending) = inner.tokens.consume(kind, token) else {
        tracing::debug!(kind, "unknown, used or expired streaming token");
        return plain(
            StatusCode::NOT_FOUND,
            format!("streaming token for {kind} not found: unknown, already used or expired"),
        );
    };
    let upgrade = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    match upgrade.as_str() {
        "websocket" => websocket::upgrade(inner, pending, req),
        "spdy/3.1" => spdy_upgrade(inner, pending, req),
        "" => plain(
            StatusCode::BAD_REQUEST,
            "unable to upgrade: missing upgrade headers in request (Upgrade: SPDY/3.1 or websocket)",
        ),
        other => plain(
            StatusCode::BAD_REQUEST,
            format!("unable to upgrade: unsupported Upgrade {other:?}, use SPDY/3.1 or websocket"),
        ),
    }
}

fn spdy_upgrade(inner: Arc<Inner>, pending: Pending, mut req: Request<Incoming>) -> Response<Body> {
    let client = header_values(req.headers(), PROTOCOL_HEADER);
    let (chosen, version) = match &pending {
        Pending::PortForward(_) => {
            let ok = client.is_empty() || client.iter().any(|c| c == SPDY_PORTFORWARD);
            (ok.then_some(SPDY_PORTFORWARD), Version::V1)
        }
        // No header at all: an old client speaking the first version.
        _ if client.is_empty() => (Some("channel.k8s.io"), Version::V1),
        _ => match negotiate(&client, SPDY_REMOTECOMMAND) {
            Some((p, v)) => (Some(p), v),
            None => (None, Version::V1),
        },
    };
    let Some(chosen) = chosen else {
        let server: Vec<&str> = match pending {
            Pending::PortForward(_) => vec![SPDY_PORTFORWARD],
            _ => SPDY_REMOTECOMMAND.iter().map(|(p, _)| *p).collect(),
        };
        let mut resp = plain(
            StatusCode::FORBIDDEN,
            format!(
                "unable to upgrade: unable to negotiate protocol: client supports {client:?}, server accepts {server:?}"
            ),
        );
        for p in server {
            resp.headers_mut()
                .append(ACCEPTED_PROTOCOLS_HEADER, HeaderValue::from_static(p));
        }
        return resp;
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let task_inner = inner.clone();
    inner.spawn(async move {
        let io = match on_upgrade.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                tracing::debug!(error = %e, "SPDY upgrade failed");
                return;
            }
        };
        match Command::from_pending(pending) {
            Ok((cmd, streams)) => {
                remotecommand::serve_spdy(task_inner, cmd, streams, version, io).await
            }
            Err(r) => portforward::serve_spdy(task_inner, r, io).await,
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("SPDY/3.1"));
    h.insert(PROTOCOL_HEADER, HeaderValue::from_static(chosen));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_follows_client_order() {
        let client = vec![
            "v2.channel.k8s.io".to_string(),
            "v4.channel.k8s.io".to_string(),
        ];
        assert_eq!(
            negotiate(&client, SPDY_REMOTECOMMAND),
            Some(("v2.channel.k8s.io", Version::V2))
        );
        assert_eq!(negotiate(&["v9".to_string()], SPDY_REMOTECOMMAND), None);
        let mut h = HeaderMap::new();
        h.append(PROTOCOL_HEADER, HeaderValue::from_static("a, b"));
        h.append(PROTOCOL_HEADER, HeaderValue::from_static("c"));
        assert_eq!(header_values(&h, PROTOCOL_HEADER), ["a", "b", "c"]);
    }
}
