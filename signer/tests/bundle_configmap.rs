//! The `istio-ca-root-cert` ConfigMap sink, driven through kube-rs.
//!
//! No Kubernetes API server can run here, so these tests run kube-rs
//! against a small HTTP server on 127.0.0.1:0 that speaks the few API calls
//! the sink makes (list namespaces with a label selector, list ConfigMaps
//! cluster-wide with a field selector — both in pages, with `limit` and
//! `continue` —, get / create / replace a ConfigMap, with resourceVersion
//! conflicts), keeps the objects in memory and records every request.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use meshward_signer::bundle::TrustBundle;
use meshward_signer::bundle::configmap::{ConfigMapSink, LabelSelector};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls_pki_types::CertificateDer;
use serde_json::{Value, json};

#[derive(Default)]
struct Api {
    namespaces: Vec<(String, BTreeMap<String, String>)>,
    /// Return every namespace whatever the selector (a broken proxy).
    ignore_selector: bool,
    configmaps: HashMap<(String, String), Value>,
    requests: Vec<String>,
    next_rv: u64,
    /// Answer every PUT with 409 Conflict (a concurrent writer).
    conflict_on_put: bool,
    /// Answer the cluster-wide ConfigMap list with 403 (RBAC without list).
    forbid_configmap_list: bool,
}

type Shared = Arc<Mutex<Api>>;

fn status(code: u16, reason: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(code).unwrap(),
        axum::Json(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code
        })),
    )
        .into_response()
}

fn selector_matches(sel: &str, labels: &BTreeMap<String, String>) -> bool {
    sel.split(',').all(|t| match t.split_once('=') {
        Some((k, v)) => labels.get(k).map(String::as_str) == Some(v),
        None => labels.contains_key(t),
    })
}

/// The value of `key` in a query string, percent-decoded.
fn query_param(q: Option<&str>, key: &str) -> Option<String> {
    q.unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .map(percent_decode)
}

/// One page of `items` as the API server answers a list with `limit` and
/// `continue` (here the continue token is the offset).
fn page(kind: &str, items: Vec<Value>, q: Option<&str>) -> Response {
    let start: usize = query_param(q, "continue").map_or(0, |c| c.parse().unwrap());
    let limit: usize = query_param(q, "limit").map_or(usize::MAX, |l| l.parse().unwrap());
    let end = start.saturating_add(limit).min(items.len());
    let mut metadata = json!({"resourceVersion": "1"});
    if end < items.len() {
        metadata["continue"] = json!(end.to_string());
    }
    axum::Json(
        json!({"apiVersion": "v1", "kind": kind, "metadata": metadata,
                      "items": items[start..end].to_vec()}),
    )
    .into_response()
}

async fn list_namespaces(State(api): State<Shared>, uri: Uri, RawQuery(q): RawQuery) -> Response {
    let mut api = api.lock().unwrap();
    api.requests.push(format!("GET {uri}"));
    let selector = query_param(q.as_deref(), "labelSelector").unwrap_or_default();
    let items: Vec<Value> = api
        .namespaces
        .iter()
        .filter(|(_, labels)| api.ignore_selector || selector_matches(&selector, labels))
        .map(|(name, labels)| {
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": name, "labels": labels},
                   "status": {"phase": "Active"}})
        })
        .collect();
    page("NamespaceList", items, q.as_deref())
}

async fn list_configmaps(State(api): State<Shared>, uri: Uri, RawQuery(q): RawQuery) -> Response {
    let mut api = api.lock().unwrap();
    api.requests.push(format!("GET {uri}"));
    if api.forbid_configmap_list {
        return status(403, "Forbidden", "configmaps is forbidden: cannot list");
    }
    let name = query_param(q.as_deref(), "fieldSelector")
        .and_then(|f| f.strip_prefix("metadata.name=").map(str::to_string));
    let mut items: Vec<(&(String, String), &Value)> = api
        .configmaps
        .iter()
        .filter(|((_, n), _)| name.as_ref().is_none_or(|want| want == n))
        .collect();
    items.sort_by(|a, b| a.0.cmp(b.0));
    let items = items.into_iter().map(|(_, cm)| cm.clone()).collect();
    page("ConfigMapList", items, q.as_deref())
}

fn percent_decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

async fn configmap(
    State(api): State<Shared>,
    method: Method,
    uri: Uri,
    Path(params): Path<Vec<(String, String)>>,
    body: Bytes,
) -> Response {
    let mut api = api.lock().unwrap();
    api.requests.push(format!("{method} {uri}"));
    let p: HashMap<_, _> = params.into_iter().collect();
    let ns = p["ns"].clone();
    let name = p.get("name").cloned();
    match (method.as_str(), name) {
        ("GET", Some(name)) => match api.configmaps.get(&(ns, name.clone())) {
            Some(cm) => axum::Json(cm.clone()).into_response(),
            None => status(404, "NotFound", &format!("configmaps \"{name}\" not found")),
        },
        ("POST", None) => {
            let mut cm: Value = serde_json::from_slice(&body).unwrap();
            let name = cm["metadata"]["name"].as_str().unwrap().to_string();
            if api.configmaps.contains_key(&(ns.clone(), name.clone())) {
                return status(409, "AlreadyExists", "already exists");
            }
            api.next_rv += 1;
            cm["metadata"]["resourceVersion"] = json!(api.next_rv.to_string());
            cm["metadata"]["namespace"] = json!(ns.clone());
            api.configmaps.insert((ns, name), cm.clone());
            (StatusCode::CREATED, axum::Json(cm)).into_response()
        }
        ("PUT", Some(name)) => {
            let mut cm: Value = serde_json::from_slice(&body).unwrap();
            let key = (ns, name);
            let Some(old) = api.configmaps.get(&key) else {
                return status(404, "NotFound", "not found");
            };
            if api.conflict_on_put
                || cm["metadata"]["resourceVersion"] != old["metadata"]["resourceVersion"]
            {
                return status(409, "Conflict", "the object has been modified");
            }
            api.next_rv += 1;
            cm["metadata"]["resourceVersion"] = json!(api.next_rv.to_string());
            api.configmaps.insert(key, cm.clone());
            axum::Json(cm).into_response()
        }
        _ => status(405, "MethodNotAllowed", "unexpected call"),
    }
}

async fn start_api(api: Api) -> (SocketAddr, Shared) {
    let shared: Shared = Arc::new(Mutex::new(api));
    let app = Router::new()
        .route("/api/v1/namespaces", get(list_namespaces))
        .route("/api/v1/configmaps", get(list_configmaps))
        .route(
            "/api/v1/namespaces/{ns}/configmaps",
            axum::routing::post(configmap),
        )
        .route(
            "/api/v1/namespaces/{ns}/configmaps/{name}",
            get(configmap).put(configmap),
        )
        .fallback(|method: Method, uri: Uri| async move {
            status(404, "NotFound", &format!("no route {method} {uri}"))
        })
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, shared)
}

fn client(addr: SocketAddr) -> kube::Client {
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

fn root(cn: &str) -> CertificateDer<'static> {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.self_signed(&key).unwrap().der().clone()
}

fn bundle(roots: Vec<CertificateDer<'static>>, seq: u64) -> TrustBundle {
    TrustBundle::new("cluster.local", roots, seq, Duration::from_secs(300)).unwrap()
}

fn ns(name: &str, labels: &[(&str, &str)]) -> (String, BTreeMap<String, String>) {
    (
        name.to_string(),
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

fn selector() -> LabelSelector {
    LabelSelector::parse("istio-injection=enabled").unwrap()
}

#[tokio::test]
async fn configmap_sink_creates_istio_ca_root_cert_in_selected_namespaces() {
    let (addr, api) = start_api(Api {
        namespaces: vec![
            ns("shop", &[("istio-injection", "enabled")]),
            ns("pay", &[("istio-injection", "enabled"), ("team", "x")]),
            ns("kube-system", &[]),
        ],
        ..Api::default()
    })
    .await;
    let sink = ConfigMapSink::new(client(addr), selector());
    let b = bundle(vec![root("r1")], 1);
    let report = sink.sync(&b).await.unwrap();
    assert_eq!(report.created, vec!["shop", "pay"]);
    assert!(report.failed.is_empty());

    let api = api.lock().unwrap();
    assert!(
        api.requests
            .iter()
            .any(|r| r.starts_with("GET /api/v1/namespaces?")
                && r.contains("labelSelector=istio-injection%3Denabled")),
        "namespaces listed with the selector: {:?}",
        api.requests
    );
    for ns in ["shop", "pay"] {
        let cm = &api.configmaps[&(ns.to_string(), "istio-ca-root-cert".to_string())];
        assert_eq!(cm["data"]["root-cert.pem"], b.roots_pem());
        assert_eq!(cm["metadata"]["labels"]["istio.io/config"], "true");
    }
    assert_eq!(api.configmaps.len(), 2);
}

#[tokio::test]
async fn configmap_sink_skips_unlabelled_namespaces() {
    // The API (or a proxy in front of it) ignores the selector and returns
    // every namespace: the sink must still write only where the labels match.
    let (addr, api) = start_api(Api {
        namespaces: vec![
            ns("shop", &[("istio-injection", "enabled")]),
            ns("kube-system", &[]),
            ns("legacy", &[("istio-injection", "disabled")]),
        ],
        ignore_selector: true,
        ..Api::default()
    })
    .await;
    let sink = ConfigMapSink::new(client(addr), selector());
    let report = sink.sync(&bundle(vec![root("r1")], 1)).await.unwrap();
    assert_eq!(report.created, vec!["shop"]);
    assert_eq!(report.skipped, vec!["kube-system", "legacy"]);
    let api = api.lock().unwrap();
    assert_eq!(api.configmaps.len(), 1);
    assert!(
        !api.requests
            .iter()
            .any(|r| r.contains("/namespaces/kube-system/") || r.contains("/namespaces/legacy/")),
        "no call touched an unselected namespace: {:?}",
        api.requests
    );
}

#[tokio::test]
async fn configmap_sink_replaces_stale_roots_keeps_other_keys_and_skips_current_ones() {
    let old = bundle(vec![root("old")], 1);
    let mut existing = HashMap::new();
    existing.insert(
        ("shop".to_string(), "istio-ca-root-cert".to_string()),
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "istio-ca-root-cert", "namespace": "shop",
                            "resourceVersion": "7", "labels": {"owner": "istiod"}},
               "data": {"root-cert.pem": old.roots_pem(), "extra": "kept"}}),
    );
    let (addr, api) = start_api(Api {
        namespaces: vec![ns("shop", &[("istio-injection", "enabled")])],
        configmaps: existing,
        next_rv: 7,
        ..Api::default()
    })
    .await;
    let sink = ConfigMapSink::new(client(addr), selector());
    // Rotation: old and new root together.
    let mut roots = old.roots().to_vec();
    roots.push(root("new"));
    let rotated = old.with_roots(roots).unwrap();
    let report = sink.sync(&rotated).await.unwrap();
    assert_eq!(report.updated, vec!["shop"]);
    {
        let api = api.lock().unwrap();
        let cm = &api.configmaps[&("shop".to_string(), "istio-ca-root-cert".to_string())];
        assert_eq!(cm["data"]["root-cert.pem"], rotated.roots_pem());
        assert_eq!(cm["data"]["extra"], "kept");
        assert_eq!(cm["metadata"]["labels"]["owner"], "istiod");
        assert_eq!(cm["metadata"]["labels"]["istio.io/config"], "true");
        assert!(api.requests.iter().any(|r| r.starts_with("PUT ")));
    }
    // A resync with nothing new writes nothing.
    let puts_before = api
        .lock()
        .unwrap()
        .requests
        .iter()
        .filter(|r| r.starts_with("PUT "))
        .count();
    let report = sink.sync(&rotated).await.unwrap();
    assert_eq!(report.unchanged, vec!["shop"]);
    let puts_after = api
        .lock()
        .unwrap()
        .requests
        .iter()
        .filter(|r| r.starts_with("PUT "))
        .count();
    assert_eq!(puts_before, puts_after);
}

#[tokio::test]
async fn configmap_sink_reports_a_conflicting_write_as_failure_instead_of_overwriting() {
    // Someone else changes the ConfigMap between the sink's read and write:
    // the API answers 409, the sink does not force it, and the publish
    // fails (to be retried at the next resync) instead of claiming success.
    let mut existing = HashMap::new();
    existing.insert(
        ("shop".to_string(), "istio-ca-root-cert".to_string()),
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "istio-ca-root-cert", "namespace": "shop", "resourceVersion": "1"},
               "data": {"root-cert.pem": "stale"}}),
    );
    let (addr, api) = start_api(Api {
        namespaces: vec![ns("shop", &[("istio-injection", "enabled")])],
        configmaps: existing,
        next_rv: 1,
        conflict_on_put: true,
        ..Api::default()
    })
    .await;
    let sink = ConfigMapSink::new(client(addr), selector());
    let b = bundle(vec![root("r")], 1);
    let report = sink.sync(&b).await.unwrap();
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].0, "shop");
    assert!(report.updated.is_empty());
    use meshward_signer::bundle::BundleSink;
    assert!(sink.publish(&b).await.is_err());
    let api = api.lock().unwrap();
    let cm = &api.configmaps[&("shop".to_string(), "istio-ca-root-cert".to_string())];
    assert_eq!(
        cm["data"]["root-cert.pem"], "stale",
        "the other writer's version stands"
    );
}

/// A mesh with thousands of namespaces, every replica resyncing every
/// minute: a resync with nothing to change must cost a few list calls, not
/// one read per namespace, and a root change one write per namespace.
#[tokio::test]
async fn a_resync_over_1200_namespaces_with_current_roots_costs_six_list_calls() {
    let mut namespaces: Vec<_> = (0..1200)
        .map(|i| ns(&format!("team-{i:04}"), &[("istio-injection", "enabled")]))
        .collect();
    namespaces.extend((0..50).map(|i| ns(&format!("plain-{i}"), &[])));
    let (addr, api) = start_api(Api {
        namespaces,
        ..Api::default()
    })
    .await;
    let sink = ConfigMapSink::new(client(addr), selector());
    let first = bundle(vec![root("r1")], 1);
    assert_eq!(sink.sync(&first).await.unwrap().created.len(), 1200);

    api.lock().unwrap().requests.clear();
    let report = sink.sync(&first).await.unwrap();
    assert_eq!(report.unchanged.len(), 1200);
    let requests = std::mem::take(&mut api.lock().unwrap().requests);
    assert_eq!(requests.len(), 6, "{requests:#?}");
    assert_eq!(
        requests
            .iter()
            .filter(|r| r.starts_with("GET /api/v1/namespaces?"))
            .count(),
        3,
        "three pages of 500 namespaces"
    );
    assert!(
        requests
            .iter()
            .filter(|r| r.starts_with("GET /api/v1/configmaps?"))
            .all(|r| r.contains("fieldSelector=metadata.name%3Distio-ca-root-cert")),
        "{requests:#?}"
    );

    let second = bundle(vec![root("r1"), root("r2")], 2);
    let report = sink.sync(&second).await.unwrap();
    assert_eq!(report.updated.len(), 1200);
    let requests = std::mem::take(&mut api.lock().unwrap().requests);
    assert_eq!(
        requests.iter().filter(|r| r.starts_with("PUT ")).count(),
        1200
    );
    assert_eq!(requests.len(), 1206, "lists and one write per namespace");
    let api = api.lock().unwrap();
    let cm = &api.configmaps[&("team-0042".to_string(), "istio-ca-root-cert".to_string())];
    assert_eq!(cm["data"]["root-cert.pem"], second.roots_pem());
}

/// RBAC that grants `get` but not `list` on ConfigMaps: the sink still
/// writes every namespace, reading each ConfigMap on its own.
#[tokio::test]
async fn without_the_cluster_wide_list_each_namespace_is_read_on_its_own() {
    let (addr, api) = start_api(Api {
        namespaces: vec![
            ns("shop", &[("istio-injection", "enabled")]),
            ns("pay", &[("istio-injection", "enabled")]),
        ],
        forbid_configmap_list: true,
        ..Api::default()
    })
    .await;
    let sink = ConfigMapSink::new(client(addr), selector());
    let b = bundle(vec![root("r1")], 1);
    assert_eq!(sink.sync(&b).await.unwrap().created, vec!["shop", "pay"]);
    let report = sink.sync(&b).await.unwrap();
    assert_eq!(report.unchanged, vec!["shop", "pay"]);
    let api = api.lock().unwrap();
    assert!(
        api.requests
            .iter()
            .any(|r| r == "GET /api/v1/namespaces/shop/configmaps/istio-ca-root-cert"),
        "{:?}",
        api.requests
    );
}

#[tokio::test]
async fn crl_configmap_is_istios_istio_ca_crl_in_the_selected_namespaces_and_can_be_emptied() {
    let (addr, api) = start_api(Api {
        namespaces: vec![
            ns("shop", &[("istio-injection", "enabled")]),
            ns("kube-system", &[]),
        ],
        ..Api::default()
    })
    .await;
    let sink = ConfigMapSink::new(client(addr), selector()).for_crl();
    let listing = "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n";
    let report = sink.sync_pem(listing).await.unwrap();
    assert_eq!(report.created, vec!["shop"]);
    {
        let api = api.lock().unwrap();
        let cm = &api.configmaps[&("shop".to_string(), "istio-ca-crl".to_string())];
        assert_eq!(cm["data"]["ca-crl.pem"], listing);
        assert!(
            !api.configmaps
                .contains_key(&("shop".to_string(), "istio-ca-root-cert".to_string())),
            "the CRL sink touches only istio-ca-crl"
        );
    }
    // A later (e.g. zero-entry, after unrevoke) CRL replaces it.
    let empty = "-----BEGIN X509 CRL-----\nBBBB\n-----END X509 CRL-----\n";
    let report = sink.sync_pem(empty).await.unwrap();
    assert_eq!(report.updated, vec!["shop"]);
    let api = api.lock().unwrap();
    let cm = &api.configmaps[&("shop".to_string(), "istio-ca-crl".to_string())];
    assert_eq!(cm["data"]["ca-crl.pem"], empty);
}

/// istiod and istio-csr write `root-cert.pem` as openssl does: LF line
/// endings. During a migration both run for a while; each rewrites the
/// ConfigMap when its bytes differ from its own. With CRLF (the `pem`
/// crate's default) the signer and istiod kept overwriting each other.
#[tokio::test]
async fn roots_istiod_already_wrote_are_not_rewritten_for_their_line_endings() {
    use base64::Engine as _;
    let b = bundle(vec![root("shared")], 1);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&b.roots()[0]);
    let mut istiod_pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        istiod_pem.push_str(std::str::from_utf8(line).unwrap());
        istiod_pem.push('\n');
    }
    istiod_pem.push_str("-----END CERTIFICATE-----\n");
    assert_eq!(
        b.roots_pem(),
        istiod_pem,
        "the signer writes PEM as istiod does"
    );

    let mut existing = HashMap::new();
    existing.insert(
        ("shop".to_string(), "istio-ca-root-cert".to_string()),
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "istio-ca-root-cert", "namespace": "shop",
                            "resourceVersion": "3",
                            "labels": {"istio.io/config": "true"}},
               "data": {"root-cert.pem": istiod_pem}}),
    );
    let (addr, api) = start_api(Api {
        namespaces: vec![ns("shop", &[("istio-injection", "enabled")])],
        configmaps: existing,
        next_rv: 3,
        ..Api::default()
    })
    .await;
    let report = ConfigMapSink::new(client(addr), selector())
        .sync(&b)
        .await
        .unwrap();
    assert!(report.updated.is_empty(), "rewrote {:?}", report.updated);
    assert!(report.created.is_empty());
    let api = api.lock().unwrap();
    assert!(
        !api.requests.iter().any(|r| r.starts_with("PUT ")),
        "no write: {:?}",
        api.requests
    );
}
