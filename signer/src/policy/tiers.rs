//! Per-namespace issuance tiers (e.g. critical 12 h, standard 24 h, dev 7 d)
//! and the allowed-key-types policy, compiled once from the config.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::TtlPolicy;
use crate::issuer::KeyKind;

/// A key type name as written in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    /// ECDSA P-256.
    P256,
    /// ECDSA P-384.
    P384,
    /// Ed25519.
    Ed25519,
    /// RSA (2048..=8192 bits).
    Rsa,
}

impl KeyType {
    /// Every key type the CSR checks accept.
    pub const ALL: [KeyType; 4] = [KeyType::P256, KeyType::P384, KeyType::Ed25519, KeyType::Rsa];

    /// The type of a CSR key.
    pub fn of(kind: KeyKind) -> Self {
        match kind {
            KeyKind::EcdsaP256 => KeyType::P256,
            KeyKind::EcdsaP384 => KeyType::P384,
            KeyKind::Ed25519 => KeyType::Ed25519,
            KeyKind::Rsa { .. } => KeyType::Rsa,
        }
    }

    /// Config name.
    pub fn name(&self) -> &'static str {
        match self {
            KeyType::P256 => "p256",
            KeyType::P384 => "p384",
            KeyType::Ed25519 => "ed25519",
            KeyType::Rsa => "rsa",
        }
    }
}

/// Which namespaces a tier covers: exact names, or prefixes written `name-*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceMatcher {
    exact: BTreeSet<String>,
    prefixes: Vec<String>,
}

impl NamespaceMatcher {
    /// From config patterns: `payments` (exact) or `team-*` (prefix).
    pub fn new(patterns: &[String]) -> Self {
        let mut exact = BTreeSet::new();
        let mut prefixes = Vec::new();
        for p in patterns {
            match p.strip_suffix('*') {
                Some(prefix) => prefixes.push(prefix.to_string()),
                None => {
                    exact.insert(p.clone());
                }
            }
        }
        Self { exact, prefixes }
    }

    /// True when no name or prefix is listed.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }

    /// Does `namespace` belong to the tier?
    pub fn matches(&self, namespace: &str) -> bool {
        self.exact.contains(namespace) || self.prefixes.iter().any(|p| namespace.starts_with(p))
    }
}

impl std::fmt::Display for NamespaceMatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let all: Vec<String> = self
            .exact
            .iter()
            .cloned()
            .chain(self.prefixes.iter().map(|p| format!("{p}*")))
            .collect();
        write!(f, "namespaces {}", all.join(", "))
    }
}

/// One compiled tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    /// Tier name (for logs and `policy explain`).
    pub name: String,
    /// Namespaces it covers by name.
    pub namespaces: NamespaceMatcher,
    /// Namespaces it covers by label (`matchLabels`: all must match);
    /// empty = no selector.
    pub selector: BTreeMap<String, String>,
    /// Its TTLs.
    pub ttl: TtlPolicy,
    /// Its allowed key types.
    pub allowed_keys: BTreeSet<KeyType>,
}

/// The policy that applies to one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectivePolicy {
    /// Tier name, or `default` when no tier matches.
    pub tier: String,
    /// TTLs.
    pub ttl: TtlPolicy,
    /// Allowed key types.
    pub allowed_keys: BTreeSet<KeyType>,
}

impl EffectivePolicy {
    /// Refuse key types the tier does not allow.
    pub fn check_key(&self, kind: KeyKind) -> Result<(), String> {
        let t = KeyType::of(kind);
        if self.allowed_keys.contains(&t) {
            Ok(())
        } else {
            Err(format!(
                "key type {} is not allowed in tier {} (allowed: {})",
                t.name(),
                self.tier,
                self.allowed_keys
                    .iter()
                    .map(KeyType::name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    }

    /// One line for logs and `policy explain`.
    pub fn describe(&self) -> String {
        format!(
            "tier={} default_ttl={} max_ttl={} backdate={} keys={}",
            self.tier,
            humantime::format_duration(self.ttl.default_ttl),
            humantime::format_duration(self.ttl.max_ttl),
            humantime::format_duration(self.ttl.backdate),
            self.allowed_keys
                .iter()
                .map(KeyType::name)
                .collect::<Vec<_>>()
                .join(",")
        )
    }
}

/// Base policy plus tiers; the first tier whose namespaces match wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuancePolicy {
    /// Applies when no tier matches.
    pub base: EffectivePolicy,
    /// Tiers, in config order.
    pub tiers: Vec<Tier>,
}

impl IssuancePolicy {
    /// Whether some tier selects namespaces by label (then the caller must
    /// supply labels).
    pub fn needs_labels(&self) -> bool {
        self.tiers.iter().any(|t| !t.selector.is_empty())
    }

    /// The policy for `namespace` (with its labels, when known; selector
    /// tiers never match without them).
    pub fn for_namespace(
        &self,
        namespace: &str,
        labels: Option<&BTreeMap<String, String>>,
    ) -> EffectivePolicy {
        self.tiers
            .iter()
            .find(|t| {
                t.namespaces.matches(namespace)
                    || (!t.selector.is_empty()
                        && labels
                            .is_some_and(|l| t.selector.iter().all(|(k, v)| l.get(k) == Some(v))))
            })
            .map(|t| EffectivePolicy {
                tier: t.name.clone(),
                ttl: t.ttl,
                allowed_keys: t.allowed_keys.clone(),
            })
            .unwrap_or_else(|| self.base.clone())
    }

    /// A policy with only a base TTL and every key type.
    pub fn uniform(ttl: TtlPolicy) -> Self {
        Self {
            base: EffectivePolicy {
                tier: "default".to_string(),
                ttl,
                allowed_keys: KeyType::ALL.into_iter().collect(),
            },
            tiers: Vec::new(),
        }
    }
}

/// Config of one tier (`[[policy.tiers]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    /// Name.
    pub name: String,
    /// Namespaces: exact names or `prefix-*`.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Namespaces whose labels include all of these (needs
    /// `[policy.kubernetes]`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub namespace_selector: BTreeMap<String, String>,
    /// Default TTL in this tier (falls back to `policy.default_ttl`).
    #[serde(
        default,
        with = "crate::config::human_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub default_ttl: Option<Duration>,
    /// Max TTL in this tier (falls back to `policy.max_ttl`).
    #[serde(
        default,
        with = "crate::config::human_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_ttl: Option<Duration>,
    /// Allowed key types in this tier (falls back to `policy.allowed_key_types`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_key_types: Option<Vec<KeyType>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_and_exact_namespaces() {
        let m = NamespaceMatcher::new(&["payments".into(), "dev-*".into()]);
        assert!(m.matches("payments"));
        assert!(m.matches("dev-alice"));
        assert!(!m.matches("payments2"));
        assert!(!m.matches("prod"));
    }
}
