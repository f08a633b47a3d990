//! Namespace labels for label-selector tiers, read from the Kubernetes API
//! and cached for a short time.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::Api;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// Labels of one namespace.
pub type Labels = BTreeMap<String, String>;

/// The future returned by [`NamespaceLabels::labels`].
pub type LabelsFuture<'a> = Pin<Box<dyn Future<Output = Result<Labels, String>> + Send + 'a>>;

/// Where namespace labels come from.
pub trait NamespaceLabels: Send + Sync {
    /// The labels of `namespace`, or why they are unknown.
    fn labels<'a>(&'a self, namespace: &'a str) -> LabelsFuture<'a>;
}

/// Labels from the Kubernetes API, cached for `ttl`.
pub struct KubeNamespaceLabels {
    api: Api<Namespace>,
    ttl: Duration,
    cache: Mutex<HashMap<String, (Instant, Labels)>>,
}

impl KubeNamespaceLabels {
    /// Read labels with `client`, caching each namespace for `ttl`.
    pub fn new(client: kube::Client, ttl: Duration) -> Self {
        Self {
            api: Api::all(client),
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }
}

impl NamespaceLabels for KubeNamespaceLabels {
    fn labels<'a>(&'a self, namespace: &'a str) -> LabelsFuture<'a> {
        Box::pin(async move {
            let now = Instant::now();
            if let Some((at, labels)) = self.cache.lock().await.get(namespace)
                && now.duration_since(*at) < self.ttl
            {
                return Ok(labels.clone());
            }
            let ns = self
                .api
                .get(namespace)
                .await
                .map_err(|e| format!("reading namespace {namespace}: {e}"))?;
            let labels = ns.metadata.labels.unwrap_or_default();
            self.cache
                .lock()
                .await
                .insert(namespace.to_string(), (now, labels.clone()));
            Ok(labels)
        })
    }
}
