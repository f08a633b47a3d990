//! The issuance ledger: every certificate the signer hands out, recorded
//! before it is handed out.
//!
//! **Record-then-respond.** The request pipeline signs, then runs its
//! observers — [`LedgerObserver`] calls [`record_before_release`] — and
//! answers only after they succeed. If recording fails the request fails
//! (INTERNAL) and the signed certificate is dropped: it never left the
//! process, so a crash or
//! a failing database between signing and recording can lose a certificate
//! nobody holds, but never hand out one the ledger does not know. The SQLite
//! store commits with `synchronous=FULL`, so a recorded certificate survives a
//! crash right after the response.
//!
//! The ledger serves `GET /v1/certificates/{sha256}` on the admin port (see
//! [`CertificateView`]): the filter asks it for the validity of a peer
//! certificate it only knows by digest.

pub mod metrics;
pub mod postgres;
pub mod revocation;
pub mod service;
pub mod sqlite;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::issuer::IssuedChain;
use crate::observer::{IssuanceEvent, IssuanceObserver, ObserveFuture};

pub use metrics::LedgerMetrics;
pub use postgres::{PostgresLedger, PostgresOptions, PostgresTls};
pub use revocation::{Revocation, RevocationReason, RevocationTarget, RevocationView};
pub use service::{LedgerConfig, LedgerService, PostgresConfig, PostgresTlsMode};
pub use sqlite::{SqliteLedger, SqliteOptions};

/// SHA-256 of a certificate's DER, as Envoy's
/// `connection.sha256_peer_certificate_digest` gives it (lowercase hex).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CertDigest([u8; 32]);

impl CertDigest {
    /// The digest of a certificate.
    pub fn of(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    /// A digest from its 32 bytes (as the stores keep it).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 bytes (what the SQLite ledger stores).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for CertDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A string that is not a SHA-256 digest in hex.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a SHA-256 digest: expected 64 hex characters, got {len} characters{detail}")]
pub struct BadDigest {
    len: usize,
    detail: &'static str,
}

impl FromStr for CertDigest {
    type Err = BadDigest;

    /// Accepts 64 hex digits in either case (Envoy gives lowercase); nothing
    /// else (no colons, no prefix, no whitespace).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let len = s.len();
        if len != 64 {
            return Err(BadDigest { len, detail: "" });
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| BadDigest {
            len,
            detail: " with a non-hex character",
        })?;
        Ok(Self(out))
    }
}

/// One issued certificate, as the ledger keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuanceRecord {
    /// SHA-256 of the leaf's DER: the lookup key.
    pub sha256: CertDigest,
    /// Serial number, lowercase hex of the DER integer's magnitude.
    pub serial: String,
    /// The leaf's SPIFFE ID (its only URI SAN).
    pub spiffe_id: String,
    /// The Kubernetes namespace in the SPIFFE ID (`/ns/<ns>/...`), or `""`
    /// when the ID does not follow Istio's shape. Used for metrics.
    pub namespace: String,
    /// notBefore of the leaf.
    pub not_before: OffsetDateTime,
    /// notAfter of the leaf.
    pub not_after: OffsetDateTime,
    /// Issuer backend (`builtin`, `cacerts`, `vault`).
    pub backend: String,
    /// Who asked: the authenticated caller identity (for an impersonating
    /// node agent, the agent, not the workload).
    pub caller: String,
    /// When the signer recorded it.
    pub issued_at: OffsetDateTime,
}

/// Why a leaf could not be turned into a record.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The DER is not a certificate.
    #[error("issued leaf is not an X.509 certificate: {0}")]
    NotACertificate(String),
    /// The leaf has no URI SAN.
    #[error("issued leaf carries no URI SAN")]
    NoUriSan,
}

impl IssuanceRecord {
    /// Read serial, validity and SPIFFE ID from the issued leaf itself (not
    /// from the request), so the ledger says what the certificate says.
    pub fn from_leaf(
        leaf: &CertificateDer<'_>,
        backend: &str,
        caller: &str,
        issued_at: OffsetDateTime,
    ) -> Result<Self, RecordError> {
        let (_, cert) = X509Certificate::from_der(leaf)
            .map_err(|e| RecordError::NotACertificate(e.to_string()))?;
        let spiffe_id = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .and_then(|san| {
                san.value.general_names.iter().find_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_string()),
                    _ => None,
                })
            })
            .ok_or(RecordError::NoUriSan)?;
        let serial = hex::encode(cert.raw_serial());
        let serial = serial.trim_start_matches("00");
        Ok(Self {
            sha256: CertDigest::of(leaf),
            serial: if serial.is_empty() { "00" } else { serial }.to_string(),
            namespace: namespace_of(&spiffe_id).unwrap_or_default().to_string(),
            spiffe_id,
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
            backend: backend.to_string(),
            caller: caller.to_string(),
            issued_at,
        })
    }
}

/// The namespace of an Istio-shaped SPIFFE ID
/// (`spiffe://<td>/ns/<ns>/sa/<sa>`), if it has that shape.
pub fn namespace_of(spiffe_id: &str) -> Option<&str> {
    let rest = spiffe_id.strip_prefix("spiffe://")?;
    let (_, path) = rest.split_once('/')?;
    let mut segs = path.split('/');
    match (segs.next(), segs.next()) {
        (Some("ns"), Some(ns)) if !ns.is_empty() => Some(ns),
        _ => None,
    }
}

/// Why the ledger could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The store could not be opened or its schema created.
    #[error("opening the ledger at {path}: {reason}")]
    Open {
        /// Database path.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A read or write failed (locked, disk full, I/O error...).
    #[error("ledger {op} failed: {reason}")]
    Store {
        /// The operation (`record`, `lookup`, `prune`, `counts`).
        op: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// The leaf could not be turned into a record.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// A stored row is not a valid record (corrupt or foreign database).
    #[error("ledger row for {sha256} is invalid: {reason}")]
    Corrupt {
        /// The row key.
        sha256: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The future returned by [`Ledger`] methods.
pub type LedgerFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, LedgerError>> + Send + 'a>>;

/// Certificates issued in one namespace (for metrics and the dashboard).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamespaceCount {
    /// Namespace (`""` for IDs not shaped like Istio's).
    pub namespace: String,
    /// Certificates on record (not yet pruned).
    pub recorded: u64,
    /// Of those, the ones still valid at `now`.
    pub valid: u64,
}

/// The issuance ledger.
pub trait Ledger: Send + Sync {
    /// Store one issuance durably. Returns only once the record would survive
    /// a crash. Recording the same digest twice is not an error (idempotent).
    fn record<'a>(&'a self, rec: &'a IssuanceRecord) -> LedgerFuture<'a, ()>;

    /// The record for a certificate digest, if this signer issued it and it
    /// was not pruned.
    fn lookup(&self, sha256: CertDigest) -> LedgerFuture<'_, Option<IssuanceRecord>>;

    /// Delete records whose notAfter is older than `now - retention`; returns
    /// how many were deleted.
    fn prune(&self, now: OffsetDateTime, retention: Duration) -> LedgerFuture<'_, u64>;

    /// Records per namespace; `valid` counts those valid at `now`.
    fn counts_by_namespace(&self, now: OffsetDateTime) -> LedgerFuture<'_, Vec<NamespaceCount>>;

    /// The latest notAfter among certificates issued before `before` (the
    /// rotation uses it: an old root may go only once the last certificate
    /// it vouches for has expired). `None` when there is none.
    fn latest_not_after_issued_before(
        &self,
        before: OffsetDateTime,
    ) -> LedgerFuture<'_, Option<OffsetDateTime>>;

    /// Revoke the recorded certificates `target` names that are unexpired
    /// and were issued at or before `now`; returns every revocation now in
    /// effect for them (already-revoked ones keep their first time and
    /// reason). Durable before it returns, like [`Ledger::record`].
    fn revoke<'a>(
        &'a self,
        target: &'a RevocationTarget,
        reason: RevocationReason,
        now: OffsetDateTime,
    ) -> LedgerFuture<'a, Vec<Revocation>>;

    /// Clear the revocations `target` names; returns how many were cleared.
    fn unrevoke<'a>(&'a self, target: &'a RevocationTarget) -> LedgerFuture<'a, u64>;

    /// The revocations of certificates still unexpired at `now`, oldest
    /// revocation first.
    fn revocations(&self, now: OffsetDateTime) -> LedgerFuture<'_, Vec<Revocation>>;

    /// The revocation of one certificate, if it is revoked.
    fn revocation(&self, sha256: CertDigest) -> LedgerFuture<'_, Option<Revocation>>;
}

/// What [`import_sqlite`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportReport {
    /// Records read from the file.
    pub read: u64,
    /// Of those, the ones the shared ledger did not hold yet.
    pub inserted: u64,
}

/// Records copied per statement by [`import_sqlite`].
pub const IMPORT_BATCH: usize = 1000;

/// Copy every record of a replica's SQLite ledger into the shared PostgreSQL
/// one (`meshward-signer ledger import`), in issuance order, in batches of
/// [`IMPORT_BATCH`]. Records already there are skipped, so it can run again
/// (after an interruption, or for every replica's file).
pub async fn import_sqlite(
    source: &SqliteLedger,
    target: &PostgresLedger,
) -> Result<ImportReport, LedgerError> {
    let mut report = ImportReport {
        read: 0,
        inserted: 0,
    };
    let mut after = 0;
    loop {
        let batch = source.records_after(after, IMPORT_BATCH).await?;
        let Some(&(last, _)) = batch.last() else {
            return Ok(report);
        };
        after = last;
        let records: Vec<IssuanceRecord> = batch.into_iter().map(|(_, r)| r).collect();
        report.inserted += target.import(&records).await?;
        report.read += records.len() as u64;
    }
}

/// Record the leaf of a freshly signed chain, then give the chain back for
/// the response. The only way the pipeline should turn an [`IssuedChain`]
/// into a response: on error the chain is dropped here and never handed out.
pub async fn record_before_release(
    ledger: &dyn Ledger,
    metrics: Option<&LedgerMetrics>,
    chain: IssuedChain,
    backend: &str,
    caller: &str,
    now: OffsetDateTime,
) -> Result<IssuedChain, LedgerError> {
    let rec = match IssuanceRecord::from_leaf(&chain.leaf, backend, caller, now) {
        Ok(rec) => rec,
        Err(e) => {
            if let Some(m) = metrics {
                m.record_failed();
            }
            return Err(e.into());
        }
    };
    match ledger.record(&rec).await {
        Ok(()) => {
            if let Some(m) = metrics {
                m.recorded(&rec.namespace);
            }
            Ok(chain)
        }
        Err(e) => {
            tracing::error!(
                sha256 = %rec.sha256,
                spiffe_id = %rec.spiffe_id,
                error = %e,
                "ledger write failed: certificate discarded, request fails"
            );
            if let Some(m) = metrics {
                m.record_failed();
            }
            Err(e)
        }
    }
}

/// The ledger as the request pipeline's [`IssuanceObserver`]: the pipeline
/// runs observers after signing and before responding, and fails the request
/// (INTERNAL) when one fails, so this is where record-then-respond happens.
#[derive(Clone)]
pub struct LedgerObserver {
    ledger: Arc<dyn Ledger>,
    metrics: Option<Arc<LedgerMetrics>>,
}

impl fmt::Debug for LedgerObserver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LedgerObserver").finish_non_exhaustive()
    }
}

impl LedgerObserver {
    /// Record into `ledger`, counting into `metrics` if given.
    pub fn new(ledger: Arc<dyn Ledger>, metrics: Option<Arc<LedgerMetrics>>) -> Self {
        Self { ledger, metrics }
    }
}

impl IssuanceObserver for LedgerObserver {
    fn name(&self) -> &'static str {
        "ledger"
    }

    fn record<'a>(&'a self, event: &'a IssuanceEvent) -> ObserveFuture<'a> {
        Box::pin(async move {
            let chain = IssuedChain {
                leaf: CertificateDer::from(event.leaf_der.clone()),
                intermediates: Vec::new(),
                roots: Vec::new(),
            };
            record_before_release(
                self.ledger.as_ref(),
                self.metrics.as_deref(),
                chain,
                event.backend,
                &event.caller.spiffe_id.to_string(),
                OffsetDateTime::now_utc(),
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
        })
    }
}

/// The JSON answer of `GET /v1/certificates/{sha256}` on the admin port.
///
/// ```json
/// {"sha256":"<64 hex>","serial":"<hex>","spiffeId":"spiffe://td/ns/a/sa/b",
///  "notBefore":1700000000,"notAfter":1700086400,
///  "notBeforeRfc3339":"2023-11-14T22:13:20Z","notAfterRfc3339":"2023-11-15T22:13:20Z",
///  "backend":"builtin","issuedAt":1700000120}
/// ```
///
/// A revoked certificate's answer also carries `"revocation":{"sha256":…,
/// "serial":…,"spiffeId":…,"notAfter":…,"revokedAt":1700000500,
/// "reason":"key-compromise"}` (see [`RevocationView`]).
///
/// Unknown digest: 404 `{"error":"not found"}`; malformed digest: 400
/// `{"error":"..."}`; ledger failure: 503 `{"error":"..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificateView {
    /// Lowercase hex SHA-256 of the DER.
    pub sha256: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// The SPIFFE ID.
    pub spiffe_id: String,
    /// notBefore, unix seconds.
    pub not_before: i64,
    /// notAfter, unix seconds.
    pub not_after: i64,
    /// notBefore, RFC 3339 UTC.
    pub not_before_rfc3339: String,
    /// notAfter, RFC 3339 UTC.
    pub not_after_rfc3339: String,
    /// Issuer backend.
    pub backend: String,
    /// When it was recorded, unix seconds.
    pub issued_at: i64,
    /// Present when the certificate is revoked (the filter denies it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation: Option<RevocationView>,
}

impl From<&IssuanceRecord> for CertificateView {
    fn from(r: &IssuanceRecord) -> Self {
        Self {
            sha256: r.sha256.to_hex(),
            serial: r.serial.clone(),
            spiffe_id: r.spiffe_id.clone(),
            not_before: r.not_before.unix_timestamp(),
            not_after: r.not_after.unix_timestamp(),
            not_before_rfc3339: rfc3339(r.not_before),
            not_after_rfc3339: rfc3339(r.not_after),
            backend: r.backend.clone(),
            issued_at: r.issued_at.unix_timestamp(),
            revocation: None,
        }
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// The answer of a certificate lookup, ready for the admin HTTP handler:
/// status code and JSON body.
pub async fn lookup_response(ledger: &dyn Ledger, digest: &str) -> (u16, serde_json::Value) {
    let digest = match digest.parse::<CertDigest>() {
        Ok(d) => d,
        Err(e) => return (400, serde_json::json!({ "error": e.to_string() })),
    };
    match ledger.lookup(digest).await {
        Ok(Some(rec)) => {
            let mut view = CertificateView::from(&rec);
            match ledger.revocation(digest).await {
                Ok(r) => view.revocation = r.as_ref().map(RevocationView::from),
                Err(e) => {
                    // Unknown, not "valid": the filter treats a 503 as
                    // unknown validity.
                    tracing::warn!(error = %e, "ledger revocation lookup failed");
                    return (503, serde_json::json!({ "error": e.to_string() }));
                }
            }
            match serde_json::to_value(view) {
                Ok(v) => (200, v),
                Err(e) => (500, serde_json::json!({ "error": e.to_string() })),
            }
        }
        Ok(None) => (404, serde_json::json!({ "error": "not found" })),
        Err(e) => {
            tracing::warn!(error = %e, "ledger lookup failed");
            (503, serde_json::json!({ "error": e.to_string() }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_parse_rejects_wrong_length_and_non_hex() {
        assert!("ab".parse::<CertDigest>().is_err());
        assert!("zz".repeat(32).parse::<CertDigest>().is_err());
        let d = CertDigest::of(b"x");
        assert_eq!(d.to_hex().parse::<CertDigest>().ok(), Some(d));
        assert_eq!(
            d.to_hex().to_uppercase().parse::<CertDigest>().ok(),
            Some(d)
        );
        assert!(
            format!(" {}", &d.to_hex()[1..])
                .parse::<CertDigest>()
                .is_err()
        );
    }

    #[test]
    fn namespace_is_taken_only_from_istio_shaped_ids() {
        assert_eq!(namespace_of("spiffe://td/ns/web/sa/api"), Some("web"));
        assert_eq!(namespace_of("spiffe://td/ns//sa/api"), None);
        assert_eq!(namespace_of("spiffe://td/other/web"), None);
        assert_eq!(namespace_of("spiffe://td"), None);
    }
}
