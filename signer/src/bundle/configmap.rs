//! Istio's root distribution: the `istio-ca-root-cert` ConfigMap (key
//! `root-cert.pem`, label `istio.io/config: "true"`) in every namespace a
//! label selector picks, written through kube-rs.
//!
//! On each publish the sink lists namespaces with the selector (the API
//! server filters), checks the selector again on what came back (so a
//! misbehaving proxy or API server cannot make it write into unlabelled
//! namespaces), and lists every `istio-ca-root-cert` ConfigMap in one
//! cluster-wide call (`fieldSelector=metadata.name=…`); both lists are read
//! in pages of [`PAGE`]. Then per namespace it creates the ConfigMap,
//! replaces it when its roots or label differ (keeping other labels and
//! keys, with the listed `resourceVersion` so a concurrent edit conflicts
//! instead of being overwritten), or leaves it alone when it is current. A
//! resync with nothing to change therefore costs a few list calls, not one
//! call per namespace: with thousands of namespaces and a resync every
//! minute per replica, per-namespace reads would be a constant load on the
//! API server. Where the cluster-wide list is refused (RBAC without `list`
//! on ConfigMaps), each namespace's ConfigMap is read on its own instead.
//! Terminating namespaces are skipped.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};

use super::{BundleError, BundleSink, SinkFuture, TrustBundle};

/// Istio's ConfigMap name.
pub const CONFIGMAP_NAME: &str = "istio-ca-root-cert";
/// Istio's key for the PEM roots.
pub const ROOT_CERT_KEY: &str = "root-cert.pem";
/// The label Istio puts on the ConfigMap.
pub const ISTIO_CONFIG_LABEL: &str = "istio.io/config";
/// Objects per list page.
pub const PAGE: u32 = 500;

/// One term of an equality-based label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Eq(String, String),
    NotEq(String, String),
    Exists(String),
    NotExists(String),
}

/// An equality-based Kubernetes label selector (`k=v`, `k==v`, `k!=v`, `k`,
/// `!k`, comma-separated: all must hold). Set-based terms (`in`, `notin`)
/// are refused rather than half-understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelSelector {
    terms: Vec<Term>,
    text: String,
}

/// A selector that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("label selector {selector:?}: {reason}")]
pub struct BadSelector {
    selector: String,
    reason: String,
}

fn valid_label_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 316
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_label_value(s: &str) -> bool {
    s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl LabelSelector {
    /// Parse a selector. An empty selector is refused: it would select every
    /// namespace, which should be said explicitly by a term.
    pub fn parse(s: &str) -> Result<Self, BadSelector> {
        let bad = |reason: &str| BadSelector {
            selector: s.to_string(),
            reason: reason.to_string(),
        };
        let mut terms = Vec::new();
        for raw in s.split(',') {
            let t = raw.trim();
            if t.is_empty() {
                return Err(bad("empty term"));
            }
            if t.contains(' ') || t.contains('(') {
                return Err(bad("set-based terms (in, notin) are not supported"));
            }
            let term = if let Some((k, v)) = t.split_once("!=") {
                Term::NotEq(k.to_string(), v.to_string())
            } else if let Some((k, v)) = t.split_once("==") {
                Term::Eq(k.to_string(), v.to_string())
            } else if let Some((k, v)) = t.split_once('=') {
                Term::Eq(k.to_string(), v.to_string())
            } else if let Some(k) = t.strip_prefix('!') {
                Term::NotExists(k.to_string())
            } else {
                Term::Exists(t.to_string())
            };
            let (key, value) = match &term {
                Term::Eq(k, v) | Term::NotEq(k, v) => (k, Some(v)),
                Term::Exists(k) | Term::NotExists(k) => (k, None),
            };
            if !valid_label_part(key) {
                return Err(bad(&format!("bad label key {key:?}")));
            }
            if let Some(v) = value
                && !valid_label_value(v)
            {
                return Err(bad(&format!("bad label value {v:?}")));
            }
            terms.push(term);
        }
        Ok(Self {
            terms,
            text: s.trim().to_string(),
        })
    }

    /// Whether `labels` satisfy every term.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.terms.iter().all(|t| match t {
            Term::Eq(k, v) => labels.get(k) == Some(v),
            Term::NotEq(k, v) => labels.get(k) != Some(v),
            Term::Exists(k) => labels.contains_key(k),
            Term::NotExists(k) => !labels.contains_key(k),
        })
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// What one publish did, per namespace (for logs and tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigMapReport {
    /// Namespaces where the ConfigMap was created.
    pub created: Vec<String>,
    /// Namespaces where it was replaced.
    pub updated: Vec<String>,
    /// Namespaces where it was already current.
    pub unchanged: Vec<String>,
    /// Namespaces returned by the API that the selector does not match.
    pub skipped: Vec<String>,
    /// Namespaces that failed, with the error.
    pub failed: Vec<(String, String)>,
}

/// Writes `istio-ca-root-cert` into the selected namespaces.
#[derive(Clone)]
pub struct ConfigMapSink {
    client: kube::Client,
    selector: LabelSelector,
    name: String,
    key: &'static str,
}

impl fmt::Debug for ConfigMapSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigMapSink")
            .field("selector", &self.selector)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ConfigMapSink {
    /// A sink using `client` (in a cluster: `kube::Client::try_default()`).
    pub fn new(client: kube::Client, selector: LabelSelector) -> Self {
        Self {
            client,
            selector,
            name: CONFIGMAP_NAME.to_string(),
            key: ROOT_CERT_KEY,
        }
    }

    /// The same namespaces, for Istio's CRL ConfigMap instead:
    /// `istio-ca-crl`, key `ca-crl.pem` (what a sidecar mounts at
    /// `/var/run/secrets/istio/crl`).
    pub fn for_crl(self) -> Self {
        Self {
            name: crate::revocation::CRL_CONFIGMAP_NAME.to_string(),
            key: crate::revocation::CRL_PEM,
            ..self
        }
    }

    /// Write the bundle's roots into every selected namespace.
    pub async fn sync(&self, bundle: &TrustBundle) -> Result<ConfigMapReport, BundleError> {
        self.sync_pem(&bundle.roots_pem()).await
    }

    /// Write `pem` under this sink's key into every selected namespace.
    /// Per-namespace failures are collected, not fatal; listing namespaces
    /// failing is.
    pub async fn sync_pem(&self, pem: &str) -> Result<ConfigMapReport, BundleError> {
        let err = |reason: String| BundleError::Sink {
            sink: "configmap",
            reason,
        };
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let selected = list_all(
            &namespaces,
            ListParams::default().labels(&self.selector.to_string()),
        )
        .await
        .map_err(|e| err(format!("listing namespaces ({}): {e}", self.selector)))?;
        let configmaps: Api<ConfigMap> = Api::all(self.client.clone());
        let existing = match list_all(
            &configmaps,
            ListParams::default().fields(&format!("metadata.name={}", self.name)),
        )
        .await
        {
            Ok(list) => Some(
                list.into_iter()
                    .filter(|cm| cm.metadata.name.as_deref() == Some(self.name.as_str()))
                    .filter_map(|cm| cm.metadata.namespace.clone().map(|ns| (ns, cm)))
                    .collect::<HashMap<String, ConfigMap>>(),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "listing {} ConfigMaps cluster-wide failed; reading each namespace's instead", self.name);
                None
            }
        };
        let mut report = ConfigMapReport::default();
        for ns in selected {
            let Some(ns_name) = ns.metadata.name.clone() else {
                continue;
            };
            let labels = ns.metadata.labels.clone().unwrap_or_default();
            if !self.selector.matches(&labels) {
                tracing::warn!(namespace = %ns_name, selector = %self.selector, "API returned a namespace the selector does not match; skipped");
                report.skipped.push(ns_name);
                continue;
            }
            let terminating = ns.metadata.deletion_timestamp.is_some()
                || ns
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.as_deref())
                    .is_some_and(|p| p == "Terminating");
            if terminating {
                report.skipped.push(ns_name);
                continue;
            }
            let current = match &existing {
                Some(listed) => Ok(listed.get(&ns_name).cloned()),
                None => {
                    Api::<ConfigMap>::namespaced(self.client.clone(), &ns_name)
                        .get_opt(&self.name)
                        .await
                }
            };
            let outcome = match current {
                Ok(current) => self.sync_one(&ns_name, current, pem).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(Outcome::Created) => report.created.push(ns_name),
                Ok(Outcome::Updated) => report.updated.push(ns_name),
                Ok(Outcome::Unchanged) => report.unchanged.push(ns_name),
                Err(e) => {
                    tracing::warn!(namespace = %ns_name, configmap = %self.name, error = %e, "writing the ConfigMap failed");
                    report.failed.push((ns_name, e.to_string()));
                }
            }
        }
        Ok(report)
    }

    /// Brings `ns`'s ConfigMap (`current`, as read) to `pem`.
    async fn sync_one(
        &self,
        ns: &str,
        current: Option<ConfigMap>,
        pem: &str,
    ) -> Result<Outcome, kube::Error> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        match current {
            None => {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        namespace: Some(ns.to_string()),
                        labels: Some(BTreeMap::from([(
                            ISTIO_CONFIG_LABEL.to_string(),
                            "true".to_string(),
                        )])),
                        ..ObjectMeta::default()
                    },
                    data: Some(BTreeMap::from([(self.key.to_string(), pem.to_string())])),
                    ..ConfigMap::default()
                };
                api.create(&PostParams::default(), &cm).await?;
                Ok(Outcome::Created)
            }
            Some(mut cm) => {
                let data_ok = cm
                    .data
                    .as_ref()
                    .and_then(|d| d.get(self.key))
                    .is_some_and(|v| v == pem);
                let label_ok = cm
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(ISTIO_CONFIG_LABEL))
                    .is_some_and(|v| v == "true");
                if data_ok && label_ok {
                    return Ok(Outcome::Unchanged);
                }
                cm.data
                    .get_or_insert_with(BTreeMap::new)
                    .insert(self.key.to_string(), pem.to_string());
                cm.metadata
                    .labels
                    .get_or_insert_with(BTreeMap::new)
                    .insert(ISTIO_CONFIG_LABEL.to_string(), "true".to_string());
                api.replace(&self.name, &PostParams::default(), &cm).await?;
                Ok(Outcome::Updated)
            }
        }
    }
}

/// Every object `params` selects, read [`PAGE`] at a time.
async fn list_all<K>(api: &Api<K>, params: ListParams) -> Result<Vec<K>, kube::Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut out = Vec::new();
    let mut params = params.limit(PAGE);
    loop {
        let page = api.list(&params).await?;
        out.extend(page.items);
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(out),
        }
    }
}

enum Outcome {
    Created,
    Updated,
    Unchanged,
}

impl BundleSink for ConfigMapSink {
    fn name(&self) -> &'static str {
        "configmap"
    }

    fn publish<'a>(&'a self, bundle: &'a TrustBundle) -> SinkFuture<'a> {
        Box::pin(async move {
            let report = self.sync(bundle).await?;
            tracing::info!(
                sequence = bundle.sequence(),
                created = report.created.len(),
                updated = report.updated.len(),
                unchanged = report.unchanged.len(),
                skipped = report.skipped.len(),
                failed = report.failed.len(),
                "istio-ca-root-cert synced"
            );
            if report.failed.is_empty() {
                Ok(())
            } else {
                Err(BundleError::Sink {
                    sink: "configmap",
                    reason: format!(
                        "{} namespace(s) failed: {:?}",
                        report.failed.len(),
                        report.failed
                    ),
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selector_terms_all_must_hold() {
        let s = LabelSelector::parse("istio-injection=enabled,!skip,team").unwrap();
        assert!(s.matches(&labels(&[("istio-injection", "enabled"), ("team", "a")])));
        assert!(!s.matches(&labels(&[("istio-injection", "enabled")])));
        assert!(!s.matches(&labels(&[
            ("istio-injection", "enabled"),
            ("team", "a"),
            ("skip", "")
        ])));
        assert!(!s.matches(&labels(&[("istio-injection", "disabled"), ("team", "a")])));
        let ne = LabelSelector::parse("env!=prod").unwrap();
        assert!(ne.matches(&labels(&[])));
        assert!(!ne.matches(&labels(&[("env", "prod")])));
    }

    #[test]
    fn selector_refuses_set_terms_and_garbage() {
        for bad in ["", "a in (b)", "a=b,", "=x", "a=b c", "a=$"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad:?}");
        }
    }
}
