//! The `cacerts` backend on real files: what it refuses to load, what it
//! issues, and how it reloads. Fixtures are generated here with rcgen.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

#[path = "support/cli.rs"]
mod cli;
#[path = "support/plugged_ca.rs"]
mod plugged_ca;

use meshward_signer::issuer::cacerts::material::MaterialError;
use meshward_signer::issuer::cacerts::{CaCertsConfig, CaCertsError, CaCertsIssuer, ReloadOutcome};
use meshward_signer::issuer::{IssueRequest, Issuer, KeyKind};
use plugged_ca::{ca_params, ca_usages, child, intermediate, now, root, write_istio};
use rcgen::{CertificateParams, KeyPair, KeyUsagePurpose};
use rustls_pki_types::{CertificateDer, UnixTime};
use spiffe::SpiffeId;

const ID: &str = "spiffe://cluster.local/ns/default/sa/foo";

fn config(dir: &Path) -> CaCertsConfig {
    CaCertsConfig {
        dir: dir.to_path_buf(),
        reload_interval: Duration::from_millis(100),
    }
}

fn load(dir: &Path) -> Result<CaCertsIssuer, CaCertsError> {
    CaCertsIssuer::load(&config(dir), now())
}

fn invalid(r: Result<CaCertsIssuer, CaCertsError>) -> MaterialError {
    match r {
        Err(CaCertsError::Invalid { source, .. }) => source,
        other => panic!("expected invalid material, got {other:?}"),
    }
}

fn request() -> (KeyPair, IssueRequest) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(ID.try_into().unwrap())];
    let csr = params.serialize_request(&key).unwrap();
    let req = IssueRequest {
        csr_der: csr.der().to_vec(),
        spki_der: rcgen::PublicKeyData::subject_public_key_info(&key),
        key_kind: KeyKind::EcdsaP256,
        spiffe_id: SpiffeId::new(ID).unwrap(),
        dns_names: Vec::new(),
        not_before: now() - time::Duration::minutes(2),
        not_after: now() + time::Duration::hours(24),
    };
    (key, req)
}

/// Signs a request and verifies the result with webpki against the
/// issuer's own trust anchors; returns the root the chain ended at.
async fn issue_and_verify(issuer: &CaCertsIssuer) -> Vec<CertificateDer<'static>> {
    let (_key, req) = request();
    let chain = issuer.sign(&req).await.unwrap();
    let anchors: Vec<_> = chain
        .roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap().to_owned())
        .collect();
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
    let sans: Vec<String> = x
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|g| format!("{g:?}"))
        .collect();
    assert_eq!(sans, vec![format!("URI({ID:?})")]);
    chain.roots
}

#[tokio::test]
async fn plugged_in_intermediate_issues_leaves_chaining_to_root_cert() {
    let dir = tempfile::tempdir().unwrap();
    let root = root("root");
    let ca = intermediate("istioca", &root);
    write_istio(dir.path(), &ca, &[], &root);
    let issuer = load(dir.path()).unwrap();
    let roots = issue_and_verify(&issuer).await;
    assert_eq!(roots, vec![root.cert.der().clone()]);
    assert_eq!(issuer.name(), "cacerts");
}

#[tokio::test]
async fn two_level_chain_from_cert_chain_pem_is_followed() {
    let dir = tempfile::tempdir().unwrap();
    let root = root("root");
    let mid = intermediate("cluster-int", &root);
    let ca = intermediate("istioca", &mid);
    write_istio(dir.path(), &ca, &[&mid], &root);
    let issuer = load(dir.path()).unwrap();
    issue_and_verify(&issuer).await;
}

#[tokio::test]
async fn pkcs1_rsa_key_from_openssl_style_files_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let root = root("root");
    let pkcs8 = meshward_signer::issuer::builtin::generate_rsa_pkcs8(2048).unwrap();
    let key = KeyPair::try_from(pkcs8.as_slice()).unwrap();
    let ca = child(
        "istioca",
        &root,
        ca_params("istioca", ca_usages(), true),
        key,
    );
    write_istio(dir.path(), &ca, &[], &root);
    // Re-encode the key as PKCS#1 "RSA PRIVATE KEY", as openssl genrsa does.
    let (_, info) = x509_parser::der_parser::parse_der(&pkcs8).unwrap();
    let inner = info.as_sequence().unwrap()[2].as_slice().unwrap().to_vec();
    std::fs::write(
        dir.path().join("ca-key.pem"),
        pem::encode(&pem::Pem::new("RSA PRIVATE KEY", inner)),
    )
    .unwrap();
    let issuer = load(dir.path()).unwrap();
    issue_and_verify(&issuer).await;
}

#[tokio::test]
async fn kubernetes_tls_secret_layout_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let root = root("root");
    let ca = intermediate("istioca", &root);
    std::fs::write(dir.path().join("tls.crt"), ca.cert.pem()).unwrap();
    std::fs::write(dir.path().join("tls.key"), &ca.key_pem).unwrap();
    std::fs::write(dir.path().join("ca.crt"), root.cert.pem()).unwrap();
    let issuer = load(dir.path()).unwrap();
    issue_and_verify(&issuer).await;
}

#[tokio::test]
async fn root_used_directly_as_ca_cert_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let root = root("root");
    std::fs::write(dir.path().join("ca-cert.pem"), root.cert.pem()).unwrap();
    std::fs::write(dir.path().join("ca-key.pem"), &root.key_pem).unwrap();
    std::fs::write(dir.path().join("root-cert.pem"), root.cert.pem()).unwrap();
    let issuer = load(dir.path()).unwrap();
    issue_and_verify(&issuer).await;
}

/// istiod's own CA Secret (`istio-ca-secret`), mounted as it is: its
/// self-signed RSA root and PKCS#1 key, `cert-chain.pem`, `key.pem` and
/// `root-cert.pem` empty. A mesh moving from istiod's CA to the signer keeps
/// that root: workloads' existing certificates and new ones chain to it.
#[tokio::test]
async fn istiods_own_istio_ca_secret_keeps_the_meshs_root() {
    let dir = tempfile::tempdir().unwrap();
    let pkcs8 = meshward_signer::issuer::builtin::generate_rsa_pkcs8(2048).unwrap();
    let key = KeyPair::try_from(pkcs8.as_slice()).unwrap();
    // istiod: subject O=<trust domain>, CA, keyCertSign.
    let mut params = ca_params("unused", ca_usages(), true);
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "cluster.local");
    let root = params.self_signed(&key).unwrap();
    let (_, info) = x509_parser::der_parser::parse_der(&pkcs8).unwrap();
    let pkcs1 = info.as_sequence().unwrap()[2].as_slice().unwrap().to_vec();
    std::fs::write(dir.path().join("ca-cert.pem"), root.pem()).unwrap();
    std::fs::write(
        dir.path().join("ca-key.pem"),
        pem::encode(&pem::Pem::new("RSA PRIVATE KEY", pkcs1)),
    )
    .unwrap();
    for empty in ["cert-chain.pem", "key.pem", "root-cert.pem"] {
        std::fs::write(dir.path().join(empty), "").unwrap();
    }
    let issuer = load(dir.path()).unwrap();
    let roots = issue_and_verify(&issuer).await;
    assert_eq!(roots, vec![root.der().clone()]);
    // Leaf, then the root: no copy of the root as an intermediate.
    let (_key, req) = request();
    let chain = issuer.sign(&req).await.unwrap();
    assert!(chain.intermediates.is_empty(), "{:?}", chain.intermediates);

    // The same Secret without the empty root file at all.
    std::fs::remove_file(dir.path().join("root-cert.pem")).unwrap();
    assert_eq!(
        issue_and_verify(&load(dir.path()).unwrap()).await,
        vec![root.der().clone()]
    );
}

/// An empty root-cert.pem next to an intermediate must not make that
/// intermediate a trust anchor: workloads would be told to trust a CA
/// whose own issuer nobody checked.
#[test]
fn intermediate_is_not_made_a_trust_anchor_when_root_cert_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    let root = root("root");
    let ca = intermediate("istioca", &root);
    write_istio(dir.path(), &ca, &[], &root);
    std::fs::write(dir.path().join("root-cert.pem"), "").unwrap();
    let err = invalid(load(dir.path()));
    assert!(err.to_string().contains("root-cert.pem"), "{err}");
    std::fs::remove_file(dir.path().join("root-cert.pem")).unwrap();
    invalid(load(dir.path()));
}

#[test]
fn ca_key_not_matching_ca_cert_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = root("root");
    let ca = intermediate("istioca", &root);
    write_istio(dir.path(), &ca, &[], &root);
    std::fs::write(
        dir.path().join("ca-key.pem"),
        KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    assert_eq!(invalid(load(dir.path())), MaterialError::KeyMismatch);
}

#[test]
fn non_ca_certificate_as_ca_cert_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = root("root");
    let leaf_like = child(
        "istioca",
        &root,
        ca_params("istioca", vec![KeyUsagePurpose::DigitalSignature], false),
        KeyPair::generate().unwrap(),
    );
    write_istio(dir.path(), &leaf_like, &[], &root);
    assert!(matches!(invalid(load(dir.path())), MaterialError::NotCa(_)));
}

#[test]
fn ca_cert_without_key_cert_sign_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = root("root");
    let ca = child(
        "istioca",
        &root,
        ca_params("istioca", vec![KeyUsagePurpose::DigitalSignature], true),
        KeyPair::generate().unwrap(),
    );
    write_istio(dir.path(), &ca, &[], &root);
    let e = invalid(load(dir.path()));
    assert!(
        matches!(&e, MaterialError::NotCa(m) if m.contains("keyCertSign")),
        "{e}"
    );
}

#[test]
fn ca_cert_from_another_root_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root_a = root("root-a");
    let root_b = root("root-b");
    let ca = intermediate("istioca", &root_a);
    write_istio(dir.path(), &ca, &[], &root_b);
    assert!(matches!(
        invalid(load(dir.path())),
        MaterialError::BrokenChain(_)
    ));
}

#[test]
fn chain_missing_an_intermediate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = root("root");
    let mid = intermediate("cluster-int", &root);
    let ca = intermediate("istioca", &mid);
    write_istio(dir.path(), &ca, &[], &root);
    assert!(matches!(
        invalid(load(dir.path())),
        MaterialError::BrokenChain(_)
    ));
}

#[test]
fn ca_cert_impersonating_its_issuer_name_is_refused() {
    // Same issuer DN as the real root, but signed by another key.
    let dir = tempfile::tempdir().unwrap();
    let real = root("root");
    let forged_root = root("root");
    let ca = intermediate("istioca", &forged_root);
    write_istio(dir.path(), &ca, &[], &real);
    assert!(matches!(
        invalid(load(dir.path())),
        MaterialError::BrokenChain(_)
    ));
}

#[test]
fn expired_ca_cert_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = root("root");
    let mut params = ca_params("istioca", ca_usages(), true);
    params.not_before = now() - time::Duration::days(10);
    params.not_after = now() - time::Duration::days(1);
    let ca = child("istioca", &root, params, KeyPair::generate().unwrap());
    write_istio(dir.path(), &ca, &[], &root);
    assert!(matches!(
        invalid(load(dir.path())),
        MaterialError::NotValidNow(_)
    ));
}

#[test]
fn directory_without_a_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(load(dir.path()), Err(CaCertsError::NoLayout(_))));
}

#[test]
fn garbage_files_are_refused_not_panicked_on() {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ] {
        std::fs::write(
            dir.path().join(f),
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
    }
    assert!(matches!(
        invalid(load(dir.path())),
        MaterialError::Malformed { .. }
    ));
}

#[tokio::test]
async fn changed_files_are_reloaded_and_new_leaves_chain_to_the_new_root() {
    let dir = tempfile::tempdir().unwrap();
    let root_a = root("root-a");
    write_istio(dir.path(), &intermediate("istioca", &root_a), &[], &root_a);
    let issuer = load(dir.path()).unwrap();
    assert!(matches!(
        issuer.reload_if_changed(now()),
        ReloadOutcome::Unchanged
    ));

    let root_b = root("root-b");
    write_istio(
        dir.path(),
        &intermediate("istioca-2", &root_b),
        &[],
        &root_b,
    );
    assert!(matches!(
        issuer.reload_if_changed(now()),
        ReloadOutcome::Reloaded
    ));
    assert_eq!(
        issue_and_verify(&issuer).await,
        vec![root_b.cert.der().clone()]
    );
    assert_eq!(issuer.trust_anchors(), vec![root_b.cert.der().clone()]);
    assert_eq!(issuer.metrics().reloads.get(), 1);
    assert_eq!(issuer.metrics().reload_failures.get(), 0);
}

#[tokio::test]
async fn invalid_new_files_keep_the_old_issuer_and_count_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let root_a = root("root-a");
    write_istio(dir.path(), &intermediate("istioca", &root_a), &[], &root_a);
    let issuer = load(dir.path()).unwrap();

    // A half-finished rotation: new certificate, old key.
    let root_b = root("root-b");
    let ca_b = intermediate("istioca-2", &root_b);
    std::fs::write(dir.path().join("ca-cert.pem"), ca_b.cert.pem()).unwrap();
    match issuer.reload_if_changed(now()) {
        ReloadOutcome::Kept(CaCertsError::Invalid { source, .. }) => {
            assert_eq!(source, MaterialError::KeyMismatch)
        }
        other => panic!("expected the new files to be refused, got {other:?}"),
    }
    assert_eq!(issuer.metrics().reload_failures.get(), 1);
    // Still signing with the old CA, chaining to the old root.
    assert_eq!(
        issue_and_verify(&issuer).await,
        vec![root_a.cert.der().clone()]
    );
    // The same bad state is reported once, not on every poll.
    assert!(matches!(
        issuer.reload_if_changed(now()),
        ReloadOutcome::Unchanged
    ));
    assert_eq!(issuer.metrics().reload_failures.get(), 1);

    // Removing the files entirely also keeps the old CA.
    for f in [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ] {
        std::fs::remove_file(dir.path().join(f)).unwrap();
    }
    assert!(matches!(
        issuer.reload_if_changed(now()),
        ReloadOutcome::Kept(_)
    ));
    assert_eq!(
        issue_and_verify(&issuer).await,
        vec![root_a.cert.der().clone()]
    );

    // The rotation completes: the new CA takes over.
    write_istio(dir.path(), &ca_b, &[], &root_b);
    assert!(matches!(
        issuer.reload_if_changed(now()),
        ReloadOutcome::Reloaded
    ));
    assert_eq!(
        issue_and_verify(&issuer).await,
        vec![root_b.cert.der().clone()]
    );
}

#[tokio::test]
async fn background_reloader_picks_up_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let root_a = root("root-a");
    write_istio(dir.path(), &intermediate("istioca", &root_a), &[], &root_a);
    let issuer = Arc::new(load(dir.path()).unwrap());
    let task = issuer.spawn_reloader(Duration::from_millis(100));

    let root_b = root("root-b");
    write_istio(
        dir.path(),
        &intermediate("istioca-2", &root_b),
        &[],
        &root_b,
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while issuer.trust_anchors() != vec![root_b.cert.der().clone()] {
        assert!(
            std::time::Instant::now() < deadline,
            "reloader never swapped the CA"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    task.abort();
    assert_eq!(
        issue_and_verify(&issuer).await,
        vec![root_b.cert.der().clone()]
    );
}

mod hostile_input {
    use super::*;
    use meshward_signer::issuer::cacerts::key::parse_private_key;
    use meshward_signer::issuer::cacerts::material::{PluggedInFiles, validate};
    use proptest::prelude::*;

    fn pem_block(tag: &'static str) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..600)
            .prop_map(move |der| pem::encode(&pem::Pem::new(tag, der)).into_bytes())
    }

    fn file() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            pem_block("CERTIFICATE"),
            pem_block("PRIVATE KEY"),
            pem_block("RSA PRIVATE KEY"),
            pem_block("EC PRIVATE KEY"),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_plugged_in_files_are_refused_without_panicking(
            ca_cert in file(), ca_key in file(), cert_chain in file(), root_cert in file()
        ) {
            let files = PluggedInFiles { ca_cert, ca_key, cert_chain, root_cert };
            prop_assert!(validate(&files, now()).is_err());
        }

        #[test]
        fn arbitrary_key_files_never_panic(key in file()) {
            let _ = parse_private_key(&key);
        }
    }

    #[test]
    fn valid_files_with_one_flipped_byte_never_panic() {
        let root = root("root");
        let ca = intermediate("istioca", &root);
        let base = PluggedInFiles {
            ca_cert: ca.cert.pem().into_bytes(),
            ca_key: ca.key_pem.clone().into_bytes(),
            cert_chain: Vec::new(),
            root_cert: root.cert.pem().into_bytes(),
        };
        assert!(validate(&base, now()).is_ok());
        for which in 0..3 {
            let len = match which {
                0 => base.ca_cert.len(),
                1 => base.ca_key.len(),
                _ => base.root_cert.len(),
            };
            for i in (0..len).step_by(7) {
                let mut f = base.clone();
                let target = match which {
                    0 => &mut f.ca_cert,
                    1 => &mut f.ca_key,
                    _ => &mut f.root_cert,
                };
                target[i] ^= 0x01;
                let _ = validate(&f, now());
            }
        }
    }
}

/// `meshward-signer ca check-cacerts DIR` (and `ca status` with the
/// cacerts backend): what the signer would make of a Secret before it is
/// rolled out, or why it would refuse it, with a failing exit status.
#[test]
fn ca_check_cacerts_says_what_the_signer_would_do_before_a_rollout() {
    let run = cli::signer_cli;
    let dir = tempfile::tempdir().unwrap();
    let root = root("mesh-root");
    let ca = intermediate("istioca", &root);
    write_istio(dir.path(), &ca, &[], &root);
    let path = dir.path().to_str().unwrap();
    let (ok, out) = run(&["ca", "check-cacerts", path]);
    assert!(ok, "{out}");
    assert!(out.contains("usable"), "{out}");
    assert!(
        out.contains("signing CA: O=cluster.local, CN=istioca"),
        "{out}"
    );
    let root_line = format!(
        "trusted root: O=cluster.local, CN=mesh-root (not after {}) sha256 {}",
        x509_parser::parse_x509_certificate(root.cert.der())
            .unwrap()
            .1
            .validity()
            .not_after,
        meshward_signer::ledger::CertDigest::of(root.cert.der())
    );
    assert!(out.contains(&root_line), "{root_line:?} not in:\n{out}");

    // The same through `ca status` of a signer configured for this directory.
    let config = dir.path().join("signer.toml");
    std::fs::write(
        &config,
        format!("[ca]\nbackend = \"cacerts\"\n[ca.cacerts]\ndir = {path:?}\n"),
    )
    .unwrap();
    let (ok, status) = run(&["ca", "--config", config.to_str().unwrap(), "status"]);
    assert!(ok, "{status}");
    assert_eq!(status, out);

    // An intermediate next to an empty root file: refused, and says why.
    std::fs::write(dir.path().join("root-cert.pem"), "").unwrap();
    let (ok, out) = run(&["ca", "check-cacerts", path]);
    assert!(!ok, "{out}");
    assert!(out.contains("root-cert.pem"), "{out}");
}
