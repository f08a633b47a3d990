//! Node binding for trusted node agents (`ImpersonatedIdentity`), as istiod's
//! node authorizer does it: a node agent (ztunnel) may get a certificate for
//! an identity only if a pod running that identity is scheduled on the
//! agent's own node. Without it, one compromised node's agent could obtain
//! the certificate of any workload in the mesh.
//!
//! The agent's node comes from its pod: the bound service-account token names
//! the pod (and its UID); the pod is read from the API server, its UID must
//! match (a token of a deleted pod does not carry over to a new pod of the
//! same name), and its `spec.nodeName` is the node. The pods on that node are
//! listed (`fieldSelector=spec.nodeName=<node>`) and cached per node for
//! `pod_cache`; a miss re-lists once if the list is older than
//! [`RELIST_AFTER`], so a pod scheduled a moment ago is found. Running or
//! pending pods count; finished ones (`Succeeded`, `Failed`) do not.
//!
//! Anything the signer cannot check — the API server unreachable, an answer
//! it cannot read — refuses the request (UNAVAILABLE), never allows it.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::authn::CallerIdentity;

/// A cached node's pod list older than this is re-listed when it lacks the
/// asked identity.
pub const RELIST_AFTER: Duration = Duration::from_secs(1);

/// Why a node agent may not have the identity it asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeRefusal {
    /// The facts say no (PERMISSION_DENIED).
    #[error("{0}")]
    Denied(String),
    /// The facts could not be read (UNAVAILABLE; the agent retries).
    #[error("{0}")]
    Unavailable(String),
}

/// The future returned by [`NodeAuthorizer::authorize`]: the agent's node.
pub type NodeFuture<'a> = Pin<Box<dyn Future<Output = Result<String, NodeRefusal>> + Send + 'a>>;

/// Decides whether a trusted node agent may have `namespace/service_account`.
pub trait NodeAuthorizer: Send + Sync {
    /// The agent's node if a pod of `namespace/service_account` runs on it.
    fn authorize<'a>(
        &'a self,
        agent: &'a CallerIdentity,
        namespace: &'a str,
        service_account: &'a str,
    ) -> NodeFuture<'a>;
}

/// (namespace, service account) of the live pods on one node.
type Identities = Arc<HashSet<(String, String)>>;

/// A node agent's pod: (namespace, name, uid).
type AgentPod = (String, String, String);

/// Node binding from the Kubernetes API.
pub struct KubeNodeAuthorizer {
    client: kube::Client,
    ttl: Duration,
    /// Agent pod (namespace, name, uid) → its node.
    agents: Mutex<HashMap<AgentPod, (Instant, String)>>,
    /// Node → identities with a live pod on it.
    nodes: Mutex<HashMap<String, (Instant, Identities)>>,
}

impl KubeNodeAuthorizer {
    /// Read pods with `client`, caching answers for `ttl`.
    pub fn new(client: kube::Client, ttl: Duration) -> Self {
        Self {
            client,
            ttl,
            agents: Mutex::new(HashMap::new()),
            nodes: Mutex::new(HashMap::new()),
        }
    }

    /// The node the agent's own pod runs on.
    async fn agent_node(&self, agent: &CallerIdentity) -> Result<String, NodeRefusal> {
        let pod = agent.pod.as_ref().ok_or_else(|| {
            NodeRefusal::Denied(format!(
                "node agent {}'s token names no pod (not a bound service-account token), so its \
                 node is unknown",
                agent.spiffe_id
            ))
        })?;
        let key = (agent.namespace.clone(), pod.name.clone(), pod.uid.clone());
        let now = Instant::now();
        if let Some((at, node)) = self.agents.lock().await.get(&key)
            && now.duration_since(*at) < self.ttl
        {
            return Ok(node.clone());
        }
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &agent.namespace);
        let found = api.get_opt(&pod.name).await.map_err(|e| {
            NodeRefusal::Unavailable(format!(
                "reading node agent pod {}/{}: {e}",
                agent.namespace, pod.name
            ))
        })?;
        let found = found.ok_or_else(|| {
            NodeRefusal::Denied(format!(
                "node agent pod {}/{} does not exist",
                agent.namespace, pod.name
            ))
        })?;
        if found.metadata.uid.as_deref() != Some(pod.uid.as_str()) {
            return Err(NodeRefusal::Denied(format!(
                "node agent pod {}/{} is not the pod the token was issued to (uid {} now, {} in \
                 the token)",
                agent.namespace,
                pod.name,
                found.metadata.uid.as_deref().unwrap_or("none"),
                pod.uid
            )));
        }
        let spec = found.spec.unwrap_or_default();
        let runs_as = spec.service_account_name.as_deref().unwrap_or("default");
        if runs_as != agent.service_account {
            return Err(NodeRefusal::Denied(format!(
                "node agent pod {}/{} runs as service account {runs_as}, not {}",
                agent.namespace, pod.name, agent.service_account
            )));
        }
        let node = spec.node_name.filter(|n| !n.is_empty()).ok_or_else(|| {
            NodeRefusal::Denied(format!(
                "node agent pod {}/{} is not scheduled on a node",
                agent.namespace, pod.name
            ))
        })?;
        if let Some(claimed) = &pod.node
            && *claimed != node
        {
            return Err(NodeRefusal::Denied(format!(
                "node agent pod {}/{} runs on {node} but its token says {claimed}",
                agent.namespace, pod.name
            )));
        }
        self.agents.lock().await.insert(key, (now, node.clone()));
        Ok(node)
    }

    /// The identities with a live pod on `node`, from the cache when fresher
    /// than `max_age`.
    async fn identities(&self, node: &str, max_age: Duration) -> Result<Identities, NodeRefusal> {
        let now = Instant::now();
        if let Some((at, ids)) = self.nodes.lock().await.get(node)
            && now.duration_since(*at) < max_age
        {
            return Ok(ids.clone());
        }
        let api: Api<Pod> = Api::all(self.client.clone());
        let list = api
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
            .map_err(|e| {
                NodeRefusal::Unavailable(format!("listing the pods on node {node}: {e}"))
            })?;
        let ids: Identities = Arc::new(
            list.items
                .into_iter()
                .filter(|p| {
                    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
                    !matches!(phase, Some("Succeeded" | "Failed"))
                })
                // The field selector is the API server's; check the node again.
                .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
                .filter_map(|p| {
                    let ns = p.metadata.namespace?;
                    let sa = p
                        .spec
                        .and_then(|s| s.service_account_name)
                        .unwrap_or_else(|| "default".to_string());
                    Some((ns, sa))
                })
                .collect(),
        );
        self.nodes
            .lock()
            .await
            .insert(node.to_string(), (now, ids.clone()));
        Ok(ids)
    }
}

impl NodeAuthorizer for KubeNodeAuthorizer {
    fn authorize<'a>(
        &'a self,
        agent: &'a CallerIdentity,
        namespace: &'a str,
        service_account: &'a str,
    ) -> NodeFuture<'a> {
        Box::pin(async move {
            let node = self.agent_node(agent).await?;
            let wanted = (namespace.to_string(), service_account.to_string());
            if self.identities(&node, self.ttl).await?.contains(&wanted) {
                return Ok(node);
            }
            // A pod scheduled since the list was cached: list again, unless
            // the list is brand new.
            if self
                .identities(&node, RELIST_AFTER)
                .await?
                .contains(&wanted)
            {
                return Ok(node);
            }
            Err(NodeRefusal::Denied(format!(
                "no pod of {namespace}/{service_account} runs on node {node}, where node agent {} \
                 runs",
                agent.spiffe_id
            )))
        })
    }
}
