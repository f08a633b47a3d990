//! Metrics, defined once through the host and cached by name. Names and the
//! tag encoding live in the pure `telemetry` module.

use super::host::log;
use crate::Decision;
use crate::config::Mode;
use crate::decision::Verdict;
use crate::pattern::FixedState;
use crate::telemetry::{self, CERT_AGE, CERT_REMAINING, CERT_UNKNOWN};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, MetricType};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// Ids of one rule's (or one reason's) decision series, by action
/// (`allow`, `deny`, `audit`) × mode; `None` until first used.
type DecisionSlots = [Option<Option<u32>>; 6];

#[derive(Default)]
pub struct Metrics {
    ids: RefCell<HashMap<String, Option<u32>, FixedState>>,
    /// Decision-series ids by rule name: found with the rule's `&str`, so a
    /// decision builds no stat name once its series exists.
    by_rule: RefCell<HashMap<Box<str>, DecisionSlots, FixedState>>,
    /// The same for decisions no rule made, by reason code.
    by_reason: RefCell<HashMap<&'static str, DecisionSlots, FixedState>>,
    /// Ids of [`CERT_AGE`], [`CERT_REMAINING`], [`CERT_UNKNOWN`], set by
    /// [`Metrics::define_fixed`] (every decision records one of them).
    fixed: Cell<Option<[Option<u32>; 3]>>,
}

/// What names a decision series besides action and mode.
#[derive(Clone, Copy)]
enum Series<'a> {
    Rule(&'a str),
    Reason(&'static str),
}

const ACTIONS: [&str; 3] = ["allow", "deny", "audit"];

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

    /// The id of fixed metric `index` (see [`Metrics::fixed`]).
    fn fixed_id(&self, index: usize) -> Option<u32> {
        let ids = match self.fixed.get() {
            Some(ids) => ids,
            None => self.define_fixed(),
        };
        ids.get(index).copied().flatten()
    }

    /// The counter of one decision series (`action` indexes [`ACTIONS`]),
    /// defined on first use; the stat name is built only then (its shape is
    /// `telemetry::decision_stat`'s).
    fn decision_counter(&self, series: Series<'_>, action: usize, mode: Mode) -> Option<u32> {
        let slot = action * 2
            + match mode {
                Mode::Enforce => 0,
                Mode::Shadow => 1,
            };
        let cached = match series {
            Series::Rule(rule) => self
                .by_rule
                .borrow()
                .get(rule)
                .and_then(|s| s.get(slot).copied().flatten()),
            Series::Reason(code) => self
                .by_reason
                .borrow()
                .get(code)
                .and_then(|s| s.get(slot).copied().flatten()),
        };
        if let Some(id) = cached {
            return id;
        }
        let action_name = ACTIONS.get(action).copied().unwrap_or("deny");
        let name = match series {
            Series::Rule(rule) => telemetry::decision_stat(action_name, rule, mode),
            Series::Reason(code) => {
                telemetry::decision_stat(action_name, &format!("_{code}"), mode)
            }
        };
        let id = self.id(MetricType::Counter, &name);
        match series {
            Series::Rule(rule) => {
                if let Some(s) = self
                    .by_rule
                    .borrow_mut()
                    .entry(rule.into())
                    .or_insert([None; 6])
                    .get_mut(slot)
                {
                    *s = Some(id);
                }
            }
            Series::Reason(code) => {
                if let Some(s) = self
                    .by_reason
                    .borrow_mut()
                    .entry(code)
                    .or_insert([None; 6])
                    .get_mut(slot)
                {
                    *s = Some(id);
                }
            }
        }
        id
    }

    /// Counts one ledger lookup by its result.
    pub fn ledger_lookup(&self, result: &str) {
        self.increment(&telemetry::ledger_stat(result));
    }

    /// Defines the fixed metrics up front so they exist before traffic.
    pub fn define_fixed(&self) -> [Option<u32>; 3] {
        let ids = [
            self.id(MetricType::Histogram, CERT_AGE),
            self.id(MetricType::Histogram, CERT_REMAINING),
            self.id(MetricType::Counter, CERT_UNKNOWN),
        ];
        self.fixed.set(Some(ids));
        ids
    }

    /// Counts one decision (and its AUDIT mark), and the peer certificate's
    /// age / remaining validity when the peer presented one.
    pub fn decision(&self, d: &Decision<'_>, mode: Mode, mtls: bool) {
        let action = match d.verdict {
            Verdict::Allow => 0,
            Verdict::Deny => 1,
        };
        let series = match d.rule {
            Some(rule) => Series::Rule(rule),
            None => Series::Reason(d.reason.code()),
        };
        if let Some(id) = self.decision_counter(series, action, mode) {
            let _ = hostcalls::increment_metric(id, 1);
        }
        if let Some(audit) = d.audit
            && let Some(id) = self.decision_counter(Series::Rule(audit), 2, mode)
        {
            let _ = hostcalls::increment_metric(id, 1);
        }
        match d.cert {
            Some((times, _)) => {
                for (index, secs) in [(0, times.age_secs), (1, times.remaining_secs)] {
                    if let Some(id) = self.fixed_id(index) {
                        let _ = hostcalls::record_metric(id, telemetry::histogram_seconds(secs));
                    }
                }
            }
            None if mtls => {
                if let Some(id) = self.fixed_id(2) {
                    let _ = hostcalls::increment_metric(id, 1);
                }
            }
            None => {}
        }
    }
}
