//! Revocation on real Envoy 1.40: the signer's CRL in the inbound
//! validation context refuses a revoked client certificate at the
//! handshake, and the filter's ledger lookup denies a revoked certificate
//! on a connection that was already open when it was revoked.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/envoy_mesh.rs"]
mod envoy_mesh;

use std::time::Duration;

use envoy_mesh::{FRONTEND, Mesh};
use meshward_e2e::envoy::bootstrap::SIGNER_CLUSTER;
use meshward_signer::ledger::{CertDigest, RevocationReason, RevocationTarget};
use serde_json::json;

/// Revokes `digest` in the mesh signer's ledger, as `ca revoke --sha256` does.
async fn revoke(mesh: &Mesh, digest: CertDigest) {
    let revoked = mesh
        .signer
        .signer()
        .unwrap()
        .ledger()
        .unwrap()
        .revoke(
            &RevocationTarget::Sha256(digest),
            RevocationReason::KeyCompromise,
            time::OffsetDateTime::now_utc(),
        )
        .await
        .unwrap();
    assert_eq!(revoked.len(), 1, "the certificate is in the ledger");
}

#[tokio::test]
async fn revoked_certificate_is_denied_on_an_open_connection() {
    let mesh = Mesh::start().await;
    let plugin = mesh.http_plugin(json!({
        "trustDomain": "cluster.local",
        "rules": [{"name": "frontend", "action": "ALLOW",
                   "from": [{"principals": ["cluster.local/ns/shop/sa/frontend"]}]}],
        "ledger": {
            "cluster": SIGNER_CLUSTER,
            "authority": "meshward-signer.istio-system.svc",
            "timeout": "2s",
            "lookup": "always",
            "cacheTtl": "1s",
            "negativeCacheTtl": "1s",
        },
    }));
    let backend = mesh.backend(vec![plugin], |_| {}).await;
    let frontend = mesh.client("shop", "frontend", &[&backend]).await;
    let ok = mesh.get(&frontend, "/api/orders").await;
    assert_eq!(ok.status, 200, "{ok:?}\n{}", backend.log());

    let leaf = frontend.agent().presented_chain()[0].clone();
    revoke(&mesh, CertDigest::of(leaf.as_ref())).await;
    // Within ledger.cacheTtl (1 s here) the next request on the same
    // connection is denied, naming the revocation.
    let mut denied = None;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = mesh.get(&frontend, "/api/orders").await;
        if r.status == 403 {
            denied = Some(r);
            break;
        }
        assert_eq!(r.status, 200, "{r:?}");
    }
    let denied = denied.unwrap_or_else(|| panic!("never denied\n{}", backend.log()));
    let reason = denied.header("x-meshward-deny-reason").unwrap_or_default();
    assert!(
        reason.contains("peer certificate revoked") && reason.contains("key-compromise"),
        "{denied:?}"
    );
    // It was the connection opened before the revocation: the frontend
    // sidecar's pool kept it, the backend's inbound saw one connection.
    let connections = backend
        .admin()
        .stat("http.inbound_0.0.0.0_80.downstream_cx_total")
        .await
        .unwrap();
    assert_eq!(connections, 1, "the requests did not share one connection");
    let stats = backend.admin().prometheus().await.unwrap();
    assert!(
        stats.lines().any(|l| l.contains("revoked_certificate")
            && l.contains("meshward_decisions_total")
            && !l.ends_with(" 0")),
        "the deny is counted under its reason: {}",
        stats
            .lines()
            .filter(|l| l.contains("meshward_decisions"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let _ = FRONTEND;
}

#[tokio::test]
async fn revoked_client_certificate_fails_the_handshake() {
    // The signer writes ca-crl.pem into its bundle directory (what the
    // istio-ca-crl ConfigMap carries); the backend's agent mounts it and
    // puts it into ROOTCA's validation context.
    let mesh = Mesh::start_configured(Duration::from_secs(24 * 3600), |c, dir| {
        c.bundle.dir = Some(dir.join("bundle"));
        c.revocation.crl_check_interval = Duration::from_millis(100);
    })
    .await;
    let crl_file = mesh.dir.path().join("bundle").join("ca-crl.pem");
    let backend = mesh
        .backend(vec![], |spec| {
            spec.workload.crl_file = Some(crl_file.clone());
        })
        .await;
    assert!(
        backend.agent().crl().is_some(),
        "the signer's first CRL was not mounted"
    );
    let addr = backend.inbound_addr().unwrap();
    let frontend = mesh.mtls_client("shop", "frontend").await;
    let bystander = mesh.mtls_client("shop", "other").await;
    // With the (empty) CRL loaded, both get through.
    let r = frontend.request(addr, "GET", "/", &[]).await.unwrap();
    assert_eq!(r.status, 200, "{r:?}\n{}", backend.log());

    let before = backend.agent().crl();
    revoke(&mesh, CertDigest::of(&frontend.identity().leaf)).await;
    let mut refused = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if backend.agent().crl() == before {
            continue;
        }
        match frontend.request(addr, "GET", "/", &[]).await {
            Err(_) => {
                refused = true;
                break;
            }
            Ok(r) => assert_eq!(r.status, 200, "{r:?}"),
        }
    }
    assert!(
        refused,
        "the revoked certificate still got through\n{}",
        backend.log()
    );
    // Envoy refused it in the handshake, as revoked; others still pass.
    let stats = backend.admin().stats().await.unwrap();
    let fail_verify: u64 = stats
        .iter()
        .filter(|(k, _)| k.ends_with("ssl.fail_verify_error"))
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum();
    assert!(fail_verify >= 1, "{stats:?}");
    let r = bystander.request(addr, "GET", "/", &[]).await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
}
