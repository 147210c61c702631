//! A small distribution-API client: manifests and blobs over HTTP(S), endpoint
//! selection (mirrors, plain HTTP) and auth (anonymous, basic, bearer token).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::config::{Endpoint, RegistryConfig};
use crate::digest::Digest;
use crate::error::{ImageError, Result};
use crate::manifest::ACCEPT_MANIFESTS;
use crate::reference::Reference;

/// A named bound on how much of a registry's answer is read; the name is the
/// constant's, so an error says which limit was hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limit {
    pub name: &'static str,
    pub bytes: u64,
}

/// Manifests and indexes: 4 MiB, containerd's limit too. Real ones are a few KiB.
pub(crate) const MAX_MANIFEST: Limit = Limit {
    name: "MAX_MANIFEST",
    bytes: 4 << 20,
};

/// A token endpoint's JSON answer: 1 MiB (real tokens are a few KiB).
pub(crate) const MAX_TOKEN: Limit = Limit {
    name: "MAX_TOKEN",
    bytes: 1 << 20,
};

/// An image config, read into memory and parsed: 8 MiB (real ones are a few
/// KiB; a long history makes some a few hundred).
pub(crate) const MAX_CONFIG: Limit = Limit {
    name: "MAX_CONFIG",
    bytes: 8 << 20,
};

/// How much of an error answer's body is read for its message; the rest is
/// never read (the connection is dropped).
pub(crate) const MAX_ERROR_BODY: Limit = Limit {
    name: "MAX_ERROR_BODY",
    bytes: 4 << 10,
};

/// How much of an error body goes into the error message.
const ERROR_DETAIL_CHARS: usize = 300;

/// A URL as it may be shown in errors and logs: without user name and password.
pub(crate) fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            if !u.username().is_empty() || u.password().is_some() {
                // Only fails for URLs that cannot carry credentials at all.
                let _ = u.set_username("");
                let _ = u.set_password(None);
            }
            u.to_string()
        }
        Err(_) => match url.split_once("://") {
            Some((scheme, rest)) => match rest.split_once('@') {
                Some((_, host)) => format!("{scheme}://{host}"),
                None => url.to_string(),
            },
            None => url.to_string(),
        },
    }
}

/// A transport error with its URL shown once, redacted, by our own message.
pub(crate) fn http_error(url: &str, source: reqwest::Error) -> ImageError {
    ImageError::Http {
        url: redact(url),
        source: source.without_url(),
    }
}

/// The next piece of a body (`None` at its end); each piece must arrive within
/// `progress`, else the download is cancelled as stalled.
pub(crate) async fn next_chunk(
    resp: &mut reqwest::Response,
    progress: Duration,
    what: &str,
    url: &str,
) -> Result<Option<bytes::Bytes>> {
    match tokio::time::timeout(progress, resp.chunk()).await {
        Err(_) => Err(ImageError::Stalled {
            what: what.to_string(),
            url: redact(url),
            timeout: progress,
        }),
        Ok(res) => res.map_err(|source| http_error(url, source)),
    }
}

/// Reads a whole body of at most `limit` bytes, piece by piece: a longer one
/// (declared or sent) is refused without reading the rest.
pub(crate) async fn read_limited(
    mut resp: reqwest::Response,
    limit: Limit,
    progress: Duration,
    what: &str,
    url: &str,
) -> Result<Vec<u8>> {
    let too_large = || ImageError::TooLarge {
        what: what.to_string(),
        url: redact(url),
        limit_name: limit.name,
        limit: limit.bytes,
    };
    let declared = resp.content_length();
    if declared.is_some_and(|n| n > limit.bytes) {
        return Err(too_large());
    }
    // Bounded by the limit just checked.
    let mut body = Vec::with_capacity(usize::try_from(declared.unwrap_or(0)).unwrap_or(0));
    while let Some(chunk) = next_chunk(&mut resp, progress, what, url).await? {
        if (body.len() + chunk.len()) as u64 > limit.bytes {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The start of an error answer's body for a message: at most
/// [`MAX_ERROR_BODY`] is read, and a body that stalls or breaks gives what came.
async fn error_detail(mut resp: reqwest::Response, progress: Duration, url: &str) -> String {
    let mut body = Vec::new();
    while (body.len() as u64) < MAX_ERROR_BODY.bytes {
        match next_chunk(&mut resp, progress, "error answer", url).await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    body.truncate(usize::try_from(MAX_ERROR_BODY.bytes).unwrap_or(usize::MAX));
    String::from_utf8_lossy(&body)
        .chars()
        .take(ERROR_DETAIL_CHARS)
        .collect()
}

/// Sends a request; its answer's head must come within `progress`.
async fn send(
    req: reqwest::RequestBuilder,
    progress: Duration,
    url: &str,
) -> Result<reqwest::Response> {
    match tokio::time::timeout(progress, req.send()).await {
        Err(_) => Err(ImageError::Stalled {
            what: "answer".to_string(),
            url: redact(url),
            timeout: progress,
        }),
        Ok(res) => res.map_err(|source| http_error(url, source)),
    }
}

/// Credentials as the CRI `AuthConfig` carries them.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthConfig {
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub password: String,
    /// base64 of `username:password`, used when username is empty.
    #[serde(default)]
    pub auth: String,
    #[serde(default)]
    pub server_address: String,
    /// An OAuth2 refresh token exchanged at the token endpoint.
    #[serde(default)]
    pub identity_token: String,
    /// A bearer token sent to the registry as is.
    #[serde(default)]
    pub registry_token: String,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.debug_struct("AuthConfig")
            .field("username", &self.username)
            .field("server_address", &self.server_address)
            .finish_non_exhaustive()
    }
}

impl AuthConfig {
    fn basic(&self) -> Option<(String, String)> {
        if !self.username.is_empty() {
            return Some((self.username.clone(), self.password.clone()));
        }
        if self.auth.is_empty() {
            return None;
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(self.auth.trim())
            .ok()?;
        let s = String::from_utf8(raw).ok()?;
        let (u, p) = s.split_once(':')?;
        Some((u.to_string(), p.to_string()))
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Challenge {
    pub scheme: String,
    pub params: HashMap<String, String>,
}

pub(crate) fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remain) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        params.insert(key, value.to_string());
        rest = remain.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: String,
    #[serde(default)]
    access_token: String,
}

/// The HTTP client shared by all pulls.
#[derive(Debug, Clone)]
pub(crate) struct RegistryClient {
    http: reqwest::Client,
    config: RegistryConfig,
    /// How long any download may go without receiving a byte.
    progress: Duration,
}

impl RegistryClient {
    pub fn new(config: RegistryConfig, progress: Duration) -> Result<Self> {
        let http = reqwest::Client::builder()
            .user_agent(concat!(
                "virtcontainers-imagestore/",
                env!("CARGO_PKG_VERSION")
            ))
            .connect_timeout(Duration::from_secs(30))
            // A registry that stops sending fails the pull (DeadlineExceeded)
            // instead of hanging it; slow but moving downloads are fine. Our
            // own timeouts (`next_chunk`, `send`) name what stalled; this one
            // is the backstop.
            .read_timeout(progress.saturating_mul(2))
            .build()
            .map_err(|source| ImageError::Http {
                url: "(client set-up)".into(),
                source,
            })?;
        Ok(RegistryClient {
            http,
            config,
            progress,
        })
    }

    pub fn session(&self, reference: &Reference, auth: Option<AuthConfig>) -> Session {
        Session {
            http: self.http.clone(),
            progress: self.progress,
            endpoints: self.config.endpoints(&reference.registry),
            registry: reference.registry.clone(),
            repository: reference.repository.clone(),
            auth,
            chosen: Mutex::new(None),
            authz: Mutex::new(HashMap::new()),
        }
    }
}

/// One pull's view of a repository: the endpoint that answered the manifest
/// request and the authorization it needed, reused for every blob.
#[derive(Debug)]
pub(crate) struct Session {
    http: reqwest::Client,
    /// How long any download may go without receiving a byte.
    progress: Duration,
    endpoints: Vec<Endpoint>,
    registry: String,
    repository: String,
    auth: Option<AuthConfig>,
    chosen: Mutex<Option<Endpoint>>,
    /// Authorization header per endpoint base.
    authz: Mutex<HashMap<String, String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Session {
    /// The pull progress timeout: how long a download may go without a byte.
    pub fn progress(&self) -> Duration {
        self.progress
    }

    fn url(&self, ep: &Endpoint, kind: &str, reference: &str) -> String {
        let mut url = format!("{}/v2/{}/{kind}/{reference}", ep.base, self.repository);
        if ep.mirror {
            url.push_str("?ns=");
            url.push_str(&self.registry);
        }
        url
    }

    /// Fetches a manifest or index by tag or digest: the raw bytes and the
    /// media type the registry declared. Tries each endpoint in order.
    pub async fn manifest(&self, reference: &str) -> Result<(bytes::Bytes, Option<String>)> {
        let mut last_err = None;
        let chosen = lock(&self.chosen).clone();
        let endpoints = match chosen {
            Some(ep) => vec![ep],
            None => self.endpoints.clone(),
        };
        for ep in &endpoints {
            let url = self.url(ep, "manifests", reference);
            match self.get(ep, &url, Some(ACCEPT_MANIFESTS)).await {
                Ok(resp) => {
                    let media_type = resp
                        .headers()
                        .get(reqwest::header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .map(|s| s.split(';').next().unwrap_or(s).trim().to_string());
                    let body = read_limited(
                        resp,
                        MAX_MANIFEST,
                        self.progress,
                        &format!("manifest {reference}"),
                        &url,
                    )
                    .await?;
                    *lock(&self.chosen) = Some(ep.clone());
                    return Ok((body.into(), media_type));
                }
                Err(e) => {
                    tracing::debug!(endpoint = %ep.base, error = %e, "manifest fetch failed, trying next endpoint");
                    last_err = Some(e);
                }
            }
        }
        match last_err {
            Some(ImageError::Registry { status: 404, .. }) | None => {
                Err(ImageError::ManifestNotFound {
                    reference: format!("{}/{}:{reference}", self.registry, self.repository),
                    endpoints: endpoints
                        .iter()
                        .map(|e| e.base.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
            }
            Some(e) => Err(e),
        }
    }

    /// Opens a blob for streaming; the caller verifies the digest.
    pub async fn blob(&self, digest: &Digest) -> Result<(reqwest::Response, String)> {
        let chosen = lock(&self.chosen).clone();
        let ep = match chosen {
            Some(ep) => ep,
            None => {
                self.endpoints
                    .first()
                    .cloned()
                    .ok_or_else(|| ImageError::ManifestNotFound {
                        reference: format!("{}/{}", self.registry, self.repository),
                        endpoints: String::new(),
                    })?
            }
        };
        let url = self.url(&ep, "blobs", digest.as_str());
        let resp = self.get(&ep, &url, None).await?;
        Ok((resp, url))
    }

    async fn get(
        &self,
        ep: &Endpoint,
        url: &str,
        accept: Option<&str>,
    ) -> Result<reqwest::Response> {
        let mut retried_auth = false;
        loop {
            let mut req = self.http.get(url);
            if let Some(a) = accept {
                req = req.header(reqwest::header::ACCEPT, a);
            }
            let authz = lock(&self.authz).get(&ep.base).cloned();
            if let Some(h) = &authz {
                req = req.header(reqwest::header::AUTHORIZATION, h);
            }
            let resp = send(req, self.progress, url).await?;
            let status = resp.status();
            if status.is_success() {
                return Ok(resp);
            }
            if status == reqwest::StatusCode::UNAUTHORIZED && !retried_auth {
                retried_auth = true;
                let challenge = resp
                    .headers()
                    .get(reqwest::header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_challenge);
                let Some(challenge) = challenge else {
                    return Err(ImageError::Unauthorized {
                        url: redact(url),
                        status: status.as_u16(),
                    });
                };
                let header = self.authorize(url, &challenge).await?;
                lock(&self.authz).insert(ep.base.clone(), header);
                continue;
            }
            if status == reqwest::StatusCode::UNAUTHORIZED
                || status == reqwest::StatusCode::FORBIDDEN
            {
                return Err(ImageError::Unauthorized {
                    url: redact(url),
                    status: status.as_u16(),
                });
            }
            let detail = error_detail(resp, self.progress, url).await;
            return Err(ImageError::Registry {
                url: redact(url),
                status: status.as_u16(),
                detail,
            });
        }
    }

    /// Answers a challenge with an `Authorization` header value.
    async fn authorize(&self, url: &str, challenge: &Challenge) -> Result<String> {
        let unauthorized = |status: u16| ImageError::Unauthorized {
            url: redact(url),
            status,
        };
        let auth = self.auth.clone().unwrap_or_default();
        match challenge.scheme.as_str() {
            "basic" => {
                let (u, p) = auth.basic().ok_or_else(|| unauthorized(401))?;
                let enc = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
                Ok(format!("Basic {enc}"))
            }
            "bearer" => {
                if !auth.registry_token.is_empty() {
                    return Ok(format!("Bearer {}", auth.registry_token));
                }
                let realm = challenge
                    .params
                    .get("realm")
                    .ok_or_else(|| unauthorized(401))?;
                let scope = challenge
                    .params
                    .get("scope")
                    .cloned()
                    .unwrap_or_else(|| format!("repository:{}:pull", self.repository));
                let service = challenge.params.get("service").cloned().unwrap_or_default();
                let req = if !auth.identity_token.is_empty() {
                    self.http.post(realm).form(&[
                        ("grant_type", "refresh_token"),
                        ("refresh_token", auth.identity_token.as_str()),
                        ("service", service.as_str()),
                        ("scope", scope.as_str()),
                        ("client_id", "virtcontainers"),
                    ])
                } else {
                    let mut req = self
                        .http
                        .get(realm)
                        .query(&[("service", service.as_str()), ("scope", scope.as_str())]);
                    if let Some((u, p)) = auth.basic() {
                        req = req.basic_auth(u, Some(p));
                    }
                    req
                };
                let resp = send(req, self.progress, realm).await?;
                if !resp.status().is_success() {
                    return Err(ImageError::Unauthorized {
                        url: redact(realm),
                        status: resp.status().as_u16(),
                    });
                }
                let body =
                    read_limited(resp, MAX_TOKEN, self.progress, "token answer", realm).await?;
                let tok: TokenResponse =
                    serde_json::from_slice(&body).map_err(|e| ImageError::BadDocument {
                        what: "token answer from",
                        digest: redact(realm),
                        reason: e.to_string(),
                    })?;
                let token = if tok.token.is_empty() {
                    tok.access_token
                } else {
                    tok.token
                };
                if token.is_empty() {
                    return Err(unauthorized(401));
                }
                Ok(format!("Bearer {token}"))
            }
            _ => Err(unauthorized(401)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stub_registry::{Body, Reply, Stub};

    /// A session for `test/img` on the stub, through a mirror with
    /// credentials in its URL when `mirror_creds` (they must never show).
    fn session(stub: &Stub, progress: Duration, mirror_creds: bool) -> Session {
        let mut cfg = RegistryConfig::default();
        if mirror_creds {
            cfg.hosts.insert(
                "example.org".into(),
                crate::config::HostConfig {
                    mirrors: vec![format!("http://bob:s3cret@{}", stub.host())],
                    skip_upstream: true,
                    ..Default::default()
                },
            );
        }
        let registry = if mirror_creds {
            "example.org".to_string()
        } else {
            stub.host()
        };
        let r = Reference::parse(&format!("{registry}/test/img:1")).unwrap();
        RegistryClient::new(cfg, progress)
            .unwrap()
            .session(&r, None)
    }

    const SECOND: Duration = Duration::from_secs(1);
    /// What a client that stopped reading may have been sent: socket buffers.
    const BOUNDED: u64 = 32 << 20;

    #[tokio::test]
    async fn a_small_manifest_reads_and_oversize_ones_are_refused() {
        let big = vec![b' '; (MAX_MANIFEST.bytes + 1) as usize];
        let stub = Stub::start(move |path| match path {
            p if p.contains("/manifests/ok") => Reply::new(200, Body::Chunked(b"{}".to_vec())),
            p if p.contains("/manifests/sized") => Reply::new(200, Body::Sized(big.clone())),
            _ => Reply::new(200, Body::Endless),
        })
        .await;
        let s = session(&stub, SECOND * 10, true);
        let (body, _) = s.manifest("ok").await.unwrap();
        assert_eq!(&body[..], b"{}");
        for reference in ["sized", "endless"] {
            let e = s.manifest(reference).await.unwrap_err();
            let msg = e.to_string();
            assert!(
                matches!(&e, ImageError::TooLarge { limit_name: "MAX_MANIFEST", limit, .. } if *limit == 4 << 20),
                "{reference}: {e:?}"
            );
            assert!(
                msg.contains(&stub.host()) && msg.contains("MAX_MANIFEST"),
                "{msg}"
            );
            assert!(!msg.contains("s3cret"), "credentials shown: {msg}");
            assert_eq!(e.kind(), crate::error::ErrorKind::FailedPrecondition);
        }
        // The announced-too-long one was not read at all; the endless one
        // only as far as the limit plus what socket buffers took.
        assert!(stub.sent() < BOUNDED, "sent {}", stub.sent());
    }

    #[tokio::test]
    async fn an_endless_token_answer_is_refused() {
        let port = std::sync::Arc::new(std::sync::OnceLock::<u16>::new());
        let p2 = port.clone();
        let stub = Stub::start(move |path| {
            if path.starts_with("/token") {
                return Reply::new(200, Body::Endless);
            }
            let realm = format!("http://127.0.0.1:{}/token", p2.get().copied().unwrap_or(0));
            Reply::new(401, Body::Sized(b"{}".to_vec())).header(
                "WWW-Authenticate",
                &format!("Bearer realm=\"{realm}\",service=\"s\""),
            )
        })
        .await;
        port.set(stub.port).unwrap();
        let e = session(&stub, SECOND * 10, false)
            .manifest("1")
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ImageError::TooLarge { limit_name: "MAX_TOKEN", url, .. } if url.contains("/token")),
            "{e:?}"
        );
        assert_eq!(e.kind(), crate::error::ErrorKind::FailedPrecondition);
        assert!(stub.sent() < BOUNDED, "sent {}", stub.sent());
    }

    #[tokio::test]
    async fn an_endless_error_body_is_read_only_in_part() {
        let stub = Stub::start(|_| Reply::new(503, Body::Endless)).await;
        let started = std::time::Instant::now();
        let e = session(&stub, SECOND * 10, true)
            .manifest("1")
            .await
            .unwrap_err();
        match &e {
            ImageError::Registry {
                status,
                detail,
                url,
            } => {
                assert_eq!(*status, 503);
                assert!(
                    detail.starts_with("xxx") && detail.len() <= ERROR_DETAIL_CHARS,
                    "{detail}"
                );
                assert!(!url.contains("s3cret"), "{url}");
            }
            other => panic!("expected a registry error, got {other:?}"),
        }
        assert_eq!(e.kind(), crate::error::ErrorKind::Unavailable);
        assert!(started.elapsed() < SECOND * 5, "{:?}", started.elapsed());
        assert!(stub.sent() < BOUNDED, "sent {}", stub.sent());
    }

    #[tokio::test]
    async fn a_registry_that_stops_sending_is_cancelled() {
        let stub = Stub::start(|_| {
            Reply::new(
                200,
                Body::Stall {
                    declared: 100,
                    data: b"{\"schemaVersion\"".to_vec(),
                },
            )
        })
        .await;
        let started = std::time::Instant::now();
        let e = session(&stub, SECOND, false)
            .manifest("1")
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ImageError::Stalled { what, url, timeout } if what == "manifest 1" && url.contains(&stub.host()) && *timeout == SECOND),
            "{e:?}"
        );
        assert_eq!(e.kind(), crate::error::ErrorKind::DeadlineExceeded);
        let took = started.elapsed();
        assert!(took >= SECOND && took < SECOND * 5, "{took:?}");
    }

    #[test]
    fn urls_lose_their_credentials() {
        assert_eq!(redact("http://u:p@h:5000/v2/x"), "http://h:5000/v2/x");
        assert_eq!(redact("https://h/v2/x?ns=y"), "https://h/v2/x?ns=y");
        assert_eq!(redact("weird://u:p@h"), "weird://h");
    }

    #[test]
    fn challenges_parse() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.docker.io/token");
        assert_eq!(c.params["service"], "registry.docker.io");
        assert_eq!(c.params["scope"], "repository:library/busybox:pull");
        let c = parse_challenge(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.params["realm"], "Registry Realm");
    }

    #[test]
    fn auth_field_decodes() {
        let a = AuthConfig {
            auth: base64::engine::general_purpose::STANDARD.encode("bob:s3cr:et"),
            ..Default::default()
        };
        assert_eq!(a.basic(), Some(("bob".into(), "s3cr:et".into())));
        assert_eq!(AuthConfig::default().basic(), None);
        assert!(!format!("{a:?}").contains(&a.auth));
    }
}
