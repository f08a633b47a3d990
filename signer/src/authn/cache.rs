//! Verified-token cache: a token that verified is not verified again for a
//! short while.
//!
//! istio-agent sends the same projected service-account token with every
//! CSR until the kubelet refreshes it (hourly), and a client answered
//! `RESOURCE_EXHAUSTED` retries with it; verifying its signature again costs
//! as much as checking the CSR. Like kube-apiserver's token authentication
//! cache, a successful verification is remembered for `ttl`:
//!
//! - the key is SHA-256 over the cluster ID and the **whole** token, so a
//!   token that differs in one byte (another signature, another claim) or is
//!   presented for another cluster is verified from scratch;
//! - an entry is used only while `now` is inside the token's own validity
//!   (`nbf - skew ..= exp + skew`, checked on every hit) and younger than
//!   `ttl`, so caching never extends a token's life and a key removed from
//!   the issuer's JWKS stops being trusted at most `ttl` later;
//! - only successes are cached; refusals are decided every time;
//! - tokens checked by TokenReview are never cached (the API server's answer
//!   for a deleted pod must take effect at once);
//! - at most `max_entries`: when full, expired entries go; if none did, the
//!   cache is emptied (every entry is a token that verified, so filling it
//!   takes that many valid tokens, and emptying it only costs re-verifying).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};

use super::jwt::VerifiedToken;

/// `meshward_signer_authn_token_cache_{hits,misses}_total` and `_entries`:
/// how often a token's signature check was saved, and the cache's size.
#[derive(Debug, Clone, Default)]
pub struct TokenCacheMetrics {
    hits: Counter,
    misses: Counter,
    entries: Gauge,
}

impl TokenCacheMetrics {
    /// Register under `<registry prefix>_authn_token_cache_*`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("authn_token_cache");
        r.register(
            "hits",
            "Token checks answered by the verified-token cache (no signature verified)",
            self.hits.clone(),
        );
        r.register(
            "misses",
            "Token checks the verified-token cache could not answer (verified from scratch)",
            self.misses.clone(),
        );
        r.register(
            "entries",
            "Verified tokens remembered",
            self.entries.clone(),
        );
    }
}

/// Cache settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenCacheOptions {
    /// How long a verification is reused; zero turns the cache off.
    pub ttl: Duration,
    /// Most tokens remembered.
    pub max_entries: usize,
}

#[derive(Debug, Clone)]
struct Entry {
    verified: VerifiedToken,
    /// First second the token is usable (`nbf - skew`), if it has `nbf`.
    usable_from: Option<i64>,
    /// First second the token is no longer usable (`exp + skew`).
    usable_until: i64,
    /// First second this entry is no longer used (`inserted + ttl`).
    fresh_until: i64,
}

/// Validity window of a verified token, as the verifier computed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenWindow {
    /// `nbf - skew`, if the token has `nbf`.
    pub usable_from: Option<i64>,
    /// `exp + skew`.
    pub usable_until: i64,
}

/// The cache. Cheap to share (`&self` methods, one mutex).
#[derive(Debug)]
pub struct TokenCache {
    options: TokenCacheOptions,
    entries: Mutex<HashMap<[u8; 32], Entry>>,
    metrics: TokenCacheMetrics,
}

/// Cache key for `token` presented with `cluster_id`.
pub fn key(token: &str, cluster_id: Option<&str>) -> [u8; 32] {
    let mut h = Sha256::new();
    match cluster_id {
        Some(c) => {
            h.update([1u8]);
            h.update((c.len() as u64).to_be_bytes());
            h.update(c.as_bytes());
        }
        None => h.update([0u8]),
    }
    h.update(token.as_bytes());
    h.finalize().into()
}

impl TokenCache {
    /// A cache with these settings.
    pub fn new(options: TokenCacheOptions) -> Self {
        Self {
            options,
            entries: Mutex::new(HashMap::new()),
            metrics: TokenCacheMetrics::default(),
        }
    }

    /// Its hit / miss counters and size gauge.
    pub fn metrics(&self) -> &TokenCacheMetrics {
        &self.metrics
    }

    /// Whether it caches at all.
    pub fn enabled(&self) -> bool {
        !self.options.ttl.is_zero() && self.options.max_entries > 0
    }

    /// The verification remembered for `key`, if it is fresh and the token
    /// is usable at `now_unix`.
    pub fn get(&self, key: &[u8; 32], now_unix: i64) -> Option<VerifiedToken> {
        if !self.enabled() {
            return None;
        }
        let mut entries = self.entries.lock().ok()?;
        let Some(entry) = entries.get(key) else {
            self.metrics.misses.inc();
            return None;
        };
        let usable = now_unix < entry.usable_until
            && now_unix < entry.fresh_until
            && entry.usable_from.is_none_or(|from| now_unix >= from);
        if usable {
            self.metrics.hits.inc();
            Some(entry.verified.clone())
        } else {
            entries.remove(key);
            self.metrics.misses.inc();
            self.metrics.entries.set(gauge_value(entries.len()));
            None
        }
    }

    /// Remember that the token behind `key` verified at `now_unix`.
    pub fn insert(
        &self,
        key: [u8; 32],
        verified: &VerifiedToken,
        window: TokenWindow,
        now_unix: i64,
    ) {
        if !self.enabled() {
            return;
        }
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if entries.len() >= self.options.max_entries && !entries.contains_key(&key) {
            entries.retain(|_, e| now_unix < e.usable_until && now_unix < e.fresh_until);
            if entries.len() >= self.options.max_entries {
                entries.clear();
            }
        }
        let ttl = i64::try_from(self.options.ttl.as_secs()).unwrap_or(i64::MAX);
        entries.insert(
            key,
            Entry {
                verified: verified.clone(),
                usable_from: window.usable_from,
                usable_until: window.usable_until,
                fresh_until: now_unix.saturating_add(ttl.max(1)),
            },
        );
        self.metrics.entries.set(gauge_value(entries.len()));
    }

    /// Tokens remembered now.
    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verified(sa: &str) -> VerifiedToken {
        VerifiedToken {
            issuer: "https://kubernetes.default.svc".into(),
            namespace: "shop".into(),
            service_account: sa.into(),
            pod: None,
        }
    }

    fn cache(ttl_secs: u64, max: usize) -> TokenCache {
        TokenCache::new(TokenCacheOptions {
            ttl: Duration::from_secs(ttl_secs),
            max_entries: max,
        })
    }

    const WINDOW: TokenWindow = TokenWindow {
        usable_from: Some(990),
        usable_until: 2_000,
    };

    #[test]
    fn hit_within_ttl_and_token_validity() {
        let c = cache(60, 10);
        let k = key("a.b.c", None);
        c.insert(k, &verified("web"), WINDOW, 1_000);
        assert_eq!(c.get(&k, 1_000), Some(verified("web")));
        assert_eq!(c.get(&k, 1_059), Some(verified("web")));
        assert_eq!(c.get(&k, 1_060), None, "older than the ttl");
        assert!(c.is_empty(), "a stale entry is dropped when seen");
    }

    #[test]
    fn cached_token_is_refused_after_it_expires() {
        let c = cache(3_600, 10);
        let k = key("a.b.c", None);
        c.insert(k, &verified("web"), WINDOW, 1_000);
        assert!(c.get(&k, 1_999).is_some());
        assert_eq!(c.get(&k, 2_000), None, "exp + skew reached");
    }

    #[test]
    fn cached_token_is_not_used_before_its_nbf() {
        let c = cache(3_600, 10);
        let k = key("a.b.c", None);
        c.insert(k, &verified("web"), WINDOW, 1_000);
        // A clock stepped back must not make a not-yet-valid token usable.
        assert_eq!(c.get(&k, 989), None);
    }

    #[test]
    fn token_cache_does_not_let_a_token_cross_clusters() {
        let c = cache(60, 10);
        c.insert(key("a.b.c", Some("a")), &verified("web"), WINDOW, 1_000);
        assert_eq!(c.get(&key("a.b.c", Some("b")), 1_000), None);
        assert_eq!(c.get(&key("a.b.c", None), 1_000), None);
        // Cluster ID and token are length-delimited: no shifting bytes
        // between them gives the same key.
        assert_ne!(key("b.c", Some("aa.")), key("a.b.c", Some("aa")));
    }

    #[test]
    fn tampered_copy_of_a_cached_token_misses() {
        let c = cache(60, 10);
        c.insert(key("h.p.sig", None), &verified("web"), WINDOW, 1_000);
        assert_eq!(c.get(&key("h.p.sig2", None), 1_000), None);
        assert_eq!(c.get(&key("h.p2.sig", None), 1_000), None);
    }

    #[test]
    fn full_cache_drops_expired_entries_then_everything() {
        let c = cache(10, 2);
        c.insert(key("1", None), &verified("a"), WINDOW, 1_000);
        c.insert(key("2", None), &verified("b"), WINDOW, 1_005);
        // Full; "1" is stale at 1_012, "2" is not.
        c.insert(key("3", None), &verified("c"), WINDOW, 1_012);
        assert_eq!(c.len(), 2);
        assert!(c.get(&key("2", None), 1_012).is_some());
        assert!(c.get(&key("3", None), 1_012).is_some());
        // Full with nothing stale: emptied, then the new one goes in.
        c.insert(key("4", None), &verified("d"), WINDOW, 1_013);
        assert_eq!(c.len(), 1);
        assert!(c.get(&key("4", None), 1_013).is_some());
    }

    #[test]
    fn hits_and_misses_are_counted() {
        let c = cache(60, 10);
        let k = key("a.b.c", None);
        assert_eq!(c.get(&k, 1_000), None);
        c.insert(k, &verified("web"), WINDOW, 1_000);
        assert!(c.get(&k, 1_001).is_some());
        assert!(c.get(&k, 1_002).is_some());
        let mut reg = Registry::with_prefix("meshward_signer");
        c.metrics().register(&mut reg);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(
            out.contains("meshward_signer_authn_token_cache_hits_total 2"),
            "{out}"
        );
        assert!(
            out.contains("meshward_signer_authn_token_cache_misses_total 1"),
            "{out}"
        );
        assert!(
            out.contains("meshward_signer_authn_token_cache_entries 1"),
            "{out}"
        );
    }

    #[test]
    fn zero_ttl_turns_it_off() {
        let c = cache(0, 10);
        let k = key("a.b.c", None);
        c.insert(k, &verified("web"), WINDOW, 1_000);
        assert!(c.is_empty());
        assert_eq!(c.get(&k, 1_000), None);
    }
}
