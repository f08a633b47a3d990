//! The dashboard on the admin port, rendered by a real headless Chromium
//! against a running signer: what it shows is what the signer did, a hostile
//! CA subject stays text, and every response carries the headers that keep
//! the page from running anyone else's script.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/browser.rs"]
mod browser;
#[path = "support/harness.rs"]
mod harness;
#[path = "support/plugged_ca.rs"]
mod plugged_ca;

use std::time::Duration;

use browser::{chromium, dump_dom, element_text};
use harness::{Harness, http_get};
use meshward_signer::bundle::rotation::CaDir;
use meshward_signer::dashboard::CONTENT_SECURITY_POLICY;
use meshward_signer::issuer::builtin::BuiltinOptions;
use meshward_signer::issuer::cacerts::CaCertsConfig;

/// Virtual time for the page: its first read, then a second one 5 s later
/// (so rates are computed too).
const BUDGET: Duration = Duration::from_secs(7);

/// The markup between `start` and the next `end` after it.
fn between<'a>(dom: &'a str, start: &str, end: &str) -> &'a str {
    let at = dom
        .find(start)
        .unwrap_or_else(|| panic!("{start} not in:\n{dom}"));
    let len = dom[at..].find(end).unwrap();
    &dom[at..at + len]
}

fn dashboard_url(h: &Harness) -> String {
    format!("http://{}/dashboard", h.signer.admin_addr())
}

/// The playground module `scripts/playground` builds (`scripts/test` runs
/// it first): `MESHWARD_PLAYGROUND_WASM`, else `target/` in the repo.
fn playground_wasm() -> std::path::PathBuf {
    let path = std::env::var_os("MESHWARD_PLAYGROUND_WASM").map_or_else(
        || {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/meshward_playground.wasm")
        },
        std::path::PathBuf::from,
    );
    assert!(
        path.is_file(),
        "{} missing: run scripts/playground (scripts/test does this first) or set \
         MESHWARD_PLAYGROUND_WASM",
        path.display()
    );
    path
}

/// Percent-encodes a query-string value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The page with the playground form filled from `params` (it decides at
/// once when a peer is given).
async fn playground_decision(
    browser: &std::path::Path,
    h: &Harness,
    params: &[(&str, &str)],
) -> (String, String, String) {
    let query: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{k}={}", encode(v)))
        .collect();
    let url = format!("{}?{}", dashboard_url(h), query.join("&"));
    let dom = dump_dom(browser, &url, BUDGET).await;
    assert!(
        !between(&dom, "id=\"playground-form\"", ">").contains("hidden"),
        "playground not shown:\n{dom}"
    );
    (
        element_text(&dom, "pg-verdict").to_string(),
        element_text(&dom, "pg-detail").to_string(),
        dom,
    )
}

const POLICY: &str = r#"{"trustDomain": "cluster.local", "requireMtls": true,
  "rules": [
    {"name": "deny-batch", "action": "DENY", "from": [{"namespaces": ["batch"]}]},
    {"name": "frontend-reads-api", "action": "ALLOW",
     "from": [{"principals": ["cluster.local/ns/shop/sa/frontend"]}],
     "to": [{"methods": ["GET"], "paths": ["/api/*"]}],
     "when": {"maxCertAge": "36h"}}]}"#;

/// A signer serving the playground module.
async fn playground_signer() -> Harness {
    let wasm = playground_wasm();
    Harness::start_with(|c| c.dashboard.playground_wasm = Some(wasm)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn playground_decides_with_the_filters_own_policy_code() {
    let Some(browser) = chromium() else { return };
    let h = playground_signer().await;
    let frontend = "spiffe://cluster.local/ns/shop/sa/frontend";
    let batch = "spiffe://cluster.local/ns/batch/sa/job";
    // (peer, certificate age, verdict, what the detail says)
    let cases = [
        (
            frontend,
            "2h",
            "allow",
            "allowed by rule frontend-reads-api · certificate age 2 h",
        ),
        // Older than the rule's maxCertAge.
        (frontend, "40h", "deny", "no ALLOW rule matched"),
        (batch, "", "deny", "denied by rule deny-batch"),
    ];
    for (peer, age, want, says) in cases {
        let (verdict, detail, _) = playground_decision(
            &browser,
            &h,
            &[
                ("policy", POLICY),
                ("peer", peer),
                ("path", "/api/items"),
                ("age", age),
            ],
        )
        .await;
        assert_eq!(verdict, want, "{peer} {age}: {detail}");
        assert!(detail.contains(says), "{peer} {age}: {detail}");
    }
    // The shipped WasmPlugin manifest, pasted as YAML, decides the same.
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../istio-manifests/wasmplugin/wasmplugin-http.yaml"
    ))
    .unwrap();
    for (method, want) in [("GET", "allow"), ("POST", "deny")] {
        let (verdict, detail, _) = playground_decision(
            &browser,
            &h,
            &[
                ("policy", &shipped),
                ("peer", frontend),
                ("method", method),
                ("path", "/api/items"),
                ("age", "2h"),
            ],
        )
        .await;
        assert_eq!(verdict, want, "YAML, {method}: {detail}");
        assert!(detail.contains("http filter, 2 rules"), "{detail}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn playground_path_traversal_does_not_reach_an_allowed_prefix() {
    let Some(browser) = chromium() else { return };
    let h = playground_signer().await;
    let (verdict, detail, _) = playground_decision(
        &browser,
        &h,
        &[
            ("policy", POLICY),
            ("peer", "spiffe://cluster.local/ns/shop/sa/frontend"),
            ("path", "/api/%2e%2e/admin"),
            ("age", "1h"),
        ],
    )
    .await;
    assert_eq!(verdict, "deny", "{detail}");
    assert!(
        detail.contains("dot segments or encoded separators"),
        "{detail}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn playground_shows_a_config_the_plugin_would_refuse_and_hostile_rule_names_as_text() {
    let Some(browser) = chromium() else { return };
    let h = playground_signer().await;
    let refused = r#"{"rules": [{"name": "x", "action": "MAYBE"}]}"#;
    let (verdict, detail, _) = playground_decision(
        &browser,
        &h,
        &[
            ("policy", refused),
            ("peer", "spiffe://cluster.local/ns/a/sa/b"),
        ],
    )
    .await;
    assert_eq!(verdict, "config refused");
    assert!(
        detail.contains("fail closed") && detail.contains("MAYBE"),
        "{detail}"
    );

    // A rule name is whatever the policy's author wrote; the plugin refuses
    // this one, and the page shows the refusal, which quotes it, as text.
    let hostile = r#"{"rules": [{"name": "<img src=x onerror=\"document.title='pwned'\">",
        "action": "ALLOW", "from": [{"namespaces": ["a"]}]}]}"#;
    let (verdict, detail, dom) = playground_decision(
        &browser,
        &h,
        &[
            ("policy", hostile),
            ("peer", "spiffe://cluster.local/ns/a/sa/b"),
        ],
    )
    .await;
    assert_eq!(verdict, "config refused", "{detail}");
    assert!(detail.contains("rule names are"), "{detail}");
    assert!(detail.contains("&lt;img src=x"), "{detail}");
    assert!(!dom.contains("<img"), "rule name became markup:\n{dom}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_that_is_not_the_playground_module_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("playground.wasm");
    std::fs::write(&fake, "<script>alert(1)</script>").unwrap();
    let tokens = meshward_signer::client::token::TokenIssuer::generate(
        harness::K8S_ISSUER,
        meshward_signer::authn::keys::JwtAlgorithm::Es256,
    )
    .unwrap();
    let mut config = harness::test_config(dir.path(), &tokens);
    config.dashboard.playground_wasm = Some(fake);
    let Err(err) = meshward_signer::Signer::start(config).await else {
        panic!("a signer started with a fake playground module");
    };
    assert!(
        err.to_string().contains("not a WebAssembly module"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_shows_what_this_replica_issued_refused_and_publishes() {
    let Some(browser) = chromium() else { return };
    let h = Harness::start().await;
    for _ in 0..3 {
        h.issue("shop", "web", &h.opts("shop", "web"))
            .await
            .unwrap();
    }
    h.issue("payments", "api", &h.opts("payments", "api"))
        .await
        .unwrap();
    // A caller asking for an identity that is not its own.
    h.issue("shop", "web", &h.opts("shop", "intruder"))
        .await
        .unwrap_err();

    let dom = dump_dom(&browser, &dashboard_url(&h), BUDGET).await;
    assert!(
        dom.contains("data-loaded=\"true\""),
        "never rendered:\n{dom}"
    );
    assert!(
        dom.contains("id=\"error\"") && between(&dom, "id=\"error\"", ">").contains("hidden"),
        "error banner shown:\n{dom}"
    );
    assert_eq!(element_text(&dom, "issued-total"), "4");
    assert_eq!(element_text(&dom, "refused-total"), "1");
    assert_eq!(element_text(&dom, "backend"), "builtin");
    assert_eq!(element_text(&dom, "ledger"), "sqlite");
    assert_eq!(element_text(&dom, "trust-domain"), "cluster.local");
    assert_eq!(element_text(&dom, "health"), "ready");
    assert_eq!(element_text(&dom, "valid-total"), "4");
    assert!(element_text(&dom, "ca-expiry").starts_with("in "));
    assert!(element_text(&dom, "issued-rate").ends_with("/s now"));
    assert!(element_text(&dom, "latency-p99").contains("ms"));

    let outcomes = between(&dom, "id=\"outcomes\"", "</table>");
    assert!(outcomes.contains("<td>issued</td><td class=\"num\">4</td>"));
    assert!(outcomes.contains("<td>permission_denied</td><td class=\"num\">1</td>"));
    assert!(outcomes.contains("caller may not have this identity"));

    let namespaces = between(&dom, "id=\"namespaces\"", "</table>");
    let shop = namespaces
        .find("<td>shop</td><td class=\"num\">3</td>")
        .unwrap();
    let payments = namespaces
        .find("<td>payments</td><td class=\"num\">1</td>")
        .unwrap();
    assert!(
        shop < payments,
        "namespaces not sorted by valid certificates"
    );

    let bounds = between(&dom, "id=\"bounds\"", "</table>");
    assert!(bounds.contains("gRPC connections (15012)"));
    assert!(bounds.contains(&format!(
        "<td class=\"num\">{}</td>",
        grouped(h.config.server.max_connections)
    )));
    assert!(bounds.contains("WatchBundle streams"));
    assert!(bounds.contains("<meter"));

    let roots = between(&dom, "id=\"roots\"", "</table>");
    assert!(roots.contains("meshward root CA"), "{roots}");
    let root = &h.signer.issuer().trust_anchors()[0];
    let fingerprint = hex_sha256(root);
    assert!(roots.contains(&format!("title=\"{fingerprint}\"")));
    assert!(element_text(&dom, "rotation").contains("No root rotation in progress"));
}

/// `n` as the page prints counts: thousands separated by commas.
fn grouped(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn hex_sha256(der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der))
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_ca_subject_is_shown_as_text_not_run_as_markup() {
    let Some(browser) = chromium() else { return };
    // The subject of a plugged-in root is whatever the operator's PKI put
    // there; the page must never parse it.
    let hostile = "<img src=x onerror=\"document.title='pwned'\">";
    let dir = tempfile::tempdir().unwrap();
    let root = plugged_ca::root(hostile);
    let ca = plugged_ca::intermediate("istioca", &root);
    plugged_ca::write_istio(dir.path(), &ca, &[], &root);
    let cacerts = CaCertsConfig {
        dir: dir.path().to_path_buf(),
        reload_interval: Duration::from_secs(10),
    };
    let h = Harness::start_with(move |c| {
        c.ca.backend = "cacerts".to_string();
        c.ca.cacerts = Some(cacerts);
    })
    .await;

    let dom = dump_dom(&browser, &dashboard_url(&h), BUDGET).await;
    assert!(
        dom.contains("data-loaded=\"true\""),
        "never rendered:\n{dom}"
    );
    let roots = between(&dom, "id=\"roots\"", "</table>");
    assert!(
        roots.contains("&lt;img src=x onerror="),
        "subject not shown as text: {roots}"
    );
    assert!(!dom.contains("<img"), "subject became markup:\n{dom}");
    assert!(!dom.contains("pwned</title>"), "script ran:\n{dom}");
    assert_eq!(element_text(&dom, "backend"), "cacerts");
    assert!(element_text(&dom, "rotation").contains("Roots come from the cacerts backend"));
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_responses_forbid_inline_script_other_origins_and_framing() {
    let h = Harness::start().await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for (path, content_type) in [
        ("/dashboard", "text/html"),
        ("/dashboard/app.js", "text/javascript"),
        ("/dashboard/app.css", "text/css"),
        ("/v1/status", "application/json"),
    ] {
        let response = client
            .get(format!("http://{}{path}", h.signer.admin_addr()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .unwrap_or_else(|| panic!("{path}: no {name}"))
                .to_str()
                .unwrap()
                .to_string()
        };
        assert!(header("content-type").starts_with(content_type), "{path}");
        assert_eq!(header("content-security-policy"), CONTENT_SECURITY_POLICY);
        assert_eq!(header("x-content-type-options"), "nosniff");
        assert_eq!(header("x-frame-options"), "DENY");
        assert_eq!(header("cache-control"), "no-store");
    }
    for directive in [
        "default-src 'none'",
        "script-src 'self' 'wasm-unsafe-eval';",
        "frame-ancestors 'none'",
    ] {
        assert!(CONTENT_SECURITY_POLICY.contains(directive), "{directive}");
    }
    // Only WebAssembly compilation (the playground), never JavaScript eval
    // or inline script.
    assert!(
        !CONTENT_SECURITY_POLICY
            .replace("'wasm-unsafe-eval'", "")
            .contains("unsafe")
    );
    // The page itself carries no inline script or style the policy would
    // have to allow.
    let (_, page) = http_get(h.signer.admin_addr(), "/dashboard").await;
    assert!(!page.contains("<script>") && !page.contains("style="));

    let root = client
        .get(format!("http://{}/", h.signer.admin_addr()))
        .send()
        .await
        .unwrap();
    assert!(root.status().is_redirection());
    assert_eq!(root.headers()["location"], "/dashboard");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_reports_a_root_rotation_in_progress() {
    let h =
        Harness::start_with(|c| c.bundle.rotation_check_interval = Duration::from_millis(50)).await;
    let dir = CaDir::new(BuiltinOptions {
        data_dir: h.config.ca.data_dir.clone(),
        key_algorithm: h.config.ca.key_algorithm,
        organization: h.config.trust_domain.clone(),
        root_ttl: h.config.ca.root_ttl,
        intermediate_ttl: h.config.ca.intermediate_ttl,
    });
    let now = time::OffsetDateTime::now_utc();
    dir.rotate_root(now, Duration::from_secs(3600)).unwrap();

    let mut status = serde_json::Value::Null;
    for _ in 0..400 {
        let (code, body) = http_get(h.signer.admin_addr(), "/v1/status").await;
        assert_eq!(code, 200);
        status = serde_json::from_str(&body).unwrap();
        if status["bundle"]["roots"].as_array().unwrap().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(status["bundle"]["roots"].as_array().unwrap().len(), 2);
    assert_eq!(status["rotation"]["phase"], "overlap");
    assert_eq!(
        status["rotation"]["switch_at"],
        now.unix_timestamp() + 3600,
        "{status}"
    );
    assert_eq!(status["backend"], "builtin");
    assert_eq!(status["ledger"], "sqlite");
    let signing_not_after = status["signing_ca"]["not_after"].as_i64().unwrap();
    assert_eq!(
        signing_not_after,
        h.signer
            .issuer()
            .signing_validity()
            .not_after
            .unix_timestamp()
    );
    for root in status["bundle"]["roots"].as_array().unwrap() {
        assert_eq!(root["sha256"].as_str().unwrap().len(), 64);
        assert!(root["validity"]["not_after"].as_i64().unwrap() > now.unix_timestamp());
    }
}

#[tokio::test]
async fn dashboard_lists_revocations_and_the_crl() {
    use meshward_signer::ledger::{CertDigest, RevocationReason, RevocationTarget};
    let Some(browser) = chromium() else { return };
    let h = Harness::start_with(|c| {
        c.revocation.crl_check_interval = std::time::Duration::from_millis(50);
    })
    .await;
    let (_, cert) = h
        .issue("shop", "web", &h.opts("shop", "web"))
        .await
        .unwrap();
    h.signer
        .ledger()
        .unwrap()
        .revoke(
            &RevocationTarget::Sha256(CertDigest::of(&cert.leaf)),
            RevocationReason::KeyCompromise,
            time::OffsetDateTime::now_utc(),
        )
        .await
        .unwrap();
    // Let the CRL pick it up before the page reads the metrics.
    for _ in 0..100 {
        if h.metrics().await.contains("meshward_signer_crl_entries 1") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let dom = dump_dom(&browser, &dashboard_url(&h), BUDGET).await;
    assert!(
        dom.contains("data-loaded=\"true\""),
        "never rendered:\n{dom}"
    );
    let summary = element_text(&dom, "revocations-summary");
    assert!(
        summary.starts_with("1 revoked certificate(s)") && summary.contains("CRL: 1 entries"),
        "{summary}"
    );
    let table = between(&dom, "id=\"revocations\"", "</table>");
    assert!(
        table.contains("spiffe://cluster.local/ns/shop/sa/web") && table.contains("key-compromise"),
        "{table}"
    );
}
