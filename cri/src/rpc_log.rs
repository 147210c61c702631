//! One tower layer logs every RPC: its method, gRPC code, message and
//! duration — at info for calls that change something, at debug for the
//! List/Status polls kubelet makes every second.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use tonic::codegen::http;

#[derive(Debug, Clone, Copy, Default)]
pub struct RpcLogLayer;

impl<S> tower::Layer<S> for RpcLogLayer {
    type Service = RpcLog<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcLog { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RpcLog<S> {
    inner: S,
}

/// Read-only calls, polled constantly by kubelet.
fn is_poll(method: &str) -> bool {
    let name = method.rsplit('/').next().unwrap_or(method);
    name.starts_with("List")
        || name.ends_with("Status")
        || name.ends_with("Stats")
        || matches!(name, "Version" | "ImageFsInfo" | "RuntimeConfig")
}

impl<S, B, RB> tower::Service<http::Request<B>> for RpcLog<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Send,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_string();
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            let ms = start.elapsed().as_secs_f64() * 1000.0;
            let header = |name: &str| {
                res.as_ref()
                    .ok()
                    .and_then(|r| r.headers().get(name))
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            // Errors of unary calls travel as trailers-only responses,
            // whose status is in the headers.
            match header("grpc-status").filter(|c| c != "0") {
                Some(code) => {
                    let message = header("grpc-message").unwrap_or_default();
                    tracing::warn!(%method, code, message = %percent_decode(&message), ms, "rpc failed");
                }
                None if is_poll(&method) => tracing::debug!(%method, ms, "rpc"),
                None => tracing::info!(%method, ms, "rpc"),
            }
            res
        })
    }
}

/// grpc-message is percent-encoded.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_are_told_apart() {
        assert!(is_poll("/runtime.v1.RuntimeService/ListContainers"));
        assert!(is_poll("/runtime.v1.RuntimeService/PodSandboxStatus"));
        assert!(is_poll("/runtime.v1.RuntimeService/ListPodSandboxStats"));
        assert!(!is_poll("/runtime.v1.RuntimeService/RunPodSandbox"));
        assert!(!is_poll("/runtime.v1.ImageService/PullImage"));
    }

    #[test]
    fn messages_are_decoded() {
        assert_eq!(percent_decode("a%20b%3A%"), "a b:%");
        assert_eq!(percent_decode("plain"), "plain");
    }
}
