//! The Helm chart (`charts/meshward`) rendered by Helm's own engine: it
//! lints, it renders for every backend a `signer.toml` the signer accepts,
//! its values mean what their istio-csr names say, hostile values are
//! refused, and where it describes the same objects as `istio-manifests/`
//! (kustomize) it renders the same objects, except for the differences
//! listed in [`CHART_ONLY`] with their reasons.
//!
//! Helm is `scripts/helm` (PyPI helm-python-sdk: libhelm_c over Helm's Go
//! SDK v4, so `helm.sh/helm/v4/pkg/engine` renders); the tests run the
//! command in `MESHWARD_HELM` (`scripts/helm --path`, set by scripts/test)
//! and fail without it. The comparisons with kustomize run `kubectl
//! kustomize` like `manifests.rs` (`MESHWARD_SKIP_KUSTOMIZE=1` skips those).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use meshward_signer::config::Config;
use meshward_signer::issuer::vault::VaultAuthConfig;
use serde_yaml::Value as Yaml;

const BACKENDS: [&str; 3] = ["builtin", "cacerts", "vault"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart() -> PathBuf {
    repo().join("charts/meshward")
}

fn read(rel: &str) -> Vec<u8> {
    let path = repo().join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The `scripts/helm` command (`MESHWARD_HELM`); a test without it fails.
fn helm() -> Command {
    let path = std::env::var_os("MESHWARD_HELM").unwrap_or_else(|| {
        panic!(
            "MESHWARD_HELM is not set: the chart tests need Helm's engine; \
             run scripts/test, or export MESHWARD_HELM=\"$(scripts/helm --path)\""
        )
    });
    let mut cmd = Command::new(path);
    cmd.current_dir(repo());
    cmd
}

/// `helm template meshward charts/meshward -n istio-system <args>`: Ok with
/// the stream's text, Err with Helm's error.
fn try_template(args: &[&str]) -> Result<String, String> {
    let out = helm()
        .arg("template")
        .arg("meshward")
        .arg(chart())
        .args(["--namespace", "istio-system"])
        .args(args)
        .output()
        .expect("run MESHWARD_HELM");
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A rendered document and the template it came from.
#[derive(Debug, Clone)]
struct Rendered {
    source: String,
    doc: Yaml,
}

fn parse_stream(text: &str) -> Vec<Rendered> {
    let mut out = Vec::new();
    for chunk in text.split("---\n").filter(|c| !c.trim().is_empty()) {
        let source = chunk
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# Source: "))
            .unwrap_or_else(|| panic!("a document without its `# Source:` line:\n{chunk}"))
            .to_string();
        let doc: Yaml = serde_yaml::from_str(chunk)
            .unwrap_or_else(|e| panic!("{source} is not YAML: {e}\n{chunk}"));
        out.push(Rendered { source, doc });
    }
    out
}

fn template(args: &[&str]) -> Vec<Rendered> {
    let text = try_template(args).unwrap_or_else(|e| panic!("helm template {args:?}: {e}"));
    let docs = parse_stream(&text);
    assert!(!docs.is_empty(), "helm template {args:?} rendered nothing");
    docs
}

fn values_file(backend: &str) -> String {
    chart()
        .join(format!("ci/{backend}-values.yaml"))
        .display()
        .to_string()
}

fn docs(rendered: &[Rendered]) -> Vec<Yaml> {
    rendered.iter().map(|r| r.doc.clone()).collect()
}

fn find<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name} in {:?}", keys(docs)))
}

fn keys(docs: &[Yaml]) -> Vec<(String, String)> {
    let mut k: Vec<(String, String)> = docs
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap_or("").to_string(),
                d["metadata"]["name"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    k.sort();
    k
}

/// The `signer.toml` of the signer's ConfigMap, parsed and validated.
fn signer_config(docs: &[Yaml]) -> Config {
    let toml = docs
        .iter()
        .filter(|d| d["kind"].as_str() == Some("ConfigMap"))
        .find_map(|d| d["data"]["signer.toml"].as_str())
        .expect("a ConfigMap with signer.toml");
    let config =
        Config::from_toml(toml, "rendered signer.toml").unwrap_or_else(|e| panic!("{e}\n{toml}"));
    config
        .validate()
        .unwrap_or_else(|e| panic!("rendered signer.toml does not validate: {e}\n{toml}"));
    config
}

fn signer_container(docs: &[Yaml]) -> &Yaml {
    find(docs, "StatefulSet", "meshward-signer")["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str() == Some("signer"))
        .expect("the signer container")
}

fn env<'a>(container: &'a Yaml, name: &str) -> &'a str {
    container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
        .and_then(|e| e["value"].as_str())
        .unwrap_or_else(|| panic!("no env {name}"))
}

// ---------------------------------------------------------------- lint

#[test]
fn chart_lints_strict_for_every_backend() {
    for backend in BACKENDS {
        let out = helm()
            .arg("lint")
            .arg(chart())
            .args(["-f", &values_file(backend)])
            .args(["--strict", "--kube-version", "v1.30.0"])
            .output()
            .expect("run MESHWARD_HELM");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "helm lint --strict with ci/{backend}-values.yaml:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("1 chart(s) linted, 0 chart(s) failed"),
            "{text}"
        );
        assert!(
            !text.contains("[WARNING]") && !text.contains("[ERROR]"),
            "{text}"
        );
    }
}

/// `scripts/helm lint` fails on what Helm calls an error: a values file the
/// schema refuses.
#[test]
fn chart_lint_fails_on_values_the_schema_refuses() {
    let out = helm()
        .arg("lint")
        .arg(chart())
        .args(["--set", "app.ca.backend=bogus", "--strict"])
        .output()
        .expect("run MESHWARD_HELM");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "lint passed:\n{text}");
    assert!(
        text.contains("[ERROR]") && text.contains("/app/ca/backend"),
        "{text}"
    );
}

// ---------------------------------------------------------- rendering

#[test]
fn every_backend_renders_a_signer_config_that_parses_validates_and_names_it() {
    for backend in BACKENDS {
        let rendered = template(&["-f", &values_file(backend)]);
        let docs = docs(&rendered);
        let config = signer_config(&docs);
        assert_eq!(config.ca.backend, backend);
        assert_eq!(config.ca.cacerts.is_some(), backend == "cacerts");
        assert_eq!(config.ca.vault.is_some(), backend == "vault");
        for r in &rendered {
            assert!(r.source.starts_with("meshward/templates/"), "{}", r.source);
            assert!(r.doc["kind"].as_str().is_some(), "{}: no kind", r.source);
            assert!(
                r.doc["apiVersion"].as_str().is_some(),
                "{}: no apiVersion",
                r.source
            );
        }
    }
}

/// What each backend's config reads is what its pod mounts; a backend never
/// mounts another backend's material (a pod mounting a Secret that does not
/// exist never starts).
#[test]
fn every_backend_mounts_exactly_the_files_its_signer_config_reads() {
    for backend in BACKENDS {
        let docs = docs(&template(&["-f", &values_file(backend)]));
        let config = signer_config(&docs);
        let container = signer_container(&docs);
        let pod = &find(&docs, "StatefulSet", "meshward-signer")["spec"]["template"]["spec"];
        let mounts: Vec<(PathBuf, String)> = container["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    PathBuf::from(m["mountPath"].as_str().unwrap()),
                    m["name"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let volumes = pod["volumes"].as_sequence().unwrap();
        let volume = |name: &str| -> Yaml {
            if name == "data" {
                // The volumeClaimTemplate.
                return Yaml::String("pvc".into());
            }
            volumes
                .iter()
                .find(|v| v["name"].as_str() == Some(name))
                .unwrap_or_else(|| panic!("{backend}: volume {name} mounted but not defined"))
                .clone()
        };
        // The volume that holds `path` (the longest mount path above it).
        let holder = |path: &Path| -> Yaml {
            let (_, name) = mounts
                .iter()
                .filter(|(m, _)| path.starts_with(m))
                .max_by_key(|(m, _)| m.as_os_str().len())
                .unwrap_or_else(|| panic!("{backend}: {} is not mounted", path.display()));
            volume(name)
        };
        // The config file itself, from the chart's ConfigMap.
        assert_eq!(
            holder(Path::new("/etc/meshward/signer.toml"))["configMap"]["name"].as_str(),
            Some("meshward-signer-config")
        );
        // The data dir and ledger on the replica's own volume.
        assert_eq!(holder(&config.ca.data_dir).as_str(), Some("pvc"));
        assert_eq!(
            holder(config.ledger.path.as_deref().unwrap()).as_str(),
            Some("pvc")
        );
        let jwks = config.authn.jwt[0].jwks_file.as_deref().unwrap();
        assert_eq!(
            holder(jwks)["configMap"]["name"].as_str(),
            Some("meshward-sa-jwks")
        );
        let secrets: Vec<&str> = volumes
            .iter()
            .filter_map(|v| v["secret"]["secretName"].as_str())
            .collect();
        match backend {
            "cacerts" => {
                let dir = &config.ca.cacerts.as_ref().unwrap().dir;
                assert_eq!(
                    holder(dir)["secret"]["secretName"].as_str(),
                    Some("cacerts")
                );
                assert_eq!(secrets, ["cacerts"]);
            }
            "vault" => {
                assert!(secrets.is_empty(), "vault mounts Secrets: {secrets:?}");
                let vault = config.ca.vault.as_ref().unwrap();
                for file in [&vault.roots_file, vault.ca_file.as_ref().unwrap()] {
                    assert_eq!(
                        holder(file)["configMap"]["name"].as_str(),
                        Some("meshward-vault")
                    );
                }
                let VaultAuthConfig::Kubernetes {
                    token_file, role, ..
                } = &vault.auth
                else {
                    panic!("vault logs in with kubernetes auth: {:?}", vault.auth);
                };
                assert_eq!(role, "meshward-signer");
                let token = &holder(token_file)["projected"]["sources"][0]["serviceAccountToken"];
                assert_eq!(
                    token["path"].as_str(),
                    token_file.file_name().and_then(|n| n.to_str())
                );
                assert_eq!(token["audience"].as_str(), Some("vault"));
            }
            _ => assert!(secrets.is_empty(), "builtin mounts Secrets: {secrets:?}"),
        }
    }
}

#[test]
fn template_output_is_deterministic_in_install_order_with_source_lines() {
    let args = ["-f", &values_file("cacerts")];
    let a = try_template(&args).unwrap();
    let b = try_template(&args).unwrap();
    assert_eq!(a, b, "two renders differ");
    assert!(
        a.starts_with("---\n# Source: meshward/templates/"),
        "{a:.200}"
    );
    let kinds: Vec<String> = parse_stream(&a)
        .iter()
        .map(|r| r.doc["kind"].as_str().unwrap().to_string())
        .collect();
    // Helm's install order: the ServiceAccount and ConfigMaps before the
    // RBAC, Services before the StatefulSet, custom resources last.
    let pos = |k: &str| kinds.iter().position(|x| x == k).unwrap();
    assert!(pos("ServiceAccount") < pos("ClusterRole"));
    assert!(pos("ConfigMap") < pos("StatefulSet"));
    assert!(pos("Service") < pos("StatefulSet"));
    assert!(pos("StatefulSet") < pos("WasmPlugin"));
    assert!(pos("StatefulSet") < pos("PrometheusRule"));
}

#[test]
fn wasm_plugins_istio_wiring_and_monitoring_are_off_by_default() {
    let docs = docs(&template(&[]));
    for kind in [
        "WasmPlugin",
        "PeerAuthentication",
        "EnvoyFilter",
        "ServiceMonitor",
        "PrometheusRule",
    ] {
        assert!(
            docs.iter().all(|d| d["kind"].as_str() != Some(kind)),
            "{kind} rendered by default"
        );
    }
    assert!(
        docs.iter()
            .all(|d| d["metadata"]["name"].as_str() != Some("meshward-grafana-dashboard"))
    );
}

// ------------------------------------------------- istio-csr's values

/// Each value carrying an istio-csr name sets the signer setting it means
/// there (README.md's table), set here to values other than the defaults.
#[test]
fn istio_csr_named_values_set_the_signer_settings_they_mean() {
    let docs = docs(&template(&[
        "-f",
        &values_file("vault"),
        "--set",
        "replicaCount=3",
        "--set",
        "image.repository=registry.example/meshward,image.tag=9.9.9",
        "--set",
        "app.logLevel=2",
        "--set",
        "app.logFormat=text",
        "--set",
        "app.tls.trustDomain=mesh.example",
        "--set",
        "app.tls.rootCAFile=/etc/roots/ca.pem",
        "--set",
        "app.tls.certificateDNSNames={ca.example.svc,istiod.istio-system.svc}",
        "--set",
        "app.server.clusterID=Kubernetes",
        "--set",
        "app.server.maxCertificateDuration=1h",
        "--set",
        "app.server.caTrustedNodeAccounts=istio-system/ztunnel\\, kube-system/agent",
        "--set",
        "app.server.authenticators.enableClientCert=false",
        "--set",
        "app.server.serving.port=6443",
        "--set",
        "app.metrics.port=9402",
        "--set",
        "app.controller.configmapNamespaceSelector=maistra.io/member-of=istio-system",
        "--set",
        "app.metrics.service.servicemonitor.enabled=true",
        "--set",
        "app.metrics.service.servicemonitor.prometheusInstance=infra",
    ]));
    let config = signer_config(&docs);
    assert_eq!(config.trust_domain, "mesh.example");
    assert_eq!(
        config.ca.vault.as_ref().unwrap().roots_file,
        Path::new("/etc/roots/ca.pem")
    );
    assert_eq!(
        config.server.dns_names,
        ["ca.example.svc", "istiod.istio-system.svc"]
    );
    assert_eq!(
        config.authn.jwt[0].cluster_id.as_deref(),
        Some("Kubernetes")
    );
    assert_eq!(config.policy.max_ttl, std::time::Duration::from_secs(3600));
    assert_eq!(config.policy.default_ttl, config.policy.max_ttl);
    assert_eq!(
        config.authn.trusted_node_accounts,
        ["istio-system/ztunnel", "kube-system/agent"]
    );
    assert!(!config.authn.mtls_renewal);
    assert_eq!(config.server.grpc_addr.port(), 6443);
    assert_eq!(config.server.admin_addr.port(), 9402);
    assert_eq!(config.dashboard.fleet, ["meshward-signer-headless:9402"]);
    assert_eq!(
        config.bundle.configmap.as_ref().unwrap().namespace_selector,
        "maistra.io/member-of=istio-system"
    );

    let sts = find(&docs, "StatefulSet", "meshward-signer");
    assert_eq!(sts["spec"]["replicas"].as_u64(), Some(3));
    let container = signer_container(&docs);
    assert_eq!(
        container["image"].as_str(),
        Some("registry.example/meshward:9.9.9")
    );
    // istio-csr's verbosity 2 is debug.
    assert_eq!(env(container, "RUST_LOG"), "debug");
    assert_eq!(env(container, "MESHWARD_LOG_FORMAT"), "text");
    let ports: Vec<(String, u64)> = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        [
            ("grpc-ca".to_string(), 6443),
            ("http-admin".to_string(), 9402)
        ]
    );
    let monitor = find(&docs, "ServiceMonitor", "meshward-signer");
    assert_eq!(
        monitor["metadata"]["labels"]["prometheus"].as_str(),
        Some("infra")
    );
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"].as_str(),
        Some("http-admin")
    );
    // It selects exactly one of the two Services: the headless one, which
    // also publishes replicas that are not ready.
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .unwrap();
    let selected: Vec<&str> = docs
        .iter()
        .filter(|d| d["kind"].as_str() == Some("Service"))
        .filter(|d| {
            selector
                .iter()
                .all(|(k, v)| d["metadata"]["labels"].get(k) == Some(v))
        })
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(selected, ["meshward-signer-headless"]);
}

/// fullnameOverride renames every object and every name that points at
/// one: the DNS name istio-agent verifies, the fleet view's Service, the
/// RBAC subject, the selectors.
#[test]
fn fullname_override_renames_the_objects_and_the_names_pointing_at_them() {
    let docs = docs(&template(&["--set", "fullnameOverride=ca"]));
    for (kind, name) in keys(&docs) {
        assert!(
            name == "ca" || name.starts_with("ca-"),
            "{kind} {name} keeps the default name"
        );
    }
    let config = signer_config(&docs);
    assert_eq!(config.server.dns_names[0], "ca.istio-system.svc");
    assert_eq!(config.dashboard.fleet, ["ca-headless:15014"]);
    let binding = find(&docs, "ClusterRoleBinding", "ca");
    assert_eq!(binding["subjects"][0]["name"].as_str(), Some("ca"));
    assert_eq!(binding["roleRef"]["name"].as_str(), Some("ca"));
    let sts = find(&docs, "StatefulSet", "ca");
    assert_eq!(
        sts["spec"]["selector"]["matchLabels"]["app"].as_str(),
        Some("ca")
    );
    assert_eq!(sts["spec"]["serviceName"].as_str(), Some("ca-headless"));
    assert_eq!(
        sts["spec"]["template"]["spec"]["topologySpreadConstraints"][0]["labelSelector"]
            ["matchLabels"]["app"]
            .as_str(),
        Some("ca")
    );
    assert_eq!(
        find(&docs, "PodDisruptionBudget", "ca")["spec"]["selector"]["matchLabels"]["app"].as_str(),
        Some("ca")
    );
}

/// The shared ledger: a TLS-verified PostgreSQL store instead of the SQLite
/// path, whose password and CA files are the Secret the pod mounts.
#[test]
fn shared_postgres_ledger_is_a_verified_tls_store_reading_the_mounted_secret() {
    let docs = docs(&template(&[
        "--set",
        "app.ledger.postgres.enabled=true",
        "--set",
        "app.ledger.postgres.url=host=ledger-db.example port=5432 user=meshward_signer dbname=meshward",
    ]));
    let config = signer_config(&docs);
    assert!(config.ledger.path.is_none());
    let pg = config.ledger.postgres.clone().expect("[ledger.postgres]");
    let opts = pg
        .options(config.ledger.commit_delay)
        .expect("the shared ledger's options resolve");
    let ca_file = PathBuf::from("/etc/meshward/ledger-db/ca.crt");
    assert_eq!(
        opts.tls,
        meshward_signer::ledger::PostgresTls::VerifyFull {
            ca_file: ca_file.clone()
        }
    );
    let password = opts.password_file.clone().expect("password_file");
    let container = signer_container(&docs);
    let pod = &find(&docs, "StatefulSet", "meshward-signer")["spec"]["template"]["spec"];
    for file in [&ca_file, &password] {
        let mount = container["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| file.starts_with(m["mountPath"].as_str().unwrap()))
            .unwrap_or_else(|| panic!("{} is not mounted", file.display()));
        let volume = pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        assert_eq!(
            volume["secret"]["secretName"].as_str(),
            Some("meshward-ledger-db")
        );
    }
    // Without TLS, no CA file is configured (the signer refuses one it
    // would never check).
    let plain = signer_config(&docs_of(&[
        "--set",
        "app.ledger.postgres.enabled=true,app.ledger.postgres.tls=disable",
        "--set",
        "app.ledger.postgres.url=host=db",
    ]));
    let pg = plain.ledger.postgres.unwrap();
    assert!(pg.ca_file.is_none());
    pg.options(plain.ledger.commit_delay)
        .expect("plain-TCP options resolve");
}

fn docs_of(args: &[&str]) -> Vec<Yaml> {
    docs(&template(args))
}

/// A value is data in signer.toml, never TOML: quotes, newlines and table
/// headers inside a string stay inside that string.
#[test]
fn toml_syntax_inside_a_value_stays_inside_its_string() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("values.yaml");
    let hostile = "pki\"\nbackend = \"builtin\"\n[ca.cacerts]\ndir = \"/tmp\"\n#";
    let values = serde_yaml::to_string(
        &serde_yaml::from_str::<Yaml>(&format!(
            "app: {{ca: {{backend: vault, vault: {{mount: {}}}}}}}",
            serde_json::to_string(hostile).unwrap()
        ))
        .unwrap(),
    )
    .unwrap();
    std::fs::write(&file, values).unwrap();
    let docs = docs(&template(&["-f", file.to_str().unwrap()]));
    let config = signer_config(&docs);
    assert_eq!(config.ca.backend, "vault");
    assert!(config.ca.cacerts.is_none());
    assert_eq!(config.ca.vault.unwrap().mount, hostile);
}

// ------------------------------------------------------ refused values

/// Values the schema or the chart refuses, each with the key its error
/// must name. Helm refuses them before anything is rendered.
const REFUSED: &[(&str, &str)] = &[
    ("app.ca.backend=bogus", "/app/ca/backend"),
    ("app.ca.vault.adress=https://vault:8200", "adress"),
    (
        "app.tls.trustDomain=spiffe://cluster.local",
        "/app/tls/trustDomain",
    ),
    (
        "app.server.maxCertificateDuration=forever",
        "/app/server/maxCertificateDuration",
    ),
    (
        "app.server.caTrustedNodeAccounts=ztunnel",
        "/app/server/caTrustedNodeAccounts",
    ),
    ("app.metrics.port=70000", "/app/metrics/port"),
    ("app.server.serving.port=0", "/app/server/serving/port"),
    ("app.logLevel=6", "/app/logLevel"),
    ("app.logFormat=xml", "/app/logFormat"),
    ("replicaCount=0", "/replicaCount"),
    ("replicaCount=two", "/replicaCount"),
    ("image.digest=latest", "/image/digest"),
    ("app.ca.vault.address=vault:8200", "/app/ca/vault/address"),
    (
        "app.ca.builtin.keyAlgorithm=dsa",
        "/app/ca/builtin/keyAlgorithm",
    ),
    ("app.authn.audiences={}", "/app/authn/audiences"),
    (
        "app.controller.configmapNamespaceSelector=",
        "/app/controller/configmapNamespaceSelector",
    ),
    (
        "wasmPlugins.failStrategy=FAIL_SOMETIMES",
        "/wasmPlugins/failStrategy",
    ),
    (
        "wasmPlugins.plugins[0].namespace=null",
        "/wasmPlugins/plugins/0",
    ),
    (
        "monitoring.prometheusRule.enabled=yes please",
        "/monitoring/prometheusRule/enabled",
    ),
    ("fullnameOverride=Meshward_Signer", "/fullnameOverride"),
    ("unknownTopLevel=1", "unknownTopLevel"),
    ("app.ledger.postgres.tls=prefer", "/app/ledger/postgres/tls"),
    ("istio.rootNamespace=Istio System", "/istio/rootNamespace"),
    // Refused by the chart's own checks (combinations).
    (
        "app.ledger.postgres.enabled=true",
        "app.ledger.postgres.url",
    ),
    ("app.ca.backend=builtin", "replicaCount"),
    ("app.tls.rootCAFile=/etc/roots.pem", "app.tls.rootCAFile"),
];

#[test]
fn hostile_or_invalid_values_are_refused_naming_the_key() {
    let mut wrong = Vec::new();
    for (set, key) in REFUSED {
        match try_template(&["--set", set]) {
            Ok(_) => wrong.push(format!("--set {set}: rendered")),
            Err(e) if !e.contains(key) => {
                wrong.push(format!("--set {set}: error does not name {key}: {e}"));
            }
            Err(_) => {}
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn builtin_backend_with_more_than_one_replica_is_refused() {
    let e = try_template(&["--set", "app.ca.backend=builtin,replicaCount=2"]).unwrap_err();
    assert!(
        e.contains("app.ca.backend=builtin") && e.contains("replicaCount"),
        "{e}"
    );
    template(&["--set", "app.ca.backend=builtin,replicaCount=1"]);
}

// ------------------------------------------- the same objects as kustomize

/// Fields only the chart renders, each with why; the comparisons remove them
/// from the chart's objects after checking they are there (so the list
/// stays true). Helm's standard labels (`helm.sh/chart`,
/// `app.kubernetes.io/*`) are removed everywhere; kustomize's name hash on
/// the signer's ConfigMap is removed from its objects.
const CHART_ONLY: &[(&str, &str, &[&str], &str)] = &[
    (
        "StatefulSet",
        "meshward-signer",
        &[
            "spec",
            "template",
            "metadata",
            "annotations",
            "checksum/config",
        ],
        "kustomize rolls the pods on a config change by renaming the ConfigMap \
         (its hash suffix); Helm keeps the name and rolls them with this annotation",
    ),
    (
        "Service",
        "meshward-signer",
        &["spec", "type"],
        "service.type (istio-csr's name) is rendered explicitly; ClusterIP is also \
         what the API server defaults the kustomize Service to",
    ),
];

fn is_standard_label(key: &str) -> bool {
    key.starts_with("app.kubernetes.io/") || key.starts_with("helm.sh/")
}

/// kustomize's `meshward-signer-config-<10-character hash>`.
fn strip_name_hash(value: &mut Yaml) {
    match value {
        Yaml::String(s) => {
            if let Some(hash) = s.strip_prefix("meshward-signer-config-")
                && hash.len() == 10
                && hash.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                *s = "meshward-signer-config".to_string();
            }
        }
        Yaml::Sequence(seq) => seq.iter_mut().for_each(strip_name_hash),
        Yaml::Mapping(map) => map.values_mut().for_each(strip_name_hash),
        _ => {}
    }
}

fn drop_standard_labels(labels: &mut Yaml) {
    if let Some(map) = labels.as_mapping_mut() {
        map.retain(|k, _| !k.as_str().is_some_and(is_standard_label));
        if map.is_empty() {
            *labels = Yaml::Null;
        }
    }
}

fn remove_path(doc: &mut Yaml, path: &[&str]) -> Option<Yaml> {
    let (last, parents) = path.split_last()?;
    let mut node = doc;
    for p in parents {
        node = node.get_mut(*p)?;
    }
    node.as_mapping_mut()?.remove(*last)
}

/// Lists Kubernetes merges by a key (volumes and env by name, mounts by
/// path): their order means nothing, and kustomize's strategic merge puts
/// an overlay's entries first.
fn sort_keyed_lists(value: &mut Yaml) {
    match value {
        Yaml::Mapping(map) => {
            for (k, v) in map.iter_mut() {
                let key = match k.as_str() {
                    Some("volumes" | "env") => Some("name"),
                    Some("volumeMounts") => Some("mountPath"),
                    _ => None,
                };
                if let (Some(key), Some(seq)) = (key, v.as_sequence_mut()) {
                    seq.sort_by(|a, b| a[key].as_str().cmp(&b[key].as_str()));
                }
                sort_keyed_lists(v);
            }
        }
        Yaml::Sequence(seq) => seq.iter_mut().for_each(sort_keyed_lists),
        _ => {}
    }
}

fn normalize(mut doc: Yaml) -> Yaml {
    if let Some(meta) = doc.get_mut("metadata") {
        if let Some(labels) = meta.get_mut("labels") {
            drop_standard_labels(labels);
        }
        if let Some(m) = meta.as_mapping_mut() {
            m.retain(|_, v| !v.is_null());
        }
    }
    if let Some(labels) = doc
        .get_mut("spec")
        .and_then(|s| s.get_mut("template"))
        .and_then(|t| t.get_mut("metadata"))
        .and_then(|m| m.get_mut("labels"))
    {
        drop_standard_labels(labels);
    }
    strip_name_hash(&mut doc);
    sort_keyed_lists(&mut doc);
    doc
}

/// `kubectl kustomize istio-manifests/<rel>`, every document parsed; None
/// with `MESHWARD_SKIP_KUSTOMIZE=1` (as in manifests.rs).
fn kustomize(rel: &str) -> Option<Vec<Yaml>> {
    if std::env::var("MESHWARD_SKIP_KUSTOMIZE").is_ok_and(|v| v == "1") {
        return None;
    }
    let dir = repo().join("istio-manifests").join(rel);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .unwrap_or_else(|e| panic!("kubectl (for `kubectl kustomize`) not runnable: {e}"));
    assert!(
        out.status.success(),
        "kubectl kustomize {rel}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    Some(
        serde_yaml::Deserializer::from_str(&text)
            .map(|d| <Yaml as serde::Deserialize>::deserialize(d).unwrap())
            .collect(),
    )
}

/// Every object kustomize renders for `rel` is rendered by the chart with
/// `args`, equal after [`normalize`] and [`CHART_ONLY`]; the signer's
/// `signer.toml`, which the chart generates from values instead of copying
/// the commented file, is compared as the configuration it parses to.
/// Returns the chart's objects that kustomize does not have.
fn assert_chart_renders_what_kustomize_renders(rel: &str, args: &[&str]) -> Vec<(String, String)> {
    let Some(kustomized) = kustomize(rel) else {
        return Vec::new();
    };
    let charted = docs(&template(args));
    let mut differences = Vec::new();
    for k in kustomized {
        let mut k = normalize(k);
        let kind = k["kind"].as_str().unwrap().to_string();
        let name = k["metadata"]["name"].as_str().unwrap().to_string();
        let mut c = normalize(find(&charted, &kind, &name).clone());
        for (ckind, cname, path, reason) in CHART_ONLY {
            if *ckind == kind && *cname == name {
                assert!(
                    remove_path(&mut c, path).is_some(),
                    "CHART_ONLY lists {kind} {name} {path:?} ({reason}), which the chart no longer renders"
                );
            }
        }
        if kind == "ConfigMap" && name == "meshward-signer-config" {
            let toml = |d: &mut Yaml| {
                let text = remove_path(d, &["data", "signer.toml"]).unwrap();
                Config::from_toml(text.as_str().unwrap(), &name).unwrap()
            };
            let (kc, cc) = (toml(&mut k), toml(&mut c));
            assert_eq!(
                cc.to_toml().unwrap(),
                kc.to_toml().unwrap(),
                "{rel}: the chart's signer.toml configures another signer than kustomize's"
            );
        }
        if c != k {
            differences.push(format!(
                "{rel}: {kind} {name} differs\n--- kustomize\n{}--- chart\n{}",
                serde_yaml::to_string(&k).unwrap(),
                serde_yaml::to_string(&c).unwrap()
            ));
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
    let kustomized: Vec<Yaml> = kustomize(rel).unwrap().into_iter().map(normalize).collect();
    let kustomized_keys = keys(&kustomized);
    keys(&charted)
        .into_iter()
        .filter(|k| !kustomized_keys.contains(k))
        .collect()
}

#[test]
fn default_values_render_the_kustomize_signer_objects() {
    let extra = assert_chart_renders_what_kustomize_renders("signer", &[]);
    assert!(extra.is_empty(), "the chart renders more: {extra:?}");
}

#[test]
fn vault_backend_renders_the_kustomize_vault_overlay_objects() {
    let extra = assert_chart_renders_what_kustomize_renders(
        "overlays/vault",
        &["-f", &values_file("vault")],
    );
    assert!(extra.is_empty(), "the chart renders more: {extra:?}");
}

#[test]
fn enabled_wasm_plugins_render_the_kustomize_wasmplugin_objects() {
    assert_chart_renders_what_kustomize_renders(
        "wasmplugin",
        &["--set", "wasmPlugins.enabled=true"],
    );
}

#[test]
fn enabled_monitoring_renders_the_kustomize_monitoring_objects() {
    let extra = assert_chart_renders_what_kustomize_renders(
        "monitoring",
        &[
            "--set",
            "monitoring.prometheusRule.enabled=true,monitoring.grafanaDashboard.enabled=true",
        ],
    );
    // Besides the signer's own objects, nothing.
    let signer = keys(&docs(&template(&[])));
    let beyond: Vec<_> = extra.iter().filter(|k| !signer.contains(k)).collect();
    assert!(beyond.is_empty(), "{beyond:?}");
}

#[test]
fn enabled_istio_wiring_renders_the_kustomize_istio_objects() {
    let extra = assert_chart_renders_what_kustomize_renders(
        "istio",
        &[
            "--set",
            "istio.peerAuthentication.enabled=true,istio.xfccCert.enabled=true",
        ],
    );
    let signer = keys(&docs_of(&[]));
    let beyond: Vec<_> = extra.iter().filter(|k| !signer.contains(k)).collect();
    assert!(beyond.is_empty(), "{beyond:?}");
}

/// The alerts and the dashboard exist twice (kustomize cannot read files
/// outside its directory, Helm's `.Files` cannot read outside the chart):
/// the copies must be the same bytes.
#[test]
fn chart_monitoring_files_are_byte_identical_to_istio_manifests() {
    for file in ["prometheus-rules.yaml", "meshward-dashboard.json"] {
        let ours = read(&format!("charts/meshward/files/{file}"));
        let theirs = read(&format!("istio-manifests/monitoring/{file}"));
        assert!(
            ours == theirs,
            "charts/meshward/files/{file} differs from istio-manifests/monitoring/{file}: copy it over"
        );
    }
    // And the dashboard ConfigMap carries the file as it is.
    let docs = docs(&template(&[
        "--set",
        "monitoring.grafanaDashboard.enabled=true",
    ]));
    let cm = find(&docs, "ConfigMap", "meshward-grafana-dashboard");
    assert_eq!(
        cm["data"]["meshward-dashboard.json"]
            .as_str()
            .map(str::as_bytes),
        Some(read("istio-manifests/monitoring/meshward-dashboard.json").as_slice())
    );
}
