//! The ledger inside a running signer: `[ledger]` config, the store (the
//! replica's SQLite file, or a PostgreSQL database shared by every replica),
//! the pipeline observer, the admin lookup route, and the background task
//! that prunes by retention and refreshes the per-namespace gauges.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{
    Ledger, LedgerError, LedgerMetrics, LedgerObserver, PostgresLedger, PostgresOptions,
    PostgresTls, SqliteLedger, SqliteOptions, lookup_response,
};

/// Largest `[ledger] commit_delay` accepted (PostgreSQL's `commit_delay`
/// has the same ceiling).
pub const MAX_COMMIT_DELAY: Duration = Duration::from_millis(100);

/// `[ledger]`: the issuance ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// Record every issuance (default true). When false nothing is recorded
    /// and `/v1/certificates/{sha256}` answers 404 for everything.
    pub enabled: bool,
    /// SQLite file; default `<ca.data_dir>/ledger.sqlite`. Not with
    /// `[ledger.postgres]`.
    pub path: Option<PathBuf>,
    /// A PostgreSQL database shared by every replica, instead of the
    /// replica's own SQLite file.
    pub postgres: Option<PostgresConfig>,
    /// How long a record is kept after its certificate's notAfter.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often expired records are pruned and gauges refreshed.
    #[serde(with = "humantime_serde")]
    pub prune_interval: Duration,
    /// How long a write waits for a database lock before the issuance fails.
    #[serde(with = "humantime_serde")]
    pub busy_timeout: Duration,
    /// While issuances arrive concurrently, how long the writer gathers
    /// records before one group commit (one fsync for all of them); `0s`
    /// commits at once. At most [`MAX_COMMIT_DELAY`].
    #[serde(with = "humantime_serde")]
    pub commit_delay: Duration,
    /// Distinct namespace label values in metrics; more share `_other`.
    pub max_namespace_labels: usize,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: None,
            postgres: None,
            retention: Duration::from_secs(30 * 24 * 3600),
            prune_interval: Duration::from_secs(3600),
            busy_timeout: Duration::from_secs(5),
            commit_delay: Duration::from_millis(1),
            max_namespace_labels: 200,
        }
    }
}

/// `[ledger.postgres]`: the shared store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// libpq connection string (`host=db.example port=5432 user=meshward
    /// dbname=meshward`) or `postgres://meshward@db.example/meshward`; no
    /// password in it.
    pub url: String,
    /// File with the password (a mounted Secret).
    pub password_file: Option<PathBuf>,
    /// `verify-full` (default: TLS, the server's certificate checked against
    /// `ca_file` and the host name) or `disable`.
    pub tls: PostgresTlsMode,
    /// PEM roots for `tls = "verify-full"`.
    pub ca_file: Option<PathBuf>,
    /// Connections per replica.
    pub pool_size: usize,
    /// Bound on connecting and on waiting for a pooled connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Server-side bound on each statement.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// Bound on one group commit; past it the issuances in it fail.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// This replica's name in each row's `recorded_by`; default the host
    /// name (the pod name in a StatefulSet).
    pub replica: Option<String>,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            password_file: None,
            tls: PostgresTlsMode::VerifyFull,
            ca_file: None,
            pool_size: 8,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            replica: None,
        }
    }
}

/// `[ledger.postgres] tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PostgresTlsMode {
    /// TLS, server certificate verified (chain and host name).
    VerifyFull,
    /// Plain TCP.
    Disable,
}

impl PostgresConfig {
    /// The store's options, checked.
    pub fn options(&self, commit_delay: Duration) -> Result<PostgresOptions, LedgerError> {
        let err = |reason: String| LedgerError::Open {
            path: "[ledger.postgres]".to_string(),
            reason,
        };
        if self.url.trim().is_empty() {
            return Err(err("url is required".to_string()));
        }
        for (name, d) in [
            ("connect_timeout", self.connect_timeout),
            ("statement_timeout", self.statement_timeout),
            ("write_timeout", self.write_timeout),
        ] {
            if d.is_zero() {
                return Err(err(format!("{name} must be positive")));
            }
        }
        let tls = match (self.tls, &self.ca_file) {
            (PostgresTlsMode::VerifyFull, Some(ca_file)) => PostgresTls::VerifyFull {
                ca_file: ca_file.clone(),
            },
            (PostgresTlsMode::VerifyFull, None) => {
                return Err(err(
                    "tls = \"verify-full\" needs ca_file (the roots the server's certificate chains to); tls = \"disable\" connects in plain TCP".to_string(),
                ));
            }
            (PostgresTlsMode::Disable, Some(_)) => {
                return Err(err(
                    "ca_file is set but tls = \"disable\": the certificate would never be checked"
                        .to_string(),
                ));
            }
            (PostgresTlsMode::Disable, None) => PostgresTls::Disable,
        };
        let replica = match &self.replica {
            Some(name) => name.clone(),
            None => host_name().ok_or_else(|| {
                err("replica is not set and the host name cannot be read".to_string())
            })?,
        };
        Ok(PostgresOptions {
            url: self.url.clone(),
            password_file: self.password_file.clone(),
            tls,
            pool_size: self.pool_size,
            connect_timeout: self.connect_timeout,
            statement_timeout: self.statement_timeout,
            write_timeout: self.write_timeout,
            commit_delay,
            replica,
        })
    }
}

/// The host name (`HOSTNAME`, else the kernel's): in a StatefulSet, the pod
/// name.
pub(crate) fn host_name() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
}

/// serde for `Duration` as humantime text (`"30days"`, `"5s"`).
pub(crate) mod humantime_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("duration {text:?}: {e}")))
    }
}

/// The ledger of a running signer.
#[derive(Clone)]
pub struct LedgerService {
    ledger: Arc<dyn Ledger>,
    metrics: Arc<LedgerMetrics>,
}

impl std::fmt::Debug for LedgerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerService").finish_non_exhaustive()
    }
}

impl LedgerService {
    /// Open the store `config` describes (`data_dir` gives the default path).
    /// `None` when the ledger is disabled.
    pub async fn open(config: &LedgerConfig, data_dir: &Path) -> Result<Option<Self>, LedgerError> {
        if !config.enabled {
            return Ok(None);
        }
        if config.max_namespace_labels == 0 || config.prune_interval.is_zero() {
            return Err(LedgerError::Open {
                path: "[ledger]".to_string(),
                reason: "max_namespace_labels and prune_interval must be positive".to_string(),
            });
        }
        if config.commit_delay > MAX_COMMIT_DELAY {
            return Err(LedgerError::Open {
                path: "[ledger]".to_string(),
                reason: format!(
                    "commit_delay {} is above {} (every concurrent issuance waits it)",
                    humantime::format_duration(config.commit_delay),
                    humantime::format_duration(MAX_COMMIT_DELAY)
                ),
            });
        }
        let metrics = Arc::new(LedgerMetrics::new(config.max_namespace_labels));
        let store: Arc<dyn Ledger> = match &config.postgres {
            Some(pg) => {
                if config.path.is_some() {
                    return Err(LedgerError::Open {
                        path: "[ledger]".to_string(),
                        reason:
                            "path (a SQLite file) and [ledger.postgres] are both set; choose one"
                                .to_string(),
                    });
                }
                let opts = pg.options(config.commit_delay)?;
                let store = PostgresLedger::open(&opts, Some(metrics.clone())).await?;
                tracing::info!(
                    replica = %opts.replica,
                    tls = ?pg.tls,
                    retention = %humantime::format_duration(config.retention),
                    "issuance ledger open (PostgreSQL, shared by every replica)"
                );
                Arc::new(store)
            }
            None => {
                let path = config
                    .path
                    .clone()
                    .unwrap_or_else(|| data_dir.join("ledger.sqlite"));
                let store = SqliteLedger::open_observed(
                    &SqliteOptions {
                        path: path.clone(),
                        busy_timeout: config.busy_timeout,
                        commit_delay: config.commit_delay,
                    },
                    Some(metrics.clone()),
                )?;
                tracing::info!(path = %path.display(), retention = %humantime::format_duration(config.retention), "issuance ledger open (SQLite)");
                Arc::new(store)
            }
        };
        Ok(Some(Self::with_store(store, metrics)))
    }

    /// A service around any store.
    pub fn with_store(ledger: Arc<dyn Ledger>, metrics: Arc<LedgerMetrics>) -> Self {
        Self { ledger, metrics }
    }

    /// The store.
    pub fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.ledger
    }

    /// The metrics (register them in the signer's registry).
    pub fn metrics(&self) -> &Arc<LedgerMetrics> {
        &self.metrics
    }

    /// The pipeline observer that records every issuance before the response.
    pub fn observer(&self) -> Arc<LedgerObserver> {
        Arc::new(LedgerObserver::new(
            self.ledger.clone(),
            Some(self.metrics.clone()),
        ))
    }

    /// `GET /v1/certificates/{sha256}` for the admin router.
    pub fn routes(&self) -> Router {
        Router::new()
            .route("/v1/certificates/{sha256}", get(lookup))
            .with_state(self.ledger.clone())
    }

    /// Prune and refresh gauges now, then every `interval` until `shutdown`.
    pub fn spawn_maintenance(
        &self,
        retention: Duration,
        interval: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) -> JoinHandle<Result<(), String>> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                this.maintain(OffsetDateTime::now_utc(), retention).await;
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
                }
            }
        })
    }

    /// One maintenance pass at `now`.
    pub async fn maintain(&self, now: OffsetDateTime, retention: Duration) {
        match self.ledger.prune(now, retention).await {
            Ok(n) => {
                self.metrics.pruned(n);
                if n > 0 {
                    tracing::info!(pruned = n, "ledger records past retention deleted");
                }
            }
            Err(e) => tracing::warn!(error = %e, "ledger prune failed"),
        }
        // A recount that raced an issuance could drop it from the gauges
        // (they count each issuance as it is recorded); count again, and
        // after a few tries apply anyway — the next pass corrects it.
        for attempt in 1..=RECOUNT_ATTEMPTS {
            let generation = self.metrics.generation();
            match self.ledger.counts_by_namespace(now).await {
                Ok(counts) => {
                    if attempt == RECOUNT_ATTEMPTS {
                        self.metrics.set_counts(&counts);
                    } else if !self.metrics.set_counts_if_current(&counts, generation) {
                        continue;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "ledger counts failed"),
            }
            break;
        }
    }
}

/// Recounts tried while issuances keep racing them.
const RECOUNT_ATTEMPTS: u32 = 3;

async fn lookup(
    State(ledger): State<Arc<dyn Ledger>>,
    UrlPath(sha256): UrlPath<String>,
) -> impl IntoResponse {
    let (status, body) = lookup_response(ledger.as_ref(), &sha256).await;
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(body),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commit_delay_above_the_ceiling_is_refused_and_the_ceiling_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = LedgerConfig {
            commit_delay: MAX_COMMIT_DELAY + Duration::from_millis(1),
            ..LedgerConfig::default()
        };
        let err = LedgerService::open(&config, dir.path()).await.unwrap_err();
        assert!(err.to_string().contains("commit_delay 101ms"), "{err}");
        config.commit_delay = MAX_COMMIT_DELAY;
        assert!(
            LedgerService::open(&config, dir.path())
                .await
                .unwrap()
                .is_some()
        );
    }

    fn postgres(edit: impl FnOnce(&mut PostgresConfig)) -> Result<PostgresOptions, String> {
        let mut pg = PostgresConfig {
            url: "host=db.example user=meshward dbname=meshward".to_string(),
            ca_file: Some("/etc/meshward/db-ca.pem".into()),
            replica: Some("signer-0".to_string()),
            ..PostgresConfig::default()
        };
        edit(&mut pg);
        pg.options(Duration::from_millis(1))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn postgres_without_certificate_verification_must_be_asked_for_explicitly() {
        // The default verifies the server's certificate, so it needs roots.
        let err = postgres(|pg| pg.ca_file = None).unwrap_err();
        assert!(err.contains("needs ca_file"), "{err}");
        let opts = postgres(|_| {}).unwrap();
        assert_eq!(
            opts.tls,
            PostgresTls::VerifyFull {
                ca_file: "/etc/meshward/db-ca.pem".into()
            }
        );
        // Roots with TLS off would be a silent downgrade.
        let err = postgres(|pg| pg.tls = PostgresTlsMode::Disable).unwrap_err();
        assert!(err.contains("never be checked"), "{err}");
        let opts = postgres(|pg| {
            pg.tls = PostgresTlsMode::Disable;
            pg.ca_file = None;
        })
        .unwrap();
        assert_eq!(opts.tls, PostgresTls::Disable);
    }

    #[test]
    fn postgres_config_is_checked_before_connecting() {
        assert!(
            postgres(|pg| pg.url = " ".into())
                .unwrap_err()
                .contains("url is required")
        );
        assert!(
            postgres(|pg| pg.write_timeout = Duration::ZERO)
                .unwrap_err()
                .contains("write_timeout must be positive")
        );
        let parsed: LedgerConfig = toml::from_str(
            r#"
            [postgres]
            url = "postgres://meshward@db.example/meshward"
            tls = "verify-full"
            ca_file = "/ca.pem"
            pool_size = 4
            write_timeout = "3s"
            "#,
        )
        .unwrap();
        let pg = parsed.postgres.unwrap();
        assert_eq!(pg.pool_size, 4);
        assert_eq!(pg.write_timeout, Duration::from_secs(3));
        assert_eq!(pg.statement_timeout, Duration::from_secs(5));
        assert!(toml::from_str::<LedgerConfig>("[postgres]\nsslmode = \"require\"").is_err());
    }

    #[tokio::test]
    async fn sqlite_path_and_postgres_together_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = LedgerConfig {
            path: Some(dir.path().join("l.sqlite")),
            postgres: Some(PostgresConfig {
                url: "host=127.0.0.1 user=x".into(),
                tls: PostgresTlsMode::Disable,
                ..PostgresConfig::default()
            }),
            ..LedgerConfig::default()
        };
        let err = LedgerService::open(&config, dir.path()).await.unwrap_err();
        assert!(err.to_string().contains("choose one"), "{err}");
    }
}
