//! The trust bundle as a running signer publishes it: the SPIFFE bundle
//! endpoint over HTTPS, the admin port, the `WatchBundle` gRPC stream and the
//! directory sink.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/harness.rs"]
mod harness;

use std::time::Duration;

use base64::Engine;
use harness::{Harness, http_get};
use meshward_proto::meshward::v1::WatchBundleRequest;
use meshward_proto::meshward::v1::trust_bundle_service_client::TrustBundleServiceClient;
use meshward_signer::bundle::Jwks;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls_pki_types::CertificateDer;
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

fn another_root() -> CertificateDer<'static> {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "next root");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.self_signed(&key).unwrap().der().clone()
}

async fn https_get(h: &Harness, path: &str) -> (u16, Option<String>, String) {
    let addr = h.signer.bundle_endpoint().unwrap();
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(h.signer.roots_pem().as_bytes()).unwrap(),
        )
        .resolve("localhost", addr)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let resp = client
        .get(format!("https://localhost:{}{path}", addr.port()))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    (status, ctype, resp.text().await.unwrap())
}

#[tokio::test]
async fn bundle_jwks_has_no_kid_and_one_x5c() {
    let h = Harness::start_with(|c| c.bundle.endpoint_addr = Some("127.0.0.1:0".parse().unwrap()))
        .await;
    let (status, ctype, body) = https_get(&h, "/").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(ctype.as_deref(), Some("application/json"));
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    let keys = doc["keys"].as_array().unwrap();
    let anchors = h.signer.issuer().trust_anchors();
    assert_eq!(keys.len(), anchors.len());
    for (k, anchor) in keys.iter().zip(&anchors) {
        assert_eq!(k["use"], "x509-svid");
        assert!(k.get("kid").is_none(), "x509-svid keys carry no kid: {k}");
        let x5c = k["x5c"].as_array().unwrap();
        assert_eq!(x5c.len(), 1, "exactly one certificate per key");
        // Standard base64 with padding, not base64url.
        let der = base64::engine::general_purpose::STANDARD
            .decode(x5c[0].as_str().unwrap())
            .unwrap();
        assert_eq!(der, anchor.to_vec());
        assert_eq!(k["kty"], "EC");
        assert_eq!(k["crv"], "P-256");
    }
    assert!(doc["spiffe_sequence"].as_u64().unwrap() > 0);
    assert_eq!(doc["spiffe_refresh_hint"].as_u64(), Some(300));
    // The strict parser (one x5c, no kid, key params match) agrees.
    let (_, roots) = Jwks::parse_x509_roots(&body).unwrap();
    assert_eq!(roots, anchors);

    // The admin port serves the same document.
    let (status, admin_body) = http_get(h.signer.admin_addr(), "/v1/bundle.jwks.json").await;
    assert_eq!(status, 200);
    assert_eq!(admin_body, body);
    let (status, pem) = http_get(h.signer.admin_addr(), "/v1/root-cert.pem").await;
    assert_eq!(status, 200);
    assert_eq!(pem, h.signer.roots_pem());
    h.signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn bundle_endpoint_publishes_old_and_new_root_during_rotation() {
    let h = Harness::start_with(|c| c.bundle.endpoint_addr = Some("127.0.0.1:0".parse().unwrap()))
        .await;
    let current = h.signer.bundle().current();
    let next = another_root();
    let mut roots = current.roots().to_vec();
    roots.push(next.clone());
    assert!(
        h.signer
            .bundle()
            .publish(current.with_roots(roots).unwrap())
    );
    let (_, _, body) = https_get(&h, "/bundle.jwks.json").await;
    let (doc, roots) = Jwks::parse_x509_roots(&body).unwrap();
    assert_eq!(roots.len(), 2);
    assert_eq!(roots[1], next);
    assert_eq!(doc.spiffe_sequence, current.sequence() + 1);
    h.signer.shutdown().await.unwrap();
}

async fn watch_client(h: &Harness) -> TrustBundleServiceClient<tonic::transport::Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(h.signer.roots_pem()))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://{}", h.signer.grpc_addr()))
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    TrustBundleServiceClient::new(channel)
}

#[tokio::test]
async fn watch_bundle_sends_current_bundle_then_every_change() {
    let h = Harness::start().await;
    let mut client = watch_client(&h).await;
    let mut stream = client
        .watch_bundle(WatchBundleRequest {
            trust_domain: "cluster.local".to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let current = h.signer.bundle().current();
    assert_eq!(first.sequence, current.sequence());
    assert_eq!(first.trust_domain, "cluster.local");
    assert_eq!(first.roots_pem, h.signer.roots_pem());
    assert_eq!(first.roots_der.len(), 1);
    assert_eq!(first.refresh_hint.unwrap().seconds, 300);

    let next = another_root();
    let mut roots = current.roots().to_vec();
    roots.push(next.clone());
    let rotated = current.with_roots(roots).unwrap();
    assert!(h.signer.bundle().publish(rotated.clone()));
    let second = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(second.sequence, current.sequence() + 1);
    assert_eq!(
        second.roots_der,
        vec![current.roots()[0].to_vec(), next.to_vec()]
    );

    // Old root removed later: another message, fewer roots.
    let retired = rotated.with_roots(vec![next.clone()]).unwrap();
    assert!(h.signer.bundle().publish(retired));
    let third = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(third.sequence, current.sequence() + 2);
    assert_eq!(third.roots_der, vec![next.to_vec()]);
    h.signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn watch_bundle_for_another_trust_domain_is_not_found() {
    let h = Harness::start().await;
    let mut client = watch_client(&h).await;
    let err = client
        .watch_bundle(WatchBundleRequest {
            trust_domain: "evil.example".to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    h.signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn bundle_dir_sink_is_written_at_start_and_on_change() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("bundle");
    let d2 = dir.clone();
    let h = Harness::start_with(move |c| c.bundle.dir = Some(d2)).await;
    let pem_path = dir.join("root-cert.pem");
    let read_when = |want: String| {
        let pem_path = pem_path.clone();
        async move {
            for _ in 0..200 {
                if std::fs::read_to_string(&pem_path).ok().as_deref() == Some(want.as_str()) {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            false
        }
    };
    assert!(
        read_when(h.signer.roots_pem().to_string()).await,
        "root-cert.pem written at start"
    );

    let current = h.signer.bundle().current();
    let mut roots = current.roots().to_vec();
    roots.push(another_root());
    let rotated = current.with_roots(roots).unwrap();
    let want = rotated.roots_pem();
    assert!(h.signer.bundle().publish(rotated));
    assert!(
        read_when(want).await,
        "root-cert.pem rewritten after a change"
    );
    let (doc, roots) =
        Jwks::parse_x509_roots(&std::fs::read_to_string(dir.join("bundle.jwks.json")).unwrap())
            .unwrap();
    assert_eq!(roots.len(), 2);
    assert_eq!(doc.spiffe_sequence, current.sequence() + 1);
    h.signer.shutdown().await.unwrap();
}

/// Attack: a flood of connections to the bundle endpoint — the port
/// federated trust domains reach, often from outside the cluster — holding
/// the signer's memory. At `bundle.endpoint_max_connections` it stops
/// accepting; when the flood goes, fetches work again.
#[tokio::test]
async fn connection_flood_on_the_bundle_endpoint_is_bounded_by_endpoint_max_connections() {
    let h = Harness::start_with(|c| {
        c.bundle.endpoint_addr = Some("127.0.0.1:0".parse().unwrap());
        c.bundle.endpoint_max_connections = 2;
    })
    .await;
    let addr = h.signer.bundle_endpoint().unwrap();
    let mut flood = Vec::new();
    for _ in 0..10 {
        flood.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let gauge = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("meshward_signer_bundle_endpoint_connections "))
            .map(|v| v.trim().to_string())
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while gauge(&h.metrics().await).as_deref() != Some("2") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            gauge(&h.metrics().await)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let blocked = tokio::time::timeout(Duration::from_millis(700), https_get(&h, "/")).await;
    assert!(blocked.is_err(), "a fetch got through past 2 connections");
    let text = h.metrics().await;
    assert_eq!(gauge(&text).as_deref(), Some("2"), "{text}");
    assert!(text.contains("meshward_signer_bundle_endpoint_connections_max 2\n"));

    drop(flood);
    let (status, _, body) = tokio::time::timeout(Duration::from_secs(10), https_get(&h, "/"))
        .await
        .expect("no fetch within 10 s after the flood closed");
    assert_eq!(status, 200, "{body}");
    h.signer.shutdown().await.unwrap();
}
