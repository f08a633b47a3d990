//! The mesh on real Envoy 1.40 (V8): every workload's sidecar is an Envoy
//! process, certificates come from the signer over its gRPC API and reach
//! Envoy over file-based SDS, the filter is configured from the repo's own
//! WasmPlugin manifests as istiod would.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/envoy_mesh.rs"]
mod envoy_mesh;

use std::time::Duration;

use envoy_mesh::{BACKEND, FRONTEND, Mesh, echo};
use meshward_e2e::envoy::bootstrap::InboundApp;
use meshward_e2e::envoy::client::{self, MtlsClient};
use meshward_e2e::envoy::sidecar::SidecarSpec;
use meshward_e2e::envoy::wasmplugin::WasmPlugin;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_filter_in_envoy_allows_and_denies_per_request_with_the_reason() {
    let mesh = Mesh::start().await;
    let backend = mesh.backend(vec![mesh.http_manifest()], |_| {}).await;
    let frontend = mesh.client("shop", "frontend", &[&backend]).await;
    let reporter = mesh.client("batch", "reporter", &[&backend]).await;

    let ok = mesh.get(&frontend, "/api/orders").await;
    assert_eq!(ok.status, 200, "{ok:?}\n{}", backend.log());
    let xfcc = echo(&ok)["headers"]["x-forwarded-client-cert"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(xfcc.contains(&format!("URI={FRONTEND}")), "{xfcc}");
    assert!(
        xfcc.contains("Cert=\""),
        "the manifests' EnvoyFilter turns Cert on: {xfcc}"
    );

    let post = client::http(
        frontend.outbound_addr(),
        "backend.shop",
        "POST",
        "/api/orders",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(post.status, 403, "only GET is allowed");
    assert!(
        post.header("x-meshward-deny-reason")
            .unwrap()
            .contains("no ALLOW rule matched"),
        "{post:?}"
    );
    let admin = mesh.get(&frontend, "/admin").await;
    assert_eq!(admin.status, 403, "only /api/* is allowed");

    let denied = mesh.get(&reporter, "/api/orders").await;
    assert_eq!(denied.status, 403);
    assert!(
        denied
            .header("x-meshward-deny-reason")
            .unwrap()
            .contains("deny-batch"),
        "{denied:?}"
    );
    let _ = BACKEND;
}
