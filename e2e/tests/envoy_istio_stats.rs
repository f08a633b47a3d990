//! The filter's metrics as Prometheus sees them from an Istio sidecar: real
//! Envoy 1.40 on the `stats_config` Istio renders (its stats inclusion list
//! and tag extraction, with this mesh's `extraStatTags` and
//! `proxyStatsMatcher` from `istio-operator.yaml`), scraped on
//! `/stats/prometheus` after allowed and denied requests, and checked
//! against every series the Grafana dashboard and the alert rules query
//! from the sidecar side.
//!
//! The queries are read from `istio-manifests/monitoring/` and taken apart
//! by a small PromQL extractor (below): a metric is an identifier not
//! followed by `(`, with its `{…}` matchers; `by (…)` labels apply to the
//! metrics of the group they aggregate. Series named `meshward_signer_*`
//! are the signer's own (its `/metrics`); every other series comes from
//! the sidecar's Envoy.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/envoy_mesh.rs"]
mod envoy_mesh;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use envoy_mesh::Mesh;
use meshward_e2e::envoy::istio_stats::{ProxyStatsConfig, StatsTemplate, stats_config};
use meshward_e2e::envoy::sidecar::EnvoySidecar;
use meshward_e2e::envoy::wasmplugin::manifests_dir;

/// The signer's own metrics (exported on its admin port, not by sidecars).
const SIGNER_PREFIX: &str = "meshward_signer_";

// ---------------------------------------------------------------- queries

/// One PromQL expression and where it is.
#[derive(Debug, Clone)]
struct Query {
    source: String,
    expr: String,
}

/// Every `expr` of the dashboard's panels and of the alert rules.
fn monitoring_queries() -> Vec<Query> {
    let dir = manifests_dir().join("monitoring");
    let mut out = Vec::new();
    let dashboard: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("meshward-dashboard.json")).unwrap())
            .unwrap();
    fn panels(v: &serde_json::Value, out: &mut Vec<Query>) {
        for panel in v["panels"].as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push(Query {
                        source: format!(
                            "dashboard panel {:?}",
                            panel["title"].as_str().unwrap_or("")
                        ),
                        expr: expr.to_owned(),
                    });
                }
            }
            panels(panel, out); // rows
        }
    }
    panels(&dashboard, &mut out);
    let rules: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("prometheus-rules.yaml")).unwrap())
            .unwrap();
    for group in rules["spec"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["alert"].as_str().or(rule["record"].as_str()).unwrap();
            out.push(Query {
                source: format!("rule {name}"),
                expr: rule["expr"].as_str().unwrap().to_owned(),
            });
        }
    }
    assert!(
        out.len() > 10,
        "found only {} queries in {}",
        out.len(),
        dir.display()
    );
    out
}

/// What one expression needs of one metric: samples carrying `labels`,
/// among them one with each `equal` label at its value. (`!=`, `=~`, `!~`
/// matchers need only the label.)
#[derive(Debug, Clone, PartialEq, Eq)]
struct SeriesNeed {
    metric: String,
    labels: BTreeSet<String>,
    equal: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Number,
    Op(String),
}

fn tokenize(expr: &str) -> Vec<Token> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '"' || c == '\'' {
            let mut s = String::new();
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' {
                    i += 1;
                }
                if let Some(&ch) = chars.get(i) {
                    s.push(ch);
                }
                i += 1;
            }
            assert!(i < chars.len(), "unterminated string in {expr}");
            i += 1;
            out.push(Token::Str(s));
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            // Numbers and durations: 0.99, 1e-9, 86400, 5m, 1d.
            i += 1;
            while i < chars.len() {
                let ch = chars[i];
                let exponent_sign = (ch == '-' || ch == '+') && matches!(chars[i - 1], 'e' | 'E');
                if ch.is_ascii_alphanumeric() || ch == '.' || exponent_sign {
                    i += 1;
                } else {
                    break;
                }
            }
            out.push(Token::Number);
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            out.push(Token::Ident(chars[start..i].iter().collect()));
        } else {
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            if ["!=", "=~", "!~", "==", ">=", "<="].contains(&two.as_str()) {
                out.push(Token::Op(two));
                i += 2;
            } else {
                out.push(Token::Op(c.to_string()));
                i += 1;
            }
        }
    }
    out
}

/// The index of the `)` closing the `(` at `open`.
fn closing(tokens: &[Token], open: usize) -> usize {
    let mut depth = 0;
    for (i, t) in tokens.iter().enumerate().skip(open) {
        match t {
            Token::Op(o) if o == "(" => depth += 1,
            Token::Op(o) if o == ")" => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced parentheses in {tokens:?}")
}

/// The index of the `(` opening the `)` at `close`.
fn opening(tokens: &[Token], close: usize) -> usize {
    let mut depth = 0;
    for i in (0..=close).rev() {
        match &tokens[i] {
            Token::Op(o) if o == ")" => depth += 1,
            Token::Op(o) if o == "(" => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced parentheses in {tokens:?}")
}

fn is_op(t: Option<&Token>, op: &str) -> bool {
    matches!(t, Some(Token::Op(o)) if o == op)
}

/// The series `expr` reads. Refuses (panics on) PromQL it does not take
/// apart (vector matching, selectors without a metric name) rather than
/// guess.
fn series_needs(expr: &str) -> Vec<SeriesNeed> {
    let tokens = tokenize(expr);
    let mut metrics: Vec<(usize, SeriesNeed)> = Vec::new();
    // `by (labels)` and the token range of the group it aggregates.
    let mut groupings: Vec<(BTreeSet<String>, usize, usize)> = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let Token::Ident(name) = &tokens[i] else {
            assert!(
                !is_op(tokens.get(i), "{"),
                "a selector without a metric name in {expr}"
            );
            i += 1;
            continue;
        };
        let next = tokens.get(i + 1);
        match name.as_str() {
            "on" | "ignoring" | "group_left" | "group_right" => {
                panic!("the extractor does not handle vector matching ({name}) in {expr}")
            }
            "by" | "without" if is_op(next, "(") => {
                let close = closing(&tokens, i + 1);
                let labels: BTreeSet<String> = tokens[i + 2..close]
                    .iter()
                    .filter_map(|t| match t {
                        Token::Ident(l) => Some(l.clone()),
                        _ => None,
                    })
                    .collect();
                if name == "by" {
                    // `sum by (l) (…)` or `sum(…) by (l)`.
                    let scope = if is_op(tokens.get(close + 1), "(") {
                        (close + 1, closing(&tokens, close + 1))
                    } else {
                        assert!(
                            is_op(tokens.get(i.wrapping_sub(1)), ")"),
                            "by (…) aggregates nothing in {expr}"
                        );
                        (opening(&tokens, i - 1), i - 1)
                    };
                    groupings.push((labels, scope.0, scope.1));
                }
                i = close + 1;
            }
            "offset" | "bool" | "and" | "or" | "unless" => i += 1,
            // A function or an aggregation: `rate(`, `sum(`, `sum by (`.
            _ if is_op(next, "(")
                || matches!(next, Some(Token::Ident(k)) if k == "by" || k == "without") =>
            {
                i += 1
            }
            _ => {
                let mut need = SeriesNeed {
                    metric: name.clone(),
                    labels: BTreeSet::new(),
                    equal: BTreeMap::new(),
                };
                let mut j = i + 1;
                if is_op(next, "{") {
                    j += 1;
                    while !is_op(tokens.get(j), "}") {
                        match (&tokens[j], &tokens[j + 1], &tokens[j + 2]) {
                            (Token::Ident(label), Token::Op(op), Token::Str(value)) => {
                                need.labels.insert(label.clone());
                                if op == "=" {
                                    need.equal.insert(label.clone(), value.clone());
                                }
                            }
                            other => panic!("not a label matcher: {other:?} in {expr}"),
                        }
                        j += 3;
                        if is_op(tokens.get(j), ",") {
                            j += 1;
                        }
                    }
                    j += 1;
                }
                metrics.push((i, need));
                i = j;
            }
        }
    }
    for (pos, need) in &mut metrics {
        for (labels, from, to) in &groupings {
            if (*from..=*to).contains(pos) {
                need.labels.extend(labels.iter().cloned());
            }
        }
    }
    metrics.into_iter().map(|(_, n)| n).collect()
}

/// The sidecar side: every query's needs of series not named
/// `meshward_signer_*`, with the query they come from.
fn sidecar_needs(queries: &[Query]) -> Vec<(Query, SeriesNeed)> {
    queries
        .iter()
        .flat_map(|q| {
            series_needs(&q.expr)
                .into_iter()
                .filter(|n| !n.metric.starts_with(SIGNER_PREFIX))
                .map(|n| (q.clone(), n))
        })
        .collect()
}

// ------------------------------------------------------------- exposition

/// One sample of the Prometheus text format.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(at) => line.split_at(at),
            None => panic!("not a sample line: {line}"),
        };
        let mut labels = BTreeMap::new();
        let mut rest = rest;
        if let Some(body) = rest.strip_prefix('{') {
            let chars: Vec<char> = body.chars().collect();
            let mut i = 0;
            loop {
                if chars[i] == '}' {
                    i += 1;
                    break;
                }
                if chars[i] == ',' {
                    i += 1;
                    continue;
                }
                let start = i;
                while chars[i] != '=' {
                    i += 1;
                }
                let key: String = chars[start..i].iter().collect();
                assert_eq!(chars[i + 1], '"', "{line}");
                i += 2;
                let mut value = String::new();
                while chars[i] != '"' {
                    if chars[i] == '\\' {
                        i += 1;
                        value.push(match chars[i] {
                            'n' => '\n',
                            c => c,
                        });
                    } else {
                        value.push(chars[i]);
                    }
                    i += 1;
                }
                i += 1;
                labels.insert(key, value);
            }
            let consumed: usize = chars[..i].iter().map(|c| c.len_utf8()).sum();
            rest = &body[consumed..];
        }
        let value = rest
            .split_whitespace()
            .next()
            .unwrap_or_else(|| panic!("no value: {line}"));
        out.push(Sample {
            name: name.to_owned(),
            labels,
            value: value
                .parse()
                .unwrap_or_else(|_| panic!("value {value:?}: {line}")),
        });
    }
    out
}

/// Whether some sample serves `need`.
fn serves(samples: &[Sample], need: &SeriesNeed) -> bool {
    samples.iter().any(|s| {
        s.name == need.metric
            && need.labels.iter().all(|l| s.labels.contains_key(l))
            && need.equal.iter().all(|(l, v)| s.labels.get(l) == Some(v))
    })
}

/// The needs no sample serves.
fn unserved<'a>(
    samples: &[Sample],
    needs: &'a [(Query, SeriesNeed)],
) -> Vec<&'a (Query, SeriesNeed)> {
    needs.iter().filter(|(_, n)| !serves(samples, n)).collect()
}

fn total(samples: &[Sample], name: &str, label: Option<(&str, &str)>) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| label.is_none_or(|(l, v)| s.labels.get(l).map(String::as_str) == Some(v)))
        .map(|s| s.value)
        .sum()
}

fn meshward_lines(text: &str) -> String {
    text.lines()
        .filter(|l| l.contains("meshward"))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------- traffic

/// shop/backend behind a sidecar on `stats` with the repo's HTTP
/// WasmPlugin; one allowed and two denied requests (another rule, no rule)
/// through its callers' sidecars.
async fn backend_after_traffic(mesh: &Mesh, stats: serde_json::Value) -> EnvoySidecar {
    let backend = mesh
        .backend(vec![mesh.http_manifest()], |spec| {
            spec.stats_config = Some(stats)
        })
        .await;
    let frontend = mesh.client("shop", "frontend", &[&backend]).await;
    let reporter = mesh.client("batch", "reporter", &[&backend]).await;
    let ok = mesh.get(&frontend, "/api/orders").await;
    assert_eq!(
        ok.status,
        200,
        "frontend-reads-api allows it: {ok:?}\n{}",
        backend.log()
    );
    let post = mesh.send(&frontend, "POST", "/api/orders").await;
    assert_eq!(post.status, 403, "no ALLOW rule matches a POST: {post:?}");
    let denied = mesh.get(&reporter, "/api/orders").await;
    assert_eq!(denied.status, 403, "deny-batch denies it: {denied:?}");
    backend
}

/// Istio's rendering for this mesh's sidecars (instance IP 127.0.0.1).
fn istio_stats(proxy: &ProxyStatsConfig) -> serde_json::Value {
    stats_config(&StatsTemplate::istio().unwrap(), proxy, &["127.0.0.1"])
}

/// Envoy merges histograms on its stats flush (5 s by default), so the
/// peer-certificate histograms count the requests only after one: scrapes
/// until `done` holds, 20 s at most.
async fn scrape_until(
    sidecar: &EnvoySidecar,
    done: impl Fn(&[Sample]) -> bool,
) -> (String, Vec<Sample>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = sidecar.admin().prometheus().await.unwrap();
        let samples = parse_exposition(&text);
        if done(&samples) || tokio::time::Instant::now() >= deadline {
            return (text, samples);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// ------------------------------------------------------------------ tests

#[test]
fn promql_extractor_finds_metrics_matchers_and_the_labels_queries_group_by() {
    let needs = series_needs(
        r#"topk(10, sum by (rule) (rate(meshward_decisions_total{action="deny", mode!="x"}[5m] offset 1d))) / clamp_min(sum(up), 1e-9) > 20 * 3600"#,
    );
    assert_eq!(
        needs,
        [
            SeriesNeed {
                metric: "meshward_decisions_total".into(),
                labels: ["action", "mode", "rule"].map(String::from).into(),
                equal: [("action".to_owned(), "deny".to_owned())].into(),
            },
            SeriesNeed {
                metric: "up".into(),
                labels: BTreeSet::new(),
                equal: BTreeMap::new(),
            },
        ]
    );
    let postfix = series_needs("sum(rate(x_bucket[5m])) by (le)");
    assert_eq!(postfix[0].labels, ["le".to_owned()].into());
    let plain = series_needs("min(a) - time()");
    assert_eq!(plain.len(), 1);
    assert_eq!(plain[0].metric, "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_sidecar_stats_serve_every_series_the_dashboard_and_alerts_query_with_their_labels() {
    let queries = monitoring_queries();
    let needs = sidecar_needs(&queries);
    eprintln!("sidecar-side queries:");
    for (q, n) in &needs {
        eprintln!("  {}: {} needs {n:?}", q.source, q.expr.trim());
    }
    let metrics: BTreeSet<&str> = needs.iter().map(|(_, n)| n.metric.as_str()).collect();
    for expected in [
        "meshward_decisions_total",
        "meshward_peer_cert_age_seconds_bucket",
        "meshward_peer_cert_remaining_validity_seconds_bucket",
        "meshward_peer_cert_validity_unknown_total",
    ] {
        assert!(
            metrics.contains(expected),
            "the extractor missed {expected}: {metrics:?}"
        );
    }

    let mesh = Mesh::start().await;
    let proxy = ProxyStatsConfig::from_mesh_manifests().unwrap();
    let backend = backend_after_traffic(&mesh, istio_stats(&proxy)).await;
    let (text, samples) = scrape_until(&backend, |s| {
        unserved(s, &needs).is_empty()
            && total(s, "meshward_peer_cert_age_seconds_count", None) >= 1.0
            && total(
                s,
                "meshward_peer_cert_remaining_validity_seconds_count",
                None,
            ) >= 1.0
    })
    .await;
    eprintln!(
        "/stats/prometheus, meshward series:\n{}",
        meshward_lines(&text)
    );

    let missing = unserved(&samples, &needs);
    assert!(
        missing.is_empty(),
        "series the queries read that the sidecar does not serve:\n{}\n\nmeshward series served:\n{}",
        missing
            .iter()
            .map(|(q, n)| format!("  {n:?} ({}: {})", q.source, q.expr.trim()))
            .collect::<Vec<_>>()
            .join("\n"),
        meshward_lines(&text)
    );
    // The traffic is in them: one allow, two denies, certificates seen.
    let decisions = "meshward_decisions_total";
    assert_eq!(
        total(&samples, decisions, Some(("action", "allow"))),
        1.0,
        "{text}"
    );
    assert_eq!(
        total(&samples, decisions, Some(("action", "deny"))),
        2.0,
        "{text}"
    );
    assert_eq!(
        total(&samples, decisions, Some(("rule", "deny-batch"))),
        1.0,
        "{text}"
    );
    assert_eq!(
        total(&samples, decisions, Some(("mode", "enforce"))),
        3.0,
        "{text}"
    );
    for histogram in [
        "meshward_peer_cert_age_seconds_count",
        "meshward_peer_cert_remaining_validity_seconds_count",
    ] {
        assert!(
            total(&samples, histogram, None) >= 1.0,
            "{histogram}: no observation after Envoy's stats flush\n{text}"
        );
    }
    // And Istio's inclusion list is in force: stats it does not list are
    // not served (the inbound cluster's request counters, for one).
    assert!(
        samples
            .iter()
            .all(|s| !s.name.starts_with("envoy_cluster_upstream_rq")
                || s.labels
                    .get("cluster_name")
                    .is_some_and(|c| c == "xds-grpc")),
        "Istio's stats_matcher drops upstream_rq of clusters but xds-grpc:\n{text}"
    );
    assert!(
        samples.iter().any(|s| s.name == "envoy_server_live"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_extra_stat_tags_decisions_reach_prometheus_as_mangled_names_the_queries_miss() {
    let needs = sidecar_needs(&monitoring_queries());
    let mesh = Mesh::start().await;
    let proxy = ProxyStatsConfig {
        extra_stat_tags: Vec::new(),
        ..ProxyStatsConfig::from_mesh_manifests().unwrap()
    };
    let backend = backend_after_traffic(&mesh, istio_stats(&proxy)).await;
    let mangled = "action___deny___rule___deny_batch___mode___enforce___meshward_decisions_total";
    let (text, samples) = scrape_until(&backend, |s| s.iter().any(|s| s.name == mangled)).await;
    eprintln!(
        "/stats/prometheus without extraStatTags, meshward series:\n{}",
        meshward_lines(&text)
    );

    assert_eq!(total(&samples, mangled, None), 1.0, "{text}");
    assert!(
        samples.iter().all(|s| s.name != "meshward_decisions_total"),
        "without the tags no series is named meshward_decisions_total:\n{text}"
    );
    let missing: BTreeSet<&str> = unserved(&samples, &needs)
        .into_iter()
        .map(|(_, n)| n.metric.as_str())
        .collect();
    assert_eq!(
        missing,
        ["meshward_decisions_total"].into(),
        "the decision queries (and only they) find nothing:\n{text}"
    );
}

/// What keeps the filter's series is the `wasm` prefix Istio requires
/// (`wasmcustom.…` starts with it): without it every sidecar series the
/// queries read is dropped, which is also what the first test would report
/// if Istio stopped including it (the mesh would then need
/// `proxyStatsMatcher.inclusionPrefixes: [wasmcustom]`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istios_required_wasm_prefix_is_what_keeps_the_filter_series() {
    let needs = sidecar_needs(&monitoring_queries());
    let mut template = StatsTemplate::istio().unwrap();
    let before = template.stats_matcher.required_prefixes.len();
    template
        .stats_matcher
        .required_prefixes
        .retain(|p| p != "wasm");
    assert_eq!(template.stats_matcher.required_prefixes.len(), before - 1);
    let proxy = ProxyStatsConfig::from_mesh_manifests().unwrap();
    let mesh = Mesh::start().await;
    let backend =
        backend_after_traffic(&mesh, stats_config(&template, &proxy, &["127.0.0.1"])).await;
    let text = backend.admin().prometheus().await.unwrap();
    let samples = parse_exposition(&text);
    assert_eq!(
        unserved(&samples, &needs).len(),
        needs.len(),
        "no sidecar series is served without the wasm prefix:\n{}",
        meshward_lines(&text)
    );
    assert!(
        samples.iter().any(|s| s.name == "envoy_server_live"),
        "{text}"
    );
}
