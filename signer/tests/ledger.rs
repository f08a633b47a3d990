//! The issuance ledger inside a real signer: every certificate handed out is
//! on record before the response, lookups by digest return its validity,
//! and a ledger that cannot write makes the request fail instead of handing
//! out an unrecorded certificate.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/harness.rs"]
mod harness;

use std::time::Duration;

use harness::{Harness, assert_refused, http_get};
use meshward_signer::ledger::{CertDigest, CertificateView, Ledger, SqliteLedger, SqliteOptions};
use tonic::Code;
use x509_parser::prelude::*;

fn ledger_path(h: &Harness) -> std::path::PathBuf {
    h.data_dir().join("ledger.sqlite")
}

#[tokio::test]
async fn issued_certificate_is_found_by_its_digest_with_its_validity() {
    let h = Harness::start().await;
    let (_, cert) = h
        .issue("shop", "cart", &h.opts("shop", "cart"))
        .await
        .unwrap();
    let digest = CertDigest::of(&cert.leaf).to_hex();
    let (status, body) =
        http_get(h.signer.admin_addr(), &format!("/v1/certificates/{digest}")).await;
    assert_eq!(status, 200, "{body}");
    let view: CertificateView = serde_json::from_str(&body).unwrap();
    let (_, leaf) = X509Certificate::from_der(&cert.leaf).unwrap();
    assert_eq!(view.sha256, digest);
    assert_eq!(view.spiffe_id, "spiffe://cluster.local/ns/shop/sa/cart");
    assert_eq!(view.not_before, leaf.validity().not_before.timestamp());
    assert_eq!(view.not_after, leaf.validity().not_after.timestamp());
    assert_eq!(
        ::time::OffsetDateTime::parse(
            &view.not_after_rfc3339,
            &::time::format_description::well_known::Rfc3339
        )
        .unwrap()
        .unix_timestamp(),
        view.not_after
    );
    assert_eq!(
        view.serial,
        hex::encode(leaf.raw_serial()).trim_start_matches("00")
    );
    assert_eq!(view.backend, "builtin");
    // Uppercase hex (some tools print it so) finds the same record.
    let (status, _) = http_get(
        h.signer.admin_addr(),
        &format!("/v1/certificates/{}", digest.to_uppercase()),
    )
    .await;
    assert_eq!(status, 200);

    let metrics = h.metrics().await;
    assert!(
        metrics
            .contains(r#"meshward_signer_ledger_certificates_recorded_total{namespace="shop"} 1"#),
        "{metrics}"
    );
    assert!(!metrics.contains("sa/cart"), "no identity in metric labels");
    h.signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn ledger_lookup_of_unknown_digest_is_404() {
    let h = Harness::start().await;
    let unknown = CertDigest::of(b"never issued").to_hex();
    let (status, body) = http_get(
        h.signer.admin_addr(),
        &format!("/v1/certificates/{unknown}"),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("not found"));
    h.signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn ledger_lookup_of_malformed_digest_is_400_not_a_query() {
    let h = Harness::start().await;
    for bad in [
        "abc",
        "zz%27%20OR%201%3D1--",
        &"g".repeat(64),
        &"a".repeat(65),
    ] {
        let (status, body) =
            http_get(h.signer.admin_addr(), &format!("/v1/certificates/{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    h.signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn crash_between_sign_and_record_never_hands_out_unrecorded_cert() {
    let h = Harness::start_with(|c| c.ledger.busy_timeout = Duration::from_millis(200)).await;
    let (_, first) = h.issue("pay", "api", &h.opts("pay", "api")).await.unwrap();

    // Another process holds the database's write lock: the signer signs, but
    // cannot record, so the request must fail and carry no certificate.
    let blocker = rusqlite::Connection::open(ledger_path(&h)).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let refused = h.issue("pay", "api", &h.opts("pay", "api")).await;
    assert_refused(refused, Code::Internal, "ledger");
    blocker.execute_batch("ROLLBACK").unwrap();
    drop(blocker);
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("meshward_signer_ledger_record_failures_total 1"),
        "{metrics}"
    );

    let (_, second) = h.issue("pay", "api", &h.opts("pay", "api")).await.unwrap();
    let path = ledger_path(&h);
    // "Crash": stop the signer and read the file with a fresh connection.
    h.signer.shutdown().await.unwrap();
    let reopened = SqliteLedger::open(&SqliteOptions {
        path: path.clone(),
        busy_timeout: Duration::from_secs(1),
        commit_delay: Duration::ZERO,
    })
    .unwrap();
    for handed_out in [&first.leaf, &second.leaf] {
        let rec = reopened
            .lookup(CertDigest::of(handed_out))
            .await
            .unwrap()
            .expect("every handed-out certificate is on record");
        assert_eq!(rec.spiffe_id, "spiffe://cluster.local/ns/pay/sa/api");
        assert_eq!(rec.caller, "spiffe://cluster.local/ns/pay/sa/api");
    }
    let rows: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("SELECT COUNT(*) FROM certificates", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 2, "exactly the two handed-out certificates");
}

#[tokio::test]
async fn disabled_ledger_records_nothing_and_issuance_still_works() {
    let h = Harness::start_with(|c| c.ledger.enabled = false).await;
    let (_, cert) = h
        .issue("default", "sleep", &h.opts("default", "sleep"))
        .await
        .unwrap();
    assert!(h.signer.ledger().is_none());
    assert!(!ledger_path(&h).exists());
    let (status, _) = http_get(
        h.signer.admin_addr(),
        &format!("/v1/certificates/{}", CertDigest::of(&cert.leaf)),
    )
    .await;
    assert_eq!(status, 404);
    h.signer.shutdown().await.unwrap();
}
