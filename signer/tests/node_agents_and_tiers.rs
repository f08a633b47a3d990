//! Trusted node agents (`ImpersonatedIdentity`) and per-namespace issuance
//! tiers, against a real signer over TLS.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/harness.rs"]
mod harness;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use harness::{Harness, assert_refused, id};
use meshward_signer::client::{CallOptions, IssuedCertificate, WorkloadKey, WorkloadKeyType};
use meshward_signer::config::Config;
use meshward_signer::observer::{IssuanceEvent, IssuanceObserver, ObserveFuture};
use meshward_signer::policy::tiers::{KeyType, TierConfig};
use tonic::Code;
use x509_parser::prelude::*;

const HOUR: u64 = 3600;

fn tiers(c: &mut Config) {
    c.authn.trusted_node_accounts = vec!["istio-system/ztunnel".to_string()];
    // Node binding has its own tests below, against a fake API server.
    c.authn.unbound_node_agents = true;
    c.policy.tiers = vec![
        TierConfig {
            name: "critical".into(),
            namespaces: vec!["payments".into()],
            namespace_selector: Default::default(),
            default_ttl: Some(Duration::from_secs(12 * HOUR)),
            max_ttl: Some(Duration::from_secs(12 * HOUR)),
            allowed_key_types: Some(vec![KeyType::P256]),
        },
        TierConfig {
            name: "dev".into(),
            namespaces: vec!["dev-*".into()],
            namespace_selector: Default::default(),
            default_ttl: None,
            max_ttl: Some(Duration::from_secs(7 * 24 * HOUR)),
            allowed_key_types: None,
        },
    ];
}

fn lifetime(cert: &IssuedCertificate) -> i64 {
    let (_, leaf) = X509Certificate::from_der(&cert.leaf).unwrap();
    leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp()
}

fn san(cert: &IssuedCertificate) -> String {
    let (_, leaf) = X509Certificate::from_der(&cert.leaf).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap().value;
    match &san.general_names[..] {
        [GeneralName::URI(u)] => u.to_string(),
        other => panic!("unexpected SANs {other:?}"),
    }
}

fn ztunnel_for(h: &Harness, target: &str) -> CallOptions {
    let mut o = h.opts("istio-system", "ztunnel");
    o.impersonated_identity = Some(target.to_string());
    o
}

#[derive(Default)]
struct Recorder(Mutex<Vec<(String, String)>>);

impl IssuanceObserver for Recorder {
    fn name(&self) -> &'static str {
        "test-recorder"
    }
    fn record<'a>(&'a self, e: &'a IssuanceEvent) -> ObserveFuture<'a> {
        Box::pin(async move {
            self.0
                .lock()
                .unwrap()
                .push((e.caller.spiffe_id.to_string(), e.spiffe_id.to_string()));
            Ok(())
        })
    }
}

// ---------- trusted node agents ----------

#[tokio::test]
async fn trusted_node_agent_gets_a_certificate_for_another_identity_and_both_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = meshward_signer::client::token::TokenIssuer::generate(
        harness::K8S_ISSUER,
        meshward_signer::authn::keys::JwtAlgorithm::Es256,
    )
    .unwrap();
    let mut config = harness::test_config(dir.path(), &tokens);
    tiers(&mut config);
    let recorder = Arc::new(Recorder::default());
    let signer = meshward_signer::Signer::builder(config)
        .observer(recorder.clone())
        .serve()
        .await
        .unwrap();
    let client = meshward_signer::client::CaClient::connect(
        signer.grpc_addr(),
        signer.roots_pem(),
        "localhost",
    )
    .await
    .unwrap();
    let target = id("default", "sleep");
    let opts = CallOptions {
        token: Some(
            tokens
                .token_for("istio-system", "ztunnel", harness::now_unix())
                .unwrap(),
        ),
        impersonated_identity: Some(target.to_string()),
        ..CallOptions::default()
    };
    let key = WorkloadKey::generate(WorkloadKeyType::EcdsaP256).unwrap();
    let cert = client
        .request_certificate(&key, &target, &opts)
        .await
        .unwrap();
    assert_eq!(san(&cert), target.to_string());
    assert_eq!(
        recorder.0.lock().unwrap().clone(),
        vec![(
            "spiffe://cluster.local/ns/istio-system/sa/ztunnel".to_string(),
            target.to_string()
        )]
    );
    signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn impersonation_by_a_non_node_account_is_refused() {
    let h = Harness::start_with(tiers).await;
    // right namespace, wrong account; and an ordinary workload
    for (ns, sa) in [
        ("istio-system", "istiod"),
        ("default", "sleep"),
        ("ztunnel", "istio-system"),
    ] {
        let mut opts = h.opts(ns, sa);
        opts.impersonated_identity = Some(id("payments", "api").to_string());
        let r = h.issue_for(&id("payments", "api"), &opts).await;
        assert_refused(r, Code::PermissionDenied, "not a trusted node agent");
    }
}

#[tokio::test]
async fn node_agent_csr_for_a_third_identity_is_refused() {
    let h = Harness::start_with(tiers).await;
    let opts = ztunnel_for(&h, &id("default", "sleep").to_string());
    let r = h.issue_for(&id("kube-system", "admin"), &opts).await;
    assert_refused(
        r,
        Code::PermissionDenied,
        "but the caller is spiffe://cluster.local/ns/default/sa/sleep",
    );
}

#[tokio::test]
async fn node_agent_impersonating_another_trust_domain_is_refused() {
    let h = Harness::start_with(tiers).await;
    let opts = ztunnel_for(&h, "spiffe://evil.example/ns/default/sa/sleep");
    let r = h.issue_for(&id("default", "sleep"), &opts).await;
    assert_refused(r, Code::PermissionDenied, "outside trust domain");
}

#[tokio::test]
async fn node_agent_impersonating_a_non_workload_id_is_refused() {
    let h = Harness::start_with(tiers).await;
    let opts = ztunnel_for(&h, "spiffe://cluster.local/admin");
    let r = h.issue_for(&id("default", "sleep"), &opts).await;
    assert_refused(r, Code::InvalidArgument, "is not /ns/<ns>/sa/<sa>");
}

#[tokio::test]
async fn impersonated_identity_gets_the_tier_of_its_own_namespace() {
    let h = Harness::start_with(tiers).await;
    let mut opts = ztunnel_for(&h, &id("payments", "api").to_string());
    opts.validity_secs = 24 * 3600;
    let (_, cert) = h.issue_for(&id("payments", "api"), &opts).await.unwrap();
    assert_eq!(lifetime(&cert), 12 * 3600 + 60);
}

// ---------- tiers ----------

#[tokio::test]
async fn critical_tier_clamps_ttl_to_12h() {
    let h = Harness::start_with(tiers).await;
    for asked in [0, 24 * 3600, 30 * 24 * 3600] {
        let mut opts = h.opts("payments", "api");
        opts.validity_secs = asked;
        let (_, cert) = h.issue("payments", "api", &opts).await.unwrap();
        assert_eq!(lifetime(&cert), 12 * 3600 + 60, "asked {asked}");
    }
}

#[tokio::test]
async fn dev_tier_allows_up_to_seven_days() {
    let h = Harness::start_with(tiers).await;
    let mut opts = h.opts("dev-alice", "app");
    opts.validity_secs = 7 * 24 * 3600;
    let (_, cert) = h.issue("dev-alice", "app", &opts).await.unwrap();
    assert_eq!(lifetime(&cert), 7 * 24 * 3600 + 60);
    // default TTL is inherited from the base policy
    let (_, cert) = h
        .issue("dev-alice", "app", &h.opts("dev-alice", "app"))
        .await
        .unwrap();
    assert_eq!(lifetime(&cert), 24 * 3600 + 60);
}

#[tokio::test]
async fn namespace_in_no_tier_keeps_the_24h_max() {
    let h = Harness::start_with(tiers).await;
    let mut opts = h.opts("default", "sleep");
    opts.validity_secs = 7 * 24 * 3600;
    let (_, cert) = h.issue("default", "sleep", &opts).await.unwrap();
    assert_eq!(lifetime(&cert), 24 * 3600 + 60);
}

#[tokio::test]
async fn rsa_key_in_a_p256_only_tier_is_refused() {
    let h = Harness::start_with(tiers).await;
    let key = WorkloadKey::generate(WorkloadKeyType::Rsa2048).unwrap();
    let r = h
        .client
        .request_certificate(&key, &id("payments", "api"), &h.opts("payments", "api"))
        .await;
    assert_refused(
        r,
        Code::InvalidArgument,
        "key type rsa is not allowed in tier critical",
    );
    // the same key is fine outside the tier
    h.client
        .request_certificate(&key, &id("default", "sleep"), &h.opts("default", "sleep"))
        .await
        .unwrap();
}

// ---------- label-selector tiers ----------

/// A local stand-in for the API server's `GET /api/v1/namespaces/{name}`
/// (recorded response shape; no Kubernetes API server can run here).
async fn namespace_api(
    labels: std::collections::HashMap<String, serde_json::Value>,
    hits: Arc<std::sync::atomic::AtomicUsize>,
) -> std::net::SocketAddr {
    use axum::extract::Path;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/api/v1/namespaces/{name}",
        axum::routing::get(move |Path(name): Path<String>| {
            let labels = labels.clone();
            let hits = hits.clone();
            async move {
                hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let body = serde_json::json!({
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {
                        "name": name,
                        "uid": "5c0e6a52-0000-0000-0000-000000000000",
                        "resourceVersion": "1234",
                        "labels": labels.get(&name).cloned().unwrap_or_else(|| serde_json::json!({
                            "kubernetes.io/metadata.name": name
                        }))
                    },
                    "spec": {"finalizers": ["kubernetes"]},
                    "status": {"phase": "Active"}
                });
                axum::Json(body)
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn selector_tier(api: std::net::SocketAddr) -> impl FnOnce(&mut Config) {
    move |c: &mut Config| {
        c.policy.kubernetes = Some(meshward_signer::config::KubeApiConfig {
            api_server: format!("http://{api}"),
            ca_file: None,
            token_file: None,
        });
        c.policy.tiers = vec![TierConfig {
            name: "critical".into(),
            namespaces: Vec::new(),
            namespace_selector: [("meshward.io/tier".to_string(), "critical".to_string())]
                .into_iter()
                .collect(),
            default_ttl: Some(Duration::from_secs(12 * HOUR)),
            max_ttl: Some(Duration::from_secs(12 * HOUR)),
            allowed_key_types: None,
        }];
    }
}

#[tokio::test]
async fn namespace_label_selects_the_tier_and_is_cached() {
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let labels = [(
        "payments".to_string(),
        serde_json::json!({"kubernetes.io/metadata.name": "payments", "meshward.io/tier": "critical"}),
    )]
    .into_iter()
    .collect();
    let api = namespace_api(labels, hits.clone()).await;
    let h = Harness::start_with(selector_tier(api)).await;
    for _ in 0..2 {
        let mut opts = h.opts("payments", "api");
        opts.validity_secs = 24 * 3600;
        let (_, cert) = h.issue("payments", "api", &opts).await.unwrap();
        assert_eq!(lifetime(&cert), 12 * 3600 + 60);
    }
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "labels cached"
    );
    let mut opts = h.opts("default", "sleep");
    opts.validity_secs = 24 * 3600;
    let (_, cert) = h.issue("default", "sleep", &opts).await.unwrap();
    assert_eq!(
        lifetime(&cert),
        24 * 3600 + 60,
        "unlabelled namespace keeps the base policy"
    );
}

#[tokio::test]
async fn unreadable_namespace_labels_refuse_instead_of_guessing_the_tier() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let h = Harness::start_with(selector_tier(closed)).await;
    let r = h.issue("payments", "api", &h.opts("payments", "api")).await;
    assert_refused(r, Code::Unavailable, "cannot read the labels");
}

#[test]
fn policy_explain_shows_tier_ttls_keys_and_node_agents() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("signer.toml");
    std::fs::write(
        &cfg,
        r#"
[authn]
trusted_node_accounts = ["istio-system/ztunnel"]
unbound_node_agents = true
[[policy.tiers]]
name = "critical"
namespaces = ["payments"]
default_ttl = "12h"
max_ttl = "12h"
allowed_key_types = ["p256"]
"#,
    )
    .unwrap();
    let run = |ns: &str, sa: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshward-signer"))
            .args(["policy", "explain", "--ns", ns, "--sa", sa, "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let p = run("payments", "api");
    assert!(
        p.contains("spiffe://cluster.local/ns/payments/sa/api"),
        "{p}"
    );
    assert!(p.contains("tier:              critical"), "{p}");
    assert!(p.contains("max TTL:           12h"), "{p}");
    assert!(p.contains("key types:         p256\n"), "{p}");
    assert!(p.contains("node agent:        no"), "{p}");
    assert!(
        p.contains("rate limit:        10 requests at once per pod, then one per 1m"),
        "{p}"
    );
    let z = run("istio-system", "ztunnel");
    assert!(z.contains("tier:              default"), "{z}");
    assert!(z.contains("max TTL:           1day"), "{z}");
    assert!(
        z.contains("node agent:        yes: may request ANY identity"),
        "{z}"
    );
}
