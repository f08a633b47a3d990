//! mTLS renewal: a client certificate from this CA authenticates its holder
//! as the SPIFFE ID in it, with no token, for that identity only.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/harness.rs"]
mod harness;

use harness::{Harness, assert_refused, id, webpki_verify};
use meshward_signer::client::{
    CaClient, CallOptions, IssuedCertificate, WorkloadKey, WorkloadKeyType,
};
use meshward_signer::issuer::builtin::{BuiltinIssuer, BuiltinOptions, CaKeyAlgorithm};
use std::sync::Arc;

use meshward_signer::Signer;
use meshward_signer::authn::keys::JwtAlgorithm;
use meshward_signer::client::token::TokenIssuer;
use meshward_signer::issuer::{IssueFuture, IssueRequest, Issuer, KeyKind, SigningValidity};
use meshward_signer::server::ca_service::to_pem;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::UnixTime;
use tonic::Code;

fn p256() -> WorkloadKey {
    WorkloadKey::generate(WorkloadKeyType::EcdsaP256).unwrap()
}

async fn connect_as(h: &Harness, cert: &IssuedCertificate, key: &WorkloadKey) -> CaClient {
    h.connect_as(cert, key).await
}

/// Sign a certificate for `ns/sa` directly with a CA in `dir`, valid over
/// `[nb, na]` relative to now (seconds).
fn sign_directly(
    dir: &std::path::Path,
    key: &WorkloadKey,
    ns: &str,
    sa: &str,
    nb: i64,
    na: i64,
) -> IssuedCertificate {
    let ca = BuiltinIssuer::load_or_create(
        &BuiltinOptions {
            data_dir: dir.to_path_buf(),
            key_algorithm: CaKeyAlgorithm::EcdsaP256,
            organization: "cluster.local".into(),
            root_ttl: std::time::Duration::from_secs(86400 * 365),
            intermediate_ttl: std::time::Duration::from_secs(86400 * 30),
        },
        time::OffsetDateTime::now_utc() - time::Duration::days(1),
    )
    .unwrap();
    let now = time::OffsetDateTime::now_utc();
    let req = IssueRequest {
        csr_der: Vec::new(),
        spki_der: key.spki_der(),
        key_kind: KeyKind::EcdsaP256,
        spiffe_id: id(ns, sa),
        dns_names: Vec::new(),
        not_before: now + time::Duration::seconds(nb),
        not_after: now + time::Duration::seconds(na),
    };
    let chain = ca.sign_now(&req).unwrap();
    IssuedCertificate::from_istio_chain(vec![
        to_pem(&chain.leaf),
        to_pem(&chain.intermediates[0]),
        to_pem(&chain.roots[0]),
    ])
    .unwrap()
}

#[tokio::test]
async fn renewal_over_mtls_without_a_token_issues_the_same_identity() {
    let h = Harness::start().await;
    let (key, first) = h
        .issue("default", "sleep", &h.opts("default", "sleep"))
        .await
        .unwrap();
    let renewer = connect_as(&h, &first, &key).await;
    let new_key = p256();
    let renewed = renewer
        .request_certificate(&new_key, &id("default", "sleep"), &CallOptions::default())
        .await
        .unwrap();
    webpki_verify(&renewed, UnixTime::now());
    assert_ne!(renewed.leaf, first.leaf);
    h.signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn renewal_asking_for_another_identity_is_refused() {
    let h = Harness::start().await;
    let (key, first) = h
        .issue("default", "sleep", &h.opts("default", "sleep"))
        .await
        .unwrap();
    let renewer = connect_as(&h, &first, &key).await;
    let r = renewer
        .request_certificate(
            &p256(),
            &id("kube-system", "admin"),
            &CallOptions::default(),
        )
        .await;
    assert_refused(
        r,
        Code::PermissionDenied,
        "but the caller is spiffe://cluster.local/ns/default/sa/sleep",
    );
    h.signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn renewal_with_a_cert_plus_a_token_for_another_identity_is_refused() {
    // The certificate is the credential; a token cannot widen it.
    let h = Harness::start().await;
    let (key, first) = h
        .issue("default", "sleep", &h.opts("default", "sleep"))
        .await
        .unwrap();
    let renewer = connect_as(&h, &first, &key).await;
    let r = renewer
        .request_certificate(
            &p256(),
            &id("kube-system", "admin"),
            &h.opts("kube-system", "admin"),
        )
        .await;
    assert_refused(
        r,
        Code::PermissionDenied,
        "but the caller is spiffe://cluster.local/ns/default/sa/sleep",
    );
    h.signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn renewal_with_an_expired_cert_is_refused() {
    let h = Harness::start().await;
    let key = p256();
    let expired = sign_directly(&h.data_dir(), &key, "default", "sleep", -7200, -3600);
    let renewer = connect_as(&h, &expired, &key).await;
    let r = renewer
        .request_certificate(&p256(), &id("default", "sleep"), &CallOptions::default())
        .await;
    assert_refused(r, Code::Unauthenticated, "expired");
    h.signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn renewal_with_a_not_yet_valid_cert_is_refused() {
    let h = Harness::start().await;
    let key = p256();
    let future = sign_directly(&h.data_dir(), &key, "default", "sleep", 3600, 7200);
    let renewer = connect_as(&h, &future, &key).await;
    let r = renewer
        .request_certificate(&p256(), &id("default", "sleep"), &CallOptions::default())
        .await;
    assert_refused(r, Code::Unauthenticated, "not valid before");
    h.signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn renewal_with_a_cert_from_another_ca_is_refused() {
    let h = Harness::start().await;
    let other_ca = tempfile::tempdir().unwrap();
    let key = p256();
    let foreign = sign_directly(other_ca.path(), &key, "default", "sleep", -60, 3600);
    // The handshake succeeds (the key is proven), the chain is judged per
    // request: refused, with the reason.
    let renewer = connect_as(&h, &foreign, &key).await;
    let r = renewer
        .request_certificate(&p256(), &id("default", "sleep"), &CallOptions::default())
        .await;
    assert_refused(
        r,
        Code::Unauthenticated,
        "does not chain to this CA's roots",
    );
    h.signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn client_certificate_is_ignored_when_mtls_renewal_is_off() {
    let h = Harness::start_with(|c| c.authn.mtls_renewal = false).await;
    let (key, first) = h
        .issue("default", "sleep", &h.opts("default", "sleep"))
        .await
        .unwrap();
    let renewer = connect_as(&h, &first, &key).await;
    let r = renewer
        .request_certificate(&p256(), &id("default", "sleep"), &CallOptions::default())
        .await;
    assert_refused(r, Code::Unauthenticated, "no credentials");
    h.signer.shutdown().await.unwrap();
}

/// An issuer whose published roots can grow at run time, as during a root
/// rotation: it signs with CA `a` and trusts `a` — plus `b` once published.
struct GrowingRoots {
    a: BuiltinIssuer,
    b_root: CertificateDer<'static>,
    published: std::sync::atomic::AtomicBool,
}

impl Issuer for GrowingRoots {
    fn name(&self) -> &'static str {
        "growing-roots"
    }
    fn sign<'a>(&'a self, req: &'a IssueRequest) -> IssueFuture<'a> {
        self.a.sign(req)
    }
    fn trust_anchors(&self) -> Vec<CertificateDer<'static>> {
        let mut roots = self.a.trust_anchors();
        if self.published.load(std::sync::atomic::Ordering::SeqCst) {
            roots.push(self.b_root.clone());
        }
        roots
    }
    fn signing_validity(&self) -> SigningValidity {
        self.a.signing_validity()
    }
}

#[tokio::test]
async fn renewal_with_a_cert_under_a_newly_published_root_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = TokenIssuer::generate(harness::K8S_ISSUER, JwtAlgorithm::Es256).unwrap();
    let config = harness::test_config(dir.path(), &tokens);
    let opts = |d: &std::path::Path| BuiltinOptions {
        data_dir: d.to_path_buf(),
        key_algorithm: CaKeyAlgorithm::EcdsaP256,
        organization: "cluster.local".into(),
        root_ttl: std::time::Duration::from_secs(86400 * 365),
        intermediate_ttl: std::time::Duration::from_secs(86400 * 30),
    };
    let a =
        BuiltinIssuer::load_or_create(&opts(&config.ca.data_dir), time::OffsetDateTime::now_utc())
            .unwrap();
    let b_dir = dir.path().join("b");
    let b = BuiltinIssuer::load_or_create(
        &opts(&b_dir),
        time::OffsetDateTime::now_utc() - time::Duration::days(1),
    )
    .unwrap();
    let issuer = Arc::new(GrowingRoots {
        a,
        b_root: b.root().clone(),
        published: std::sync::atomic::AtomicBool::new(false),
    });
    let signer = Signer::builder(config)
        .issuer(issuer.clone())
        .serve()
        .await
        .unwrap();
    let key = p256();
    let under_b = sign_directly(&b_dir, &key, "default", "sleep", -60, 3600);
    let renewer = CaClient::connect_with_client_cert(
        signer.grpc_addr(),
        signer.roots_pem(),
        "localhost",
        &under_b.chain_pem(),
        &key.private_key_pem(),
    )
    .await
    .unwrap();
    let r = renewer
        .request_certificate(&p256(), &id("default", "sleep"), &CallOptions::default())
        .await;
    assert_refused(
        r,
        Code::Unauthenticated,
        "does not chain to this CA's roots",
    );
    issuer
        .published
        .store(true, std::sync::atomic::Ordering::SeqCst);
    renewer
        .request_certificate(&p256(), &id("default", "sleep"), &CallOptions::default())
        .await
        .unwrap();
    signer.shutdown().await.unwrap();
}
