//! A trivial gRPC service over raw bytes, for tests and benchmarks of the
//! layer with real tonic on the server side (feature `testing`).
//!
//! `vc.test.Echo` methods (all messages are raw bytes):
//! - `Unary`: the request back;
//! - `Big`: request = n as u64 BE; response = n bytes, byte i = i as u8;
//! - `Stream`: request = count, size as u32 BE; `count` messages of `size`
//!   bytes each, message i filled with i as u8;
//! - `Sum`: response = the request's length and byte sum, each u64 BE.
//!
//! [`FakeVersion`] is `runtime.v1.RuntimeService` with only `Version`
//! (a hand-encoded VersionResponse), for clients of the real CRI API.

use std::{convert::Infallible, task::Poll};

use bytes::{Buf, BufMut, Bytes};
use tonic::{
    body::Body,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::{http, Body as HttpBody, BoxFuture, StdError},
    server::{Grpc, NamedService},
    Request, Response, Status,
};

/// The largest message either way.
pub const MAX_MESSAGE: usize = 64 << 20;

/// Messages are their bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct BytesCodec;

impl Codec for BytesCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;

    fn encoder(&mut self) -> Self::Encoder {
        BytesCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        BytesCodec
    }
}

impl Encoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// A unary method from a function of the request's bytes.
struct Unary(fn(Bytes) -> Result<Bytes, Status>);

impl tower::Service<Request<Bytes>> for Unary {
    type Response = Response<Bytes>;
    type Error = Status;
    type Future = std::future::Ready<Result<Response<Bytes>, Status>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        std::future::ready((self.0)(req.into_inner()).map(Response::new))
    }
}

type Messages = tokio_stream::Iter<std::vec::IntoIter<Result<Bytes, Status>>>;

struct Streaming;

impl tower::Service<Request<Bytes>> for Streaming {
    type Response = Response<Messages>;
    type Error = Status;
    type Future = std::future::Ready<Result<Response<Messages>, Status>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let mut b = req.into_inner();
        if b.len() != 8 {
            return std::future::ready(Err(Status::invalid_argument("count and size")));
        }
        let count = b.get_u32();
        let size = b.get_u32() as usize;
        let messages: Vec<_> = (0..count)
            .map(|i| Ok(Bytes::from(vec![i as u8; size])))
            .collect();
        std::future::ready(Ok(Response::new(tokio_stream::iter(messages))))
    }
}

fn big(mut b: Bytes) -> Result<Bytes, Status> {
    if b.len() != 8 {
        return Err(Status::invalid_argument("a u64"));
    }
    let n = b.get_u64() as usize;
    if n > MAX_MESSAGE {
        return Err(Status::invalid_argument("too big"));
    }
    Ok((0..n).map(|i| i as u8).collect::<Vec<u8>>().into())
}

fn sum(b: Bytes) -> Result<Bytes, Status> {
    let total: u64 = b.iter().map(|&x| u64::from(x)).sum();
    let mut out = Vec::with_capacity(16);
    out.put_u64(b.len() as u64);
    out.put_u64(total);
    Ok(out.into())
}

fn grpc() -> Grpc<BytesCodec> {
    Grpc::new(BytesCodec).max_decoding_message_size(MAX_MESSAGE)
}

fn unimplemented() -> http::Response<Body> {
    Status::unimplemented("no such method").into_http()
}

/// The `vc.test.Echo` service.
#[derive(Debug, Clone, Copy, Default)]
pub struct Echo;

impl NamedService for Echo {
    const NAME: &'static str = "vc.test.Echo";
}

impl<B> tower::Service<http::Request<B>> for Echo
where
    B: HttpBody + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        Box::pin(async move {
            Ok(match req.uri().path() {
                "/vc.test.Echo/Unary" => grpc().unary(Unary(Ok), req).await,
                "/vc.test.Echo/Big" => grpc().unary(Unary(big), req).await,
                "/vc.test.Echo/Sum" => grpc().unary(Unary(sum), req).await,
                "/vc.test.Echo/Stream" => grpc().server_streaming(Streaming, req).await,
                _ => unimplemented(),
            })
        })
    }
}

/// The VersionResponse [`FakeVersion`] answers: version "0.1.0",
/// runtime_name "fake-vcrid", runtime_version "0.0.1",
/// runtime_api_version "v1".
pub const FAKE_RUNTIME_NAME: &str = "fake-vcrid";

fn version(_: Bytes) -> Result<Bytes, Status> {
    let mut out = Vec::new();
    for (field, value) in [
        (1u8, "0.1.0"),
        (2, FAKE_RUNTIME_NAME),
        (3, "0.0.1"),
        (4, "v1"),
    ] {
        out.push(field << 3 | 2);
        out.push(value.len() as u8);
        out.extend_from_slice(value.as_bytes());
    }
    Ok(out.into())
}

/// `runtime.v1.RuntimeService` with only Version.
#[derive(Debug, Clone, Copy, Default)]
pub struct FakeVersion;

impl NamedService for FakeVersion {
    const NAME: &'static str = "runtime.v1.RuntimeService";
}

impl<B> tower::Service<http::Request<B>> for FakeVersion
where
    B: HttpBody + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        Box::pin(async move {
            Ok(match req.uri().path() {
                "/runtime.v1.RuntimeService/Version" => grpc().unary(Unary(version), req).await,
                _ => unimplemented(),
            })
        })
    }
}

/// Serves [`Echo`] and [`FakeVersion`] on `listener` until `shutdown`,
/// through the layer or not.
pub async fn serve(
    listener: tokio::net::UnixListener,
    rewrite: bool,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let router = tonic::transport::Server::builder()
        .add_service(Echo)
        .add_service(FakeVersion);
    if rewrite {
        router
            .serve_with_incoming_shutdown(super::incoming(listener), shutdown)
            .await
    } else {
        router
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                shutdown,
            )
            .await
    }
}
