//! What the shipped manifests promise about the signer's resources, so the
//! report can check the measurements against them: a memory limit below the
//! signer's peak is an OOM kill in the middle of a mass restart.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Serialize;

/// The signer StatefulSet in this repository.
pub fn signer_workload() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("istio-manifests")
        .join("signer")
        .join("statefulset.yaml")
}

/// A container memory limit as written and in bytes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryLimit {
    /// As in the manifest, e.g. `512Mi`.
    pub quantity: String,
    /// In bytes.
    pub bytes: u64,
    /// The manifest it came from, relative to the repository.
    pub source: String,
}

/// The `resources.limits.memory` of the signer StatefulSet.
pub fn signer_memory_limit() -> anyhow::Result<MemoryLimit> {
    let path = signer_workload();
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let quantity = limits_memory(&text).with_context(|| format!("in {}", path.display()))?;
    Ok(MemoryLimit {
        bytes: parse_quantity(&quantity)?,
        quantity,
        source: "istio-manifests/signer/statefulset.yaml".to_string(),
    })
}

/// The `memory:` under the (single) `limits:` block of a workload, read by
/// indentation (the manifest is plain block YAML).
pub fn limits_memory(yaml: &str) -> anyhow::Result<String> {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut lines = yaml.lines();
    let mut found = None;
    while let Some(line) = lines.next() {
        if line.trim() != "limits:" {
            continue;
        }
        let base = indent(line);
        for inner in lines.by_ref() {
            if inner.trim().is_empty() || inner.trim_start().starts_with('#') {
                continue;
            }
            if indent(inner) <= base {
                break;
            }
            if let Some(v) = inner.trim().strip_prefix("memory:") {
                if found.is_some() {
                    bail!("more than one limits.memory");
                }
                found = Some(v.trim().trim_matches('"').to_string());
            }
        }
    }
    found.context("no resources.limits.memory")
}

/// A Kubernetes quantity in bytes: plain, or with a binary (Ki … Ti) or
/// decimal (k, M, G, T) suffix.
pub fn parse_quantity(q: &str) -> anyhow::Result<u64> {
    const SUFFIXES: [(&str, u64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    let (digits, unit) = SUFFIXES
        .iter()
        .find_map(|(s, m)| q.strip_suffix(s).map(|d| (d, *m)))
        .unwrap_or((q, 1));
    let n: u64 = digits
        .parse()
        .with_context(|| format!("memory quantity {q:?}"))?;
    n.checked_mul(unit)
        .with_context(|| format!("memory quantity {q:?} overflows"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_signer_statefulset_has_a_memory_limit() {
        let limit = signer_memory_limit().unwrap();
        assert!(limit.bytes >= 64 << 20, "{limit:?}");
    }

    #[test]
    fn limits_memory_is_the_one_under_limits_not_requests() {
        let yaml = "
        resources:
          requests:
            cpu: 500m
            memory: 128Mi
          limits:
            # the OOM line
            memory: \"1Gi\"
        securityContext: {}
";
        assert_eq!(limits_memory(yaml).unwrap(), "1Gi");
        assert!(limits_memory("resources:\n  requests:\n    memory: 1Gi\n").is_err());
        assert!(
            limits_memory("a:\n  limits:\n    memory: 1Gi\nb:\n  limits:\n    memory: 2Gi\n")
                .is_err()
        );
    }

    #[test]
    fn quantities_in_binary_and_decimal_units() {
        assert_eq!(parse_quantity("512Mi").unwrap(), 512 << 20);
        assert_eq!(parse_quantity("1Gi").unwrap(), 1 << 30);
        assert_eq!(parse_quantity("500M").unwrap(), 500_000_000);
        assert_eq!(parse_quantity("4096").unwrap(), 4096);
        assert!(parse_quantity("lots").is_err());
        assert!(parse_quantity("99999999999Ti").is_err());
    }
}
