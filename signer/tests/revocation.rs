//! Revocation: `ca revoke` / `unrevoke` / `revocations`, the refusal of a
//! revoked renewal credential, the CRL, and the ledger answer the filter
//! reads.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/cli.rs"]
mod cli;
#[path = "support/harness.rs"]
mod harness;
#[path = "support/plugged_ca.rs"]
mod plugged_ca;

use std::time::Duration;

use harness::{Harness, assert_refused, http_get, id};
use meshward_signer::client::{
    CaClient, CallOptions, IssuedCertificate, WorkloadKey, WorkloadKeyType,
};
use meshward_signer::ledger::{CertDigest, SqliteLedger, SqliteOptions};
use tonic::Code;
use x509_parser::prelude::FromDer;

fn p256() -> WorkloadKey {
    WorkloadKey::generate(WorkloadKeyType::EcdsaP256).unwrap()
}

async fn connect_as(h: &Harness, cert: &IssuedCertificate, key: &WorkloadKey) -> CaClient {
    h.connect_as(cert, key).await
}

fn digest(cert: &IssuedCertificate) -> String {
    CertDigest::of(cert.leaf.as_ref()).to_hex()
}

/// A config file for the CLI: the harness signer's data dir (so its SQLite
/// ledger), as an operator would run it in the signer's pod.
fn cli_config(h: &Harness) -> std::path::PathBuf {
    let path = h.dir.path().join("cli.toml");
    std::fs::write(
        &path,
        format!(
            "[ca]\ndata_dir = {:?}\n",
            h.config.ca.data_dir.display().to_string()
        ),
    )
    .unwrap();
    path
}

fn revoke_cli(h: &Harness, args: &[&str]) -> (bool, String) {
    let config = cli_config(h);
    let mut all = vec!["ca", "-c", config.to_str().unwrap()];
    all.extend_from_slice(args);
    cli::signer_cli(&all)
}

/// The CRL on the admin port, once `check` holds for its serials (bounded).
async fn crl_until(h: &Harness, check: impl Fn(&[String]) -> bool) -> (Vec<String>, Vec<u8>) {
    let url = format!("http://{}/v1/crl", h.signer.admin_addr());
    let client = reqwest::Client::new();
    let mut last = Vec::new();
    for _ in 0..200 {
        let resp = client.get(&url).send().await.unwrap();
        if resp.status() == 200 {
            assert_eq!(
                resp.headers()["content-type"],
                "application/pkix-crl",
                "CRL content type"
            );
            let der = resp.bytes().await.unwrap().to_vec();
            let (_, crl) =
                x509_parser::revocation_list::CertificateRevocationList::from_der(&der).unwrap();
            let serials: Vec<String> = crl
                .iter_revoked_certificates()
                .map(|r| {
                    hex::encode(r.raw_serial())
                        .trim_start_matches("00")
                        .to_string()
                })
                .collect();
            if check(&serials) {
                return (serials, der);
            }
            last = serials;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the CRL never matched; last entries: {last:?}");
}

fn fast_crl(c: &mut meshward_signer::Config) {
    c.revocation.crl_check_interval = Duration::from_millis(50);
}

#[tokio::test]
async fn stolen_key_after_revocation_cannot_renew() {
    let h = Harness::start_with(fast_crl).await;
    let (key, cert) = h
        .issue("shop", "frontend", &h.opts("shop", "frontend"))
        .await
        .unwrap();
    // Whoever holds the key can renew with it over mTLS, no token needed...
    let thief = connect_as(&h, &cert, &key).await;
    thief
        .request_certificate(&p256(), &id("shop", "frontend"), &CallOptions::default())
        .await
        .unwrap();
    // ...until the operator revokes it, with the real CLI.
    let (ok, out) = revoke_cli(
        &h,
        &[
            "revoke",
            "--sha256",
            &digest(&cert),
            "--reason",
            "key-compromise",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("revoked 1 certificate(s)"), "{out}");
    let r = thief
        .request_certificate(&p256(), &id("shop", "frontend"), &CallOptions::default())
        .await;
    assert_refused(r, Code::PermissionDenied, &digest(&cert));
    // On a fresh connection too, and the refusal is counted.
    let again = connect_as(&h, &cert, &key).await;
    let r = again
        .request_certificate(&p256(), &id("shop", "frontend"), &CallOptions::default())
        .await;
    assert_refused(r, Code::PermissionDenied, "was revoked");
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("meshward_signer_requests_total{outcome=\"revoked\"} 2"),
        "{metrics}"
    );
    // The workload itself gets a new certificate with its token.
    h.issue("shop", "frontend", &h.opts("shop", "frontend"))
        .await
        .unwrap();
    h.signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_node_agent_whose_own_certificate_is_revoked_is_refused() {
    let h = Harness::start_with(|c| {
        c.authn.trusted_node_accounts = vec!["istio-system/ztunnel".to_string()];
        c.authn.unbound_node_agents = true;
    })
    .await;
    let (key, agent_cert) = h
        .issue(
            "istio-system",
            "ztunnel",
            &h.opts("istio-system", "ztunnel"),
        )
        .await
        .unwrap();
    let agent = connect_as(&h, &agent_cert, &key).await;
    let for_pod = CallOptions {
        impersonated_identity: Some(id("shop", "backend").to_string()),
        ..CallOptions::default()
    };
    agent
        .request_certificate(&p256(), &id("shop", "backend"), &for_pod)
        .await
        .unwrap();
    let (ok, out) = revoke_cli(&h, &["revoke", "--serial", &serial_of(&agent_cert)]);
    assert!(ok, "{out}");
    let r = agent
        .request_certificate(&p256(), &id("shop", "backend"), &for_pod)
        .await;
    assert_refused(r, Code::PermissionDenied, "was revoked");
    h.signer.shutdown().await.unwrap();
}

fn serial_of(cert: &IssuedCertificate) -> String {
    let (_, c) = x509_parser::parse_x509_certificate(cert.leaf.as_ref()).unwrap();
    // As `openssl x509 -serial` prints it: upper case, colons allowed.
    c.raw_serial()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn serial_hex(cert: &IssuedCertificate) -> String {
    let (_, c) = x509_parser::parse_x509_certificate(cert.leaf.as_ref()).unwrap();
    hex::encode(c.raw_serial())
        .trim_start_matches("00")
        .to_string()
}

#[tokio::test]
async fn revocation_by_identity_leaves_later_certificates_valid() {
    let h = Harness::start_with(fast_crl).await;
    let mut before = Vec::new();
    for _ in 0..2 {
        before.push(
            h.issue("shop", "cart", &h.opts("shop", "cart"))
                .await
                .unwrap(),
        );
    }
    let (_, other) = h
        .issue("shop", "other", &h.opts("shop", "other"))
        .await
        .unwrap();
    let (ok, out) = revoke_cli(
        &h,
        &[
            "revoke",
            "--spiffe-id",
            "spiffe://cluster.local/ns/shop/sa/cart",
            "--reason",
            "privilege-withdrawn",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("revoked 2 certificate(s)"), "{out}");
    let (ok, listed) = revoke_cli(&h, &["revocations", "-o", "json"]);
    assert!(ok, "{listed}");
    // stdout (the JSON) comes first in what `signer_cli` returns.
    let list: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&listed)
        .into_iter()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(list.len(), 2, "{listed}");
    for v in &list {
        assert_eq!(v["spiffeId"], "spiffe://cluster.local/ns/shop/sa/cart");
        assert_eq!(v["reason"], "privilege-withdrawn");
    }
    // Issued later: valid, and renews over mTLS.
    let (later_key, later) = h
        .issue("shop", "cart", &h.opts("shop", "cart"))
        .await
        .unwrap();
    let renewer = connect_as(&h, &later, &later_key).await;
    renewer
        .request_certificate(&p256(), &id("shop", "cart"), &CallOptions::default())
        .await
        .unwrap();
    for (key, cert) in &before {
        let c = connect_as(&h, cert, key).await;
        let r = c
            .request_certificate(&p256(), &id("shop", "cart"), &CallOptions::default())
            .await;
        assert_refused(r, Code::PermissionDenied, "was revoked");
    }
    // The ledger answer the filter reads says so, for exactly those.
    for (_, cert) in &before {
        let (status, body) = http_get(
            h.signer.admin_addr(),
            &format!("/v1/certificates/{}", digest(cert)),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["revocation"]["reason"], "privilege-withdrawn", "{body}");
    }
    for cert in [&later, &other] {
        let (_, body) = http_get(
            h.signer.admin_addr(),
            &format!("/v1/certificates/{}", digest(cert)),
        )
        .await;
        assert!(!body.contains("revocation"), "{body}");
    }
    // The CRL lists the two, not the later one nor the other identity.
    let want: Vec<String> = before.iter().map(|(_, c)| serial_hex(c)).collect();
    let (serials, _) = crl_until(&h, |s| s.len() == 2).await;
    for w in &want {
        assert!(serials.contains(w), "{serials:?} lacks {w}");
    }
    assert!(!serials.contains(&serial_hex(&later)));
    h.signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn unrevoke_clears_the_published_crl() {
    let h = Harness::start_with(fast_crl).await;
    let (_, cert) = h
        .issue("shop", "frontend", &h.opts("shop", "frontend"))
        .await
        .unwrap();
    // Before any revocation the CRL exists, with no entry.
    crl_until(&h, <[String]>::is_empty).await;
    let (ok, out) = revoke_cli(&h, &["revoke", "--sha256", &digest(&cert)]);
    assert!(ok, "{out}");
    let (serials, der) = crl_until(&h, |s| s.len() == 1).await;
    assert_eq!(serials, vec![serial_hex(&cert)]);
    // Signed by the CA that issued the leaf, v2, with a bounded nextUpdate.
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der).unwrap();
    let (_, issuing) = x509_parser::parse_x509_certificate(cert.intermediates[0].as_ref()).unwrap();
    assert_eq!(crl.issuer(), issuing.subject());
    crl.verify_signature(issuing.public_key()).unwrap();
    assert_eq!(crl.version(), Some(x509_parser::x509::X509Version::V2));
    let next = crl.next_update().unwrap().timestamp();
    let this = crl.last_update().timestamp();
    assert!(next > this && next - this <= 24 * 3600, "{this} {next}");
    // The PEM form and the directory sink carry the same CRL.
    let (status, pem) = http_get(h.signer.admin_addr(), "/v1/crl.pem").await;
    assert_eq!(status, 200);
    assert!(pem.starts_with("-----BEGIN X509 CRL-----"), "{pem}");

    let (ok, out) = revoke_cli(&h, &["unrevoke", "--sha256", &digest(&cert)]);
    assert!(ok, "{out}");
    assert!(out.contains("cleared 1"), "{out}");
    // Really cleared: a zero-entry CRL replaces it (istio/istio#61073).
    crl_until(&h, <[String]>::is_empty).await;
    let (ok, listed) = revoke_cli(&h, &["revocations"]);
    assert!(ok && listed.contains("0 revocation(s)"), "{listed}");
    // A revoke that matches nothing says so and fails.
    let (ok, out) = revoke_cli(&h, &["revoke", "--sha256", &"ab".repeat(32)]);
    assert!(!ok && out.contains("nothing revoked"), "{out}");
    h.signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn revoked_certificates_are_written_to_the_bundle_directory_as_ca_crl_pem() {
    let bundle_dir = tempfile::tempdir().unwrap();
    let dir = bundle_dir.path().to_path_buf();
    let h = Harness::start_with(move |c| {
        fast_crl(c);
        c.bundle.dir = Some(dir);
    })
    .await;
    let (_, cert) = h
        .issue("shop", "frontend", &h.opts("shop", "frontend"))
        .await
        .unwrap();
    let (ok, out) = revoke_cli(&h, &["revoke", "--sha256", &digest(&cert)]);
    assert!(ok, "{out}");
    crl_until(&h, |s| s.len() == 1).await;
    let path = bundle_dir.path().join("ca-crl.pem");
    let mut found = false;
    for _ in 0..100 {
        if let Ok(text) = std::fs::read_to_string(&path) {
            let der = pem::parse(&text).unwrap().into_contents();
            let (_, crl) =
                x509_parser::revocation_list::CertificateRevocationList::from_der(&der).unwrap();
            if crl.iter_revoked_certificates().count() == 1 {
                found = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(found, "{} never listed the revocation", path.display());
    h.signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn revocations_are_kept_by_the_sqlite_ledger_and_drop_out_at_expiry() {
    use meshward_signer::ledger::{IssuanceRecord, Ledger, RevocationReason, RevocationTarget};
    let dir = tempfile::tempdir().unwrap();
    let ledger = SqliteLedger::open(&SqliteOptions {
        path: dir.path().join("l.sqlite"),
        busy_timeout: Duration::from_secs(5),
        commit_delay: Duration::ZERO,
    })
    .unwrap();
    let t = |s: i64| time::OffsetDateTime::from_unix_timestamp(s).unwrap();
    let rec = |b: u8, not_after: i64, issued_at: i64| IssuanceRecord {
        sha256: CertDigest::from_bytes([b; 32]),
        serial: format!("{b:02x}"),
        spiffe_id: "spiffe://td/ns/a/sa/b".into(),
        namespace: "a".into(),
        not_before: t(issued_at),
        not_after: t(not_after),
        backend: "builtin".into(),
        caller: "spiffe://td/ns/a/sa/b".into(),
        issued_at: t(issued_at),
    };
    ledger.record(&rec(1, 2_000, 100)).await.unwrap();
    ledger.record(&rec(2, 500, 100)).await.unwrap();
    ledger.record(&rec(3, 3_000, 1_200)).await.unwrap();
    let target = RevocationTarget::spiffe_id("spiffe://td/ns/a/sa/b").unwrap();
    // At 1 000: 1 is unexpired and issued before; 2 has expired; 3 is later.
    let revoked = ledger
        .revoke(&target, RevocationReason::KeyCompromise, t(1_000))
        .await
        .unwrap();
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0].sha256, CertDigest::from_bytes([1; 32]));
    assert_eq!(ledger.revocations(t(1_500)).await.unwrap().len(), 1);
    assert!(
        ledger
            .revocation(CertDigest::from_bytes([3; 32]))
            .await
            .unwrap()
            .is_none()
    );
    // Past its certificate's notAfter the entry is no longer listed.
    assert!(ledger.revocations(t(2_001)).await.unwrap().is_empty());
    // Reopening keeps it (the table is created only if missing).
    drop(ledger);
    let ledger = SqliteLedger::open(&SqliteOptions {
        path: dir.path().join("l.sqlite"),
        busy_timeout: Duration::from_secs(5),
        commit_delay: Duration::ZERO,
    })
    .unwrap();
    assert_eq!(ledger.revocations(t(1_500)).await.unwrap().len(), 1);
    assert_eq!(
        ledger
            .unrevoke(&RevocationTarget::Sha256(CertDigest::from_bytes([1; 32])))
            .await
            .unwrap(),
        1
    );
    assert!(ledger.revocations(t(1_500)).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crl_that_cannot_be_signed_never_blocks_rotation() {
    use plugged_ca::{Ca, ca_params, child, root, write_istio};
    use rcgen::{KeyPair, KeyUsagePurpose as Ku};
    // A plugged-in intermediate without the cRLSign key usage: it may sign
    // certificates, not CRLs (istio/istio#61075: an invalid CRL silently
    // blocked certificate rotation).
    let no_crl_sign = |cn: &str, parent: &Ca| {
        child(
            cn,
            parent,
            ca_params(cn, vec![Ku::KeyCertSign, Ku::DigitalSignature], true),
            KeyPair::generate().unwrap(),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let root_a = root("root-a");
    write_istio(dir.path(), &no_crl_sign("istioca", &root_a), &[], &root_a);
    let cacerts = meshward_signer::issuer::cacerts::CaCertsConfig {
        dir: dir.path().to_path_buf(),
        reload_interval: Duration::from_millis(100),
    };
    let h = Harness::start_with(move |c| {
        fast_crl(c);
        c.ca.backend = "cacerts".to_string();
        c.ca.cacerts = Some(cacerts);
    })
    .await;
    let (_, cert) = h
        .issue("shop", "frontend", &h.opts("shop", "frontend"))
        .await
        .unwrap();
    let (ok, out) = revoke_cli(&h, &["revoke", "--sha256", &digest(&cert)]);
    assert!(ok, "{out}");
    // The CRL fails, is counted, and /v1/crl says there is none...
    let mut failed = false;
    for _ in 0..200 {
        let m = h.metrics().await;
        if m.lines()
            .any(|l| l.starts_with("meshward_signer_crl_failures_total ") && !l.ends_with(" 0"))
        {
            failed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(failed, "the CRL failure was never counted");
    let (status, body) = http_get(h.signer.admin_addr(), "/v1/crl").await;
    assert_eq!(status, 503, "{body}");
    // ...while issuance goes on and a rotation of the plugged-in CA is
    // picked up: new certificates chain to the new root.
    let root_b = root("root-b");
    write_istio(dir.path(), &no_crl_sign("istioca-2", &root_b), &[], &root_b);
    let mut rotated = false;
    for _ in 0..400 {
        let (_, c) = h
            .issue("shop", "frontend", &h.opts("shop", "frontend"))
            .await
            .unwrap();
        if c.roots == vec![root_b.cert.der().clone()] {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rotated, "the rotation never reached issuance");
    // And the revocation still refuses the revoked certificate as a
    // credential: it never depended on the CRL.
    let (_, status) = (0, http_get(h.signer.admin_addr(), "/v1/revocations").await);
    assert_eq!(status.0, 200);
    assert!(status.1.contains(&digest(&cert)), "{}", status.1);
    h.signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_crl_is_signed_again_before_its_next_update_even_without_a_change() {
    use meshward_signer::issuer::Issuer;
    use meshward_signer::issuer::builtin::{BuiltinIssuer, BuiltinOptions, CaKeyAlgorithm};
    use meshward_signer::revocation::{CrlMetrics, CrlPublisher, RevocationConfig};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let t0 = time::OffsetDateTime::now_utc();
    let issuer: Arc<dyn Issuer> = Arc::new(
        BuiltinIssuer::load_or_create(
            &BuiltinOptions {
                data_dir: dir.path().join("ca"),
                key_algorithm: CaKeyAlgorithm::EcdsaP256,
                organization: "cluster.local".into(),
                root_ttl: Duration::from_secs(86400 * 365),
                intermediate_ttl: Duration::from_secs(86400 * 30),
            },
            t0,
        )
        .unwrap(),
    );
    let ledger = Arc::new(
        SqliteLedger::open(&SqliteOptions {
            path: dir.path().join("l.sqlite"),
            busy_timeout: Duration::from_secs(5),
            commit_delay: Duration::ZERO,
        })
        .unwrap(),
    );
    let config = RevocationConfig {
        crl_validity: Duration::from_secs(24 * 3600),
        ..RevocationConfig::default()
    };
    let crl = CrlPublisher::new(issuer, ledger, config, None, CrlMetrics::default());
    assert!(crl.refresh(t0).await.unwrap(), "the first CRL is signed");
    let first = crl.current().unwrap();
    assert_eq!(
        first.next_update - first.this_update,
        time::Duration::days(1)
    );
    // Nothing changed and less than half the validity passed: kept.
    assert!(!crl.refresh(t0 + time::Duration::hours(11)).await.unwrap());
    // Past half of it: signed again, nextUpdate moves, the number grows.
    assert!(crl.refresh(t0 + time::Duration::hours(12)).await.unwrap());
    let second = crl.current().unwrap();
    assert!(second.next_update > first.next_update);
    assert!(second.number > first.number);
}
