//! The admin HTTP port: `/healthz` (process is up), `/readyz` (gRPC is
//! serving and the signing CA certificate is valid), `/metrics` (Prometheus
//! text format); the ledger and bundle routes are merged in by the runtime.
//!
//! [`serve`] bounds it like the gRPC port, because it needs no credentials
//! either and every pod can reach it (the filters' ledger lookups go there):
//! at most `server.admin_max_connections` connections (the rest wait in the
//! backlog), `server.admin_max_connections_per_ip` per address (the excess
//! closed at accept, so one pod cannot take the kubelet's probes with every
//! slot), request headers within [`HEADER_READ_TIMEOUT`], each connection
//! closed after [`CONNECTION_LIFETIME`], at most [`MAX_STREAMS`] requests
//! at once on an HTTP/2 connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::issuer::Issuer;
use crate::metrics::Metrics;
use crate::server::connections::{BoundedAccept, ConnectionLimit, Limited};

/// How long an admin-port connection stays open; Prometheus and the
/// filters' HTTP clients reconnect.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

/// How long a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests at once on one HTTP/2 connection (hyper's default is 200).
pub const MAX_STREAMS: u32 = 16;

/// Serve `app` on `listener` within `limit` until `shutdown`, then give
/// open connections up to `drain` to finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limit: ConnectionLimit,
    drain: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut accept = BoundedAccept::new(listener, limit, "admin", "server.admin_max_connections");
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // hyper enforces the header read timeout only with a timer.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS);
    let graceful = GracefulShutdown::new();
    while let Some((tcp, peer, slot)) = accept.next(&mut shutdown).await {
        let connection = builder
            .serve_connection(
                TokioIo::new(Limited::new(tcp, slot)),
                TowerToHyperService::new(app.clone()),
            )
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "admin connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("admin connections still open after the shutdown drain; dropped");
    }
    Ok(())
}

/// State shared by the admin handlers.
#[derive(Clone)]
pub struct AdminState {
    /// Metrics to render.
    pub metrics: Arc<Metrics>,
    /// Set once the gRPC listener is serving.
    pub serving: Arc<AtomicBool>,
    /// The issuer, to check the CA is within its validity.
    pub issuer: Arc<dyn Issuer>,
}

/// The admin router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if !state.serving.load(Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "gRPC not serving yet\n".to_string(),
        );
    }
    let v = state.issuer.signing_validity();
    let now = OffsetDateTime::now_utc();
    if now < v.not_before || now >= v.not_after {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "signing CA certificate not valid now (valid {} .. {})\n",
                v.not_before, v.not_after
            ),
        );
    }
    (StatusCode::OK, "ready\n".to_string())
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    match state.metrics.render() {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics encoding failed\n",
        )
            .into_response(),
    }
}
