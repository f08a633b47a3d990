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
#[path = "support/kube_api.rs"]
mod kube_api;
#[path = "support/openbao.rs"]
mod openbao;

use std::collections::BTreeSet;

use harness::Harness;
use kube_api::KubeApi;
use meshward_signer::config::Config;
use meshward_signer::issuer::vault::VaultAuthConfig;
use openbao::{BaoOptions, K8S_AUDIENCE, K8S_ROLE, OpenBao};
use serde_yaml::Value as Yaml;

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

/// `kubectl kustomize <istio-manifests/rel>`, every document parsed. The
/// machines this runs on have kubectl (with kustomize v5) installed;
/// `MESHWARD_SKIP_KUSTOMIZE=1` opts out locally (then `None`).
fn kustomize(rel: &str) -> Option<Vec<Yaml>> {
    if std::env::var("MESHWARD_SKIP_KUSTOMIZE").is_ok_and(|v| v == "1") {
        return None;
    }
    let dir = format!("{}/../istio-manifests/{rel}", env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("kubectl")
        .args(["kustomize", &dir])
        .output()
        .unwrap_or_else(|e| {
            panic!("kubectl (for `kubectl kustomize`) not runnable: {e}; set MESHWARD_SKIP_KUSTOMIZE=1 to skip")
        });
    assert!(
        out.status.success(),
        "kubectl kustomize {rel}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let docs: Vec<Yaml> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| <Yaml as serde::Deserialize>::deserialize(d).unwrap())
        .collect();
    assert!(!docs.is_empty(), "{rel} renders nothing");
    Some(docs)
}

fn find<'a>(docs: &'a [Yaml], kind: &str, name_prefix: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| {
            d["kind"].as_str() == Some(kind)
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(name_prefix))
        })
        .unwrap_or_else(|| panic!("no {kind} {name_prefix}*"))
}

#[test]
fn every_shipped_kustomization_renders() {
    for rel in [
        "",
        "signer",
        "istio",
        "wasmplugin",
        "monitoring",
        "overlays/vault",
    ] {
        let Some(docs) = kustomize(rel) else {
            return;
        };
        for d in &docs {
            assert!(
                d["kind"].as_str().is_some(),
                "{rel}: a document without kind"
            );
        }
    }
}

/// The overlay must not drift from the base: the same authn, ledger, bundle
/// and dashboard settings, only another CA.
#[test]
fn vault_overlay_config_differs_from_the_base_only_in_its_ca() {
    let base = Config::from_toml(&manifest("signer/signer.toml"), "signer.toml").unwrap();
    let overlay = Config::from_toml(
        &manifest("overlays/vault/signer.toml"),
        "overlays/vault/signer.toml",
    )
    .unwrap();
    overlay.validate().expect("the overlay's config validates");
    assert_eq!(overlay.ca.backend, "vault");
    let mut same = base.clone();
    same.ca = overlay.ca.clone();
    assert_eq!(same.to_toml().unwrap(), overlay.to_toml().unwrap());
}

/// What the overlay's config reads is what the overlay's pod mounts: the
/// roots and Vault's CA from the meshward-vault ConfigMap, a projected token
/// whose audience is the one the Vault role demands; and nothing of the
/// cacerts Secret, which a Vault install does not have (a pod mounting a
/// missing Secret never starts).
#[test]
fn vault_overlay_pod_mounts_what_its_config_reads_and_no_cacerts_secret() {
    let Some(docs) = kustomize("overlays/vault") else {
        return;
    };
    let config = find(&docs, "ConfigMap", "meshward-signer-config");
    let toml = config["data"]["signer.toml"].as_str().unwrap();
    assert_eq!(toml, manifest("overlays/vault/signer.toml"));
    let config = Config::from_toml(toml, "rendered signer.toml").unwrap();
    let vault = config.ca.vault.expect("[ca.vault]");

    let sts = find(&docs, "StatefulSet", "meshward-signer");
    let pod = &sts["spec"]["template"]["spec"];
    let container = pod["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str() == Some("signer"))
        .unwrap();
    let mounts: Vec<(&str, &str)> = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["mountPath"].as_str().unwrap(),
                m["name"].as_str().unwrap(),
            )
        })
        .collect();
    let volumes = pod["volumes"].as_sequence().unwrap();
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    assert!(
        volumes
            .iter()
            .all(|v| v["secret"]["secretName"].as_str() != Some("cacerts")),
        "the cacerts Secret is still mounted"
    );
    assert!(mounts.iter().all(|(p, _)| *p != "/etc/cacerts"));
    // The volume holding `path`, and the file name inside it.
    let source = |path: &std::path::Path| {
        let (dir, name) = (path.parent().unwrap(), path.file_name().unwrap());
        let (_, volume_name) = mounts
            .iter()
            .find(|(p, _)| std::path::Path::new(p) == dir)
            .unwrap_or_else(|| panic!("{} is not mounted", dir.display()));
        (volume(volume_name), name.to_str().unwrap().to_owned())
    };
    for file in [&vault.roots_file, vault.ca_file.as_ref().unwrap()] {
        let (v, _) = source(file);
        assert_eq!(v["configMap"]["name"].as_str(), Some("meshward-vault"));
    }
    let VaultAuthConfig::Kubernetes {
        role, token_file, ..
    } = &vault.auth
    else {
        panic!("the overlay logs in with kubernetes auth: {:?}", vault.auth);
    };
    assert_eq!(role, K8S_ROLE);
    let (v, name) = source(token_file);
    let token = &v["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["path"].as_str(), Some(name.as_str()));
    assert_eq!(token["audience"].as_str(), Some(K8S_AUDIENCE));
    // The signer's own config and data are still mounted.
    for path in ["/etc/meshward/signer.toml", "/var/lib/meshward"] {
        assert!(mounts.iter().any(|(p, _)| *p == path), "{path} not mounted");
    }
}

/// The overlay's `[ca.vault]` names (mount, roles, auth role) are those of
/// the documented Vault setup: with only the address and file locations
/// moved to this machine, a signer on it issues from a real OpenBao, logged
/// in with a service-account token.
#[tokio::test(flavor = "multi_thread")]
async fn vault_overlay_ca_issues_from_openbao_set_up_as_documented() {
    let Some(bao) = OpenBao::start(BaoOptions::default()) else {
        return;
    };
    let api = KubeApi::start();
    bao.enable_kubernetes_auth(&api).unwrap();
    let token = api.mint("istio-system", "meshward-signer", K8S_AUDIENCE);
    std::fs::write(bao.kubernetes_token_file(), &token).unwrap();

    let shipped = Config::from_toml(&manifest("overlays/vault/signer.toml"), "overlay")
        .unwrap()
        .ca
        .vault
        .unwrap();
    let mut vault = shipped.clone();
    vault.address = bao.addr.clone();
    vault.ca_file = None; // the dev server speaks plain HTTP
    vault.roots_file = bao.roots_file();
    let VaultAuthConfig::Kubernetes { token_file, .. } = &mut vault.auth else {
        panic!("kubernetes auth");
    };
    *token_file = bao.kubernetes_token_file();

    let h = Harness::start_with(move |c| {
        c.ca.backend = "vault".to_string();
        c.ca.vault = Some(vault);
    })
    .await;
    let (_key, cert) = h
        .issue("shop", "web", &h.opts("shop", "web"))
        .await
        .unwrap();
    harness::webpki_verify(&cert, rustls_pki_types::UnixTime::now());
    assert_eq!(h.signer.issuer().name(), "vault");
    assert_eq!(api.reviewed(), vec![token]);
}
