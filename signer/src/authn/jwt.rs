//! Kubernetes service-account tokens, verified offline.
//!
//! Verification order (every step refuses on doubt):
//! 1. compact JWS with exactly three parts, at most [`MAX_TOKEN_BYTES`];
//! 2. header `alg` is RS256 or ES256 — `none`, HS*, PS*, anything else is
//!    refused before any key is looked at;
//! 3. the unverified `iss` selects a configured issuer; only that issuer's
//!    keys are candidates, filtered by `kid` (when the token has one) and by
//!    the algorithm each key is bound to;
//! 4. the signature verifies with a candidate (ring, so no algorithm
//!    confusion is possible);
//! 5. `aud` contains an accepted audience, `exp` is present and not passed,
//!    `nbf` (if present) has been reached — both with the issuer's skew;
//! 6. the identity comes from the `kubernetes.io` claim (namespace, service
//!    account name) or from `sub = system:serviceaccount:<ns>:<sa>`; if both
//!    are present they must agree.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use spiffe::TrustDomain;

use super::cache::{self, TokenCache, TokenCacheOptions, TokenWindow};
use super::keys::{JwtAlgorithm, VerificationKey};
use super::oidc::DiscoveredKeys;
use super::token_review::TokenReviewer;
use super::{
    AuthMethod, Authenticator, AuthnError, AuthnFuture, CallerIdentity, Credentials, PodBinding,
};

/// Longest token accepted (real service-account tokens are ~1 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Where an issuer's keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A fixed set (JWKS or PEM file).
    Static(Vec<VerificationKey>),
    /// OIDC discovery, cached and refreshed.
    Discovery(Arc<DiscoveredKeys>),
    /// No keys: the Kubernetes API server checks each token (TokenReview).
    TokenReview(Arc<TokenReviewer>),
}

impl KeySource {
    async fn keys(&self, kid: Option<&str>) -> Vec<VerificationKey> {
        match self {
            KeySource::Static(k) => k.clone(),
            KeySource::Discovery(d) => d.keys(kid).await,
            KeySource::TokenReview(_) => Vec::new(),
        }
    }
}

/// One trusted issuer with its keys.
#[derive(Debug, Clone)]
pub struct TrustedIssuer {
    /// Required `iss`.
    pub issuer: String,
    /// `aud` must contain one of these.
    pub audiences: Vec<String>,
    /// Keys that may sign this issuer's tokens.
    pub keys: KeySource,
    /// Allowed clock skew for `exp` / `nbf`.
    pub clock_skew: Duration,
    /// The cluster (istio-agent's `ClusterID` header) whose tokens this
    /// issuer signs; `None` for the signer's own cluster.
    pub cluster_id: Option<String>,
}

/// Verifies service-account JWTs against a fixed set of issuers.
#[derive(Debug, Clone)]
pub struct JwtAuthenticator {
    trust_domain: TrustDomain,
    issuers: Vec<TrustedIssuer>,
    cache: Option<Arc<TokenCache>>,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    aud: Option<Audience>,
    #[serde(default)]
    exp: Option<i64>,
    #[serde(default)]
    nbf: Option<i64>,
    #[serde(default, rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaim>,
}

#[derive(Deserialize)]
struct KubernetesClaim {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    serviceaccount: Option<NamedRef>,
    #[serde(default)]
    pod: Option<NamedRef>,
    #[serde(default)]
    node: Option<NamedRef>,
}

#[derive(Deserialize)]
struct NamedRef {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    uid: Option<String>,
}

/// A token whose signature and claims verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// The issuer that vouched for it.
    pub issuer: String,
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// The pod the token is bound to, if its `kubernetes.io` claim names one
    /// (with its UID).
    pub pod: Option<PodBinding>,
}

impl JwtAuthenticator {
    /// An authenticator for `trust_domain` trusting `issuers`.
    pub fn new(trust_domain: TrustDomain, issuers: Vec<TrustedIssuer>) -> Self {
        Self {
            trust_domain,
            issuers,
            cache: None,
        }
    }

    /// Remember successful verifications (see [`super::cache`]); a zero
    /// `ttl` leaves the cache off.
    pub fn with_token_cache(mut self, options: TokenCacheOptions) -> Self {
        let cache = TokenCache::new(options);
        self.cache = cache.enabled().then(|| Arc::new(cache));
        self
    }

    /// The verified-token cache, when on.
    pub fn token_cache(&self) -> Option<&TokenCache> {
        self.cache.as_deref()
    }

    /// The configured issuers.
    pub fn issuers(&self) -> &[TrustedIssuer] {
        &self.issuers
    }

    /// The issuers that may vouch for a request from `cluster_id`: when no
    /// issuer declares a cluster, all of them (the header is ignored);
    /// otherwise those of that cluster, or — without the header — those
    /// with no cluster.
    fn issuers_for(&self, cluster_id: Option<&str>) -> Vec<&TrustedIssuer> {
        if self.issuers.iter().all(|i| i.cluster_id.is_none()) {
            return self.issuers.iter().collect();
        }
        self.issuers
            .iter()
            .filter(|i| i.cluster_id.as_deref() == cluster_id)
            .collect()
    }

    /// Verify a token sent with `cluster_id` at time `now_unix` (seconds).
    pub async fn verify(
        &self,
        token: &str,
        cluster_id: Option<&str>,
        now_unix: i64,
    ) -> Result<VerifiedToken, AuthnError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthnError::Malformed(format!(
                "{} bytes, more than {MAX_TOKEN_BYTES}",
                token.len()
            )));
        }
        let cache_key = self.cache.as_ref().map(|_| cache::key(token, cluster_id));
        if let (Some(c), Some(k)) = (&self.cache, &cache_key)
            && let Some(hit) = c.get(k, now_unix)
        {
            return Ok(hit);
        }
        let mut parts = token.split('.');
        let (Some(h64), Some(p64), Some(s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthnError::Malformed(
                "not a compact JWS (header.payload.signature)".to_string(),
            ));
        };
        let header: Header = decode_json(h64, "header")?;
        if header.crit.is_some() {
            return Err(AuthnError::Malformed(
                "crit header parameters are not supported".to_string(),
            ));
        }
        let alg = JwtAlgorithm::from_jose(&header.alg)
            .ok_or_else(|| AuthnError::AlgorithmNotAllowed(header.alg.clone()))?;
        let claims: Claims = decode_json(p64, "payload")?;
        let signature = URL_SAFE_NO_PAD
            .decode(s64)
            .map_err(|e| AuthnError::Malformed(format!("signature is not base64url: {e}")))?;

        let iss = claims
            .iss
            .as_deref()
            .ok_or_else(|| AuthnError::UnknownIssuer(String::new()))?;
        let issuer = self
            .issuers_for(cluster_id)
            .into_iter()
            .find(|i| i.issuer == iss)
            .ok_or_else(|| match cluster_id {
                Some(c) if self.issuers.iter().any(|i| i.issuer == iss) => {
                    AuthnError::WrongCluster {
                        issuer: iss.to_string(),
                        cluster: c.to_string(),
                    }
                }
                _ => AuthnError::UnknownIssuer(iss.to_string()),
            })?;

        let reviewed = match &issuer.keys {
            KeySource::TokenReview(reviewer) => Some(reviewer.review(token).await?),
            _ => None,
        };
        let keys = issuer.keys.keys(header.kid.as_deref()).await;
        let candidates: Vec<&VerificationKey> = keys
            .iter()
            .filter(|k| k.alg == alg)
            .filter(|k| match (&header.kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            })
            .collect();
        if reviewed.is_none() && candidates.is_empty() {
            return Err(AuthnError::UnknownKey(format!(
                "no {} key{} for issuer {iss}",
                alg.jose(),
                header
                    .kid
                    .as_deref()
                    .map(|k| format!(" with kid {k:?}"))
                    .unwrap_or_default()
            )));
        }
        let signed_len = h64.len() + 1 + p64.len();
        let message = token
            .get(..signed_len)
            .ok_or_else(|| AuthnError::Malformed("token length".to_string()))?;
        if reviewed.is_none()
            && !candidates
                .iter()
                .any(|k| k.verify(message.as_bytes(), &signature))
        {
            return Err(AuthnError::BadSignature);
        }

        let skew = i64::try_from(issuer.clock_skew.as_secs()).unwrap_or(i64::MAX);
        let found: Vec<String> = match claims.aud {
            Some(Audience::One(a)) => vec![a],
            Some(Audience::Many(v)) => v,
            None => Vec::new(),
        };
        if !found.iter().any(|a| issuer.audiences.contains(a)) {
            return Err(AuthnError::WrongAudience {
                found,
                expected: issuer.audiences.clone(),
            });
        }
        let exp = claims.exp.ok_or(AuthnError::NoExpiry)?;
        if now_unix >= exp.saturating_add(skew) {
            return Err(AuthnError::Expired(exp));
        }
        if let Some(nbf) = claims.nbf
            && now_unix < nbf.saturating_sub(skew)
        {
            return Err(AuthnError::NotYetValid(nbf));
        }

        let from_sub = claims.sub.as_deref().and_then(|s| {
            let rest = s.strip_prefix("system:serviceaccount:")?;
            let (ns, sa) = rest.split_once(':')?;
            Some((ns.to_string(), sa.to_string()))
        });
        let pod = claims.kubernetes.as_ref().and_then(|k| {
            let pod = k.pod.as_ref()?;
            Some(PodBinding {
                name: pod.name.clone()?,
                uid: pod.uid.clone()?,
                node: k.node.as_ref().and_then(|n| n.name.clone()),
            })
        });
        let from_k8s = claims
            .kubernetes
            .and_then(|k| Some((k.namespace?, k.serviceaccount?.name?)));
        let (namespace, service_account) = match (from_k8s, from_sub) {
            (Some(a), Some(b)) if a != b => {
                return Err(AuthnError::NoIdentity(format!(
                    "kubernetes.io claim says {}/{} but sub says {}/{}",
                    a.0, a.1, b.0, b.1
                )));
            }
            (Some(a), _) => a,
            (None, Some(b)) => b,
            (None, None) => {
                return Err(AuthnError::NoIdentity(
                    "neither a kubernetes.io claim nor sub=system:serviceaccount:<ns>:<sa>"
                        .to_string(),
                ));
            }
        };
        // Kubernetes names: a namespace is a DNS-1123 label, a service
        // account a DNS-1123 subdomain. The API server makes no other, so a
        // token naming one was not made by it (whatever key signed it).
        if !is_dns1123_label(&namespace) {
            return Err(AuthnError::NoIdentity(format!(
                "namespace {namespace:?} is not a Kubernetes name (a DNS-1123 label: \
                 at most 63 of a-z, 0-9 and '-', starting and ending alphanumeric)"
            )));
        }
        if !is_dns1123_subdomain(&service_account) {
            return Err(AuthnError::NoIdentity(format!(
                "service account {service_account:?} is not a Kubernetes name (a DNS-1123 \
                 subdomain: at most 253 of a-z, 0-9, '-' and '.', in labels)"
            )));
        }
        if let Some(r) = &reviewed
            && (r.namespace != namespace || r.service_account != service_account)
        {
            return Err(AuthnError::NoIdentity(format!(
                "the API server says {}/{} but the token claims {namespace}/{service_account}",
                r.namespace, r.service_account
            )));
        }
        let verified = VerifiedToken {
            issuer: iss.to_string(),
            namespace,
            service_account,
            pod,
        };
        // TokenReview answers are not cached: a deleted pod's token must stop
        // working at once.
        if let (Some(c), Some(k), None) = (&self.cache, cache_key, &reviewed) {
            let window = TokenWindow {
                usable_from: claims.nbf.map(|nbf| nbf.saturating_sub(skew)),
                usable_until: exp.saturating_add(skew),
            };
            c.insert(k, &verified, window, now_unix);
        }
        Ok(verified)
    }
}

fn decode_json<T: for<'de> Deserialize<'de>>(part: &str, what: &str) -> Result<T, AuthnError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|e| AuthnError::Malformed(format!("{what} is not base64url: {e}")))?;
    // JSON text is UTF-8 (RFC 8259, RFC 7519 7.2). serde_json checks UTF-8
    // only in the strings it keeps, so an unknown claim holding other bytes
    // would pass: check the whole text first.
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| AuthnError::Malformed(format!("{what} is not UTF-8: {e}")))?;
    serde_json::from_str(text)
        .map_err(|e| AuthnError::Malformed(format!("{what} is not the expected JSON: {e}")))
}

impl Authenticator for JwtAuthenticator {
    fn authenticate<'a>(&'a self, credentials: &'a Credentials, now_unix: i64) -> AuthnFuture<'a> {
        Box::pin(async move {
            let token = credentials
                .bearer_token
                .as_deref()
                .ok_or(AuthnError::NoCredentials)?;
            let verified = self
                .verify(token, credentials.cluster_id.as_deref(), now_unix)
                .await?;
            let mut caller = CallerIdentity::for_service_account(
                &self.trust_domain,
                &verified.namespace,
                &verified.service_account,
                AuthMethod::Jwt {
                    issuer: verified.issuer,
                },
            )?;
            caller.pod = verified.pod;
            Ok(caller)
        })
    }
}

/// A DNS-1123 label (Kubernetes namespace names): 1–63 of `a-z`, `0-9`
/// and `-`, starting and ending with a letter or digit.
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| alnum(c) || *c == b'-')
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
}

/// A DNS-1123 subdomain (Kubernetes service account names): at most 253
/// bytes of DNS-1123 labels joined by `.`.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_names_are_dns1123() {
        for ok in ["a", "shop", "kube-system", "a1", &"a".repeat(63)] {
            assert!(is_dns1123_label(ok), "{ok}");
        }
        for bad in ["", "A", "shop_", "-a", "a-", "a.b", &"a".repeat(64)] {
            assert!(!is_dns1123_label(bad), "{bad:?}");
        }
        for ok in ["default", "my.sa", "istio-ingressgateway-service-account"] {
            assert!(is_dns1123_subdomain(ok), "{ok}");
        }
        for bad in ["", "Default", "a..b", ".a", "a.", "a_b", &"a".repeat(254)] {
            assert!(!is_dns1123_subdomain(bad), "{bad:?}");
        }
    }
    use proptest::prelude::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn authenticator() -> JwtAuthenticator {
        let key = VerificationKey::p256(Some("k".into()), &[1; 32], &[2; 32]).unwrap();
        JwtAuthenticator::new(
            TrustDomain::new("cluster.local").unwrap(),
            vec![TrustedIssuer {
                issuer: "iss".into(),
                audiences: vec!["istio-ca".into()],
                keys: KeySource::Static(vec![key]),
                clock_skew: Duration::from_secs(60),
                cluster_id: None,
            }],
        )
    }

    proptest! {
        #[test]
        fn garbage_token_never_panics(s in ".{0,2000}") {
            prop_assert!(block_on(authenticator().verify(&s, None, 0)).is_err());
        }

        #[test]
        fn garbage_parts_never_panic(
            h in proptest::collection::vec(any::<u8>(), 0..300),
            p in proptest::collection::vec(any::<u8>(), 0..300),
            s in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let t = format!("{}.{}.{}", URL_SAFE_NO_PAD.encode(&h), URL_SAFE_NO_PAD.encode(&p), URL_SAFE_NO_PAD.encode(&s));
            prop_assert!(block_on(authenticator().verify(&t, None, 0)).is_err());
        }
    }

    /// A P-256 signing key and an authenticator trusting it, with the
    /// verified-token cache on for an hour.
    fn signing_setup() -> (ring::signature::EcdsaKeyPair, JwtAuthenticator) {
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let public = pair.public_key().as_ref();
        let key = VerificationKey::p256(Some("k".into()), &public[1..33], &public[33..65]).unwrap();
        let authn = JwtAuthenticator::new(
            TrustDomain::new("cluster.local").unwrap(),
            vec![TrustedIssuer {
                issuer: "iss".into(),
                audiences: vec!["istio-ca".into()],
                keys: KeySource::Static(vec![key]),
                clock_skew: Duration::from_secs(60),
                cluster_id: None,
            }],
        )
        .with_token_cache(TokenCacheOptions {
            ttl: Duration::from_secs(3_600),
            max_entries: 100,
        });
        (pair, authn)
    }

    fn mint(pair: &ring::signature::EcdsaKeyPair, exp: i64) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256","kid":"k"}"#);
        let claims = URL_SAFE_NO_PAD.encode(
            format!(
                r#"{{"iss":"iss","aud":"istio-ca","exp":{exp},"sub":"system:serviceaccount:shop:web"}}"#
            )
            .as_bytes(),
        );
        let message = format!("{header}.{claims}");
        let sig = pair
            .sign(&ring::rand::SystemRandom::new(), message.as_bytes())
            .unwrap();
        format!("{message}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    #[test]
    fn cached_token_is_refused_once_it_expires() {
        let (pair, authn) = signing_setup();
        let token = mint(&pair, 1_100);
        let ok = block_on(authn.verify(&token, None, 1_000)).unwrap();
        assert_eq!(
            (ok.namespace.as_str(), ok.service_account.as_str()),
            ("shop", "web")
        );
        assert_eq!(authn.token_cache().map(TokenCache::len), Some(1));
        assert!(block_on(authn.verify(&token, None, 1_159)).is_ok());
        assert_eq!(
            block_on(authn.verify(&token, None, 1_160)),
            Err(AuthnError::Expired(1_100))
        );
    }

    /// Found by fuzzing (`fuzz/corpus/jwt/regression-*`): serde_json skips
    /// an unknown claim without checking its bytes, so a token whose claims
    /// were not UTF-8 (not JSON) was accepted.
    #[test]
    fn token_whose_claims_are_not_utf8_is_refused() {
        let (pair, authn) = signing_setup();
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256","kid":"k"}"#);
        let mut claims = br#"{"iss":"iss","aud":"istio-ca","exp":1100,"sub":"system:serviceaccount:shop:web","x":""#.to_vec();
        claims.extend_from_slice(b"\xd8\xd8\"}");
        let message = format!("{header}.{}", URL_SAFE_NO_PAD.encode(&claims));
        let sig = pair
            .sign(&ring::rand::SystemRandom::new(), message.as_bytes())
            .unwrap();
        let token = format!("{message}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
        let refused = block_on(authn.verify(&token, None, 1_000));
        assert!(
            matches!(&refused, Err(AuthnError::Malformed(m)) if m.contains("UTF-8")),
            "{refused:?}"
        );
        // The same claims in UTF-8 are fine.
        let claims = br#"{"iss":"iss","aud":"istio-ca","exp":1100,"sub":"system:serviceaccount:shop:web","x":"\u00d8"}"#;
        let message = format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims));
        let sig = pair
            .sign(&ring::rand::SystemRandom::new(), message.as_bytes())
            .unwrap();
        let token = format!("{message}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
        assert!(block_on(authn.verify(&token, None, 1_000)).is_ok());
    }

    #[test]
    fn tampered_copy_of_a_cached_token_is_verified_and_refused() {
        let (pair, authn) = signing_setup();
        let token = mint(&pair, 1_100);
        assert!(block_on(authn.verify(&token, None, 1_000)).is_ok());
        // Another payload under the cached token's signature.
        let (head, rest) = token.split_once('.').unwrap();
        let (_, sig) = rest.split_once('.').unwrap();
        let forged_claims = URL_SAFE_NO_PAD.encode(
            br#"{"iss":"iss","aud":"istio-ca","exp":1100,"sub":"system:serviceaccount:kube-system:admin"}"#,
        );
        let forged = format!("{head}.{forged_claims}.{sig}");
        assert_eq!(
            block_on(authn.verify(&forged, None, 1_000)),
            Err(AuthnError::BadSignature)
        );
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(super::super::bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(super::super::bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(super::super::bearer_token("Basic abc"), None);
        assert_eq!(super::super::bearer_token("Bearer "), None);
    }
}
