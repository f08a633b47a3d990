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
