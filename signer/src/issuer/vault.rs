//! The `vault` backend: Vault / OpenBao PKI signs, the signer decides.
//!
//! The request reaching this backend has already passed authentication, CSR
//! validation and policy (see [`super::IssueRequest`]). The backend forwards
//! the CSR to `<mount>/sign/<role>` (or `sign-verbatim/<role>`), asking for
//! exactly the caller's SPIFFE ID as URI SAN and the policy TTL, then checks
//! what came back ([`check::check_issued`]): only that SAN, the CSR's key, a
//! leaf, a validity inside policy, a path to the roots configured here. Any
//! deviation is refused (INTERNAL), never passed on to the workload.
//!
//! Vault being down, sealed or slow answers UNAVAILABLE: each HTTP attempt has
//! a timeout, transient failures are retried with backoff and jitter inside
//! an overall budget, and a circuit breaker fails requests fast while Vault
//! keeps failing.

pub mod backoff;
pub mod breaker;
pub mod check;
pub mod client;
pub mod metrics;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls_pki_types::{CertificateDer, TrustAnchor};
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use self::backoff::Backoff;
use self::check::{Expected, check_issued};
use self::client::{Auth, ClientSettings, SignedCert, VaultClient, VaultError};
use self::metrics::{Outcome, VaultMetrics};
use super::{IssueError, IssueFuture, IssueRequest, IssuedChain, Issuer, SigningValidity};

const NAME: &str = "vault";

/// `[issuer.vault]` in the signer config.
///
/// ```toml
/// address = "https://vault.example:8200"
/// mount = "pki_int"
/// role = "istio"
/// roots_file = "/etc/meshward/vault-root.pem"
/// ca_file = "/etc/meshward/vault-ca.pem"
/// [auth]
/// method = "approle"
/// role_id = "…"
/// secret_id_file = "/var/run/secrets/meshward/secret-id"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// Vault address, `http(s)://host:port`.
    pub address: String,
    /// PKI mount that signs (the intermediate). Default `pki_int`.
    #[serde(default = "default_mount")]
    pub mount: String,
    /// PKI role that signs workload certificates.
    pub role: String,
    /// PKI role for the signer's own serving certificate (it carries DNS
    /// names, which the workload role should not allow). Default: `role`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_role: Option<String>,
    /// Vault Enterprise / OpenBao namespace (`X-Vault-Namespace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// PEM CA bundle to trust for TLS to Vault. Required for `https`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM roots every certificate from Vault must chain to; sent to workloads
    /// as the trust anchors. Re-read when it changes (a root rotation: first
    /// old and new roots, later the new one alone), and the trust bundle
    /// follows.
    pub roots_file: PathBuf,
    /// How often `roots_file` is checked for changes. Default 10s.
    #[serde(default = "default_roots_reload_interval", with = "human_duration")]
    pub roots_reload_interval: Duration,
    /// Use `sign-verbatim/<role>` instead of `sign/<role>`.
    #[serde(default)]
    pub sign_verbatim: bool,
    /// Authentication.
    pub auth: VaultAuthConfig,
    /// Timeout of one HTTP request. Default 3s.
    #[serde(default = "default_attempt_timeout", with = "human_duration")]
    pub attempt_timeout: Duration,
    /// Budget of one signing, retries included; after it the signer answers
    /// UNAVAILABLE. Default 10s.
    #[serde(default = "default_timeout", with = "human_duration")]
    pub timeout: Duration,
    /// Attempts per signing (1 = no retry). Default 3.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// First backoff between attempts (doubles, with jitter). Default 100ms.
    #[serde(default = "default_backoff_initial", with = "human_duration")]
    pub backoff_initial: Duration,
    /// Largest backoff. Default 2s.
    #[serde(default = "default_backoff_max", with = "human_duration")]
    pub backoff_max: Duration,
    /// Consecutive failed attempts after which requests fail fast. Default 3.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// How long requests fail fast before one probe goes to Vault. Default 5s.
    #[serde(default = "default_open_for", with = "human_duration")]
    pub open_for: Duration,
    /// Clock difference with Vault tolerated when checking validity. Default 60s.
    #[serde(default = "default_clock_skew", with = "human_duration")]
    pub clock_skew: Duration,
}

/// `[issuer.vault.auth]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase", deny_unknown_fields)]
pub enum VaultAuthConfig {
    /// A token from a file; renewed with `renew-self`, re-read when refused.
    Token {
        /// File holding the token (e.g. written by Vault Agent).
        token_file: PathBuf,
    },
    /// AppRole login; logs in again at half the token TTL and when refused.
    Approle {
        /// Auth mount. Default `approle`.
        #[serde(default = "default_approle_mount")]
        mount: String,
        /// Role id.
        role_id: String,
        /// File holding the secret id.
        secret_id_file: PathBuf,
    },
    /// Kubernetes auth: logs in with the pod's service-account token (read
    /// again at every login: the kubelet rotates projected tokens); logs in
    /// again at half the token TTL and when refused. No secret to hand out.
    Kubernetes {
        /// Auth mount. Default `kubernetes`.
        #[serde(default = "default_kubernetes_mount")]
        mount: String,
        /// The Vault role bound to the signer's service account.
        role: String,
        /// File holding the service-account token. Default: the pod's
        /// token, `/var/run/secrets/kubernetes.io/serviceaccount/token`.
        #[serde(default = "default_kubernetes_token_file")]
        token_file: PathBuf,
    },
    /// JWT auth (Vault's `jwt` method set up to verify the cluster's
    /// service-account tokens itself, with the issuer's keys or OIDC
    /// discovery, instead of asking the API server): the same login with
    /// the same token file as `kubernetes`.
    Jwt {
        /// Auth mount. Default `jwt`.
        #[serde(default = "default_jwt_mount")]
        mount: String,
        /// The Vault role (`role_type=jwt`) the signer's token satisfies.
        role: String,
        /// File holding the service-account token. Default: the pod's
        /// token, `/var/run/secrets/kubernetes.io/serviceaccount/token`.
        #[serde(default = "default_kubernetes_token_file")]
        token_file: PathBuf,
    },
}

fn default_jwt_mount() -> String {
    "jwt".to_owned()
}
fn default_kubernetes_mount() -> String {
    "kubernetes".to_owned()
}
fn default_kubernetes_token_file() -> PathBuf {
    PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
}

fn default_roots_reload_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_mount() -> String {
    "pki_int".to_owned()
}
fn default_approle_mount() -> String {
    "approle".to_owned()
}
fn default_attempt_timeout() -> Duration {
    Duration::from_secs(3)
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_attempts() -> u32 {
    3
}
fn default_backoff_initial() -> Duration {
    Duration::from_millis(100)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(2)
}
fn default_failure_threshold() -> u32 {
    3
}
fn default_open_for() -> Duration {
    Duration::from_secs(5)
}
fn default_clock_skew() -> Duration {
    Duration::from_secs(60)
}

/// Durations as humantime strings (`"500ms"`, `"10s"`).
pub(crate) mod human_duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("duration {text:?}: {e}")))
    }
}

/// Why the vault backend could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VaultConfigError {
    /// A configured file could not be read.
    #[error("vault backend: {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A value is unusable.
    #[error("vault backend: {0}")]
    Invalid(String),
}

/// The configured roots (`roots_file`), parsed, and the digest of the file
/// they came from.
#[derive(Debug)]
struct Roots {
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
    digest: [u8; 32],
}

impl Roots {
    fn parse(pem: &[u8]) -> Result<Self, String> {
        let roots = pem_certs(pem)?;
        if roots.is_empty() {
            return Err("holds no certificate".into());
        }
        let anchors = roots
            .iter()
            .map(|r| webpki::anchor_from_trusted_cert(r).map(|a| a.to_owned()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not a usable trust anchor: {e:?}"))?;
        Ok(Self {
            roots,
            anchors,
            digest: <sha2::Sha256 as sha2::Digest>::digest(pem).into(),
        })
    }
}

/// The `vault` issuer.
#[derive(Debug)]
pub struct VaultIssuer {
    client: VaultClient,
    mount: String,
    sign_path: String,
    serving_sign_path: String,
    sign_verbatim: bool,
    roots_file: PathBuf,
    trust: RwLock<Arc<Roots>>,
    clock_skew: Duration,
    signing_validity: RwLock<SigningValidity>,
    metrics: VaultMetrics,
}

impl VaultIssuer {
    fn trust(&self) -> Arc<Roots> {
        match self.trust.read() {
            Ok(t) => t.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Reads `roots_file` again; new, valid contents replace the roots
    /// (`Ok(true)`), unchanged ones do nothing (`Ok(false)`), and unreadable
    /// or invalid ones are refused while the current roots stay (`Err`).
    pub fn reload_roots_if_changed(&self) -> Result<bool, String> {
        let pem = std::fs::read(&self.roots_file)
            .map_err(|e| format!("{}: {e}", self.roots_file.display()))?;
        let digest: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&pem).into();
        if digest == self.trust().digest {
            return Ok(false);
        }
        let next = Roots::parse(&pem).map_err(|e| format!("{}: {e}", self.roots_file.display()))?;
        let count = next.roots.len();
        match self.trust.write() {
            Ok(mut t) => *t = Arc::new(next),
            Err(p) => *p.into_inner() = Arc::new(next),
        }
        tracing::info!(roots = count, file = %self.roots_file.display(), "Vault roots reloaded");
        Ok(true)
    }

    /// Checks `roots_file` every `interval` ([`Self::reload_roots_if_changed`]),
    /// counting reloads and refusals, for as long as the issuer lives.
    pub fn spawn_roots_reloader(
        self: &Arc<Self>,
        interval: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(issuer) = weak.upgrade() else { return };
                match issuer.reload_roots_if_changed() {
                    Ok(true) => {
                        issuer.metrics.roots_reloads.inc();
                    }
                    Ok(false) => {}
                    Err(e) => {
                        if issuer.metrics.note_roots_failure(&e) {
                            tracing::warn!(error = %e, "new Vault roots refused; the current roots stay");
                        }
                    }
                }
            }
        })
    }

    /// Reads the configured files and builds the client; no network I/O.
    pub fn new(cfg: &VaultConfig) -> Result<Self, VaultConfigError> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| VaultConfigError::Read {
                path: path.clone(),
                source,
            })
        };
        let address = cfg.address.trim_end_matches('/').to_owned();
        if !(address.starts_with("http://") || address.starts_with("https://")) {
            return Err(VaultConfigError::Invalid(format!(
                "address {address:?} must start with http:// or https://"
            )));
        }
        let serving_role = cfg.serving_role.clone().unwrap_or_else(|| cfg.role.clone());
        for (what, v) in [
            ("mount", &cfg.mount),
            ("role", &cfg.role),
            ("serving_role", &serving_role),
        ] {
            if v.is_empty() || v.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
                return Err(VaultConfigError::Invalid(format!(
                    "{what} {v:?} is not a path"
                )));
            }
        }
        let trust = Roots::parse(&read(&cfg.roots_file)?).map_err(|e| {
            VaultConfigError::Invalid(format!("roots_file {}: {e}", cfg.roots_file.display()))
        })?;
        let initial_validity = trust
            .roots
            .first()
            .and_then(|r| cert_validity(r))
            .ok_or_else(|| VaultConfigError::Invalid("roots_file: unreadable validity".into()))?;
        let ca_pem = cfg.ca_file.as_ref().map(read).transpose()?;
        let auth = match &cfg.auth {
            VaultAuthConfig::Token { token_file } => Auth::Token {
                file: token_file.clone(),
            },
            VaultAuthConfig::Approle {
                mount,
                role_id,
                secret_id_file,
            } => Auth::AppRole {
                mount: mount.clone(),
                role_id: role_id.clone(),
                secret_id_file: secret_id_file.clone(),
            },
            VaultAuthConfig::Kubernetes {
                mount,
                role,
                token_file,
            } => Auth::Kubernetes {
                mount: mount.clone(),
                role: role.clone(),
                token_file: token_file.clone(),
            },
            VaultAuthConfig::Jwt {
                mount,
                role,
                token_file,
            } => Auth::Jwt {
                mount: mount.clone(),
                role: role.clone(),
                token_file: token_file.clone(),
            },
        };
        if cfg.max_attempts == 0 {
            return Err(VaultConfigError::Invalid(
                "max_attempts must be at least 1".into(),
            ));
        }
        let metrics = VaultMetrics::default();
        let client = VaultClient::new(ClientSettings {
            address,
            namespace: cfg.namespace.clone().filter(|n| !n.is_empty()),
            ca_pem,
            auth,
            attempt_timeout: cfg.attempt_timeout,
            timeout: cfg.timeout,
            max_attempts: cfg.max_attempts,
            backoff: Backoff {
                initial: cfg.backoff_initial,
                max: cfg.backoff_max,
            },
            failure_threshold: cfg.failure_threshold,
            open_for: cfg.open_for,
            metrics: metrics.clone(),
        })
        .map_err(|e| VaultConfigError::Invalid(e.to_string()))?;
        let verb = if cfg.sign_verbatim {
            "sign-verbatim"
        } else {
            "sign"
        };
        Ok(Self {
            client,
            mount: cfg.mount.clone(),
            sign_path: format!("{}/{verb}/{}", cfg.mount, cfg.role),
            serving_sign_path: format!("{}/{verb}/{serving_role}", cfg.mount),
            sign_verbatim: cfg.sign_verbatim,
            roots_file: cfg.roots_file.clone(),
            trust: RwLock::new(Arc::new(trust)),
            clock_skew: cfg.clock_skew,
            signing_validity: RwLock::new(initial_validity),
            metrics,
        })
    }

    /// [`VaultIssuer::new`], then learns the issuing CA's validity from
    /// `<mount>/ca/pem` (best effort: logged when Vault is not reachable yet;
    /// each signing updates it anyway).
    pub async fn connect(cfg: &VaultConfig) -> Result<Self, VaultConfigError> {
        let issuer = Self::new(cfg)?;
        if let Err(e) = issuer.refresh_signing_validity().await {
            tracing::warn!(error = %e, "could not read the Vault issuing CA yet");
        }
        Ok(issuer)
    }

    /// Reads the mount's issuing CA and records its validity.
    pub async fn refresh_signing_validity(&self) -> Result<SigningValidity, VaultError> {
        let pem = self
            .client
            .get_text(&format!("{}/ca/pem", self.mount))
            .await?;
        let der = pem_certs(pem.as_bytes())
            .map_err(VaultError::BadResponse)?
            .into_iter()
            .next()
            .ok_or_else(|| VaultError::BadResponse("no issuing CA certificate".into()))?;
        let v = cert_validity(&der)
            .ok_or_else(|| VaultError::BadResponse("issuing CA validity unreadable".into()))?;
        self.set_signing_validity(v);
        Ok(v)
    }

    fn set_signing_validity(&self, v: SigningValidity) {
        if let Ok(mut slot) = self.signing_validity.write() {
            *slot = v;
        }
    }

    /// Counters and the circuit gauge (register them with
    /// [`VaultMetrics::register`]).
    pub fn metrics(&self) -> &VaultMetrics {
        &self.metrics
    }

    /// True while Vault is considered down and requests fail fast.
    pub fn circuit_open(&self) -> bool {
        self.client.circuit_open()
    }

    async fn sign_request(&self, req: &IssueRequest) -> Result<IssuedChain, IssueError> {
        let now = OffsetDateTime::now_utc();
        let ttl = (req.not_after - now).whole_seconds();
        if ttl <= 0 {
            return Err(internal(format!(
                "validity window ended before signing ({ttl}s)"
            )));
        }
        let csr = crate::pem_encode("CERTIFICATE REQUEST", &req.csr_der);
        let id = req.spiffe_id.to_string();
        let body = if self.sign_verbatim {
            json!({
                "csr": csr,
                "ttl": format!("{ttl}s"),
                "format": "pem",
                "ext_key_usage": ["ServerAuth", "ClientAuth"],
            })
        } else {
            let mut body = json!({
                "csr": csr,
                "ttl": format!("{ttl}s"),
                "format": "pem",
                "uri_sans": id,
                "exclude_cn_from_sans": true,
            });
            if let (false, Some(obj)) = (req.dns_names.is_empty(), body.as_object_mut()) {
                obj.insert("alt_names".into(), json!(req.dns_names.join(",")));
            }
            body
        };
        let path = if req.dns_names.is_empty() {
            &self.sign_path
        } else {
            &self.serving_sign_path
        };
        let signed = self.client.sign(path, &body).await.map_err(|e| {
            tracing::warn!(%path, error = %e, "Vault did not sign");
            map_error(e)
        })?;
        self.accept(req, &signed, now, path)
    }

    /// The checks on Vault's answer; see [`check::check_issued`].
    fn accept(
        &self,
        req: &IssueRequest,
        signed: &SignedCert,
        now: OffsetDateTime,
        path: &str,
    ) -> Result<IssuedChain, IssueError> {
        let leaf = pem_certs(signed.certificate.as_bytes())
            .map_err(|e| internal(format!("certificate from Vault: {e}")))?;
        let [leaf] = <[_; 1]>::try_from(leaf)
            .map_err(|v| internal(format!("Vault returned {} leaf certificates", v.len())))?;
        let mut chain_pem = signed.ca_chain.join("\n");
        if signed.ca_chain.is_empty() {
            chain_pem.clone_from(&signed.issuing_ca);
        }
        let chain = pem_certs(chain_pem.as_bytes())
            .map_err(|e| internal(format!("CA chain from Vault: {e}")))?;
        // Vault's idea of the root is irrelevant: only the configured roots
        // anchor the chain and go to workloads.
        let trust = self.trust();
        let intermediates: Vec<CertificateDer<'static>> = chain
            .into_iter()
            .filter(|c| !trust.roots.contains(c) && !is_self_issued(c))
            .collect();

        let skew = time::Duration::try_from(self.clock_skew).unwrap_or(time::Duration::MINUTE);
        let id = req.spiffe_id.to_string();
        let expected = Expected {
            spiffe_id: &id,
            dns_names: &req.dns_names,
            public_key_spki: &req.spki_der,
            not_after_max: (req.not_after + skew).unix_timestamp(),
            not_before_max: (now + skew).unix_timestamp(),
            now: now.unix_timestamp(),
        };
        check_issued(&leaf, &intermediates, &trust.anchors, &expected).map_err(|r| {
            tracing::error!(
                spiffe_id = %req.spiffe_id,
                serial = %signed.serial_number,
                reason = %r,
                "refusing the certificate Vault returned"
            );
            internal(format!("refused the certificate Vault returned: {r}"))
        })?;
        if let Some(v) = intermediates.first().and_then(cert_validity) {
            self.set_signing_validity(v);
        }
        tracing::info!(
            spiffe_id = %req.spiffe_id,
            serial = %signed.serial_number,
            %path,
            "Vault signed"
        );
        Ok(IssuedChain {
            leaf,
            intermediates,
            roots: trust.roots.clone(),
        })
    }
}

impl Issuer for VaultIssuer {
    fn name(&self) -> &'static str {
        NAME
    }

    fn sign<'a>(&'a self, req: &'a IssueRequest) -> IssueFuture<'a> {
        Box::pin(async move {
            let result = self.sign_request(req).await;
            self.metrics.record(match &result {
                Ok(_) => Outcome::Signed,
                Err(IssueError::Refused { .. }) => Outcome::Refused,
                Err(IssueError::Unavailable { .. }) => Outcome::Unavailable,
                Err(IssueError::Internal { .. }) => Outcome::Failed,
            });
            result
        })
    }

    fn trust_anchors(&self) -> Vec<CertificateDer<'static>> {
        self.trust().roots.clone()
    }

    fn signing_validity(&self) -> SigningValidity {
        match self.signing_validity.read() {
            Ok(v) => *v,
            // Unreachable in practice (no panics while held); be conservative.
            Err(p) => *p.into_inner(),
        }
    }

    fn fetch_crl(&self) -> Option<crate::issuer::BackendFuture<'_, Vec<u8>>> {
        Some(Box::pin(async move {
            // Vault's CRL for the mount's issuer, PEM (`<mount>/crl/pem`,
            // unauthenticated like `ca/pem`).
            let pem = self
                .client
                .get_text(&format!("{}/crl/pem", self.mount))
                .await
                .map_err(|e| e.to_string())?;
            let parsed = pem::parse(pem.trim())
                .map_err(|e| format!("{}/crl/pem is not PEM: {e}", self.mount))?;
            if parsed.tag() != "X509 CRL" {
                return Err(format!(
                    "{}/crl/pem holds a {}, not an X509 CRL",
                    self.mount,
                    parsed.tag()
                ));
            }
            Ok(parsed.into_contents())
        }))
    }

    fn revoke_at_backend<'a>(
        &'a self,
        serial: &'a str,
    ) -> Option<crate::issuer::BackendFuture<'a, ()>> {
        Some(Box::pin(async move {
            // Vault names serials as colon-separated hex pairs.
            let padded = if serial.len() % 2 == 1 {
                format!("0{serial}")
            } else {
                serial.to_string()
            };
            let colons = padded
                .as_bytes()
                .chunks(2)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect::<Vec<_>>()
                .join(":");
            self.client
                .post_json(
                    &format!("{}/revoke", self.mount),
                    &serde_json::json!({ "serial_number": colons }),
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }))
    }
}

fn internal(reason: String) -> IssueError {
    IssueError::Internal {
        backend: NAME,
        reason,
    }
}

fn map_error(e: VaultError) -> IssueError {
    match e {
        VaultError::Unavailable(reason) => IssueError::Unavailable {
            backend: NAME,
            reason,
        },
        // The signer's own credentials are refused: nothing the workload did;
        // it should retry once an operator fixed the policy.
        VaultError::Refused {
            status: 401 | 403,
            message,
        } => IssueError::Unavailable {
            backend: NAME,
            reason: format!("the signer's Vault credentials are refused or unreadable: {message}"),
        },
        // The role forbids this request (e.g. a SAN outside allowed_uri_sans).
        VaultError::Refused {
            status: 400,
            message,
        } => IssueError::Refused {
            backend: NAME,
            reason: message,
        },
        other => internal(other.to_string()),
    }
}

/// All `CERTIFICATE` blocks of a PEM text, as DER.
/// Checks a `[ca.vault]` against the real Vault before a rollout
/// (`meshward-signer ca check-vault`): the files it names, a login with its
/// credentials, and the issuing CA of its PKI mount, which must chain to a
/// root of `roots_file`. Signs nothing. Returns the report, or the first
/// thing that would stop the signer.
pub async fn check(cfg: &VaultConfig) -> Result<String, String> {
    let issuer = VaultIssuer::new(cfg).map_err(|e| e.to_string())?;
    let mut out = describe(cfg).map_err(|e| e.to_string())?;
    issuer
        .client
        .check_login()
        .await
        .map_err(|e| format!("Vault {}: {e}", cfg.address))?;
    out.push_str("login: accepted\n");
    let pem = issuer
        .client
        .get_text(&format!("{}/ca/pem", cfg.mount))
        .await
        .map_err(|e| format!("{}/ca/pem: {e}", cfg.mount))?;
    let ca = pem_certs(pem.as_bytes())
        .ok()
        .and_then(|c| c.into_iter().next())
        .ok_or_else(|| format!("{}/ca/pem: no issuing CA certificate", cfg.mount))?;
    let (_, parsed) =
        X509Certificate::from_der(&ca).map_err(|e| format!("{}/ca/pem: {e}", cfg.mount))?;
    let trust = issuer.trust();
    let signed_by_root = trust.roots.iter().any(|r| {
        X509Certificate::from_der(r).is_ok_and(|(_, root)| {
            parsed.issuer().as_raw() == root.subject().as_raw()
                && parsed.verify_signature(Some(root.public_key())).is_ok()
        })
    });
    out.push_str(&format!(
        "issuing CA of {}: {} (not after {}) sha256 {}\n",
        cfg.mount,
        parsed.subject(),
        parsed.validity().not_after,
        crate::ledger::CertDigest::of(&ca)
    ));
    if trust.roots.contains(&ca) || signed_by_root {
        out.push_str("the issuing CA chains to a root of roots_file\n");
    } else {
        return Err(format!(
            "{out}the issuing CA of {} ({}) is not signed by any root of roots_file: \
             every certificate Vault signs would be refused",
            cfg.mount,
            parsed.subject()
        ));
    }
    Ok(out)
}

/// What a signer on `cfg` would use, as text for an operator (`ca status`
/// with the vault backend): where it asks Vault, how it logs in, and the
/// roots it trusts and hands out (from `roots_file`, read now), or why
/// `roots_file` would be refused. No call to Vault is made.
pub fn describe(cfg: &VaultConfig) -> Result<String, VaultConfigError> {
    let pem = std::fs::read(&cfg.roots_file).map_err(|source| VaultConfigError::Read {
        path: cfg.roots_file.clone(),
        source,
    })?;
    let roots = Roots::parse(&pem).map_err(|e| {
        VaultConfigError::Invalid(format!("roots_file {}: {e}", cfg.roots_file.display()))
    })?;
    let verb = if cfg.sign_verbatim {
        "sign-verbatim"
    } else {
        "sign"
    };
    let auth = match &cfg.auth {
        VaultAuthConfig::Token { token_file } => {
            format!("token from {}", token_file.display())
        }
        VaultAuthConfig::Approle { mount, .. } => format!("AppRole at auth/{mount}"),
        VaultAuthConfig::Kubernetes {
            mount,
            role,
            token_file,
        } => format!(
            "Kubernetes auth at auth/{mount}, role {role}, token from {}",
            token_file.display()
        ),
        VaultAuthConfig::Jwt {
            mount,
            role,
            token_file,
        } => format!(
            "JWT auth at auth/{mount}, role {role}, token from {}",
            token_file.display()
        ),
    };
    let mut out = format!(
        "Vault {}: signs with {}/{verb}/{}\nlogs in with {auth}\n",
        cfg.address, cfg.mount, cfg.role
    );
    for der in &roots.roots {
        match X509Certificate::from_der(der) {
            Ok((_, c)) => out.push_str(&format!(
                "trusted root: {} (not after {}) sha256 {}\n",
                c.subject(),
                c.validity().not_after,
                crate::ledger::CertDigest::of(der)
            )),
            Err(e) => out.push_str(&format!("trusted root: unparsable: {e}\n")),
        }
    }
    Ok(out)
}

fn pem_certs(pem_text: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let blocks = pem::parse_many(pem_text).map_err(|e| format!("not PEM: {e}"))?;
    Ok(blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect())
}

fn cert_validity(der: &CertificateDer<'_>) -> Option<SigningValidity> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(SigningValidity {
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
    })
}

fn is_self_issued(der: &CertificateDer<'_>) -> bool {
    X509Certificate::from_der(der)
        .map(|(_, c)| c.subject().as_raw() == c.issuer().as_raw())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal `[ca.vault]` with `auth` as its `[auth]` table's lines.
    fn with_auth(auth: &str) -> Result<VaultConfig, toml::de::Error> {
        toml::from_str(&format!(
            "address = \"https://vault.example:8200\"\nrole = \"istio\"\n\
             roots_file = \"/r.pem\"\n[auth]\n{auth}"
        ))
    }

    #[test]
    fn config_with_approle_parses_with_defaults() {
        let cfg: VaultConfig = toml::from_str(
            r#"
            address = "http://127.0.0.1:8200"
            role = "istio"
            roots_file = "/r.pem"
            [auth]
            method = "approle"
            role_id = "abc"
            secret_id_file = "/s"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.mount, "pki_int");
        assert_eq!(cfg.timeout, Duration::from_secs(10));
        assert!(
            matches!(cfg.auth, VaultAuthConfig::Approle { ref mount, .. } if mount == "approle")
        );
    }

    #[test]
    fn kubernetes_auth_defaults_to_the_pods_token_and_the_kubernetes_mount() {
        let cfg = with_auth("method = \"kubernetes\"\nrole = \"meshward-signer\"").unwrap();
        assert_eq!(
            cfg.auth,
            VaultAuthConfig::Kubernetes {
                mount: "kubernetes".into(),
                role: "meshward-signer".into(),
                token_file: "/var/run/secrets/kubernetes.io/serviceaccount/token".into(),
            }
        );
        let jwt = with_auth("method = \"jwt\"\nrole = \"meshward-signer\"").unwrap();
        assert!(matches!(jwt.auth, VaultAuthConfig::Jwt { ref mount, .. } if mount == "jwt"));
        // The token is only ever read from a file.
        assert!(with_auth("method = \"kubernetes\"\nrole = \"r\"\njwt = \"eyJ...\"").is_err());
    }

    #[test]
    fn config_with_unknown_keys_is_refused() {
        let r: Result<VaultConfig, _> = toml::from_str(
            r#"
            address = "http://127.0.0.1:8200"
            role = "istio"
            roots_file = "/r.pem"
            tls_skip_verify = true
            [auth]
            method = "token"
            token_file = "/t"
            "#,
        );
        assert!(r.is_err());
        let r: Result<VaultConfig, _> = toml::from_str(
            r#"
            address = "http://127.0.0.1:8200"
            role = "istio"
            roots_file = "/r.pem"
            [auth]
            method = "token"
            token = "s.inline-secret"
            "#,
        );
        assert!(r.is_err(), "tokens come from files, not from the config");
    }

    #[test]
    fn unknown_vault_errors_never_become_permission_denied_for_the_workload() {
        assert!(matches!(
            map_error(VaultError::Refused {
                status: 403,
                message: "permission denied".into()
            }),
            IssueError::Unavailable { .. }
        ));
        assert!(matches!(
            map_error(VaultError::Refused {
                status: 400,
                message: "URI SAN not allowed".into()
            }),
            IssueError::Refused { .. }
        ));
        assert!(matches!(
            map_error(VaultError::BadResponse("x".into())),
            IssueError::Internal { .. }
        ));
    }
}
