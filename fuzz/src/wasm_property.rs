//! `wasm_property`: the pure decoding of what the proxy-wasm host hands the
//! plugin (the shim itself only builds for wasm32): the serialized request
//! header map (`header_pairs::for_each_pair`, then the headers a decision
//! reads), the ledger callout's answer (`ledger::read_response`) and the
//! shared-data cache entry (`ledger::CacheEntry::decode`).
//!
//! Input: header map bytes [`SEP`](crate::SEP) ledger answer body
//! [SEP shared-data value].
//!
//! Promises checked: every range the header reader hands out lies inside
//! the buffer, NUL-terminated, in order, and an accepted buffer is exactly
//! the serialisation of the pairs read from it; the headers found decide
//! under a fixed policy like the linear reference; a ledger answer is
//! trusted only for status 200 with the digest and SPIFFE ID asked for and
//! ordered times in 1970..=9999 (404 is "not issued", anything else
//! unknown); a decoded cache entry encodes back to exactly its bytes.

use meshward_filter::header_pairs;
use meshward_filter::ledger::{self, CacheEntry, LedgerAnswer, LookupOutcome};
use meshward_filter::{Peer, Policy, Request, UnixTime, reference, xfcc};
use std::sync::OnceLock;

use crate::{NOW, parts};

const POLICY: &str = r#"{"rules":[
  {"name":"deny-admin","action":"DENY","to":[{"paths":["/admin*"]}]},
  {"name":"web-get","action":"ALLOW","from":[{"namespaces":["default"]}],
   "to":[{"methods":["GET","HEAD"],"hosts":["*.svc","api"]}]},
  {"name":"audit-all","action":"AUDIT"}]}"#;

/// Latest Unix second the ledger may answer (9999-12-31T23:59:59Z).
const MAX_TIME: i64 = 253_402_300_799;

fn policy() -> &'static (meshward_filter::Config, Policy) {
    static P: OnceLock<(meshward_filter::Config, Policy)> = OnceLock::new();
    P.get_or_init(|| {
        let config = meshward_filter::Config::from_json(POLICY.as_bytes()).expect("valid");
        let policy = Policy::compile(&config).expect("valid");
        (config, policy)
    })
}

/// The target.
pub fn run(data: &[u8]) {
    let p = parts(data, 3);
    header_map(p[0]);
    if let Some(body) = p.get(1) {
        ledger_answer(body);
    }
    if let Some(value) = p.get(2) {
        cache_entry(value);
    }
}

/// The proxy-wasm serialisation of `pairs`.
pub fn serialize(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

fn header_map(buf: &[u8]) {
    let mut pairs: Vec<(&[u8], &[u8])> = Vec::new();
    let mut last_end = 0;
    let result = header_pairs::for_each_pair(buf, |name, value| {
        assert!(name.start >= last_end && name.start <= name.end);
        assert!(name.end < value.start && value.start <= value.end);
        assert_eq!(buf.get(name.end), Some(&0));
        assert_eq!(buf.get(value.end), Some(&0));
        last_end = value.end + 1;
        pairs.push((&buf[name], &buf[value]));
    });
    if result.is_err() {
        let _ = result.map_err(|e| e.to_string());
        return;
    }
    if buf.is_empty() {
        assert!(pairs.is_empty());
        return;
    }
    assert_eq!(
        serialize(&pairs),
        buf,
        "an accepted header map is its pairs"
    );

    // What the shim takes from it: the first value of each name, any case,
    // :authority / :method / :path only as UTF-8.
    let first = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| *v)
    };
    let text = |name: &str| first(name).map(std::str::from_utf8);
    // A header that is there but not UTF-8 is an error (a deny) in the shim.
    let (Ok(authority), Ok(method), Ok(path)) = (
        text(":authority").transpose(),
        text(":method").transpose(),
        text(":path").transpose(),
    ) else {
        return;
    };
    let request = Request::http(authority, method, path, Some(8080));
    let peer = Peer::from_connection(true, Some("spiffe://cluster.local/ns/default/sa/web"), None);
    let (config, policy) = policy();
    let now = UnixTime(NOW);
    assert_eq!(
        policy.authorize(&peer, &request, now),
        reference::authorize(config, &peer, &request, now)
    );
    if let Some(Ok(header)) = text("x-forwarded-client-cert") {
        let _ = xfcc::peer_cert_from_xfcc(header, "00");
    }
}

fn ledger_answer(body: &[u8]) {
    // The digest and SAN the answer must be for: its own, when it names
    // them, so the fuzzer reaches the checks after the match.
    let view: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let field = |name: &str| {
        view.as_ref()
            .and_then(|v| v.get(name))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let digest = field("sha256").unwrap_or_default();
    let san = field("spiffeId");
    for status in [None, Some(200), Some(404), Some(500), Some(204)] {
        let outcome = ledger::read_response(status, body, &digest, san.as_deref());
        match (status, &outcome) {
            (_, LookupOutcome::Unknown(_)) => assert_ne!(status, Some(404)),
            (Some(404), LookupOutcome::Answer(LedgerAnswer::NotIssued)) => {}
            (Some(200), LookupOutcome::Answer(answer)) if *answer != LedgerAnswer::NotIssued => {
                let view = view.as_ref().expect("trusted an answer that is not JSON");
                let text = |name: &str| view.get(name).and_then(|v| v.as_str());
                assert_eq!(text("sha256"), Some(digest.as_str()));
                assert_eq!(text("spiffeId"), san.as_deref());
                if let LedgerAnswer::Issued(v) = answer {
                    let int = |name: &str| view.get(name).and_then(|v| v.as_i64());
                    assert_eq!(int("notBefore"), Some(v.not_before.0));
                    assert_eq!(int("notAfter"), Some(v.not_after.0));
                    assert!(0 <= v.not_before.0 && v.not_before <= v.not_after);
                    assert!(v.not_after.0 <= MAX_TIME);
                }
            }
            _ => panic!("status {status:?}: {outcome:?}"),
        }
        // Asked for another certificate or another peer: never trusted.
        let other = ledger::read_response(status, body, "0".repeat(64).as_str(), san.as_deref());
        if digest != "0".repeat(64) && status == Some(200) {
            assert!(matches!(other, LookupOutcome::Unknown(_)), "{other:?}");
        }
        let no_san = ledger::read_response(status, body, &digest, None);
        if status == Some(200) {
            assert!(matches!(no_san, LookupOutcome::Unknown(_)), "{no_san:?}");
        }
    }
}

fn cache_entry(value: &[u8]) {
    if let Some(entry) = CacheEntry::decode(value) {
        assert_eq!(entry.encode(), value, "{entry:?}");
        assert_eq!(CacheEntry::decode(&entry.encode()), Some(entry));
        if let LedgerAnswer::Issued(v) = entry.answer {
            assert!(v.not_before <= v.not_after);
        }
    }
}
