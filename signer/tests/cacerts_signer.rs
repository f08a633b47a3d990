//! The signer with `ca.backend = "cacerts"`, through its real gRPC API:
//! workloads get chains from the plugged-in CA, and a rotation of the files
//! is picked up while invalid files leave the serving CA in place.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/harness.rs"]
mod harness;
#[path = "support/plugged_ca.rs"]
mod plugged_ca;

use std::path::Path;
use std::time::{Duration, Instant};

use harness::{Harness, webpki_verify};
use meshward_signer::issuer::cacerts::CaCertsConfig;
use plugged_ca::{intermediate, root, write_istio};
use rcgen::KeyPair;
use rustls_pki_types::{CertificateDer, UnixTime};

async fn signer_on(dir: &Path) -> Harness {
    let cacerts = CaCertsConfig {
        dir: dir.to_path_buf(),
        reload_interval: Duration::from_millis(100),
    };
    Harness::start_with(move |c| {
        c.ca.backend = "cacerts".to_string();
        c.ca.cacerts = Some(cacerts);
    })
    .await
}

async fn issued_root(h: &Harness) -> CertificateDer<'static> {
    let (_key, cert) = h
        .issue("default", "foo", &h.opts("default", "foo"))
        .await
        .unwrap();
    webpki_verify(&cert, UnixTime::now());
    assert_eq!(cert.roots.len(), 1);
    cert.roots[0].clone()
}

async fn wait_for_root(h: &Harness, want: &CertificateDer<'static>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while h.signer.issuer().trust_anchors() != vec![want.clone()] {
        assert!(Instant::now() < deadline, "the new CA was never picked up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn workload_gets_a_chain_from_the_plugged_in_ca() {
    let dir = tempfile::tempdir().unwrap();
    let root = root("root");
    let ca = intermediate("istioca", &root);
    write_istio(dir.path(), &ca, &[], &root);
    let h = signer_on(dir.path()).await;
    assert_eq!(h.signer.issuer().name(), "cacerts");
    let (_key, cert) = h
        .issue("default", "foo", &h.opts("default", "foo"))
        .await
        .unwrap();
    assert_eq!(cert.roots, vec![root.cert.der().clone()]);
    assert_eq!(cert.intermediates, vec![ca.cert.der().clone()]);
    webpki_verify(&cert, UnixTime::now());
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_is_picked_up_and_invalid_files_keep_the_serving_ca() {
    let dir = tempfile::tempdir().unwrap();
    let root_a = root("root-a");
    write_istio(dir.path(), &intermediate("istioca", &root_a), &[], &root_a);
    let h = signer_on(dir.path()).await;
    assert_eq!(issued_root(&h).await, *root_a.cert.der());

    // A broken update (key of another CA): refused, root-a keeps signing.
    let root_b = root("root-b");
    let ca_b = intermediate("istioca-2", &root_b);
    write_istio(dir.path(), &ca_b, &[], &root_b);
    std::fs::write(
        dir.path().join("ca-key.pem"),
        KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !h
        .metrics()
        .await
        .contains("meshward_signer_cacerts_reload_failures_total 1")
    {
        assert!(
            Instant::now() < deadline,
            "the broken files were never refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(issued_root(&h).await, *root_a.cert.der());

    // The fixed update: root-b takes over without a restart.
    std::fs::write(dir.path().join("ca-key.pem"), &ca_b.key_pem).unwrap();
    wait_for_root(&h, root_b.cert.der()).await;
    assert_eq!(issued_root(&h).await, *root_b.cert.der());
    assert!(
        h.metrics()
            .await
            .contains("meshward_signer_cacerts_reloads_total 1")
    );
}

/// Waits until the published trust bundle (what the istio-ca-root-cert
/// ConfigMaps, the bundle endpoints and WatchBundle streams carry) holds
/// exactly `want`; returns its sequence.
async fn wait_for_bundle(h: &Harness, want: &[&CertificateDer<'static>]) -> u64 {
    let want: Vec<CertificateDer<'static>> = want.iter().map(|c| (*c).clone()).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let bundle = h.signer.bundle().current();
        if bundle.roots() == want.as_slice() {
            return bundle.sequence();
        }
        assert!(
            Instant::now() < deadline,
            "the trust bundle never followed the plugged-in roots: it has {} root(s)",
            bundle.roots().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Istio's plugged-in root rotation: first both roots in root-cert.pem, then
/// a CA under the new root, then the new root alone. Every step must reach
/// the published trust bundle without a restart — otherwise the ConfigMaps
/// keep the old root only, and once the signer's serving certificate moves
/// to the new root, a starting istio-agent (which checks the CA server
/// against that ConfigMap) can no longer get a certificate.
#[tokio::test(flavor = "multi_thread")]
async fn every_step_of_a_plugged_in_root_rotation_reaches_the_trust_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (root("root-old"), root("root-new"));
    let ca_old = intermediate("istioca", &old);
    write_istio(dir.path(), &ca_old, &[], &old);
    let h = signer_on(dir.path()).await;
    let first = wait_for_bundle(&h, &[old.cert.der()]).await;

    let both = format!("{}{}", old.cert.pem(), new.cert.pem());
    std::fs::write(dir.path().join("root-cert.pem"), &both).unwrap();
    let second = wait_for_bundle(&h, &[old.cert.der(), new.cert.der()]).await;
    assert!(second > first, "the sequence moves on: {first} -> {second}");
    let m = h.metrics().await;
    assert!(m.contains("meshward_signer_bundle_roots 2"), "{m}");
    assert!(
        m.contains(&format!("meshward_signer_bundle_sequence {second}")),
        "{m}"
    );
    let (status, pem) = harness::http_get(h.signer.admin_addr(), "/v1/root-cert.pem").await;
    assert_eq!(status, 200);
    assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2, "{pem}");

    // The CA under the new root (root-cert.pem keeps both).
    let ca_new = intermediate("istioca-2", &new);
    let chain = format!("{}{}", ca_new.cert.pem(), new.cert.pem());
    std::fs::write(dir.path().join("cert-chain.pem"), chain).unwrap();
    std::fs::write(dir.path().join("ca-key.pem"), &ca_new.key_pem).unwrap();
    std::fs::write(dir.path().join("ca-cert.pem"), ca_new.cert.pem()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_key, cert) = h
            .issue("default", "foo", &h.opts("default", "foo"))
            .await
            .unwrap();
        if cert.intermediates == vec![ca_new.cert.der().clone()] {
            assert_eq!(
                cert.roots,
                vec![old.cert.der().clone(), new.cert.der().clone()]
            );
            break;
        }
        assert!(Instant::now() < deadline, "the new CA never signed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        wait_for_bundle(&h, &[old.cert.der(), new.cert.der()]).await,
        second,
        "the same roots publish nothing new"
    );

    std::fs::write(dir.path().join("root-cert.pem"), new.cert.pem()).unwrap();
    let last = wait_for_bundle(&h, &[new.cert.der()]).await;
    assert!(last > second);
}
