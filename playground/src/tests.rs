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
