//! Who is calling: turns the credentials on a request into a
//! [`CallerIdentity`], or refuses.
//!
//! The seam is the [`Authenticator`] trait. [`jwt::JwtAuthenticator`]
//! verifies Kubernetes service-account tokens offline; a client-certificate
//! authenticator for mTLS renewal plugs in behind the same trait.

pub mod cache;
pub mod client_cert;
pub mod jwt;
pub mod keys;
pub mod oidc;
pub mod token_review;

use std::future::Future;
use std::pin::Pin;

use rustls_pki_types::CertificateDer;
use spiffe::{SpiffeId, TrustDomain};

/// What a request carries that can prove who sent it.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// The token from `authorization: Bearer <token>`, if any.
    pub bearer_token: Option<String>,
    /// The TLS client certificate chain (leaf first), if the caller sent one.
    pub peer_certificates: Vec<CertificateDer<'static>>,
    /// The `clusterid` request header (istio-agent's `ClusterID`), if any.
    pub cluster_id: Option<String>,
}

/// How the caller proved its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMethod {
    /// A service-account JWT from this issuer.
    Jwt {
        /// The token's `iss`.
        issuer: String,
    },
    /// A client certificate from this CA (renewal over mTLS).
    ClientCertificate,
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerIdentity {
    /// `spiffe://<td>/ns/<namespace>/sa/<service_account>`.
    pub spiffe_id: SpiffeId,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Kubernetes service account.
    pub service_account: String,
    /// How it was proved.
    pub method: AuthMethod,
    /// The pod a bound service-account token was issued to (its
    /// `kubernetes.io` claim), when it names one: how a node agent's node
    /// is found.
    pub pod: Option<PodBinding>,
}

/// The pod (and node, when the token says) a service-account token is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodBinding {
    /// Pod name (in the caller's namespace).
    pub name: String,
    /// Pod UID: a pod re-created under the same name has another.
    pub uid: String,
    /// Node name, in tokens of clusters that add it (Kubernetes ≥ 1.30).
    pub node: Option<String>,
}

impl CallerIdentity {
    /// Build the identity for a namespace and service account in a trust domain.
    pub fn for_service_account(
        trust_domain: &TrustDomain,
        namespace: &str,
        service_account: &str,
        method: AuthMethod,
    ) -> Result<Self, AuthnError> {
        let spiffe_id = SpiffeId::from_segments(
            trust_domain.clone(),
            &["ns", namespace, "sa", service_account],
        )
        .map_err(|e| {
            AuthnError::InvalidIdentity(format!(
                "namespace {namespace:?} / service account {service_account:?}: {e}"
            ))
        })?;
        Ok(Self {
            spiffe_id,
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            method,
            pod: None,
        })
    }
}

/// Why a caller is not authenticated. Every variant is UNAUTHENTICATED.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthnError {
    /// No bearer token (and no usable client certificate).
    #[error("no credentials: send `authorization: Bearer <service-account token>`")]
    NoCredentials,
    /// The token is not a well-formed JWS compact serialization.
    #[error("token is malformed: {0}")]
    Malformed(String),
    /// `alg` is not RS256 or ES256 (this refuses `none` and HS*).
    #[error("token algorithm {0:?} is not allowed (allowed: RS256, ES256)")]
    AlgorithmNotAllowed(String),
    /// No configured key has this `kid` / algorithm.
    #[error("token signing key is not trusted ({0})")]
    UnknownKey(String),
    /// The signature does not verify with any candidate key.
    #[error("token signature does not verify")]
    BadSignature,
    /// `iss` is not a configured issuer.
    #[error("token issuer {0:?} is not trusted")]
    UnknownIssuer(String),
    /// The issuer is trusted, but not for the cluster the request names.
    #[error("token issuer {issuer:?} is not trusted for cluster {cluster:?}")]
    WrongCluster {
        /// The token's `iss`.
        issuer: String,
        /// The `ClusterID` header.
        cluster: String,
    },
    /// `aud` has none of the accepted audiences.
    #[error("token audience {found:?} does not include any of {expected:?}")]
    WrongAudience {
        /// Audiences in the token.
        found: Vec<String>,
        /// Audiences accepted.
        expected: Vec<String>,
    },
    /// `exp` is in the past (beyond the skew), or missing.
    #[error("token expired at {0} (unix seconds)")]
    Expired(i64),
    /// `exp` is missing.
    #[error("token has no exp claim")]
    NoExpiry,
    /// `nbf` is in the future (beyond the skew).
    #[error("token is not valid before {0} (unix seconds)")]
    NotYetValid(i64),
    /// The token does not name a service account.
    #[error("token does not identify a Kubernetes service account: {0}")]
    NoIdentity(String),
    /// The named service account does not make a valid SPIFFE ID.
    #[error("token identity is not usable: {0}")]
    InvalidIdentity(String),
    /// The Kubernetes API server did not authenticate the token.
    #[error("token rejected by the Kubernetes API server: {0}")]
    Rejected(String),
    /// The Kubernetes API server could not be asked (UNAVAILABLE).
    #[error("cannot reach the Kubernetes API server for TokenReview: {0}")]
    ReviewUnavailable(String),
    /// A client certificate was presented but is not usable.
    #[error("client certificate refused: {0}")]
    ClientCertificate(String),
}

/// The future returned by [`Authenticator::authenticate`].
pub type AuthnFuture<'a> =
    Pin<Box<dyn Future<Output = Result<CallerIdentity, AuthnError>> + Send + 'a>>;

/// Authenticates callers. `now_unix` is the current time in Unix seconds
/// (passed in, so tests control the clock).
pub trait Authenticator: Send + Sync {
    /// Identify the caller or refuse.
    fn authenticate<'a>(&'a self, credentials: &'a Credentials, now_unix: i64) -> AuthnFuture<'a>;
}

/// mTLS renewal first: a caller that presented a client certificate is
/// authenticated by it alone (and refused if it is not valid); every other
/// caller goes to the token authenticator.
pub struct CertificateOrToken {
    /// Verifies client certificates; `None` turns mTLS renewal off (a
    /// presented certificate is then ignored).
    pub client_cert: Option<client_cert::ClientCertAuthenticator>,
    /// Verifies bearer tokens.
    pub token: std::sync::Arc<dyn Authenticator>,
}

impl Authenticator for CertificateOrToken {
    fn authenticate<'a>(&'a self, credentials: &'a Credentials, now_unix: i64) -> AuthnFuture<'a> {
        Box::pin(async move {
            match &self.client_cert {
                Some(cc) if !credentials.peer_certificates.is_empty() => {
                    cc.verify(&credentials.peer_certificates, now_unix)
                }
                _ => self.token.authenticate(credentials, now_unix).await,
            }
        })
    }
}

/// Extract the token from an `authorization` header value (`Bearer <token>`,
/// scheme case-insensitive).
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        let token = token.trim();
        (!token.is_empty()).then_some(token)
    } else {
        None
    }
}
