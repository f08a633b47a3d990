//! End to end: the signer, sidecars with real mTLS, the real filter.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use meshward_e2e::host::{CompiledPlugin, OffsetClock};
use meshward_e2e::mesh::backend::spawn_echo;
use meshward_e2e::mesh::{LocalSigner, MeshContext, Sidecar, SidecarConfig, plaintext_request};
use meshward_e2e::wasm::read_filter_wasm;
use serde_json::json;

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const BACKEND: &str = "spiffe://cluster.local/ns/shop/sa/backend";

fn filter() -> CompiledPlugin {
    static C: OnceLock<CompiledPlugin> = OnceLock::new();
    C.get_or_init(|| CompiledPlugin::compile(&read_filter_wasm().unwrap()).unwrap())
        .clone()
}

struct Mesh {
    dir: tempfile::TempDir,
    signer: LocalSigner,
}

impl Mesh {
    async fn start() -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let signer = LocalSigner::start(&dir.path().join("ca"), Duration::from_secs(24 * 3600))
            .await
            .unwrap();
        Mesh { dir, signer }
    }

    fn ctx(&self) -> MeshContext {
        MeshContext {
            signer_grpc: self.signer.grpc_addr().unwrap(),
            signer_admin: self.signer.admin_addr().unwrap(),
            roots_pem: self.signer.roots_pem().unwrap(),
            tokens: self.signer.tokens(),
            filter: filter(),
        }
    }

    async fn client(&self, ns: &str, sa: &str) -> Sidecar {
        Sidecar::start(SidecarConfig::new(ns, sa), &self.ctx())
            .await
            .unwrap()
    }

    /// shop/backend with an echo app behind it and `tweak` applied.
    async fn backend(&self, tweak: impl FnOnce(&mut SidecarConfig)) -> Sidecar {
        let (app, _task) = spawn_echo("backend").await.unwrap();
        let mut c = SidecarConfig::new("shop", "backend");
        c.backend = Some(app);
        tweak(&mut c);
        Sidecar::start(c, &self.ctx()).await.unwrap()
    }
}

fn http_policy(mode: &str) -> String {
    json!({
        "mode": mode,
        "rules": [
            {"name": "frontend-reads-api", "action": "ALLOW",
             "from": [{"principals": ["cluster.local/ns/shop/sa/frontend"]}],
             "to": [{"methods": ["GET"], "paths": ["/api/*"]}]},
            {"name": "deny-reporter", "action": "DENY",
             "from": [{"principals": ["cluster.local/ns/batch/sa/reporter"]}]}
        ]
    })
    .to_string()
}

fn network_policy() -> String {
    json!({
        "filterType": "network",
        "rules": [
            {"name": "shop-connects", "action": "ALLOW", "from": [{"namespaces": ["shop"]}]},
            {"name": "deny-batch", "action": "DENY", "from": [{"namespaces": ["batch"]}]}
        ]
    })
    .to_string()
}

async fn get(from: &Sidecar, to: &Sidecar, path: &str) -> meshward_e2e::mesh::MeshResponse {
    from.request(to.inbound_addr(), Some(BACKEND), "GET", path, &[])
        .await
        .unwrap()
}

fn echo(r: &meshward_e2e::mesh::MeshResponse) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap()
}

#[tokio::test]
async fn http_filter_allows_and_denies_per_request() {
    let mesh = Mesh::start().await;
    let backend = mesh
        .backend(|c| c.http_filter = Some(http_policy("enforce")))
        .await;
    let frontend = mesh.client("shop", "frontend").await;
    let reporter = mesh.client("batch", "reporter").await;

    let ok = get(&frontend, &backend, "/api/items").await;
    assert_eq!(ok.status, 200);
    let seen = echo(&ok);
    let xfcc = seen["headers"]["x-forwarded-client-cert"].as_str().unwrap();
    assert!(xfcc.contains(&format!("URI={FRONTEND}")), "{xfcc}");
    assert!(xfcc.contains("Cert=\""), "{xfcc}");

    let post = frontend
        .request(
            backend.inbound_addr(),
            Some(BACKEND),
            "POST",
            "/api/items",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(post.status, 403, "only GET is allowed");
    let outside = get(&frontend, &backend, "/admin").await;
    assert_eq!(outside.status, 403, "only /api/* is allowed");

    let denied = get(&reporter, &backend, "/api/items").await;
    assert_eq!(denied.status, 403);
    assert!(
        denied
            .header("x-meshward-deny-reason")
            .unwrap()
            .contains("deny-reporter")
    );
}

#[tokio::test]
async fn network_filter_closes_denied_connections() {
    let mesh = Mesh::start().await;
    let backend = mesh
        .backend(|c| c.network_filter = Some(network_policy()))
        .await;
    let frontend = mesh.client("shop", "frontend").await;
    let reporter = mesh.client("batch", "reporter").await;
    assert_eq!(get(&frontend, &backend, "/anything").await.status, 200);
    let refused = reporter
        .request(
            backend.inbound_addr(),
            Some(BACKEND),
            "GET",
            "/anything",
            &[],
        )
        .await;
    assert!(
        refused.is_err(),
        "the connection must be closed, got {refused:?}"
    );
    assert!(backend.metrics_prometheus().contains("rule=\"deny-batch\""));
}

#[tokio::test]
async fn shadow_mode_reports_a_deny_without_enforcing_it() {
    let mesh = Mesh::start().await;
    let backend = mesh
        .backend(|c| c.http_filter = Some(http_policy("shadow")))
        .await;
    let reporter = mesh.client("batch", "reporter").await;
    let r = get(&reporter, &backend, "/api/items").await;
    assert_eq!(r.status, 200, "shadow mode does not block");
    let reason = echo(&r)["headers"]["x-meshward-deny-reason"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        reason.starts_with("shadow:") && reason.contains("deny-reporter"),
        "{reason}"
    );
    let metrics = backend.metrics_prometheus();
    assert!(
        metrics.contains("action=\"deny\",rule=\"deny-reporter\",mode=\"shadow\""),
        "{metrics}"
    );
}

#[tokio::test]
async fn plaintext_peer_is_denied() {
    let mesh = Mesh::start().await;
    let backend = mesh
        .backend(|c| {
            c.http_filter = Some(http_policy("enforce"));
            c.permissive = true;
        })
        .await;
    let r = plaintext_request(backend.inbound_addr(), "GET", "/api/items", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    // Claiming the frontend's identity in headers changes nothing.
    let forged = plaintext_request(
        backend.inbound_addr(),
        "GET",
        "/api/items",
        &[
            ("x-forwarded-client-cert", &format!("URI={FRONTEND}")),
            ("x-spiffe-id", FRONTEND),
        ],
    )
    .await
    .unwrap();
    assert_eq!(forged.status, 403);
}

#[tokio::test]
async fn forged_xfcc_and_identity_headers_are_ignored() {
    let mesh = Mesh::start().await;
    let backend = mesh
        .backend(|c| c.http_filter = Some(http_policy("enforce")))
        .await;
    let frontend = mesh.client("shop", "frontend").await;
    let reporter = mesh.client("batch", "reporter").await;
    let forged_xfcc = format!("By={BACKEND};Hash=00;URI={FRONTEND}");
    let forged: [(&str, &str); 3] = [
        ("x-forwarded-client-cert", &forged_xfcc),
        ("x-spiffe-id", FRONTEND),
        (
            "x-envoy-peer-metadata-id",
            "sidecar~10.0.0.1~frontend.shop~shop.svc.cluster.local",
        ),
    ];
    let r = reporter
        .request(
            backend.inbound_addr(),
            Some(BACKEND),
            "GET",
            "/api/items",
            &forged,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403, "the reporter stays the reporter");

    let r = frontend
        .request(
            backend.inbound_addr(),
            Some(BACKEND),
            "GET",
            "/api/items",
            &forged,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let headers = &echo(&r)["headers"];
    let xfcc = headers["x-forwarded-client-cert"].as_str().unwrap();
    assert!(
        !xfcc.contains("Hash=00;"),
        "forged XFCC reached the app: {xfcc}"
    );
    let real_hash = meshward_e2e::attributes::sha256_hex(&r.client_cert.as_ref().unwrap().leaf);
    assert!(xfcc.contains(&format!("Hash={real_hash}")), "{xfcc}");
    assert!(headers.get("x-spiffe-id").is_none());
    assert!(headers.get("x-envoy-peer-metadata-id").is_none());
}

#[tokio::test]
async fn peer_certificate_older_than_max_cert_age_is_denied() {
    let mesh = Mesh::start().await;
    let policy = json!({"rules": [{"name": "fresh-frontend", "action": "ALLOW",
        "from": [{"principals": ["cluster.local/ns/shop/sa/frontend"]}],
        "when": {"maxCertAge": "1h"}}]})
    .to_string();
    let now = mesh.backend(|c| c.http_filter = Some(policy.clone())).await;
    // The same policy on a proxy whose clock is two hours ahead: every
    // certificate it sees is two hours old.
    let later = mesh
        .backend(|c| {
            c.http_filter = Some(policy.clone());
            c.clock = Arc::new(OffsetClock {
                offset: Duration::from_secs(2 * 3600),
                ahead: true,
            });
        })
        .await;
    let frontend = mesh.client("shop", "frontend").await;
    assert_eq!(get(&frontend, &now, "/").await.status, 200);
    // Same caller, same certificate, same policy: only the age differs.
    assert_eq!(get(&frontend, &later, "/").await.status, 403);
}

#[tokio::test]
async fn rotation_mid_traffic_fails_no_request() {
    let mesh = Mesh::start().await;
    let short = |c: &mut SidecarConfig| {
        c.cert_ttl = Duration::from_secs(10);
        c.rotate_between = (0.5, 0.8);
    };
    let backend = mesh
        .backend(|c| {
            c.http_filter = Some(http_policy("enforce"));
            short(c);
        })
        .await;
    let mut fc = SidecarConfig::new("shop", "frontend");
    short(&mut fc);
    let frontend = Sidecar::start(fc, &mesh.ctx()).await.unwrap();
    let first = frontend.cert().unwrap();
    let (mut sent, mut failed) = (0u32, Vec::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while tokio::time::Instant::now() < deadline && sent < 100_000 {
        let generation_f = frontend.cert().unwrap().generation;
        let generation_b = backend.cert().unwrap().generation;
        if generation_f >= 3 && generation_b >= 3 {
            break;
        }
        match frontend
            .request(
                backend.inbound_addr(),
                Some(BACKEND),
                "GET",
                "/api/items",
                &[],
            )
            .await
        {
            Ok(r) if r.status == 200 => {}
            Ok(r) => failed.push(format!("status {}", r.status)),
            Err(e) => failed.push(format!("{e:#}")),
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let last = frontend.cert().unwrap();
    assert!(
        last.generation >= 3,
        "frontend rotated {} times",
        last.generation - 1
    );
    assert!(backend.cert().unwrap().generation >= 3);
    assert_ne!(first.leaf, last.leaf);
    assert!(sent > 0);
    assert!(
        failed.is_empty(),
        "{} of {sent} requests failed: {:?}",
        failed.len(),
        failed
    );
}

#[tokio::test]
async fn signer_restart_keeps_issuing_from_the_same_ca() {
    let mut mesh = Mesh::start().await;
    let roots_before = mesh.signer.roots_pem().unwrap();
    let backend = mesh
        .backend(|c| c.http_filter = Some(http_policy("enforce")))
        .await;
    mesh.signer.restart().await.unwrap();
    assert_eq!(
        mesh.signer.roots_pem().unwrap(),
        roots_before,
        "same CA after restart"
    );
    assert!(mesh.dir.path().join("ca").exists());
    // Issued after the restart, trusted by a sidecar that only knows the
    // bundle from before it.
    let frontend = mesh.client("shop", "frontend").await;
    assert_eq!(get(&frontend, &backend, "/api/items").await.status, 200);
}

#[tokio::test]
async fn invalid_plugin_config_keeps_the_sidecar_from_starting() {
    let mesh = Mesh::start().await;
    let (app, _task) = spawn_echo("backend").await.unwrap();
    for bad in ["", "{\"rules\": 3}", "{\"mode\": \"permissive\"}"] {
        let mut c = SidecarConfig::new("shop", "backend");
        c.backend = Some(app);
        c.http_filter = Some(bad.to_owned());
        let err = Sidecar::start(c, &mesh.ctx()).await.unwrap_err();
        assert!(
            format!("{err:#}").contains("proxy_on_configure returned false"),
            "{err:#}"
        );
    }
}

#[tokio::test]
async fn strict_sidecar_refuses_plaintext_before_any_http() {
    let mesh = Mesh::start().await;
    let backend = mesh
        .backend(|c| c.http_filter = Some(http_policy("enforce")))
        .await;
    let r = plaintext_request(backend.inbound_addr(), "GET", "/api/items", &[]).await;
    assert!(r.is_err(), "STRICT mTLS must not answer plaintext: {r:?}");
}

#[tokio::test]
async fn workload_from_another_ca_cannot_connect() {
    let mesh = Mesh::start().await;
    let other = Mesh::start().await;
    assert_ne!(
        mesh.signer.roots_pem().unwrap(),
        other.signer.roots_pem().unwrap()
    );
    let backend = mesh
        .backend(|c| c.http_filter = Some(http_policy("enforce")))
        .await;
    // Same SPIFFE ID as the allowed frontend, certificate from a foreign CA;
    // it trusts our CA too, so only the backend's check can stop it.
    let mut ctx = other.ctx();
    ctx.roots_pem.push_str(&mesh.signer.roots_pem().unwrap());
    let impostor = Sidecar::start(SidecarConfig::new("shop", "frontend"), &ctx)
        .await
        .unwrap();
    let r = impostor
        .request(
            backend.inbound_addr(),
            Some(BACKEND),
            "GET",
            "/api/items",
            &[],
        )
        .await;
    assert!(
        r.is_err(),
        "a foreign CA's certificate must fail the handshake: {r:?}"
    );
    let genuine = mesh.client("shop", "frontend").await;
    assert_eq!(get(&genuine, &backend, "/api/items").await.status, 200);
}
