//! `jwt`: service-account token verification, the real path
//! (`JwtAuthenticator::verify` / `authenticate`) over a fixed key set: an
//! ES256 and an RS256 key from `fixtures/jwks.json`, read by the signer's own
//! JWKS parser, for two issuers (one of them only for cluster `remote`),
//! with the verified-token cache on.
//!
//! Input, by its first byte:
//! - `S` header JSON [`SEP`](crate::SEP) claims JSON [SEP cluster ID]: the
//!   harness signs the two with the fixture's ES256 key, so mutated headers
//!   and claims reach every check after the signature;
//! - `R` token [SEP cluster ID]: a token as sent (the seeds hold ones signed
//!   with both fixture keys);
//! - `K` a JWKS document, for the key parser.
//!
//! An accepted token must: come from an issuer trusted for the request's
//! cluster; name an accepted audience; carry an `exp` not passed and no
//! `nbf` not reached (with the issuer's skew); name a namespace that is a
//! DNS-1123 label and a service account that is a DNS-1123 subdomain, the
//! ones its claims give; make the SPIFFE ID `authenticate` returns; be
//! accepted again (from the cache) with the same answer; and stop being
//! accepted when one bit of its signature or one byte of its payload
//! changes.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use meshward_signer::authn::cache::TokenCacheOptions;
use meshward_signer::authn::jwt::{
    JwtAuthenticator, KeySource, TrustedIssuer, is_dns1123_label, is_dns1123_subdomain,
};
use meshward_signer::authn::keys::{VerificationKey, parse_jwks};
use meshward_signer::authn::{Authenticator, Credentials};
use serde_json::Value;
use spiffe::TrustDomain;
use std::sync::OnceLock;
use std::time::Duration;

use crate::{NOW, parts, ready};

/// The issuer of the signer's own cluster.
pub const LOCAL_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The issuer trusted only for requests naming cluster [`REMOTE_CLUSTER`].
pub const REMOTE_ISSUER: &str = "https://remote.example";
/// The remote issuer's cluster.
pub const REMOTE_CLUSTER: &str = "remote";
/// The fixture's JWKS.
pub const JWKS: &str = include_str!("../fixtures/jwks.json");
/// The fixture's ES256 signing key (PKCS#8).
pub const ES256_PKCS8: &[u8] = include_bytes!("../fixtures/jwt_es256.pk8.der");

fn keys() -> &'static [VerificationKey] {
    static KEYS: OnceLock<Vec<VerificationKey>> = OnceLock::new();
    KEYS.get_or_init(|| parse_jwks(JWKS).expect("the fixture JWKS parses").0)
}

fn es256() -> &'static ring::signature::EcdsaKeyPair {
    static KEY: OnceLock<ring::signature::EcdsaKeyPair> = OnceLock::new();
    KEY.get_or_init(|| {
        ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            ES256_PKCS8,
            &ring::rand::SystemRandom::new(),
        )
        .expect("the fixture ES256 key")
    })
}

/// Signs `header.claims` with the fixture's ES256 key.
pub fn sign_es256(header: &[u8], claims: &[u8]) -> String {
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let signature = es256()
        .sign(&ring::rand::SystemRandom::new(), message.as_bytes())
        .expect("ECDSA signing");
    format!("{message}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
}

struct Issuer {
    name: &'static str,
    audiences: &'static [&'static str],
    skew: i64,
    cluster: Option<&'static str>,
}

const ISSUERS: [Issuer; 2] = [
    Issuer {
        name: LOCAL_ISSUER,
        audiences: &["istio-ca"],
        skew: 60,
        cluster: None,
    },
    Issuer {
        name: REMOTE_ISSUER,
        audiences: &["istio-ca", "remote-ca"],
        skew: 0,
        cluster: Some(REMOTE_CLUSTER),
    },
];

fn authenticator() -> JwtAuthenticator {
    let issuers = ISSUERS
        .iter()
        .map(|i| TrustedIssuer {
            issuer: i.name.to_string(),
            audiences: i.audiences.iter().map(|a| (*a).to_string()).collect(),
            keys: KeySource::Static(keys().to_vec()),
            clock_skew: Duration::from_secs(i.skew as u64),
            cluster_id: i.cluster.map(str::to_string),
        })
        .collect();
    JwtAuthenticator::new(TrustDomain::new("cluster.local").expect("valid"), issuers)
        .with_token_cache(TokenCacheOptions {
            ttl: Duration::from_secs(3600),
            max_entries: 16,
        })
}

/// The target.
pub fn run(data: &[u8]) {
    match data.split_first() {
        Some((b'S', rest)) => {
            let p = parts(rest, 3);
            let (header, claims) = (p[0], p.get(1).copied().unwrap_or_default());
            let token = sign_es256(header, claims);
            check(&token, cluster(p.get(2)));
        }
        Some((b'R', rest)) => {
            let p = parts(rest, 2);
            let Ok(token) = std::str::from_utf8(p[0]) else {
                return;
            };
            check(token, cluster(p.get(1)));
        }
        Some((b'K', rest)) => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            if let Ok((found, _skipped)) = parse_jwks(text) {
                assert!(!found.is_empty(), "a JWKS with no usable key was accepted");
            }
        }
        _ => {}
    }
}

fn cluster(part: Option<&&[u8]>) -> Option<String> {
    part.and_then(|p| std::str::from_utf8(p).ok())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn check(token: &str, cluster_id: Option<String>) {
    let authn = authenticator();
    let result = ready(authn.verify(token, cluster_id.as_deref(), NOW));
    let Ok(verified) = result else {
        return;
    };

    // Its claims, read again without the signer's structs.
    let mut segments = token.split('.');
    let (Some(h64), Some(p64), Some(s64), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        panic!("accepted a token that is not three segments");
    };
    let header: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h64).expect("header base64"))
            .expect("header JSON");
    let alg = header.get("alg").and_then(Value::as_str);
    assert!(
        matches!(alg, Some("RS256" | "ES256")),
        "accepted alg {alg:?}"
    );
    let claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p64).expect("payload base64"))
            .expect("payload JSON");

    let issuer = ISSUERS
        .iter()
        .find(|i| i.name == verified.issuer)
        .expect("a configured issuer");
    assert_eq!(claims.get("iss").and_then(Value::as_str), Some(issuer.name));
    assert_eq!(
        issuer.cluster,
        cluster_id.as_deref(),
        "issuer {} accepted for cluster {cluster_id:?}",
        issuer.name
    );
    let audiences: Vec<&str> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.as_str()],
        Some(Value::Array(v)) => v.iter().filter_map(Value::as_str).collect(),
        other => panic!("accepted aud {other:?}"),
    };
    assert!(
        audiences.iter().any(|a| issuer.audiences.contains(a)),
        "accepted audiences {audiences:?}"
    );
    let exp = claims.get("exp").and_then(Value::as_i64).expect("exp");
    assert!(NOW < exp.saturating_add(issuer.skew), "accepted exp {exp}");
    if let Some(nbf) = claims.get("nbf").filter(|n| !n.is_null()) {
        let nbf = nbf.as_i64().expect("nbf is an integer");
        assert!(NOW >= nbf.saturating_sub(issuer.skew), "accepted nbf {nbf}");
    }

    assert!(is_dns1123_label(&verified.namespace), "{verified:?}");
    assert!(
        is_dns1123_subdomain(&verified.service_account),
        "{verified:?}"
    );
    let k8s = claims.get("kubernetes.io").filter(|k| !k.is_null());
    let from_k8s = k8s.and_then(|k| {
        Some((
            k.get("namespace")?.as_str()?,
            k.get("serviceaccount")?.get("name")?.as_str()?,
        ))
    });
    let from_sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .and_then(|s| s.strip_prefix("system:serviceaccount:"))
        .and_then(|rest| rest.split_once(':'));
    let named = (
        verified.namespace.as_str(),
        verified.service_account.as_str(),
    );
    match (from_k8s, from_sub) {
        (Some(a), Some(b)) => assert!(a == named && b == named, "{a:?} / {b:?} vs {named:?}"),
        (Some(a), None) | (None, Some(a)) => assert_eq!(a, named),
        (None, None) => panic!("accepted a token naming no service account"),
    }

    // The identity the pipeline takes from it.
    let credentials = Credentials {
        bearer_token: Some(token.to_string()),
        peer_certificates: Vec::new(),
        cluster_id: cluster_id.clone(),
    };
    let caller = ready(authn.authenticate(&credentials, NOW)).expect("authenticate agrees");
    assert_eq!(
        caller.spiffe_id.to_string(),
        format!("spiffe://cluster.local/ns/{}/sa/{}", named.0, named.1)
    );

    // Again, now from the cache: the same answer.
    assert_eq!(
        ready(authn.verify(token, cluster_id.as_deref(), NOW)).as_ref(),
        Ok(&verified)
    );

    // One bit of the signature, or one more byte of payload: refused.
    let mut signature = URL_SAFE_NO_PAD.decode(s64).expect("signature base64");
    if let Some(last) = signature.last_mut() {
        *last ^= 1;
    }
    let forged = format!("{h64}.{p64}.{}", URL_SAFE_NO_PAD.encode(&signature));
    assert!(
        ready(authn.verify(&forged, cluster_id.as_deref(), NOW)).is_err(),
        "a token with a changed signature was accepted"
    );
    let mut payload = URL_SAFE_NO_PAD.decode(p64).expect("payload base64");
    payload.push(b' ');
    let forged = format!("{h64}.{}.{s64}", URL_SAFE_NO_PAD.encode(&payload));
    assert!(
        ready(authn.verify(&forged, cluster_id.as_deref(), NOW)).is_err(),
        "a token with a changed payload was accepted"
    );
}
