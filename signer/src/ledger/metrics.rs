//! Ledger metrics, labelled by namespace — never by identity, and with a cap
//! on how many namespaces get their own label (the rest share `_other`), so
//! label cardinality stays bounded whatever callers do.

use std::collections::HashSet;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::NamespaceCount;

/// The label every namespace beyond the cap is folded into.
pub const OTHER_NAMESPACE: &str = "_other";

/// `{namespace="..."}`
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct NamespaceLabel {
    /// Namespace, `""` for non-Istio-shaped IDs, or [`OTHER_NAMESPACE`].
    pub namespace: String,
}

/// Counters and gauges the ledger feeds.
#[derive(Debug)]
pub struct LedgerMetrics {
    recorded: Family<NamespaceLabel, Counter>,
    record_failures: Counter,
    on_record: Family<NamespaceLabel, Gauge>,
    valid: Family<NamespaceLabel, Gauge>,
    pruned: Counter,
    max_namespaces: usize,
    seen: Mutex<HashSet<String>>,
    /// Certificates recorded since start; guards the gauges against a
    /// recount that raced an issuance (see [`LedgerMetrics::set_counts_if_current`]).
    generation: Mutex<u64>,
    /// Records per group commit, and how long each commit took (with its
    /// fsync): the SQLite store's writer thread feeds them.
    commit_group_size: Histogram,
    commit_seconds: Histogram,
}

impl LedgerMetrics {
    /// Metrics with at most `max_namespaces` distinct namespace labels.
    pub fn new(max_namespaces: usize) -> Self {
        Self {
            recorded: Family::default(),
            record_failures: Counter::default(),
            on_record: Family::default(),
            valid: Family::default(),
            pruned: Counter::default(),
            max_namespaces,
            seen: Mutex::new(HashSet::new()),
            generation: Mutex::new(0),
            commit_group_size: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
        }
    }

    /// One group commit of `records` records took `seconds` (insert, commit
    /// and fsync).
    pub fn committed(&self, records: usize, seconds: f64) {
        self.commit_group_size.observe(records as f64);
        self.commit_seconds.observe(seconds);
    }

    /// Register under `<registry prefix>_ledger_*` (in the signer:
    /// `meshward_signer_ledger_*`).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("ledger");
        r.register(
            "certificates_recorded",
            "Certificates recorded in the ledger, by namespace",
            self.recorded.clone(),
        );
        r.register(
            "record_failures",
            "Issuances that failed because the ledger could not record them (nothing was handed out)",
            self.record_failures.clone(),
        );
        r.register(
            "certificates",
            "Certificates on record (not yet pruned), by namespace",
            self.on_record.clone(),
        );
        r.register(
            "certificates_valid",
            "Certificates on record that are still valid, by namespace",
            self.valid.clone(),
        );
        r.register(
            "pruned",
            "Records deleted by the retention policy",
            self.pruned.clone(),
        );
        r.register(
            "commit_group_size",
            "Certificates recorded per ledger transaction (group commit)",
            self.commit_group_size.clone(),
        );
        r.register_with_unit(
            "commit_duration",
            "Time of one ledger transaction, insert to durable commit (the requests in it wait this long)",
            prometheus_client::registry::Unit::Seconds,
            self.commit_seconds.clone(),
        );
    }

    /// The label for `namespace`, folding new ones into `_other` once the
    /// cap is reached.
    pub fn label(&self, namespace: &str) -> NamespaceLabel {
        let Ok(mut seen) = self.seen.lock() else {
            return NamespaceLabel {
                namespace: OTHER_NAMESPACE.to_string(),
            };
        };
        if seen.contains(namespace) {
            return NamespaceLabel {
                namespace: namespace.to_string(),
            };
        }
        if seen.len() < self.max_namespaces {
            seen.insert(namespace.to_string());
            return NamespaceLabel {
                namespace: namespace.to_string(),
            };
        }
        NamespaceLabel {
            namespace: OTHER_NAMESPACE.to_string(),
        }
    }

    /// One certificate recorded.
    ///
    /// The per-namespace gauges count it at once (a new certificate is on
    /// record and valid), so they are right between maintenance runs, which
    /// recount them exactly (expiry, pruning).
    pub fn recorded(&self, namespace: &str) {
        let label = self.label(namespace);
        self.recorded.get_or_create(&label).inc();
        let mut generation = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        *generation += 1;
        self.on_record.get_or_create(&label).inc();
        self.valid.get_or_create(&label).inc();
    }

    /// How many certificates were recorded so far: read it before counting
    /// the ledger, and hand it to [`LedgerMetrics::set_counts_if_current`].
    pub fn generation(&self) -> u64 {
        *self.generation.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replace the gauges with `counts` — taken after `generation` was
    /// read — unless a certificate was recorded since: those counts may miss
    /// it, and replacing would lose it until the next recount. Returns
    /// whether they were applied.
    pub fn set_counts_if_current(&self, counts: &[NamespaceCount], generation: u64) -> bool {
        let now = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        if *now != generation {
            return false;
        }
        self.set_counts(counts);
        true
    }

    /// One issuance failed at the ledger.
    pub fn record_failed(&self) {
        self.record_failures.inc();
    }

    /// `n` records pruned.
    pub fn pruned(&self, n: u64) {
        self.pruned.inc_by(n);
    }

    /// Replace the per-namespace gauges with fresh counts.
    pub fn set_counts(&self, counts: &[NamespaceCount]) {
        self.on_record.clear();
        self.valid.clear();
        for c in counts {
            let label = self.label(&c.namespace);
            self.on_record
                .get_or_create(&label)
                .inc_by(i64::try_from(c.recorded).unwrap_or(i64::MAX));
            self.valid
                .get_or_create(&label)
                .inc_by(i64::try_from(c.valid).unwrap_or(i64::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_fold_namespaces_beyond_the_cap_into_other() {
        let m = LedgerMetrics::new(2);
        for ns in ["a", "b", "c", "d", "a"] {
            m.recorded(ns);
        }
        let mut reg = Registry::with_prefix("meshward_signer");
        m.register(&mut reg);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(
            out.contains(r#"meshward_signer_ledger_certificates_recorded_total{namespace="a"} 2"#)
        );
        assert!(
            out.contains(r#"meshward_signer_ledger_certificates_recorded_total{namespace="b"} 1"#)
        );
        assert!(out.contains(
            r#"meshward_signer_ledger_certificates_recorded_total{namespace="_other"} 2"#
        ));
        assert!(!out.contains(r#"namespace="c""#));
    }

    #[test]
    fn recount_that_raced_an_issuance_does_not_drop_it() {
        let m = LedgerMetrics::new(10);
        let before = m.generation();
        // The recount read the ledger before this certificate was committed...
        let stale: Vec<NamespaceCount> = Vec::new();
        m.recorded("shop");
        // ...so it must not replace the gauges that already count it.
        assert!(!m.set_counts_if_current(&stale, before));
        let mut reg = Registry::with_prefix("meshward_signer");
        m.register(&mut reg);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(
            out.contains(r#"meshward_signer_ledger_certificates_valid{namespace="shop"} 1"#),
            "{out}"
        );
        // A recount taken after it applies.
        let fresh = vec![NamespaceCount {
            namespace: "shop".into(),
            recorded: 1,
            valid: 0,
        }];
        assert!(m.set_counts_if_current(&fresh, m.generation()));
    }
}
