//! Rotation in a running signer: the built-in CA behind a lock so a switch
//! takes effect without a restart, and the task that ticks the rotation,
//! reloads the CA and publishes the bundle.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{CaDir, RotationError, TickOutcome, retire_after};
use crate::bundle::BundleChannel;
use crate::issuer::builtin::{BuiltinIssuer, BuiltinOptions};
use crate::issuer::{IssueError, IssueFuture, IssueRequest, Issuer, SigningValidity};
use crate::ledger::Ledger;

struct Current {
    ca: Arc<BuiltinIssuer>,
    roots: Vec<CertificateDer<'static>>,
}

/// The built-in CA, reloadable, whose trust anchors (and the roots in every
/// response) are the rotation's whole root set.
pub struct RotatingBuiltin {
    dir: CaDir,
    opts: BuiltinOptions,
    current: RwLock<Current>,
}

impl std::fmt::Debug for RotatingBuiltin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RotatingBuiltin").finish_non_exhaustive()
    }
}

fn internal(reason: impl Into<String>) -> IssueError {
    IssueError::Internal {
        backend: "builtin",
        reason: reason.into(),
    }
}

impl RotatingBuiltin {
    /// Load (or create) the CA in `opts.data_dir`.
    pub fn load(opts: BuiltinOptions, now: OffsetDateTime) -> Result<Self, RotationError> {
        let ca = BuiltinIssuer::load_or_create(&opts, now)
            .map_err(|e| RotationError::Ca(e.to_string()))?;
        let dir = CaDir::new(opts.clone());
        let roots = dir.trust_roots()?;
        Ok(Self {
            dir,
            opts,
            current: RwLock::new(Current {
                ca: Arc::new(ca),
                roots,
            }),
        })
    }

    /// The rotation view of the data directory.
    pub fn dir(&self) -> &CaDir {
        &self.dir
    }

    /// Re-read the CA and the root set from disk (after a switch, or after
    /// `ca rotate-*` ran in another process). On error the old CA stays.
    pub fn reload(&self, now: OffsetDateTime) -> Result<(), RotationError> {
        let ca = BuiltinIssuer::load_or_create(&self.opts, now)
            .map_err(|e| RotationError::Ca(e.to_string()))?;
        let roots = self.dir.trust_roots()?;
        let mut cur = self
            .current
            .write()
            .map_err(|_| RotationError::Ca("CA lock poisoned".into()))?;
        *cur = Current {
            ca: Arc::new(ca),
            roots,
        };
        Ok(())
    }

    /// One rotation pass at `now`: tick the state machine (asking the ledger
    /// when draining), reload if anything changed, and return the new root
    /// set when it changed.
    pub async fn tick(
        &self,
        now: OffsetDateTime,
        ledger: Option<&dyn Ledger>,
        max_ttl: Duration,
        reload_grace: Duration,
    ) -> Result<Option<Vec<CertificateDer<'static>>>, RotationError> {
        let latest = match (self.dir.phase()?, ledger) {
            (super::Phase::Draining { switched_at }, Some(l)) => {
                let cutoff = OffsetDateTime::from_unix_timestamp(
                    switched_at.saturating_add(i64::try_from(reload_grace.as_secs()).unwrap_or(0)),
                )
                .map_err(|e| RotationError::Ca(e.to_string()))?;
                l.latest_not_after_issued_before(cutoff)
                    .await
                    .map_err(|e| RotationError::Ca(format!("ledger: {e}")))?
                    .map(|t| t.unix_timestamp())
            }
            _ => None,
        };
        let before = self.trust_anchors();
        let outcome = self.dir.tick(now, |switched_at| {
            Some(retire_after(switched_at, max_ttl, reload_grace, latest))
        })?;
        if outcome != TickOutcome::Unchanged {
            tracing::info!(?outcome, "CA rotation step");
        }
        self.reload(now)?;
        let after = self.trust_anchors();
        Ok((after != before).then_some(after))
    }
}

impl Issuer for RotatingBuiltin {
    fn name(&self) -> &'static str {
        "builtin"
    }

    fn sign<'a>(&'a self, req: &'a IssueRequest) -> IssueFuture<'a> {
        Box::pin(async move {
            let (ca, roots) = {
                let cur = self
                    .current
                    .read()
                    .map_err(|_| internal("CA lock poisoned"))?;
                (cur.ca.clone(), cur.roots.clone())
            };
            let mut chain = ca.sign_now(req)?;
            // During a rotation the response carries every trusted root, so
            // istio-agent learns the new one with its next certificate.
            chain.roots = roots;
            Ok(chain)
        })
    }

    fn trust_anchors(&self) -> Vec<CertificateDer<'static>> {
        self.current
            .read()
            .map(|c| c.roots.clone())
            .unwrap_or_default()
    }

    fn signing_validity(&self) -> SigningValidity {
        match self.current.read() {
            Ok(c) => c.ca.signing_validity(),
            Err(_) => SigningValidity {
                not_before: OffsetDateTime::UNIX_EPOCH,
                not_after: OffsetDateTime::UNIX_EPOCH,
            },
        }
    }

    fn signs_crls(&self) -> bool {
        true
    }

    fn sign_crl(&self, crl: &crate::issuer::CrlRequest) -> Result<Vec<u8>, String> {
        let ca = self
            .current
            .read()
            .map_err(|_| "CA lock poisoned".to_string())?
            .ca
            .clone();
        ca.sign_crl(crl)
    }
}

/// Tick the rotation every `interval` until `shutdown`, publishing each
/// new root set to `bundle`.
pub fn spawn_rotation(
    ca: Arc<RotatingBuiltin>,
    bundle: BundleChannel,
    ledger: Option<Arc<dyn Ledger>>,
    max_ttl: Duration,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<Result<(), String>> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
            }
            match ca
                .tick(
                    OffsetDateTime::now_utc(),
                    ledger.as_deref(),
                    max_ttl,
                    interval.saturating_mul(2),
                )
                .await
            {
                Ok(Some(roots)) => match bundle.current().with_roots(roots) {
                    Ok(next) => {
                        let seq = next.sequence();
                        if bundle.publish(next) {
                            tracing::info!(sequence = seq, "trust bundle changed by CA rotation");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "rotated roots do not form a bundle"),
                },
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "CA rotation tick failed; will retry"),
            }
        }
    })
}
