//! JWT keys found by OIDC discovery: `<issuer>/.well-known/openid-configuration`
//! → `jwks_uri` → JWKS, cached.
//!
//! Refresh rule: the cache is refetched when it is empty, older than
//! `max_age`, or a token names a `kid` the cache does not have — but never
//! more often than once per `min_refresh_interval`, so a flood of tokens with
//! made-up `kid`s costs at most one fetch per interval. A failed fetch keeps
//! the previous keys. The discovery document's `issuer` must equal the
//! configured issuer exactly (OpenID Connect Discovery §4.3): keys published
//! for another issuer are never used.

use std::time::Duration;

use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::{info, warn};

use super::keys::{self, VerificationKey};

/// Largest discovery document / JWKS read.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// Where and how to fetch.
#[derive(Debug, Clone)]
pub struct DiscoveryOptions {
    /// The issuer (`iss`), also the discovery base URL.
    pub issuer: String,
    /// Refetch after this long even without an unknown `kid`.
    pub max_age: Duration,
    /// Never refetch more often than this.
    pub min_refresh_interval: Duration,
}

#[derive(Debug, Default)]
struct Cache {
    keys: Vec<VerificationKey>,
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
    fetches: u64,
}

/// A discovered, cached key set for one issuer.
#[derive(Debug)]
pub struct DiscoveredKeys {
    opts: DiscoveryOptions,
    http: reqwest::Client,
    cache: Mutex<Cache>,
}

#[derive(Deserialize)]
struct DiscoveryDocument {
    issuer: String,
    jwks_uri: String,
}

impl DiscoveredKeys {
    /// Keys for `opts.issuer`, fetched with `http` (configure its roots for
    /// HTTPS issuers). Nothing is fetched until the first token arrives.
    pub fn new(opts: DiscoveryOptions, http: reqwest::Client) -> Self {
        Self {
            opts,
            http,
            cache: Mutex::new(Cache::default()),
        }
    }

    /// How many fetch attempts have been made (for tests and metrics).
    pub async fn fetch_attempts(&self) -> u64 {
        self.cache.lock().await.fetches
    }

    /// The current keys, refreshed first if the rule above says so.
    pub async fn keys(&self, kid: Option<&str>) -> Vec<VerificationKey> {
        let mut cache = self.cache.lock().await;
        let now = Instant::now();
        let stale = match cache.fetched_at {
            None => true,
            Some(t) => now.duration_since(t) >= self.opts.max_age,
        };
        let unknown_kid =
            kid.is_some_and(|k| !cache.keys.iter().any(|key| key.kid.as_deref() == Some(k)));
        let may_fetch = cache
            .last_attempt
            .is_none_or(|t| now.duration_since(t) >= self.opts.min_refresh_interval);
        if (stale || unknown_kid) && may_fetch {
            cache.last_attempt = Some(now);
            cache.fetches += 1;
            match self.fetch().await {
                Ok(keys) => {
                    info!(issuer = %self.opts.issuer, keys = keys.len(), "fetched JWT keys by OIDC discovery");
                    cache.keys = keys;
                    cache.fetched_at = Some(now);
                }
                Err(e) => {
                    warn!(issuer = %self.opts.issuer, error = %e, "OIDC discovery failed; keeping the previous keys");
                }
            }
        }
        cache.keys.clone()
    }

    async fn fetch(&self) -> Result<Vec<VerificationKey>, String> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.opts.issuer.trim_end_matches('/')
        );
        let doc: DiscoveryDocument = serde_json::from_slice(&self.get(&url).await?)
            .map_err(|e| format!("{url}: not a discovery document: {e}"))?;
        if doc.issuer != self.opts.issuer {
            return Err(format!(
                "{url} is for issuer {:?}, not {:?}: refusing its keys",
                doc.issuer, self.opts.issuer
            ));
        }
        let body = self.get(&doc.jwks_uri).await?;
        let text = String::from_utf8(body).map_err(|_| format!("{}: not UTF-8", doc.jwks_uri))?;
        let (keys, skipped) =
            keys::parse_jwks(&text).map_err(|e| format!("{}: {e}", doc.jwks_uri))?;
        for s in skipped {
            warn!(issuer = %self.opts.issuer, reason = %s, "skipped a discovered JWKS key");
        }
        Ok(keys)
    }

    async fn get(&self, url: &str) -> Result<Vec<u8>, String> {
        let mut resp = self
            .http
            .get(url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("GET {url}: HTTP {}", resp.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| format!("GET {url}: {e}"))? {
            if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
                return Err(format!("GET {url}: larger than {MAX_DOCUMENT_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}
