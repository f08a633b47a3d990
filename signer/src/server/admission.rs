//! Admission before decoding: `server.max_concurrent_requests` is taken
//! when a `CreateCertificate` stream *opens*, before tonic reads its body.
//!
//! tonic decodes a unary request in full before calling the handler, and
//! reserves the message's declared length (up to the 128 KiB cap) as soon as
//! it has read the 5-byte prefix. A limit taken inside the handler therefore
//! bounds only the requests being *signed*: a client could open 100 streams
//! on each of its connections, declare 128 KiB on each and send the bytes
//! slowly, and the signer would buffer them all before refusing anything —
//! about 800 MiB from one address at the per-address connection limit.
//! Taken here, the same permit bounds the bodies being received as well:
//! at most `max_concurrent_requests` × the message cap (256 × 128 KiB =
//! 32 MiB) for the whole signer. A stream beyond the limit is answered
//! `RESOURCE_EXHAUSTED` at once, its body never read (h2 discards it and
//! returns the flow-control window).
//!
//! A message over the size cap is refused by tonic from its length prefix
//! with `OUT_OF_RANGE`; gRPC's status-code guide and grpc-go (so istiod and
//! istio-agent) use `RESOURCE_EXHAUSTED` for that, so the answer is
//! rewritten here ([`message_too_large_as_resource_exhausted`]).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::sync::Semaphore;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tracing::warn;

use crate::metrics::{Metrics, Outcome};

/// A gRPC service behind the in-flight limit (see the module docs).
#[derive(Clone)]
pub struct Admitted<S> {
    inner: S,
    in_flight: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl<S> Admitted<S> {
    /// `inner` answering at most `max_in_flight` requests at once, counting
    /// refusals into `metrics`.
    pub fn new(inner: S, max_in_flight: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            metrics,
        }
    }
}

impl<S: NamedService> NamedService for Admitted<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send>>;

impl<S> tower::Service<Request<Body>> for Admitted<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Response<Body>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            self.metrics.request(Outcome::ResourceExhausted);
            let peer = request
                .extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
                .map(|a| a.to_string())
                .unwrap_or_default();
            warn!(%peer, "refused: too many requests in flight");
            let refusal = tonic::Status::resource_exhausted(
                "signer is at its concurrent request limit; retry with backoff",
            )
            .into_http();
            return Box::pin(async move { Ok(refusal) });
        };
        let answer = self.inner.call(request);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let response = answer.await;
            // Held until the answer is built: receiving, decoding, signing
            // and recording all happen inside.
            drop(permit);
            response.map(|r| message_too_large_as_resource_exhausted(r, &metrics))
        })
    }
}

/// tonic's refusal of a message over `max_decoding_message_size` is a
/// trailers-only answer with `grpc-status: 11` (OUT_OF_RANGE) and a message
/// starting "Error, decoded message length too large"; the service itself
/// never answers OUT_OF_RANGE. That one answer becomes RESOURCE_EXHAUSTED,
/// as grpc-go answers, with the limit in the message.
fn message_too_large_as_resource_exhausted(
    response: Response<Body>,
    metrics: &Metrics,
) -> Response<Body> {
    let headers = response.headers();
    let out_of_range = headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"11");
    // grpc-message is percent-encoded on the wire (RFC 3986 unreserved kept).
    let too_large = headers.get("grpc-message").is_some_and(|v| {
        let m = v.as_bytes();
        m.starts_with(b"Error, decoded message length too large")
            || m.starts_with(b"Error,%20decoded%20message%20length%20too%20large")
    });
    if !(out_of_range && too_large) {
        return response;
    }
    metrics.request(Outcome::ResourceExhausted);
    warn!("refused: request message over the size limit");
    tonic::Status::resource_exhausted(format!(
        "request message larger than the {} bytes allowed",
        super::ca_service::MAX_REQUEST_MESSAGE_BYTES
    ))
    .into_http()
}
