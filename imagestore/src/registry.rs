//! A small distribution-API client: manifests and blobs over HTTP(S), endpoint
//! selection (mirrors, plain HTTP) and auth (anonymous, basic, bearer token).

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::config::{Endpoint, RegistryConfig};
use crate::digest::Digest;
use crate::error::{ImageError, Result};
use crate::manifest::ACCEPT_MANIFESTS;
use crate::reference::Reference;

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
}

impl RegistryClient {
    pub fn new(config: RegistryConfig) -> Result<Self> {
        let http = reqwest::Client::builder()
            .user_agent(concat!(
                "virtcontainers-imagestore/",
                env!("CARGO_PKG_VERSION")
            ))
            .connect_timeout(std::time::Duration::from_secs(30))
            // A registry that stops sending fails the pull (DeadlineExceeded)
            // instead of hanging it; slow but moving downloads are fine.
            .read_timeout(std::time::Duration::from_secs(60))
            .build()
            .map_err(|source| ImageError::Http {
                url: "(client set-up)".into(),
                source,
            })?;
        Ok(RegistryClient { http, config })
    }

    pub fn session(&self, reference: &Reference, auth: Option<AuthConfig>) -> Session {
        Session {
            http: self.http.clone(),
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
                    let body = resp.bytes().await.map_err(|source| ImageError::Http {
                        url: url.clone(),
                        source,
                    })?;
                    *lock(&self.chosen) = Some(ep.clone());
                    return Ok((body, media_type));
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
            let resp = req.send().await.map_err(|source| ImageError::Http {
                url: url.to_string(),
                source,
            })?;
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
                        url: url.to_string(),
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
                    url: url.to_string(),
                    status: status.as_u16(),
                });
            }
            let detail: String = resp
                .text()
                .await
                .unwrap_or_default()
                .chars()
                .take(300)
                .collect();
            return Err(ImageError::Registry {
                url: url.to_string(),
                status: status.as_u16(),
                detail,
            });
        }
    }

    /// Answers a challenge with an `Authorization` header value.
    async fn authorize(&self, url: &str, challenge: &Challenge) -> Result<String> {
        let unauthorized = |status: u16| ImageError::Unauthorized {
            url: url.to_string(),
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
                let resp = req.send().await.map_err(|source| ImageError::Http {
                    url: realm.clone(),
                    source,
                })?;
                if !resp.status().is_success() {
                    return Err(ImageError::Unauthorized {
                        url: realm.clone(),
                        status: resp.status().as_u16(),
                    });
                }
                let tok: TokenResponse = resp.json().await.map_err(|source| ImageError::Http {
                    url: realm.clone(),
                    source,
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
