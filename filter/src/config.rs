//! The plugin configuration: JSON, as a `WasmPlugin`'s `pluginConfig` carries
//! it. Unknown fields are rejected. Deserializing checks shapes; semantic
//! checks (patterns, durations, ports, names) happen when the config is
//! compiled into a [`Policy`](crate::Policy), and every error names the field
//! and the value.

use serde::{Deserialize, Deserializer};
use std::fmt;
use thiserror::Error;

/// Largest accepted config, in bytes.
pub const MAX_CONFIG_BYTES: usize = 4 * 1024 * 1024;
/// Most rules accepted.
pub const MAX_RULES: usize = 50_000;
/// Longest accepted pattern, in bytes (a SPIFFE ID is at most 2048).
pub const MAX_PATTERN_BYTES: usize = 2048;
/// Longest rule name (rule names become metric tag values).
pub const MAX_RULE_NAME_BYTES: usize = 63;

/// Top level.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// The mesh's trust domain. Patterns written with `cluster.local` mean this
    /// trust domain (as Istio treats `cluster.local` in policies).
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    #[serde(default)]
    pub mode: Mode,
    /// Which filter chain the plugin is installed in (Istio `WasmPlugin.type`):
    /// `http` (default) decides per request, `network` per TCP connection.
    #[serde(default)]
    pub filter_type: FilterType,
    /// Network filter only: when the filters after this one (`tcp_proxy`)
    /// start. Ignored by the HTTP filter.
    #[serde(default)]
    pub upstream_connect: UpstreamConnect,
    /// Deny peers that presented no client certificate. Default true.
    #[serde(default = "default_true")]
    pub require_mtls: bool,
    #[serde(default)]
    pub unknown_cert_age: UnknownCertAge,
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Where to look up peer certificates the proxy did not show (the
    /// signer's issuance ledger). Absent: no lookups.
    #[serde(default)]
    pub ledger: Option<crate::ledger::LedgerConfig>,
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}

fn default_true() -> bool {
    true
}

/// Enforce decisions, or only report them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Shadow,
}

impl Mode {
    /// `enforce` / `shadow`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Shadow => "shadow",
        }
    }
}

/// HTTP filter or network (TCP) filter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FilterType {
    #[default]
    Http,
    Network,
}

/// When a network filter lets the filters after it start (see
/// [`crate::connection_gate`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum UpstreamConnect {
    /// At accept, as Envoy does: `tcp_proxy` connects upstream before the
    /// TLS handshake. What the upstream sends before the peer is judged is
    /// held, and Envoy releases it only with the upstream's next bytes: a
    /// server-first upstream (MySQL, SMTP) stalls.
    #[default]
    Immediate,
    /// Once the peer is judged: the filter stops the chain at accept. Needs
    /// later filters that do not stop reading before they start (`tcp_proxy`
    /// with `max_early_data_bytes`); else the TLS handshake never ends.
    AfterDecision,
}

/// What a certificate condition does when the peer certificate's validity is
/// unknown: `deny` makes it resolve towards denial (an ALLOW rule's condition
/// fails, a DENY or AUDIT rule's condition holds), `allow` the opposite.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownCertAge {
    #[default]
    Deny,
    Allow,
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rule {
    /// Unique; `[A-Za-z0-9_-]`, not starting with `_`, at most 63 bytes.
    pub name: String,
    pub action: RuleAction,
    /// Sources, OR-ed. Absent: any source.
    pub from: Option<Vec<Source>>,
    /// Operations, OR-ed. Absent: any operation.
    pub to: Option<Vec<Operation>>,
    /// Conditions, AND-ed. Absent: none.
    pub when: Option<When>,
}

/// ALLOW, DENY or AUDIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum RuleAction {
    Allow,
    Deny,
    Audit,
}

/// A `from` entry: every present field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Source {
    pub principals: Option<Vec<String>>,
    pub not_principals: Option<Vec<String>>,
    pub namespaces: Option<Vec<String>>,
    pub not_namespaces: Option<Vec<String>>,
    pub trust_domains: Option<Vec<String>>,
}

/// A `to` entry: every present field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Operation {
    pub hosts: Option<Vec<String>>,
    pub not_hosts: Option<Vec<String>>,
    pub ports: Option<Vec<PortText>>,
    pub not_ports: Option<Vec<PortText>>,
    pub methods: Option<Vec<String>>,
    pub not_methods: Option<Vec<String>>,
    pub paths: Option<Vec<String>>,
    pub not_paths: Option<Vec<String>>,
}

/// Certificate conditions: all present ones must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct When {
    /// Holds when `now - notBefore <= maxCertAge`.
    pub max_cert_age: Option<String>,
    /// Holds when `notAfter - now >= minRemainingValidity`.
    pub min_remaining_validity: Option<String>,
}

/// A port as written: `"8080"` (Istio's form) or `8080`. Checked at compile time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortText(pub String);

impl<'de> Deserialize<'de> for PortText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = PortText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or a string holding one")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortText, E> {
                Ok(PortText(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortText, E> {
                Ok(PortText(v.to_string()))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortText, E> {
                Ok(PortText(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A config that cannot be used. The plugin refuses to start on any of these.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("pluginConfig is empty: refusing to start (fail closed); give at least `{{}}`")]
    Empty,
    #[error("pluginConfig is {size} bytes, more than the {max} allowed")]
    TooLarge { size: usize, max: usize },
    #[error("pluginConfig is not valid: {0}")]
    Json(String),
    #[error("{field}: {problem} (got {value:?})")]
    Invalid {
        field: String,
        value: String,
        problem: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(
        field: impl Into<String>,
        value: &str,
        problem: impl fmt::Display,
    ) -> Self {
        let mut shown: String = value.chars().take(120).collect();
        if shown.len() < value.len() {
            shown.push_str("...");
        }
        Self::Invalid {
            field: field.into(),
            value: shown,
            problem: problem.to_string(),
        }
    }
}

impl Config {
    /// Parses the JSON text of `pluginConfig`.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ConfigError::Empty);
        }
        if bytes.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                size: bytes.len(),
                max: MAX_CONFIG_BYTES,
            });
        }
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::Json(e.to_string()))?;
        require_objects(&value)?;
        serde_json::from_value(value).map_err(|e| ConfigError::Json(e.to_string()))
    }
}

/// serde would also accept a struct written as a positional array
/// (`["r", "ALLOW"]`); only the documented object form is allowed.
fn require_objects(top: &serde_json::Value) -> Result<(), ConfigError> {
    use serde_json::Value;
    let object = |v: &Value, field: &str| -> Result<(), ConfigError> {
        if v.is_object() {
            Ok(())
        } else {
            Err(ConfigError::invalid(
                field,
                &v.to_string(),
                "must be a JSON object",
            ))
        }
    };
    object(top, "pluginConfig")?;
    if let Some(ledger) = top.get("ledger").filter(|l| !l.is_null()) {
        object(ledger, "ledger")?;
    }
    let Some(Value::Array(rules)) = top.get("rules") else {
        return Ok(());
    };
    for (i, rule) in rules.iter().enumerate() {
        object(rule, &format!("rules[{i}]"))?;
        for key in ["from", "to"] {
            if let Some(Value::Array(items)) = rule.get(key) {
                for (j, item) in items.iter().enumerate() {
                    object(item, &format!("rules[{i}].{key}[{j}]"))?;
                }
            }
        }
        if let Some(when) = rule.get("when").filter(|w| !w.is_null()) {
            object(when, &format!("rules[{i}].when"))?;
        }
    }
    Ok(())
}
