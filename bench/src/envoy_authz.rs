//! The filter in real Envoy against what users would pick instead: Envoy's
//! own RBAC filter with the policies istiod generates from an
//! AuthorizationPolicy, and the floor, an empty proxy-wasm plugin
//! (`bench/noop-plugin`) on the same V8.
//!
//! One server Envoy 1.40 (`--concurrency 1`, the e2e crate's Istio-like
//! sidecar bootstrap: inbound mTLS, client certificate required against the
//! signer's roots) answers every request itself (a `direct_response` route):
//! no app and no upstream pool, so the server's CPU is the downstream TLS,
//! HTTP/2 or HTTP/1.1, the connection manager and the authorization filter
//! under test. The load is h2load over HTTP/2 into a client Envoy that
//! originates mTLS with a certificate the signer issued (the e2e agent),
//! HTTP/2 to the server for the per-request figures, one HTTP/1.1 request
//! per new TLS connection for the per-connection (network filter) ones.
//! The server Envoy's CPU comes from `/proc/<pid>/stat` (utime + stime, its
//! PID only) around a measured run, its request and connection counts from
//! its own stats; every configuration must answer 2xx only.
//!
//! This file holds what is pure (the configurations, the bootstrap patches,
//! h2load's output, the medians); `envoy_authz/harness.rs` runs it.

#[cfg(feature = "envoy")]
mod harness;

#[cfg(feature = "envoy")]
pub use harness::{Non2xx, Pins, Setup, measure};

use anyhow::Context as _;
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::filter_cost::Kind;
use crate::stats::median;

/// Trust domain of both workloads.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// The server workload (`spiffe://cluster.local/ns/shop/sa/backend`).
pub const SERVER: (&str, &str) = ("shop", "backend");
/// The client workload, allowed only by the last rule / policy.
pub const CLIENT: (&str, &str) = ("shop", "web");
/// The host the client Envoy routes to the server by.
pub const SERVER_HOST: &str = "backend.shop";
/// The inbound connection manager's stats prefix (the e2e bootstrap's).
pub const HCM_STATS: &str = "http.inbound_0.0.0.0_80.";

/// Which authorization the server's inbound chain runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "filter", content = "rules", rename_all = "lowercase")]
pub enum Authz {
    /// (a) No authorization filter.
    None,
    /// (b) `envoy.filters.{http,network}.rbac` with this many policies.
    Rbac(usize),
    /// (c) meshward (WasmPlugin manifest, V8) with this many ALLOW rules.
    Meshward(usize),
    /// (d) The empty proxy-wasm plugin on V8.
    Noop,
}

impl Authz {
    /// Report label.
    pub fn label(self) -> &'static str {
        match self {
            Authz::None => "none",
            Authz::Rbac(_) => "Envoy RBAC",
            Authz::Meshward(_) => "meshward (V8)",
            Authz::Noop => "empty plugin (V8)",
        }
    }

    /// Rule count, when it has rules.
    pub fn rules(self) -> Option<usize> {
        match self {
            Authz::Rbac(n) | Authz::Meshward(n) => Some(n),
            Authz::None | Authz::Noop => None,
        }
    }

    /// A file-name tag.
    pub fn tag(self) -> String {
        match self {
            Authz::None => "none".to_string(),
            Authz::Rbac(n) => format!("rbac-{n}"),
            Authz::Meshward(n) => format!("meshward-{n}"),
            Authz::Noop => "noop".to_string(),
        }
    }
}

/// Every configuration, in the order each round runs them: per kind, none,
/// RBAC at each count, meshward at each count, the empty plugin.
pub fn slots(rules: &[usize]) -> Vec<(Kind, Authz)> {
    Kind::ALL
        .into_iter()
        .flat_map(|kind| {
            std::iter::once(Authz::None)
                .chain(rules.iter().map(|&n| Authz::Rbac(n)))
                .chain(rules.iter().map(|&n| Authz::Meshward(n)))
                .chain(std::iter::once(Authz::Noop))
                .map(move |a| (kind, a))
        })
        .collect()
}

/// Rule `i` of `n` in Istio's AuthorizationPolicy form: the last names the
/// client exactly; the others alternate an exact principal of another
/// namespace and a namespace prefix (`cluster.local/ns/team-i/*`), none of
/// which the client matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// `principals: ["cluster.local/ns/…/sa/…"]`.
    Exact(String),
    /// `principals: ["cluster.local/ns/…/*"]`: the text before the `*`.
    Prefix(String),
}

impl Principal {
    /// Rule `i` of `n`.
    pub fn of_rule(i: usize, n: usize) -> Self {
        if i + 1 == n {
            Principal::Exact(format!("{TRUST_DOMAIN}/ns/{}/sa/{}", CLIENT.0, CLIENT.1))
        } else if i.is_multiple_of(2) {
            Principal::Exact(format!("{TRUST_DOMAIN}/ns/app-{i}/sa/web"))
        } else {
            Principal::Prefix(format!("{TRUST_DOMAIN}/ns/team-{i}/"))
        }
    }

    /// How meshward (and Istio's AuthorizationPolicy) writes it.
    pub fn istio(&self) -> String {
        match self {
            Principal::Exact(p) => p.clone(),
            Principal::Prefix(p) => format!("{p}*"),
        }
    }

    /// The `principal_name` matcher istiod generates for it.
    pub fn rbac_matcher(&self) -> Value {
        match self {
            Principal::Exact(p) => json!({"exact": format!("spiffe://{p}")}),
            Principal::Prefix(p) => json!({"prefix": format!("spiffe://{p}")}),
        }
    }
}

/// The policy name of rule `i`, zero-padded: Envoy keeps RBAC policies in
/// a map ordered by name and stops at the first match, so the client's
/// policy, the last, is also the last one tried.
fn policy_name(i: usize) -> String {
    format!("ns[shop]-policy[bench-{i:05}]-rule[0]")
}

/// The RBAC `rules` of `n` ALLOW policies, each `permissions: [{any: true}]`
/// and one `authenticated.principal_name` principal, as istiod writes them.
pub fn rbac_rules(n: usize) -> Value {
    let policies: Map<String, Value> = (0..n)
        .map(|i| {
            (
                policy_name(i),
                json!({
                    "permissions": [{"any": true}],
                    "principals": [{"authenticated": {
                        "principal_name": Principal::of_rule(i, n).rbac_matcher(),
                    }}],
                }),
            )
        })
        .collect();
    json!({"action": "ALLOW", "policies": policies})
}

/// Envoy's RBAC filter of `kind` with [`rbac_rules`].
pub fn rbac_filter(kind: Kind, n: usize) -> Value {
    match kind {
        Kind::Http => json!({
            "name": "envoy.filters.http.rbac",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                "rules": rbac_rules(n),
            },
        }),
        Kind::Network => json!({
            "name": "envoy.filters.network.rbac",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
                "stat_prefix": "tcp.",
                "rules": rbac_rules(n),
            },
        }),
    }
}

fn filter_type(kind: Kind) -> &'static str {
    match kind {
        Kind::Http => "http",
        Kind::Network => "network",
    }
}

/// meshward's `pluginConfig` with the same `n` ALLOW rules.
pub fn meshward_config(kind: Kind, n: usize) -> Value {
    let rules: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "name": format!("bench-{i:05}"),
                "action": "ALLOW",
                "from": [{"principals": [Principal::of_rule(i, n).istio()]}],
            })
        })
        .collect();
    let mut config = json!({
        "filterType": filter_type(kind),
        "trustDomain": TRUST_DOMAIN,
        "mode": "enforce",
        "rules": rules,
    });
    if kind == Kind::Http
        && let Some(obj) = config.as_object_mut()
    {
        obj.insert("requireMtls".into(), json!(true));
    }
    config
}

/// The empty plugin's `pluginConfig` (only which kind of root it is).
pub fn noop_config(kind: Kind) -> Value {
    json!({"filterType": filter_type(kind)})
}

/// Calls `f` on every JSON object in `v`, depth first.
fn for_each_object(v: &mut Value, f: &mut dyn FnMut(&mut Map<String, Value>)) {
    match v {
        Value::Object(obj) => {
            f(obj);
            for child in obj.values_mut() {
                for_each_object(child, f);
            }
        }
        Value::Array(items) => {
            for child in items {
                for_each_object(child, f);
            }
        }
        _ => {}
    }
}

/// The server bootstrap's inbound route to the app becomes a
/// `direct_response` (200, `ok`), and the app's cluster goes.
pub fn route_direct_response(bootstrap: &mut Value) -> anyhow::Result<()> {
    let mut replaced = 0;
    for_each_object(bootstrap, &mut |obj| {
        let to_app = obj
            .get("route")
            .and_then(|r| r.get("cluster"))
            .and_then(|c| c.as_str())
            == Some("inbound|80||");
        if to_app {
            obj.remove("route");
            obj.insert(
                "direct_response".into(),
                json!({"status": 200, "body": {"inline_string": "ok\n"}}),
            );
            replaced += 1;
        }
    });
    anyhow::ensure!(
        replaced > 0,
        "the bootstrap has no inbound route to replace"
    );
    if let Some(clusters) = bootstrap
        .pointer_mut("/static_resources/clusters")
        .and_then(|c| c.as_array_mut())
    {
        clusters.retain(|c| c.get("name").and_then(|n| n.as_str()) != Some("inbound|80||"));
    }
    Ok(())
}

/// The client bootstrap's outbound virtual hosts answer any `:authority`
/// (h2load sends the listener's address).
pub fn any_authority(bootstrap: &mut Value) -> anyhow::Result<()> {
    let mut patched = 0;
    for_each_object(bootstrap, &mut |obj| {
        if let Some(domains) = obj.get_mut("domains") {
            *domains = json!(["*"]);
            patched += 1;
        }
    });
    anyhow::ensure!(patched > 0, "the bootstrap has no virtual host");
    Ok(())
}

/// The client bootstrap's upstream clusters speak HTTP/2 (one pooled
/// connection carrying every stream, as between sidecars).
pub fn upstream_http2(bootstrap: &mut Value) -> anyhow::Result<()> {
    let mut patched = 0;
    for_each_object(bootstrap, &mut |obj| {
        if let Some(explicit) = obj.get_mut("explicit_http_config") {
            *explicit = json!({"http2_protocol_options": {}});
            patched += 1;
        }
    });
    anyhow::ensure!(patched > 0, "the bootstrap has no HTTP upstream cluster");
    Ok(())
}

/// What h2load printed about one run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct H2load {
    /// Requests per second over the run.
    pub requests_per_s: f64,
    /// `requests: … total`.
    pub total: u64,
    /// `… done`.
    pub done: u64,
    /// `… failed`.
    pub failed: u64,
    /// `… errored`.
    pub errored: u64,
    /// `… timeout`.
    pub timeout: u64,
    /// `status codes: … 2xx`.
    pub status_2xx: u64,
    /// 3xx + 4xx + 5xx.
    pub status_other: u64,
}

impl H2load {
    /// Parses h2load's summary (`finished in …, N req/s`, `requests: …`,
    /// `status codes: …`).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut out = Self::default();
        let counts = |line: &str| -> Vec<(u64, String)> {
            line.split(',')
                .filter_map(|part| {
                    let mut words = part.split_whitespace();
                    let n = words.next()?.parse::<u64>().ok()?;
                    Some((n, words.next()?.to_string()))
                })
                .collect()
        };
        let (mut rate, mut requests, mut statuses) = (false, false, false);
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("finished in ") {
                out.requests_per_s = rest
                    .split(',')
                    .find_map(|p| p.trim().strip_suffix(" req/s"))
                    .and_then(|v| v.trim().parse().ok())
                    .context("h2load: no req/s in `finished in`")?;
                rate = true;
            } else if let Some(rest) = line.strip_prefix("requests: ") {
                for (n, what) in counts(rest) {
                    match what.as_str() {
                        "total" => out.total = n,
                        "done" => out.done = n,
                        "failed" => out.failed = n,
                        "errored" => out.errored = n,
                        "timeout" => out.timeout = n,
                        _ => {}
                    }
                }
                requests = true;
            } else if let Some(rest) = line.strip_prefix("status codes: ") {
                for (n, what) in counts(rest) {
                    if what == "2xx" {
                        out.status_2xx = n;
                    } else {
                        out.status_other += n;
                    }
                }
                statuses = true;
            }
        }
        anyhow::ensure!(
            rate && requests && statuses,
            "h2load printed no summary:\n{text}"
        );
        Ok(out)
    }
}

/// One configuration's measurement in one round.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Round (1-based).
    pub round: usize,
    /// h2load's requests per second.
    pub requests_per_s: f64,
    /// Server Envoy CPU per request (HTTP) or per connection (network), µs.
    pub cpu_us: f64,
    /// Requests (HTTP) or connections (network) the server counted.
    pub units: u64,
    /// Server Envoy CPU over the run (s).
    pub cpu_s: f64,
    /// /proc/loadavg (1 min) when the run started.
    pub loadavg: String,
    /// The fixed rate h2load sent at (requests/s), or `None`: closed loop
    /// (the configuration could not sustain the rate).
    pub paced_rate: Option<u64>,
    /// Downstream TLS handshakes the server made in the run, and how many
    /// of them resumed a session.
    pub handshakes: u64,
    pub resumed: u64,
}

/// One configuration over every round.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// HTTP filter (per request) or network filter (per connection).
    pub kind: Kind,
    /// What ran.
    pub authz: Authz,
    /// Each round's figures, in the order they ran.
    pub samples: Vec<Sample>,
    /// Median requests/s.
    pub requests_per_s: f64,
    /// Median server CPU per request / connection (µs).
    pub cpu_us: f64,
    /// Median of the rounds' CPU over the same round's "none" (µs); `None`
    /// for "none" itself.
    pub marginal_us: Option<f64>,
    /// Each round's marginal CPU (µs).
    pub round_marginal_us: Vec<f64>,
}

/// Everything the section measured.
#[derive(Debug, Clone, Serialize)]
pub struct EnvoyAuthz {
    /// `envoy --version`.
    pub envoy_version: String,
    /// `h2load --version`.
    pub h2load_version: String,
    /// Size of the empty plugin (bytes).
    pub noop_wasm_size: u64,
    /// /proc/loadavg when the section started.
    pub loadavg_start: String,
    /// … and when it ended.
    pub loadavg_end: String,
    /// The CPUs the server and the load were pinned to (`None`: not pinned).
    pub pins: Option<Pins>,
    /// Per configuration.
    pub rows: Vec<Row>,
}

impl EnvoyAuthz {
    /// The row of `kind` × `authz`.
    pub fn row(&self, kind: Kind, authz: Authz) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.kind == kind && r.authz == authz)
    }

    /// Median marginal CPU of `kind` × `authz` (µs).
    pub fn marginal(&self, kind: Kind, authz: Authz) -> Option<f64> {
        self.row(kind, authz).and_then(|r| r.marginal_us)
    }
}

/// The rows of `slots` from every round's samples: medians of the rounds,
/// each marginal against the "none" run of the same kind and round.
pub fn aggregate(slots: &[(Kind, Authz)], samples: &[(Kind, Authz, Sample)]) -> Vec<Row> {
    let baseline = |kind: Kind, round: usize| {
        samples
            .iter()
            .find(|(k, a, s)| *k == kind && *a == Authz::None && s.round == round)
            .map(|(_, _, s)| s.cpu_us)
    };
    slots
        .iter()
        .filter_map(|&(kind, authz)| {
            let mine: Vec<Sample> = samples
                .iter()
                .filter(|(k, a, _)| *k == kind && *a == authz)
                .map(|(_, _, s)| s.clone())
                .collect();
            let mut cpu: Vec<f64> = mine.iter().map(|s| s.cpu_us).collect();
            let mut rps: Vec<f64> = mine.iter().map(|s| s.requests_per_s).collect();
            let round_marginal_us: Vec<f64> = if authz == Authz::None {
                Vec::new()
            } else {
                mine.iter()
                    .filter_map(|s| baseline(kind, s.round).map(|b| s.cpu_us - b))
                    .collect()
            };
            let mut m = round_marginal_us.clone();
            Some(Row {
                kind,
                authz,
                requests_per_s: median(&mut rps)?,
                cpu_us: median(&mut cpu)?,
                marginal_us: median(&mut m),
                round_marginal_us,
                samples: mine,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_last_rule_names_the_client_and_forms_alternate() {
        let n = 4;
        let all: Vec<Principal> = (0..n).map(|i| Principal::of_rule(i, n)).collect();
        assert_eq!(
            all,
            vec![
                Principal::Exact("cluster.local/ns/app-0/sa/web".into()),
                Principal::Prefix("cluster.local/ns/team-1/".into()),
                Principal::Exact("cluster.local/ns/app-2/sa/web".into()),
                Principal::Exact("cluster.local/ns/shop/sa/web".into()),
            ]
        );
        assert_eq!(all[1].istio(), "cluster.local/ns/team-1/*");
        assert_eq!(
            all[1].rbac_matcher(),
            json!({"prefix": "spiffe://cluster.local/ns/team-1/"})
        );
    }

    #[test]
    fn rbac_policies_sort_with_the_clients_last() {
        let rules = rbac_rules(12);
        let policies = rules["policies"].as_object().unwrap();
        assert_eq!(policies.len(), 12);
        // serde_json's map is ordered by key, like Envoy's policy map.
        let (last_name, last) = policies.iter().next_back().unwrap();
        assert_eq!(last_name, "ns[shop]-policy[bench-00011]-rule[0]");
        assert_eq!(
            last["principals"][0]["authenticated"]["principal_name"]["exact"],
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(last["permissions"], json!([{"any": true}]));
        assert_eq!(
            rbac_filter(Kind::Network, 1)["typed_config"]["stat_prefix"],
            "tcp."
        );
    }

    #[test]
    fn meshward_config_has_the_same_rules_and_parses_as_the_filters() {
        for kind in Kind::ALL {
            let v = meshward_config(kind, 10);
            let config = meshward_filter::Config::from_json(v.to_string().as_bytes());
            assert!(config.is_ok(), "{kind:?}: {config:?}");
            assert_eq!(v["rules"].as_array().unwrap().len(), 10);
            assert_eq!(
                v["rules"][9]["from"][0]["principals"][0],
                "cluster.local/ns/shop/sa/web"
            );
        }
    }

    #[test]
    fn bootstrap_patches_replace_the_route_domains_and_protocol() {
        let mut server = json!({"static_resources": {
            "listeners": [{"filter_chains": [{"filters": [{"typed_config": {"route_config": {
                "virtual_hosts": [{"domains": ["*"], "routes": [{"match": {"prefix": "/"},
                    "route": {"cluster": "inbound|80||", "timeout": "0s"}}]}]}}}]}]}],
            "clusters": [{"name": "inbound|80||"}, {"name": "other"}],
        }});
        route_direct_response(&mut server).unwrap();
        let route = server
            .pointer("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/route_config/virtual_hosts/0/routes/0")
            .unwrap();
        assert!(route.get("route").is_none());
        assert_eq!(route["direct_response"]["status"], 200);
        assert_eq!(
            server["static_resources"]["clusters"],
            json!([{"name": "other"}])
        );
        assert!(route_direct_response(&mut json!({})).is_err());

        let mut client = json!({"vh": {"domains": ["backend.shop", "backend.shop:*"]},
            "c": {"explicit_http_config": {"http_protocol_options": {}}}});
        any_authority(&mut client).unwrap();
        upstream_http2(&mut client).unwrap();
        assert_eq!(client["vh"]["domains"], json!(["*"]));
        assert_eq!(
            client["c"]["explicit_http_config"],
            json!({"http2_protocol_options": {}})
        );
    }

    const H2LOAD: &str = "starting benchmark...
spawning thread #0: 8 total client(s). 2000 total requests

finished in 152.33ms, 13129.40 req/s, 1.10MB/s
requests: 2000 total, 2000 started, 2000 done, 1990 succeeded, 10 failed, 0 errored, 0 timeout
status codes: 1990 2xx, 0 3xx, 10 4xx, 0 5xx
traffic: 171.88KB (176000) total, 23.57KB (24136) headers (space savings 90.12%), 3.91KB (4000) data
";

    #[test]
    fn h2load_summary_is_parsed() {
        let r = H2load::parse(H2LOAD).unwrap();
        assert_eq!(r.requests_per_s, 13129.40);
        assert_eq!((r.total, r.done, r.failed, r.errored), (2000, 2000, 10, 0));
        assert_eq!((r.status_2xx, r.status_other), (1990, 10));
        assert!(H2load::parse("connect failed").is_err());
    }

    fn sample(round: usize, cpu_us: f64) -> Sample {
        Sample {
            round,
            requests_per_s: 1000.0,
            cpu_us,
            units: 100,
            cpu_s: 0.1,
            loadavg: "1.0".into(),
            paced_rate: None,
            handshakes: 0,
            resumed: 0,
        }
    }

    #[test]
    fn marginals_are_per_round_against_that_rounds_baseline() {
        let slots = vec![(Kind::Http, Authz::None), (Kind::Http, Authz::Noop)];
        let samples = vec![
            (Kind::Http, Authz::None, sample(1, 20.0)),
            (Kind::Http, Authz::Noop, sample(1, 25.0)),
            (Kind::Http, Authz::None, sample(2, 30.0)),
            (Kind::Http, Authz::Noop, sample(2, 34.0)),
            (Kind::Http, Authz::None, sample(3, 21.0)),
            (Kind::Http, Authz::Noop, sample(3, 27.0)),
        ];
        let rows = aggregate(&slots, &samples);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].marginal_us, None);
        assert_eq!(rows[0].cpu_us, 21.0);
        assert_eq!(rows[1].round_marginal_us, vec![5.0, 4.0, 6.0]);
        assert_eq!(rows[1].marginal_us, Some(5.0));
        assert_eq!(rows[1].cpu_us, 27.0);
    }

    #[test]
    fn every_kind_runs_none_rbac_meshward_and_the_empty_plugin() {
        let s = slots(&[10, 1000]);
        assert_eq!(s.len(), 12);
        assert_eq!(s[0], (Kind::Http, Authz::None));
        assert_eq!(s[2], (Kind::Http, Authz::Rbac(1000)));
        assert_eq!(s[5], (Kind::Http, Authz::Noop));
        assert_eq!(s[6], (Kind::Network, Authz::None));
    }
}
