//! A full root rotation of the signer's built-in CA under live mTLS
//! traffic between real Envoy sidecars, with no failed handshake or request.
//!
//! Each sidecar's agent learns the signer's root set from the last entry of
//! every chain it issues (as istio-agent does) and writes it to the
//! `ROOTCA` SDS secret, which Envoy reloads without a restart; the signer
//! publishes the new root first, switches issuance after the overlap
//! (fast-forwarded here once every sidecar trusts the new root), and retires
//! the old root once no certificate under it is valid. Every request is a
//! new upstream connection, so every request is a new mTLS handshake
//! between two Envoys.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshward_e2e::envoy::bootstrap::InboundApp;
use meshward_e2e::envoy::client;
use meshward_e2e::envoy::sidecar::{EnvoyMesh, EnvoySidecar, SidecarSpec};
use meshward_e2e::mesh::backend::spawn_echo;
use meshward_e2e::mesh::ca::TOKEN_ISSUER;
use meshward_e2e::mesh::{LocalSigner, tls};
use meshward_e2e::wasm::filter_wasm_path;
use meshward_signer::authn::keys::JwtAlgorithm;
use meshward_signer::bundle::rotation::Phase;
use meshward_signer::client::token::TokenIssuer;
use rustls_pki_types::{CertificateDer, UnixTime};

/// Certificate lifetime (also the signer's max TTL, which bounds how long
/// the old root stays after the switch).
const CERT_TTL: Duration = Duration::from_secs(8);
/// Upper bound for every wait below (the machine may be loaded).
const WAIT: Duration = Duration::from_secs(90);

const PHASES: [&str; 4] = ["stable", "overlap", "draining", "retired"];

#[derive(Default)]
struct Traffic {
    phase: AtomicUsize,
    ok: [AtomicU64; 4],
    failed: Mutex<Vec<String>>,
}

impl Traffic {
    fn ok_total(&self) -> u64 {
        self.ok.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// Whether `chain` (leaf first) verifies for client and server auth with
/// `roots` as the only trust anchors.
fn chains_to(chain: &[CertificateDer<'static>], roots: &[CertificateDer<'static>]) -> bool {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return false;
    };
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap().to_owned())
        .collect();
    let leaf = webpki::EndEntityCert::try_from(leaf).unwrap();
    [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ]
    .into_iter()
    .all(|usage| {
        leaf.verify_for_usage(
            tls::provider().signature_verification_algorithms.all,
            &anchors,
            intermediates,
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .is_ok()
    })
}

/// Polls `check` every 50 ms until it holds; panics with `what` after [`WAIT`].
async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `n` more requests succeeded.
async fn more_traffic(traffic: &Traffic, n: u64) {
    let target = traffic.ok_total() + n;
    wait_until(&format!("{n} more successful requests"), || {
        traffic.ok_total() >= target
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_under_live_mtls_traffic_fails_no_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = Arc::new(TokenIssuer::generate(TOKEN_ISSUER, JwtAlgorithm::Es256).unwrap());
    let signer = LocalSigner::start_configured(&dir.path().join("ca"), CERT_TTL, tokens, |c| {
        c.bundle.rotation_check_interval = Duration::from_millis(100);
    })
    .await
    .unwrap();
    let bundle = signer.signer().unwrap().bundle().clone();
    let ca_dir = signer.ca_dir();
    let mesh = EnvoyMesh {
        signer_grpc: signer.grpc_addr().unwrap(),
        signer_admin: signer.admin_addr().unwrap(),
        roots_pem: signer.roots_pem().unwrap(),
        tokens: signer.tokens(),
        filter_wasm: filter_wasm_path(),
        dir: dir.path().join("sidecars"),
    };
    let old_root = {
        let roots = bundle.current().roots().to_vec();
        assert_eq!(roots.len(), 1, "one root before the rotation");
        roots[0].clone()
    };

    // c serves; b serves and calls c; a serves and calls b and c (static
    // clusters need the peer's port first).
    let mut sidecars: Vec<Arc<EnvoySidecar>> = Vec::new();
    for name in ["c", "b", "a"] {
        let (app, _task) = spawn_echo(name).await.unwrap();
        let mut spec = SidecarSpec::new("shop", name);
        spec.workload.cert_ttl = CERT_TTL;
        spec.inbound = Some(InboundApp::Http(app));
        for peer in &sidecars {
            let host = peer.identity().rsplit('/').next().unwrap().to_owned();
            let mut up = peer.as_upstream(&format!("{host}.shop")).unwrap();
            up.handshake_per_request = true;
            spec.upstreams.push(up);
        }
        sidecars.push(Arc::new(EnvoySidecar::start(spec, &mesh).await.unwrap()));
    }
    sidecars.reverse(); // a, b, c
    for s in &sidecars {
        assert_eq!(s.agent().trusted_roots(), vec![old_root.clone()]);
    }

    // Live traffic; every request is a new mTLS connection between Envoys.
    let traffic = Arc::new(Traffic::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut flows = Vec::new();
    for (from, to) in [(0, 1), (0, 2), (1, 2)] {
        let (from, to) = (sidecars[from].clone(), sidecars[to].clone());
        let traffic = traffic.clone();
        let mut stop = stop_rx.clone();
        flows.push(tokio::spawn(async move {
            let app = to.identity().rsplit('/').next().unwrap().to_owned();
            while !*stop.borrow_and_update() {
                let phase = traffic.phase.load(Ordering::Relaxed);
                let host = format!("{app}.shop");
                let r = client::http(from.outbound_addr(), &host, "GET", "/ping", &[]).await;
                match r {
                    Ok(r) if r.status == 200 => {
                        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                        assert_eq!(body["app"], app.as_str());
                        traffic.ok[phase].fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => traffic.failed.lock().unwrap().push(format!(
                        "{} -> {} in {}: status {}",
                        from.identity(),
                        to.identity(),
                        PHASES[phase],
                        r.status
                    )),
                    Err(e) => traffic.failed.lock().unwrap().push(format!(
                        "{} -> {} in {}: {e:#}",
                        from.identity(),
                        to.identity(),
                        PHASES[phase]
                    )),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    more_traffic(&traffic, 20).await;
    let started = Instant::now();

    // 1. rotate-root: the new root is published next to the old one while
    //    issuance stays on the old CA.
    let overlap_for = Duration::from_secs(3600);
    let now = time::OffsetDateTime::now_utc();
    ca_dir.rotate_root(now, overlap_for).unwrap();
    traffic.phase.store(1, Ordering::Relaxed);
    wait_until("the bundle publishes two roots", || {
        bundle.current().roots().len() == 2
    })
    .await;
    let published = bundle.current().roots().to_vec();
    assert_eq!(published[0], old_root, "the old root stays first");
    let new_root = published[1].clone();
    assert_ne!(new_root, old_root);

    // 2. Every sidecar picks up the new bundle with its next certificate,
    //    which still chains to the old root.
    wait_until("every sidecar trusts the new root", || {
        sidecars
            .iter()
            .all(|s| s.agent().trusted_roots().contains(&new_root))
    })
    .await;
    let learned_after = started.elapsed();
    for s in &sidecars {
        assert_eq!(s.agent().trusted_roots(), published, "{}", s.identity());
        assert!(
            chains_to(
                &s.agent().presented_chain(),
                std::slice::from_ref(&old_root)
            ),
            "{} holds a certificate from the new CA during the overlap",
            s.identity()
        );
    }
    more_traffic(&traffic, 20).await;

    // 3. The overlap ends (as if the hour had passed): the running signer
    //    switches issuance to the new CA by itself.
    let t = time::OffsetDateTime::now_utc().unix_timestamp();
    std::fs::write(
        ca_dir.state_path(),
        serde_json::to_string(&Phase::Overlap {
            started_at: now.unix_timestamp(),
            switch_at: t,
        })
        .unwrap(),
    )
    .unwrap();
    wait_until("the signer switches issuance", || {
        matches!(ca_dir.phase(), Ok(Phase::Draining { .. }))
    })
    .await;
    traffic.phase.store(2, Ordering::Relaxed);
    let switched_after = started.elapsed();
    let generation_at_switch: Vec<u64> = sidecars
        .iter()
        .map(|s| s.cert().unwrap().generation)
        .collect();

    // 4. Sidecars rotate onto certificates from the new root.
    wait_until(
        "every sidecar holds a certificate from the new root",
        || {
            sidecars.iter().all(|s| {
                chains_to(
                    &s.agent().presented_chain(),
                    std::slice::from_ref(&new_root),
                )
            })
        },
    )
    .await;
    let draining_roots = bundle.current().roots().to_vec();

    // 5. The old root leaves the bundle once no certificate under it is valid.
    wait_until("the old root is retired from the bundle", || {
        bundle.current().roots() == std::slice::from_ref(&new_root)
    })
    .await;
    traffic.phase.store(3, Ordering::Relaxed);
    let retired_after = started.elapsed();
    assert_eq!(ca_dir.phase().unwrap(), Phase::Stable);
    assert_eq!(ca_dir.trust_roots().unwrap(), vec![new_root.clone()]);

    // 6. Sidecars drop the old root with their next certificate; traffic
    //    goes on.
    wait_until("every sidecar trusts only the new root", || {
        sidecars
            .iter()
            .all(|s| s.agent().trusted_roots() == std::slice::from_ref(&new_root))
    })
    .await;
    more_traffic(&traffic, 20).await;
    stop_tx.send(true).unwrap();
    for f in flows {
        f.await.unwrap();
    }

    let failed = traffic.failed.lock().unwrap().clone();
    let mut handshake_failures = Vec::new();
    let mut handshakes = 0;
    for s in &sidecars {
        let stats = s.admin().stats().await.unwrap();
        handshake_failures.push(
            stats
                .iter()
                .filter(|(k, _)| {
                    k.contains(".ssl.connection_error")
                        || k.contains(".ssl.fail_verify")
                        || k.ends_with(".upstream_cx_connect_fail")
                })
                .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
                .sum::<u64>(),
        );
        handshakes += s.admin().stat_sum(&[".ssl.handshake"]).await.unwrap();
    }
    assert!(handshakes > 0, "no TLS handshake counted");
    let counts: Vec<u64> = traffic
        .ok
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    let generations: Vec<u64> = sidecars
        .iter()
        .map(|s| s.cert().unwrap().generation)
        .collect();
    eprintln!(
        "root rotation under live mTLS between Envoys: {} requests ok, {} failed, {handshakes} TLS handshakes, handshake failures {:?}; \
         per phase: {}; new root trusted by all sidecars at +{:.1}s, switch at +{:.1}s, \
         old root retired at +{:.1}s; certificates per sidecar {:?} ({:?} at the switch)",
        traffic.ok_total(),
        failed.len(),
        handshake_failures,
        PHASES
            .iter()
            .zip(&counts)
            .map(|(p, n)| format!("{p} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        learned_after.as_secs_f64(),
        switched_after.as_secs_f64(),
        retired_after.as_secs_f64(),
        generations,
        generation_at_switch,
    );

    assert!(failed.is_empty(), "{} failed: {failed:#?}", failed.len());
    assert!(
        handshake_failures.iter().all(|&n| n == 0),
        "handshakes failed: {handshake_failures:?}"
    );
    for (phase, n) in PHASES.iter().zip(&counts) {
        assert!(*n > 0, "no traffic during {phase}");
    }
    assert_eq!(
        draining_roots,
        vec![new_root.clone(), old_root.clone()],
        "while draining both roots are trusted, new first"
    );
    for (s, at_switch) in sidecars.iter().zip(&generation_at_switch) {
        let chain = s.agent().presented_chain();
        assert!(chains_to(&chain, std::slice::from_ref(&new_root)));
        assert!(
            !chains_to(&chain, std::slice::from_ref(&old_root)),
            "{} still chains to the old root",
            s.identity()
        );
        assert!(s.cert().unwrap().generation > *at_switch);
        assert_eq!(s.agent().trusted_roots(), vec![new_root.clone()]);
    }
    assert_eq!(bundle.current().roots(), std::slice::from_ref(&new_root));
}
