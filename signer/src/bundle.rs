//! The trust bundle: the set of root certificates relying parties should
//! trust (old and new together during a root rotation), and the sinks it is
//! published to.
//!
//! One [`BundleChannel`] holds the current [`TrustBundle`]; whoever changes
//! the roots (start-up, [`rotation`]) calls [`BundleChannel::publish`]. Pull
//! sinks read the channel (the SPIFFE [`endpoint`] over HTTPS, the admin
//! port, the [`grpc`] `WatchBundle` stream); push sinks implement
//! [`BundleSink`] and are driven by [`run_sink`]: the [`dir`]ectory sink and
//! the Istio [`configmap`] sink.

pub mod configmap;
pub mod dir;
pub mod endpoint;
pub mod grpc;
pub mod jwks;
pub mod rotation;
pub mod service;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use x509_parser::prelude::{FromDer, X509Certificate};

pub use jwks::{Jwk, Jwks};
pub use service::{BundleConfig, BundleService};

/// Why a bundle could not be built or published.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A bundle needs at least one root.
    #[error("a trust bundle needs at least one root certificate")]
    Empty,
    /// A root is not a usable CA certificate.
    #[error("root #{index}: {reason}")]
    BadRoot {
        /// Position in the list.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A JWKS document is not a valid SPIFFE bundle.
    #[error("SPIFFE bundle JWKS: {0}")]
    Jwks(String),
    /// A sink failed.
    #[error("bundle sink {sink}: {reason}")]
    Sink {
        /// Sink name.
        sink: &'static str,
        /// What went wrong.
        reason: String,
    },
}

/// The set of trusted roots, versioned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    trust_domain: String,
    roots: Vec<CertificateDer<'static>>,
    sequence: u64,
    refresh_hint: Duration,
}

impl TrustBundle {
    /// A bundle of `roots` (duplicates dropped, order kept). Every root must
    /// parse as an X.509 CA certificate.
    pub fn new(
        trust_domain: impl Into<String>,
        roots: Vec<CertificateDer<'static>>,
        sequence: u64,
        refresh_hint: Duration,
    ) -> Result<Self, BundleError> {
        let mut unique: Vec<CertificateDer<'static>> = Vec::with_capacity(roots.len());
        for (index, root) in roots.into_iter().enumerate() {
            let (_, cert) = X509Certificate::from_der(&root).map_err(|e| BundleError::BadRoot {
                index,
                reason: format!("not an X.509 certificate: {e}"),
            })?;
            if !cert.is_ca() {
                return Err(BundleError::BadRoot {
                    index,
                    reason: "not a CA certificate (basicConstraints CA:false or absent)"
                        .to_string(),
                });
            }
            if !unique.contains(&root) {
                unique.push(root);
            }
        }
        if unique.is_empty() {
            return Err(BundleError::Empty);
        }
        Ok(Self {
            trust_domain: trust_domain.into(),
            roots: unique,
            sequence,
            refresh_hint,
        })
    }

    /// The trust domain the roots are for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The roots, DER.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// Increases with every change of the root set.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// How often a polling client should re-fetch.
    pub fn refresh_hint(&self) -> Duration {
        self.refresh_hint
    }

    /// The roots as concatenated PEM (`root-cert.pem`).
    pub fn roots_pem(&self) -> String {
        self.roots
            .iter()
            .map(|c| crate::pem_encode("CERTIFICATE", c))
            .collect()
    }

    /// The same trust domain and refresh hint with other roots: the sequence
    /// goes up by one if the root set changed, else `self` is returned as is.
    pub fn with_roots(&self, roots: Vec<CertificateDer<'static>>) -> Result<Self, BundleError> {
        let next = Self::new(
            self.trust_domain.clone(),
            roots,
            self.sequence.saturating_add(1),
            self.refresh_hint,
        )?;
        if next.roots == self.roots {
            return Ok(self.clone());
        }
        Ok(next)
    }

    /// The SPIFFE bundle (JWK Set) for these roots.
    pub fn to_jwks(&self) -> Result<Jwks, BundleError> {
        Jwks::from_bundle(self)
    }
}

/// The current bundle, shared by every reader and sink.
#[derive(Debug, Clone)]
pub struct BundleChannel {
    tx: Arc<watch::Sender<Arc<TrustBundle>>>,
}

impl BundleChannel {
    /// A channel holding `initial`.
    pub fn new(initial: TrustBundle) -> Self {
        let (tx, _) = watch::channel(Arc::new(initial));
        Self { tx: Arc::new(tx) }
    }

    /// The current bundle.
    pub fn current(&self) -> Arc<TrustBundle> {
        self.tx.borrow().clone()
    }

    /// Replace the bundle if `bundle` is newer (higher sequence). Returns
    /// whether it was replaced: an older or equal sequence is ignored, so
    /// readers never see the sequence go back.
    pub fn publish(&self, bundle: TrustBundle) -> bool {
        self.tx.send_if_modified(|cur| {
            if bundle.sequence > cur.sequence {
                *cur = Arc::new(bundle);
                true
            } else {
                false
            }
        })
    }

    /// A receiver that sees the current bundle and every later one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<TrustBundle>> {
        self.tx.subscribe()
    }
}

/// The future returned by [`BundleSink::publish`].
pub type SinkFuture<'a> = Pin<Box<dyn Future<Output = Result<(), BundleError>> + Send + 'a>>;

/// Somewhere the bundle is pushed to. `publish` must be idempotent: it is
/// called again with the same bundle on every resync.
pub trait BundleSink: Send + Sync {
    /// Name for logs and metrics (`dir`, `configmap`).
    fn name(&self) -> &'static str;
    /// Make the sink hold `bundle`.
    fn publish<'a>(&'a self, bundle: &'a TrustBundle) -> SinkFuture<'a>;
}

/// Drive a push sink: publish the current bundle at once, then on every
/// change and every `resync` (which repairs drift, e.g. a ConfigMap someone
/// edited or a namespace labelled later), until `shutdown` turns true.
/// Failures are logged and retried at the next resync.
pub async fn run_sink(
    sink: Arc<dyn BundleSink>,
    mut bundles: watch::Receiver<Arc<TrustBundle>>,
    resync: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let bundle = bundles.borrow_and_update().clone();
        match sink.publish(&bundle).await {
            Ok(()) => tracing::debug!(
                sink = sink.name(),
                sequence = bundle.sequence(),
                "bundle published"
            ),
            Err(e) => {
                tracing::warn!(sink = sink.name(), sequence = bundle.sequence(), error = %e, "bundle publish failed; will retry")
            }
        }
        tokio::select! {
            changed = bundles.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep(resync) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// Keeps `bundle` on the roots `issuer` trusts, for the backends whose roots
/// change outside the signer (a `cacerts` reload, new roots for Vault): every
/// `interval` the issuer's trust anchors are compared with the bundle's, and
/// a different set is published as the next bundle (a higher sequence), which
/// the sinks and `WatchBundle` streams then carry. The built-in CA's
/// rotation publishes its own bundles and does not need this.
pub fn spawn_roots_follower(
    issuer: Arc<dyn crate::issuer::Issuer>,
    bundle: BundleChannel,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Result<(), String>> {
    tokio::spawn(async move {
        // A root set that could not form a bundle, logged once.
        let mut refused: Option<Vec<CertificateDer<'static>>> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
            }
            let roots = issuer.trust_anchors();
            let current = bundle.current();
            if roots.is_empty()
                || roots.as_slice() == current.roots()
                || refused.as_ref() == Some(&roots)
            {
                continue;
            }
            match current.with_roots(roots.clone()) {
                Ok(next) => {
                    let (sequence, count) = (next.sequence(), next.roots().len());
                    if bundle.publish(next) {
                        tracing::info!(
                            sequence,
                            roots = count,
                            backend = issuer.name(),
                            "trust bundle follows the CA's new roots"
                        );
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "the CA's new roots do not form a bundle; keeping the current one");
                    refused = Some(roots);
                }
            }
        }
    })
}

/// `meshward_signer_bundle_roots` and `meshward_signer_bundle_sequence`: the
/// published trust bundle's root count and sequence, read at every scrape
/// (registered before the bundle exists, then [`BundleGauges::attach`]ed).
/// Across replicas they show a root rotation's progress, and replicas that
/// publish different root sets.
#[derive(Debug, Clone, Default)]
pub struct BundleGauges(Arc<std::sync::OnceLock<BundleChannel>>);

#[derive(Debug)]
struct BundleGauge {
    bundle: Arc<std::sync::OnceLock<BundleChannel>>,
    roots: bool,
}

impl prometheus_client::encoding::EncodeMetric for BundleGauge {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let value = self.bundle.get().map_or(0, |b| {
            let current = b.current();
            if self.roots {
                i64::try_from(current.roots().len()).unwrap_or(i64::MAX)
            } else {
                i64::try_from(current.sequence()).unwrap_or(i64::MAX)
            }
        });
        encoder.encode_gauge(&value)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Gauge
    }
}

impl BundleGauges {
    /// Adds both gauges to `registry` (0 until [`Self::attach`]).
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "bundle_roots",
            "Roots in the published trust bundle",
            BundleGauge {
                bundle: self.0.clone(),
                roots: true,
            },
        );
        registry.register(
            "bundle_sequence",
            "Sequence of the published trust bundle (goes up with every root set)",
            BundleGauge {
                bundle: self.0.clone(),
                roots: false,
            },
        );
    }

    /// Reads from `bundle` from now on (the first call wins).
    pub fn attach(&self, bundle: BundleChannel) {
        let _ = self.0.set(bundle);
    }
}

#[cfg(test)]
pub(crate) mod test_roots {
    //! Root certificates made with rcgen for the bundle tests.
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use rustls_pki_types::CertificateDer;

    pub fn root(alg: &'static rcgen::SignatureAlgorithm, cn: &str) -> CertificateDer<'static> {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.self_signed(&key).unwrap().der().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::test_roots::root;
    use super::*;

    #[test]
    fn bundle_refuses_a_leaf_as_root() {
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["x".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let err = TrustBundle::new("td", vec![leaf.der().clone()], 1, Duration::from_secs(60));
        assert!(matches!(err, Err(BundleError::BadRoot { index: 0, .. })));
        assert!(matches!(
            TrustBundle::new("td", vec![], 1, Duration::from_secs(60)),
            Err(BundleError::Empty)
        ));
    }

    #[test]
    fn channel_never_goes_back_in_sequence() {
        let a = root(&rcgen::PKCS_ECDSA_P256_SHA256, "a");
        let b = root(&rcgen::PKCS_ECDSA_P256_SHA256, "b");
        let first = TrustBundle::new("td", vec![a.clone()], 5, Duration::from_secs(60)).unwrap();
        let ch = BundleChannel::new(first.clone());
        let stale = TrustBundle::new("td", vec![b.clone()], 4, Duration::from_secs(60)).unwrap();
        assert!(!ch.publish(stale));
        assert_eq!(ch.current().roots(), first.roots());
        let next = first.with_roots(vec![a.clone(), b]).unwrap();
        assert_eq!(next.sequence(), 6);
        assert!(ch.publish(next));
        assert_eq!(ch.current().roots().len(), 2);
        // Same roots again: no new sequence.
        let same = ch
            .current()
            .with_roots(ch.current().roots().to_vec())
            .unwrap();
        assert_eq!(same.sequence(), 6);
    }
}
