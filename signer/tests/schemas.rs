//! What `istio-manifests/` and the Helm chart render, checked offline
//! against the schemas that decide at deploy time, by tools that are not
//! ours: a field the API server refuses, a CRD value Istio's admission
//! refuses, an alert rule Prometheus cannot load or an alert that can never
//! fire is found here instead of in a cluster.
//!
//! - Built-in kinds: Kubernetes' own OpenAPI schemas (PyPI
//!   kubernetes-validate, `scripts/kubernetes-validate`), strict, for every
//!   version of [`KUBERNETES_VERSIONS`].
//! - Istio's WasmPlugin, PeerAuthentication, EnvoyFilter and
//!   prometheus-operator's PrometheusRule, ServiceMonitor: their CRDs'
//!   `openAPIV3Schema` (committed in `tests/data/crds/`, source and version
//!   in its README), with list types and CEL rules.
//! - Alert rules: `promtool check rules` and `promtool test rules`
//!   (`istio-manifests/monitoring/tests/rules-test.yaml`: every alert fires
//!   in one case and stays quiet in another); every dashboard query parses
//!   with promtool.
//!
//! That those queries name only metrics the code registers is proven by
//! running code, not here: `alert_and_dashboard_metrics_exist_on_a_running_signer`
//! (tests/manifests.rs, the signer's `/metrics`) and
//! `istio_sidecar_stats_serve_every_series_the_dashboard_and_alerts_query_with_their_labels`
//! (e2e/tests/envoy_istio_stats.rs, the filter's series on real Envoy).
//!
//! Needs `MESHWARD_KUBERNETES_VALIDATE_PYTHON`, `MESHWARD_PROMTOOL`,
//! `MESHWARD_HELM` (all from `scripts/test`) and kubectl; without them the
//! tests fail, they never skip.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_yaml::Value as Yaml;

/// 1.32: the oldest Kubernetes where everything the manifests use is GA
/// (the StatefulSet's persistentVolumeClaimRetentionPolicy); 1.37: the
/// newest kubernetes-validate 1.37.0 ships, which catches an API a newer
/// cluster no longer serves.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.32", "1.37"];

/// Every kustomization under `istio-manifests/` a user may apply.
const KUSTOMIZATIONS: [&str; 6] = [
    "",
    "signer",
    "istio",
    "wasmplugin",
    "monitoring",
    "overlays/vault",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A tool's path from the environment `scripts/test` sets up.
fn tool(var: &str, script: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is unset: run scripts/test, or export {var}=\"$({script})\"")
    })
}

fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

fn stdout_of(command: &mut Command) -> String {
    let out = run(command);
    assert!(
        out.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn parse_stream(text: &str) -> Vec<Yaml> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| <Yaml as serde::Deserialize>::deserialize(d).unwrap())
        .filter(|d| !d.is_null())
        .collect()
}

fn to_stream(docs: &[Yaml]) -> String {
    docs.iter()
        .map(|d| format!("---\n{}", serde_yaml::to_string(d).unwrap()))
        .collect()
}

/// `kubectl kustomize istio-manifests/<rel>`.
fn kustomize(rel: &str) -> String {
    let dir = repo().join("istio-manifests").join(rel);
    stdout_of(Command::new("kubectl").arg("kustomize").arg(dir))
}

/// The chart's test values: `charts/meshward/ci/*-values.yaml`.
fn chart_ci_values() -> Vec<PathBuf> {
    let dir = repo().join("charts/meshward/ci");
    let mut values: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with("-values.yaml"))
        })
        .collect();
    values.sort();
    assert!(!values.is_empty(), "no {}/*-values.yaml", dir.display());
    values
}

/// `scripts/helm template meshward charts/meshward -f VALUES --namespace istio-system`.
fn helm_template(values: &Path) -> String {
    let helm = tool("MESHWARD_HELM", "scripts/helm --path");
    stdout_of(
        Command::new(helm)
            .args(["template", "meshward"])
            .arg(repo().join("charts/meshward"))
            .arg("-f")
            .arg(values)
            .args(["--namespace", "istio-system"]),
    )
}

/// One document checked against one schema (a line of
/// `support/validate_manifests.py`'s output).
#[derive(Clone, Debug, serde::Deserialize)]
struct Verdict {
    file: String,
    doc: usize,
    kind: Option<String>,
    name: Option<String>,
    against: String,
    ok: bool,
    errors: Vec<String>,
    cel_rules: usize,
}

/// Every document of every `(label, YAML stream)` through the validator.
fn validate(streams: &[(String, String)]) -> Vec<Verdict> {
    let python = tool(
        "MESHWARD_KUBERNETES_VALIDATE_PYTHON",
        "scripts/kubernetes-validate --python",
    );
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(python);
    command
        .arg(repo().join("signer/tests/support/validate_manifests.py"))
        .arg("--crds")
        .arg(repo().join("signer/tests/data/crds"));
    for v in KUBERNETES_VERSIONS {
        command.args(["--kubernetes-version", v]);
    }
    for (i, (label, text)) in streams.iter().enumerate() {
        let safe: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let path = dir.path().join(format!("{i}-{safe}.yaml"));
        std::fs::write(&path, text).unwrap();
        command.arg(path);
    }
    let out = run(&mut command);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let verdicts: Vec<Verdict> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let any_failed = verdicts.iter().any(|v| !v.ok);
    assert_eq!(
        out.status.code(),
        Some(if any_failed { 1 } else { 0 }),
        "validator exit status vs its verdicts: {stderr}"
    );
    verdicts
}

fn assert_all_pass(what: &str, verdicts: &[Verdict]) {
    let failures: Vec<String> = verdicts
        .iter()
        .filter(|v| !v.ok)
        .map(|v| {
            format!(
                "{} #{} {:?} {:?} against {}: {:?}",
                v.file, v.doc, v.kind, v.name, v.against, v.errors
            )
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{what}: refused by the schemas:\n{}",
        failures.join("\n")
    );
}

/// Each document got the schema its kind calls for: a built-in kind each
/// of [`KUBERNETES_VERSIONS`], a custom kind its CRD (CEL rules included
/// where the CRD has some).
fn assert_each_document_checked(label: &str, docs: &[Yaml], verdicts: &[Verdict]) {
    let custom = BTreeMap::from([
        (
            "WasmPlugin",
            "CRD wasmplugins.extensions.istio.io v1alpha1 (istio-wasmplugins.yaml)",
        ),
        (
            "PeerAuthentication",
            "CRD peerauthentications.security.istio.io v1 (istio-peerauthentications.yaml)",
        ),
        (
            "EnvoyFilter",
            "CRD envoyfilters.networking.istio.io v1alpha3 (istio-envoyfilters.yaml)",
        ),
        (
            "PrometheusRule",
            "CRD prometheusrules.monitoring.coreos.com v1 (prometheus-operator-prometheusrules.yaml)",
        ),
        (
            "ServiceMonitor",
            "CRD servicemonitors.monitoring.coreos.com v1 (prometheus-operator-servicemonitors.yaml)",
        ),
    ]);
    for (index, doc) in docs.iter().enumerate() {
        let kind = doc["kind"].as_str().unwrap();
        let name = doc["metadata"]["name"].as_str();
        let against: BTreeSet<&str> = verdicts
            .iter()
            .filter(|v| v.kind.as_deref() == Some(kind) && v.name.as_deref() == name)
            .map(|v| v.against.as_str())
            .collect();
        let expected: BTreeSet<String> = match custom.get(kind) {
            Some(crd) => BTreeSet::from([crd.to_string()]),
            None => KUBERNETES_VERSIONS
                .iter()
                .map(|v| format!("Kubernetes {v} (strict)"))
                .collect(),
        };
        let expected: BTreeSet<&str> = expected.iter().map(String::as_str).collect();
        assert_eq!(
            against, expected,
            "{label} #{index}: {kind} {name:?} was checked against the wrong schemas"
        );
        if matches!(kind, "WasmPlugin" | "PeerAuthentication" | "EnvoyFilter") {
            assert!(
                verdicts
                    .iter()
                    .filter(|v| v.kind.as_deref() == Some(kind) && v.name.as_deref() == name)
                    .all(|v| v.cel_rules > 0),
                "{label}: Istio's CEL rules were not evaluated for {kind} {name:?}"
            );
        }
    }
}

/// Renders of one source through the validator: all pass, each checked
/// against the schema its kind calls for. Returns every document.
fn assert_renders_pass(renders: Vec<(String, String)>) -> Vec<Yaml> {
    let verdicts = validate(&renders);
    assert_all_pass("rendered manifests", &verdicts);
    let mut all = Vec::new();
    for (i, (label, text)) in renders.iter().enumerate() {
        let docs = parse_stream(text);
        assert!(!docs.is_empty(), "{label} renders nothing");
        let mine: Vec<Verdict> = verdicts
            .iter()
            .filter(|v| v.file.contains(&format!("/{i}-")))
            .cloned()
            .collect();
        assert_each_document_checked(label, &docs, &mine);
        all.extend(docs);
    }
    all
}

#[test]
fn every_kustomization_passes_the_kubernetes_and_crd_schemas() {
    let renders: Vec<(String, String)> = KUSTOMIZATIONS
        .iter()
        .map(|rel| (format!("istio-manifests/{rel}"), kustomize(rel)))
        .collect();
    let docs = assert_renders_pass(renders);
    let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in [
        "StatefulSet",
        "WasmPlugin",
        "PeerAuthentication",
        "EnvoyFilter",
        "PrometheusRule",
    ] {
        assert!(kinds.contains(kind), "no {kind} rendered: {kinds:?}");
    }
}

/// The chart, for each of its test values (one per CA backend).
fn check_chart_against_schemas() {
    let renders: Vec<(String, String)> = chart_ci_values()
        .iter()
        .map(|values| (format!("chart {}", values.display()), helm_template(values)))
        .collect();
    let docs = assert_renders_pass(renders);
    // Some test values turn every optional object on: each custom kind the
    // chart can render is checked against its CRD at least once.
    let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in [
        "StatefulSet",
        "WasmPlugin",
        "PeerAuthentication",
        "EnvoyFilter",
        "PrometheusRule",
        "ServiceMonitor",
    ] {
        assert!(
            kinds.contains(kind),
            "no chart test values render a {kind}: {kinds:?}"
        );
    }
    // Whatever PrometheusRule the chart ships passes the same promtool
    // checks and unit tests as istio-manifests/'.
    for rule in docs
        .iter()
        .filter(|d| d["kind"].as_str() == Some("PrometheusRule"))
    {
        let dir = tempfile::tempdir().unwrap();
        let rules = write_rule_groups(dir.path(), &rule["spec"]);
        promtool_check_rules(&rules).unwrap();
        promtool_test_rules(dir.path()).unwrap();
    }
}

#[test]
fn every_chart_test_values_render_passes_the_kubernetes_and_crd_schemas() {
    check_chart_against_schemas();
}

// The validator refuses what an API server would: each case is a real
// rendered document with one defect.

fn rendered(kind: &str) -> Yaml {
    parse_stream(&kustomize(""))
        .into_iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("istio-manifests renders no {kind}"))
}

/// The one verdict's errors for `doc`, which must be refused.
fn refusal(doc: &Yaml) -> String {
    let verdicts = validate(&[("defect".into(), to_stream(std::slice::from_ref(doc)))]);
    assert!(!verdicts.is_empty());
    let errors: Vec<String> = verdicts
        .iter()
        .filter(|v| !v.ok)
        .flat_map(|v| v.errors.iter().map(|e| format!("{}: {e}", v.against)))
        .collect();
    assert!(
        !errors.is_empty(),
        "the validator passed a defective document:\n{}",
        serde_yaml::to_string(doc).unwrap()
    );
    errors.join("\n")
}

#[test]
fn statefulset_with_a_misspelled_container_field_is_refused() {
    let mut sts = rendered("StatefulSet");
    sts["spec"]["template"]["spec"]["containers"][0]["imagePullPolicey"] = "Always".into();
    let errors = refusal(&sts);
    assert!(
        errors.contains("'imagePullPolicey' was unexpected"),
        "{errors}"
    );
    // Refused by both Kubernetes versions.
    for v in KUBERNETES_VERSIONS {
        assert!(errors.contains(&format!("Kubernetes {v}")), "{errors}");
    }
}

#[test]
fn pod_disruption_budget_of_an_api_kubernetes_removed_is_refused() {
    let mut pdb = rendered("PodDisruptionBudget");
    pdb["apiVersion"] = "policy/v1beta1".into(); // removed in Kubernetes 1.25
    let errors = refusal(&pdb);
    assert!(errors.contains("unknown kind"), "{errors}");
}

#[test]
fn document_of_an_unknown_kind_is_refused() {
    let mut pa = rendered("PeerAuthentication");
    pa["kind"] = "PeerAuthenticaton".into();
    let errors = refusal(&pa);
    assert!(errors.contains("unknown kind"), "{errors}");
}

#[test]
fn wasmplugin_with_an_unknown_phase_is_refused() {
    let mut plugin = rendered("WasmPlugin");
    plugin["spec"]["phase"] = "BOGUS".into();
    let errors = refusal(&plugin);
    assert!(
        errors.contains("spec/phase: 'BOGUS' is not one of"),
        "{errors}"
    );
}

#[test]
fn wasmplugin_with_a_misspelled_spec_field_is_refused() {
    let mut plugin = rendered("WasmPlugin");
    plugin["spec"]["failStrategey"] = "FAIL_OPEN".into();
    let errors = refusal(&plugin);
    assert!(
        errors.contains("'failStrategey' was unexpected"),
        "{errors}"
    );
}

#[test]
fn wasmplugin_with_both_a_selector_and_target_refs_is_refused_by_istios_cel_rule() {
    let mut plugin = rendered("WasmPlugin");
    plugin["spec"]["targetRefs"] =
        serde_yaml::from_str("[{kind: Service, name: backend}]").unwrap();
    let errors = refusal(&plugin);
    assert!(
        errors.contains("only one of targetRefs or selector can be set"),
        "{errors}"
    );
}

#[test]
fn wasmplugin_of_a_version_istio_does_not_serve_is_refused() {
    let mut plugin = rendered("WasmPlugin");
    plugin["apiVersion"] = "extensions.istio.io/v1".into();
    let errors = refusal(&plugin);
    assert!(errors.contains("v1 is not a served version"), "{errors}");
}

#[test]
fn custom_resource_with_a_misspelled_metadata_field_is_refused() {
    let mut filter = rendered("EnvoyFilter");
    filter["metadata"]["lables"] = serde_yaml::from_str("{app: x}").unwrap();
    let errors = refusal(&filter);
    assert!(errors.contains("'lables' was unexpected"), "{errors}");
}

#[test]
fn prometheus_rule_with_two_groups_of_one_name_is_refused() {
    let mut rule = rendered("PrometheusRule");
    let groups = rule["spec"]["groups"].as_sequence_mut().unwrap();
    let first = groups[0].clone();
    groups.push(first);
    let errors = refusal(&rule);
    assert!(errors.contains("duplicate entry"), "{errors}");
}

/// The validator does not refuse what Istio accepts: valid uses of the
/// fields the manifests leave out (targetRefs, a scheme-less url, HOST env,
/// int-or-string port keys with a selector) pass, with their CEL rules run.
#[test]
fn istio_resources_using_fields_the_manifests_leave_out_are_accepted() {
    let docs = r#"
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: by-target-ref, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: ingress}]
  url: ghcr.io/meshward/meshward-filter:0.1.0
  priority: 10
  vmConfig:
    env: [{name: POD, valueFrom: HOST}, {name: MODE, value: enforce}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: db, namespace: shop}
spec:
  selector: {matchLabels: {app: postgres}}
  mtls: {mode: STRICT}
  portLevelMtls:
    "5432": {mode: PERMISSIVE}
"#;
    let verdicts = validate(&[("valid".into(), docs.into())]);
    assert_all_pass("valid Istio resources", &verdicts);
    assert_eq!(verdicts.len(), 2);
    assert!(verdicts.iter().all(|v| v.cel_rules >= 4), "{verdicts:?}");
}

// Alert rules and dashboard queries through promtool.

fn promtool() -> String {
    tool("MESHWARD_PROMTOOL", "scripts/promtool --path")
}

fn manifest(rel: &str) -> String {
    let path = repo().join("istio-manifests").join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The PrometheusRule's `spec` (its rule groups) as the plain rules file
/// Prometheus loads, beside a copy of the unit tests that read it.
fn write_rule_groups(dir: &Path, spec: &Yaml) -> PathBuf {
    let rules = dir.join("prometheus-rules.extracted.yaml");
    std::fs::write(&rules, serde_yaml::to_string(spec).unwrap()).unwrap();
    std::fs::write(
        dir.join("rules-test.yaml"),
        manifest("monitoring/tests/rules-test.yaml"),
    )
    .unwrap();
    rules
}

fn shipped_rule_groups() -> Yaml {
    let rule: Yaml = serde_yaml::from_str(&manifest("monitoring/prometheus-rules.yaml")).unwrap();
    rule["spec"].clone()
}

fn promtool_check_rules(rules: &Path) -> Result<String, String> {
    let out = run(Command::new(promtool()).args(["check", "rules"]).arg(rules));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

fn promtool_test_rules(dir: &Path) -> Result<String, String> {
    let out =
        run(Command::new(promtool())
            .current_dir(dir)
            .args(["test", "rules", "rules-test.yaml"]));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

fn alert_names(groups: &Yaml) -> BTreeSet<String> {
    groups["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap())
        .filter_map(|r| r["alert"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn prometheus_rule_groups_pass_promtool_check_rules() {
    let dir = tempfile::tempdir().unwrap();
    let groups = shipped_rule_groups();
    let rules = write_rule_groups(dir.path(), &groups);
    let out = promtool_check_rules(&rules).unwrap_or_else(|e| panic!("promtool check rules: {e}"));
    let count: usize = groups["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|g| g["rules"].as_sequence().unwrap().len())
        .sum();
    assert!(
        out.contains(&format!("SUCCESS: {count} rules found")),
        "{out}"
    );
}

#[test]
fn every_alert_fires_and_stays_quiet_in_promtool_unit_tests() {
    let dir = tempfile::tempdir().unwrap();
    let groups = shipped_rule_groups();
    write_rule_groups(dir.path(), &groups);
    let out =
        promtool_test_rules(dir.path()).unwrap_or_else(|e| panic!("promtool test rules: {e}"));
    assert!(out.contains("SUCCESS"), "{out}");

    // promtool checks what each case expects; this checks that every
    // alert has a case of each kind, so a new alert without tests fails.
    let tests: Yaml = serde_yaml::from_str(&manifest("monitoring/tests/rules-test.yaml")).unwrap();
    let mut fires = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for group in tests["tests"].as_sequence().unwrap() {
        for case in group["alert_rule_test"].as_sequence().unwrap() {
            let name = case["alertname"].as_str().unwrap().to_owned();
            let expected = case["exp_alerts"].as_sequence().unwrap();
            if expected.is_empty() {
                quiet.insert(name);
            } else {
                for alert in expected {
                    assert!(
                        alert["exp_labels"]["severity"].is_string()
                            && alert["exp_annotations"]["summary"].is_string(),
                        "{name}: a firing case asserts its severity and summary"
                    );
                }
                fires.insert(name);
            }
        }
    }
    let alerts = alert_names(&groups);
    assert!(alerts.len() >= 20, "{alerts:?}");
    let untested: Vec<_> = alerts.difference(&fires).collect();
    assert!(
        untested.is_empty(),
        "alerts with no firing case: {untested:?}"
    );
    let unquiet: Vec<_> = alerts.difference(&quiet).collect();
    assert!(unquiet.is_empty(), "alerts with no quiet case: {unquiet:?}");
    let stale: Vec<_> = fires
        .union(&quiet)
        .filter(|a| !alerts.contains(*a))
        .collect();
    assert!(
        stale.is_empty(),
        "tests of alerts that do not exist: {stale:?}"
    );
}

/// The unit tests hold the thresholds: an alert that no longer fires where
/// it should (here MeshwardSignerRefusingRequests at 50% instead of 5%)
/// fails them.
#[test]
fn promtool_unit_tests_fail_when_an_alert_threshold_moves() {
    let dir = tempfile::tempdir().unwrap();
    let mut groups = shipped_rule_groups();
    let rule = groups["groups"]
        .as_sequence_mut()
        .unwrap()
        .iter_mut()
        .flat_map(|g| g["rules"].as_sequence_mut().unwrap().iter_mut())
        .find(|r| r["alert"].as_str() == Some("MeshwardSignerRefusingRequests"))
        .unwrap();
    let expr = rule["expr"].as_str().unwrap().replace("> 0.05", "> 0.5");
    rule["expr"] = expr.into();
    write_rule_groups(dir.path(), &groups);
    let err = promtool_test_rules(dir.path()).expect_err("the moved threshold passed");
    assert!(
        err.contains("MeshwardSignerRefusingRequests fires"),
        "{err}"
    );
}

/// Grafana's variables replaced by values that keep the query valid PromQL:
/// intervals by a duration, the others (label values, in strings) by a word.
fn substitute_grafana_variables(expr: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let (name, len) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').expect("unclosed ${");
            let name = braced[..end].split(':').next().unwrap();
            (name, end + 2)
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        assert!(!name.is_empty(), "a lone $ in {expr:?}");
        out.push_str(match name {
            "__rate_interval" | "__interval" | "__range" => "5m",
            "__interval_ms" | "__range_ms" => "300000",
            "__range_s" => "300",
            _ => "placeholder",
        });
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// Every PromQL expression of the dashboard: its panels' (and rows'
/// nested panels') targets, and its query variables.
fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&manifest("monitoring/meshward-dashboard.json")).unwrap();
    fn panels(v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for panel in v["panels"].as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    let title = panel["title"].as_str().unwrap_or("?");
                    out.push((format!("panel {title:?} {}", target["refId"]), expr.into()));
                }
            }
            panels(panel, out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard, &mut out);
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"].as_str() != Some("query") {
            continue;
        }
        let query = var["query"]
            .as_str()
            .or_else(|| var["query"]["query"].as_str())
            .unwrap();
        // label_values(EXPR, label) and query_result(EXPR) wrap PromQL.
        let expr = query
            .strip_prefix("query_result(")
            .and_then(|q| q.strip_suffix(')'))
            .map(str::to_owned)
            .or_else(|| {
                let inner = query.strip_prefix("label_values(")?.strip_suffix(')')?;
                let (expr, _label) = inner.rsplit_once(',')?;
                Some(expr.trim().to_owned())
            })
            .unwrap_or_else(|| panic!("variable {}: query {query:?} not understood", var["name"]));
        out.push((format!("variable {}", var["name"]), expr));
    }
    out
}

/// The queries as recording rules through `promtool check rules`, which
/// parses each with Prometheus' own parser.
fn promtool_parse_queries(queries: &[(String, String)]) -> Result<String, String> {
    let rules: Vec<Yaml> = queries
        .iter()
        .enumerate()
        .map(|(i, (_, expr))| {
            let mut rule = serde_yaml::Mapping::new();
            rule.insert("record".into(), format!("dashboard:query_{i}").into());
            rule.insert("expr".into(), substitute_grafana_variables(expr).into());
            Yaml::Mapping(rule)
        })
        .collect();
    let mut group = serde_yaml::Mapping::new();
    group.insert("name".into(), "meshward-dashboard".into());
    group.insert("rules".into(), Yaml::Sequence(rules));
    let mut file = serde_yaml::Mapping::new();
    file.insert("groups".into(), Yaml::Sequence(vec![Yaml::Mapping(group)]));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard-queries.yaml");
    std::fs::write(&path, serde_yaml::to_string(&Yaml::Mapping(file)).unwrap()).unwrap();
    promtool_check_rules(&path).map_err(|e| {
        let listing: Vec<String> = queries
            .iter()
            .enumerate()
            .map(|(i, (where_, expr))| format!("dashboard:query_{i} = {where_}: {expr}"))
            .collect();
        format!("{e}\n{}", listing.join("\n"))
    })
}

#[test]
fn every_dashboard_query_parses_with_promtool() {
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "{queries:?}");
    let out = promtool_parse_queries(&queries).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{out}"
    );
}

#[test]
fn dashboard_query_with_an_unbalanced_parenthesis_is_refused() {
    let queries = vec![(
        "broken".to_owned(),
        "sum(rate(meshward_signer_requests_total[5m])".to_owned(),
    )];
    let err = promtool_parse_queries(&queries).expect_err("promtool parsed a broken query");
    assert!(err.contains("dashboard:query_0"), "{err}");
}

#[test]
fn grafana_variables_become_valid_promql() {
    assert_eq!(
        substitute_grafana_variables(
            r#"sum(rate(meshward_decisions_total{namespace="$namespace", pod=~"${pod:regex}"}[$__rate_interval]))"#
        ),
        r#"sum(rate(meshward_decisions_total{namespace="placeholder", pod=~"placeholder"}[5m]))"#
    );
    assert_eq!(substitute_grafana_variables("up"), "up");
}
