//! Node binding of trusted node agents (`ImpersonatedIdentity`) against a
//! real signer over TLS and a fake Kubernetes API server on 127.0.0.1:0 that
//! answers pod reads and node-scoped pod lists (no API server can run here).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/harness.rs"]
mod harness;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use harness::{Harness, assert_refused, id};
use meshward_signer::client::{CallOptions, ClientError, IssuedCertificate, WorkloadKey};
use meshward_signer::config::{Config, NodeAuthorizationConfig};
use tonic::Code;

const AGENT_UID: &str = "7d1c0e3a-0000-4000-8000-00000000a11c";

#[derive(Clone)]
struct FakePod {
    namespace: String,
    name: String,
    uid: String,
    service_account: String,
    node: String,
    phase: String,
}

fn pod(ns: &str, name: &str, sa: &str, node: &str) -> FakePod {
    FakePod {
        namespace: ns.into(),
        name: name.into(),
        uid: format!("uid-{ns}-{name}"),
        service_account: sa.into(),
        node: node.into(),
        phase: "Running".into(),
    }
}

fn agent(node: &str) -> FakePod {
    FakePod {
        uid: AGENT_UID.into(),
        ..pod("istio-system", "ztunnel-x1", "ztunnel", node)
    }
}

fn pod_json(p: &FakePod) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": p.name, "namespace": p.namespace, "uid": p.uid, "resourceVersion": "7"},
        "spec": {
            "nodeName": p.node,
            "serviceAccountName": p.service_account,
            "containers": [{"name": "app"}]
        },
        "status": {"phase": p.phase}
    })
}

#[derive(Clone, Default)]
struct FakeApi {
    pods: Arc<Mutex<Vec<FakePod>>>,
    lists: Arc<AtomicUsize>,
    gets: Arc<AtomicUsize>,
}

impl FakeApi {
    fn add(&self, p: FakePod) {
        self.pods.lock().unwrap().push(p);
    }
}

async fn get_pod(
    State(api): State<FakeApi>,
    Path((ns, name)): Path<(String, String)>,
) -> axum::response::Response {
    api.gets.fetch_add(1, Ordering::SeqCst);
    let found = api
        .pods
        .lock()
        .unwrap()
        .iter()
        .find(|p| p.namespace == ns && p.name == name)
        .cloned();
    match found {
        Some(p) => axum::Json(pod_json(&p)).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": format!("pods \"{name}\" not found"),
                "reason": "NotFound", "code": 404
            })),
        )
            .into_response(),
    }
}

async fn list_pods(
    State(api): State<FakeApi>,
    Query(q): Query<HashMap<String, String>>,
) -> axum::response::Response {
    api.lists.fetch_add(1, Ordering::SeqCst);
    let Some(node) = q
        .get("fieldSelector")
        .and_then(|f| f.strip_prefix("spec.nodeName="))
    else {
        // The signer must never list every pod of the cluster.
        return (
            StatusCode::BAD_REQUEST,
            "fieldSelector=spec.nodeName=<node> required",
        )
            .into_response();
    };
    let items: Vec<serde_json::Value> = api
        .pods
        .lock()
        .unwrap()
        .iter()
        .filter(|p| p.node == node)
        .map(pod_json)
        .collect();
    axum::Json(serde_json::json!({
        "apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "7"}, "items": items
    }))
    .into_response()
}

async fn serve(api: FakeApi) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route(
            "/api/v1/namespaces/{ns}/pods/{name}",
            axum::routing::get(get_pod),
        )
        .route("/api/v1/pods", axum::routing::get(list_pods))
        .with_state(api);
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn bound(api: std::net::SocketAddr) -> impl FnOnce(&mut Config) {
    move |c: &mut Config| {
        c.authn.trusted_node_accounts = vec!["istio-system/ztunnel".to_string()];
        c.authn.node_authorization = Some(NodeAuthorizationConfig {
            api_server: format!("http://{api}"),
            ca_file: None,
            token_file: None,
            pod_cache: Duration::from_secs(30),
        });
    }
}

/// A ztunnel token bound to `pod` (and to `node`, when given), as a
/// projected service-account token is.
fn agent_token(h: &Harness, pod: Option<(&str, &str)>, node: Option<&str>) -> String {
    let mut claims = h.tokens.service_account_claims(
        "istio-system",
        "ztunnel",
        "istio-ca",
        harness::now_unix(),
        3600,
    );
    let k8s = claims["kubernetes.io"].as_object_mut().unwrap();
    match pod {
        Some((name, uid)) => {
            k8s.insert("pod".into(), serde_json::json!({"name": name, "uid": uid}));
        }
        None => {
            k8s.remove("pod");
        }
    }
    if let Some(n) = node {
        k8s.insert(
            "node".into(),
            serde_json::json!({"name": n, "uid": "node-uid"}),
        );
    }
    h.tokens.sign_claims(&claims).unwrap()
}

fn as_agent(token: String, ns: &str, sa: &str) -> CallOptions {
    CallOptions {
        token: Some(token),
        impersonated_identity: Some(id(ns, sa).to_string()),
        ..CallOptions::default()
    }
}

/// A signer bound to a fake API server that holds `pods`.
async fn start(pods: Vec<FakePod>) -> (FakeApi, Harness) {
    let api = FakeApi::default();
    for p in pods {
        api.add(p);
    }
    let h = Harness::start_with(bound(serve(api.clone()).await)).await;
    (api, h)
}

/// `token`'s node agent asks for the certificate of `ns/sa`.
async fn ask_as_agent(
    h: &Harness,
    token: String,
    ns: &str,
    sa: &str,
) -> Result<(WorkloadKey, IssuedCertificate), ClientError> {
    h.issue(ns, sa, &as_agent(token, ns, sa)).await
}

fn the_agent(h: &Harness) -> String {
    agent_token(h, Some(("ztunnel-x1", AGENT_UID)), None)
}

/// Attack: a compromised node (its ztunnel's token) asks for the identity
/// of a workload that runs on another node — the lateral move node binding
/// exists to stop. Pods on its own node it may have; its own identity needs
/// no API call at all.
#[tokio::test]
async fn compromised_node_agent_cannot_get_the_identity_of_a_pod_on_another_node() {
    let (api, h) = start(vec![
        agent("node-a"),
        pod("default", "sleep-1", "sleep", "node-a"),
        pod("payments", "api-1", "api", "node-b"),
    ])
    .await;

    let r = ask_as_agent(&h, the_agent(&h), "payments", "api").await;
    assert_refused(
        r,
        Code::PermissionDenied,
        "no pod of payments/api runs on node node-a",
    );

    let (_, cert) = ask_as_agent(&h, the_agent(&h), "default", "sleep")
        .await
        .unwrap();
    harness::webpki_verify(&cert, rustls_pki_types::UnixTime::now());

    let (gets, lists) = (
        api.gets.load(Ordering::SeqCst),
        api.lists.load(Ordering::SeqCst),
    );
    let own = CallOptions {
        token: Some(the_agent(&h)),
        ..CallOptions::default()
    };
    h.issue("istio-system", "ztunnel", &own).await.unwrap();
    assert_eq!(
        (
            api.gets.load(Ordering::SeqCst),
            api.lists.load(Ordering::SeqCst)
        ),
        (gets, lists),
        "the agent's own identity needs no node check"
    );
    h.signer.shutdown().await.unwrap();
}

/// Attack: a token taken from a node agent pod that was since deleted (or a
/// pod re-created under the same name) used from elsewhere.
#[tokio::test]
async fn token_of_a_deleted_node_agent_pod_cannot_impersonate() {
    let (api, h) = start(vec![pod("default", "sleep-1", "sleep", "node-a")]).await;

    let r = ask_as_agent(&h, the_agent(&h), "default", "sleep").await;
    assert_refused(
        r,
        Code::PermissionDenied,
        "node agent pod istio-system/ztunnel-x1 does not exist",
    );

    // Re-created under the same name: another UID.
    api.add(FakePod {
        uid: "a-new-pod-uid".into(),
        ..agent("node-a")
    });
    let r = ask_as_agent(&h, the_agent(&h), "default", "sleep").await;
    assert_refused(
        r,
        Code::PermissionDenied,
        "is not the pod the token was issued to",
    );
    h.signer.shutdown().await.unwrap();
}

/// Attack: a node agent token that is not bound to a pod (a legacy secret
/// token, or one minted without the pod claim) — its node cannot be known.
#[tokio::test]
async fn node_agent_token_that_names_no_pod_cannot_impersonate() {
    let (_api, h) = start(vec![
        agent("node-a"),
        pod("default", "sleep-1", "sleep", "node-a"),
    ])
    .await;
    let token = agent_token(&h, None, None);
    let r = ask_as_agent(&h, token, "default", "sleep").await;
    assert_refused(r, Code::PermissionDenied, "names no pod");
    h.signer.shutdown().await.unwrap();
}

/// Attack: a token whose node claim says one node while its pod runs on
/// another — what a forged or mismatched binding looks like.
#[tokio::test]
async fn node_agent_whose_token_names_another_node_is_refused() {
    let (_api, h) = start(vec![
        agent("node-a"),
        pod("default", "sleep-1", "sleep", "node-b"),
    ])
    .await;
    let token = agent_token(&h, Some(("ztunnel-x1", AGENT_UID)), Some("node-b"));
    let r = ask_as_agent(&h, token, "default", "sleep").await;
    assert_refused(
        r,
        Code::PermissionDenied,
        "runs on node-a but its token says node-b",
    );

    let token = agent_token(&h, Some(("ztunnel-x1", AGENT_UID)), Some("node-a"));
    let r = ask_as_agent(&h, token, "default", "sleep").await;
    assert_refused(
        r,
        Code::PermissionDenied,
        "no pod of default/sleep runs on node node-a",
    );
    h.signer.shutdown().await.unwrap();
}

/// Attack: an identity whose only pod on the node has finished (a Job) is
/// no longer one the node agent serves.
#[tokio::test]
async fn finished_pods_do_not_lend_their_identity_to_the_node_agent() {
    let (_api, h) = start(vec![
        agent("node-a"),
        FakePod {
            phase: "Succeeded".into(),
            ..pod("batch", "report-1", "reporter", "node-a")
        },
    ])
    .await;
    let r = ask_as_agent(&h, the_agent(&h), "batch", "reporter").await;
    assert_refused(
        r,
        Code::PermissionDenied,
        "no pod of batch/reporter runs on node node-a",
    );
    h.signer.shutdown().await.unwrap();
}

/// A pod scheduled after the node's pods were listed (and cached) is found
/// by one re-list, and cached answers spare the API server.
#[tokio::test]
async fn a_pod_scheduled_after_the_node_was_listed_is_found_by_a_relist() {
    let (api, h) = start(vec![
        agent("node-a"),
        pod("default", "sleep-1", "sleep", "node-a"),
    ])
    .await;
    for _ in 0..3 {
        ask_as_agent(&h, the_agent(&h), "default", "sleep")
            .await
            .unwrap();
    }
    assert_eq!(
        api.lists.load(Ordering::SeqCst),
        1,
        "the node's pods are cached"
    );
    assert_eq!(
        api.gets.load(Ordering::SeqCst),
        1,
        "the agent's pod is cached"
    );

    api.add(pod("shop", "web-7", "web", "node-a"));
    // Past the re-list floor (1 s), a miss lists again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ask_as_agent(&h, the_agent(&h), "shop", "web")
        .await
        .unwrap();
    assert_eq!(api.lists.load(Ordering::SeqCst), 2);
    h.signer.shutdown().await.unwrap();
}

/// The API server cannot be reached: impersonation fails closed, as
/// UNAVAILABLE (the agent retries), and never falls back to allowing it.
#[tokio::test]
async fn unreachable_api_server_refuses_impersonation_as_unavailable() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let h = Harness::start_with(bound(closed)).await;
    let r = ask_as_agent(&h, the_agent(&h), "default", "sleep").await;
    assert_refused(r, Code::Unavailable, "cannot check the node agent's node");
    h.signer.shutdown().await.unwrap();
}
