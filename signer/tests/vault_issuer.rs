//! The `vault` backend against a real OpenBao server (see
//! `support/openbao.rs`), driven through the `Issuer` trait: authentication,
//! outages, result checks. The same backend behind the signer's gRPC API is
//! tested in `vault.rs`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/kube_api.rs"]
mod kube_api;
#[path = "support/openbao.rs"]
mod openbao;

use std::time::{Duration, Instant};

use meshward_signer::issuer::vault::{VaultConfig, VaultIssuer};
use meshward_signer::issuer::{IssueError, IssueRequest, IssuedChain, Issuer, KeyKind};
use openbao::{AuthKind, BaoOptions, OpenBao};
use rcgen::{CertificateParams, KeyPair};
use rustls_pki_types::{CertificateDer, UnixTime};
use spiffe::SpiffeId;
use time::OffsetDateTime;

const ID: &str = "spiffe://cluster.local/ns/default/sa/foo";

fn config(bao: &OpenBao, auth: AuthKind, extra: &str) -> VaultConfig {
    bao.vault_config(auth, extra)
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// A validated-looking request for `id` whose CSR carries `csr_san` (equal to
/// `id` unless a test simulates a CSR that slipped past validation).
fn request_with(id: &str, csr_san: &str, rsa: bool) -> IssueRequest {
    let (key, kind) = if rsa {
        let der = meshward_signer::issuer::builtin::generate_rsa_pkcs8(2048).unwrap();
        (
            KeyPair::try_from(der.as_slice()).unwrap(),
            KeyKind::Rsa { bits: 2048 },
        )
    } else {
        (KeyPair::generate().unwrap(), KeyKind::EcdsaP256)
    };
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(csr_san.try_into().unwrap())];
    let csr = params.serialize_request(&key).unwrap();
    IssueRequest {
        csr_der: csr.der().to_vec(),
        spki_der: rcgen::PublicKeyData::subject_public_key_info(&key),
        key_kind: kind,
        spiffe_id: SpiffeId::new(id).unwrap(),
        dns_names: Vec::new(),
        not_before: now() - time::Duration::minutes(2),
        not_after: now() + time::Duration::hours(1),
    }
}

fn request() -> IssueRequest {
    request_with(ID, ID, false)
}

/// Independent check of a result: webpki path to `root_pem`, SAN, validity.
fn verify(chain: &IssuedChain, root_pem: &str, req: &IssueRequest) {
    let root = CertificateDer::from(pem::parse(root_pem).unwrap().into_contents());
    assert_eq!(
        chain.roots,
        vec![root.clone()],
        "roots are the configured ones"
    );
    let anchors = vec![webpki::anchor_from_trusted_cert(&root).unwrap().to_owned()];
    let leaf = webpki::EndEntityCert::try_from(&chain.leaf).unwrap();
    let at = UnixTime::since_unix_epoch(Duration::from_secs(now().unix_timestamp() as u64));
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        leaf.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &chain.intermediates,
            at,
            usage,
            None,
            None,
        )
        .unwrap();
    }
    let (_, x) = x509_parser::parse_x509_certificate(&chain.leaf).unwrap();
    let san = x.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        format!("{:?}", san.value.general_names),
        format!("[URI({:?})]", req.spiffe_id.to_string())
    );
    assert!(x.validity().not_after.timestamp() <= req.not_after.unix_timestamp() + 60);
    assert_eq!(x.public_key().raw, req.spki_der.as_slice());
}

async fn sign(issuer: &VaultIssuer, req: &IssueRequest) -> Result<IssuedChain, IssueError> {
    issuer.sign(req).await
}

#[tokio::test(flavor = "multi_thread")]
async fn token_auth_issues_a_leaf_chaining_to_the_configured_root() {
    let Some(bao) = OpenBao::start(BaoOptions::default()) else {
        return;
    };
    let issuer = VaultIssuer::connect(&config(&bao, AuthKind::Token, ""))
        .await
        .unwrap();
    for rsa in [false, true] {
        let req = request_with(ID, ID, rsa);
        let chain = sign(&issuer, &req).await.unwrap();
        verify(&chain, &bao.root_pem, &req);
        assert_eq!(chain.intermediates.len(), 1, "the istioca intermediate");
    }
    // The issuing CA's validity was learnt from Vault.
    let v = issuer.signing_validity();
    let chain = sign(&issuer, &request()).await.unwrap();
    let (_, int) = x509_parser::parse_x509_certificate(&chain.intermediates[0]).unwrap();
    assert_eq!(
        v.not_after.unix_timestamp(),
        int.validity().not_after.timestamp()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn approle_auth_issues_a_leaf_chaining_to_the_configured_root() {
    let Some(bao) = OpenBao::start(BaoOptions::default()) else {
        return;
    };
    let issuer = VaultIssuer::new(&config(&bao, AuthKind::AppRole, "")).unwrap();
    let req = request();
    verify(&sign(&issuer, &req).await.unwrap(), &bao.root_pem, &req);
    assert_eq!(bao.approle_token_count().unwrap(), 1, "one login, reused");
    verify(&sign(&issuer, &req).await.unwrap(), &bao.root_pem, &req);
    assert_eq!(bao.approle_token_count().unwrap(), 1, "one login, reused");
}

#[tokio::test(flavor = "multi_thread")]
async fn sign_verbatim_issues_the_same_checked_leaf() {
    let Some(bao) = OpenBao::start(BaoOptions::default()) else {
        return;
    };
    let issuer = VaultIssuer::new(&config(&bao, AuthKind::Token, "sign_verbatim = true")).unwrap();
    let req = request();
    verify(&sign(&issuer, &req).await.unwrap(), &bao.root_pem, &req);
}

#[tokio::test(flavor = "multi_thread")]
async fn result_carrying_another_spiffe_id_is_refused() {
    // The role copies the CSR's SANs (use_csr_sans=true). Should a CSR with
    // another identity ever get past validation, Vault signs it, and the
    // backend must refuse the result rather than hand it out.
    let Some(bao) = OpenBao::start(BaoOptions::default()) else {
        return;
    };
    let issuer = VaultIssuer::new(&config(&bao, AuthKind::Token, "")).unwrap();
    let req = request_with(ID, "spiffe://cluster.local/ns/kube-system/sa/admin", false);
    match sign(&issuer, &req).await {
        Err(IssueError::Internal { reason, .. }) => {
            assert!(
                reason.contains("refused the certificate Vault returned"),
                "{reason}"
            );
            assert!(reason.contains("kube-system"), "{reason}");
        }
        other => panic!("expected the result to be refused, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn role_ignoring_csr_sans_still_yields_exactly_the_requested_id() {
    // use_csr_sans=false: Vault takes SANs from the request parameters, so
    // the backend must send the ID itself (uri_sans), not rely on the CSR.
    let Some(bao) = OpenBao::start(BaoOptions::default()) else {
        return;
    };
    bao.write_role(&["use_csr_sans=false"]).unwrap();
    let issuer = VaultIssuer::new(&config(&bao, AuthKind::Token, "")).unwrap();
    let req = request();
    verify(&sign(&issuer, &req).await.unwrap(), &bao.root_pem, &req);
}

#[tokio::test(flavor = "multi_thread")]
async fn result_not_chaining_to_the_configured_roots_is_refused() {
    let Some(bao) = OpenBao::start(BaoOptions::default()) else {
        return;
    };
    let mut cfg = config(&bao, AuthKind::Token, "");
    let other_root = {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.self_signed(&key).unwrap().pem()
    };
    let path = bao.dir.path().join("other-root.pem");
    std::fs::write(&path, other_root).unwrap();
    cfg.roots_file = path;
    let issuer = VaultIssuer::new(&cfg).unwrap();
    match sign(&issuer, &request()).await {
        Err(IssueError::Internal { reason, .. }) => {
            assert!(reason.contains("does not chain"), "{reason}")
        }
        other => panic!("expected the result to be refused, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn spiffe_id_outside_the_roles_allowed_uri_sans_is_refused_by_vault() {
    let Some(bao) = OpenBao::start(BaoOptions::default()) else {
        return;
    };
    let issuer = VaultIssuer::new(&config(&bao, AuthKind::Token, "")).unwrap();
    let other = "spiffe://other.domain/ns/default/sa/foo";
    match sign(&issuer, &request_with(other, other, false)).await {
        Err(IssueError::Refused { reason, .. }) => {
            assert!(reason.contains("URI"), "{reason}")
        }
        other => panic!("expected Vault to refuse, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn revoked_approle_token_is_replaced_by_a_new_login() {
    let Some(bao) = OpenBao::start(BaoOptions::default()) else {
        return;
    };
    let issuer = VaultIssuer::new(&config(&bao, AuthKind::AppRole, "")).unwrap();
    let req = request();
    sign(&issuer, &req).await.unwrap();
    bao.revoke_approle_tokens().unwrap();
    assert_eq!(bao.approle_token_count().unwrap(), 0);
    verify(&sign(&issuer, &req).await.unwrap(), &bao.root_pem, &req);
    assert_eq!(bao.approle_token_count().unwrap(), 1, "logged in again");
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_approle_token_is_replaced_by_a_new_login() {
    let Some(bao) = OpenBao::start(BaoOptions {
        approle_token_ttl: Some("2s".into()),
        ..BaoOptions::default()
    }) else {
        return;
    };
    let issuer = VaultIssuer::new(&config(&bao, AuthKind::AppRole, "")).unwrap();
    let req = request();
    sign(&issuer, &req).await.unwrap();
    // Wait (bounded) until OpenBao itself has expired the token.
    let deadline = Instant::now() + Duration::from_secs(30);
    while bao.approle_token_count().unwrap() != 0 {
        assert!(Instant::now() < deadline, "token never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    verify(&sign(&issuer, &req).await.unwrap(), &bao.root_pem, &req);
}

#[tokio::test(flavor = "multi_thread")]
async fn token_refused_by_vault_is_unavailable_not_permission_denied() {
    let Some(bao) = OpenBao::start(BaoOptions::default()) else {
        return;
    };
    let cfg = config(&bao, AuthKind::Token, "");
    std::fs::write(bao.token_file(), "s.not-a-token").unwrap();
    let issuer = VaultIssuer::new(&cfg).unwrap();
    match sign(&issuer, &request()).await {
        Err(IssueError::Unavailable { reason, .. }) => {
            assert!(reason.contains("credentials are refused"), "{reason}")
        }
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn vault_outage_answers_unavailable_within_the_timeout_then_recovers() {
    let Some(mut bao) = OpenBao::start(BaoOptions::default()) else {
        return;
    };
    let timeout = Duration::from_secs(4);
    for auth in [AuthKind::Token, AuthKind::AppRole] {
        let issuer = VaultIssuer::new(&config(
            &bao,
            auth,
            "attempt_timeout = \"1s\"\ntimeout = \"4s\"\nmax_attempts = 3\n\
             backoff_initial = \"50ms\"\nbackoff_max = \"200ms\"\n\
             failure_threshold = 2\nopen_for = \"1s\"",
        ))
        .unwrap();
        let req = request();
        sign(&issuer, &req).await.unwrap();

        bao.stop();
        for _ in 0..3 {
            // Bounded by the configured budget (plus scheduling slack).
            let r = tokio::time::timeout(timeout + Duration::from_secs(5), sign(&issuer, &req))
                .await
                .expect("the backend must answer within its configured timeout");
            assert!(matches!(r, Err(IssueError::Unavailable { .. })), "{r:?}");
        }
        assert!(issuer.circuit_open(), "repeated failures open the circuit");

        bao.restart().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let chain = loop {
            match sign(&issuer, &req).await {
                Ok(chain) => break chain,
                Err(IssueError::Unavailable { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("no recovery after restart: {e}"),
            }
        };
        verify(&chain, &bao.root_pem, &req);
        assert!(!issuer.circuit_open());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_to_vault_uses_only_the_configured_ca() {
    let Some(bao) = OpenBao::start(BaoOptions {
        tls: true,
        ..BaoOptions::default()
    }) else {
        return;
    };
    assert!(bao.addr.starts_with("https://"));
    let issuer = VaultIssuer::new(&config(&bao, AuthKind::AppRole, "")).unwrap();
    let req = request();
    verify(&sign(&issuer, &req).await.unwrap(), &bao.root_pem, &req);

    // Another CA file: the TLS handshake fails, which is an outage.
    let mut cfg = config(&bao, AuthKind::AppRole, "max_attempts = 1");
    let wrong = bao.dir.path().join("wrong-ca.pem");
    std::fs::write(&wrong, bao.root_pem.as_bytes()).unwrap();
    cfg.ca_file = Some(wrong);
    let issuer = VaultIssuer::new(&cfg).unwrap();
    let r = sign(&issuer, &req).await;
    assert!(matches!(r, Err(IssueError::Unavailable { .. })), "{r:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn namespace_header_reaches_the_pki_mount_inside_the_namespace() {
    let Some(bao) = OpenBao::start(BaoOptions {
        namespace: Some("mesh".into()),
        ..BaoOptions::default()
    }) else {
        return;
    };
    let with_ns =
        VaultIssuer::new(&config(&bao, AuthKind::AppRole, "namespace = \"mesh\"")).unwrap();
    let req = request();
    verify(&sign(&with_ns, &req).await.unwrap(), &bao.root_pem, &req);

    // Without the header the AppRole and the mount do not exist.
    let without = VaultIssuer::new(&config(&bao, AuthKind::AppRole, "max_attempts = 1")).unwrap();
    assert!(sign(&without, &req).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn short_lived_file_token_is_renewed_before_it_expires() {
    let Some(bao) = OpenBao::start(BaoOptions::default()) else {
        return;
    };
    let cfg = config(&bao, AuthKind::Token, "");
    let token = bao.create_token("4s").unwrap();
    std::fs::write(bao.token_file(), &token).unwrap();
    let issuer = VaultIssuer::new(&cfg).unwrap();
    let req = request();
    // Keep signing for well past the token's original 4s; renew-self at half
    // its TTL keeps it alive, so every signing works with the same token.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(9) {
        verify(&sign(&issuer, &req).await.unwrap(), &bao.root_pem, &req);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    assert!(bao.token_alive(&token), "the original token was renewed");
}

#[tokio::test(flavor = "multi_thread")]
async fn revoked_file_token_is_replaced_by_the_rotated_file() {
    let Some(bao) = OpenBao::start(BaoOptions::default()) else {
        return;
    };
    let cfg = config(&bao, AuthKind::Token, "");
    let old = bao.create_token("1h").unwrap();
    std::fs::write(bao.token_file(), &old).unwrap();
    let issuer = VaultIssuer::new(&cfg).unwrap();
    let req = request();
    sign(&issuer, &req).await.unwrap();
    // An operator (or Vault Agent) rotates: new token in the file, old revoked.
    let new = bao.create_token("1h").unwrap();
    std::fs::write(bao.token_file(), &new).unwrap();
    bao.cli(&["token", "revoke", &old]).unwrap();
    verify(&sign(&issuer, &req).await.unwrap(), &bao.root_pem, &req);
}
