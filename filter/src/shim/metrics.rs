//! Metrics, defined once through the host and cached by name. Names and the
//! tag encoding live in the pure `telemetry` module.

use super::host::log;
use crate::Decision;
use crate::config::Mode;
use crate::pattern::FixedState;
use crate::telemetry::{self, CERT_AGE, CERT_REMAINING, CERT_UNKNOWN};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, MetricType};
use std::cell::RefCell;
use std::collections::HashMap;

#[derive(Default)]
pub struct Metrics {
    ids: RefCell<HashMap<String, Option<u32>, FixedState>>,
}

impl Metrics {
    fn id(&self, kind: MetricType, name: &str) -> Option<u32> {
        let mut ids = self.ids.borrow_mut();
        if let Some(id) = ids.get(name) {
            return *id;
        }
        let id = match hostcalls::define_metric(kind, name) {
            Ok(id) => Some(id),
            Err(status) => {
                log(
                    LogLevel::Warn,
                    &format!("meshward: define_metric {name}: {status:?}"),
                );
                None
            }
        };
        ids.insert(name.to_string(), id);
        id
    }

    fn increment(&self, name: &str) {
        if let Some(id) = self.id(MetricType::Counter, name) {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    fn record(&self, name: &str, secs: i64) {
        if let Some(id) = self.id(MetricType::Histogram, name) {
            let _ = hostcalls::record_metric(id, telemetry::histogram_seconds(secs));
        }
    }

    /// Counts one ledger lookup by its result.
    pub fn ledger_lookup(&self, result: &str) {
        self.increment(&telemetry::ledger_stat(result));
    }

    /// Defines the fixed metrics up front so they exist before traffic.
    pub fn define_fixed(&self) {
        self.id(MetricType::Histogram, CERT_AGE);
        self.id(MetricType::Histogram, CERT_REMAINING);
        self.id(MetricType::Counter, CERT_UNKNOWN);
    }

    /// Counts one decision (and its AUDIT mark), and the peer certificate's
    /// age / remaining validity when the peer presented one.
    pub fn decision(&self, d: &Decision<'_>, mode: Mode, mtls: bool) {
        let (main, audit) = telemetry::decision_stats(d, mode);
        self.increment(&main);
        if let Some(audit) = audit {
            self.increment(&audit);
        }
        match d.cert {
            Some((times, _)) => {
                self.record(CERT_AGE, times.age_secs);
                self.record(CERT_REMAINING, times.remaining_secs);
            }
            None if mtls => self.increment(CERT_UNKNOWN),
            None => {}
        }
    }
}
