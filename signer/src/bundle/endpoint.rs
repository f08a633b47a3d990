//! The SPIFFE bundle endpoint: the current bundle as a JWK Set over HTTPS
//! (SPIFFE Trust Domain and Bundle §5; `https_spiffe` profile when the
//! serving certificate is an SVID from this CA, `https_web` with a WebPKI
//! certificate), plus the same document on the plain admin port.
//!
//! Routes (both servers): `GET /` and `GET /bundle.jwks.json` →
//! `application/json` JWKS; `GET /root-cert.pem` → PEM roots.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::BundleChannel;

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

/// Serve the bundle endpoint over TLS on `listener` until `shutdown` is
/// true. A failed handshake or connection is logged and does not stop the
/// server.
pub async fn serve_https(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    channel: BundleChannel,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let app = routes(channel);
    loop {
        let (tcp, peer): (_, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "bundle endpoint accept failed");
                    continue;
                }
            },
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "bundle endpoint TLS handshake failed");
                    return;
                }
            };
            let service = TowerToHyperService::new(app);
            if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "bundle endpoint connection ended with an error");
            }
        });
    }
}
