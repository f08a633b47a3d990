//! The SPIFFE bundle endpoint: the current bundle as a JWK Set over HTTPS
//! (SPIFFE Trust Domain and Bundle §5; `https_spiffe` profile when the
//! serving certificate is an SVID from this CA, `https_web` with a WebPKI
//! certificate), plus the same document on the plain admin port.
//!
//! Routes (both servers): `GET /` and `GET /bundle.jwks.json` →
//! `application/json` JWKS; `GET /root-cert.pem` → PEM roots.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::BundleChannel;
use crate::server::connections::{BoundedAccept, ConnectionLimit, Limited};
use crate::server::tls::HANDSHAKE_TIMEOUT;

/// Routes serving the bundle from `channel`.
pub fn routes(channel: BundleChannel) -> Router {
    Router::new()
        .route("/", get(jwks))
        .route("/bundle.jwks.json", get(jwks))
        .route("/root-cert.pem", get(root_pem))
        .with_state(channel)
}

/// The admin port's bundle routes: `/v1/bundle.jwks.json` and
/// `/v1/root-cert.pem`.
pub fn admin_routes(channel: BundleChannel) -> Router {
    Router::new()
        .route("/v1/bundle.jwks.json", get(jwks))
        .route("/v1/root-cert.pem", get(root_pem))
        .with_state(channel)
}

async fn jwks(State(channel): State<BundleChannel>) -> Response {
    let bundle = channel.current();
    match bundle.to_jwks().and_then(|j| j.to_json()) {
        Ok(body) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "application/json".to_string()),
                (
                    header::CACHE_CONTROL,
                    format!("max-age={}", bundle.refresh_hint().as_secs()),
                ),
            ],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot render the SPIFFE bundle");
            (StatusCode::INTERNAL_SERVER_ERROR, "bundle unavailable\n").into_response()
        }
    }
}

async fn root_pem(State(channel): State<BundleChannel>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        channel.current().roots_pem(),
    )
        .into_response()
}

/// How long a bundle endpoint connection may stay open: a fetch is one small
/// GET (pollers come back every `spiffe_refresh_hint`), so a connection older
/// than this is closed, keep-alive or not.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Serve the bundle endpoint over TLS on `listener` until `shutdown` is
/// true, at most `limit`'s connections at once, each for at most its
/// lifetime ([`CONNECTION_LIFETIME`]), a TLS handshake at most
/// [`HANDSHAKE_TIMEOUT`]. A failed handshake or connection is logged and does
/// not stop the server.
pub async fn serve_https(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    channel: BundleChannel,
    limit: ConnectionLimit,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let app = routes(channel);
    let mut accept = BoundedAccept::new(
        listener,
        limit,
        "bundle endpoint",
        "bundle.endpoint_max_connections",
    );
    while let Some((tcp, peer, slot)) = accept.next(&mut shutdown).await {
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "bundle endpoint TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "bundle endpoint TLS handshake timed out");
                    return;
                }
            };
            let service = TowerToHyperService::new(app);
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // hyper enforces its HTTP/1 header read timeout only with a timer.
            builder.http1().timer(TokioTimer::new());
            builder.http2().timer(TokioTimer::new());
            if let Err(e) = builder
                .serve_connection(TokioIo::new(Limited::new(tls, slot)), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "bundle endpoint connection ended with an error");
            }
        });
    }
    Ok(())
}
