//! Negative tests, each named after the attack it stops. Every refusal must
//! be a gRPC status with the right code and a message naming the reason.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/harness.rs"]
mod harness;

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use harness::{Harness, K8S_ISSUER, assert_refused, id, now_unix};
use meshward_signer::Signer;
use meshward_signer::authn::keys::JwtAlgorithm;
use meshward_signer::client::token::TokenIssuer;
use meshward_signer::client::{CaClient, CallOptions, WorkloadKey, WorkloadKeyType};
use meshward_signer::issuer::builtin::{BuiltinIssuer, BuiltinOptions};
use meshward_signer::issuer::{IssueFuture, IssueRequest, Issuer, SigningValidity};
use rcgen::{CertificateParams, DistinguishedName, DnType, IsCa, SanType};
use rustls_pki_types::CertificateDer;
use serde_json::json;
use tonic::Code;
use x509_parser::prelude::*;

fn with_token(token: String) -> CallOptions {
    CallOptions {
        token: Some(token),
        ..CallOptions::default()
    }
}

fn p256() -> WorkloadKey {
    WorkloadKey::generate(WorkloadKeyType::EcdsaP256).unwrap()
}

fn csr_pem(p256_csr: &WorkloadKey, ns: &str, sa: &str) -> String {
    p256_csr.csr_pem(&id(ns, sa)).unwrap()
}

/// A CSR built from `params` (no subject unless set), signed by a fresh P-256 key.
fn custom_csr(mut params: CertificateParams) -> String {
    if params.distinguished_name.iter().next().is_none() {
        params.distinguished_name = DistinguishedName::new();
    }
    let key = p256();
    params
        .serialize_request(key.key_pair())
        .unwrap()
        .pem()
        .unwrap()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn empty_dn_params(sans: Vec<SanType>) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = sans;
    p
}

// ---------- authentication ----------

#[tokio::test]
async fn request_without_token_is_refused() {
    let h = Harness::start().await;
    let r = h
        .client
        .create_certificate(
            &csr_pem(&p256(), "default", "sleep"),
            &CallOptions::default(),
        )
        .await;
    assert_refused(r, Code::Unauthenticated, "no credentials");
}

#[tokio::test]
async fn expired_token_is_refused() {
    let h = Harness::start().await;
    let now = now_unix();
    let claims = h
        .tokens
        .service_account_claims("default", "sleep", "istio-ca", now - 7200, 3600);
    let token = h.tokens.sign_claims(&claims).unwrap();
    let r = h
        .client
        .create_certificate(&csr_pem(&p256(), "default", "sleep"), &with_token(token))
        .await;
    assert_refused(r, Code::Unauthenticated, "expired");
}

#[tokio::test]
async fn token_not_yet_valid_is_refused() {
    let h = Harness::start().await;
    let claims =
        h.tokens
            .service_account_claims("default", "sleep", "istio-ca", now_unix() + 3600, 3600);
    let token = h.tokens.sign_claims(&claims).unwrap();
    let r = h
        .client
        .create_certificate(&csr_pem(&p256(), "default", "sleep"), &with_token(token))
        .await;
    assert_refused(r, Code::Unauthenticated, "not valid before");
}

#[tokio::test]
async fn token_with_alg_none_is_refused() {
    let h = Harness::start().await;
    let claims = h
        .tokens
        .service_account_claims("default", "sleep", "istio-ca", now_unix(), 3600);
    let token = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(json!({"alg": "none", "typ": "JWT"}).to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let r = h
        .client
        .create_certificate(&csr_pem(&p256(), "default", "sleep"), &with_token(token))
        .await;
    assert_refused(r, Code::Unauthenticated, "\"none\" is not allowed");
}

#[tokio::test]
async fn hs256_token_keyed_with_the_public_key_is_refused() {
    // The classic algorithm-confusion attack: HMAC keyed with the public key
    // the server trusts.
    let h = Harness::start().await;
    let claims = h
        .tokens
        .service_account_claims("default", "sleep", "istio-ca", now_unix(), 3600);
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD
            .encode(json!({"alg": "HS256", "typ": "JWT", "kid": h.tokens.kid()}).to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    for secret in [h.tokens.public_key_der(), h.tokens.jwks_json().into_bytes()] {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
        let tag = ring::hmac::sign(&key, signing_input.as_bytes());
        let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()));
        let r = h
            .client
            .create_certificate(&csr_pem(&p256(), "default", "sleep"), &with_token(token))
            .await;
        assert_refused(r, Code::Unauthenticated, "\"HS256\" is not allowed");
    }
}

#[tokio::test]
async fn token_signed_by_an_unknown_key_is_refused() {
    let h = Harness::start().await;
    let stranger = TokenIssuer::generate(K8S_ISSUER, JwtAlgorithm::Es256).unwrap();
    let token = stranger.token_for("default", "sleep", now_unix()).unwrap();
    let r = h
        .client
        .create_certificate(&csr_pem(&p256(), "default", "sleep"), &with_token(token))
        .await;
    assert_refused(r, Code::Unauthenticated, "not trusted");

    // same kid as the trusted key, signed by the stranger: signature fails
    let claims = h
        .tokens
        .service_account_claims("default", "sleep", "istio-ca", now_unix(), 3600);
    let forged = stranger
        .sign_raw(&json!({"alg": "ES256", "kid": h.tokens.kid()}), &claims)
        .unwrap();
    let r = h
        .client
        .create_certificate(&csr_pem(&p256(), "default", "sleep"), &with_token(forged))
        .await;
    assert_refused(r, Code::Unauthenticated, "signature does not verify");
}

#[tokio::test]
async fn token_with_rs256_header_on_an_ec_key_is_refused() {
    let h = Harness::start().await;
    let claims = h
        .tokens
        .service_account_claims("default", "sleep", "istio-ca", now_unix(), 3600);
    let token = h
        .tokens
        .sign_raw(&json!({"alg": "RS256", "kid": h.tokens.kid()}), &claims)
        .unwrap();
    let r = h
        .client
        .create_certificate(&csr_pem(&p256(), "default", "sleep"), &with_token(token))
        .await;
    assert_refused(r, Code::Unauthenticated, "no RS256 key");
}

#[tokio::test]
async fn token_with_wrong_audience_is_refused() {
    let h = Harness::start().await;
    let claims =
        h.tokens
            .service_account_claims("default", "sleep", "kubernetes", now_unix(), 3600);
    let token = h.tokens.sign_claims(&claims).unwrap();
    let r = h
        .client
        .create_certificate(&csr_pem(&p256(), "default", "sleep"), &with_token(token))
        .await;
    assert_refused(r, Code::Unauthenticated, "audience");
}

#[tokio::test]
async fn token_with_wrong_issuer_is_refused() {
    let h = Harness::start().await;
    let mut claims =
        h.tokens
            .service_account_claims("default", "sleep", "istio-ca", now_unix(), 3600);
    claims["iss"] = json!("https://evil.example");
    let token = h.tokens.sign_claims(&claims).unwrap();
    let r = h
        .client
        .create_certificate(&csr_pem(&p256(), "default", "sleep"), &with_token(token))
        .await;
    assert_refused(
        r,
        Code::Unauthenticated,
        "issuer \"https://evil.example\" is not trusted",
    );
}

#[tokio::test]
async fn token_whose_claims_disagree_on_the_service_account_is_refused() {
    let h = Harness::start().await;
    let mut claims =
        h.tokens
            .service_account_claims("default", "sleep", "istio-ca", now_unix(), 3600);
    claims["sub"] = json!("system:serviceaccount:kube-system:admin");
    let token = h.tokens.sign_claims(&claims).unwrap();
    let r = h
        .client
        .create_certificate(&csr_pem(&p256(), "default", "sleep"), &with_token(token))
        .await;
    assert_refused(r, Code::Unauthenticated, "but sub says");
}

/// Found with a static JWKS: a token for namespace `DEFAULTX` got a
/// certificate for `.../ns/DEFAULTX/sa/default`. No API server makes such a
/// name, so whoever signed the token, it is not a service-account token.
#[tokio::test]
async fn token_with_a_non_dns1123_namespace_is_refused() {
    let h = Harness::start().await;
    for ns in ["DEFAULTX", "shop_1", "-shop", "shop.prod", &"a".repeat(64)] {
        let claims = h
            .tokens
            .service_account_claims(ns, "default", "istio-ca", now_unix(), 3600);
        let token = h.tokens.sign_claims(&claims).unwrap();
        let r = h
            .client
            .create_certificate(&csr_pem(&p256(), ns, "default"), &with_token(token))
            .await;
        assert_refused(r, Code::Unauthenticated, "is not a Kubernetes name");
    }
    // The service still serves a proper name after the refusals.
    let token = h.tokens.token_for("shop", "default", now_unix()).unwrap();
    h.client
        .create_certificate(&csr_pem(&p256(), "shop", "default"), &with_token(token))
        .await
        .unwrap();
}

#[tokio::test]
async fn token_with_a_non_dns1123_service_account_is_refused() {
    let h = Harness::start().await;
    for sa in [
        "Default",
        "sleep_v2",
        "sleep..v2",
        ".sleep",
        &"a".repeat(254),
    ] {
        let claims = h
            .tokens
            .service_account_claims("shop", sa, "istio-ca", now_unix(), 3600);
        let token = h.tokens.sign_claims(&claims).unwrap();
        let r = h
            .client
            .create_certificate(&csr_pem(&p256(), "shop", sa), &with_token(token))
            .await;
        assert_refused(r, Code::Unauthenticated, "is not a Kubernetes name");
    }
}

// ---------- identity ----------

#[tokio::test]
async fn token_for_namespace_a_with_csr_for_namespace_b_is_refused() {
    let h = Harness::start().await;
    let r = h
        .send_csr(&csr_pem(&p256(), "payments", "api"), "default", "api")
        .await;
    assert_refused(
        r,
        Code::PermissionDenied,
        "CSR asks for spiffe://cluster.local/ns/payments/sa/api but the caller is spiffe://cluster.local/ns/default/sa/api",
    );
}

#[tokio::test]
async fn token_for_one_service_account_with_csr_for_another_is_refused() {
    let h = Harness::start().await;
    let r = h
        .send_csr(&csr_pem(&p256(), "default", "admin"), "default", "sleep")
        .await;
    assert_refused(r, Code::PermissionDenied, "but the caller is");
}

#[tokio::test]
async fn csr_for_another_trust_domain_is_refused() {
    let h = Harness::start().await;
    let csr = custom_csr(empty_dn_params(vec![uri(
        "spiffe://evil.example/ns/default/sa/sleep",
    )]));
    let r = h.send_csr(&csr, "default", "sleep").await;
    assert_refused(r, Code::PermissionDenied, "outside trust domain");
}

#[tokio::test]
async fn impersonated_identity_from_an_ordinary_workload_is_refused() {
    let h = Harness::start().await;
    let mut opts = h.opts("default", "sleep");
    opts.impersonated_identity = Some(id("payments", "api").to_string());
    let r = h
        .client
        .create_certificate(&csr_pem(&p256(), "payments", "api"), &opts)
        .await;
    assert_refused(r, Code::PermissionDenied, "not a trusted node agent");
}

// ---------- CSR content ----------

#[tokio::test]
async fn csr_with_two_uri_sans_is_refused() {
    let h = Harness::start().await;
    let csr = custom_csr(empty_dn_params(vec![
        uri("spiffe://cluster.local/ns/default/sa/sleep"),
        uri("spiffe://cluster.local/ns/kube-system/sa/admin"),
    ]));
    let r = h.send_csr(&csr, "default", "sleep").await;
    assert_refused(r, Code::InvalidArgument, "2 URI SANs");
}

#[tokio::test]
async fn csr_with_a_dns_san_is_refused() {
    let h = Harness::start().await;
    let csr = custom_csr(empty_dn_params(vec![
        uri("spiffe://cluster.local/ns/default/sa/sleep"),
        SanType::DnsName("istiod.istio-system.svc".try_into().unwrap()),
    ]));
    let r = h.send_csr(&csr, "default", "sleep").await;
    assert_refused(r, Code::InvalidArgument, "DNS name");
}

#[tokio::test]
async fn csr_with_an_ip_san_is_refused() {
    let h = Harness::start().await;
    let csr = custom_csr(empty_dn_params(vec![
        uri("spiffe://cluster.local/ns/default/sa/sleep"),
        SanType::IpAddress("10.0.0.1".parse().unwrap()),
    ]));
    let r = h.send_csr(&csr, "default", "sleep").await;
    assert_refused(r, Code::InvalidArgument, "IP address");
}

#[tokio::test]
async fn csr_with_an_email_san_is_refused() {
    let h = Harness::start().await;
    let csr = custom_csr(empty_dn_params(vec![
        uri("spiffe://cluster.local/ns/default/sa/sleep"),
        SanType::Rfc822Name("root@example.com".try_into().unwrap()),
    ]));
    let r = h.send_csr(&csr, "default", "sleep").await;
    assert_refused(r, Code::InvalidArgument, "email");
}

#[tokio::test]
async fn csr_with_a_common_name_is_refused() {
    let h = Harness::start().await;
    let mut p = empty_dn_params(vec![uri("spiffe://cluster.local/ns/default/sa/sleep")]);
    p.distinguished_name
        .push(DnType::CommonName, "www.bank.example");
    let r = h.send_csr(&custom_csr(p), "default", "sleep").await;
    assert_refused(r, Code::InvalidArgument, "common name");
}

#[tokio::test]
async fn csr_without_a_san_is_refused() {
    let h = Harness::start().await;
    let r = h
        .send_csr(&custom_csr(empty_dn_params(vec![])), "default", "sleep")
        .await;
    assert_refused(r, Code::InvalidArgument, "exactly one URI SAN");
}

#[tokio::test]
async fn csr_with_non_canonical_spiffe_id_is_refused() {
    let h = Harness::start().await;
    let csr = custom_csr(empty_dn_params(vec![uri(
        "spiffe://CLUSTER.local/ns/default/sa/sleep",
    )]));
    let r = h.send_csr(&csr, "default", "sleep").await;
    assert_refused(r, Code::InvalidArgument, "not a canonical SPIFFE ID");
}

#[tokio::test]
async fn csr_asking_for_ca_true_is_refused() {
    let h = Harness::start().await;
    let mut p = empty_dn_params(vec![uri("spiffe://cluster.local/ns/default/sa/sleep")]);
    p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let r = h.send_csr(&custom_csr(p), "default", "sleep").await;
    assert_refused(r, Code::InvalidArgument, "CA:true");
}

/// An RSA key of any size as an rcgen signing key (ring refuses to sign with
/// RSA below 2048 bits, so the attacker's CSR is signed with the rsa crate).
struct WeakRsa {
    key: rsa::RsaPrivateKey,
    pkcs1: Vec<u8>,
}

impl rcgen::PublicKeyData for WeakRsa {
    fn der_bytes(&self) -> &[u8] {
        &self.pkcs1
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_RSA_SHA256
    }
}

impl rcgen::SigningKey for WeakRsa {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        use sha2::Digest;
        const SHA256_PREFIX: [u8; 19] = [
            0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x01, 0x05, 0x00, 0x04, 0x20,
        ];
        let mut digest_info = SHA256_PREFIX.to_vec();
        digest_info.extend_from_slice(&sha2::Sha256::digest(msg));
        Ok(self
            .key
            .sign(rsa::Pkcs1v15Sign::new_unprefixed(), &digest_info)
            .unwrap())
    }
}

#[tokio::test]
async fn csr_with_rsa_1024_key_is_refused() {
    use rsa::pkcs1::EncodeRsaPublicKey;
    let h = Harness::start().await;
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 1024).unwrap();
    let pkcs1 = key
        .to_public_key()
        .to_pkcs1_der()
        .unwrap()
        .as_bytes()
        .to_vec();
    let weak = WeakRsa { key, pkcs1 };
    let p = empty_dn_params(vec![uri("spiffe://cluster.local/ns/default/sa/sleep")]);
    let csr = p.serialize_request(&weak).unwrap().pem().unwrap();
    // the CSR is well-formed and correctly signed: only the key size is wrong
    let der = ::pem::parse(&csr).unwrap().into_contents();
    let (_, parsed) = X509CertificationRequest::from_der(&der).unwrap();
    let mut digest_info = vec![
        0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01,
        0x05, 0x00, 0x04, 0x20,
    ];
    {
        use sha2::Digest;
        digest_info.extend_from_slice(&sha2::Sha256::digest(parsed.certification_request_info.raw));
    }
    weak.key
        .to_public_key()
        .verify(
            rsa::Pkcs1v15Sign::new_unprefixed(),
            &digest_info,
            &parsed.signature_value.data,
        )
        .unwrap();
    let r = h.send_csr(&csr, "default", "sleep").await;
    assert_refused(r, Code::InvalidArgument, "RSA-1024");
}

#[tokio::test]
async fn csr_with_tampered_signature_is_refused() {
    let h = Harness::start().await;
    let good = csr_pem(&p256(), "default", "sleep");
    let mut der = ::pem::parse(&good).unwrap().into_contents();
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let bad = ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", der));
    let r = h.send_csr(&bad, "default", "sleep").await;
    assert_refused(r, Code::InvalidArgument, "signature does not verify");
}

#[tokio::test]
async fn csr_with_swapped_public_key_is_refused() {
    // A CSR signed by key A but carrying key B: the signer must not issue a
    // certificate for a key whose owner never signed the request.
    let h = Harness::start().await;
    let a = p256();
    let b = p256();
    let csr_a = ::pem::parse(csr_pem(&a, "default", "sleep"))
        .unwrap()
        .into_contents();
    let spki_a = a.spki_der();
    let spki_b = b.spki_der();
    let pos = csr_a
        .windows(spki_a.len())
        .position(|w| w == spki_a.as_slice())
        .unwrap();
    let mut swapped = csr_a.clone();
    swapped[pos..pos + spki_a.len()].copy_from_slice(&spki_b);
    let bad = ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", swapped));
    let r = h.send_csr(&bad, "default", "sleep").await;
    assert_refused(r, Code::InvalidArgument, "signature does not verify");
}

#[tokio::test]
async fn non_pem_garbage_csr_is_refused() {
    let h = Harness::start().await;
    for garbage in [
        "this is not a CSR",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
        "",
        "\u{0}\u{1}\u{2}",
    ] {
        let r = h.send_csr(garbage, "default", "sleep").await;
        assert_refused(r, Code::InvalidArgument, "CSR");
    }
}

#[tokio::test]
async fn csr_over_64_kib_is_refused() {
    let h = Harness::start().await;
    let good = csr_pem(&p256(), "default", "sleep");
    let padded = format!("{good}{}", "\n".repeat(70 * 1024));
    let r = h.send_csr(&padded, "default", "sleep").await;
    assert_refused(r, Code::InvalidArgument, "more than the 65536 allowed");
}

/// Attack: request messages far beyond any CSR (tonic would buffer up to
/// 4 MiB per stream before the service, and its concurrency bound, sees the
/// request). The signer refuses them from the gRPC length prefix with
/// RESOURCE_EXHAUSTED — what gRPC's status-code guide and grpc-go (istiod)
/// answer, not tonic's OUT_OF_RANGE — and keeps serving.
#[tokio::test]
async fn oversized_request_is_resource_exhausted() {
    let h = Harness::start().await;
    let good = csr_pem(&p256(), "default", "sleep");
    for size in [1024 * 1024, 10 * 1024 * 1024] {
        let huge = format!("{good}{}", "\n".repeat(size));
        let r = h.send_csr(&huge, "default", "sleep").await;
        assert_refused(
            r,
            Code::ResourceExhausted,
            "larger than the 131072 bytes allowed",
        );
    }
    // A CSR at the CSR limit still reaches the CSR check (and its clear
    // INVALID_ARGUMENT), and the signer keeps serving.
    let at_limit = format!("{good}{}", "\n".repeat(64 * 1024));
    let r = h.send_csr(&at_limit, "default", "sleep").await;
    assert_refused(r, Code::InvalidArgument, "more than the 65536 allowed");
    h.issue("default", "sleep", &h.opts("default", "sleep"))
        .await
        .unwrap();
}

/// Attack: one pod (a crash loop, or a compromised workload) asking for its
/// certificate in a loop, spending the signer's CPU and filling the ledger.
/// Past its burst it is refused RESOURCE_EXHAUSTED before its CSR is parsed;
/// other replicas of the same service account keep their own buckets.
#[tokio::test]
async fn a_pod_asking_in_a_loop_is_throttled_without_starving_other_pods() {
    let h = Harness::start_with(|c| {
        c.policy.rate_limit_burst = 3;
        c.policy.rate_limit_interval = std::time::Duration::from_secs(3600);
    })
    .await;
    let pod_token = |name: &str, uid: &str| {
        let mut claims =
            h.tokens
                .service_account_claims("shop", "web", "istio-ca", now_unix(), 3600);
        claims["kubernetes.io"]["pod"] = json!({"name": name, "uid": uid});
        CallOptions {
            token: Some(h.tokens.sign_claims(&claims).unwrap()),
            ..CallOptions::default()
        }
    };
    let looping = pod_token("web-1", "uid-web-1");
    for _ in 0..3 {
        h.issue("shop", "web", &looping).await.unwrap();
    }
    let r = h.issue("shop", "web", &looping).await;
    assert_refused(
        r,
        Code::ResourceExhausted,
        "pod web-1 asked for spiffe://cluster.local/ns/shop/sa/web more often",
    );
    // Refused before the CSR is looked at: garbage gets the same answer.
    let r = h.client.create_certificate("not a CSR", &looping).await;
    assert_refused(r, Code::ResourceExhausted, "retry in");

    // Another replica of the same Deployment is served.
    h.issue("shop", "web", &pod_token("web-2", "uid-web-2"))
        .await
        .unwrap();
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("meshward_signer_requests_total{outcome=\"rate_limited\"} 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meshward_signer_requests_total{outcome=\"resource_exhausted\"} 0\n"),
        "rate limiting is not overload: {metrics}"
    );
}

/// Attack: a pod sending its bad token again and again, each one an RSA or
/// ECDSA verification the signer pays for. Past its failure burst that token
/// is refused before it is even looked at; its neighbours behind the same
/// address (a remote cluster's agents behind the east-west gateway, pods
/// behind node SNAT) keep getting certificates with their own tokens.
#[tokio::test]
async fn one_bad_pod_behind_a_shared_address_cannot_lock_out_its_neighbours() {
    let h = Harness::start_with(|c| {
        c.authn.failure_limit_burst = 3;
        c.authn.failure_limit_interval = std::time::Duration::from_secs(3600);
    })
    .await;
    let forged = TokenIssuer::generate(K8S_ISSUER, JwtAlgorithm::Es256).unwrap();
    let bad = CallOptions {
        token: Some(forged.token_for("shop", "web", now_unix()).unwrap()),
        ..CallOptions::default()
    };
    for _ in 0..3 {
        let r = h.issue("shop", "web", &bad).await;
        assert_refused(r, Code::Unauthenticated, "");
    }
    for _ in 0..20 {
        let r = h.issue("shop", "web", &bad).await;
        assert_refused(
            r,
            Code::ResourceExhausted,
            "too many failed authentications with this credential",
        );
        // The neighbour, same address (127.0.0.1), its own valid token.
        h.issue("shop", "api", &h.opts("shop", "api"))
            .await
            .unwrap();
    }
    // Another address (127.0.0.2) with a good token is served.
    let channel = h.channel_from(Some("127.0.0.2".parse().unwrap())).await;
    CaClient::from_channel(channel)
        .request_certificate(&p256(), &id("shop", "web"), &h.opts("shop", "web"))
        .await
        .unwrap();
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("meshward_signer_requests_total{outcome=\"auth_throttled\"} 20\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meshward_signer_requests_total{outcome=\"unauthenticated\"} 3\n"),
        "{metrics}"
    );
}

/// Attack: a client sending a fresh garbage token each time, so that no one
/// credential is ever throttled. The coarse per-address guard stops it.
#[tokio::test]
async fn an_address_sending_fresh_bad_tokens_in_a_loop_hits_the_coarse_guard() {
    let h = Harness::start_with(|c| {
        c.authn.address_failure_limit_burst = 5;
        c.authn.address_failure_limit_interval = std::time::Duration::from_secs(3600);
    })
    .await;
    for _ in 0..5 {
        let forged = TokenIssuer::generate(K8S_ISSUER, JwtAlgorithm::Es256).unwrap();
        let bad = CallOptions {
            token: Some(forged.token_for("shop", "web", now_unix()).unwrap()),
            ..CallOptions::default()
        };
        assert_refused(
            h.issue("shop", "web", &bad).await,
            Code::Unauthenticated,
            "",
        );
    }
    let r = h.issue("shop", "web", &h.opts("shop", "web")).await;
    assert_refused(
        r,
        Code::ResourceExhausted,
        "too many failed authentications from 127.0.0.1",
    );
}

// ---------- TTL ----------

#[tokio::test]
async fn negative_validity_duration_is_refused() {
    let h = Harness::start().await;
    let mut opts = h.opts("default", "sleep");
    opts.validity_secs = -1;
    let r = h.issue("default", "sleep", &opts).await;
    assert_refused(r, Code::InvalidArgument, "validity_duration -1 is negative");
}

#[tokio::test]
async fn huge_validity_duration_is_clamped_to_max() {
    let h = Harness::start_with(|c| {
        c.policy.default_ttl = std::time::Duration::from_secs(3600);
        c.policy.max_ttl = std::time::Duration::from_secs(2 * 3600);
    })
    .await;
    for asked in [i64::MAX, 10 * 365 * 24 * 3600, 2 * 3600 + 1] {
        let mut opts = h.opts("default", "sleep");
        opts.validity_secs = asked;
        let (_, cert) = h.issue("default", "sleep", &opts).await.unwrap();
        let (_, leaf) = X509Certificate::from_der(&cert.leaf).unwrap();
        let v = leaf.validity();
        assert_eq!(
            v.not_after.timestamp() - v.not_before.timestamp(),
            2 * 3600 + 60,
            "asked {asked}s, got the 2h max (+60s backdate)"
        );
    }
}

// ---------- overload ----------

/// Wraps the builtin CA and holds every signing call until released, so a
/// test can fill the concurrency limit deterministically.
struct GatedIssuer {
    inner: BuiltinIssuer,
    entered: Arc<tokio::sync::Notify>,
    release: Arc<tokio::sync::Semaphore>,
}

impl Issuer for GatedIssuer {
    fn name(&self) -> &'static str {
        "gated-builtin"
    }
    fn sign<'a>(&'a self, req: &'a IssueRequest) -> IssueFuture<'a> {
        Box::pin(async move {
            if req.dns_names.is_empty() {
                self.entered.notify_one();
                let _permit = self.release.acquire().await;
            }
            self.inner.sign(req).await
        })
    }
    fn trust_anchors(&self) -> Vec<CertificateDer<'static>> {
        self.inner.trust_anchors()
    }
    fn signing_validity(&self) -> SigningValidity {
        self.inner.signing_validity()
    }
}

#[tokio::test]
async fn requests_beyond_the_concurrency_limit_get_resource_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = TokenIssuer::generate(K8S_ISSUER, JwtAlgorithm::Es256).unwrap();
    let mut config = harness::test_config(dir.path(), &tokens);
    config.server.max_concurrent_requests = 1;
    let inner = BuiltinIssuer::load_or_create(
        &BuiltinOptions {
            data_dir: config.ca.data_dir.clone(),
            key_algorithm: config.ca.key_algorithm,
            organization: "cluster.local".into(),
            root_ttl: config.ca.root_ttl,
            intermediate_ttl: config.ca.intermediate_ttl,
        },
        ::time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let entered = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let issuer = Arc::new(GatedIssuer {
        inner,
        entered: entered.clone(),
        release: release.clone(),
    });
    let signer = Signer::builder(config)
        .issuer(issuer)
        .serve()
        .await
        .unwrap();
    let client = CaClient::connect(signer.grpc_addr(), signer.roots_pem(), "localhost")
        .await
        .unwrap();
    let opts = with_token(tokens.token_for("default", "sleep", now_unix()).unwrap());

    let first = {
        let client = client.clone();
        let opts = opts.clone();
        tokio::spawn(async move {
            let key = p256();
            client
                .request_certificate(&key, &id("default", "sleep"), &opts)
                .await
        })
    };
    entered.notified().await; // the first request holds the only slot
    let second = client
        .create_certificate(&csr_pem(&p256(), "default", "sleep"), &opts)
        .await;
    assert_refused(second, Code::ResourceExhausted, "concurrent request limit");
    release.add_permits(1);
    first.await.unwrap().unwrap();
    signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn refusals_are_counted_by_outcome() {
    let h = Harness::start().await;
    let _ = h
        .send_csr(&csr_pem(&p256(), "payments", "api"), "default", "api")
        .await;
    let _ = h
        .client
        .create_certificate("x", &with_token("a.b.c".into()))
        .await;
    let m = h.metrics().await;
    assert!(
        m.contains("meshward_signer_requests_total{outcome=\"permission_denied\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("meshward_signer_requests_total{outcome=\"unauthenticated\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("meshward_signer_requests_total{outcome=\"issued\"} 0"),
        "{m}"
    );
}
