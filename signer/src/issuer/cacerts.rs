//! The `cacerts` backend: Istio's plugged-in CA, read from a directory.
//!
//! Layouts (the first whose key file exists wins):
//!
//! | Istio `cacerts` | kubernetes.io/tls Secret | role |
//! | --- | --- | --- |
//! | `ca-cert.pem` | `tls.crt` (first certificate) | signs leaves |
//! | `ca-key.pem` | `tls.key` | its key (PKCS#8, PKCS#1 or SEC1) |
//! | `cert-chain.pem` (optional) | rest of `tls.crt` | intermediates (+ root) |
//! | `root-cert.pem` | `ca.crt` | trust anchors |
//!
//! istiod's own CA Secret, `istio-ca-secret` (its self-signed root as
//! `ca-cert.pem` and `ca-key.pem`, the other files empty), loads as it is:
//! an empty or absent root file makes a self-signed `ca-cert.pem` its own
//! root, so a mesh moved from istiod's CA keeps its root and its mTLS.
//!
//! On load the files are validated ([`material::validate`]): key matches the
//! CA certificate, the CA may sign, the chain reaches the root. The directory
//! is polled ([`CaCertsIssuer::reload_if_changed`]); changed files are
//! validated the same way and swapped in atomically, and invalid new files
//! leave the current CA in service with a warning and
//! `meshward_signer_cacerts_reload_failures_total` incremented.

pub mod key;
pub mod material;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use self::material::{CaMaterial, MaterialError, PluggedInFiles, validate};
use super::{IssueError, IssueFuture, IssueRequest, IssuedChain, Issuer, SigningValidity};

const NAME: &str = "cacerts";

/// `[issuer.cacerts]` in the signer config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaCertsConfig {
    /// Directory with the plugged-in CA files (e.g. the mounted `cacerts` Secret).
    pub dir: PathBuf,
    /// How often the directory is checked for changes. Default 10s.
    #[serde(
        default = "default_reload_interval",
        with = "super::vault::human_duration"
    )]
    pub reload_interval: Duration,
}

fn default_reload_interval() -> Duration {
    Duration::from_secs(10)
}

/// Why the plugged-in CA could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CaCertsError {
    /// A file could not be read.
    #[error("cacerts {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Neither layout's key file is in the directory.
    #[error("cacerts {0}: neither ca-key.pem nor tls.key found")]
    NoLayout(PathBuf),
    /// The files are there but unusable.
    #[error("cacerts {dir}: {source}")]
    Invalid {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        source: MaterialError,
    },
}

/// Reads the plugged-in files of `dir` (either layout).
pub fn read_dir(dir: &Path) -> Result<PluggedInFiles, CaCertsError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|source| CaCertsError::Read { path, source })
    };
    let read_optional = |name: &str| match std::fs::read(dir.join(name)) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(CaCertsError::Read {
            path: dir.join(name),
            source,
        }),
    };
    if dir.join("ca-key.pem").exists() {
        Ok(PluggedInFiles {
            ca_cert: read("ca-cert.pem")?,
            ca_key: read("ca-key.pem")?,
            cert_chain: read_optional("cert-chain.pem")?,
            // Empty or absent in istiod's own istio-ca-secret.
            root_cert: read_optional("root-cert.pem")?,
        })
    } else if dir.join("tls.key").exists() {
        Ok(PluggedInFiles {
            ca_cert: read("tls.crt")?,
            ca_key: read("tls.key")?,
            cert_chain: Vec::new(),
            root_cert: read_optional("ca.crt")?,
        })
    } else {
        Err(CaCertsError::NoLayout(dir.to_path_buf()))
    }
}

/// What the signer would make of the plugged-in CA in `dir` at `now`, as
/// text for an operator (`meshward-signer ca check-cacerts`, `ca status`):
/// the signing CA, the chain above it, the roots workloads will trust, and
/// how long leaves can be issued; or why the files would be refused (then
/// a running signer keeps its current CA, and a starting one stops).
pub fn describe(dir: &Path, now: OffsetDateTime) -> Result<String, CaCertsError> {
    let files = read_dir(dir)?;
    let material = validate(&files, now).map_err(|source| CaCertsError::Invalid {
        dir: dir.to_path_buf(),
        source,
    })?;
    let layout = if dir.join("ca-key.pem").exists() {
        "Istio cacerts (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem)"
    } else {
        "kubernetes.io/tls (tls.crt, tls.key, ca.crt)"
    };
    let line = |what: &str, der: &CertificateDer<'_>| match x509_parser::parse_x509_certificate(der)
    {
        Ok((_, c)) => format!(
            "{what}: {} (not after {}) sha256 {}\n",
            c.subject(),
            c.validity().not_after,
            crate::ledger::CertDigest::of(der)
        ),
        Err(e) => format!("{what}: unparsable: {e}\n"),
    };
    let mut out = format!(
        "plugged-in CA in {}: usable\nlayout: {layout}\n",
        dir.display()
    );
    let signing = pem::parse_many(&files.ca_cert)
        .ok()
        .and_then(|b| b.into_iter().find(|b| b.tag() == "CERTIFICATE"))
        .map(|b| CertificateDer::from(b.into_contents()));
    if let Some(ca) = &signing {
        out.push_str(&line("signing CA", ca));
        if material.chain.is_empty() {
            out.push_str(
                "the signing CA is itself a root (as istiod's own istio-ca-secret): no intermediate is sent\n",
            );
        }
    }
    for der in material.chain.iter().skip(1) {
        out.push_str(&line("intermediate", der));
    }
    for der in &material.roots {
        out.push_str(&line("trusted root", der));
    }
    let until = material.validity.not_after;
    out.push_str(&format!(
        "leaves can be issued until {} ({} days from now); the signer never issues past it\n",
        until
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| until.to_string()),
        (until - now).whole_days()
    ));
    Ok(out)
}

fn digest(files: &PluggedInFiles) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [
        &files.ca_cert,
        &files.ca_key,
        &files.cert_chain,
        &files.root_cert,
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// Reload counters, registered by the caller.
#[derive(Debug, Clone, Default)]
pub struct CaCertsMetrics {
    /// Successful reloads of changed files.
    pub reloads: Counter,
    /// Changed files refused (the previous CA stays in service).
    pub reload_failures: Counter,
}

impl CaCertsMetrics {
    /// Adds the counters to `registry` under `cacerts_` (in the signer:
    /// `meshward_signer_cacerts_reloads_total`,
    /// `meshward_signer_cacerts_reload_failures_total`).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("cacerts");
        r.register(
            "reloads",
            "Plugged-in CA files reloaded after a change",
            self.reloads.clone(),
        );
        r.register(
            "reload_failures",
            "Changed plugged-in CA files refused; the previous CA stays in service",
            self.reload_failures.clone(),
        );
    }
}

/// What a reload check did.
#[derive(Debug)]
pub enum ReloadOutcome {
    /// Files unchanged since the last check.
    Unchanged,
    /// New files validated and now in service.
    Reloaded,
    /// New files refused; the previous CA stays in service.
    Kept(CaCertsError),
}

/// The `cacerts` issuer.
#[derive(Debug)]
pub struct CaCertsIssuer {
    dir: PathBuf,
    current: RwLock<Arc<CaMaterial>>,
    /// Digest of the files last looked at (valid or not), so a bad file is
    /// reported once, not on every poll.
    seen: Mutex<[u8; 32]>,
    metrics: CaCertsMetrics,
}

impl CaCertsIssuer {
    /// Loads and validates the directory; refuses to start on invalid files.
    pub fn load(cfg: &CaCertsConfig, now: OffsetDateTime) -> Result<Self, CaCertsError> {
        let files = read_dir(&cfg.dir)?;
        let material = validate(&files, now).map_err(|source| CaCertsError::Invalid {
            dir: cfg.dir.clone(),
            source,
        })?;
        tracing::info!(dir = %cfg.dir.display(), not_after = %material.validity.not_after, "loaded plugged-in CA");
        Ok(Self {
            dir: cfg.dir.clone(),
            current: RwLock::new(Arc::new(material)),
            seen: Mutex::new(digest(&files)),
            metrics: CaCertsMetrics::default(),
        })
    }

    /// The reload counters (register them with [`CaCertsMetrics::register`]).
    pub fn metrics(&self) -> &CaCertsMetrics {
        &self.metrics
    }

    fn material(&self) -> Arc<CaMaterial> {
        match self.current.read() {
            Ok(m) => Arc::clone(&m),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    /// Re-reads the directory; if the files changed, validates them and
    /// swaps them in, or keeps the current CA (warning + metric) when they
    /// are invalid or unreadable.
    pub fn reload_if_changed(&self, now: OffsetDateTime) -> ReloadOutcome {
        let files = match read_dir(&self.dir) {
            Ok(f) => f,
            Err(e) => {
                // Mid-update (a Secret volume swaps files through a symlink)
                // or removed: keep serving; report once per distinct state.
                let marker: [u8; 32] = Sha256::digest(e.to_string().as_bytes()).into();
                return self.refuse(marker, e);
            }
        };
        let d = digest(&files);
        if self.seen.lock().map(|s| *s == d).unwrap_or(false) {
            return ReloadOutcome::Unchanged;
        }
        match validate(&files, now) {
            Ok(material) => {
                tracing::info!(
                    dir = %self.dir.display(),
                    not_after = %material.validity.not_after,
                    "plugged-in CA files changed; new CA in service"
                );
                if let Ok(mut cur) = self.current.write() {
                    *cur = Arc::new(material);
                }
                if let Ok(mut s) = self.seen.lock() {
                    *s = d;
                }
                self.metrics.reloads.inc();
                ReloadOutcome::Reloaded
            }
            Err(source) => self.refuse(
                d,
                CaCertsError::Invalid {
                    dir: self.dir.clone(),
                    source,
                },
            ),
        }
    }

    fn refuse(&self, marker: [u8; 32], e: CaCertsError) -> ReloadOutcome {
        let new = self
            .seen
            .lock()
            .map(|mut s| {
                let new = *s != marker;
                *s = marker;
                new
            })
            .unwrap_or(true);
        if new {
            tracing::warn!(error = %e, "plugged-in CA files refused; keeping the CA in service");
            self.metrics.reload_failures.inc();
            ReloadOutcome::Kept(e)
        } else {
            ReloadOutcome::Unchanged
        }
    }

    /// Loads the directory and starts polling it every `reload_interval`
    /// (the poller stops once the issuer is dropped). Needs a Tokio runtime.
    pub fn start(cfg: &CaCertsConfig, now: OffsetDateTime) -> Result<Arc<Self>, CaCertsError> {
        let issuer = Arc::new(Self::load(cfg, now)?);
        drop(issuer.spawn_reloader(cfg.reload_interval));
        Ok(issuer)
    }

    /// Polls the directory every `interval` until the issuer is dropped or
    /// the returned task is aborted.
    pub fn spawn_reloader(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else {
                    return;
                };
                // File reads and signature checks off the async workers.
                let _ = tokio::task::spawn_blocking(move || {
                    me.reload_if_changed(OffsetDateTime::now_utc())
                })
                .await;
            }
        })
    }

    fn sign_now(&self, req: &IssueRequest) -> Result<IssuedChain, IssueError> {
        let m = self.material();
        if req.not_after > m.validity.not_after || req.not_before < m.validity.not_before {
            // The CA was replaced between policy and signing.
            return Err(IssueError::Unavailable {
                backend: NAME,
                reason: "the plugged-in CA changed during the request; retry".into(),
            });
        }
        let leaf = super::sign_leaf(req, &m.issuer).map_err(|reason| IssueError::Internal {
            backend: NAME,
            reason,
        })?;
        Ok(IssuedChain {
            leaf,
            intermediates: m.chain.clone(),
            roots: m.roots.clone(),
        })
    }
}

impl Issuer for CaCertsIssuer {
    fn name(&self) -> &'static str {
        NAME
    }

    fn sign<'a>(&'a self, req: &'a IssueRequest) -> IssueFuture<'a> {
        Box::pin(std::future::ready(self.sign_now(req)))
    }

    fn trust_anchors(&self) -> Vec<CertificateDer<'static>> {
        self.material().roots.clone()
    }

    fn signing_validity(&self) -> SigningValidity {
        self.material().validity
    }

    fn signs_crls(&self) -> bool {
        true
    }

    fn sign_crl(&self, crl: &super::CrlRequest) -> Result<Vec<u8>, String> {
        super::sign_crl_with(crl, &self.material().issuer)
    }
}
