//! The Kubernetes API server's TokenReview endpoint, standing in for a real
//! API server (none can run on these machines) behind OpenBao's `kubernetes`
//! auth method in the Vault tests.
//!
//! It answers `POST /apis/authentication.k8s.io/v1/tokenreviews` as the real
//! one does for what OpenBao asks: the caller must present the reviewer's
//! bearer token (otherwise 401 with a `Status`); a token is authenticated
//! only if this server minted it ([`KubeApi::mint`], signed by its own
//! service-account issuer key) and has not invalidated it since
//! ([`KubeApi::invalidate`], as when the pod is deleted or the projected
//! token has expired); `status.audiences` is the intersection of the
//! requested audiences and the token's, and an empty intersection is not
//! authenticated. The server runs on its own thread and runtime, so it keeps
//! answering while a test blocks on the `bao` CLI.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    dead_code
)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use meshward_signer::authn::keys::JwtAlgorithm;
use meshward_signer::client::token::TokenIssuer;
use serde_json::{Value, json};

/// The service-account token issuer of this stand-in cluster.
pub const K8S_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

#[derive(Clone)]
struct Minted {
    namespace: String,
    service_account: String,
    audiences: Vec<String>,
}

#[derive(Default)]
struct Cluster {
    tokens: HashMap<String, Minted>,
    /// Tokens reviewed and found authenticated, in order.
    reviewed: Vec<String>,
    /// Requests refused for a missing or wrong bearer.
    unauthorized: usize,
}

type Shared = Arc<(String, Mutex<Cluster>)>;

pub struct KubeApi {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// The bearer a reviewer (OpenBao) must present.
    pub reviewer_token: String,
    issuer: TokenIssuer,
    shared: Shared,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KubeApi {
    pub fn start() -> Self {
        let issuer = TokenIssuer::generate(K8S_ISSUER, JwtAlgorithm::Es256).unwrap();
        let now = now_unix();
        let reviewer_token = issuer
            .sign_claims(&issuer.service_account_claims(
                "openbao",
                "token-reviewer",
                K8S_ISSUER,
                now,
                86_400,
            ))
            .unwrap();
        let shared: Shared = Arc::new((reviewer_token.clone(), Mutex::new(Cluster::default())));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = Router::new()
            .route(
                "/apis/authentication.k8s.io/v1/tokenreviews",
                post(token_review),
            )
            .with_state(shared.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        Self {
            url: format!("http://{addr}"),
            reviewer_token,
            issuer,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// A projected service-account token for `namespace/service_account`
    /// with `audience`, valid for an hour and known to this API server.
    pub fn mint(&self, namespace: &str, service_account: &str, audience: &str) -> String {
        let token = self
            .issuer
            .sign_claims(&self.issuer.service_account_claims(
                namespace,
                service_account,
                audience,
                now_unix(),
                3600,
            ))
            .unwrap();
        self.shared.1.lock().unwrap().tokens.insert(
            token.clone(),
            Minted {
                namespace: namespace.to_owned(),
                service_account: service_account.to_owned(),
                audiences: vec![audience.to_owned()],
            },
        );
        token
    }

    /// From now on `token` is not authenticated (its pod is gone, or it
    /// expired after the kubelet wrote a new one).
    pub fn invalidate(&self, token: &str) {
        self.shared.1.lock().unwrap().tokens.remove(token);
    }

    /// Tokens reviewed and authenticated so far, in order.
    pub fn reviewed(&self) -> Vec<String> {
        self.shared.1.lock().unwrap().reviewed.clone()
    }

    /// Reviews refused because the caller's bearer was not the reviewer's.
    pub fn unauthorized(&self) -> usize {
        self.shared.1.lock().unwrap().unauthorized
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn token_review(
    State(shared): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let (reviewer, state) = &*shared;
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer != Some(reviewer.as_str()) {
        state.lock().unwrap().unauthorized += 1;
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": "Unauthorized",
                "reason": "Unauthorized", "code": 401
            })),
        );
    }
    let token = body["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> = body["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let mut state = state.lock().unwrap();
    let status = match state.tokens.get(token).cloned() {
        None => json!({
            "authenticated": false,
            "error": "[invalid bearer token, service account token has been invalidated]"
        }),
        Some(m) => {
            let audiences: Vec<String> = if wanted.is_empty() {
                m.audiences.clone()
            } else {
                wanted
                    .iter()
                    .filter(|a| m.audiences.contains(a))
                    .cloned()
                    .collect()
            };
            if !wanted.is_empty() && audiences.is_empty() {
                json!({
                    "authenticated": false,
                    "error": "[invalid bearer token, token audiences is invalid for the target audiences]"
                })
            } else {
                state.reviewed.push(token.to_owned());
                json!({
                    "authenticated": true,
                    "audiences": audiences,
                    "user": {
                        "username": format!(
                            "system:serviceaccount:{}:{}",
                            m.namespace, m.service_account
                        ),
                        "uid": "00000000-0000-0000-0000-000000000000",
                        "groups": ["system:serviceaccounts"]
                    }
                })
            }
        }
    };
    let mut out = json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {},
        "spec": body["spec"].clone(),
    });
    out["status"] = status;
    (StatusCode::CREATED, Json(out))
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .try_into()
        .unwrap()
}
