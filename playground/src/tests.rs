#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{Value, json};

use super::evaluate_json;

const NOW: i64 = 1_800_000_000;

/// The HTTP example from `istio-manifests/wasmplugin/wasmplugin-http.yaml`.
fn http_config() -> Value {
    json!({
        "trustDomain": "cluster.local",
        "mode": "enforce",
        "requireMtls": true,
        "unknownCertAge": "deny",
        "rules": [
            {"name": "deny-batch", "action": "DENY", "from": [{"namespaces": ["batch"]}]},
            {"name": "frontend-reads-api", "action": "ALLOW",
             "from": [{"principals": ["cluster.local/ns/shop/sa/frontend"]}],
             "to": [{"methods": ["GET"], "paths": ["/api/*"]}],
             "when": {"maxCertAge": "36h", "minRemainingValidity": "10m"}}
        ]
    })
}

fn ask(config: Value, uri: Option<&str>, method: &str, path: &str, age: i64) -> Value {
    let query = json!({
        "config": config,
        "peer": {"mtls": uri.is_some(), "uriSan": uri,
                 "notBefore": NOW - age, "notAfter": NOW - age + 24 * 3600},
        "request": {"method": method, "path": path, "host": "backend.shop"},
        "now": NOW,
    });
    serde_json::from_str(&evaluate_json(query.to_string().as_bytes())).unwrap()
}

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";

#[test]
fn the_playground_decides_as_the_plugin_does() {
    let a = ask(http_config(), Some(FRONTEND), "GET", "/api/items", 3600);
    assert_eq!(a["status"], "decided");
    assert_eq!(a["verdict"], "allow");
    assert_eq!(a["rule"], "frontend-reads-api");
    assert_eq!(a["reason"], "allow_rule");
    assert_eq!(a["certAgeSecs"], 3600);
    assert_eq!(a["rules"], 2);
    assert_eq!(a["filterType"], "http");

    let a = ask(http_config(), Some(FRONTEND), "POST", "/api/items", 3600);
    assert_eq!(a["verdict"], "deny");
    assert_eq!(a["reason"], "no_allow_rule_matched");
    assert_eq!(a["explanation"], "no ALLOW rule matched");

    let a = ask(
        http_config(),
        Some("spiffe://cluster.local/ns/batch/sa/job"),
        "GET",
        "/api/items",
        60,
    );
    assert_eq!(a["verdict"], "deny");
    assert_eq!(a["rule"], "deny-batch");
}

#[test]
fn an_old_certificate_is_denied_by_max_cert_age() {
    let a = ask(
        http_config(),
        Some(FRONTEND),
        "GET",
        "/api/items",
        40 * 3600,
    );
    assert_eq!(a["verdict"], "deny");
    assert_eq!(a["reason"], "no_allow_rule_matched");
}

#[test]
fn a_plaintext_peer_is_denied_when_mtls_is_required() {
    let a = ask(http_config(), None, "GET", "/api/items", 60);
    assert_eq!(a["verdict"], "deny");
    assert_eq!(a["reason"], "plaintext_peer");
}

#[test]
fn a_dot_segment_path_cannot_reach_an_allowed_prefix() {
    let a = ask(http_config(), Some(FRONTEND), "GET", "/api/../admin", 60);
    assert_eq!(a["verdict"], "deny");
    assert_eq!(a["reason"], "ambiguous_path");
}

#[test]
fn a_config_the_plugin_refuses_is_refused_here() {
    let mut config = http_config();
    config["rules"][0]["action"] = json!("MAYBE");
    let a = ask(config, Some(FRONTEND), "GET", "/api/items", 60);
    assert_eq!(a["status"], "configRefused");
    assert!(a["error"].as_str().unwrap().contains("MAYBE"), "{a}");

    let mut config = http_config();
    config["surprise"] = json!(true);
    let a = ask(config, Some(FRONTEND), "GET", "/api/items", 60);
    assert_eq!(a["status"], "configRefused");
}

#[test]
fn a_network_policy_decides_on_the_port_only() {
    let config = json!({
        "filterType": "network",
        "rules": [{"name": "backend-only", "action": "ALLOW",
                   "from": [{"principals": ["cluster.local/ns/shop/sa/backend"]}],
                   "to": [{"ports": ["5432"]}]}]
    });
    let query = json!({
        "config": config,
        "peer": {"mtls": true, "uriSan": "spiffe://cluster.local/ns/shop/sa/backend"},
        "request": {"port": 5432, "path": "/ignored"},
        "now": NOW,
    });
    let a: Value = serde_json::from_str(&evaluate_json(query.to_string().as_bytes())).unwrap();
    assert_eq!(a["verdict"], "allow", "{a}");
    assert_eq!(a["filterType"], "network");
}

#[test]
fn malformed_queries_are_answered_not_panicked_on() {
    for bad in [
        &b"not json"[..],
        b"{}",
        b"[]",
        b"\xff\xfe",
        b"{\"config\":1}",
    ] {
        let a: Value = serde_json::from_str(&evaluate_json(bad)).unwrap();
        assert_eq!(a["status"], "badQuery", "{a}");
    }
}

#[test]
fn a_whole_wasm_plugin_resource_is_decided_by_its_plugin_config() {
    // What `kubectl get wasmplugin meshward -o json` prints.
    let resource = json!({
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": {"name": "meshward", "namespace": "shop"},
        "spec": {"url": "oci://registry/meshward-filter:0.1.0", "failStrategy": "FAIL_CLOSE",
                 "pluginConfig": http_config()},
    });
    let a = ask(resource.clone(), Some(FRONTEND), "GET", "/api/items", 3600);
    assert_eq!(a["verdict"], "allow", "{a}");
    assert_eq!(a["rule"], "frontend-reads-api");
    let a = ask(resource, Some(FRONTEND), "POST", "/api/items", 3600);
    assert_eq!(a["verdict"], "deny", "{a}");

    let mut empty = json!({"kind": "WasmPlugin", "spec": {"url": "oci://x"}});
    let a = ask(empty.clone(), Some(FRONTEND), "GET", "/api/items", 60);
    assert_eq!(a["status"], "configRefused");
    assert!(
        a["error"].as_str().unwrap().contains("spec.pluginConfig"),
        "{a}"
    );
    // Any other kind is a plugin config, which has no `kind`: refused.
    empty["kind"] = json!("EnvoyFilter");
    let a = ask(empty, Some(FRONTEND), "GET", "/api/items", 60);
    assert_eq!(a["status"], "configRefused", "{a}");
}

fn ask_text(text: &str, method: &str) -> Value {
    let query = json!({
        "configText": text,
        "peer": {"mtls": true, "uriSan": FRONTEND,
                 "notBefore": NOW - 3600, "notAfter": NOW + 20 * 3600},
        "request": {"method": method, "path": "/api/items", "host": "backend.shop"},
        "now": NOW,
    });
    serde_json::from_str(&evaluate_json(query.to_string().as_bytes())).unwrap()
}

const SHIPPED_HTTP: &str = include_str!("../../istio-manifests/wasmplugin/wasmplugin-http.yaml");

#[test]
fn the_shipped_wasm_plugin_yaml_pasted_as_is_is_decided_by_its_plugin_config() {
    // Its pluginConfig, as Istio hands it to the plugin, is this file's
    // JSON example: the two cannot drift apart.
    let parsed = super::parse_config_text(SHIPPED_HTTP).unwrap();
    assert_eq!(super::plugin_config(&parsed).unwrap(), &http_config());

    let a = ask_text(SHIPPED_HTTP, "GET");
    assert_eq!(a["verdict"], "allow", "{a}");
    assert_eq!(a["rule"], "frontend-reads-api");
    assert_eq!(ask_text(SHIPPED_HTTP, "POST")["verdict"], "deny");

    // What `kubectl get wasmplugin -o yaml` adds around it changes nothing.
    let printed = format!(
        "{}\n  uid: 6a1e0f7e-0000-4000-8000-000000000000\n  resourceVersion: \"4711\"\n\
         status:\n  conditions: []\n",
        SHIPPED_HTTP.replace(
            "metadata:\n",
            "metadata:\n  annotations:\n    kubectl.kubernetes.io/last-applied-configuration: |\n      {\"kind\":\"WasmPlugin\"}\n  creationTimestamp: \"2026-11-26T10:00:00Z\"\n  generation: 1\n",
        ),
    );
    let a = ask_text(&printed, "GET");
    assert_eq!(a["verdict"], "allow", "{a}");
}

#[test]
fn yaml_and_json_text_of_one_plugin_config_decide_alike() {
    let yaml = "trustDomain: cluster.local\nrequireMtls: true\nrules:\n\
                - name: frontend-reads-api\n  action: ALLOW\n\
                \x20 from: [{principals: [cluster.local/ns/shop/sa/frontend]}]\n\
                \x20 to: [{methods: [GET]}]\n";
    let json_text = r#"{"trustDomain": "cluster.local", "requireMtls": true, "rules": [
        {"name": "frontend-reads-api", "action": "ALLOW",
         "from": [{"principals": ["cluster.local/ns/shop/sa/frontend"]}],
         "to": [{"methods": ["GET"]}]}]}"#;
    for method in ["GET", "POST"] {
        assert_eq!(ask_text(yaml, method), ask_text(json_text, method));
    }
    assert_eq!(ask_text(yaml, "GET")["verdict"], "allow");
    // JSON that is not valid says so as JSON.
    let a = ask_text("{\"rules\": [", "GET");
    assert_eq!(a["status"], "configRefused");
    assert!(
        a["error"].as_str().unwrap().contains("not valid JSON"),
        "{a}"
    );
}

#[test]
fn several_yaml_documents_or_none_are_refused() {
    let two = format!("{SHIPPED_HTTP}---\n{SHIPPED_HTTP}");
    let a = ask_text(&two, "GET");
    assert_eq!(a["status"], "configRefused", "{a}");
    assert!(a["error"].as_str().unwrap().contains("several"), "{a}");
    for empty in ["", "   \n", "# only a comment\n", "~"] {
        let a = ask_text(empty, "GET");
        assert_eq!(a["status"], "configRefused", "{empty:?}: {a}");
    }
}

/// A "billion laughs" document: nine levels of aliases, each repeating the
/// previous nine times. Expanded, it is 10^9 strings; the page would hang
/// or run out of memory. It is refused instead.
#[test]
fn yaml_alias_bomb_is_refused_without_being_expanded() {
    let mut bomb = String::from(
        "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
    for pair in names.windows(2) {
        let (prev, next) = (pair[0], pair[1]);
        bomb.push_str(&format!(
            "{next}: &{next} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"
        ));
    }
    let a = ask_text(&bomb, "GET");
    assert_eq!(a["status"], "configRefused", "{a}");
    // Refused by the YAML reader, before any expansion reaches the config.
    assert!(
        a["error"].as_str().unwrap().contains("not valid YAML"),
        "{a}"
    );
}

#[test]
fn config_and_config_text_together_are_a_bad_query() {
    let query = json!({
        "config": http_config(), "configText": SHIPPED_HTTP,
        "peer": {"mtls": true}, "now": NOW,
    });
    let a: Value = serde_json::from_str(&evaluate_json(query.to_string().as_bytes())).unwrap();
    assert_eq!(a["status"], "badQuery", "{a}");
}
