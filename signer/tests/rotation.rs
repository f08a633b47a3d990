//! CA rotation of the built-in CA, with time passed as `now` (no sleeps):
//! at every step every certificate still valid verifies against the bundle
//! published at that moment, which is what "zero failed handshakes during a
//! root rotation" needs from the signer.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use meshward_signer::bundle::rotation::live::RotatingBuiltin;
use meshward_signer::bundle::rotation::{CaDir, NEXT_DIR, PREVIOUS_ROOT, Phase, RotationError};
use meshward_signer::issuer::builtin::{BuiltinOptions, CaKeyAlgorithm};
use meshward_signer::issuer::{IssueRequest, IssuedChain, Issuer, KeyKind};
use meshward_signer::ledger::{IssuanceRecord, Ledger, SqliteLedger, SqliteOptions};
use rustls_pki_types::{CertificateDer, UnixTime};
use spiffe::SpiffeId;
use time::OffsetDateTime;

const H: i64 = 3600;
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
const GRACE: Duration = Duration::from_secs(60);

fn opts(dir: &std::path::Path) -> BuiltinOptions {
    BuiltinOptions {
        data_dir: dir.join("ca"),
        key_algorithm: CaKeyAlgorithm::EcdsaP256,
        organization: "cluster.local".to_string(),
        root_ttl: Duration::from_secs(10 * 365 * 24 * 3600),
        intermediate_ttl: Duration::from_secs(365 * 24 * 3600),
    }
}

fn at(t: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(t).unwrap()
}

async fn issue(ca: &RotatingBuiltin, now: i64, ttl: i64) -> IssuedChain {
    let key = rcgen::KeyPair::generate().unwrap();
    let req = IssueRequest {
        csr_der: Vec::new(),
        spki_der: rcgen::PublicKeyData::subject_public_key_info(&key),
        key_kind: KeyKind::EcdsaP256,
        spiffe_id: SpiffeId::new("spiffe://cluster.local/ns/shop/sa/cart").unwrap(),
        dns_names: Vec::new(),
        not_before: at(now - 60),
        not_after: at(now + ttl),
    };
    ca.sign(&req).await.unwrap()
}

fn verifies(chain: &IssuedChain, roots: &[CertificateDer<'static>], now: i64) -> bool {
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap().to_owned())
        .collect();
    let leaf = webpki::EndEntityCert::try_from(&chain.leaf).unwrap();
    leaf.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &chain.intermediates,
        UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(now).unwrap())),
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .is_ok()
}

#[tokio::test]
async fn root_rotation_publishes_new_root_first_switches_after_overlap_and_retires_after_longest_cert()
 {
    let tmp = tempfile::tempdir().unwrap();
    let t0 = OffsetDateTime::now_utc().unix_timestamp();
    let ca = RotatingBuiltin::load(opts(tmp.path()), at(t0)).unwrap();
    let ledger = SqliteLedger::open(&SqliteOptions {
        path: tmp.path().join("ledger.sqlite"),
        busy_timeout: Duration::from_secs(1),
        commit_delay: Duration::ZERO,
    })
    .unwrap();
    let old_root = ca.trust_anchors();
    assert_eq!(old_root.len(), 1);

    let mut issued: Vec<(IssuedChain, i64)> = Vec::new();
    let record = |chain: &IssuedChain, now: i64| {
        IssuanceRecord::from_leaf(&chain.leaf, "builtin", "test", at(now)).unwrap()
    };
    // A 48 h certificate from before the rotation (say max_ttl was longer
    // then): the ledger knows it, and the old root must outlive it.
    let long = issue(&ca, t0, 48 * H).await;
    ledger.record(&record(&long, t0)).await.unwrap();
    issued.push((long, t0 + 48 * H));

    // Rotation starts at t0 + 1h with a 2h overlap.
    let start = t0 + H;
    let phase = ca
        .dir()
        .rotate_root(at(start), Duration::from_secs(2 * 3600))
        .unwrap();
    assert_eq!(
        phase,
        Phase::Overlap {
            started_at: start,
            switch_at: start + 2 * H
        }
    );
    let roots = ca
        .tick(at(start), Some(&ledger), MAX_TTL, GRACE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(roots.len(), 2, "new root published first");
    assert_eq!(roots[0], old_root[0]);
    let new_root = roots[1].clone();

    // During the overlap issuance stays on the old CA, but responses carry
    // both roots.
    let during = issue(&ca, start + H, 24 * H).await;
    ledger.record(&record(&during, start + H)).await.unwrap();
    assert!(
        verifies(&during, &old_root, start + H),
        "still issued by the old CA"
    );
    assert!(!verifies(
        &during,
        std::slice::from_ref(&new_root),
        start + H
    ));
    assert_eq!(during.roots, roots);
    issued.push((during, start + H + 24 * H));

    assert!(
        ca.tick(at(start + 2 * H - 1), Some(&ledger), MAX_TTL, GRACE)
            .await
            .unwrap()
            .is_none()
    );

    // The switch.
    let switch = start + 2 * H;
    let roots = ca
        .tick(at(switch), Some(&ledger), MAX_TTL, GRACE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        roots,
        vec![new_root.clone(), old_root[0].clone()],
        "old root still trusted"
    );
    let after = issue(&ca, switch + 60, 24 * H).await;
    ledger.record(&record(&after, switch + 60)).await.unwrap();
    assert!(
        verifies(&after, std::slice::from_ref(&new_root), switch + 60),
        "issued by the new CA"
    );
    issued.push((after, switch + 60 + 24 * H));

    // Walk time forward an hour at a time: whatever the bundle is at that
    // moment, every certificate still valid verifies against it.
    let mut retired_at = None;
    let mut t = switch;
    while t < t0 + 60 * H {
        t += H;
        let changed = ca.tick(at(t), Some(&ledger), MAX_TTL, GRACE).await.unwrap();
        if let Some(r) = changed {
            assert_eq!(r, vec![new_root.clone()], "only the old root ever leaves");
            retired_at = Some(t);
        }
        let bundle = ca.trust_anchors();
        for (chain, not_after) in &issued {
            if t < *not_after {
                assert!(
                    verifies(chain, &bundle, t),
                    "a valid certificate fails at t0+{}h",
                    (t - t0) / H
                );
            }
        }
    }
    // Policy bound alone would allow switch + 24h + grace; the 48 h
    // certificate in the ledger holds the old root until t0 + 48h.
    let retired_at = retired_at.expect("old root retired eventually");
    assert!(
        retired_at >= t0 + 48 * H,
        "retired at t0+{}h",
        (retired_at - t0) / H
    );
    assert!(retired_at <= t0 + 49 * H);
    assert_eq!(ca.dir().phase().unwrap(), Phase::Stable);
    assert!(!tmp.path().join("ca").join(PREVIOUS_ROOT).exists());
}

#[tokio::test]
async fn old_root_is_not_retired_before_max_ttl_even_with_an_empty_ledger() {
    let tmp = tempfile::tempdir().unwrap();
    let t0 = 2_000_000_000;
    let ca = RotatingBuiltin::load(opts(tmp.path()), at(t0)).unwrap();
    ca.dir().rotate_root(at(t0), Duration::ZERO).unwrap();
    ca.tick(at(t0), None, MAX_TTL, GRACE).await.unwrap();
    assert_eq!(ca.trust_anchors().len(), 2, "switched, draining");
    // An empty ledger (pruned, disabled) must not shorten the drain.
    let empty = SqliteLedger::open(&SqliteOptions {
        path: tmp.path().join("l.sqlite"),
        busy_timeout: Duration::from_secs(1),
        commit_delay: Duration::ZERO,
    })
    .unwrap();
    let bound = t0 + 24 * H + 60;
    assert!(
        ca.tick(at(bound - 1), Some(&empty), MAX_TTL, GRACE)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(ca.trust_anchors().len(), 2);
    assert!(
        ca.tick(at(bound), Some(&empty), MAX_TTL, GRACE)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(ca.trust_anchors().len(), 1);
}

#[tokio::test]
async fn second_root_rotation_during_one_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = RotatingBuiltin::load(opts(tmp.path()), at(2_000_000_000)).unwrap();
    ca.dir()
        .rotate_root(at(2_000_000_000), Duration::from_secs(60))
        .unwrap();
    assert!(matches!(
        ca.dir()
            .rotate_root(at(2_000_000_001), Duration::from_secs(60)),
        Err(RotationError::WrongPhase(_))
    ));
    assert!(matches!(
        ca.dir().rotate_intermediate(at(2_000_000_001)),
        Err(RotationError::WrongPhase(_))
    ));
}

#[tokio::test]
async fn intermediate_rotation_keeps_earlier_certificates_valid() {
    let tmp = tempfile::tempdir().unwrap();
    let t0 = OffsetDateTime::now_utc().unix_timestamp();
    let ca = RotatingBuiltin::load(opts(tmp.path()), at(t0)).unwrap();
    let before = issue(&ca, t0, 24 * H).await;
    ca.dir().rotate_intermediate(at(t0 + 60)).unwrap();
    assert!(
        ca.tick(at(t0 + 60), None, MAX_TTL, GRACE)
            .await
            .unwrap()
            .is_none(),
        "roots unchanged"
    );
    let after = issue(&ca, t0 + 120, 24 * H).await;
    assert_ne!(
        before.intermediates, after.intermediates,
        "new intermediate in use"
    );
    let roots = ca.trust_anchors();
    assert!(verifies(&before, &roots, t0 + 180));
    assert!(verifies(&after, &roots, t0 + 180));
    // The new key is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(tmp.path().join("ca/ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test]
async fn crash_in_the_middle_of_a_switch_is_finished_by_the_next_tick() {
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(tmp.path());
    let t0 = 2_000_000_000;
    let ca = RotatingBuiltin::load(o.clone(), at(t0)).unwrap();
    let old_root = ca.trust_anchors();
    ca.dir()
        .rotate_root(at(t0), Duration::from_secs(60))
        .unwrap();
    let next_root = ca.dir().trust_roots().unwrap()[1].clone();
    drop(ca);
    // The crash: old root saved, keys moved, certificates not yet.
    let dir = tmp.path().join("ca");
    std::fs::copy(dir.join("root-cert.pem"), dir.join(PREVIOUS_ROOT)).unwrap();
    for f in ["root-key.pem", "ca-key.pem"] {
        std::fs::rename(dir.join(NEXT_DIR).join(f), dir.join(f)).unwrap();
    }
    // Half a CA is refused, never used to sign.
    assert!(RotatingBuiltin::load(o.clone(), at(t0 + 61)).is_err());
    // The bundle still holds both roots.
    let cadir = CaDir::new(o.clone());
    assert_eq!(cadir.trust_roots().unwrap().len(), 2);
    cadir.tick(at(t0 + 61), |_| None).unwrap();
    let ca = RotatingBuiltin::load(o, at(t0 + 62)).unwrap();
    assert_eq!(ca.trust_anchors(), vec![next_root, old_root[0].clone()]);
}
