//! Istio's sidecar bootstrap `stats_config`, rendered the way pilot-agent
//! renders it, so a sidecar here keeps and tags exactly the stats an Istio
//! sidecar would.
//!
//! Istio's bootstrap sets `use_all_default_tags: false`, extracts only the
//! tags in its `stats_tags` list (one `(<tag>=\.=(.*?);\.;)` regex per mesh
//! `extraStatTags` entry among them) and keeps only the stats its
//! `stats_matcher` inclusion list names (`reporter=`, the proxy config's
//! `proxyStatsMatcher` patterns, the required `cluster_manager`, …, `wasm`
//! prefixes, the RBAC suffixes, `component`, `istio`). The Istio side is
//! data, [`StatsTemplate`], taken from Istio's template and bootstrap code
//! into `e2e/testdata/istio/sidecar-stats-template.json` (which names the
//! release and commit); the mesh side is [`ProxyStatsConfig`], read from
//! this repo's `istio-operator.yaml`. [`stats_config`] is a pure function
//! of both, checked against Istio's own golden bootstrap
//! (`e2e/testdata/istio/stats-inclusion-golden.json`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The template's placeholder for an extra stat tag's name.
const TAG: &str = "{tag}";
/// The variable Istio substitutes with each instance IP in inclusion patterns.
const POD_IP: &str = "{pod_ip}";

/// What went wrong reading the template or the mesh config.
#[derive(Debug, thiserror::Error)]
pub enum IstioStatsError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// Which file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The stats template is not the expected JSON.
    #[error("Istio stats template: {0}")]
    Template(#[from] serde_json::Error),
    /// The template's extra-tag entry does not use `{tag}` for the tag.
    #[error(
        "Istio stats template: extra_stat_tag must name the tag {TAG} and use it in its regex, got {tag_name:?} / {regex:?}"
    )]
    ExtraTagWithoutPlaceholder {
        /// The entry's `tag_name`.
        tag_name: String,
        /// The entry's `regex`.
        regex: String,
    },
    /// The IstioOperator manifest is not the expected YAML.
    #[error("IstioOperator manifest: {0}")]
    Operator(#[from] serde_yaml::Error),
}

/// One Envoy `TagSpecifier` of Istio's list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StatsTag {
    /// The tag (Prometheus label) name.
    pub tag_name: String,
    /// The regex whose first capture is removed from the stat name and
    /// whose second is the tag's value.
    pub regex: String,
}

/// The fixed parts of Istio's sidecar `stats_matcher` inclusion list.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatcherTemplate {
    /// Prefixes before everything else (`reporter=`).
    pub leading_prefixes: Vec<String>,
    /// Prefixes appended after the proxy config's own.
    pub required_prefixes: Vec<String>,
    /// Suffixes appended after the proxy config's own.
    pub required_suffixes: Vec<String>,
    /// Regexes appended after the proxy config's own.
    pub required_regexps: Vec<String>,
    /// Prefixes after everything else (`component`, `istio`).
    pub trailing_prefixes: Vec<String>,
}

/// Istio's side of a sidecar's `stats_config` (from its bootstrap template
/// and `pkg/bootstrap/config.go`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsTemplate {
    /// Where the data comes from (repository, release, commit, files).
    pub source: Value,
    /// `false` in Istio: only the listed tags are extracted.
    pub use_all_default_tags: bool,
    /// The tags before the extra stat tags.
    pub stats_tags_before_extra: Vec<StatsTag>,
    /// One extra stat tag's entry, `{tag}` standing for its name.
    pub extra_stat_tag: StatsTag,
    /// The tags after the extra stat tags.
    pub stats_tags_after_extra: Vec<StatsTag>,
    /// The inclusion list's fixed parts.
    pub stats_matcher: MatcherTemplate,
}

impl StatsTemplate {
    /// Parses and checks the template JSON.
    pub fn parse(text: &str) -> Result<Self, IstioStatsError> {
        let template: Self = serde_json::from_str(text)?;
        let extra = &template.extra_stat_tag;
        if extra.tag_name != TAG || !extra.regex.contains(TAG) {
            return Err(IstioStatsError::ExtraTagWithoutPlaceholder {
                tag_name: extra.tag_name.clone(),
                regex: extra.regex.clone(),
            });
        }
        Ok(template)
    }

    /// The template committed in `e2e/testdata/istio/`.
    pub fn istio() -> Result<Self, IstioStatsError> {
        Self::parse(&read(&testdata_dir().join("sidecar-stats-template.json"))?)
    }

    /// The entry of extra stat tag `tag`, as the template's
    /// `range .extraStatTags` writes it (the name goes in unescaped).
    fn extra_tag(&self, tag: &str) -> StatsTag {
        StatsTag {
            tag_name: self.extra_stat_tag.tag_name.replace(TAG, tag),
            regex: self.extra_stat_tag.regex.replace(TAG, tag),
        }
    }
}

/// `ProxyConfig.proxyStatsMatcher`: stats to keep besides Istio's own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyStatsMatcher {
    /// Stat name prefixes (`{pod_ip}` is substituted).
    #[serde(default)]
    pub inclusion_prefixes: Vec<String>,
    /// Stat name suffixes.
    #[serde(default)]
    pub inclusion_suffixes: Vec<String>,
    /// Stat name regexes (RE2).
    #[serde(default)]
    pub inclusion_regexps: Vec<String>,
}

/// The stats part of a mesh's `ProxyConfig` (`meshConfig.defaultConfig`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatsConfig {
    /// Tags `name=.=value;.;` segments of stat names are extracted into.
    #[serde(default)]
    pub extra_stat_tags: Vec<String>,
    /// Stats kept besides Istio's own.
    #[serde(default)]
    pub proxy_stats_matcher: Option<ProxyStatsMatcher>,
}

#[derive(Deserialize)]
struct Operator {
    spec: OperatorSpec,
}

#[derive(Deserialize)]
struct OperatorSpec {
    #[serde(rename = "meshConfig", default)]
    mesh_config: MeshConfig,
}

#[derive(Default, Deserialize)]
struct MeshConfig {
    #[serde(rename = "defaultConfig", default)]
    default_config: ProxyStatsConfig,
}

impl ProxyStatsConfig {
    /// `spec.meshConfig.defaultConfig` of an IstioOperator manifest (the
    /// stats fields; the rest is not read).
    pub fn from_operator_yaml(text: &str) -> Result<Self, IstioStatsError> {
        let operator: Operator = serde_yaml::from_str(text)?;
        Ok(operator.spec.mesh_config.default_config)
    }

    /// The mesh's: `istio-manifests/istio/istio-operator.yaml`.
    pub fn from_mesh_manifests() -> Result<Self, IstioStatsError> {
        let path = super::wasmplugin::manifests_dir().join("istio/istio-operator.yaml");
        Self::from_operator_yaml(&read(&path)?)
    }
}

/// The bootstrap `stats_config` Istio renders for a sidecar with proxy
/// config `proxy` on `instance_ips` (substituted for `{pod_ip}`; Istio's
/// node metadata holds them without duplicates).
///
/// As `getStatsOptions` and the template do: extra stat tags without empty
/// ones and duplicates, between the template's fixed tags; inclusion
/// patterns `leading`, then per kind the proxy config's followed by the
/// required ones (prefixes, suffixes, regexes), then `trailing`.
pub fn stats_config(
    template: &StatsTemplate,
    proxy: &ProxyStatsConfig,
    instance_ips: &[&str],
) -> Value {
    let extra = unique(proxy.extra_stat_tags.iter().map(String::as_str));
    let stats_tags: Vec<StatsTag> = template
        .stats_tags_before_extra
        .iter()
        .cloned()
        .chain(extra.iter().map(|tag| template.extra_tag(tag)))
        .chain(template.stats_tags_after_extra.iter().cloned())
        .collect();

    let ips = unique(instance_ips.iter().copied());
    let own = proxy.proxy_stats_matcher.clone().unwrap_or_default();
    let m = &template.stats_matcher;
    let with_required = |own: &[String], required: &[String]| -> Vec<String> {
        own.iter()
            .chain(required)
            .flat_map(|p| substitute(p, &ips))
            .collect()
    };
    let patterns: Vec<Value> = m
        .leading_prefixes
        .iter()
        .cloned()
        .chain(with_required(&own.inclusion_prefixes, &m.required_prefixes))
        .map(|p| json!({"prefix": p}))
        .chain(
            with_required(&own.inclusion_suffixes, &m.required_suffixes)
                .into_iter()
                .map(|s| json!({"suffix": s})),
        )
        .chain(
            with_required(&own.inclusion_regexps, &m.required_regexps)
                .into_iter()
                .map(|r| json!({"safe_regex": {"regex": r}})),
        )
        .chain(m.trailing_prefixes.iter().map(|p| json!({"prefix": p})))
        .collect();

    json!({
        "use_all_default_tags": template.use_all_default_tags,
        "stats_tags": stats_tags,
        "stats_matcher": {"inclusion_list": {"patterns": patterns}},
    })
}

/// `pattern` once per instance IP if it holds `{pod_ip}` (not at all
/// without IPs), else as it is.
fn substitute(pattern: &str, ips: &[&str]) -> Vec<String> {
    if pattern.contains(POD_IP) {
        ips.iter().map(|ip| pattern.replace(POD_IP, ip)).collect()
    } else {
        vec![pattern.to_owned()]
    }
}

/// The non-empty values, first occurrence kept.
fn unique<'a>(values: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for v in values {
        if !v.is_empty() && !out.contains(&v) {
            out.push(v);
        }
    }
    out
}

/// `e2e/testdata/istio/`.
pub fn testdata_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/istio")
}

fn read(path: &Path) -> Result<String, IstioStatsError> {
    std::fs::read_to_string(path).map_err(|source| IstioStatsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Istio's golden `stats_inclusion` bootstrap: inputs and the
    /// `stats_config` Istio rendered from them.
    #[derive(Deserialize)]
    struct Golden {
        inputs: GoldenInputs,
        stats_config: Value,
    }

    #[derive(Deserialize)]
    struct GoldenInputs {
        #[serde(flatten)]
        proxy: ProxyStatsConfig,
        instance_ips: Vec<String>,
    }

    #[test]
    fn renders_istios_own_stats_inclusion_golden() {
        let text = read(&testdata_dir().join("stats-inclusion-golden.json")).unwrap();
        let golden: Golden = serde_json::from_str(&text).unwrap();
        let ips: Vec<&str> = golden
            .inputs
            .instance_ips
            .iter()
            .map(String::as_str)
            .collect();
        let ours = stats_config(&StatsTemplate::istio().unwrap(), &golden.inputs.proxy, &ips);
        assert_eq!(
            ours,
            golden.stats_config,
            "ours:\n{}",
            serde_json::to_string_pretty(&ours).unwrap()
        );
    }

    #[test]
    fn the_mesh_extracts_action_rule_and_mode_with_istios_regex() {
        let proxy = ProxyStatsConfig::from_mesh_manifests().unwrap();
        assert_eq!(proxy.extra_stat_tags, ["action", "rule", "mode", "result"]);
        let config = stats_config(&StatsTemplate::istio().unwrap(), &proxy, &["127.0.0.1"]);
        let tags = config["stats_tags"].as_array().unwrap();
        for tag in ["action", "rule", "mode"] {
            let regex = format!("({tag}=\\.=(.*?);\\.;)");
            assert!(
                tags.contains(&json!({"tag_name": tag, "regex": regex})),
                "{tag}: {tags:?}"
            );
        }
        assert_eq!(config["use_all_default_tags"], false);
    }

    #[test]
    fn empty_and_repeated_extra_stat_tags_are_dropped_as_istio_does() {
        let template = StatsTemplate::istio().unwrap();
        let proxy = ProxyStatsConfig {
            extra_stat_tags: vec!["rule".into(), String::new(), "rule".into()],
            proxy_stats_matcher: None,
        };
        let config = stats_config(&template, &proxy, &[]);
        let rule_tags = config["stats_tags"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["tag_name"] == "rule")
            .count();
        assert_eq!(rule_tags, 1);
        assert!(!config.to_string().contains("\"tag_name\":\"\""));
    }

    #[test]
    fn a_pod_ip_pattern_without_instance_ips_is_dropped() {
        let template = StatsTemplate::istio().unwrap();
        let proxy = ProxyStatsConfig {
            extra_stat_tags: Vec::new(),
            proxy_stats_matcher: Some(ProxyStatsMatcher {
                inclusion_prefixes: vec!["http.{pod_ip}_".into()],
                ..ProxyStatsMatcher::default()
            }),
        };
        assert!(
            !stats_config(&template, &proxy, &[])
                .to_string()
                .contains("http.")
        );
        assert!(
            stats_config(&template, &proxy, &["10.0.0.1"])
                .to_string()
                .contains("\"http.10.0.0.1_\"")
        );
    }

    #[test]
    fn a_misspelt_proxy_stats_matcher_field_is_refused() {
        let yaml = "spec:\n  meshConfig:\n    defaultConfig:\n      proxyStatsMatcher:\n        inclusionPrefix: [wasmcustom]\n";
        let err = ProxyStatsConfig::from_operator_yaml(yaml).unwrap_err();
        assert!(err.to_string().contains("inclusionPrefix"), "{err}");
    }

    #[test]
    fn a_template_whose_extra_tag_lacks_the_placeholder_is_refused() {
        let mut v: Value = serde_json::from_str(
            &read(&testdata_dir().join("sidecar-stats-template.json")).unwrap(),
        )
        .unwrap();
        v["extra_stat_tag"]["regex"] = json!("(action=\\.=(.*?);\\.;)");
        let err = StatsTemplate::parse(&v.to_string()).unwrap_err();
        assert!(
            matches!(err, IstioStatsError::ExtraTagWithoutPlaceholder { .. }),
            "{err}"
        );
    }
}
