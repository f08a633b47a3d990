//! Where token keys come from beyond static files: OIDC discovery (local
//! HTTP(S) servers on 127.0.0.1 stand in for the issuer), Kubernetes
//! TokenReview (a local server answering with recorded API-server
//! responses: no Kubernetes API server can run here), and per-cluster
//! issuers selected by the `ClusterID` header.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/harness.rs"]
mod harness;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use axum::routing::{get, post};
use harness::{Harness, K8S_ISSUER, assert_refused, id, now_unix};
use meshward_signer::authn::keys::JwtAlgorithm;
use meshward_signer::client::CallOptions;
use meshward_signer::client::token::TokenIssuer;
use meshward_signer::config::{Config, JwtIssuerConfig, TokenReviewConfig};
use serde_json::{Value, json};
use tonic::Code;

fn es256(issuer: &str) -> TokenIssuer {
    TokenIssuer::generate(issuer, JwtAlgorithm::Es256).unwrap()
}

fn with_token(t: String) -> CallOptions {
    CallOptions {
        token: Some(t),
        ..CallOptions::default()
    }
}

// ---------- a fake OIDC issuer ----------

#[derive(Clone)]
struct Oidc {
    /// What the discovery document says the issuer is (normally its URL).
    claimed_issuer: Arc<Mutex<Option<String>>>,
    jwks: Arc<Mutex<String>>,
    discovery_hits: Arc<AtomicUsize>,
    jwks_hits: Arc<AtomicUsize>,
    addr: SocketAddr,
    https: bool,
}

impl Oidc {
    fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    async fn start(jwks: String) -> Self {
        Self::start_with_tls(jwks, None).await
    }

    /// With `tls`, serve HTTPS with that rustls config.
    async fn start_with_tls(jwks: String, tls: Option<rustls::ServerConfig>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let oidc = Oidc {
            claimed_issuer: Arc::new(Mutex::new(None)),
            jwks: Arc::new(Mutex::new(jwks)),
            discovery_hits: Arc::new(AtomicUsize::new(0)),
            jwks_hits: Arc::new(AtomicUsize::new(0)),
            addr,
            https: tls.is_some(),
        };
        let app = axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                get(|State(o): State<Oidc>| async move {
                    o.discovery_hits.fetch_add(1, Ordering::SeqCst);
                    let issuer = o.claimed_issuer.lock().unwrap().clone().unwrap_or_else(|| o.url());
                    Json(json!({"issuer": issuer, "jwks_uri": format!("{}/openid/v1/jwks", o.url())}))
                }),
            )
            .route(
                "/openid/v1/jwks",
                get(|State(o): State<Oidc>| async move {
                    o.jwks_hits.fetch_add(1, Ordering::SeqCst);
                    o.jwks.lock().unwrap().clone()
                }),
            )
            .with_state(oidc.clone());
        match tls {
            None => {
                tokio::spawn(async move { axum::serve(listener, app).await });
            }
            Some(config) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
                tokio::spawn(async move {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else {
                            break;
                        };
                        let acceptor = acceptor.clone();
                        let app = app.clone();
                        tokio::spawn(async move {
                            let Ok(stream) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let svc = hyper_util::service::TowerToHyperService::new(app);
                            let _ = hyper_util::server::conn::auto::Builder::new(
                                hyper_util::rt::TokioExecutor::new(),
                            )
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                            .await;
                        });
                    }
                });
            }
        }
        oidc
    }
}

/// A CA (PEM) and a rustls server config for 127.0.0.1 signed by it.
fn https_identity() -> (String, rustls::ServerConfig) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test issuer CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    )
    .unwrap();
    (ca_cert.pem(), config)
}

fn discovery_issuer(url: &str, min_refresh_secs: u64) -> JwtIssuerConfig {
    JwtIssuerConfig {
        oidc_discovery: true,
        min_refresh_interval: std::time::Duration::from_secs(min_refresh_secs),
        ..JwtIssuerConfig::new(url)
    }
}

#[tokio::test]
async fn token_from_an_oidc_discovered_issuer_is_accepted() {
    let oidc = Oidc::start(String::new()).await;
    let tokens = es256(&oidc.url());
    *oidc.jwks.lock().unwrap() = tokens.jwks_json();
    let url = oidc.url();
    let h = Harness::start_with(|c| c.authn.jwt.push(discovery_issuer(&url, 30))).await;
    for _ in 0..3 {
        h.issue(
            "default",
            "sleep",
            &with_token(tokens.token_for("default", "sleep", now_unix()).unwrap()),
        )
        .await
        .unwrap();
    }
    assert_eq!(
        oidc.discovery_hits.load(Ordering::SeqCst),
        1,
        "cached after the first fetch"
    );
}

#[tokio::test]
async fn oidc_discovery_over_https_with_the_configured_ca_is_accepted() {
    let (ca_pem, tls) = https_identity();
    let oidc = Oidc::start_with_tls(String::new(), Some(tls)).await;
    let tokens = es256(&oidc.url());
    *oidc.jwks.lock().unwrap() = tokens.jwks_json();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("issuer-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let url = oidc.url();
    let h = Harness::start_with(|c| {
        c.authn.jwt.push(JwtIssuerConfig {
            ca_file: Some(ca_file.clone()),
            ..discovery_issuer(&url, 30)
        })
    })
    .await;
    h.issue(
        "default",
        "sleep",
        &with_token(tokens.token_for("default", "sleep", now_unix()).unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(oidc.jwks_hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn oidc_issuer_with_an_untrusted_tls_certificate_is_not_used() {
    let (_, tls) = https_identity();
    let oidc = Oidc::start_with_tls(String::new(), Some(tls)).await;
    let tokens = es256(&oidc.url());
    *oidc.jwks.lock().unwrap() = tokens.jwks_json();
    let url = oidc.url();
    // no ca_file: the issuer's certificate cannot be verified
    let h = Harness::start_with(|c| c.authn.jwt.push(discovery_issuer(&url, 0))).await;
    let r = h
        .issue(
            "default",
            "sleep",
            &with_token(tokens.token_for("default", "sleep", now_unix()).unwrap()),
        )
        .await;
    assert_refused(r, Code::Unauthenticated, "not trusted");
    assert_eq!(oidc.discovery_hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn rotated_issuer_key_is_picked_up_on_unknown_kid() {
    let oidc = Oidc::start(String::new()).await;
    let old = es256(&oidc.url());
    let new = es256(&oidc.url());
    *oidc.jwks.lock().unwrap() = old.jwks_json();
    let url = oidc.url();
    let h = Harness::start_with(|c| c.authn.jwt.push(discovery_issuer(&url, 0))).await;
    h.issue(
        "default",
        "sleep",
        &with_token(old.token_for("default", "sleep", now_unix()).unwrap()),
    )
    .await
    .unwrap();
    *oidc.jwks.lock().unwrap() = new.jwks_json();
    h.issue(
        "default",
        "sleep",
        &with_token(new.token_for("default", "sleep", now_unix()).unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(oidc.jwks_hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn kid_flood_fetches_keys_at_most_once_per_interval() {
    let oidc = Oidc::start(String::new()).await;
    let good = es256(&oidc.url());
    *oidc.jwks.lock().unwrap() = good.jwks_json();
    let url = oidc.url();
    let h = Harness::start_with(|c| c.authn.jwt.push(discovery_issuer(&url, 3600))).await;
    h.issue(
        "default",
        "sleep",
        &with_token(good.token_for("default", "sleep", now_unix()).unwrap()),
    )
    .await
    .unwrap();
    for i in 0..25 {
        let attacker = es256(&oidc.url());
        let claims =
            attacker.service_account_claims("default", "sleep", "istio-ca", now_unix(), 3600);
        let token = attacker
            .sign_raw(
                &json!({"alg": "ES256", "kid": format!("flood-{i}")}),
                &claims,
            )
            .unwrap();
        let r = h.issue("default", "sleep", &with_token(token)).await;
        assert_refused(r, Code::Unauthenticated, "not trusted");
    }
    assert_eq!(
        oidc.discovery_hits.load(Ordering::SeqCst),
        1,
        "no refetch storm"
    );
    assert_eq!(oidc.jwks_hits.load(Ordering::SeqCst), 1, "no refetch storm");
}

#[tokio::test]
async fn discovery_document_for_a_different_issuer_is_refused() {
    let oidc = Oidc::start(String::new()).await;
    let tokens = es256(&oidc.url());
    *oidc.jwks.lock().unwrap() = tokens.jwks_json();
    *oidc.claimed_issuer.lock().unwrap() = Some("https://evil.example".to_string());
    let url = oidc.url();
    let h = Harness::start_with(|c| c.authn.jwt.push(discovery_issuer(&url, 0))).await;
    let r = h
        .issue(
            "default",
            "sleep",
            &with_token(tokens.token_for("default", "sleep", now_unix()).unwrap()),
        )
        .await;
    assert_refused(r, Code::Unauthenticated, "not trusted");
    assert_eq!(
        oidc.jwks_hits.load(Ordering::SeqCst),
        0,
        "its JWKS is never fetched"
    );
}

#[tokio::test]
async fn jwks_endpoint_serving_a_key_for_a_different_issuer_cannot_sign_for_it() {
    // Issuer A (discovered) publishes key K. Tokens claiming the statically
    // configured issuer (the harness's K8S_ISSUER) signed with K are refused:
    // a key is only ever trusted for the issuer that published it.
    let oidc = Oidc::start(String::new()).await;
    let k = es256(K8S_ISSUER); // mints tokens with iss = K8S_ISSUER ...
    *oidc.jwks.lock().unwrap() = k.jwks_json(); // ... but is published by A
    let url = oidc.url();
    let h = Harness::start_with(|c| c.authn.jwt.push(discovery_issuer(&url, 0))).await;
    let r = h
        .issue(
            "default",
            "sleep",
            &with_token(k.token_for("default", "sleep", now_unix()).unwrap()),
        )
        .await;
    assert_refused(r, Code::Unauthenticated, "not trusted");
    // and A's key does sign for A
    let mut claims = k.service_account_claims("default", "sleep", "istio-ca", now_unix(), 3600);
    claims["iss"] = json!(url);
    h.issue(
        "default",
        "sleep",
        &with_token(k.sign_claims(&claims).unwrap()),
    )
    .await
    .unwrap();
}

// ---------- ClusterID ----------

fn two_clusters(
    dir: &std::path::Path,
    a: &TokenIssuer,
    b: &TokenIssuer,
) -> impl FnOnce(&mut Config) {
    let pa = dir.join("a.jwks");
    let pb = dir.join("b.jwks");
    a.write_jwks(&pa).unwrap();
    b.write_jwks(&pb).unwrap();
    let (ia, ib) = (a.issuer().to_string(), b.issuer().to_string());
    move |c: &mut Config| {
        c.authn.jwt = vec![
            JwtIssuerConfig {
                jwks_file: Some(pa),
                cluster_id: Some("cluster-a".into()),
                ..JwtIssuerConfig::new(ia)
            },
            JwtIssuerConfig {
                jwks_file: Some(pb),
                cluster_id: Some("cluster-b".into()),
                ..JwtIssuerConfig::new(ib)
            },
        ];
    }
}

#[tokio::test]
async fn token_for_cluster_a_presented_with_cluster_id_b_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = es256("https://a.example");
    let b = es256("https://b.example");
    let h = Harness::start_with(two_clusters(dir.path(), &a, &b)).await;
    let opts = |t: &TokenIssuer, cluster: Option<&str>| CallOptions {
        token: Some(t.token_for("default", "sleep", now_unix()).unwrap()),
        cluster_id: cluster.map(str::to_string),
        ..CallOptions::default()
    };
    h.issue("default", "sleep", &opts(&a, Some("cluster-a")))
        .await
        .unwrap();
    h.issue("default", "sleep", &opts(&b, Some("cluster-b")))
        .await
        .unwrap();
    let r = h
        .issue("default", "sleep", &opts(&a, Some("cluster-b")))
        .await;
    assert_refused(
        r,
        Code::Unauthenticated,
        "not trusted for cluster \"cluster-b\"",
    );
    let r = h.issue("default", "sleep", &opts(&a, None)).await;
    assert_refused(r, Code::Unauthenticated, "not trusted");
    let r = h
        .issue("default", "sleep", &opts(&a, Some("cluster-z")))
        .await;
    assert_refused(
        r,
        Code::Unauthenticated,
        "not trusted for cluster \"cluster-z\"",
    );
}

#[tokio::test]
async fn cluster_id_is_ignored_when_no_issuer_names_a_cluster() {
    // istio-agent always sends ClusterID (default "Kubernetes").
    let h = Harness::start().await;
    let mut opts = h.opts("default", "sleep");
    opts.cluster_id = Some("Kubernetes".into());
    h.issue("default", "sleep", &opts).await.unwrap();
}

// ---------- TokenReview ----------

/// Recorded `authentication.k8s.io/v1` TokenReview answers, keyed by token.
#[derive(Clone, Default)]
struct ApiServer {
    answers: Arc<Mutex<HashMap<String, Value>>>,
    bearer_seen: Arc<Mutex<Vec<String>>>,
}

fn authenticated(ns: &str, sa: &str) -> Value {
    json!({
        "authenticated": true,
        "user": {
            "username": format!("system:serviceaccount:{ns}:{sa}"),
            "uid": "8b3b5b8e-0000-0000-0000-000000000000",
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
            "extra": {
                "authentication.kubernetes.io/pod-name": [format!("{sa}-7d4b9c-abcde")],
                "authentication.kubernetes.io/pod-uid": ["1f0c2f55-0000-0000-0000-000000000000"]
            }
        },
        "audiences": ["istio-ca"]
    })
}

async fn start_api_server(api: ApiServer) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route(
            "/apis/authentication.k8s.io/v1/tokenreviews",
            post(
                |State(api): State<ApiServer>, headers: axum::http::HeaderMap, Json(body): Json<Value>| async move {
                    if let Some(v) = headers.get("authorization") {
                        api.bearer_seen.lock().unwrap().push(v.to_str().unwrap().to_string());
                    }
                    let token = body["spec"]["token"].as_str().unwrap_or_default().to_string();
                    let status = api.answers.lock().unwrap().get(&token).cloned().unwrap_or_else(|| {
                        json!({"authenticated": false, "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]"})
                    });
                    let mut out = body.clone();
                    out["status"] = status;
                    (axum::http::StatusCode::CREATED, Json(out))
                },
            ),
        )
        .with_state(api);
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn token_review_issuer(api: SocketAddr, token_file: &std::path::Path) -> impl FnOnce(&mut Config) {
    let token_file = token_file.to_path_buf();
    move |c: &mut Config| {
        c.authn.jwt = vec![JwtIssuerConfig {
            token_review: Some(TokenReviewConfig {
                api_server: format!("http://{api}"),
                ca_file: None,
                token_file: Some(token_file),
            }),
            ..JwtIssuerConfig::new(K8S_ISSUER)
        }];
    }
}

#[tokio::test]
async fn token_review_accepts_a_live_bound_token() {
    let dir = tempfile::tempdir().unwrap();
    let signer_token = dir.path().join("token");
    std::fs::write(&signer_token, "signer-sa-token\n").unwrap();
    let api = ApiServer::default();
    let addr = start_api_server(api.clone()).await;
    let sa_tokens = es256(K8S_ISSUER); // the signer never sees this key
    let token = sa_tokens.token_for("default", "sleep", now_unix()).unwrap();
    api.answers
        .lock()
        .unwrap()
        .insert(token.clone(), authenticated("default", "sleep"));
    let h = Harness::start_with(token_review_issuer(addr, &signer_token)).await;
    let (_, cert) = h
        .issue_for(&id("default", "sleep"), &with_token(token))
        .await
        .unwrap();
    assert!(!cert.leaf.is_empty());
    assert_eq!(
        api.bearer_seen.lock().unwrap().clone(),
        vec!["Bearer signer-sa-token".to_string()]
    );
}

#[tokio::test]
async fn bound_token_whose_pod_is_gone_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let signer_token = dir.path().join("token");
    std::fs::write(&signer_token, "signer-sa-token").unwrap();
    let api = ApiServer::default();
    let addr = start_api_server(api.clone()).await;
    let token = es256(K8S_ISSUER)
        .token_for("default", "sleep", now_unix())
        .unwrap();
    api.answers.lock().unwrap().insert(
        token.clone(),
        json!({"authenticated": false, "error": "[invalid bearer token, pod \"sleep-7d4b9c-abcde\" not found]"}),
    );
    let h = Harness::start_with(token_review_issuer(addr, &signer_token)).await;
    let r = h
        .issue_for(&id("default", "sleep"), &with_token(token))
        .await;
    assert_refused(r, Code::Unauthenticated, "not found");
}

#[tokio::test]
async fn token_review_naming_a_different_account_than_the_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let signer_token = dir.path().join("token");
    std::fs::write(&signer_token, "t").unwrap();
    let api = ApiServer::default();
    let addr = start_api_server(api.clone()).await;
    let token = es256(K8S_ISSUER)
        .token_for("default", "sleep", now_unix())
        .unwrap();
    api.answers
        .lock()
        .unwrap()
        .insert(token.clone(), authenticated("kube-system", "admin"));
    let h = Harness::start_with(token_review_issuer(addr, &signer_token)).await;
    let r = h
        .issue_for(&id("kube-system", "admin"), &with_token(token))
        .await;
    assert_refused(
        r,
        Code::Unauthenticated,
        "the API server says kube-system/admin",
    );
}

#[tokio::test]
async fn token_review_of_a_user_that_is_not_a_service_account_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let signer_token = dir.path().join("token");
    std::fs::write(&signer_token, "t").unwrap();
    let api = ApiServer::default();
    let addr = start_api_server(api.clone()).await;
    let token = es256(K8S_ISSUER)
        .token_for("default", "sleep", now_unix())
        .unwrap();
    api.answers.lock().unwrap().insert(
        token.clone(),
        json!({"authenticated": true, "user": {"username": "kubernetes-admin", "groups": ["system:masters"]}, "audiences": ["istio-ca"]}),
    );
    let h = Harness::start_with(token_review_issuer(addr, &signer_token)).await;
    let r = h
        .issue_for(&id("default", "sleep"), &with_token(token))
        .await;
    assert_refused(r, Code::Unauthenticated, "not a service account");
}

#[tokio::test]
async fn unreachable_api_server_answers_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let signer_token = dir.path().join("token");
    std::fs::write(&signer_token, "t").unwrap();
    // a port with nothing listening
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let token = es256(K8S_ISSUER)
        .token_for("default", "sleep", now_unix())
        .unwrap();
    let h = Harness::start_with(token_review_issuer(closed, &signer_token)).await;
    let r = h
        .issue_for(&id("default", "sleep"), &with_token(token))
        .await;
    assert_refused(r, Code::Unavailable, "TokenReview");
}
