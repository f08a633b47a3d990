//! A deliberately naive evaluator: reads the [`Config`] directly and scans
//! every rule with plain string operations on every call. It is the oracle the
//! property tests compare [`Policy`](crate::Policy) against, and the linear
//! baseline in the benchmark. Only meaningful for configs that compile.

use crate::UnixTime;
use crate::config::{Config, Mode, Operation, Rule, RuleAction, Source, UnknownCertAge};
use crate::decision::{Decision, Reason, Verdict};
use crate::duration::parse_duration;
use crate::peer::{Peer, PeerIdentity};
use crate::request::{Protocol, Request, host_without_port, path_is_ambiguous, path_without_query};

fn glob(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return !value.is_empty();
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return value.ends_with(suffix);
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    pattern == value
}

fn principal_glob(config: &Config, pattern: &str, value: &str) -> bool {
    let mut p = pattern
        .strip_prefix("spiffe://")
        .unwrap_or(pattern)
        .to_string();
    if p.is_empty() || p == "*" {
        return !value.is_empty();
    }
    if !p.starts_with('*') {
        // Trust domains are case-insensitive; `cluster.local` means the configured one.
        let slash = p.find('/').unwrap_or(p.len());
        let td = p.get(..slash).unwrap_or("").to_ascii_lowercase();
        let rest = p.get(slash..).unwrap_or("");
        let td = if td == "cluster.local" && rest.starts_with('/') {
            config.trust_domain.clone()
        } else {
            td
        };
        p = format!("{td}{rest}");
    }
    glob(&p, value)
}

fn any(
    list: &Option<Vec<String>>,
    value: Option<&str>,
    m: impl Fn(&str, &str) -> bool,
) -> Option<bool> {
    list.as_ref()
        .map(|l| value.is_some_and(|v| l.iter().any(|p| m(p, v))))
}

fn field(
    pos: &Option<Vec<String>>,
    neg: &Option<Vec<String>>,
    value: Option<&str>,
    m: impl Fn(&str, &str) -> bool + Copy,
) -> bool {
    any(pos, value, m).unwrap_or(true) && !any(neg, value, m).unwrap_or(false)
}

struct View<'a> {
    principal: Option<String>,
    namespace: Option<String>,
    trust_domain: Option<String>,
    req: &'a Request<'a>,
    host: Option<String>,
    path: Option<&'a str>,
}

fn source_matches(config: &Config, s: &Source, v: &View<'_>) -> bool {
    let pg = |p: &str, x: &str| principal_glob(config, p, x);
    let tdg = |p: &str, x: &str| {
        let p = if p == "cluster.local" {
            config.trust_domain.as_str()
        } else {
            p
        };
        glob(p, x)
    };
    field(&s.principals, &s.not_principals, v.principal.as_deref(), pg)
        && field(
            &s.namespaces,
            &s.not_namespaces,
            v.namespace.as_deref(),
            glob,
        )
        && field(&s.trust_domains, &None, v.trust_domain.as_deref(), tdg)
}

fn operation_matches(o: &Operation, v: &View<'_>, action: RuleAction) -> bool {
    let port_in = |list: &Option<Vec<crate::config::PortText>>| {
        list.as_ref().map(|l| {
            v.req
                .port
                .is_some_and(|p| l.iter().any(|t| t.0.parse::<u16>().ok() == Some(p)))
        })
    };
    if !port_in(&o.ports).unwrap_or(true) || port_in(&o.not_ports).unwrap_or(false) {
        return false;
    }
    let http_fields = [
        &o.hosts,
        &o.not_hosts,
        &o.methods,
        &o.not_methods,
        &o.paths,
        &o.not_paths,
    ];
    if v.req.protocol == Protocol::Tcp {
        return action == RuleAction::Deny || http_fields.iter().all(|f| f.is_none());
    }
    let host_glob = |p: &str, x: &str| glob(&p.to_ascii_lowercase(), x);
    field(&o.hosts, &o.not_hosts, v.host.as_deref(), host_glob)
        && field(&o.methods, &o.not_methods, v.req.method, glob)
        && field(&o.paths, &o.not_paths, v.path, glob)
}

fn rule_matches(config: &Config, r: &Rule, v: &View<'_>, cert: Option<(i64, i64)>) -> bool {
    let from = r
        .from
        .as_ref()
        .is_none_or(|l| l.iter().any(|s| source_matches(config, s, v)));
    let to =
        r.to.as_ref()
            .is_none_or(|l| l.iter().any(|o| operation_matches(o, v, r.action)));
    let when = match &r.when {
        None => true,
        Some(w) => {
            let max = w
                .max_cert_age
                .as_deref()
                .and_then(|t| parse_duration(t).ok());
            let min = w
                .min_remaining_validity
                .as_deref()
                .and_then(|t| parse_duration(t).ok());
            match cert {
                Some((age, remaining)) => {
                    max.is_none_or(|m| age <= m) && min.is_none_or(|m| remaining >= m)
                }
                None if max.is_none() && min.is_none() => true,
                None => match r.action {
                    RuleAction::Allow => config.unknown_cert_age == UnknownCertAge::Allow,
                    _ => config.unknown_cert_age == UnknownCertAge::Deny,
                },
            }
        }
    };
    from && to && when
}

/// Decides like [`Policy::authorize`](crate::Policy::authorize), by brute force.
pub fn authorize<'c>(
    config: &'c Config,
    peer: &Peer,
    req: &Request<'_>,
    now: UnixTime,
) -> Decision<'c> {
    let cert = peer.cert.map(|c| (c.validity.times_at(now), c.source));
    let enforced = config.mode == Mode::Enforce;
    let decide = |verdict, rule: Option<&'c str>, reason, audit| Decision {
        verdict,
        rule,
        reason,
        audit,
        enforced,
        cert,
    };
    if matches!(*peer.identity, PeerIdentity::Invalid { .. }) {
        return decide(Verdict::Deny, None, Reason::InvalidPeerIdentity, None);
    }
    if config.require_mtls && !peer.mtls {
        return decide(Verdict::Deny, None, Reason::PlaintextPeer, None);
    }
    if let Some(revoked) = peer.cert.and_then(|c| c.revoked) {
        return decide(
            Verdict::Deny,
            None,
            Reason::RevokedCertificate(revoked),
            None,
        );
    }
    if req.protocol == Protocol::Http && req.path.is_some_and(path_is_ambiguous) {
        return decide(Verdict::Deny, None, Reason::AmbiguousPath, None);
    }
    let id = peer.spiffe();
    let view = View {
        principal: id.map(|i| i.principal().to_string()),
        namespace: id.and_then(|i| i.namespace()).map(str::to_string),
        trust_domain: id.map(|i| i.trust_domain().to_string()),
        req,
        host: req.host.map(|h| host_without_port(h).to_ascii_lowercase()),
        path: req.path.map(path_without_query),
    };
    let times = cert.map(|(t, _)| (t.age_secs, t.remaining_secs));
    let first = |action: RuleAction| {
        config
            .rules
            .iter()
            .find(|r| r.action == action && rule_matches(config, r, &view, times))
            .map(|r| r.name.as_str())
    };
    let audit = first(RuleAction::Audit);
    if let Some(rule) = first(RuleAction::Deny) {
        return decide(Verdict::Deny, Some(rule), Reason::DenyRule, audit);
    }
    if !config.rules.iter().any(|r| r.action == RuleAction::Allow) {
        return decide(Verdict::Allow, None, Reason::NoAllowRules, audit);
    }
    match first(RuleAction::Allow) {
        Some(rule) => decide(Verdict::Allow, Some(rule), Reason::AllowRule, audit),
        None => decide(Verdict::Deny, None, Reason::NoAllowRuleMatched, audit),
    }
}
