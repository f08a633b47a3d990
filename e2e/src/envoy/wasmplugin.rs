//! A `WasmPlugin` resource (`extensions.istio.io/v1alpha1`) turned into the
//! Envoy filter istiod hands a sidecar for it, from the repo's own
//! `istio-manifests/wasmplugin/*.yaml`:
//!
//! - `pluginConfig` → JSON text in a `google.protobuf.StringValue`
//!   `configuration` (no `configuration` at all when it is absent or empty,
//!   as istiod does);
//! - `PluginConfig.name` = `<namespace>.<name>`, `root_id` = `pluginName`;
//! - `vm_config.runtime` = `envoy.wasm.runtime.v8`, the code a local file
//!   (istio-agent pulls `oci://…` and rewrites the source to the file it
//!   fetched; here the file is the `.wasm` `scripts/wasm` built), the VM's
//!   environment carrying the pull policy and resource version as istiod
//!   sets them;
//! - `failStrategy: FAIL_CLOSE` (the default) → `fail_open: false`;
//! - `type: HTTP` → `envoy.filters.http.wasm`, `type: NETWORK` →
//!   `envoy.filters.network.wasm`; the filter is placed by `phase`
//!   (AUTHN, AUTHZ, STATS, then unspecified just before the router /
//!   terminal filter), `priority` ordering within a phase (higher first);
//! - `selector.matchLabels` and `match[].mode` (SERVER = inbound, CLIENT =
//!   outbound) decide which sidecar and which listener get it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Deserialize;
use serde_json::json;

/// A parsed WasmPlugin.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WasmPlugin {
    /// `apiVersion`.
    pub api_version: String,
    /// `kind` (must be `WasmPlugin`).
    pub kind: String,
    /// `metadata`.
    pub metadata: Metadata,
    /// `spec`.
    pub spec: Spec,
}

/// `metadata`.
#[derive(Debug, Clone, Deserialize)]
pub struct Metadata {
    /// Name.
    pub name: String,
    /// Namespace (`default` when absent).
    #[serde(default = "default_namespace")]
    pub namespace: String,
}

fn default_namespace() -> String {
    "default".to_owned()
}

/// `spec` (the fields Istio's conversion reads).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// `selector.matchLabels`.
    #[serde(default)]
    pub selector: Option<Selector>,
    /// Module URL (`oci://`, `file://`, `https://`).
    pub url: String,
    /// Pinned digest of the module.
    #[serde(default)]
    pub sha256: Option<String>,
    /// `imagePullPolicy`.
    #[serde(default)]
    pub image_pull_policy: Option<String>,
    /// `phase`.
    #[serde(default)]
    pub phase: Option<String>,
    /// `priority`.
    #[serde(default)]
    pub priority: Option<i64>,
    /// `type`: HTTP (default) or NETWORK.
    #[serde(default, rename = "type")]
    pub plugin_type: Option<String>,
    /// `failStrategy`: FAIL_CLOSE (default) or FAIL_OPEN.
    #[serde(default)]
    pub fail_strategy: Option<String>,
    /// `match`.
    #[serde(default, rename = "match")]
    pub traffic_match: Vec<TrafficMatch>,
    /// `pluginConfig` (a Struct: any JSON object).
    #[serde(default)]
    pub plugin_config: Option<serde_json::Value>,
    /// `pluginName` (the root id).
    #[serde(default)]
    pub plugin_name: Option<String>,
}

/// `selector`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    /// `matchLabels`.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// One `match` entry.
#[derive(Debug, Clone, Deserialize)]
pub struct TrafficMatch {
    /// CLIENT, SERVER or CLIENT_AND_SERVER (default).
    #[serde(default)]
    pub mode: Option<String>,
}

/// Where in a sidecar a plugin goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The inbound listener (`mode: SERVER`).
    Inbound,
    /// The outbound listener (`mode: CLIENT`).
    Outbound,
}

impl WasmPlugin {
    /// Parses one YAML document.
    pub fn from_yaml(text: &str) -> anyhow::Result<Self> {
        let p: Self = serde_yaml::from_str(text).context("WasmPlugin YAML")?;
        anyhow::ensure!(
            p.kind == "WasmPlugin" && p.api_version.starts_with("extensions.istio.io/"),
            "not a WasmPlugin: {} {}",
            p.api_version,
            p.kind
        );
        Ok(p)
    }

    /// Reads a WasmPlugin file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_yaml(&text).with_context(|| format!("in {}", path.display()))
    }

    /// One of the repo's own manifests, `istio-manifests/wasmplugin/<file>`.
    pub fn manifest(file: &str) -> anyhow::Result<Self> {
        Self::load(&manifests_dir().join("wasmplugin").join(file))
    }

    /// The same plugin with another `pluginConfig` (tests vary the policy,
    /// everything else stays as the manifest says).
    pub fn with_plugin_config(mut self, config: serde_json::Value) -> Self {
        self.spec.plugin_config = Some(config);
        self
    }

    /// The `<namespace>.<name>` istiod names the filter and plugin by.
    pub fn resource_name(&self) -> String {
        format!("{}.{}", self.metadata.namespace, self.metadata.name)
    }

    /// NETWORK or HTTP.
    pub fn is_network(&self) -> bool {
        self.spec.plugin_type.as_deref() == Some("NETWORK")
    }

    /// Whether a workload in `namespace` with `labels` gets this plugin
    /// (a WasmPlugin outside the root namespace selects only its own).
    pub fn selects(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        let ns_ok =
            self.metadata.namespace == namespace || self.metadata.namespace == "istio-system";
        let labels_ok = self.spec.selector.as_ref().is_none_or(|s| {
            s.match_labels
                .iter()
                .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
        });
        ns_ok && labels_ok
    }

    /// Whether it applies to `direction` traffic.
    pub fn applies_to(&self, direction: Direction) -> bool {
        if self.spec.traffic_match.is_empty() {
            return true;
        }
        self.spec.traffic_match.iter().any(|m| {
            matches!(
                (m.mode.as_deref(), direction),
                (None | Some("CLIENT_AND_SERVER" | "UNDEFINED"), _)
                    | (Some("SERVER"), Direction::Inbound)
                    | (Some("CLIENT"), Direction::Outbound)
            )
        })
    }

    /// Sort key: phase, then priority (higher first).
    pub fn order(&self) -> (u8, i64) {
        let phase = match self.spec.phase.as_deref() {
            Some("AUTHN") => 0,
            Some("AUTHZ") => 1,
            Some("STATS") => 2,
            _ => 3,
        };
        (phase, -self.spec.priority.unwrap_or(0))
    }

    /// `pluginConfig` as the JSON text Envoy hands the plugin, `None` when
    /// absent or empty (istiod then sets no `configuration`).
    pub fn configuration_json(&self) -> anyhow::Result<Option<String>> {
        match &self.spec.plugin_config {
            None => Ok(None),
            Some(serde_json::Value::Object(m)) if m.is_empty() => Ok(None),
            Some(v) => Ok(Some(serde_json::to_string(v)?)),
        }
    }

    /// The Envoy filter (`name` + `typed_config`) running the module at
    /// `wasm` (the file the agent fetched for `spec.url`).
    pub fn envoy_filter(&self, wasm: &Path) -> anyhow::Result<serde_json::Value> {
        let mut env = serde_json::Map::new();
        if let Some(policy) = &self.spec.image_pull_policy {
            env.insert("ISTIO_META_WASM_IMAGE_PULL_POLICY".into(), json!(policy));
        }
        env.insert("ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION".into(), json!("1"));
        let mut plugin = json!({
            "name": self.resource_name(),
            "root_id": self.spec.plugin_name.clone().unwrap_or_default(),
            "vm_config": {
                "runtime": "envoy.wasm.runtime.v8",
                "code": {"local": {"filename": wasm.to_string_lossy()}},
                "environment_variables": {"key_values": env},
            },
            "fail_open": self.spec.fail_strategy.as_deref() == Some("FAIL_OPEN"),
        });
        if let Some(text) = self.configuration_json()?
            && let Some(obj) = plugin.as_object_mut()
        {
            obj.insert(
                "configuration".into(),
                json!({"@type": "type.googleapis.com/google.protobuf.StringValue", "value": text}),
            );
        }
        let type_url = if self.is_network() {
            "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm"
        } else {
            "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
        };
        Ok(json!({
            "name": self.resource_name(),
            "typed_config": {"@type": type_url, "config": plugin},
        }))
    }
}

/// `istio-manifests/` in this repo.
pub fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../istio-manifests")
}

/// The manifests' XFCC EnvoyFilter patch for inbound HCMs
/// (`istio-manifests/istio/envoyfilter-xfcc-cert.yaml`): the
/// `typed_config` fields it MERGEs into every SIDECAR_INBOUND
/// http_connection_manager, minus `@type`.
pub fn inbound_hcm_patch() -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let path = manifests_dir().join("istio/envoyfilter-xfcc-cert.yaml");
    let text = std::fs::read_to_string(&path)?;
    let doc: serde_json::Value = serde_yaml::from_str(&text)?;
    let mut merged = serde_json::Map::new();
    for patch in doc
        .pointer("/spec/configPatches")
        .and_then(|p| p.as_array())
        .context("EnvoyFilter: no configPatches")?
    {
        let at = |path: &str| patch.pointer(path).and_then(|v| v.as_str());
        let inbound = at("/match/context") == Some("SIDECAR_INBOUND");
        let hcm = at("/match/listener/filterChain/filter/name")
            == Some("envoy.filters.network.http_connection_manager");
        if at("/applyTo") == Some("NETWORK_FILTER")
            && inbound
            && hcm
            && at("/patch/operation") == Some("MERGE")
            && let Some(tc) = patch
                .pointer("/patch/value/typed_config")
                .and_then(|v| v.as_object())
        {
            merged.extend(
                tc.iter()
                    .filter(|(k, _)| *k != "@type")
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
        }
    }
    anyhow::ensure!(
        !merged.is_empty(),
        "{}: no inbound HCM MERGE patch",
        path.display()
    );
    Ok(merged)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn the_http_manifest_becomes_an_http_wasm_filter_failing_closed() {
        let p = WasmPlugin::manifest("wasmplugin-http.yaml").unwrap();
        let f = p.envoy_filter(Path::new("/x/filter.wasm")).unwrap();
        assert_eq!(f["name"], "shop.meshward-http");
        let tc = &f["typed_config"];
        assert_eq!(
            tc["@type"],
            "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
        );
        let c = &tc["config"];
        assert_eq!(c["fail_open"], false);
        assert_eq!(c["vm_config"]["runtime"], "envoy.wasm.runtime.v8");
        assert_eq!(
            c["vm_config"]["code"]["local"]["filename"],
            "/x/filter.wasm"
        );
        assert_eq!(
            c["configuration"]["@type"],
            "type.googleapis.com/google.protobuf.StringValue"
        );
        let cfg: serde_json::Value =
            serde_json::from_str(c["configuration"]["value"].as_str().unwrap()).unwrap();
        assert_eq!(cfg["rules"][1]["name"], "frontend-reads-api");
        assert_eq!(p.order().0, 1, "AUTHZ");
        assert!(p.applies_to(Direction::Inbound) && !p.applies_to(Direction::Outbound));
        let backend = BTreeMap::from([("app".to_owned(), "backend".to_owned())]);
        assert!(p.selects("shop", &backend));
        assert!(!p.selects("batch", &backend));
        assert!(!p.selects("shop", &BTreeMap::new()));
    }

    #[test]
    fn the_network_manifest_becomes_a_network_wasm_filter() {
        let p = WasmPlugin::manifest("wasmplugin-network.yaml").unwrap();
        let f = p.envoy_filter(Path::new("/x/filter.wasm")).unwrap();
        assert_eq!(
            f["typed_config"]["@type"],
            "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm"
        );
        assert_eq!(f["typed_config"]["config"]["fail_open"], false);
    }

    #[test]
    fn an_empty_plugin_config_sets_no_configuration() {
        let p = WasmPlugin::manifest("wasmplugin-http.yaml")
            .unwrap()
            .with_plugin_config(json!({}));
        let f = p.envoy_filter(Path::new("/x.wasm")).unwrap();
        assert!(f["typed_config"]["config"].get("configuration").is_none());
    }

    #[test]
    fn the_xfcc_envoyfilter_merges_sanitize_set_with_cert() {
        let patch = inbound_hcm_patch().unwrap();
        assert_eq!(patch["forward_client_cert_details"], "SANITIZE_SET");
        assert_eq!(patch["set_current_client_cert_details"]["cert"], true);
    }
}
