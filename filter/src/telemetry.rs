//! Metric names and their tag encoding (pure; the shim defines and updates
//! them through the host).
//!
//! Tags are encoded in the stat name the way Istio's own stats are:
//! `action=.=deny;.;rule=.=legacy;.;mode=.=enforce;.;meshward_decisions_total`.
//! Envoy puts plugin stats in its `wasmcustom` namespace; Istio's tag
//! extraction regexes `(action=\.=(.*?);\.;)` etc. (meshConfig
//! `extraStatTags: [action, rule, mode]`) turn them into Prometheus labels:
//! `meshward_decisions_total{action="deny",rule="legacy",mode="enforce"}`.
//! Tag values are safe by construction: rule names are `[A-Za-z0-9_-]`.

use crate::config::Mode;
use crate::decision::Decision;

/// Counter: decisions by `action`, `rule`, `mode`.
pub const DECISIONS: &str = "meshward_decisions_total";
/// Histogram: peer certificate age in seconds (`now - notBefore`, at least 0).
pub const CERT_AGE: &str = "meshward_peer_cert_age_seconds";
/// Histogram: remaining validity in seconds (`notAfter - now`, at least 0).
pub const CERT_REMAINING: &str = "meshward_peer_cert_remaining_validity_seconds";
/// Counter: mTLS peers whose certificate validity no source knew.
pub const CERT_UNKNOWN: &str = "meshward_peer_cert_validity_unknown_total";

/// Counter: ledger lookups by `result` (`cache_hit`, `issued`, `not_issued`, `unknown`, `overloaded`).
pub const LEDGER_LOOKUPS: &str = "meshward_ledger_lookups_total";

/// The stat name of one `meshward_ledger_lookups_total` series.
pub fn ledger_stat(result: &str) -> String {
    format!("result=.={result};.;{LEDGER_LOOKUPS}")
}

/// The stat name of one `meshward_decisions_total` series.
pub fn decision_stat(action: &str, rule: &str, mode: Mode) -> String {
    format!(
        "action=.={action};.;rule=.={rule};.;mode=.={};.;{DECISIONS}",
        mode.as_str()
    )
}

/// The series a decision increments: its verdict's, and the AUDIT mark's if
/// an AUDIT rule matched. A decision without a rule is tagged `_<reason>`.
pub fn decision_stats(d: &Decision<'_>, mode: Mode) -> (String, Option<String>) {
    let main = match d.rule {
        Some(rule) => decision_stat(d.verdict.as_str(), rule, mode),
        None => decision_stat(d.verdict.as_str(), &format!("_{}", d.reason.code()), mode),
    };
    (main, d.audit.map(|a| decision_stat("audit", a, mode)))
}

/// A signed number of seconds as a histogram value (negative becomes 0).
pub fn histogram_seconds(secs: i64) -> u64 {
    u64::try_from(secs).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Peer, Policy, Request, UnixTime};

    /// What Istio's `(<tag>=\.=(.*?);\.;)` extraction does, by hand.
    fn extract(name: &str, tag: &str) -> (Option<String>, String) {
        let key = format!("{tag}=.=");
        let Some(start) = name.find(&key) else {
            return (None, name.to_string());
        };
        let rest = &name[start + key.len()..];
        let end = rest.find(";.;").unwrap();
        let value = rest[..end].to_string();
        let stripped = format!("{}{}", &name[..start], &rest[end + 3..]);
        (Some(value), stripped)
    }

    #[test]
    fn decision_series_carry_action_rule_mode_and_strip_to_the_metric_name() {
        let p = Policy::from_json(br#"{"mode":"shadow","rules":[{"name":"audit-all","action":"AUDIT"},{"name":"no-legacy","action":"DENY"}]}"#).unwrap();
        let peer = Peer::from_connection(true, Some("spiffe://cluster.local/ns/a/sa/b"), None);
        let d = p.authorize(&peer, &Request::tcp(None), UnixTime(0));
        let (main, audit) = decision_stats(&d, p.mode());
        let (action, rest) = extract(&main, "action");
        let (rule, rest) = extract(&rest, "rule");
        let (mode, rest) = extract(&rest, "mode");
        assert_eq!(action.as_deref(), Some("deny"));
        assert_eq!(rule.as_deref(), Some("no-legacy"));
        assert_eq!(mode.as_deref(), Some("shadow"));
        assert_eq!(rest, DECISIONS);
        assert_eq!(
            audit.unwrap(),
            "action=.=audit;.;rule=.=audit-all;.;mode=.=shadow;.;meshward_decisions_total"
        );
    }

    #[test]
    fn rule_less_decisions_use_reserved_underscore_tags() {
        let p = Policy::from_json(b"{}").unwrap();
        let plaintext = Peer::from_connection(false, None, None);
        let d = p.authorize(&plaintext, &Request::tcp(None), UnixTime(0));
        let (main, audit) = decision_stats(&d, p.mode());
        assert_eq!(
            main,
            "action=.=deny;.;rule=.=_plaintext_peer;.;mode=.=enforce;.;meshward_decisions_total"
        );
        assert_eq!(audit, None);
    }

    #[test]
    fn negative_durations_record_as_zero() {
        assert_eq!(histogram_seconds(-5), 0);
        assert_eq!(histogram_seconds(86_400), 86_400);
    }
}
