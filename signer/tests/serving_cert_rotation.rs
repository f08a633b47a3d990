//! The signer's own gRPC serving certificate follows its CA: after a root
//! rotation retires the old root, or a `cacerts` reload brings a new root,
//! an istio-agent that trusts only the new root (it reads the rewritten
//! istio-ca-root-cert) can still verify the signer and get a certificate.
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

use std::time::{Duration, Instant};

use harness::{Harness, id};
use meshward_signer::bundle::rotation::{CaDir, Phase};
use meshward_signer::client::{CaClient, IssuedCertificate, WorkloadKey, WorkloadKeyType};
use meshward_signer::issuer::builtin::BuiltinOptions;
use meshward_signer::issuer::cacerts::CaCertsConfig;
use plugged_ca::{intermediate, root, write_istio};
use rustls_pki_types::{CertificateDer, UnixTime};

fn ca_dir(h: &Harness) -> CaDir {
    CaDir::new(BuiltinOptions {
        data_dir: h.config.ca.data_dir.clone(),
        key_algorithm: h.config.ca.key_algorithm,
        organization: h.config.trust_domain.clone(),
        root_ttl: h.config.ca.root_ttl,
        intermediate_ttl: h.config.ca.intermediate_ttl,
    })
}

fn cert_pem(der: &CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// Poll (bounded) until `done` holds.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A fresh client that trusts only `root` connects to the signer over TLS
/// and asks for a certificate; retried (bounded) while the signer may still
/// be renewing its serving certificate. Returns the last error on timeout.
async fn issue_trusting_only(
    h: &Harness,
    root: &CertificateDer<'static>,
) -> Result<IssuedCertificate, String> {
    let roots_pem = cert_pem(root);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let attempt = async {
            let client = CaClient::connect(h.signer.grpc_addr(), &roots_pem, "localhost")
                .await
                .map_err(|e| format!("connect: {e:?}"))?;
            let key = WorkloadKey::generate(WorkloadKeyType::EcdsaP256).unwrap();
            client
                .request_certificate(&key, &id("shop", "cart"), &h.opts("shop", "cart"))
                .await
                .map_err(|e| format!("request: {e:?}"))
        };
        match attempt.await {
            Ok(cert) => return Ok(cert),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Whether `cert` verifies with `root` as the only trust anchor.
fn chains_to(cert: &IssuedCertificate, root: &CertificateDer<'static>) -> bool {
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

async fn assert_ca_expiry_gauge_follows_issuer(h: &Harness) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let want = format!(
            "meshward_signer_ca_cert_expiry_timestamp_seconds {}",
            h.signer
                .issuer()
                .signing_validity()
                .not_after
                .unix_timestamp()
        );
        let metrics = h.metrics().await;
        if metrics.contains(&want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "CA expiry gauge never became {want:?}:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn client_trusting_only_the_new_root_can_reach_the_signer_after_rotation() {
    let h = Harness::start_with(|c| {
        c.bundle.rotation_check_interval = Duration::from_millis(50);
        c.bundle.endpoint_addr = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let old_root = h.signer.issuer().trust_anchors()[0].clone();
    let dir = ca_dir(&h);
    let now = time::OffsetDateTime::now_utc();
    dir.rotate_root(now, Duration::from_secs(3600)).unwrap();
    wait_until("the new root in the bundle", || {
        h.signer.issuer().trust_anchors().len() == 2
    })
    .await;
    let new_root = h.signer.issuer().trust_anchors()[1].clone();
    assert_ne!(new_root, old_root);

    // Switch now.
    std::fs::write(
        dir.state_path(),
        serde_json::to_string(&Phase::Overlap {
            started_at: now.unix_timestamp(),
            switch_at: now.unix_timestamp(),
        })
        .unwrap(),
    )
    .unwrap();
    wait_until("the switch", || {
        matches!(dir.phase(), Ok(Phase::Draining { .. }))
    })
    .await;
    // Retire the old root: the switch happened long enough ago that no
    // certificate from the old CA can still be valid.
    let long_ago = now - time::Duration::days(400);
    std::fs::write(
        dir.state_path(),
        serde_json::to_string(&Phase::Draining {
            switched_at: long_ago.unix_timestamp(),
        })
        .unwrap(),
    )
    .unwrap();
    wait_until("the old root to be retired", || {
        h.signer.issuer().trust_anchors() == vec![new_root.clone()]
    })
    .await;
    assert!(matches!(dir.phase().unwrap(), Phase::Stable));

    // A new pod's agent trusts only the new root (istio-ca-root-cert).
    let cert = issue_trusting_only(&h, &new_root)
        .await
        .unwrap_or_else(|e| {
            panic!("a client trusting only the new root cannot use the signer: {e}")
        });
    assert_eq!(cert.roots, vec![new_root.clone()]);
    assert!(chains_to(&cert, &new_root));
    assert_ca_expiry_gauge_follows_issuer(&h).await;
    // The HTTPS SPIFFE bundle endpoint presents the renewed certificate too.
    let jwks = fetch_bundle_trusting_only(&h, &new_root)
        .await
        .unwrap_or_else(|e| panic!("bundle endpoint not verifiable with the new root: {e}"));
    assert!(jwks.contains("x509-svid"), "{jwks}");
    h.signer.shutdown().await.unwrap();
}

/// GET the SPIFFE bundle over HTTPS trusting only `root`; retried (bounded)
/// while the serving certificate may still be renewing.
async fn fetch_bundle_trusting_only(
    h: &Harness,
    root: &CertificateDer<'static>,
) -> Result<String, String> {
    let addr = h
        .signer
        .bundle_endpoint()
        .expect("bundle endpoint configured");
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_der(root.as_ref()).unwrap())
        .resolve("localhost", addr)
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/bundle.jwks.json", addr.port());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last = match client.get(&url).send().await {
            Ok(r) if r.status().is_success() => return r.text().await.map_err(|e| e.to_string()),
            Ok(r) => format!("status {}", r.status()),
            Err(e) => format!("{e:?}"),
        };
        if Instant::now() >= deadline {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn client_trusting_only_the_new_plugged_in_root_can_reach_the_signer_after_cacerts_swap() {
    let dir = tempfile::tempdir().unwrap();
    let root_a = root("root-a");
    write_istio(
        dir.path(),
        &intermediate("istioca-a", &root_a),
        &[],
        &root_a,
    );
    let cacerts = CaCertsConfig {
        dir: dir.path().to_path_buf(),
        reload_interval: Duration::from_millis(100),
    };
    let h = Harness::start_with(move |c| {
        c.ca.backend = "cacerts".to_string();
        c.ca.cacerts = Some(cacerts);
    })
    .await;
    let root_a_der = root_a.cert.der().clone();
    issue_trusting_only(&h, &root_a_der).await.unwrap();

    let root_b = root("root-b");
    write_istio(
        dir.path(),
        &intermediate("istioca-b", &root_b),
        &[],
        &root_b,
    );
    let root_b_der = root_b.cert.der().clone();
    wait_until("the new plugged-in CA", || {
        h.signer.issuer().trust_anchors() == vec![root_b_der.clone()]
    })
    .await;

    let cert = issue_trusting_only(&h, &root_b_der)
        .await
        .unwrap_or_else(|e| {
            panic!("a client trusting only the new root cannot use the signer: {e}")
        });
    assert_eq!(cert.roots, vec![root_b_der.clone()]);
    assert!(chains_to(&cert, &root_b_der));
    assert_ca_expiry_gauge_follows_issuer(&h).await;
    h.signer.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn signer_renews_its_serving_certificate_before_it_expires() {
    // A 3 s serving certificate is replaced at 2/3 of its life: a client
    // connecting afterwards sees a different leaf, while the CA itself
    // never changed.
    let h = Harness::start_with(|c| {
        c.server.serving_cert_ttl = Duration::from_secs(3);
        c.bundle.rotation_check_interval = Duration::from_millis(50);
    })
    .await;
    let first = serving_leaf(&h).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = serving_leaf(&h).await;
        if now != first {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the serving certificate was never renewed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still reachable with the same roots.
    let root = h.signer.issuer().trust_anchors()[0].clone();
    issue_trusting_only(&h, &root).await.unwrap();
    h.signer.shutdown().await.unwrap();
}

/// The leaf the signer presents in a TLS handshake now.
async fn serving_leaf(h: &Harness) -> CertificateDer<'static> {
    let mut roots = rustls::RootCertStore::empty();
    for r in h.signer.issuer().trust_anchors() {
        roots.add(r).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(h.signer.grpc_addr())
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .unwrap()
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}
