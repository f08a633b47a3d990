//! Peer-certificate validity from the signer's ledger: the shared-data cache
//! and the HTTP callout. The rules (what to trust, how long) are in the pure
//! `crate::ledger`; this file only moves bytes between them and the host.

use super::host::{Connection, log};
use super::metrics::Metrics;
use crate::UnixTime;
use crate::cert::{CertSource, PeerCert};
use crate::ledger::{
    self, CacheEntry, LedgerAnswer, LedgerSettings, LookupOutcome, MAX_RESPONSE_BYTES,
};
use crate::policy::Policy;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType};
use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

/// How many lookups this VM has in flight (bounded by
/// `ledger.maxConcurrentLookups`).
#[derive(Default)]
pub struct InFlight(Cell<usize>);

/// One lookup's place in [`InFlight`], given back when dropped: after the
/// answer is handled, or when the waiting context is deleted first.
pub struct Slot(Rc<InFlight>);

impl Drop for Slot {
    fn drop(&mut self) {
        let count = &self.0.0;
        count.set(count.get().saturating_sub(1));
    }
}

impl InFlight {
    fn take(self: &Rc<Self>, max: usize) -> Option<Slot> {
        let n = self.0.get();
        if n >= max {
            return None;
        }
        self.0.set(n.saturating_add(1));
        Some(Slot(self.clone()))
    }
}

/// Where a lookup stands after [`start`].
pub enum Lookup {
    /// Decided without waiting (cache hit, or nothing to look up / a
    /// failure: validity unknown).
    Ready(Option<PeerCert>),
    /// A callout is on its way; the answer arrives in `on_http_call_response`.
    /// Keep the slot until then.
    Dispatched(Slot),
}

/// The digest to look up, when the ledger should be asked about this
/// connection: `ledger` is configured, the peer presented a certificate
/// (mTLS with a URI SAN) and no other source gave its validity.
pub fn wanted<'c>(
    policy: &Policy,
    conn: &'c Connection,
    cert: Option<&PeerCert>,
) -> Option<&'c str> {
    let settings = policy.ledger()?;
    let shown = cert.is_some() && settings.lookup == crate::ledger::LookupWhen::WhenUnknown;
    if shown || !conn.mtls || conn.uri_san.is_none() {
        return None;
    }
    let digest = conn.digest.as_deref()?;
    if ledger::check_digest(digest) {
        Some(digest)
    } else {
        log(
            LogLevel::Warn,
            "meshward: connection.sha256_peer_certificate_digest is not 64 lower-case hex digits; not looked up",
        );
        None
    }
}

fn validity(answer: LedgerAnswer) -> Option<PeerCert> {
    match answer {
        LedgerAnswer::Issued(validity) => Some(PeerCert {
            validity,
            source: CertSource::Ledger,
            revoked: None,
        }),
        LedgerAnswer::Revoked(validity, revoked) => Some(PeerCert {
            validity,
            source: CertSource::Ledger,
            revoked: Some(revoked),
        }),
        LedgerAnswer::NotIssued => None,
    }
}

/// Looks `digest` up in shared data; on a miss dispatches the callout.
pub fn start(
    settings: &LedgerSettings,
    digest: &str,
    now: UnixTime,
    metrics: &Metrics,
    in_flight: &Rc<InFlight>,
) -> Lookup {
    let key = ledger::cache_key(digest);
    match hostcalls::get_shared_data(&key) {
        Ok((Some(bytes), _)) => {
            if let Some(answer) = CacheEntry::decode(&bytes).and_then(|e| e.fresh_at(now, settings))
            {
                metrics.ledger_lookup("cache_hit");
                return Lookup::Ready(validity(answer));
            }
        }
        Ok((None, _)) => {}
        Err(status) => log(
            LogLevel::Warn,
            &format!("meshward: get_shared_data {key}: {status:?}"),
        ),
    }
    let Some(slot) = in_flight.take(settings.max_concurrent_lookups) else {
        log(
            LogLevel::Warn,
            &format!(
                "meshward: {} ledger lookups in flight (ledger.maxConcurrentLookups); certificate validity unknown",
                settings.max_concurrent_lookups
            ),
        );
        metrics.ledger_lookup("overloaded");
        return Lookup::Ready(None);
    };
    let path = ledger::lookup_path(digest);
    let headers = settings.request_headers(&path).to_vec();
    match hostcalls::dispatch_http_call(
        &settings.cluster,
        headers,
        None,
        vec![],
        Duration::from_millis(settings.timeout_ms),
    ) {
        Ok(token) => {
            super::streams::note_callout(token);
            Lookup::Dispatched(slot)
        }
        Err(status) => {
            log(
                LogLevel::Warn,
                &format!(
                    "meshward: ledger callout to cluster {} failed: {status:?}; certificate validity unknown",
                    settings.cluster
                ),
            );
            metrics.ledger_lookup("unknown");
            Lookup::Ready(None)
        }
    }
}

/// Reads the callout's answer (in `on_http_call_response`), caches a
/// trustworthy one, and returns the validity it gives (`None`: unknown or
/// not issued).
pub fn finish(
    settings: &LedgerSettings,
    conn: &Connection,
    body_size: usize,
    now: UnixTime,
    metrics: &Metrics,
) -> Option<PeerCert> {
    let digest = conn.digest.as_deref().unwrap_or_default();
    let status = hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
        .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u32>().ok());
    let body = if body_size > MAX_RESPONSE_BYTES {
        Vec::new()
    } else {
        hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default()
    };
    let outcome = if body_size > MAX_RESPONSE_BYTES {
        LookupOutcome::Unknown(format!("ledger answer is {body_size} bytes"))
    } else {
        ledger::read_response(status, &body, digest, conn.uri_san.as_deref())
    };
    match outcome {
        LookupOutcome::Answer(answer) => {
            metrics.ledger_lookup(match answer {
                LedgerAnswer::Issued(_) => "issued",
                LedgerAnswer::Revoked(..) => "revoked",
                LedgerAnswer::NotIssued => "not_issued",
            });
            let entry = CacheEntry::new(answer, now, settings).encode();
            let key = ledger::cache_key(digest);
            if let Err(status) = hostcalls::set_shared_data(&key, Some(&entry), None) {
                log(
                    LogLevel::Warn,
                    &format!("meshward: set_shared_data {key}: {status:?}"),
                );
            }
            validity(answer)
        }
        LookupOutcome::Unknown(why) => {
            metrics.ledger_lookup("unknown");
            log(
                LogLevel::Warn,
                &format!(
                    "meshward: ledger lookup of {digest}: {why}; certificate validity unknown"
                ),
            );
            None
        }
    }
}
