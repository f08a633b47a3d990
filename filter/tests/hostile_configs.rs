//! Configs written to break the plugin. Each test is named after the attack
//! or mistake it stops. Every refusal must name the field and the value.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use meshward_filter::{ConfigError, Peer, Policy, Request, UnixTime, Verdict};

fn refuse(json: &str) -> ConfigError {
    match Policy::from_json(json.as_bytes()) {
        Ok(_) => panic!("accepted: {json}"),
        Err(e) => e,
    }
}

fn refuse_naming(json: &str, field: &str, value: &str) {
    let e = refuse(json);
    let text = e.to_string();
    assert!(text.contains(field) && text.contains(value), "{text}");
}

fn rule(body: &str) -> String {
    format!(r#"{{"rules":[{{"name":"r","action":"ALLOW",{body}}}]}}"#)
}

#[test]
fn empty_plugin_config_fails_closed() {
    assert_eq!(refuse(""), ConfigError::Empty);
    assert_eq!(refuse(" \n"), ConfigError::Empty);
    assert!(refuse("").to_string().contains("fail closed"));
}

#[test]
fn unknown_top_level_field_is_refused() {
    refuse_naming(r#"{"requireMTLS": false}"#, "unknown field", "requireMTLS");
}

#[test]
fn misspelled_rule_field_cannot_silently_widen_a_rule() {
    // `principal` (singular) would otherwise be ignored and the rule would match everyone.
    refuse_naming(
        &rule(r#""from":[{"principal":["cluster.local/ns/a/sa/b"]}]"#),
        "unknown field",
        "principal",
    );
    refuse_naming(&rule(r#""to":[{"path":["/x"]}]"#), "unknown field", "path");
    refuse_naming(
        &rule(r#""when":{"maxAge":"1h"}"#),
        "unknown field",
        "maxAge",
    );
}

#[test]
fn lowercase_action_or_mode_is_refused() {
    refuse_naming(
        r#"{"rules":[{"name":"r","action":"allow"}]}"#,
        "unknown variant",
        "allow",
    );
    refuse_naming(r#"{"mode":"audit"}"#, "unknown variant", "audit");
    refuse_naming(r#"{"unknownCertAge":"maybe"}"#, "unknown variant", "maybe");
}

#[test]
fn regex_looking_principal_is_refused_not_interpreted() {
    refuse_naming(
        &rule(r#""from":[{"principals":["cluster.local/ns/.*/sa/web"]}]"#),
        "rules[0].from[0].principals[0]",
        ".*",
    );
    refuse_naming(
        &rule(r#""from":[{"principals":["cluster.local/ns/[a-z]+/sa/web"]}]"#),
        "principals[0]",
        "[a-z]+",
    );
    refuse_naming(
        &rule(r#""from":[{"principals":["^cluster.local/ns/a/sa/web$"]}]"#),
        "principals[0]",
        "^cluster",
    );
}

#[test]
fn regex_looking_path_is_a_literal() {
    let p = Policy::from_json(rule(r#""to":[{"paths":["/api/v1.0/(x)+"]}]"#).as_bytes()).unwrap();
    let peer = Peer::from_connection(true, Some("spiffe://cluster.local/ns/a/sa/b"), None);
    let at = |path| {
        p.authorize(
            &peer,
            &Request::http(None, Some("GET"), Some(path), None),
            UnixTime(0),
        )
        .verdict
    };
    assert_eq!(at("/api/v1.0/(x)+"), Verdict::Allow);
    assert_eq!(at("/api/v100/xx"), Verdict::Deny);
    assert_eq!(at("/api/v1.0/x"), Verdict::Deny);
}

#[test]
fn dot_in_a_principal_is_not_a_wildcard() {
    let p = Policy::from_json(
        rule(r#""from":[{"principals":["cluster.local/ns/a.c/sa/web"]}]"#).as_bytes(),
    )
    .unwrap();
    let abc = Peer::from_connection(true, Some("spiffe://cluster.local/ns/abc/sa/web"), None);
    assert_eq!(
        p.authorize(&abc, &Request::tcp(None), UnixTime(0)).verdict,
        Verdict::Deny
    );
}

#[test]
fn wildcard_in_the_middle_or_both_ends_is_refused() {
    refuse_naming(
        &rule(r#""from":[{"principals":["cluster.local/ns/*/sa/web"]}]"#),
        "principals[0]",
        "*",
    );
    refuse_naming(
        &rule(r#""to":[{"paths":["*admin*"]}]"#),
        "paths[0]",
        "*admin*",
    );
    refuse_naming(&rule(r#""to":[{"hosts":["**"]}]"#), "hosts[0]", "**");
}

#[test]
fn empty_lists_are_refused_instead_of_meaning_anything() {
    refuse_naming(&rule(r#""from":[]"#), "rules[0].from", "[]");
    refuse_naming(&rule(r#""to":[]"#), "rules[0].to", "[]");
    refuse_naming(
        &rule(r#""from":[{"principals":[]}]"#),
        "rules[0].from[0].principals",
        "[]",
    );
    refuse_naming(
        &rule(r#""from":[{"notNamespaces":[]}]"#),
        "notNamespaces",
        "[]",
    );
    refuse_naming(
        &rule(r#""to":[{"ports":[]}]"#),
        "rules[0].to[0].ports",
        "[]",
    );
    refuse_naming(&rule(r#""from":[{}]"#), "rules[0].from[0]", "no fields");
    refuse_naming(&rule(r#""to":[{}]"#), "rules[0].to[0]", "no fields");
    refuse_naming(&rule(r#""when":{}"#), "rules[0].when", "no conditions");
    refuse_naming(
        &rule(r#""from":[{"principals":[""]}]"#),
        "principals[0]",
        "empty",
    );
}

#[test]
fn duplicate_rule_names_are_refused() {
    refuse_naming(
        r#"{"rules":[{"name":"same","action":"ALLOW"},{"name":"same","action":"DENY"}]}"#,
        "rules[1].name",
        "same",
    );
}

#[test]
fn rule_names_that_would_break_metric_tags_are_refused() {
    for bad in ["a;b", "a.b", "a=b", "", "_reserved", "with space", "ünï"] {
        let json = format!(r#"{{"rules":[{{"name":"{bad}","action":"ALLOW"}}]}}"#);
        refuse_naming(&json, "rules[0].name", bad);
    }
    let long = "a".repeat(64);
    refuse_naming(
        &format!(r#"{{"rules":[{{"name":"{long}","action":"ALLOW"}}]}}"#),
        "rules[0].name",
        "aaaa",
    );
}

#[test]
fn invalid_durations_are_refused_with_field_and_value() {
    for bad in [
        "",
        "12",
        "1.5h",
        "-1h",
        "1y",
        "0s",
        "12 hours",
        "30m1h",
        "99999999999999999999h",
    ] {
        let json = rule(&format!(r#""when":{{"maxCertAge":"{bad}"}}"#));
        refuse_naming(&json, "rules[0].when.maxCertAge", bad);
    }
    refuse_naming(
        &rule(r#""when":{"minRemainingValidity":"soon"}"#),
        "rules[0].when.minRemainingValidity",
        "soon",
    );
    refuse_naming(&rule(r#""when":{"maxCertAge":12}"#), "invalid type", "12");
}

#[test]
fn invalid_ports_are_refused() {
    for bad in [
        r#""0""#,
        r#""65536""#,
        r#""*""#,
        r#""80-90""#,
        "-1",
        r#""+80""#,
        r#""""#,
    ] {
        let json = rule(&format!(r#""to":[{{"ports":[{bad}]}}]"#));
        let e = refuse(&json);
        assert!(
            e.to_string().contains("rules[0].to[0].ports[0]"),
            "{bad}: {e}"
        );
    }
    assert!(Policy::from_json(rule(r#""to":[{"ports":["8080", 9090]}]"#).as_bytes()).is_ok());
}

#[test]
fn principal_that_is_not_a_spiffe_id_is_refused() {
    for bad in [
        "cluster.local/ns/a/sa/b/",
        "cluster.local/ns//sa/b",
        "cluster.local/ns/../sa/b",
        "cluster.local/ns/a%20b/sa/c",
        "https://cluster.local/ns/a",
        "cluster.local",
    ] {
        let json = rule(&format!(r#""from":[{{"principals":["{bad}"]}}]"#));
        refuse_naming(&json, "rules[0].from[0].principals[0]", bad);
    }
}

#[test]
fn uppercase_trust_domain_prefix_is_refused_rather_than_never_matching() {
    refuse_naming(
        &rule(r#""from":[{"principals":["Cluster.Local/ns/*"]}]"#),
        "principals[0]",
        "Cluster.Local",
    );
    refuse_naming(
        &rule(r#""from":[{"trustDomains":["Cluster.Local"]}]"#),
        "trustDomains[0]",
        "Cluster.Local",
    );
    refuse_naming(
        r#"{"trustDomain":"Cluster.Local"}"#,
        "trustDomain",
        "Cluster.Local",
    );
    refuse_naming(
        r#"{"trustDomain":"spiffe://cluster.local"}"#,
        "trustDomain",
        "spiffe://",
    );
}

#[test]
fn path_with_query_is_refused_because_it_could_never_match() {
    refuse_naming(
        &rule(r#""to":[{"paths":["/a?b=c"]}]"#),
        "paths[0]",
        "/a?b=c",
    );
    refuse_naming(
        &rule(r#""to":[{"paths":["admin*"]}]"#),
        "paths[0]",
        "admin*",
    );
}

#[test]
fn ten_thousand_rules_compile_and_decide_correctly() {
    let mut rules: Vec<String> = (0..10_000)
        .map(|i| format!(r#"{{"name":"r{i}","action":"ALLOW","from":[{{"principals":["cluster.local/ns/n{i}/sa/s{i}"]}}]}}"#))
        .collect();
    rules.push(r#"{"name":"deny-9999","action":"DENY","from":[{"principals":["cluster.local/ns/n9999/*"]}]}"#.into());
    let json = format!(r#"{{"rules":[{}]}}"#, rules.join(","));
    let p = Policy::from_json(json.as_bytes()).unwrap();
    assert_eq!(p.rule_count(), 10_001);
    let at = |id: &str| {
        let peer = Peer::from_connection(true, Some(id), None);
        let d = p.authorize(&peer, &Request::tcp(None), UnixTime(0));
        (d.verdict, d.rule.map(str::to_string))
    };
    assert_eq!(
        at("spiffe://cluster.local/ns/n5000/sa/s5000"),
        (Verdict::Allow, Some("r5000".into()))
    );
    assert_eq!(
        at("spiffe://cluster.local/ns/n9999/sa/s9999"),
        (Verdict::Deny, Some("deny-9999".into()))
    );
    assert_eq!(
        at("spiffe://cluster.local/ns/n5000/sa/s5001"),
        (Verdict::Deny, None)
    );
}

#[test]
fn one_megabyte_config_is_accepted_and_a_huge_one_refused() {
    let principals: Vec<String> = (0..31_000)
        .map(|i| format!(r#""cluster.local/ns/n{i}/sa/web""#))
        .collect();
    let json = rule(&format!(
        r#""from":[{{"principals":[{}]}}]"#,
        principals.join(",")
    ));
    assert!(json.len() >= 1_000_000, "{}", json.len());
    let p = Policy::from_json(json.as_bytes()).unwrap();
    let peer = Peer::from_connection(true, Some("spiffe://cluster.local/ns/n30999/sa/web"), None);
    assert_eq!(
        p.authorize(&peer, &Request::tcp(None), UnixTime(0)).verdict,
        Verdict::Allow
    );

    let huge = format!(r#"{{"rules":[],"x":"{}"}}"#, "a".repeat(5 * 1024 * 1024));
    assert!(matches!(refuse(&huge), ConfigError::TooLarge { .. }));
}

#[test]
fn deeply_nested_json_is_an_error_not_a_stack_overflow() {
    let json = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(matches!(refuse(&json), ConfigError::Json(_)));
}

#[test]
fn non_utf8_and_non_object_configs_are_refused() {
    assert!(matches!(
        Policy::from_json(&[0xff, 0xfe, b'{', b'}']),
        Err(ConfigError::Json(_))
    ));
    refuse_naming("[]", "pluginConfig", "JSON object");
    refuse_naming(r#"{"rules":[["r","ALLOW"]]}"#, "rules[0]", "JSON object");
    refuse_naming(
        r#"{"rules":[{"name":"r","action":"ALLOW","from":[[["cluster.local/ns/a/sa/b"]]]}]}"#,
        "rules[0].from[0]",
        "JSON object",
    );
    refuse_naming(
        r#"{"rules":[{"name":"r","action":"ALLOW","when":["1h"]}]}"#,
        "rules[0].when",
        "JSON object",
    );
    refuse_naming("null", "pluginConfig", "JSON object");
    assert!(matches!(refuse(r#"{"rules":{}}"#), ConfigError::Json(_)));
}

#[test]
fn overlong_pattern_is_refused() {
    let long = format!("cluster.local/{}*", "a".repeat(2100));
    refuse_naming(
        &rule(&format!(r#""from":[{{"principals":["{long}"]}}]"#)),
        "principals[0]",
        "longer than",
    );
}

#[test]
fn misspelled_ledger_field_is_refused_not_defaulted() {
    refuse_naming(
        r#"{"ledger":{"cluster":"c","authority":"a","cacheTTL":"1h"}}"#,
        "unknown field",
        "cacheTTL",
    );
    // serde would take a 5-element array for the struct.
    refuse_naming(
        r#"{"ledger":["c","a","200ms","5m","30s"]}"#,
        "ledger: must be a JSON object",
        "[",
    );
    refuse_naming(
        r#"{"ledger":{"authority":"a"}}"#,
        "missing field",
        "cluster",
    );
}

#[test]
fn ledger_authority_that_could_rewrite_the_callout_is_refused() {
    refuse_naming(
        r#"{"ledger":{"cluster":"c","authority":"signer/../admin"}}"#,
        "ledger.authority",
        "signer/../admin",
    );
    refuse_naming(
        r#"{"ledger":{"cluster":"c","authority":"signer\r\nx-injected: 1"}}"#,
        "ledger.authority",
        "signer",
    );
}

#[test]
fn ledger_timeout_and_ttls_outside_their_bounds_are_refused() {
    refuse_naming(
        r#"{"ledger":{"cluster":"c","authority":"a","timeout":"1h"}}"#,
        "ledger.timeout",
        "1h",
    );
    refuse_naming(
        r#"{"ledger":{"cluster":"c","authority":"a","cacheTtl":"30d"}}"#,
        "ledger.cacheTtl",
        "30d",
    );
    refuse_naming(
        r#"{"ledger":{"cluster":"c","authority":"a","cacheTtl":"1m","negativeCacheTtl":"5m"}}"#,
        "ledger.negativeCacheTtl",
        "5m",
    );
    let ok = Policy::from_json(
        br#"{"ledger":{"cluster":"outbound|15014||meshward-signer.istio-system.svc.cluster.local","authority":"meshward-signer.istio-system.svc","timeout":"200ms","cacheTtl":"5m","negativeCacheTtl":"30s"}}"#,
    )
    .unwrap();
    let ledger = ok.ledger().unwrap();
    assert_eq!(
        (
            ledger.timeout_ms,
            ledger.cache_ttl_secs,
            ledger.negative_cache_ttl_secs
        ),
        (200, 300, 30)
    );
}

#[test]
fn upstream_connect_takes_only_its_two_values() {
    use meshward_filter::UpstreamConnect;
    let mode = |json: &str| {
        Policy::from_json(json.as_bytes())
            .unwrap()
            .upstream_connect()
    };
    assert_eq!(
        mode(r#"{"filterType":"network"}"#),
        UpstreamConnect::Immediate
    );
    assert_eq!(
        mode(r#"{"filterType":"network","upstreamConnect":"afterDecision"}"#),
        UpstreamConnect::AfterDecision
    );
    // A near miss must not silently mean the default.
    refuse_naming(
        r#"{"filterType":"network","upstreamConnect":"after_decision"}"#,
        "unknown variant",
        "after_decision",
    );
}
