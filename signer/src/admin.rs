//! The admin HTTP port: `/healthz` (process is up), `/readyz` (gRPC is
//! serving and the signing CA certificate is valid), `/metrics` (Prometheus
//! text format).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use time::OffsetDateTime;

use crate::issuer::Issuer;
use crate::metrics::Metrics;

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
