//! A running signer picks up `ca rotate-root` from its data directory: the
//! new root reaches the bundle (admin JWKS, WatchBundle, responses) while
//! issuance stays on the old CA; once the overlap is over, issuance switches
//! without a restart and the old root stays trusted.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/harness.rs"]
mod harness;

use std::time::Duration;

use harness::{Harness, http_get, webpki_verify};
use meshward_signer::bundle::Jwks;
use meshward_signer::bundle::rotation::{CaDir, Phase};
use meshward_signer::issuer::builtin::BuiltinOptions;
use rustls_pki_types::UnixTime;

fn ca_dir(h: &Harness) -> CaDir {
    CaDir::new(BuiltinOptions {
        data_dir: h.config.ca.data_dir.clone(),
        key_algorithm: h.config.ca.key_algorithm,
        organization: h.config.trust_domain.clone(),
        root_ttl: h.config.ca.root_ttl,
        intermediate_ttl: h.config.ca.intermediate_ttl,
    })
}

/// Poll the admin JWKS until it holds `n` roots (bounded).
async fn wait_for_roots(h: &Harness, n: usize) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    for _ in 0..400 {
        let (_, body) = http_get(h.signer.admin_addr(), "/v1/bundle.jwks.json").await;
        let (_, roots) = Jwks::parse_x509_roots(&body).unwrap();
        if roots.len() == n {
            return roots;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("bundle never reached {n} roots");
}

#[tokio::test]
async fn running_signer_publishes_new_root_then_switches_issuance_without_restart() {
    let h =
        Harness::start_with(|c| c.bundle.rotation_check_interval = Duration::from_millis(50)).await;
    let old_root = h.signer.issuer().trust_anchors()[0].clone();
    let seq0 = h.signer.bundle().current().sequence();
    let dir = ca_dir(&h);
    let now = time::OffsetDateTime::now_utc();
    dir.rotate_root(now, Duration::from_secs(3600)).unwrap();

    // Overlap: both roots published, certificates still from the old CA,
    // and the response's root entry carries both roots.
    let roots = wait_for_roots(&h, 2).await;
    assert_eq!(roots[0], old_root);
    let new_root = roots[1].clone();
    assert!(h.signer.bundle().current().sequence() > seq0);
    let (_, during) = h
        .issue("shop", "cart", &h.opts("shop", "cart"))
        .await
        .unwrap();
    assert_eq!(during.roots, vec![old_root.clone(), new_root.clone()]);
    assert!(
        !chains_to(&during, &new_root),
        "not yet issued by the new CA"
    );
    webpki_verify(&during, UnixTime::now());

    // The overlap ends (as if an hour passed): the signer switches by itself.
    let state = dir.state_path();
    std::fs::write(
        &state,
        serde_json::to_string(&Phase::Overlap {
            started_at: now.unix_timestamp(),
            switch_at: now.unix_timestamp(),
        })
        .unwrap(),
    )
    .unwrap();
    let mut switched = None;
    for _ in 0..400 {
        let (_, cert) = h
            .issue("shop", "cart", &h.opts("shop", "cart"))
            .await
            .unwrap();
        if chains_to(&cert, &new_root) {
            switched = Some(cert);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let after = switched.expect("issuance switched to the new CA");
    // Draining: the old root is still trusted, new root first.
    assert_eq!(after.roots, vec![new_root.clone(), old_root.clone()]);
    assert!(matches!(dir.phase().unwrap(), Phase::Draining { .. }));
    let roots = wait_for_roots(&h, 2).await;
    assert_eq!(roots, vec![new_root, old_root]);
    // Certificates from before the switch still verify against the bundle.
    webpki_verify(&harness_cert_with_roots(&during, roots), UnixTime::now());
    h.signer.shutdown().await.unwrap();
}

fn harness_cert_with_roots(
    cert: &meshward_signer::client::IssuedCertificate,
    roots: Vec<rustls_pki_types::CertificateDer<'static>>,
) -> meshward_signer::client::IssuedCertificate {
    let mut c = cert.clone();
    c.roots = roots;
    c
}

/// Whether `cert` verifies with `root` as the only trust anchor.
fn chains_to(
    cert: &meshward_signer::client::IssuedCertificate,
    root: &rustls_pki_types::CertificateDer<'static>,
) -> bool {
    let anchors = vec![webpki::anchor_from_trusted_cert(root).unwrap().to_owned()];
    let leaf = webpki::EndEntityCert::try_from(&cert.leaf).unwrap();
    leaf.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &cert.intermediates,
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .is_ok()
}
