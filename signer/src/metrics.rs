//! Prometheus metrics of the signer (served on the admin port at `/metrics`).
//!
//! - `meshward_signer_requests_total{outcome}`: CreateCertificate calls by
//!   outcome (`issued`, `unauthenticated`, `permission_denied`,
//!   `invalid_argument`, `resource_exhausted`, `unavailable`, `internal`);
//! - `meshward_signer_issuance_duration_seconds`: time to answer an issued
//!   request (authn + CSR checks + signing);
//! - `meshward_signer_ca_cert_expiry_timestamp_seconds`: notAfter of the
//!   signing CA certificate, Unix seconds (alert when it nears `time()`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Outcome label of a CreateCertificate call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A certificate was issued.
    Issued,
    /// UNAUTHENTICATED.
    Unauthenticated,
    /// PERMISSION_DENIED.
    PermissionDenied,
    /// INVALID_ARGUMENT.
    InvalidArgument,
    /// RESOURCE_EXHAUSTED.
    ResourceExhausted,
    /// UNAVAILABLE.
    Unavailable,
    /// INTERNAL.
    Internal,
}

impl Outcome {
    /// Label value.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Issued => "issued",
            Outcome::Unauthenticated => "unauthenticated",
            Outcome::PermissionDenied => "permission_denied",
            Outcome::InvalidArgument => "invalid_argument",
            Outcome::ResourceExhausted => "resource_exhausted",
            Outcome::Unavailable => "unavailable",
            Outcome::Internal => "internal",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// The signer's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<OutcomeLabels, Counter>,
    issuance_seconds: Histogram,
    ca_expiry: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Create and register every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meshward_signer");
        let requests = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "requests",
            "CreateCertificate requests by outcome",
            requests.clone(),
        );
        // 0.5 ms .. ~4 s
        let issuance_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "issuance_duration_seconds",
            "Time to authenticate, check and sign an issued request",
            issuance_seconds.clone(),
        );
        let ca_expiry = Gauge::default();
        registry.register(
            "ca_cert_expiry_timestamp_seconds",
            "notAfter of the signing CA certificate (Unix seconds)",
            ca_expiry.clone(),
        );
        // Every outcome is present from the start, so rate() works at once.
        for o in [
            Outcome::Issued,
            Outcome::Unauthenticated,
            Outcome::PermissionDenied,
            Outcome::InvalidArgument,
            Outcome::ResourceExhausted,
            Outcome::Unavailable,
            Outcome::Internal,
        ] {
            let _ = requests.get_or_create(&OutcomeLabels {
                outcome: o.as_str(),
            });
        }
        Self {
            registry,
            requests,
            issuance_seconds,
            ca_expiry,
        }
    }

    /// Count one request.
    pub fn request(&self, outcome: Outcome) {
        self.requests
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// Record the latency of an issued request.
    pub fn issuance_latency(&self, seconds: f64) {
        self.issuance_seconds.observe(seconds);
    }

    /// Set the CA expiry gauge.
    pub fn set_ca_expiry(&self, unix_seconds: i64) {
        self.ca_expiry.set(unix_seconds);
    }

    /// The registry, for other modules' metrics (the ledger's) to register
    /// into before the signer starts serving.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Render in the Prometheus text format.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
