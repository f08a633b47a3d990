//! Revocation in a running signer: `[revocation]`, the CRL it publishes,
//! the admin routes, and `ca revoke` / `ca unrevoke` / `ca revocations`.
//!
//! Revocations live in the ledger ([`crate::ledger::revocation`]), so
//! every replica sharing a PostgreSQL ledger sees one the moment it
//! commits: a revoked client certificate is refused as a renewal
//! credential on the next request, and the filter's ledger lookup reports
//! it. The CRL is built from the same rows by a task that reads them every
//! `crl_check_interval` and re-issues the CRL when they changed, and
//! anyway once half of `crl_validity` has passed (so `nextUpdate` is never
//! reached while the signer runs). A CRL that cannot be built or signed is
//! logged and counted (`meshward_signer_crl_failures_total`) and the last
//! good one stays published; issuance, rotation and bundle publication do
//! not wait for it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use x509_parser::prelude::FromDer;

use crate::issuer::{CrlEntry, CrlRequest, Issuer};
use crate::ledger::service::humantime_serde;
use crate::ledger::{
    Ledger, LedgerError, Revocation, RevocationReason, RevocationTarget, RevocationView,
};

/// File name of the CRL in the directory sink and the key of the
/// `istio-ca-crl` ConfigMap (what Istio's sidecars mount).
pub const CRL_PEM: &str = "ca-crl.pem";
/// Name of Istio's CRL ConfigMap.
pub const CRL_CONFIGMAP_NAME: &str = "istio-ca-crl";
/// Shortest `crl_validity`.
pub const MIN_CRL_VALIDITY: Duration = Duration::from_secs(60);

/// `[revocation]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RevocationConfig {
    /// Publish a CRL (builtin and cacerts backends; with Vault, Vault's own
    /// CRL is the one to use). Revocation itself needs only the ledger.
    pub crl: bool,
    /// `nextUpdate - thisUpdate` of each CRL; a new one is issued when half
    /// of it has passed. Relying parties refuse a CRL past its nextUpdate,
    /// so this bounds how long a signer outage keeps the last CRL usable.
    #[serde(with = "humantime_serde")]
    pub crl_validity: Duration,
    /// How often the revocations are read for a new CRL: the bound on how
    /// long a revocation takes to reach `/v1/crl` and the directory sink.
    #[serde(with = "humantime_serde")]
    pub crl_check_interval: Duration,
    /// Also write `ca-crl.pem` here (default: `[bundle] dir`, next to
    /// `root-cert.pem`).
    pub crl_dir: Option<PathBuf>,
}

impl Default for RevocationConfig {
    fn default() -> Self {
        Self {
            crl: true,
            crl_validity: Duration::from_secs(24 * 3600),
            crl_check_interval: Duration::from_secs(5),
            crl_dir: None,
        }
    }
}

impl RevocationConfig {
    /// The settings, checked.
    pub fn validate(&self) -> Result<(), String> {
        if self.crl_validity < MIN_CRL_VALIDITY {
            return Err(format!(
                "revocation.crl_validity {} is below {}",
                humantime::format_duration(self.crl_validity),
                humantime::format_duration(MIN_CRL_VALIDITY)
            ));
        }
        if self.crl_check_interval.is_zero() || self.crl_check_interval * 2 > self.crl_validity {
            return Err(
                "revocation.crl_check_interval must be positive and at most half of crl_validity"
                    .to_string(),
            );
        }
        Ok(())
    }
}

/// One published CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedCrl {
    /// DER.
    pub der: Vec<u8>,
    /// PEM (`X509 CRL`).
    pub pem: String,
    /// thisUpdate.
    pub this_update: OffsetDateTime,
    /// nextUpdate.
    pub next_update: OffsetDateTime,
    /// cRLNumber.
    pub number: u64,
    /// Entries in it.
    pub entries: usize,
    /// The revocations it lists (digest + reason), to tell whether a new
    /// one is needed.
    listed: Vec<(crate::ledger::CertDigest, RevocationReason)>,
}

impl PublishedCrl {}

/// The CRL metrics.
#[derive(Debug, Clone, Default)]
pub struct CrlMetrics {
    revocations: Gauge,
    entries: Gauge,
    next_update: Gauge,
    published: Counter,
    failures: Counter,
}

impl CrlMetrics {
    /// Register under the signer's prefix.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "revocations",
            "Unexpired revoked certificates in the ledger",
            self.revocations.clone(),
        );
        registry.register(
            "crl_entries",
            "Entries in the published CRL",
            self.entries.clone(),
        );
        registry.register(
            "crl_next_update_timestamp_seconds",
            "nextUpdate of the published CRL (Unix seconds)",
            self.next_update.clone(),
        );
        registry.register(
            "crl_published",
            "CRLs signed and published",
            self.published.clone(),
        );
        registry.register(
            "crl_failures",
            "CRLs that could not be read, built or signed (the last good one stays published)",
            self.failures.clone(),
        );
    }
}

/// Builds and publishes the CRL.
#[derive(Clone)]
pub struct CrlPublisher {
    issuer: Arc<dyn Issuer>,
    ledger: Arc<dyn Ledger>,
    config: RevocationConfig,
    dir: Option<PathBuf>,
    metrics: CrlMetrics,
    current: watch::Sender<Option<Arc<PublishedCrl>>>,
    configmaps: Option<crate::bundle::configmap::ConfigMapSink>,
}

impl std::fmt::Debug for CrlPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrlPublisher")
            .field("issuer", &self.issuer.name())
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Why one CRL pass failed.
#[derive(Debug, thiserror::Error)]
pub enum CrlError {
    /// The ledger could not list the revocations.
    #[error("reading the revocations: {0}")]
    Ledger(#[from] LedgerError),
    /// A serial in the ledger is not hex.
    #[error("revocation of {sha256} has a serial that is not hex: {serial:?}")]
    Serial {
        /// The certificate.
        sha256: String,
        /// The stored serial.
        serial: String,
    },
    /// The issuer could not sign it.
    #[error("signing the CRL: {0}")]
    Sign(String),
    /// The directory sink could not be written.
    #[error("writing {path}: {reason}")]
    Write {
        /// The file.
        path: String,
        /// What failed.
        reason: String,
    },
}

impl CrlPublisher {
    /// A publisher for `issuer`'s CRL from `ledger`'s revocations, also
    /// written into `dir` when given.
    pub fn new(
        issuer: Arc<dyn Issuer>,
        ledger: Arc<dyn Ledger>,
        config: RevocationConfig,
        dir: Option<PathBuf>,
        metrics: CrlMetrics,
    ) -> Self {
        Self {
            issuer,
            ledger,
            config,
            dir,
            metrics,
            current: watch::channel(None).0,
            configmaps: None,
        }
    }

    /// Also write each CRL as the `istio-ca-crl` ConfigMap (key
    /// `ca-crl.pem`) into the namespaces `sink` selects (`[bundle.configmap]`).
    pub fn with_configmaps(mut self, sink: crate::bundle::configmap::ConfigMapSink) -> Self {
        self.configmaps = Some(sink.for_crl());
        self
    }

    /// The CRL published now, if one is.
    pub fn current(&self) -> Option<Arc<PublishedCrl>> {
        self.current.borrow().clone()
    }

    /// Changes of the published CRL.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<PublishedCrl>>> {
        self.current.subscribe()
    }

    /// One pass at `now`: read the revocations; if they differ from the
    /// published CRL's, or half its validity has passed, sign and publish
    /// a new one. Returns whether a new CRL was published. A failure keeps
    /// the old CRL and is counted; the caller only logs it.
    pub async fn refresh(&self, now: OffsetDateTime) -> Result<bool, CrlError> {
        let result = self.try_refresh(now).await;
        if result.is_err() {
            self.metrics.failures.inc();
        }
        result
    }

    async fn try_refresh(&self, now: OffsetDateTime) -> Result<bool, CrlError> {
        let revocations = self.ledger.revocations(now).await?;
        self.metrics
            .revocations
            .set(i64::try_from(revocations.len()).unwrap_or(i64::MAX));
        let listed: Vec<_> = revocations.iter().map(|r| (r.sha256, r.reason)).collect();
        let previous = self.current();
        if !self.issuer.signs_crls() {
            return self.refresh_from_backend(previous).await;
        }
        if let Some(p) = &previous {
            let half = (p.next_update - p.this_update) / 2;
            if p.listed == listed && now < p.this_update + half {
                return Ok(false);
            }
        }
        let validity =
            time::Duration::try_from(self.config.crl_validity).unwrap_or(time::Duration::days(1));
        // Strictly growing across passes and restarts: milliseconds of
        // thisUpdate, or one more than the last.
        let millis = u64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        let number = previous
            .as_ref()
            .map_or(millis, |p| millis.max(p.number.saturating_add(1)));
        let request = crl_request(&revocations, now, now + validity, number)?;
        let der = self.issuer.sign_crl(&request).map_err(CrlError::Sign)?;
        let pem = crate::pem_encode("X509 CRL", &der);
        let entries = listed.len();
        self.publish(
            PublishedCrl {
                der,
                pem,
                this_update: now,
                next_update: request.next_update,
                number,
                entries,
                listed,
            },
            entries,
        )
        .await
    }

    /// A backend that publishes its own CRL (Vault): fetch it, publish it
    /// when it changed. `ca revoke` revoked at the backend too.
    async fn refresh_from_backend(
        &self,
        previous: Option<Arc<PublishedCrl>>,
    ) -> Result<bool, CrlError> {
        let Some(fetch) = self.issuer.fetch_crl() else {
            return Err(CrlError::Sign(format!(
                "the {} backend neither signs nor publishes a CRL",
                self.issuer.name()
            )));
        };
        let der = fetch.await.map_err(CrlError::Sign)?;
        if previous.as_ref().is_some_and(|p| p.der == der) {
            return Ok(false);
        }
        let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der)
            .map_err(|e| CrlError::Sign(format!("the backend's CRL does not parse: {e}")))?;
        let to_time = |t: x509_parser::time::ASN1Time| t.to_datetime();
        let this_update = to_time(crl.last_update());
        let next_update = crl.next_update().map_or(this_update, to_time);
        let entries = crl.iter_revoked_certificates().count();
        let number = crl
            .crl_number()
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or_default();
        self.publish(
            PublishedCrl {
                pem: crate::pem_encode("X509 CRL", &der),
                der,
                this_update,
                next_update,
                number,
                entries,
                // The backend's entries, not the ledger's: its bytes are compared.
                listed: Vec::new(),
            },
            entries,
        )
        .await
    }

    /// Write the directory sink, update the metrics, and publish.
    async fn publish(&self, published: PublishedCrl, entries: usize) -> Result<bool, CrlError> {
        if let Some(dir) = &self.dir {
            let (dir, data) = (dir.clone(), published.pem.clone());
            tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| e.to_string())
                    .and_then(|()| crate::bundle::dir::write_atomic(&dir, CRL_PEM, data.as_bytes()))
                    .map_err(|reason| CrlError::Write {
                        path: dir.join(CRL_PEM).display().to_string(),
                        reason,
                    })
            })
            .await
            .map_err(|e| CrlError::Write {
                path: CRL_PEM.to_string(),
                reason: format!("blocking task failed: {e}"),
            })??;
        }
        self.metrics
            .entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
        self.metrics
            .next_update
            .set(published.next_update.unix_timestamp());
        if let Some(sink) = &self.configmaps {
            // Best effort per namespace, like the root ConfigMaps: a failure
            // is counted and the next change (or half-life re-sign) retries.
            match sink.sync_pem(&published.pem).await {
                Ok(report) if report.failed.is_empty() => {}
                Ok(report) => {
                    self.metrics.failures.inc();
                    tracing::warn!(failed = ?report.failed, "istio-ca-crl not written in every namespace");
                }
                Err(e) => {
                    self.metrics.failures.inc();
                    tracing::warn!(error = %e, "istio-ca-crl ConfigMaps not written");
                }
            }
        }
        self.metrics.published.inc();
        tracing::info!(
            entries,
            number = published.number,
            next_update = %published.next_update,
            "CRL published"
        );
        self.current.send_replace(Some(Arc::new(published)));
        Ok(true)
    }

    /// [`CrlPublisher::refresh`] now and every `crl_check_interval` until
    /// `shutdown`.
    pub fn spawn(&self, mut shutdown: watch::Receiver<bool>) -> JoinHandle<Result<(), String>> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = this.refresh(OffsetDateTime::now_utc()).await {
                    tracing::error!(
                        error = %e,
                        "CRL not published (the previous one, if any, stays; issuance is not affected)"
                    );
                }
                tokio::select! {
                    _ = tokio::time::sleep(this.config.crl_check_interval) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
                }
            }
        })
    }
}

/// The CRL for `revocations`.
pub fn crl_request(
    revocations: &[Revocation],
    this_update: OffsetDateTime,
    next_update: OffsetDateTime,
    number: u64,
) -> Result<CrlRequest, CrlError> {
    let entries = revocations
        .iter()
        .map(|r| {
            Ok(CrlEntry {
                serial: hex::decode(&r.serial).map_err(|_| CrlError::Serial {
                    sha256: r.sha256.to_hex(),
                    serial: r.serial.clone(),
                })?,
                revoked_at: r.revoked_at,
                reason: r.reason,
            })
        })
        .collect::<Result<_, CrlError>>()?;
    Ok(CrlRequest {
        this_update,
        next_update,
        number,
        entries,
    })
}

/// What the admin routes read.
#[derive(Clone)]
struct RoutesState {
    crl: Option<CrlPublisher>,
    ledger: Arc<dyn Ledger>,
    why_no_crl: &'static str,
}

/// `GET /v1/crl` (DER, `application/pkix-crl`), `/v1/crl.pem`, and
/// `/v1/revocations` (JSON list) for the admin router. Without a CRL
/// (`crl = false`, or a backend that signs none) the CRL routes answer 404
/// saying why.
pub fn routes(
    crl: Option<CrlPublisher>,
    ledger: Arc<dyn Ledger>,
    why_no_crl: &'static str,
) -> Router {
    Router::new()
        .route("/v1/crl", get(crl_der))
        .route("/v1/crl.pem", get(crl_pem))
        .route("/v1/revocations", get(list))
        .with_state(RoutesState {
            crl,
            ledger,
            why_no_crl,
        })
}

fn no_crl(state: &RoutesState) -> Response {
    let (status, why) = match &state.crl {
        None => (StatusCode::NOT_FOUND, state.why_no_crl),
        Some(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no CRL signed yet (see the signer's log and meshward_signer_crl_failures_total)",
        ),
    };
    (status, axum::Json(serde_json::json!({ "error": why }))).into_response()
}

async fn crl_der(State(state): State<RoutesState>) -> Response {
    match state.crl.as_ref().and_then(CrlPublisher::current) {
        Some(c) => (
            [
                (header::CONTENT_TYPE, "application/pkix-crl"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            c.der.clone(),
        )
            .into_response(),
        None => no_crl(&state),
    }
}

async fn crl_pem(State(state): State<RoutesState>) -> Response {
    match state.crl.as_ref().and_then(CrlPublisher::current) {
        Some(c) => (
            [
                (header::CONTENT_TYPE, "application/x-pem-file"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            c.pem.clone(),
        )
            .into_response(),
        None => no_crl(&state),
    }
}

async fn list(State(state): State<RoutesState>) -> Response {
    match state.ledger.revocations(OffsetDateTime::now_utc()).await {
        Ok(list) => {
            axum::Json(list.iter().map(RevocationView::from).collect::<Vec<_>>()).into_response()
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({ "error": e.to_string() })),
        )
            .into_response(),
    }
}

/// `ca revoke`, `ca unrevoke`, `ca revocations`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum RevocationCommand {
    /// Revoke certificates the ledger recorded: one by digest or serial, or
    /// every unexpired certificate of a SPIFFE ID issued up to now (later
    /// ones stay valid). Every replica sharing the ledger refuses them as
    /// renewal credentials at once; the CRL and the filter's ledger lookups
    /// follow within `revocation.crl_check_interval` / `ledger.cacheTtl`.
    Revoke {
        #[command(flatten)]
        target: TargetArgs,
        /// RFC 5280 reason.
        #[arg(long, value_enum, default_value_t = RevocationReason::Unspecified)]
        reason: RevocationReason,
    },
    /// Clear revocations (the next CRL no longer lists them).
    Unrevoke {
        #[command(flatten)]
        target: TargetArgs,
    },
    /// List the revocations of unexpired certificates.
    Revocations {
        /// `text` (a table) or `json`.
        #[arg(long, short = 'o', value_enum, default_value_t = ListFormat::Text)]
        output: ListFormat,
    },
}

/// Exactly one way to name certificates.
#[derive(Debug, Clone, clap::Args)]
#[group(required = true, multiple = false)]
pub struct TargetArgs {
    /// SHA-256 of the certificate's DER (64 hex digits; what Envoy reports
    /// as `connection.sha256_peer_certificate_digest`).
    #[arg(long)]
    pub sha256: Option<String>,
    /// Serial number in hex (`openssl x509 -serial`; colons and a `0x`
    /// prefix are accepted).
    #[arg(long)]
    pub serial: Option<String>,
    /// A SPIFFE ID: every certificate of it.
    #[arg(long)]
    pub spiffe_id: Option<String>,
}

impl TargetArgs {
    /// The target, checked.
    pub fn target(&self) -> Result<RevocationTarget, String> {
        match (&self.sha256, &self.serial, &self.spiffe_id) {
            (Some(d), None, None) => d
                .trim()
                .to_ascii_lowercase()
                .parse()
                .map(RevocationTarget::Sha256)
                .map_err(|e| format!("--sha256: {e}")),
            (None, Some(s), None) => RevocationTarget::serial(s).map_err(|e| e.to_string()),
            (None, None, Some(id)) => RevocationTarget::spiffe_id(id).map_err(|e| e.to_string()),
            _ => Err("give exactly one of --sha256, --serial, --spiffe-id".to_string()),
        }
    }
}

/// `ca revocations -o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ListFormat {
    /// One line per revocation.
    Text,
    /// A JSON array of revocations.
    Json,
}

/// Run a [`RevocationCommand`] against `ledger` at `now`; returns what to
/// print, or an error for a revoke that matched nothing (non-zero exit).
pub async fn run(
    cmd: &RevocationCommand,
    ledger: &dyn Ledger,
    backend: Option<&dyn Issuer>,
    now: OffsetDateTime,
) -> Result<String, String> {
    use std::fmt::Write;
    match cmd {
        RevocationCommand::Revoke { target, reason } => {
            let target = target.target()?;
            let revoked = ledger
                .revoke(&target, *reason, now)
                .await
                .map_err(|e| e.to_string())?;
            if revoked.is_empty() {
                return Err(format!(
                    "no unexpired certificate in the ledger matches {target}: nothing revoked"
                ));
            }
            for r in &revoked {
                tracing::warn!(
                    sha256 = %r.sha256,
                    serial = %r.serial,
                    spiffe_id = %r.spiffe_id,
                    reason = %r.reason,
                    "certificate revoked"
                );
            }
            let mut out = format!(
                "revoked {} certificate(s) matching {target}:\n",
                revoked.len()
            );
            for r in &revoked {
                let _ = writeln!(out, "{}", line(r));
            }
            // A backend with revocations of its own (Vault) hears of each,
            // so its CRL lists them. The ledger's revocation stands either
            // way; a failure here is reported (non-zero exit) to be re-run.
            let mut failed = Vec::new();
            for r in &revoked {
                let Some((b, call)) =
                    backend.and_then(|b| b.revoke_at_backend(&r.serial).map(|c| (b, c)))
                else {
                    continue;
                };
                match call.await {
                    Ok(()) => {
                        let _ = writeln!(
                            out,
                            "  revoked at the {} backend too: serial {}",
                            b.name(),
                            r.serial
                        );
                    }
                    Err(e) => failed.push(format!("serial {}: {e}", r.serial)),
                }
            }
            if !failed.is_empty() {
                return Err(format!(
                    "{out}revoked in the ledger, but the backend refused: {} (run ca revoke again)",
                    failed.join("; ")
                ));
            }
            Ok(out)
        }
        RevocationCommand::Unrevoke { target } => {
            let target = target.target()?;
            let n = ledger.unrevoke(&target).await.map_err(|e| e.to_string())?;
            tracing::warn!(%target, cleared = n, "revocations cleared");
            let mut out = format!("cleared {n} revocation(s) matching {target}\n");
            if backend.is_some_and(|b| !b.signs_crls()) {
                out.push_str(
                    "note: the backend's own CRL (Vault) cannot be cleared; it lists the certificate \
                     until it expires. The signer and the filter accept it again.\n",
                );
            }
            Ok(out)
        }
        RevocationCommand::Revocations { output } => {
            let list = ledger.revocations(now).await.map_err(|e| e.to_string())?;
            Ok(match output {
                ListFormat::Json => {
                    let views: Vec<_> = list.iter().map(RevocationView::from).collect();
                    let mut text =
                        serde_json::to_string_pretty(&views).map_err(|e| e.to_string())?;
                    text.push('\n');
                    text
                }
                ListFormat::Text => {
                    let mut out =
                        format!("{} revocation(s) of unexpired certificates\n", list.len());
                    for r in &list {
                        let _ = writeln!(out, "{}", line(r));
                    }
                    out
                }
            })
        }
    }
}

fn line(r: &Revocation) -> String {
    format!(
        "  {}  serial {}  {}  revoked {}  ({})  expires {}",
        r.sha256, r.serial, r.spiffe_id, r.revoked_at, r.reason, r.not_after
    )
}
