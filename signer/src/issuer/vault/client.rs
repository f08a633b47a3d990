//! HTTP client for Vault / OpenBao: authentication (token with `renew-self`;
//! AppRole, Kubernetes or JWT auth with re-login), the PKI `sign` /
//! `sign-verbatim` call, per-attempt timeouts, retries with backoff and
//! jitter, and a circuit breaker so that a Vault outage costs callers one
//! fast `UNAVAILABLE`, not a hung request.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};

use super::backoff::Backoff;
use super::breaker::{Admission, Breaker};
use super::metrics::VaultMetrics;

/// How the client proves itself to Vault.
#[derive(Debug, Clone)]
pub enum Auth {
    /// A token read from a file (re-read on every (re)login, so a Vault Agent
    /// rotating the file is picked up); renewed with `auth/token/renew-self`.
    Token {
        /// File holding the token.
        file: PathBuf,
    },
    /// AppRole login at `auth/<mount>/login`; the token is replaced by a new
    /// login at half its TTL and whenever Vault rejects it.
    AppRole {
        /// Auth mount path (usually `approle`).
        mount: String,
        /// The role id (not secret).
        role_id: String,
        /// File holding the secret id.
        secret_id_file: PathBuf,
    },
    /// Kubernetes auth login at `auth/<mount>/login` with the service-account
    /// token from a file (re-read at every login); replaced like AppRole's.
    Kubernetes {
        /// Auth mount path (usually `kubernetes`).
        mount: String,
        /// The Vault role bound to the signer's service account.
        role: String,
        /// File holding the service-account token (JWT).
        token_file: PathBuf,
    },
    /// JWT auth login at `auth/<mount>/login`: the same request as
    /// [`Auth::Kubernetes`], to Vault's `jwt` method.
    Jwt {
        /// Auth mount path (usually `jwt`).
        mount: String,
        /// The Vault role (`role_type=jwt`).
        role: String,
        /// File holding the service-account token (JWT).
        token_file: PathBuf,
    },
}

/// Everything the client needs, already validated.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Base address, e.g. `https://vault.example:8200` (no trailing slash).
    pub address: String,
    /// `X-Vault-Namespace` header, when set.
    pub namespace: Option<String>,
    /// PEM CA certificates to trust for TLS to Vault (only these).
    pub ca_pem: Option<Vec<u8>>,
    /// Authentication.
    pub auth: Auth,
    /// Timeout of one HTTP request.
    pub attempt_timeout: Duration,
    /// Budget of one whole operation, retries and re-login included.
    pub timeout: Duration,
    /// Attempts per operation (1 = no retry).
    pub max_attempts: u32,
    /// Backoff between attempts.
    pub backoff: Backoff,
    /// Consecutive failures that open the circuit.
    pub failure_threshold: u32,
    /// How long the circuit stays open before one probe.
    pub open_for: Duration,
    /// Where logins, renewals and the circuit state are counted.
    pub metrics: VaultMetrics,
}

/// Why a call to Vault failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum VaultError {
    /// Vault is down, unreachable, sealed, timing out, or the circuit is open.
    #[error("Vault unavailable: {0}")]
    Unavailable(String),
    /// Vault answered and refused (4xx): role forbids it, permission denied...
    #[error("Vault refused ({status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Vault's `errors`.
        message: String,
    },
    /// Vault answered something that is not what the API promises.
    #[error("unexpected answer from Vault: {0}")]
    BadResponse(String),
    /// The client could not be set up (TLS CA, credentials file...).
    #[error("Vault client setup: {0}")]
    Setup(String),
}

/// The PKI engine's answer to `sign` / `sign-verbatim`.
#[derive(Debug, Clone, Deserialize)]
pub struct SignedCert {
    /// The leaf, PEM.
    pub certificate: String,
    /// The issuing CA, PEM.
    #[serde(default)]
    pub issuing_ca: String,
    /// The CA chain above the leaf, PEM each (may include the root).
    #[serde(default)]
    pub ca_chain: Vec<String>,
    /// Serial, `aa:bb:..`.
    #[serde(default)]
    pub serial_number: String,
}

#[derive(Debug, Clone)]
struct Token {
    value: String,
    renewable: bool,
    /// When to renew (token auth) or log in again (AppRole, Kubernetes);
    /// None = never.
    refresh_at: Option<Instant>,
}

/// One HTTP outcome, classified for the retry loop.
enum Failure {
    /// Transport error, timeout, 5xx, 429: retry, counts against the breaker.
    Transient(String),
    /// 401/403: the token is not (or no longer) good.
    Forbidden(String),
    /// Other 4xx: do not retry.
    Refused { status: u16, message: String },
    /// Unparsable 2xx.
    Bad(String),
}

/// A Vault client. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct VaultClient {
    http: reqwest::Client,
    settings: ClientSettings,
    token: tokio::sync::Mutex<Option<Token>>,
    breaker: Mutex<Breaker>,
}

impl VaultClient {
    /// Builds the client (no network I/O).
    pub fn new(settings: ClientSettings) -> Result<Self, VaultError> {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .timeout(settings.attempt_timeout)
            .connect_timeout(settings.attempt_timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("meshward-signer/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &settings.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| VaultError::Setup(format!("Vault CA bundle: {e}")))?;
            if certs.is_empty() {
                return Err(VaultError::Setup(
                    "Vault CA bundle holds no certificate".into(),
                ));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        } else if settings.address.starts_with("https://") {
            return Err(VaultError::Setup(
                "Vault address is https but no CA file is configured (ca_file)".into(),
            ));
        }
        let http = builder
            .build()
            .map_err(|e| VaultError::Setup(format!("HTTP client: {e}")))?;
        let breaker = Breaker::new(settings.failure_threshold, settings.open_for);
        Ok(Self {
            http,
            settings,
            token: tokio::sync::Mutex::new(None),
            breaker: Mutex::new(breaker),
        })
    }

    /// True while the circuit is open (Vault considered down).
    pub fn circuit_open(&self) -> bool {
        self.breaker.lock().map(|b| b.is_open()).unwrap_or(true)
    }

    /// `POST <mount>/sign/<role>` (or `sign-verbatim`) with `body`, within the
    /// configured budget, retrying transient failures and logging in again
    /// once when Vault rejects the token.
    pub async fn sign(&self, path: &str, body: &Value) -> Result<SignedCert, VaultError> {
        let op = self.authenticated_post(path, body);
        let data = match tokio::time::timeout(self.settings.timeout, op).await {
            Ok(r) => r?,
            Err(_) => {
                // The attempt in flight was cut short: that is a failure too.
                self.record(false);
                return Err(VaultError::Unavailable(format!(
                    "no answer within {:?}",
                    self.settings.timeout
                )));
            }
        };
        serde_json::from_value(data).map_err(|e| VaultError::BadResponse(format!("{path}: {e}")))
    }

    /// An authenticated `POST <path>` (e.g. `<mount>/revoke`) within the
    /// configured budget, with the same retries and re-login as signing;
    /// returns the answer's `data`.
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Value, VaultError> {
        match tokio::time::timeout(self.settings.timeout, self.authenticated_post(path, body)).await
        {
            Ok(r) => r,
            Err(_) => {
                self.record(false);
                Err(VaultError::Unavailable(format!(
                    "no answer within {:?}",
                    self.settings.timeout
                )))
            }
        }
    }

    /// Logs in now with the configured credentials (as the first signing
    /// would), within the configured budget; `Ok` once Vault accepted them.
    pub async fn check_login(&self) -> Result<(), VaultError> {
        match tokio::time::timeout(self.settings.timeout, self.current_token()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(Failure::Forbidden(m))) => Err(VaultError::Refused {
                status: 403,
                message: format!("login refused: {m}"),
            }),
            Ok(Err(Failure::Refused { status, message })) => {
                Err(VaultError::Refused { status, message })
            }
            Ok(Err(Failure::Bad(m))) => Err(VaultError::BadResponse(m)),
            Ok(Err(Failure::Transient(m))) => Err(VaultError::Unavailable(m)),
            Err(_) => Err(VaultError::Unavailable(format!(
                "no answer within {:?}",
                self.settings.timeout
            ))),
        }
    }

    /// Unauthenticated GET returning the raw body (e.g. `<mount>/ca_chain`).
    pub async fn get_text(&self, path: &str) -> Result<String, VaultError> {
        let op = async {
            self.admit()?;
            let resp = self
                .request(reqwest::Method::GET, path)
                .send()
                .await
                .map_err(|e| VaultError::Unavailable(transport_message(&e)))?;
            let status = resp.status();
            let text = resp
                .text()
                .await
                .map_err(|e| VaultError::Unavailable(transport_message(&e)))?;
            if status.is_success() {
                Ok(text)
            } else {
                Err(VaultError::Refused {
                    status: status.as_u16(),
                    message: vault_errors(&text),
                })
            }
        };
        tokio::time::timeout(self.settings.attempt_timeout, op)
            .await
            .map_err(|_| VaultError::Unavailable("timed out".into()))?
    }

    async fn authenticated_post(&self, path: &str, body: &Value) -> Result<Value, VaultError> {
        let mut retries = 0u32;
        let mut relogged = false;
        loop {
            self.admit()?;
            let outcome = match self.current_token().await {
                Ok(token) => self.post(path, Some(&token), body).await,
                Err(Failure::Forbidden(m)) => {
                    // Our credentials are refused at login: nothing to retry.
                    self.record(true);
                    return Err(VaultError::Refused {
                        status: 403,
                        message: format!("login refused: {m}"),
                    });
                }
                Err(f) => Err(f),
            };
            match outcome {
                Ok(v) => {
                    self.record(true);
                    return data_of(v);
                }
                Err(Failure::Forbidden(m)) => {
                    self.record(true);
                    if relogged {
                        return Err(VaultError::Refused {
                            status: 403,
                            message: m,
                        });
                    }
                    tracing::info!(path, reason = %m, "Vault rejected the token; logging in again");
                    relogged = true;
                    *self.token.lock().await = None;
                }
                Err(Failure::Refused { status, message }) => {
                    self.record(true);
                    return Err(VaultError::Refused { status, message });
                }
                Err(Failure::Bad(m)) => {
                    self.record(true);
                    return Err(VaultError::BadResponse(m));
                }
                Err(Failure::Transient(m)) => {
                    self.record(false);
                    retries += 1;
                    if retries >= self.settings.max_attempts || self.circuit_open() {
                        return Err(VaultError::Unavailable(m));
                    }
                    let delay = self.settings.backoff.delay(retries, rand::random::<f64>());
                    tracing::debug!(path, reason = %m, ?delay, "Vault call failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    fn admit(&self) -> Result<(), VaultError> {
        let mut breaker = self
            .breaker
            .lock()
            .map_err(|_| VaultError::Unavailable("circuit state poisoned".into()))?;
        match breaker.admit(Instant::now()) {
            Admission::Allowed => Ok(()),
            Admission::Rejected { retry_after } => Err(VaultError::Unavailable(format!(
                "circuit open after repeated failures; next probe in {retry_after:?}"
            ))),
        }
    }

    fn record(&self, reachable: bool) {
        if let Ok(mut b) = self.breaker.lock() {
            let was_open = b.is_open();
            if reachable {
                b.record_success();
            } else {
                b.record_failure(Instant::now());
            }
            let open = b.is_open();
            if open != was_open {
                if open {
                    tracing::warn!("Vault keeps failing; failing requests fast for a while");
                } else {
                    tracing::info!("Vault answers again");
                }
            }
            self.settings.metrics.set_circuit_open(open);
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let url = format!(
            "{}/v1/{}",
            self.settings.address,
            path.trim_start_matches('/')
        );
        let mut req = self
            .http
            .request(method, url)
            .header("X-Vault-Request", "true");
        if let Some(ns) = &self.settings.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        req
    }

    async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> Result<Value, Failure> {
        let mut req = self.request(reqwest::Method::POST, path).json(body);
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Failure::Transient(transport_message(&e)))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| Failure::Transient(transport_message(&e)))?;
        if status.is_success() {
            return serde_json::from_str(&text)
                .map_err(|e| Failure::Bad(format!("{path}: body is not JSON: {e}")));
        }
        let message = vault_errors(&text);
        Err(match status.as_u16() {
            401 | 403 => Failure::Forbidden(message),
            429 | 500..=599 => Failure::Transient(format!("{path}: HTTP {status}: {message}")),
            s => Failure::Refused { status: s, message },
        })
    }

    /// A token good to use now: the cached one, renewed or replaced when due.
    async fn current_token(&self) -> Result<String, Failure> {
        let mut slot = self.token.lock().await;
        let now = Instant::now();
        if let Some(t) = slot.as_ref() {
            match t.refresh_at {
                Some(at) if now >= at => {}
                _ => return Ok(t.value.clone()),
            }
            if matches!(self.settings.auth, Auth::Token { .. }) && t.renewable {
                match self.renew(&t.value).await {
                    Ok(renewed) => {
                        let value = renewed.value.clone();
                        *slot = Some(renewed);
                        return Ok(value);
                    }
                    Err(Failure::Transient(m)) => return Err(Failure::Transient(m)),
                    Err(e) => {
                        tracing::info!(
                            reason = %failure_text(&e),
                            "Vault token renewal refused; reading the token again"
                        );
                    }
                }
            }
        }
        *slot = None;
        let fresh = self.login().await?;
        let value = fresh.value.clone();
        *slot = Some(fresh);
        Ok(value)
    }

    async fn login(&self) -> Result<Token, Failure> {
        match &self.settings.auth {
            Auth::Token { file } => {
                let value = read_secret(file).map_err(Failure::Forbidden)?;
                let v = self.lookup_self(&value).await?;
                let data = v.get("data").cloned().unwrap_or(Value::Null);
                let ttl = data.get("ttl").and_then(Value::as_u64).unwrap_or(0);
                let renewable = data
                    .get("renewable")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                tracing::info!(ttl, renewable, "using Vault token");
                self.settings.metrics.logins.inc();
                Ok(token_with_ttl(value, renewable, ttl))
            }
            Auth::AppRole {
                mount,
                role_id,
                secret_id_file,
            } => {
                let secret_id = read_secret(secret_id_file).map_err(Failure::Forbidden)?;
                let body = json!({ "role_id": role_id, "secret_id": secret_id });
                self.login_at(mount, &body, "AppRole").await
            }
            Auth::Kubernetes {
                mount,
                role,
                token_file,
            }
            | Auth::Jwt {
                mount,
                role,
                token_file,
            } => {
                let jwt = read_secret(token_file).map_err(Failure::Forbidden)?;
                let body = json!({ "role": role, "jwt": jwt });
                let method = match &self.settings.auth {
                    Auth::Jwt { .. } => "JWT auth",
                    _ => "Kubernetes auth",
                };
                self.login_at(mount, &body, method).await
            }
        }
    }

    /// `auth/<mount>/login` with `body`; the answer's client token, replaced
    /// by a fresh login at half its TTL (never renewed: a login also resets
    /// the token's max TTL and re-reads the credential file).
    async fn login_at(&self, mount: &str, body: &Value, method: &str) -> Result<Token, Failure> {
        let v = self
            .post(&format!("auth/{mount}/login"), None, body)
            .await
            .map_err(|f| match f {
                // Bad credentials answer 400 (AppRole) or 403: a refusal.
                Failure::Refused { message, .. } => Failure::Forbidden(message),
                other => other,
            })?;
        let auth = v.get("auth").cloned().unwrap_or(Value::Null);
        let value = auth
            .get("client_token")
            .and_then(Value::as_str)
            .ok_or_else(|| Failure::Bad(format!("{method} login: no auth.client_token")))?
            .to_owned();
        let ttl = auth
            .get("lease_duration")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        tracing::info!(ttl, mount, "logged in to Vault with {method}");
        self.settings.metrics.logins.inc();
        Ok(token_with_ttl(value, false, ttl))
    }

    async fn lookup_self(&self, token: &str) -> Result<Value, Failure> {
        let resp = self
            .request(reqwest::Method::GET, "auth/token/lookup-self")
            .header("X-Vault-Token", token)
            .send()
            .await
            .map_err(|e| Failure::Transient(transport_message(&e)))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| Failure::Transient(transport_message(&e)))?;
        match status.as_u16() {
            200..=299 => {
                serde_json::from_str(&text).map_err(|e| Failure::Bad(format!("lookup-self: {e}")))
            }
            401 | 403 => Err(Failure::Forbidden(format!(
                "token refused: {}",
                vault_errors(&text)
            ))),
            429 | 500..=599 => Err(Failure::Transient(format!(
                "lookup-self: HTTP {status}: {}",
                vault_errors(&text)
            ))),
            s => Err(Failure::Refused {
                status: s,
                message: vault_errors(&text),
            }),
        }
    }

    async fn renew(&self, token: &str) -> Result<Token, Failure> {
        let v = self
            .post("auth/token/renew-self", Some(token), &json!({}))
            .await?;
        let auth = v.get("auth").cloned().unwrap_or(Value::Null);
        let ttl = auth
            .get("lease_duration")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let renewable = auth
            .get("renewable")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        tracing::debug!(ttl, "renewed Vault token");
        self.settings.metrics.renewals.inc();
        Ok(token_with_ttl(token.to_owned(), renewable, ttl))
    }
}

/// A token refreshed at half its TTL; TTL 0 means it does not expire.
fn token_with_ttl(value: String, renewable: bool, ttl_secs: u64) -> Token {
    let refresh_at = (ttl_secs > 0)
        .then(|| Instant::now() + Duration::from_millis(ttl_secs.saturating_mul(500)));
    Token {
        value,
        renewable,
        refresh_at,
    }
}

fn data_of(v: Value) -> Result<Value, VaultError> {
    match v {
        Value::Object(mut m) => m
            .remove("data")
            .filter(|d| d.is_object())
            .ok_or_else(|| VaultError::BadResponse("answer has no data object".into())),
        _ => Err(VaultError::BadResponse(
            "answer is not a JSON object".into(),
        )),
    }
}

fn read_secret(path: &std::path::Path) -> Result<String, String> {
    let s = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let s = s.trim();
    if s.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(s.to_owned())
}

/// Vault's `{"errors": [...]}` as one line (never echoes anything else).
fn vault_errors(body: &str) -> String {
    #[derive(Deserialize)]
    struct Errors {
        #[serde(default)]
        errors: Vec<String>,
    }
    match serde_json::from_str::<Errors>(body) {
        Ok(e) if !e.errors.is_empty() => e.errors.join("; ").replace('\n', " "),
        _ => "no error message".to_owned(),
    }
}

fn transport_message(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut msg = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "cannot connect".to_owned()
    } else {
        "transport error".to_owned()
    };
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

fn failure_text(f: &Failure) -> String {
    match f {
        Failure::Transient(m) | Failure::Forbidden(m) | Failure::Bad(m) => m.clone(),
        Failure::Refused { status, message } => format!("HTTP {status}: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vault_error_bodies_are_reduced_to_their_messages() {
        assert_eq!(
            vault_errors(r#"{"errors":["permission denied","invalid token"]}"#),
            "permission denied; invalid token"
        );
        assert_eq!(vault_errors("<html>proxy error</html>"), "no error message");
    }

    #[test]
    fn answers_without_a_data_object_are_bad_responses() {
        assert!(data_of(json!({"data": {"certificate": "x"}})).is_ok());
        assert!(matches!(
            data_of(json!({"data": null})),
            Err(VaultError::BadResponse(_))
        ));
        assert!(matches!(
            data_of(json!([1])),
            Err(VaultError::BadResponse(_))
        ));
    }

    #[test]
    fn https_without_a_ca_file_is_a_setup_error() {
        let settings = ClientSettings {
            address: "https://vault.example:8200".into(),
            namespace: None,
            ca_pem: None,
            auth: Auth::Token {
                file: "/nonexistent".into(),
            },
            attempt_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            max_attempts: 1,
            backoff: Backoff {
                initial: Duration::from_millis(10),
                max: Duration::from_millis(10),
            },
            failure_threshold: 1,
            open_for: Duration::from_secs(1),
            metrics: VaultMetrics::default(),
        };
        assert!(matches!(
            VaultClient::new(settings),
            Err(VaultError::Setup(_))
        ));
    }
}
