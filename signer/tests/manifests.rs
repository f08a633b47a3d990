//! What ships in `istio-manifests/` must match the signer that reads it and
//! the metrics it exposes: a typo there is an outage at deploy time, or an
//! alert that can never fire.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/harness.rs"]
mod harness;

use std::collections::BTreeSet;

use harness::Harness;
use meshward_signer::config::Config;

fn manifest(rel: &str) -> String {
    let path = format!("{}/../istio-manifests/{rel}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

#[test]
fn shipped_istio_manifest_signer_config_is_valid() {
    let text = manifest("signer/signer.toml");
    let config = Config::from_toml(&text, "istio-manifests/signer/signer.toml")
        .expect("manifest config parses");
    config.validate().expect("manifest config validates");
    assert_eq!(config.ca.backend, "cacerts");
    assert_eq!(config.server.grpc_addr.port(), 15012);
    assert!(
        config
            .server
            .dns_names
            .iter()
            .any(|n| n == "meshward-signer.istio-system.svc"),
        "istio-agent dials meshward-signer.istio-system.svc:15012 and checks this name"
    );
}

/// The commented-out shared-ledger block of `signer.toml`, as an operator
/// would enable it: it must parse, validate and resolve to a TLS-verified
/// PostgreSQL store whose files are the ones the StatefulSet mounts.
#[test]
fn shipped_shared_ledger_block_is_valid_when_uncommented() {
    let text = manifest("signer/signer.toml");
    let mut enabled = String::new();
    let mut in_block = false;
    for line in text.lines() {
        if line == "# [ledger.postgres]" {
            in_block = true;
        }
        match line.strip_prefix("# ") {
            Some(uncommented) if in_block => {
                enabled.push_str(uncommented);
                enabled.push('\n');
                continue;
            }
            _ => in_block = false,
        }
        // The block replaces the SQLite path.
        if !line.starts_with("path = \"/var/lib/meshward/ledger.sqlite\"") {
            enabled.push_str(line);
            enabled.push('\n');
        }
    }
    let config = Config::from_toml(&enabled, "signer.toml with [ledger.postgres]")
        .expect("shared-ledger config parses");
    config.validate().expect("shared-ledger config validates");
    assert!(config.ledger.path.is_none());
    let pg = config.ledger.postgres.expect("[ledger.postgres] present");
    let opts = pg
        .options(config.ledger.commit_delay)
        .expect("shared-ledger options resolve");
    let statefulset = manifest("signer/statefulset.yaml");
    assert!(statefulset.contains("#   mountPath: /etc/meshward/ledger-db"));
    assert!(statefulset.contains("#     secretName: meshward-ledger-db"));
    assert_eq!(
        opts.tls,
        meshward_signer::ledger::PostgresTls::VerifyFull {
            ca_file: "/etc/meshward/ledger-db/ca.crt".into()
        }
    );
    assert_eq!(
        opts.password_file.as_deref(),
        Some(std::path::Path::new("/etc/meshward/ledger-db/password"))
    );
}

/// The shipped fleet view asks a Service that exists, is headless (so its
/// name resolves to every replica, not one virtual IP), publishes replicas
/// that are not ready (or a failing replica would vanish from the view),
/// names the admin port the fleet entry uses, and is the StatefulSet's.
#[test]
fn shipped_fleet_view_asks_the_headless_service_naming_every_replica() {
    let config = Config::from_toml(&manifest("signer/signer.toml"), "signer.toml").unwrap();
    assert_eq!(
        config.dashboard.fleet,
        vec!["meshward-signer-headless:15014"]
    );
    assert_eq!(config.server.admin_addr.port(), 15014);
    let headless = manifest("signer/service-headless.yaml");
    for line in [
        "  name: meshward-signer-headless",
        "  clusterIP: None",
        "  publishNotReadyAddresses: true",
        "      port: 15014",
        "      targetPort: http-admin",
    ] {
        assert!(
            headless.lines().any(|l| l == line),
            "{line:?} not in service-headless.yaml"
        );
    }
    assert!(
        manifest("signer/statefulset.yaml")
            .lines()
            .any(|l| l == "  serviceName: meshward-signer-headless")
    );
    assert!(
        manifest("signer/kustomization.yaml")
            .lines()
            .any(|l| l == "  - service-headless.yaml")
    );
}

/// `meshward_signer_*` metric names used by the alerts and the dashboard,
/// reduced to their family name (no `_bucket`/`_total`/... suffix).
fn referenced_signer_families() -> BTreeSet<String> {
    let text = manifest("monitoring/prometheus-rules.yaml")
        + &manifest("monitoring/meshward-dashboard.json");
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("meshward_signer_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &text[start..end];
        let family = ["_bucket", "_count", "_sum", "_total"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.insert(family.to_string());
        i = end;
    }
    out
}

#[tokio::test]
async fn alert_and_dashboard_metrics_exist_on_a_running_signer() {
    let families = referenced_signer_families();
    assert!(
        families.len() >= 5,
        "expected the rules to use signer metrics: {families:?}"
    );
    let h = Harness::start().await;
    // Per-namespace families only print once they have a series.
    h.issue("shop", "web", &h.opts("shop", "web"))
        .await
        .unwrap();
    let metrics = h.metrics().await;
    let exposed: BTreeSet<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let missing: Vec<&String> = families
        .iter()
        // Backend metrics exist only when that backend is configured; their
        // names are checked against the backends' own tests.
        .filter(|f| {
            !f.starts_with("meshward_signer_vault_") && !f.starts_with("meshward_signer_cacerts_")
        })
        .filter(|f| !exposed.contains(f.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "alerts/dashboard use metrics the signer does not expose: {missing:?}\nexposed: {exposed:?}"
    );
}
