//! The ledger inside a running signer: `[ledger]` config, the SQLite store,
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
    Ledger, LedgerError, LedgerMetrics, LedgerObserver, SqliteLedger, SqliteOptions,
    lookup_response,
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
    /// SQLite file; default `<ca.data_dir>/ledger.sqlite`.
    pub path: Option<PathBuf>,
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
            retention: Duration::from_secs(30 * 24 * 3600),
            prune_interval: Duration::from_secs(3600),
            busy_timeout: Duration::from_secs(5),
            commit_delay: Duration::from_millis(1),
            max_namespace_labels: 200,
        }
    }
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
    pub fn open(config: &LedgerConfig, data_dir: &Path) -> Result<Option<Self>, LedgerError> {
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
        let path = config
            .path
            .clone()
            .unwrap_or_else(|| data_dir.join("ledger.sqlite"));
        let metrics = Arc::new(LedgerMetrics::new(config.max_namespace_labels));
        let store = SqliteLedger::open_observed(
            &SqliteOptions {
                path: path.clone(),
                busy_timeout: config.busy_timeout,
                commit_delay: config.commit_delay,
            },
            Some(metrics.clone()),
        )?;
        tracing::info!(path = %path.display(), retention = %humantime::format_duration(config.retention), "issuance ledger open");
        Ok(Some(Self::with_store(Arc::new(store), metrics)))
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

    #[test]
    fn commit_delay_above_the_ceiling_is_refused_and_the_ceiling_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = LedgerConfig {
            commit_delay: MAX_COMMIT_DELAY + Duration::from_millis(1),
            ..LedgerConfig::default()
        };
        let err = LedgerService::open(&config, dir.path()).unwrap_err();
        assert!(err.to_string().contains("commit_delay 101ms"), "{err}");
        config.commit_delay = MAX_COMMIT_DELAY;
        assert!(LedgerService::open(&config, dir.path()).unwrap().is_some());
    }
}
