//! Filter decision cost, natively: the compiled policy against the naive
//! linear scan (`meshward_filter::reference`, how Envoy's RBAC filter walks
//! its principals), per HTTP request and per TCP connection.
//!
//! Each iteration does natively what the shim does per decision: per HTTP
//! request on an established connection, the request view and the decision
//! with the peer's rules from the per-identity cache (the peer was parsed
//! when its connection was first seen); per TCP connection, the peer built
//! from the URI SAN as well (its identity found in the per-VM identity
//! cache). A second figure decides for an identity seen for the first time
//! (SPIFFE parsing, then `Policy::authorize`).

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use meshward_filter::peer::IdentityCache;
use meshward_filter::policy::PeerRulesCache;
use meshward_filter::{Config, Peer, Policy, Request, UnixTime, Verdict, reference};
use serde::Serialize;

use crate::stats::Summary;

/// The peer every generated policy allows only through its last rule.
pub const PEER_URI: &str = "spiffe://cluster.local/ns/shop/sa/web";
/// Request attributes.
pub const AUTHORITY: &str = "shop.example";
/// `:method`.
pub const METHOD: &str = "GET";
/// `:path`.
pub const PATH: &str = "/v1/cart?x=1";
/// `destination.port`.
pub const PORT: u16 = 8080;
/// The decision time.
pub const NOW: UnixTime = UnixTime(1_750_000_000);

/// HTTP (per request) or network (per connection) filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `filterType: http`: decides each request.
    Http,
    /// `filterType: network`: decides each connection (port only).
    Network,
}

impl Kind {
    /// Both kinds.
    pub const ALL: [Kind; 2] = [Kind::Http, Kind::Network];

    /// Report label.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Http => "per request (HTTP)",
            Kind::Network => "per connection (network)",
        }
    }
}

/// A policy of exactly `rules` rules (≥ 1) mixing exact, prefix and suffix
/// principals, namespaces, DENY rules, paths/methods (HTTP) or ports
/// (network) and `when` conditions; the bench peer matches only the last
/// rule — the worst case for a linear scan, the common case for an index.
pub fn policy_json(rules: usize, kind: Kind) -> String {
    let others = rules.saturating_sub(1);
    let mut list = Vec::with_capacity(rules);
    for i in 0..others {
        let to_req = match kind {
            Kind::Http => r#"[{"paths":["/v1/*"],"methods":["GET","POST"]}]"#.to_string(),
            Kind::Network => format!(r#"[{{"ports":["{}"]}}]"#, 10_000 + i % 50_000),
        };
        let rule = match i % 5 {
            0 => format!(
                r#"{{"name":"deny-{i}","action":"DENY","from":[{{"principals":["cluster.local/ns/legacy-{i}/*"]}}]}}"#
            ),
            1 => format!(
                r#"{{"name":"suffix-{i}","action":"ALLOW","from":[{{"principals":["*/sa/batch-{i}"]}}],"to":{to_req}}}"#
            ),
            2 => format!(
                r#"{{"name":"ns-{i}","action":"ALLOW","from":[{{"namespaces":["team-{i}"]}}]}}"#
            ),
            3 => format!(
                r#"{{"name":"audit-{i}","action":"AUDIT","from":[{{"principals":["cluster.local/ns/audit-{i}/sa/web"]}}]}}"#
            ),
            _ => format!(
                r#"{{"name":"allow-{i}","action":"ALLOW","from":[{{"principals":["cluster.local/ns/app-{i}/sa/web"]}}],"to":{to_req},"when":{{"maxCertAge":"24h"}}}}"#
            ),
        };
        list.push(rule);
    }
    let target_to = match kind {
        Kind::Http => r#"[{"paths":["/v1/*"]}]"#.to_string(),
        Kind::Network => format!(r#"[{{"ports":["{PORT}"]}}]"#),
    };
    list.push(format!(
        r#"{{"name":"target","action":"ALLOW","from":[{{"principals":["cluster.local/ns/shop/sa/web"]}}],"to":{target_to}}}"#
    ));
    let filter_type = match kind {
        Kind::Http => "http",
        Kind::Network => "network",
    };
    format!(
        r#"{{"filterType":"{filter_type}","rules":[{}]}}"#,
        list.join(",")
    )
}

/// How long to sample.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    /// Number of timed batches.
    pub samples: usize,
    /// Target wall time of one batch (its iteration count is calibrated).
    pub batch: Duration,
}

/// How many iterations of `f` make one batch of `sampling.batch`: double
/// until a run takes at least a quarter of it, then scale.
fn calibrated_iterations<T>(sampling: Sampling, f: &mut impl FnMut() -> T) -> u64 {
    let mut iters: u64 = 1;
    loop {
        let t = Instant::now();
        for _ in 0..iters {
            black_box(f());
        }
        let took = t.elapsed();
        if took >= sampling.batch / 4 || iters >= 1 << 24 {
            let per = took.as_secs_f64() / iters as f64;
            return ((sampling.batch.as_secs_f64() / per.max(1e-12)) as u64).max(1);
        }
        iters *= 2;
    }
}

/// Time `f` in calibrated batches; returns per-iteration nanoseconds
/// (each sample is one batch's mean).
pub fn time_per_iteration(
    sampling: Sampling,
    mut f: impl FnMut() -> bool,
) -> anyhow::Result<Summary> {
    let iters = calibrated_iterations(sampling, &mut f);
    let mut samples = Vec::with_capacity(sampling.samples);
    for _ in 0..sampling.samples.max(1) {
        let t = Instant::now();
        for _ in 0..iters {
            black_box(f());
        }
        samples.push(t.elapsed().as_secs_f64() * 1e9 / iters as f64);
    }
    Summary::of(&mut samples).context("no samples")
}

/// Like [`time_per_iteration`], but only the part of each iteration that
/// `f` timed itself counts: `f` returns the nanoseconds it measured (with
/// `Instant` around the call of interest, so each figure carries one clock
/// read, ~20 ns), or `None` when the iteration failed. Each sample is the
/// mean over one batch.
pub fn time_part_of_iteration(
    sampling: Sampling,
    mut f: impl FnMut() -> Option<u64>,
) -> anyhow::Result<Summary> {
    let iters = calibrated_iterations(sampling, &mut f);
    let mut samples = Vec::with_capacity(sampling.samples);
    for _ in 0..sampling.samples.max(1) {
        let mut timed: u64 = 0;
        for _ in 0..iters {
            timed = timed.saturating_add(black_box(f()).context("an iteration failed")?);
        }
        samples.push(timed as f64 / iters as f64);
    }
    Summary::of(&mut samples).context("no samples")
}

/// Native cost at one rule count.
#[derive(Debug, Clone, Serialize)]
pub struct NativeCost {
    /// Rules in the policy.
    pub rules: usize,
    /// HTTP or network.
    pub kind: Kind,
    /// Compiled policy, ns per decision, as the shim decides (see the module docs).
    pub compiled_ns: Summary,
    /// Compiled policy for an identity seen for the first time: SPIFFE
    /// parsing and `Policy::authorize` (no per-identity rules yet).
    pub new_identity_ns: Summary,
    /// Linear reference scan, ns per decision.
    pub linear_ns: Summary,
    /// Policy compile time (ms), once per configure.
    pub compile_ms: f64,
    /// `compiled_ns.p50` of each round, in the order they ran.
    pub compiled_round_p50_ns: Vec<f64>,
}

/// The median of the rounds' values of `f`.
fn median_by<T>(rounds: &[T], f: impl Fn(&T) -> f64) -> Option<f64> {
    let mut v: Vec<f64> = rounds.iter().map(f).collect();
    crate::stats::median(&mut v)
}

/// The rounds' summaries of `f` as one ([`Summary::median_of_rounds`]).
fn summary_by<T>(rounds: &[T], f: impl Fn(&T) -> Summary) -> Option<Summary> {
    Summary::median_of_rounds(&rounds.iter().map(f).collect::<Vec<_>>())
}

impl NativeCost {
    /// The same slot measured in several rounds, as one: every figure is
    /// the median of the rounds'. `None` for no rounds.
    pub fn median_of_rounds(rounds: &[NativeCost]) -> Option<NativeCost> {
        let first = rounds.first()?;
        Some(NativeCost {
            rules: first.rules,
            kind: first.kind,
            compiled_ns: summary_by(rounds, |r| r.compiled_ns)?,
            new_identity_ns: summary_by(rounds, |r| r.new_identity_ns)?,
            linear_ns: summary_by(rounds, |r| r.linear_ns)?,
            compile_ms: median_by(rounds, |r| r.compile_ms)?,
            compiled_round_p50_ns: rounds
                .iter()
                .flat_map(|r| r.compiled_round_p50_ns.iter().copied())
                .collect(),
        })
    }
}

fn request(kind: Kind) -> Request<'static> {
    match kind {
        Kind::Http => Request::http(Some(AUTHORITY), Some(METHOD), Some(PATH), Some(PORT)),
        Kind::Network => Request::tcp(Some(PORT)),
    }
}

/// Measure native decisions for `rules` rules of `kind`.
pub fn native(rules: usize, kind: Kind, sampling: Sampling) -> anyhow::Result<NativeCost> {
    let json = policy_json(rules, kind);
    let config = Config::from_json(json.as_bytes()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let t = Instant::now();
    let policy = Policy::compile(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;
    ensure!(
        policy.rule_count() == rules,
        "{} rules compiled, wanted {rules}",
        policy.rule_count()
    );

    // Both must allow through the target rule, or we would time a shortcut.
    let peer = Peer::from_connection(true, Some(PEER_URI), None);
    let req = request(kind);
    let d = policy.authorize(&peer, &req, NOW);
    ensure!(
        d.verdict == Verdict::Allow && d.rule == Some("target"),
        "compiled policy decided {:?} by {:?}",
        d.verdict,
        d.rule
    );
    let r = reference::authorize(&config, &peer, &req, NOW);
    ensure!(r == d, "reference {r:?} differs from compiled {d:?}");

    let cache = PeerRulesCache::default();
    let identities = IdentityCache::default();
    let connection_peer = Peer::from_connection(true, Some(PEER_URI), None);
    let compiled_ns = time_per_iteration(sampling, || {
        let req = black_box(request(kind));
        let decision = match kind {
            Kind::Http => cache.authorize(&policy, black_box(&connection_peer), &req, NOW),
            Kind::Network => {
                let peer = Peer::from_connection_cached(
                    true,
                    Some(black_box(PEER_URI)),
                    None,
                    &identities,
                );
                cache.authorize(&policy, &peer, &req, NOW)
            }
        };
        decision.verdict == Verdict::Allow
    })?;
    ensure!(
        cache.len() == 1,
        "{} identities cached, wanted 1",
        cache.len()
    );
    let new_identity_ns = time_per_iteration(sampling, || {
        let peer = Peer::from_connection(true, Some(black_box(PEER_URI)), None);
        let req = black_box(request(kind));
        policy.authorize(&peer, &req, NOW).verdict == Verdict::Allow
    })?;
    let linear_ns = time_per_iteration(sampling, || {
        let peer = Peer::from_connection(true, Some(black_box(PEER_URI)), None);
        let req = black_box(request(kind));
        reference::authorize(&config, &peer, &req, NOW).verdict == Verdict::Allow
    })?;
    Ok(NativeCost {
        rules,
        kind,
        compiled_ns,
        new_identity_ns,
        linear_ns,
        compile_ms,
        compiled_round_p50_ns: vec![compiled_ns.p50],
    })
}

/// Cost in wasm at one rule count.
#[derive(Debug, Clone, Serialize)]
pub struct WasmCost {
    /// Rules in the policy.
    pub rules: usize,
    /// HTTP or network.
    pub kind: Kind,
    /// ns per decision: the `proxy_on_request_headers` (HTTP) or
    /// `proxy_on_new_connection` (network) callback alone, with the host
    /// calls the plugin makes from it.
    pub decision_ns: Summary,
    /// HTTP: the decision for the first request on a connection (the plugin
    /// reads the connection's facts); `decision_ns` is a request on an
    /// established connection.
    pub decision_new_connection_ns: Option<Summary>,
    /// ns per decision of the ABI floor module (`abi_floor.wat`): the same
    /// callback making the same host calls, and nothing else.
    pub abi_floor_ns: Summary,
    /// ns per request / connection (whole stream lifecycle).
    pub stream_ns: Summary,
    /// Guest linear memory right after `proxy_on_configure` (bytes).
    pub memory_after_configure: usize,
    /// Instantiate + configure time (ms).
    pub configure_ms: f64,
    /// `decision_ns.p50` of each round, in the order they ran.
    pub decision_round_p50_ns: Vec<f64>,
    /// `abi_floor_ns.p50` of each round, in the order they ran.
    pub abi_floor_round_p50_ns: Vec<f64>,
}

impl WasmCost {
    /// The same slot measured in several rounds (each with a freshly
    /// loaded plugin), as one: every figure is the median of the rounds'.
    /// `None` for no rounds.
    pub fn median_of_rounds(rounds: &[WasmCost]) -> Option<WasmCost> {
        let first = rounds.first()?;
        let decision_new_connection_ns = if rounds
            .iter()
            .all(|r| r.decision_new_connection_ns.is_some())
        {
            summary_by(rounds, |r| {
                r.decision_new_connection_ns.unwrap_or(r.decision_ns)
            })
        } else {
            None
        };
        Some(WasmCost {
            rules: first.rules,
            kind: first.kind,
            decision_ns: summary_by(rounds, |r| r.decision_ns)?,
            decision_new_connection_ns,
            abi_floor_ns: summary_by(rounds, |r| r.abi_floor_ns)?,
            stream_ns: summary_by(rounds, |r| r.stream_ns)?,
            // Deterministic: the same module and policy configure the same
            // way each round; the largest is reported.
            memory_after_configure: rounds.iter().map(|r| r.memory_after_configure).max()?,
            configure_ms: median_by(rounds, |r| r.configure_ms)?,
            decision_round_p50_ns: rounds
                .iter()
                .flat_map(|r| r.decision_round_p50_ns.iter().copied())
                .collect(),
            abi_floor_round_p50_ns: rounds
                .iter()
                .flat_map(|r| r.abi_floor_round_p50_ns.iter().copied())
                .collect(),
        })
    }
}

/// The size of the `.wasm` file.
pub fn wasm_size(path: &Path) -> anyhow::Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("reading {} (build it with scripts/wasm)", path.display()))?
        .len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_policies_have_the_asked_rule_count_and_allow_only_by_the_last_rule() {
        for kind in Kind::ALL {
            for rules in [1, 10, 57] {
                let json = policy_json(rules, kind);
                let config = Config::from_json(json.as_bytes()).unwrap();
                let policy = Policy::compile(&config).unwrap();
                assert_eq!(policy.rule_count(), rules);
                let peer = Peer::from_connection(true, Some(PEER_URI), None);
                let d = policy.authorize(&peer, &request(kind), NOW);
                assert_eq!((d.verdict, d.rule), (Verdict::Allow, Some("target")));
                // Another identity is not allowed by any rule.
                let other =
                    Peer::from_connection(true, Some("spiffe://cluster.local/ns/x/sa/y"), None);
                assert_eq!(
                    policy.authorize(&other, &request(kind), NOW).verdict,
                    Verdict::Deny
                );
            }
        }
    }
}
