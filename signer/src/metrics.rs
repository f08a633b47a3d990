//! Prometheus metrics of the signer (served on the admin port at `/metrics`).
//!
//! - `meshward_signer_requests_total{outcome}`: CreateCertificate calls by
//!   outcome (`issued`, `unauthenticated`, `permission_denied`,
//!   `invalid_argument`, `resource_exhausted`, `unavailable`, `internal`);
//! - `meshward_signer_issuance_duration_seconds`: time to answer an issued
//!   request (authn + CSR checks + signing);
//! - `meshward_signer_ca_cert_expiry_timestamp_seconds`: notAfter of the
//!   signing CA certificate, Unix seconds (alert when it nears `time()`);
//! - `meshward_signer_log_lines_dropped_total`: log lines `serve`'s
//!   non-blocking writer dropped because its queue was full (0 when logs
//!   are written directly).

use std::sync::OnceLock;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
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
    /// RESOURCE_EXHAUSTED: the signer at its concurrent request limit.
    ResourceExhausted,
    /// RESOURCE_EXHAUSTED: the calling pod past its issuance rate.
    RateLimited,
    /// RESOURCE_EXHAUSTED: the peer address past its failed authentications.
    AuthThrottled,
    /// PERMISSION_DENIED: a client certificate the ledger holds as revoked.
    Revoked,
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
            Outcome::RateLimited => "rate_limited",
            Outcome::AuthThrottled => "auth_throttled",
            Outcome::Revoked => "revoked",
            Outcome::Unavailable => "unavailable",
            Outcome::Internal => "internal",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// The dropped-line counter of the process's non-blocking log writer.
static DROPPED_LOG_LINES: OnceLock<tracing_appender::non_blocking::ErrorCounter> = OnceLock::new();

/// Makes `meshward_signer_log_lines_dropped_total` report the lines the
/// writer behind `counter` drops. Set once per process (`serve` does); later
/// calls are ignored.
pub fn report_dropped_log_lines(counter: tracing_appender::non_blocking::ErrorCounter) {
    let _ = DROPPED_LOG_LINES.set(counter);
}

/// Reads [`DROPPED_LOG_LINES`] at every scrape.
#[derive(Debug)]
struct DroppedLogLines;

impl EncodeMetric for DroppedLogLines {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let dropped = DROPPED_LOG_LINES
            .get()
            .map_or(0, |c| u64::try_from(c.dropped_lines()).unwrap_or(u64::MAX));
        encoder.encode_counter::<NoLabelSet, _, u64>(&dropped, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
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
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because the log writer's queue was full",
            DroppedLogLines,
        );
        // Every outcome is present from the start, so rate() works at once.
        for o in [
            Outcome::Issued,
            Outcome::Unauthenticated,
            Outcome::PermissionDenied,
            Outcome::InvalidArgument,
            Outcome::ResourceExhausted,
            Outcome::RateLimited,
            Outcome::AuthThrottled,
            Outcome::Revoked,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::mpsc;

    /// A log sink that blocks every write until its sender is dropped, so
    /// the writer's queue fills up.
    struct Stalled(mpsc::Receiver<()>);

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.recv();
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn log_lines_dropped_by_a_full_writer_queue_are_exported() {
        let (release, stalled) = mpsc::channel::<()>();
        let (mut writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(2)
            .finish(Stalled(stalled));
        report_dropped_log_lines(writer.error_counter());
        for _ in 0..10 {
            writer.write_all(b"a log line\n").unwrap();
        }
        let dropped = writer.error_counter().dropped_lines();
        // Two lines fit in the queue and at most one is held by the sink.
        assert!(dropped >= 7, "{dropped}");
        let metrics = Metrics::new();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &metrics.registry).unwrap();
        assert!(
            out.contains(&format!(
                "meshward_signer_log_lines_dropped_total {dropped}\n"
            )),
            "{out}"
        );
        drop(release);
        drop(guard);
    }
}
