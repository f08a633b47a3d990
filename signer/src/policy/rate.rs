//! Issuance rate per pod: a token bucket for each (pod, identity asked
//! for). An istio-agent needs a certificate when its pod starts and at each
//! rotation (hours apart), a restarting sidecar a few more; a pod asking in a
//! loop — a crash loop, or a compromised workload — would otherwise spend the
//! signer's CPU (a CSR verify and a signature each) and fill the ledger with
//! records, at the expense of every other pod. Past its bucket it is answered
//! RESOURCE_EXHAUSTED, before its CSR is even parsed.
//!
//! The pod is the one the caller's bound service-account token names (its
//! UID); a node agent's buckets are per identity it asks for, so ztunnel
//! serving a node's pods is not throttled as one caller. Callers whose token
//! names no pod (legacy secret tokens, mTLS renewal by client certificate)
//! are not limited: many replicas of a Deployment share one service account,
//! and one bucket for all of them would throttle a rollout.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::authn::CallerIdentity;

/// Buckets kept before the full (idle) ones are dropped.
const PRUNE_ABOVE: usize = 100_000;

/// A token bucket: `tokens` at `at`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets by key: `burst` at once, then one per `interval`.
#[derive(Debug)]
pub struct TokenBuckets<K> {
    burst: f64,
    interval: Duration,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: std::hash::Hash + Eq> TokenBuckets<K> {
    /// `None` when `burst` is 0 or `interval` zero (no limit).
    pub fn new(burst: u32, interval: Duration) -> Option<Self> {
        (burst > 0 && !interval.is_zero()).then(|| Self {
            burst: f64::from(burst),
            interval,
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Refill `key`'s bucket to `now` and, if `take`, take one token from
    /// it. `Err(wait)` when it holds less than one (`wait`: until it does);
    /// nothing is taken then.
    fn refill_and(&self, key: K, now: Instant, take: bool) -> Result<(), Duration> {
        let per_token = self.interval.as_secs_f64();
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() > PRUNE_ABOVE {
            let burst = self.burst;
            buckets.retain(|_, b| refill(*b, now, burst, per_token) < burst);
        }
        // A key never seen has a full bucket; looking without taking (every
        // request's admission check) must not store one for it.
        if !take && !buckets.contains_key(&key) {
            return Ok(());
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let tokens = refill(*bucket, now, self.burst, per_token);
        if tokens >= 1.0 {
            *bucket = Bucket {
                tokens: if take { tokens - 1.0 } else { tokens },
                at: now,
            };
            Ok(())
        } else {
            *bucket = Bucket { tokens, at: now };
            Err(Duration::from_secs_f64((1.0 - tokens) * per_token))
        }
    }

    /// Take one token for `key` at `now`; `Err(wait)` when there is none.
    pub fn take(&self, key: K, now: Instant) -> Result<(), Duration> {
        self.refill_and(key, now, true)
    }

    /// Whether `key` has a token at `now`, without taking it.
    pub fn peek(&self, key: K, now: Instant) -> Result<(), Duration> {
        self.refill_and(key, now, false)
    }

    /// Buckets held.
    pub fn len(&self) -> usize {
        self.buckets.lock().map(|b| b.len()).unwrap_or_default()
    }

    /// No bucket held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Per-pod issuance rate limit.
#[derive(Debug)]
pub struct IssuanceRateLimit(TokenBuckets<String>);

impl IssuanceRateLimit {
    /// `burst` requests at once, then one more per `interval`. `None` when
    /// `interval` is zero or `burst` is 0 (no limit).
    pub fn new(burst: u32, interval: Duration) -> Option<Self> {
        TokenBuckets::new(burst, interval).map(Self)
    }

    /// The bucket key: the caller's pod and the identity asked for; `None`
    /// when the token names no pod.
    fn key(caller: &CallerIdentity, target: &str) -> Option<String> {
        caller
            .pod
            .as_ref()
            .map(|p| format!("{}/{}\u{0}{}\u{0}{target}", caller.namespace, p.uid, p.name))
    }

    /// Take one request from the bucket of `caller` asking for `target` at
    /// `now`; `Err(wait)` when it is empty (`wait`: until the next one).
    pub fn check(
        &self,
        caller: &CallerIdentity,
        target: &str,
        now: Instant,
    ) -> Result<(), Duration> {
        match Self::key(caller, target) {
            Some(key) => self.0.take(key, now),
            None => Ok(()),
        }
    }

    /// Buckets held (for tests and the log).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No bucket held.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Failed authentications, penalising what failed rather than where it
/// came from. Each failure is counted against the **credential** presented
/// (SHA-256 of the bearer token, else of the client certificate, else the
/// bare address for a caller that presented nothing) and, as a coarse guard
/// far above any healthy cluster's rate, against the peer **address**.
/// A credential or address past its burst is refused before its next token's
/// signature is checked (each check is an RSA or ECDSA verification the
/// caller makes the signer pay for).
///
/// Why not per address alone: in Istio multi-cluster every istio-agent of a
/// remote cluster reaches the CA through the east-west gateway — one
/// address — and node SNAT does the same; one misconfigured pod there would
/// stop issuance for all its neighbours. Its failing token is throttled
/// here, their valid ones are not. Both tables are bounded (idle full
/// buckets are dropped past 100 000).
#[derive(Debug)]
pub struct AuthFailureLimit {
    by_credential: Option<TokenBuckets<[u8; 32]>>,
    by_address: Option<TokenBuckets<std::net::IpAddr>>,
}

/// Which limit refused, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthThrottled {
    /// This credential failed too often.
    Credential(Duration),
    /// This address (every credential behind it) failed too often.
    Address(Duration),
}

impl AuthFailureLimit {
    /// Per credential: `burst` failures at once, then one more per
    /// `interval`; per address: `address_burst`, then one per
    /// `address_interval`. `None` when neither limits anything.
    pub fn new(
        burst: u32,
        interval: Duration,
        address_burst: u32,
        address_interval: Duration,
    ) -> Option<Self> {
        let by_credential = TokenBuckets::new(burst, interval);
        let by_address = TokenBuckets::new(address_burst, address_interval);
        (by_credential.is_some() || by_address.is_some()).then_some(Self {
            by_credential,
            by_address,
        })
    }

    /// The key a request's failures count against: the presented token, else
    /// the presented client certificate, else the address.
    pub fn credential_key(
        token: Option<&str>,
        client_cert: Option<&[u8]>,
        peer: std::net::IpAddr,
    ) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        match (token, client_cert) {
            (Some(t), _) => {
                h.update(b"token\0");
                h.update(t.as_bytes());
            }
            (None, Some(c)) => {
                h.update(b"cert\0");
                h.update(c);
            }
            (None, None) => {
                h.update(b"address\0");
                h.update(peer.to_canonical().to_string().as_bytes());
            }
        }
        h.finalize().into()
    }

    /// `Err` when the credential or the address has no failure left to
    /// spend at `now`.
    pub fn admit(
        &self,
        credential: [u8; 32],
        peer: std::net::IpAddr,
        now: Instant,
    ) -> Result<(), AuthThrottled> {
        if let Some(c) = &self.by_credential {
            c.peek(credential, now).map_err(AuthThrottled::Credential)?;
        }
        if let Some(a) = &self.by_address {
            a.peek(peer.to_canonical(), now)
                .map_err(AuthThrottled::Address)?;
        }
        Ok(())
    }

    /// `credential`, from `peer`, failed to authenticate at `now`.
    pub fn failed(&self, credential: [u8; 32], peer: std::net::IpAddr, now: Instant) {
        if let Some(c) = &self.by_credential {
            let _ = c.take(credential, now);
        }
        if let Some(a) = &self.by_address {
            let _ = a.take(peer.to_canonical(), now);
        }
    }

    /// Buckets held (credentials, addresses).
    pub fn len(&self) -> (usize, usize) {
        (
            self.by_credential.as_ref().map_or(0, TokenBuckets::len),
            self.by_address.as_ref().map_or(0, TokenBuckets::len),
        )
    }
}

/// `b`'s tokens at `now`: one more per `interval` seconds, at most `burst`.
fn refill(b: Bucket, now: Instant, burst: f64, interval: f64) -> f64 {
    let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
    (b.tokens + elapsed / interval).min(burst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authn::{AuthMethod, PodBinding};
    use spiffe::TrustDomain;

    fn caller(pod: Option<&str>) -> CallerIdentity {
        let td = TrustDomain::new("cluster.local").unwrap();
        let mut c = CallerIdentity::for_service_account(
            &td,
            "shop",
            "web",
            AuthMethod::Jwt {
                issuer: "k8s".into(),
            },
        )
        .unwrap();
        c.pod = pod.map(|uid| PodBinding {
            name: "web-1".into(),
            uid: uid.into(),
            node: None,
        });
        c
    }

    #[test]
    fn a_pod_gets_its_burst_then_one_per_interval() {
        let limit = IssuanceRateLimit::new(3, Duration::from_secs(60)).unwrap();
        let pod = caller(Some("uid-1"));
        let t0 = Instant::now();
        for _ in 0..3 {
            limit
                .check(&pod, "spiffe://cluster.local/ns/shop/sa/web", t0)
                .unwrap();
        }
        let wait = limit
            .check(&pod, "spiffe://cluster.local/ns/shop/sa/web", t0)
            .unwrap_err();
        assert_eq!(wait, Duration::from_secs(60));
        let later = t0 + Duration::from_secs(30);
        let wait = limit
            .check(&pod, "spiffe://cluster.local/ns/shop/sa/web", later)
            .unwrap_err();
        assert_eq!(wait, Duration::from_secs(30), "half a token refilled");
        let later = t0 + Duration::from_secs(61);
        limit
            .check(&pod, "spiffe://cluster.local/ns/shop/sa/web", later)
            .unwrap();
    }

    #[test]
    fn other_pods_other_targets_and_unbound_tokens_have_their_own_or_no_bucket() {
        let limit = IssuanceRateLimit::new(1, Duration::from_secs(3600)).unwrap();
        let t0 = Instant::now();
        let a = caller(Some("uid-a"));
        limit.check(&a, "spiffe://td/ns/x/sa/one", t0).unwrap();
        assert!(limit.check(&a, "spiffe://td/ns/x/sa/one", t0).is_err());
        // A node agent asking for another identity: another bucket.
        limit.check(&a, "spiffe://td/ns/x/sa/two", t0).unwrap();
        // Another replica of the same Deployment: its own pod, its own bucket.
        limit
            .check(&caller(Some("uid-b")), "spiffe://td/ns/x/sa/one", t0)
            .unwrap();
        // No pod in the token: not limited (replicas could not be told apart).
        for _ in 0..5 {
            limit
                .check(&caller(None), "spiffe://td/ns/x/sa/one", t0)
                .unwrap();
        }
        assert_eq!(limit.len(), 3);
    }

    #[test]
    fn a_credential_is_admitted_until_its_failures_are_spent() {
        let limit = AuthFailureLimit::new(2, Duration::from_secs(10), 0, Duration::ZERO).unwrap();
        let ip: std::net::IpAddr = "10.1.2.3".parse().unwrap();
        let bad = AuthFailureLimit::credential_key(Some("bad"), None, ip);
        let good = AuthFailureLimit::credential_key(Some("good"), None, ip);
        let t0 = Instant::now();
        for _ in 0..2 {
            limit.admit(bad, ip, t0).unwrap();
            limit.failed(bad, ip, t0);
        }
        let wait = AuthThrottled::Credential(Duration::from_secs(10));
        assert_eq!(limit.admit(bad, ip, t0).unwrap_err(), wait);
        // Admitting does not spend: still refused, still 10 s to wait.
        assert_eq!(limit.admit(bad, ip, t0).unwrap_err(), wait);
        // Another credential from the same address is not affected.
        limit.admit(good, ip, t0).unwrap();
        assert_eq!(limit.len(), (1, 0), "admitting stores nothing");
        limit.admit(bad, ip, t0 + Duration::from_secs(10)).unwrap();
    }

    #[test]
    fn an_address_past_the_coarse_guard_is_refused_whatever_it_presents() {
        let limit =
            AuthFailureLimit::new(2, Duration::from_secs(10), 3, Duration::from_secs(10)).unwrap();
        let ip: std::net::IpAddr = "10.1.2.3".parse().unwrap();
        let t0 = Instant::now();
        for i in 0..3 {
            let fresh = AuthFailureLimit::credential_key(Some(&format!("garbage-{i}")), None, ip);
            limit.admit(fresh, ip, t0).unwrap();
            limit.failed(fresh, ip, t0);
        }
        let next = AuthFailureLimit::credential_key(Some("garbage-4"), None, ip);
        assert_eq!(
            limit.admit(next, ip, t0).unwrap_err(),
            AuthThrottled::Address(Duration::from_secs(10))
        );
        let elsewhere: std::net::IpAddr = "10.1.2.4".parse().unwrap();
        limit.admit(next, elsewhere, t0).unwrap();
    }

    #[test]
    fn the_credential_key_is_the_token_else_the_certificate_else_the_address() {
        let ip: std::net::IpAddr = "10.1.2.3".parse().unwrap();
        let other: std::net::IpAddr = "10.1.2.4".parse().unwrap();
        let k = AuthFailureLimit::credential_key;
        assert_eq!(k(Some("t"), Some(b"c"), ip), k(Some("t"), None, other));
        assert_eq!(k(None, Some(b"c"), ip), k(None, Some(b"c"), other));
        assert_ne!(k(None, None, ip), k(None, None, other));
        assert_ne!(k(Some("c"), None, ip), k(None, Some(b"c"), ip));
    }

    #[test]
    fn no_limit_when_burst_or_interval_is_zero() {
        assert!(IssuanceRateLimit::new(0, Duration::from_secs(60)).is_none());
        assert!(IssuanceRateLimit::new(10, Duration::ZERO).is_none());
        assert!(AuthFailureLimit::new(0, Duration::from_secs(1), 0, Duration::ZERO).is_none());
        assert!(AuthFailureLimit::new(20, Duration::from_secs(1), 0, Duration::ZERO).is_some());
    }
}
