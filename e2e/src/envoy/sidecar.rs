//! One workload's sidecar: an [`Agent`] writing SDS and a real Envoy on the
//! bootstrap [`SidecarBootstrap`] builds, the WasmPlugins that select the
//! workload placed by phase.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use meshward_signer::client::token::TokenIssuer;

use super::agent::{Agent, CaAccess, Workload};
use super::bootstrap::{INBOUND, InboundApp, OUTBOUND, SidecarBootstrap, Upstream};
use super::sds::SdsDir;
use super::wasmplugin::{Direction, WasmPlugin};
use super::{Admin, Envoy};
use crate::mesh::CertInfo;

/// What every sidecar of one mesh shares.
#[derive(Clone)]
pub struct EnvoyMesh {
    /// The signer's gRPC address.
    pub signer_grpc: SocketAddr,
    /// The signer's admin address (the filter's ledger cluster).
    pub signer_admin: SocketAddr,
    /// The bundle agents verify the signer with.
    pub roots_pem: String,
    /// Mints service-account tokens.
    pub tokens: Arc<TokenIssuer>,
    /// The filter module the WasmPlugins' `url` stands for.
    pub filter_wasm: PathBuf,
    /// Where each sidecar's files go (one subdirectory each).
    pub dir: PathBuf,
}

impl std::fmt::Debug for EnvoyMesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvoyMesh")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl EnvoyMesh {
    fn ca(&self) -> CaAccess {
        CaAccess {
            grpc: self.signer_grpc,
            roots_pem: self.roots_pem.clone(),
            tokens: self.tokens.clone(),
        }
    }
}

/// One sidecar's settings.
#[derive(Debug, Clone)]
pub struct SidecarSpec {
    /// Who it is.
    pub workload: Workload,
    /// Workload name (`app` label by default).
    pub name: String,
    /// Labels WasmPlugin selectors match.
    pub labels: BTreeMap<String, String>,
    /// What inbound traffic goes to; `None`: a client only.
    pub inbound: Option<InboundApp>,
    /// PERMISSIVE instead of STRICT.
    pub permissive: bool,
    /// The WasmPlugins of the mesh (those selecting this workload apply).
    pub plugins: Vec<WasmPlugin>,
    /// Peers it sends to.
    pub upstreams: Vec<Upstream>,
    /// Bootstrap `stats_config`.
    pub stats_config: Option<serde_json::Value>,
    /// A module to use instead of the mesh's filter (a VM that fails).
    pub wasm_override: Option<PathBuf>,
    /// The inbound `tcp_proxy`'s `max_early_data_bytes` (see
    /// [`SidecarBootstrap::tcp_early_data_bytes`]).
    pub tcp_early_data_bytes: Option<u32>,
    /// Wait until Envoy is LIVE (an Envoy whose fail-closed plugin did not
    /// load never is; its tests start it without waiting).
    pub wait_ready: bool,
}

impl SidecarSpec {
    /// `namespace`/`service_account`, labelled `app: <service_account>`,
    /// STRICT, nothing inbound.
    pub fn new(namespace: &str, service_account: &str) -> Self {
        Self {
            workload: Workload::new(namespace, service_account),
            name: service_account.to_owned(),
            labels: BTreeMap::from([("app".to_owned(), service_account.to_owned())]),
            inbound: None,
            permissive: false,
            plugins: Vec::new(),
            upstreams: Vec::new(),
            stats_config: None,
            wasm_override: None,
            wait_ready: true,
            tcp_early_data_bytes: None,
        }
    }
}

/// A running sidecar.
#[derive(Debug)]
pub struct EnvoySidecar {
    agent: Agent,
    envoy: Envoy,
    inbound: Option<SocketAddr>,
    outbound: Option<SocketAddr>,
    spec: SidecarSpec,
}

impl EnvoySidecar {
    /// Issues the first certificate, writes SDS, starts Envoy.
    pub async fn start(spec: SidecarSpec, mesh: &EnvoyMesh) -> anyhow::Result<Self> {
        let wl = &spec.workload;
        let dir = mesh.dir.join(format!(
            "{}.{}-{}",
            spec.name,
            wl.namespace,
            rand::random::<u32>()
        ));
        let sds = SdsDir::create(&dir.join("sds"))?;
        let agent = Agent::start(wl.clone(), &mesh.ca(), sds.clone()).await?;
        let bootstrap = Self::bootstrap(&spec, mesh, sds)?.build()?;
        let name = format!("{}.{}", spec.name, wl.namespace);
        let envoy = if spec.wait_ready {
            Envoy::start(&name, &dir, &bootstrap).await
        } else {
            Envoy::spawn(&name, &dir, &bootstrap, &[]).await
        }
        .with_context(|| format!("starting the sidecar of {}", wl.spiffe_id()))?;
        let (inbound, outbound) = if spec.wait_ready {
            let inbound = match spec.inbound {
                Some(_) => Some(envoy.listener_addr(INBOUND).await?),
                None => None,
            };
            (inbound, Some(envoy.listener_addr(OUTBOUND).await?))
        } else {
            // Not ready: listeners may be bound or not; the test looks.
            (
                envoy.listener_addr(INBOUND).await.ok(),
                envoy.listener_addr(OUTBOUND).await.ok(),
            )
        };
        tracing::info!(identity = %wl.spiffe_id(), ?inbound, ?outbound, pid = ?envoy.pid(), "envoy sidecar started");
        Ok(Self {
            agent,
            envoy,
            inbound,
            outbound,
            spec,
        })
    }

    fn bootstrap(
        spec: &SidecarSpec,
        mesh: &EnvoyMesh,
        sds: SdsDir,
    ) -> anyhow::Result<SidecarBootstrap> {
        let wasm = spec.wasm_override.as_deref().unwrap_or(&mesh.filter_wasm);
        let mut selected: Vec<&WasmPlugin> = spec
            .plugins
            .iter()
            .filter(|p| {
                p.selects(&spec.workload.namespace, &spec.labels)
                    && p.applies_to(Direction::Inbound)
            })
            .collect();
        selected.sort_by_key(|p| p.order());
        let filters = |network: bool| -> anyhow::Result<Vec<serde_json::Value>> {
            selected
                .iter()
                .filter(|p| p.is_network() == network)
                .map(|p| p.envoy_filter(wasm))
                .collect()
        };
        Ok(SidecarBootstrap {
            name: spec.name.clone(),
            namespace: spec.workload.namespace.clone(),
            labels: spec.labels.clone(),
            sds,
            inbound: spec.inbound.clone(),
            permissive: spec.permissive,
            http_filters: filters(false)?,
            network_filters: filters(true)?,
            upstreams: spec.upstreams.clone(),
            signer_admin: Some(mesh.signer_admin),
            stats_config: spec.stats_config.clone(),
            tcp_early_data_bytes: spec.tcp_early_data_bytes,
        })
    }

    /// The SPIFFE ID.
    pub fn identity(&self) -> String {
        self.agent.spiffe_id()
    }

    /// Where peers connect (mTLS).
    pub fn inbound_addr(&self) -> anyhow::Result<SocketAddr> {
        self.inbound.context("this sidecar has no inbound listener")
    }

    /// Where the local app sends (plaintext HTTP, `Host` = the peer).
    /// Every sidecar started ready has one.
    pub fn outbound_addr(&self) -> SocketAddr {
        self.outbound
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// The outbound TCP listener for peer `host`.
    pub async fn tcp_outbound_addr(&self, host: &str) -> anyhow::Result<SocketAddr> {
        self.envoy
            .listener_addr(&format!("outbound_tcp|{host}"))
            .await
    }

    /// This sidecar as an upstream of others.
    pub fn as_upstream(&self, host: &str) -> anyhow::Result<Upstream> {
        Ok(Upstream {
            host: host.to_owned(),
            addr: self.inbound_addr()?,
            spiffe_id: self.identity(),
            tcp: matches!(
                self.spec.inbound,
                Some(InboundApp::Tcp(_) | InboundApp::DirectResponse(_))
            ),
            handshake_per_request: false,
        })
    }

    /// The agent (certificate, rotation).
    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// The certificate it holds now.
    pub fn cert(&self) -> Option<CertInfo> {
        self.agent.cert()
    }

    /// The Envoy admin API.
    pub fn admin(&self) -> &Admin {
        self.envoy.admin()
    }

    /// The Envoy process.
    pub fn envoy(&mut self) -> &mut Envoy {
        &mut self.envoy
    }

    /// What Envoy logged (the filter's log lines among them).
    pub fn log(&self) -> String {
        self.envoy.log()
    }

    /// The directory of its files.
    pub fn dir(&self) -> &Path {
        self.envoy.dir()
    }
}
