//! Positive tests: a real signer over TLS on 127.0.0.1:0 issues chains that
//! webpki accepts, with exactly the identity, validity, key and extensions
//! istio-agent expects.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/harness.rs"]
mod harness;

use std::os::unix::fs::PermissionsExt;

use harness::{Harness, http_get, id, now_unix, webpki_verify};
use meshward_signer::Signer;
use meshward_signer::authn::keys::JwtAlgorithm;
use meshward_signer::client::token::TokenIssuer;
use meshward_signer::client::{
    CaClient, CallOptions, IssuedCertificate, WorkloadKey, WorkloadKeyType,
};
use meshward_signer::config::JwtIssuerConfig;
use meshward_signer::issuer::builtin::CaKeyAlgorithm;
use rustls_pki_types::UnixTime;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::*;

/// Everything istio-agent and the mesh rely on in an issued leaf.
fn check_leaf(cert: &IssuedCertificate, key: &WorkloadKey, ns: &str, sa: &str, rsa: bool) {
    assert_eq!(cert.cert_chain.len(), 3, "leaf, intermediate, root");
    assert_eq!(cert.intermediates.len(), 1);
    assert_eq!(cert.roots.len(), 1);
    webpki_verify(cert, UnixTime::now());

    let (_, leaf) = X509Certificate::from_der(&cert.leaf).unwrap();
    assert_eq!(
        leaf.public_key().raw,
        key.spki_der().as_slice(),
        "leaf key is the CSR key"
    );
    assert!(
        leaf.subject().iter_attributes().next().is_none(),
        "empty subject"
    );

    let san = leaf
        .extensions()
        .iter()
        .find(|e| e.oid == x509_parser::oid_registry::OID_X509_EXT_SUBJECT_ALT_NAME)
        .unwrap();
    assert!(san.critical, "SAN must be critical with an empty subject");
    let ParsedExtension::SubjectAlternativeName(names) = san.parsed_extension() else {
        panic!("SAN does not parse");
    };
    let expected = id(ns, sa).to_string();
    assert_eq!(names.general_names, vec![GeneralName::URI(&expected)]);

    let bc = leaf.basic_constraints().unwrap().unwrap().value;
    assert!(!bc.ca, "CA:false");
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature());
    assert_eq!(
        ku.key_encipherment(),
        rsa,
        "keyEncipherment only for RSA keys"
    );
    assert!(!ku.key_cert_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(!eku.any);

    let nb = leaf.validity().not_before.timestamp();
    let na = leaf.validity().not_after.timestamp();
    let now = now_unix();
    assert!(
        nb <= now - 55 && nb >= now - 120,
        "backdated ~60s: {nb} vs {now}"
    );
    assert_eq!(na - nb, 24 * 3600 + 60, "24h default TTL + 60s backdate");

    let (_, inter) = X509Certificate::from_der(&cert.intermediates[0]).unwrap();
    assert!(
        na <= inter.validity().not_after.timestamp(),
        "never outlives the issuer"
    );
    assert!(leaf.raw_serial().len() >= 16, "random 128-bit serial");
}

#[tokio::test]
async fn p256_csr_gets_a_verified_chain() {
    let h = Harness::start().await;
    let key = WorkloadKey::generate(WorkloadKeyType::EcdsaP256).unwrap();
    let cert = h
        .client
        .request_certificate(&key, &id("default", "sleep"), &h.opts("default", "sleep"))
        .await
        .unwrap();
    check_leaf(&cert, &key, "default", "sleep", false);
    // the root in the response is the signer's trust anchor
    assert_eq!(cert.cert_chain.last().unwrap(), h.signer.roots_pem());
    h.signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn rsa2048_csr_gets_a_verified_chain() {
    let h = Harness::start().await;
    let key = WorkloadKey::generate(WorkloadKeyType::Rsa2048).unwrap();
    let cert = h
        .client
        .request_certificate(
            &key,
            &id("bookinfo", "reviews"),
            &h.opts("bookinfo", "reviews"),
        )
        .await
        .unwrap();
    check_leaf(&cert, &key, "bookinfo", "reviews", true);
    h.signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn requested_ttl_below_max_is_honoured() {
    let h = Harness::start().await;
    let mut opts = h.opts("default", "sleep");
    opts.validity_secs = 3600;
    let (_, cert) = h.issue("default", "sleep", &opts).await.unwrap();
    let (_, leaf) = X509Certificate::from_der(&cert.leaf).unwrap();
    let v = leaf.validity();
    assert_eq!(
        v.not_after.timestamp() - v.not_before.timestamp(),
        3600 + 60
    );
    h.signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn restart_reuses_the_ca_and_keeps_keys_private() {
    let h = Harness::start().await;
    let roots_before = h.signer.roots_pem().to_string();
    let (_, first) = h
        .issue("default", "sleep", &h.opts("default", "sleep"))
        .await
        .unwrap();
    let config = h.config.clone();
    let opts = h.opts("default", "sleep");
    for f in ["root-key.pem", "ca-key.pem"] {
        let mode = std::fs::metadata(h.data_dir().join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    h.signer.shutdown().await.unwrap();

    let again = Signer::start(config).await.unwrap();
    assert_eq!(again.roots_pem(), roots_before, "same root after restart");
    let client = CaClient::connect(again.grpc_addr(), again.roots_pem(), "localhost")
        .await
        .unwrap();
    let key = WorkloadKey::generate(WorkloadKeyType::EcdsaP256).unwrap();
    let second = client
        .request_certificate(&key, &id("default", "sleep"), &opts)
        .await
        .unwrap();
    assert_eq!(
        second.intermediates, first.intermediates,
        "same intermediate"
    );
    webpki_verify(&second, UnixTime::now());
    again.shutdown().await.unwrap();
}

#[tokio::test]
async fn rsa_ca_issues_verifiable_chains() {
    let h = Harness::start_with(|c| c.ca.key_algorithm = CaKeyAlgorithm::Rsa2048).await;
    let anchors = h.signer.issuer().trust_anchors();
    let (_, root) = X509Certificate::from_der(&anchors[0]).unwrap();
    assert_eq!(
        root.public_key().algorithm.algorithm,
        x509_parser::oid_registry::OID_PKCS1_RSAENCRYPTION
    );
    let key = WorkloadKey::generate(WorkloadKeyType::EcdsaP256).unwrap();
    let cert = h
        .client
        .request_certificate(&key, &id("default", "sleep"), &h.opts("default", "sleep"))
        .await
        .unwrap();
    check_leaf(&cert, &key, "default", "sleep", false);
    h.signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn rs256_token_from_a_pem_key_file_is_accepted() {
    let rs = TokenIssuer::generate("https://rs.example", JwtAlgorithm::Rs256).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pem_path = dir.path().join("sa.pub");
    rs.write_public_key_pem(&pem_path).unwrap();
    let h = Harness::start_with(|c| {
        c.authn.jwt.push(JwtIssuerConfig {
            public_key_file: Some(pem_path.clone()),
            ..JwtIssuerConfig::new("https://rs.example")
        })
    })
    .await;
    let opts = CallOptions {
        token: Some(rs.token_for("payments", "api", now_unix()).unwrap()),
        ..CallOptions::default()
    };
    let (key, cert) = h.issue("payments", "api", &opts).await.unwrap();
    check_leaf(&cert, &key, "payments", "api", false);
    h.signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn serving_certificate_covers_the_istiod_names() {
    let h = Harness::start().await;
    for name in [
        "istiod.istio-system.svc",
        "meshward-signer.istio-system.svc",
    ] {
        let c = CaClient::connect(h.signer.grpc_addr(), h.signer.roots_pem(), name)
            .await
            .unwrap();
        c.request_certificate(
            &WorkloadKey::generate(WorkloadKeyType::EcdsaP256).unwrap(),
            &id("default", "sleep"),
            &h.opts("default", "sleep"),
        )
        .await
        .unwrap();
    }
    // a name not in the serving certificate fails the TLS handshake
    let wrong = CaClient::connect(h.signer.grpc_addr(), h.signer.roots_pem(), "evil.example").await;
    let failed = match wrong {
        Err(_) => true,
        Ok(c) => c
            .create_certificate("x", &CallOptions::default())
            .await
            .is_err_and(|e| !matches!(&e, meshward_signer::client::ClientError::Status(s) if s.code() == tonic::Code::InvalidArgument || s.code() == tonic::Code::Unauthenticated)),
    };
    assert!(failed, "TLS must fail for a name not in the serving cert");
    h.signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn admin_port_reports_health_and_metrics() {
    let h = Harness::start().await;
    assert_eq!(http_get(h.signer.admin_addr(), "/healthz").await.0, 200);
    assert_eq!(http_get(h.signer.admin_addr(), "/readyz").await.0, 200);
    // One agent: the same token on both requests.
    let opts = h.opts("default", "sleep");
    h.issue("default", "sleep", &opts).await.unwrap();
    let _ = h.client.create_certificate("garbage", &opts).await;
    let _ = h
        .client
        .create_certificate("garbage", &CallOptions::default())
        .await;
    let m = h.metrics().await;
    assert!(
        m.contains("meshward_signer_requests_total{outcome=\"issued\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("meshward_signer_requests_total{outcome=\"invalid_argument\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("meshward_signer_requests_total{outcome=\"unauthenticated\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("meshward_signer_issuance_duration_seconds_count 1"),
        "{m}"
    );
    // The second request reused the first one's token: verified once.
    assert!(
        m.contains("meshward_signer_authn_token_cache_misses_total 1"),
        "{m}"
    );
    assert!(
        m.contains("meshward_signer_authn_token_cache_hits_total 1"),
        "{m}"
    );
    let expiry = h
        .signer
        .issuer()
        .signing_validity()
        .not_after
        .unix_timestamp();
    assert!(
        m.contains(&format!(
            "meshward_signer_ca_cert_expiry_timestamp_seconds {expiry}"
        )),
        "{m}"
    );
    h.signer.shutdown().await.unwrap();
}
