//! Metrics, defined once through the host and cached by name.
//!
//! Tags are encoded in the stat name the way Istio's own stats are:
//! `action=.=deny;.;rule=.=legacy;.;mode=.=enforce;.;meshward_decisions_total`.
//! Envoy prefixes plugin stats with `wasmcustom.`; with Istio's tag-extraction
//! regexes `(action=\.=(.*?);\.;)` etc. (meshConfig `extraStatTags`) Prometheus
//! shows `meshward_decisions_total{action="deny",rule="legacy",mode="enforce"}`.
//! Tag values are safe by construction: rule names are `[A-Za-z0-9_-]`.

use super::host::log;
use crate::Decision;
use crate::config::Mode;
use crate::pattern::FixedState;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, MetricType};
use std::cell::RefCell;
use std::collections::HashMap;

pub const DECISIONS: &str = "meshward_decisions_total";
pub const CERT_AGE: &str = "meshward_peer_cert_age_seconds";
pub const CERT_REMAINING: &str = "meshward_peer_cert_remaining_validity_seconds";
pub const CERT_UNKNOWN: &str = "meshward_peer_cert_validity_unknown_total";

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

    fn record(&self, name: &str, value: i64) {
        if let Some(id) = self.id(MetricType::Histogram, name) {
            let _ = hostcalls::record_metric(id, u64::try_from(value.max(0)).unwrap_or(0));
        }
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
        let reserved;
        let rule = match d.rule {
            Some(rule) => rule,
            None => {
                reserved = format!("_{}", d.reason.code());
                &reserved
            }
        };
        self.increment(&decision_stat(d.verdict.as_str(), rule, mode));
        if let Some(audit) = d.audit {
            self.increment(&decision_stat("audit", audit, mode));
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

/// The stat name of one `meshward_decisions_total` series.
pub fn decision_stat(action: &str, rule: &str, mode: Mode) -> String {
    format!(
        "action=.={action};.;rule=.={rule};.;mode=.={};.;{DECISIONS}",
        mode.as_str()
    )
}
