//! The fixture of the real-Envoy tests: a signer, the mesh context, echo
//! apps behind Envoy sidecars, callers behind their own sidecars.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use meshward_e2e::envoy::agent::{CaAccess, Workload};
use meshward_e2e::envoy::bootstrap::InboundApp;
use meshward_e2e::envoy::client::{self, MtlsClient};
use meshward_e2e::envoy::sidecar::{EnvoyMesh, EnvoySidecar, SidecarSpec};
use meshward_e2e::envoy::wasmplugin::WasmPlugin;
use meshward_e2e::mesh::backend::spawn_echo;
use meshward_e2e::mesh::{LocalSigner, MeshResponse};
use meshward_e2e::wasm::filter_wasm_path;

pub const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
pub const BACKEND: &str = "spiffe://cluster.local/ns/shop/sa/backend";

pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub signer: LocalSigner,
}

impl Mesh {
    pub async fn start() -> Mesh {
        Self::start_with_ttl(Duration::from_secs(24 * 3600)).await
    }

    /// A signer whose longest (and default) certificate is `max_ttl`.
    pub async fn start_with_ttl(max_ttl: Duration) -> Mesh {
        Self::start_configured(max_ttl, |_, _| {}).await
    }

    /// A signer with `tweak` applied to its configuration (`dir` is the
    /// mesh's temporary directory, for files the signer writes).
    pub async fn start_configured(
        max_ttl: Duration,
        tweak: impl FnOnce(&mut meshward_signer::Config, &std::path::Path),
    ) -> Mesh {
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let signer = LocalSigner::start_configured(
            &dir.path().join("ca"),
            max_ttl,
            std::sync::Arc::new(
                meshward_signer::client::token::TokenIssuer::generate(
                    meshward_e2e::mesh::ca::TOKEN_ISSUER,
                    meshward_signer::authn::keys::JwtAlgorithm::Es256,
                )
                .unwrap(),
            ),
            |c| tweak(c, &path),
        )
        .await
        .unwrap();
        Mesh { dir, signer }
    }

    pub fn envoy_mesh(&self) -> EnvoyMesh {
        EnvoyMesh {
            signer_grpc: self.signer.grpc_addr().unwrap(),
            signer_admin: self.signer.admin_addr().unwrap(),
            roots_pem: self.signer.roots_pem().unwrap(),
            tokens: self.signer.tokens(),
            filter_wasm: filter_wasm_path(),
            dir: self.dir.path().join("sidecars"),
        }
    }

    pub fn ca(&self) -> CaAccess {
        CaAccess {
            grpc: self.signer.grpc_addr().unwrap(),
            roots_pem: self.signer.roots_pem().unwrap(),
            tokens: self.signer.tokens(),
        }
    }

    /// The repo's HTTP WasmPlugin, as it is.
    pub fn http_manifest(&self) -> WasmPlugin {
        WasmPlugin::manifest("wasmplugin-http.yaml").unwrap()
    }

    /// The repo's HTTP WasmPlugin with another `pluginConfig`.
    pub fn http_plugin(&self, config: serde_json::Value) -> WasmPlugin {
        self.http_manifest().with_plugin_config(config)
    }

    /// The repo's NETWORK WasmPlugin (selecting `app: postgres`) with
    /// another `pluginConfig`.
    pub fn network_plugin(&self, config: serde_json::Value) -> WasmPlugin {
        WasmPlugin::manifest("wasmplugin-network.yaml")
            .unwrap()
            .with_plugin_config(config)
    }

    pub async fn start_sidecar(&self, spec: SidecarSpec) -> anyhow::Result<EnvoySidecar> {
        EnvoySidecar::start(spec, &self.envoy_mesh()).await
    }

    /// shop/backend (`app: backend`) with an echo app behind an HTTP
    /// inbound listener, `plugins` in the mesh, `tweak` applied last.
    pub async fn backend(
        &self,
        plugins: Vec<WasmPlugin>,
        tweak: impl FnOnce(&mut SidecarSpec),
    ) -> EnvoySidecar {
        let (app, task) = spawn_echo("backend").await.unwrap();
        std::mem::forget(task);
        let mut spec = SidecarSpec::new("shop", "backend");
        spec.inbound = Some(InboundApp::Http(app));
        spec.plugins = plugins;
        tweak(&mut spec);
        self.start_sidecar(spec).await.unwrap()
    }

    /// `ns`/`sa` with a sidecar whose outbound reaches each of `peers` as
    /// `backend.shop` (the first) — callers address it by that host.
    pub async fn client(&self, ns: &str, sa: &str, peers: &[&EnvoySidecar]) -> EnvoySidecar {
        self.client_with(ns, sa, peers, |_| {}).await
    }

    pub async fn client_with(
        &self,
        ns: &str,
        sa: &str,
        peers: &[&EnvoySidecar],
        tweak: impl FnOnce(&mut SidecarSpec),
    ) -> EnvoySidecar {
        let mut spec = SidecarSpec::new(ns, sa);
        for (i, p) in peers.iter().enumerate() {
            let host = if i == 0 {
                "backend.shop".to_owned()
            } else {
                format!("peer{i}.shop")
            };
            spec.upstreams.push(p.as_upstream(&host).unwrap());
        }
        tweak(&mut spec);
        self.start_sidecar(spec).await.unwrap()
    }

    /// `GET path` from `from`'s app to `backend.shop` through `from`'s sidecar.
    pub async fn get(&self, from: &EnvoySidecar, path: &str) -> MeshResponse {
        self.send(from, "GET", path).await
    }

    /// `method path` from `from`'s app to `backend.shop` through `from`'s sidecar.
    pub async fn send(&self, from: &EnvoySidecar, method: &str, path: &str) -> MeshResponse {
        client::http(from.outbound_addr(), "backend.shop", method, path, &[])
            .await
            .unwrap()
    }

    pub fn workload(&self, ns: &str, sa: &str) -> Workload {
        Workload::new(ns, sa)
    }

    /// `ns`/`sa` with its own certificate from this mesh's signer, dialling
    /// shop/backend's inbound listener itself (no sidecar of its own).
    pub async fn mtls_client(&self, ns: &str, sa: &str) -> MtlsClient {
        MtlsClient::issue(&self.ca(), &self.workload(ns, sa), Some(BACKEND))
            .await
            .unwrap()
    }
}

pub fn echo(r: &MeshResponse) -> serde_json::Value {
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("not the echo app's answer ({e}): {r:?}"))
}
