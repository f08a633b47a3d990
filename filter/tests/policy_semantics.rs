//! Evaluation semantics of the compiled policy, one behaviour per test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use meshward_filter::cert::{CertSource, CertValidity, PeerCert};
use meshward_filter::{Decision, Peer, Policy, Reason, Request, UnixTime, Verdict, reference};

const NOW: UnixTime = UnixTime(1_750_000_000);

fn policy(json: &str) -> Policy {
    Policy::from_json(json.as_bytes()).unwrap()
}

fn peer(id: &str) -> Peer {
    Peer::from_connection(true, Some(id), None)
}

fn get(path: &str) -> Request<'_> {
    Request::http(Some("shop.example"), Some("GET"), Some(path), Some(8080))
}

/// Decides with the compiled policy and checks the reference agrees.
fn decide<'p>(json: &str, p: &'p Policy, peer: &Peer, req: &Request<'_>) -> Decision<'p> {
    let cfg = meshward_filter::Config::from_json(json.as_bytes()).unwrap();
    let d = p.authorize(peer, req, NOW);
    let r = reference::authorize(&cfg, peer, req, NOW);
    assert_eq!(
        (d.verdict, d.rule, &d.reason, d.audit),
        (r.verdict, r.rule, &r.reason, r.audit)
    );
    d
}

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const BATCH: &str = "spiffe://cluster.local/ns/jobs/sa/batch";

#[test]
fn no_rules_allows_any_mtls_peer() {
    let json = "{}";
    let p = policy(json);
    let d = decide(json, &p, &peer(WEB), &get("/"));
    assert_eq!(
        (d.verdict, d.reason),
        (Verdict::Allow, Reason::NoAllowRules)
    );
}

#[test]
fn plaintext_peer_is_denied_when_mtls_is_required() {
    let json = "{}";
    let p = policy(json);
    let plaintext = Peer::from_connection(false, None, None);
    let d = decide(json, &p, &plaintext, &get("/"));
    assert_eq!(
        (d.verdict, d.reason),
        (Verdict::Deny, Reason::PlaintextPeer)
    );
    let json = r#"{"requireMtls": false}"#;
    let p = policy(json);
    assert_eq!(
        decide(json, &p, &plaintext, &get("/")).verdict,
        Verdict::Allow
    );
}

#[test]
fn deny_rules_win_over_allow_rules_whatever_the_order() {
    let json = r#"{"rules":[
        {"name":"allow-web","action":"ALLOW","from":[{"principals":["cluster.local/ns/shop/sa/web"]}]},
        {"name":"deny-admin","action":"DENY","to":[{"paths":["/admin*"]}]}
    ]}"#;
    let p = policy(json);
    let d = decide(json, &p, &peer(WEB), &get("/admin/users"));
    assert_eq!(
        (d.verdict, d.rule, d.reason),
        (Verdict::Deny, Some("deny-admin"), Reason::DenyRule)
    );
    let d = decide(json, &p, &peer(WEB), &get("/cart"));
    assert_eq!((d.verdict, d.rule), (Verdict::Allow, Some("allow-web")));
}

#[test]
fn allow_rules_present_and_none_matching_denies() {
    let json = r#"{"rules":[{"name":"allow-web","action":"ALLOW","from":[{"principals":["cluster.local/ns/shop/sa/web"]}]}]}"#;
    let p = policy(json);
    let d = decide(json, &p, &peer(BATCH), &get("/"));
    assert_eq!(
        (d.verdict, d.rule, d.reason),
        (Verdict::Deny, None, Reason::NoAllowRuleMatched)
    );
}

#[test]
fn first_matching_rule_in_config_order_is_reported() {
    let json = r#"{"rules":[
        {"name":"by-ns","action":"ALLOW","from":[{"namespaces":["shop"]}]},
        {"name":"by-principal","action":"ALLOW","from":[{"principals":["cluster.local/ns/shop/sa/web"]}]}
    ]}"#;
    let p = policy(json);
    assert_eq!(decide(json, &p, &peer(WEB), &get("/")).rule, Some("by-ns"));
}

#[test]
fn audit_rules_mark_but_never_change_the_verdict() {
    let json = r#"{"rules":[
        {"name":"audit-all","action":"AUDIT"},
        {"name":"allow-web","action":"ALLOW","from":[{"principals":["cluster.local/ns/shop/sa/web"]}]}
    ]}"#;
    let p = policy(json);
    let d = decide(json, &p, &peer(BATCH), &get("/"));
    assert_eq!((d.verdict, d.audit), (Verdict::Deny, Some("audit-all")));
    let d = decide(json, &p, &peer(WEB), &get("/"));
    assert_eq!(
        (d.verdict, d.audit, d.rule),
        (Verdict::Allow, Some("audit-all"), Some("allow-web"))
    );
    // AUDIT alone is not an ALLOW rule: no ALLOW rules means allow.
    let json = r#"{"rules":[{"name":"audit-all","action":"AUDIT"}]}"#;
    let p = policy(json);
    assert_eq!(
        decide(json, &p, &peer(BATCH), &get("/")).reason,
        Reason::NoAllowRules
    );
}

#[test]
fn istio_and_spiffe_principal_forms_are_equivalent() {
    for pattern in [
        "cluster.local/ns/shop/sa/web",
        "spiffe://cluster.local/ns/shop/sa/web",
        "spiffe://Cluster.Local/ns/shop/sa/web",
        "cluster.local/ns/shop/*",
        "spiffe://cluster.local/ns/shop/*",
        "*/sa/web",
        "*",
    ] {
        let json = format!(
            r#"{{"rules":[{{"name":"a","action":"ALLOW","from":[{{"principals":["{pattern}"]}}]}}]}}"#
        );
        let p = policy(&json);
        assert_eq!(
            decide(&json, &p, &peer(WEB), &get("/")).verdict,
            Verdict::Allow,
            "{pattern}"
        );
        assert_eq!(
            decide(&json, &p, &peer(BATCH), &get("/")).verdict,
            if pattern == "*" {
                Verdict::Allow
            } else {
                Verdict::Deny
            },
            "{pattern}"
        );
    }
}

#[test]
fn star_means_present_so_a_peer_without_identity_does_not_match() {
    let json = r#"{"requireMtls":false,"rules":[{"name":"any-id","action":"ALLOW","from":[{"principals":["*"]}]}]}"#;
    let p = policy(json);
    let plaintext = Peer::from_connection(false, None, None);
    assert_eq!(
        decide(json, &p, &plaintext, &get("/")).verdict,
        Verdict::Deny
    );
    let no_san = Peer::from_connection(true, None, None);
    assert_eq!(decide(json, &p, &no_san, &get("/")).verdict, Verdict::Deny);
    assert_eq!(
        decide(json, &p, &peer(WEB), &get("/")).verdict,
        Verdict::Allow
    );
}

#[test]
fn not_principals_match_peers_without_identity() {
    let json = r#"{"requireMtls":false,"rules":[{"name":"deny-not-web","action":"DENY","from":[{"notPrincipals":["cluster.local/ns/shop/sa/web"]}]}]}"#;
    let p = policy(json);
    let plaintext = Peer::from_connection(false, None, None);
    assert_eq!(
        decide(json, &p, &plaintext, &get("/")).rule,
        Some("deny-not-web")
    );
    assert_eq!(
        decide(json, &p, &peer(WEB), &get("/")).verdict,
        Verdict::Allow
    );
}

#[test]
fn namespaces_and_trust_domains_come_from_the_verified_id() {
    let json = r#"{"rules":[{"name":"shop","action":"ALLOW","from":[{"namespaces":["shop"],"trustDomains":["cluster.local"]}]}]}"#;
    let p = policy(json);
    assert_eq!(
        decide(json, &p, &peer(WEB), &get("/")).verdict,
        Verdict::Allow
    );
    assert_eq!(
        decide(
            json,
            &p,
            &peer("spiffe://other.org/ns/shop/sa/web"),
            &get("/")
        )
        .verdict,
        Verdict::Deny
    );
    assert_eq!(
        decide(json, &p, &peer(BATCH), &get("/")).verdict,
        Verdict::Deny
    );
}

#[test]
fn cluster_local_in_patterns_means_the_configured_trust_domain() {
    let json = r#"{"trustDomain":"prod.example","rules":[{"name":"a","action":"ALLOW","from":[{"principals":["cluster.local/ns/shop/sa/web"]}]}]}"#;
    let p = policy(json);
    assert_eq!(
        decide(
            json,
            &p,
            &peer("spiffe://prod.example/ns/shop/sa/web"),
            &get("/")
        )
        .verdict,
        Verdict::Allow
    );
    assert_eq!(
        decide(json, &p, &peer(WEB), &get("/")).verdict,
        Verdict::Deny
    );
}

#[test]
fn hosts_are_case_insensitive_and_ignore_the_port() {
    let json = r#"{"rules":[{"name":"a","action":"ALLOW","to":[{"hosts":["Shop.Example","*.internal"]}]}]}"#;
    let p = policy(json);
    for host in ["shop.example", "SHOP.example:8080", "db.internal"] {
        let r = Request::http(Some(host), Some("GET"), Some("/"), None);
        assert_eq!(
            decide(json, &p, &peer(WEB), &r).verdict,
            Verdict::Allow,
            "{host}"
        );
    }
    let r = Request::http(Some("shop.example.evil"), Some("GET"), Some("/"), None);
    assert_eq!(decide(json, &p, &peer(WEB), &r).verdict, Verdict::Deny);
}

#[test]
fn query_string_cannot_satisfy_a_path_rule() {
    let json = r#"{"rules":[{"name":"a","action":"ALLOW","to":[{"paths":["*/public"]}]}]}"#;
    let p = policy(json);
    assert_eq!(
        decide(json, &p, &peer(WEB), &get("/private?x=/public")).verdict,
        Verdict::Deny
    );
    assert_eq!(
        decide(json, &p, &peer(WEB), &get("/a/public?x=1")).verdict,
        Verdict::Allow
    );
}

#[test]
fn dot_segments_cannot_bypass_a_deny_path() {
    let json = r#"{"rules":[{"name":"no-admin","action":"DENY","to":[{"paths":["/admin*"]}]}]}"#;
    let p = policy(json);
    for path in [
        "/public/../admin",
        "/%61dmin/../admin",
        "/public/%2e%2e/admin",
        "/public%2f..%2fadmin",
    ] {
        let d = decide(json, &p, &peer(WEB), &get(path));
        assert_eq!(
            (d.verdict, d.reason),
            (Verdict::Deny, Reason::AmbiguousPath),
            "{path}"
        );
    }
}

#[test]
fn methods_and_ports_and_their_negations() {
    let json = r#"{"rules":[{"name":"a","action":"ALLOW","to":[{"methods":["GET"],"notPorts":["9090"]},{"ports":[9090],"notMethods":["DELETE"]}]}]}"#;
    let p = policy(json);
    let r = |m, port| Request::http(Some("h"), Some(m), Some("/"), Some(port));
    assert_eq!(
        decide(json, &p, &peer(WEB), &r("GET", 8080)).verdict,
        Verdict::Allow
    );
    assert_eq!(
        decide(json, &p, &peer(WEB), &r("POST", 8080)).verdict,
        Verdict::Deny
    );
    assert_eq!(
        decide(json, &p, &peer(WEB), &r("POST", 9090)).verdict,
        Verdict::Allow
    );
    assert_eq!(
        decide(json, &p, &peer(WEB), &r("DELETE", 9090)).verdict,
        Verdict::Deny
    );
}

#[test]
fn tcp_allow_rule_with_http_fields_never_matches() {
    let json =
        r#"{"rules":[{"name":"a","action":"ALLOW","to":[{"ports":["5432"],"methods":["GET"]}]}]}"#;
    let p = policy(json);
    assert_eq!(
        decide(json, &p, &peer(WEB), &Request::tcp(Some(5432))).verdict,
        Verdict::Deny
    );
}

#[test]
fn tcp_deny_rule_with_http_fields_is_more_restrictive() {
    let json = r#"{"rules":[{"name":"d","action":"DENY","from":[{"principals":["*/sa/batch"]}],"to":[{"ports":["5432"],"paths":["/x"]}]}]}"#;
    let p = policy(json);
    let d = decide(json, &p, &peer(BATCH), &Request::tcp(Some(5432)));
    assert_eq!(d.rule, Some("d"));
    assert_eq!(
        decide(json, &p, &peer(BATCH), &Request::tcp(Some(80))).verdict,
        Verdict::Allow
    );
}

fn with_cert(id: &str, not_before: i64, not_after: i64) -> Peer {
    let cert = PeerCert {
        validity: CertValidity {
            not_before: UnixTime(not_before),
            not_after: UnixTime(not_after),
        },
        source: CertSource::XfccCert,
        revoked: None,
    };
    Peer::from_connection(true, Some(id), Some(cert))
}

#[test]
fn max_cert_age_and_min_remaining_validity() {
    let json = r#"{"rules":[{"name":"fresh","action":"ALLOW","when":{"maxCertAge":"12h","minRemainingValidity":"1h"}}]}"#;
    let p = policy(json);
    let n = NOW.0;
    let young = with_cert(WEB, n - 3600, n + 20 * 3600);
    let d = decide(json, &p, &young, &get("/"));
    assert_eq!(d.verdict, Verdict::Allow);
    let times = d.cert.unwrap().0;
    assert_eq!((times.age_secs, times.remaining_secs), (3600, 20 * 3600));
    assert_eq!(
        decide(
            json,
            &p,
            &with_cert(WEB, n - 12 * 3600, n + 3600),
            &get("/")
        )
        .verdict,
        Verdict::Allow
    );
    assert_eq!(
        decide(
            json,
            &p,
            &with_cert(WEB, n - 12 * 3600 - 1, n + 10 * 3600),
            &get("/")
        )
        .verdict,
        Verdict::Deny
    );
    assert_eq!(
        decide(json, &p, &with_cert(WEB, n - 60, n + 3599), &get("/")).verdict,
        Verdict::Deny
    );
    // Expired certificate: remaining is negative.
    assert_eq!(
        decide(json, &p, &with_cert(WEB, n - 7200, n - 1), &get("/")).verdict,
        Verdict::Deny
    );
}

#[test]
fn unknown_cert_age_resolves_towards_the_configured_side() {
    let allow_rule = r#"{"name":"fresh","action":"ALLOW","when":{"maxCertAge":"12h"}}"#;
    let deny_rule = r#"{"name":"old","action":"DENY","when":{"maxCertAge":"1h"}}"#;
    let unknown = peer(WEB);
    for (setting, rule, expected, reason) in [
        (
            "deny",
            allow_rule,
            Verdict::Deny,
            Reason::NoAllowRuleMatched,
        ),
        ("allow", allow_rule, Verdict::Allow, Reason::AllowRule),
        ("deny", deny_rule, Verdict::Deny, Reason::DenyRule),
        ("allow", deny_rule, Verdict::Allow, Reason::NoAllowRules),
    ] {
        let json = format!(r#"{{"unknownCertAge":"{setting}","rules":[{rule}]}}"#);
        let p = policy(&json);
        let d = decide(&json, &p, &unknown, &get("/"));
        assert_eq!(
            (d.verdict, d.reason),
            (expected, reason),
            "{setting} {rule}"
        );
    }
}

#[test]
fn shadow_mode_decides_but_does_not_block() {
    let json = r#"{"mode":"shadow","rules":[{"name":"d","action":"DENY"}]}"#;
    let p = policy(json);
    let d = decide(json, &p, &peer(WEB), &get("/"));
    assert_eq!(
        (d.verdict, d.enforced, d.blocks()),
        (Verdict::Deny, false, false)
    );
    let enforce = policy(r#"{"rules":[{"name":"d","action":"DENY"}]}"#);
    assert!(enforce.authorize(&peer(WEB), &get("/"), NOW).blocks());
}

#[test]
fn invalid_peer_identity_is_denied_even_without_rules() {
    let json = r#"{"requireMtls":false}"#;
    let p = policy(json);
    let d = decide(
        json,
        &p,
        &peer("spiffe://cluster.local/ns/../sa/x"),
        &get("/"),
    );
    assert_eq!(
        (d.verdict, d.reason),
        (Verdict::Deny, Reason::InvalidPeerIdentity)
    );
}

#[test]
fn deny_reason_text_is_header_safe() {
    let p = policy(r#"{"rules":[{"name":"deny-Legacy_1","action":"DENY"}]}"#);
    let d = p.authorize(&peer(WEB), &get("/"), NOW);
    let text = d.to_string();
    assert_eq!(text, "denied by rule deny-Legacy_1");
    assert!(text.bytes().all(|b| (0x20..0x7f).contains(&b)));
}

#[test]
fn revoked_peer_certificate_is_denied_whatever_the_allow_rules_say() {
    // An ALLOW rule for the peer, no DENY rule: a stolen, revoked
    // certificate must still get nothing, with the reason in the answer.
    let json = r#"{"rules":[{"name":"everyone","action":"ALLOW"}]}"#;
    let p = policy(json);
    let n = NOW.0;
    let mut peer = with_cert(WEB, n - 60, n + 3600);
    assert_eq!(decide(json, &p, &peer, &get("/")).verdict, Verdict::Allow);
    if let Some(c) = peer.cert.as_mut() {
        c.revoked = Some(meshward_filter::cert::Revoked {
            at: UnixTime(n - 10),
            reason: 1,
        });
    }
    let d = decide(json, &p, &peer, &get("/"));
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(d.reason.code(), "revoked_certificate");
    assert_eq!(
        d.to_string(),
        format!("peer certificate revoked at {} (key-compromise)", n - 10)
    );
}
