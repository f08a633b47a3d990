//! A sidecar: gets its certificate from the signer over the real gRPC API
//! (service-account JWT, own key), rotates it at a jittered 50–80 % of its
//! lifetime, serves mTLS (or plaintext, when permissive) in front of a local
//! application, runs the filter on every connection and request, and dials
//! mTLS to other sidecars.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use meshward_signer::client::token::TokenIssuer;
use meshward_signer::client::{CaClient, CallOptions, WorkloadKey, WorkloadKeyType};
use rand::Rng;
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::sign::CertifiedKey;
use spiffe::SpiffeId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::io::Rewind;
use super::tls::{self, CurrentCert};
use crate::attributes::{ConnectionInfo, connection_properties, xfcc_sanitize_set};
use crate::host::driver::SharedPlugin;
use crate::host::{
    Clock, CompiledPlugin, ConnOutcome, HostEnv, HttpOutcome, LogLine, LogSink, Metrics,
    PluginConfig, Properties, SharedData, StaticUpstreams, SystemClock,
};

/// Request headers a client may not set: the sidecar owns identity.
/// (`x-forwarded-client-cert` is replaced as Envoy's `SANITIZE_SET` does.)
pub const IDENTITY_HEADERS: [&str; 4] = [
    "x-forwarded-client-cert",
    "x-envoy-peer-metadata",
    "x-envoy-peer-metadata-id",
    "x-spiffe-id",
];

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the mesh gives every sidecar: the signer and the filter.
#[derive(Clone)]
pub struct MeshContext {
    /// The signer's gRPC address.
    pub signer_grpc: SocketAddr,
    /// The signer's admin address (the filter's `meshward-signer` cluster).
    pub signer_admin: SocketAddr,
    /// The trust bundle (PEM).
    pub roots_pem: String,
    /// Mints the workloads' service-account tokens.
    pub tokens: Arc<TokenIssuer>,
    /// The filter, compiled once.
    pub filter: CompiledPlugin,
}

impl std::fmt::Debug for MeshContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshContext")
            .field("signer_grpc", &self.signer_grpc)
            .finish_non_exhaustive()
    }
}

/// One sidecar's settings.
#[derive(Clone)]
pub struct SidecarConfig {
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// Trust domain.
    pub trust_domain: String,
    /// Requested certificate lifetime.
    pub cert_ttl: Duration,
    /// Rotate at a random point between these fractions of the lifetime
    /// (each within 0.5–0.8).
    pub rotate_between: (f64, f64),
    /// HTTP filter `pluginConfig` (JSON); `None`: no HTTP filter.
    pub http_filter: Option<String>,
    /// Network filter `pluginConfig` (JSON); `None`: no network filter.
    pub network_filter: Option<String>,
    /// The local application inbound traffic goes to.
    pub backend: Option<SocketAddr>,
    /// Accept plaintext as well as mTLS (Istio `PERMISSIVE`).
    pub permissive: bool,
    /// Expose `connection.peer_certificate` to the filter (recent Envoy);
    /// otherwise it has to use XFCC `Cert=`.
    pub expose_peer_certificate: bool,
    /// The clock the filter sees.
    pub clock: Arc<dyn Clock>,
}

impl SidecarConfig {
    /// Defaults: trust domain `cluster.local`, 24 h certificates rotated at
    /// 50–80 %, STRICT mTLS, no filter, no backend.
    pub fn new(namespace: &str, service_account: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            trust_domain: "cluster.local".to_owned(),
            cert_ttl: Duration::from_secs(24 * 3600),
            rotate_between: (0.5, 0.8),
            http_filter: None,
            network_filter: None,
            backend: None,
            permissive: false,
            expose_peer_certificate: false,
            clock: Arc::new(SystemClock),
        }
    }

    /// The workload's SPIFFE ID.
    pub fn spiffe_id(&self) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// The certificate a sidecar holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Leaf, DER.
    pub leaf: Vec<u8>,
    /// notBefore.
    pub not_before: SystemTime,
    /// notAfter.
    pub not_after: SystemTime,
    /// How many certificates this sidecar has had (1 = the first).
    pub generation: u64,
}

impl CertInfo {
    /// Reads a leaf's validity; `generation` counts the certificates held.
    pub fn parse(leaf: &[u8], generation: u64) -> anyhow::Result<Self> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, cert) =
            X509Certificate::from_der(leaf).map_err(|e| anyhow::anyhow!("leaf: {e}"))?;
        let to_time = |t: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
        Ok(Self {
            leaf: leaf.to_vec(),
            not_before: to_time(cert.validity().not_before.timestamp()),
            not_after: to_time(cert.validity().not_after.timestamp()),
            generation,
        })
    }

    /// Age at `now` (zero before notBefore).
    pub fn age(&self, now: SystemTime) -> Duration {
        now.duration_since(self.not_before).unwrap_or_default()
    }

    /// Remaining validity at `now` (zero once expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }
}

/// A response seen by the caller.
#[derive(Debug, Clone)]
pub struct MeshResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// The certificate the caller presented.
    pub client_cert: Option<CertInfo>,
}

impl MeshResponse {
    /// First value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The roots a sidecar trusts and the listener TLS built on them; replaced
/// when the signer's root set changes.
#[derive(Clone)]
struct Trust {
    der: Vec<CertificateDer<'static>>,
    roots: Arc<RootCertStore>,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl Trust {
    fn new(der: Vec<CertificateDer<'static>>, cert: &Arc<CurrentCert>) -> anyhow::Result<Self> {
        let mut store = RootCertStore::empty();
        for c in &der {
            store.add(c.clone())?;
        }
        anyhow::ensure!(!store.is_empty(), "no root certificate to trust");
        let roots = Arc::new(store);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls::server_config(
            roots.clone(),
            cert.clone(),
        )?));
        Ok(Self {
            der,
            roots,
            acceptor,
        })
    }
}

struct Inner {
    config: SidecarConfig,
    spiffe_id: String,
    cert: Arc<CurrentCert>,
    info: watch::Sender<Option<CertInfo>>,
    trust: RwLock<Trust>,
    /// Roots from `MeshContext::roots_pem` the signer does not publish
    /// (e.g. another mesh's CA): trusted whatever the signer's root set.
    pinned_roots: Vec<CertificateDer<'static>>,
    handshake_failures: AtomicU64,
    http: Option<SharedPlugin>,
    network: Option<SharedPlugin>,
    env: HostEnv,
    next_conn: AtomicU64,
}

/// A running sidecar.
pub struct Sidecar {
    inner: Arc<Inner>,
    inbound: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Sidecar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sidecar")
            .field("identity", &self.inner.spiffe_id)
            .field("inbound", &self.inbound)
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn trust(&self) -> Trust {
        match self.trust.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The signer's root set (from the last entry of an issued chain, which
    /// carries every root it publishes, old and new during a rotation)
    /// plus the pinned roots.
    fn trust_set(&self, issued_roots: &[CertificateDer<'static>]) -> Vec<CertificateDer<'static>> {
        let mut set = issued_roots.to_vec();
        for r in &self.pinned_roots {
            if !set.contains(r) {
                set.push(r.clone());
            }
        }
        set
    }

    /// Follows the signer's root set: rebuilds the verifiers when it changed.
    fn update_trust(&self, issued_roots: &[CertificateDer<'static>]) -> anyhow::Result<()> {
        if issued_roots.is_empty() {
            return Ok(());
        }
        let der = self.trust_set(issued_roots);
        if self.trust().der == der {
            return Ok(());
        }
        let next = Trust::new(der, &self.cert)?;
        tracing::info!(identity = %self.spiffe_id, roots = next.der.len(), "trust bundle changed");
        match self.trust.write() {
            Ok(mut g) => *g = next,
            Err(p) => *p.into_inner() = next,
        }
        Ok(())
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn issue(
    ca: &CaClient,
    tokens: &TokenIssuer,
    config: &SidecarConfig,
    id: &SpiffeId,
) -> anyhow::Result<(Arc<CertifiedKey>, Vec<u8>, Vec<CertificateDer<'static>>)> {
    let key = WorkloadKey::generate(WorkloadKeyType::EcdsaP256)?;
    let now = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs())?;
    let token = tokens.token_for(&config.namespace, &config.service_account, now)?;
    let opts = CallOptions {
        token: Some(token),
        validity_secs: i64::try_from(config.cert_ttl.as_secs())?,
        cluster_id: Some("Kubernetes".to_owned()),
        impersonated_identity: None,
    };
    let issued = ca.request_certificate(&key, id, &opts).await?;
    let mut chain = vec![issued.leaf.clone()];
    chain.extend(issued.intermediates.iter().cloned());
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.key_pair().serialize_der()));
    let signing = rustls::crypto::ring::sign::any_supported_type(&der)?;
    Ok((
        Arc::new(CertifiedKey::new(chain, signing)),
        issued.leaf.to_vec(),
        issued.roots,
    ))
}

fn rotation_delay(info: &CertInfo, between: (f64, f64), now: SystemTime) -> Duration {
    let lifetime = info
        .not_after
        .duration_since(info.not_before)
        .unwrap_or_default();
    let (lo, hi) = between;
    let frac = if hi > lo {
        rand::rng().random_range(lo..hi)
    } else {
        lo
    };
    let at = info.not_before + lifetime.mul_f64(frac);
    at.duration_since(now).unwrap_or_default()
}

impl Sidecar {
    /// Gets a first certificate, starts the filter instances, binds the
    /// inbound listener on `127.0.0.1:0` and starts rotating.
    pub async fn start(config: SidecarConfig, mesh: &MeshContext) -> anyhow::Result<Sidecar> {
        let (lo, hi) = config.rotate_between;
        anyhow::ensure!(
            (0.5..=0.8).contains(&lo) && (0.5..=0.8).contains(&hi) && lo <= hi,
            "rotate_between must lie within 0.5..=0.8, got {lo}..{hi}"
        );
        let spiffe_id = config.spiffe_id();
        let id = SpiffeId::new(&spiffe_id).with_context(|| format!("SPIFFE ID {spiffe_id}"))?;
        let ca = CaClient::connect(mesh.signer_grpc, &mesh.roots_pem, "localhost").await?;
        let (key, leaf, issued_roots) = issue(&ca, &mesh.tokens, &config, &id).await?;
        let cert = Arc::new(CurrentCert::default());
        cert.set(key);
        let (info_tx, _) = watch::channel(Some(CertInfo::parse(&leaf, 1)?));
        let configured = tls::root_ders(&mesh.roots_pem)?;
        let pinned_roots: Vec<CertificateDer<'static>> = configured
            .iter()
            .filter(|r| !issued_roots.contains(r))
            .cloned()
            .collect();
        let mut initial = issued_roots;
        initial.extend(pinned_roots.iter().cloned());
        let trust = Trust::new(initial, &cert)?;
        let env = HostEnv {
            metrics: Arc::new(Metrics::new()),
            shared: Arc::new(SharedData::new()),
            logs: Arc::new(LogSink::default()),
            clock: config.clock.clone(),
            upstreams: Arc::new(StaticUpstreams::new().with("meshward-signer", mesh.signer_admin)),
        };
        let start_filter =
            |json: &Option<String>, kind: &str| -> anyhow::Result<Option<SharedPlugin>> {
                let Some(json) = json else { return Ok(None) };
                let mut pc = PluginConfig::new(json.as_bytes().to_vec())
                    .with_name(&format!("meshward-{kind}"))
                    .with_root_id(&format!("meshward_{kind}"));
                pc.vm_id = spiffe_id.clone();
                let plugin = mesh
                    .filter
                    .instantiate(pc, env.clone())
                    .with_context(|| format!("starting the {kind} filter of {spiffe_id}"))?;
                Ok(Some(SharedPlugin::new(plugin)))
            };
        let http = start_filter(&config.http_filter, "http")?;
        let network = start_filter(&config.network_filter, "network")?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let inbound = listener.local_addr()?;
        let inner = Arc::new(Inner {
            config,
            spiffe_id,
            cert,
            info: info_tx,
            trust: RwLock::new(trust),
            pinned_roots,
            handshake_failures: AtomicU64::new(0),
            http,
            network,
            env,
            next_conn: AtomicU64::new(1),
        });
        let mut tasks = vec![tokio::spawn(accept_loop(inner.clone(), listener))];
        tasks.push(tokio::spawn(rotate_loop(
            inner.clone(),
            ca,
            mesh.tokens.clone(),
            id,
        )));
        for plugin in [&inner.http, &inner.network].into_iter().flatten() {
            if let Some(t) = plugin.spawn_ticker() {
                tasks.push(t);
            }
        }
        tracing::info!(identity = %inner.spiffe_id, %inbound, "sidecar started");
        Ok(Sidecar {
            inner,
            inbound,
            tasks,
        })
    }

    /// The SPIFFE ID.
    pub fn identity(&self) -> &str {
        &self.inner.spiffe_id
    }

    /// Where peers connect.
    pub fn inbound_addr(&self) -> SocketAddr {
        self.inbound
    }

    /// The certificate held now.
    pub fn cert(&self) -> Option<CertInfo> {
        self.inner.info.borrow().clone()
    }

    /// The chain presented now (leaf first, then intermediates).
    pub fn presented_chain(&self) -> Vec<CertificateDer<'static>> {
        self.inner
            .cert
            .get()
            .map(|k| k.cert.clone())
            .unwrap_or_default()
    }

    /// The roots trusted now (the signer's root set as of the last issued
    /// certificate, plus roots pinned in `MeshContext::roots_pem`).
    pub fn trusted_roots(&self) -> Vec<CertificateDer<'static>> {
        self.inner.trust().der
    }

    /// Inbound TLS handshakes that failed so far.
    pub fn inbound_handshake_failures(&self) -> u64 {
        self.inner.handshake_failures.load(Ordering::Relaxed)
    }

    /// Waits (at most `limit`) until the certificate generation exceeds `after`.
    pub async fn wait_for_rotation(&self, after: u64, limit: Duration) -> anyhow::Result<CertInfo> {
        let mut rx = self.inner.info.subscribe();
        let fut = rx.wait_for(|i| i.as_ref().is_some_and(|i| i.generation > after));
        let info = tokio::time::timeout(limit, fut)
            .await
            .context("no rotation in time")??
            .clone();
        info.context("no certificate")
    }

    /// The filter's metrics in Prometheus text.
    pub fn metrics_prometheus(&self) -> String {
        self.inner.env.metrics.prometheus()
    }

    /// The metrics store the filter writes.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.inner.env.metrics.clone()
    }

    /// What the filter logged.
    pub fn filter_logs(&self) -> Vec<LogLine> {
        self.inner.env.logs.lines()
    }

    /// Sends one HTTP request over mTLS to `to` (its sidecar's inbound
    /// address), expecting the server to be `expected_id` when given.
    pub async fn request(
        &self,
        to: SocketAddr,
        expected_id: Option<&str>,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<MeshResponse> {
        let key = self.inner.cert.get().context("no certificate yet")?;
        let presented = self.cert();
        let fixed = Arc::new(CurrentCert::default());
        fixed.set(key);
        let config = tls::client_config(
            self.inner.trust().roots,
            fixed,
            expected_id.map(str::to_owned),
        )?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(to).await?;
        let stream = tokio::time::timeout(
            IO_TIMEOUT,
            connector.connect(ServerName::try_from("mesh.local")?, tcp),
        )
        .await
        .context("TLS handshake timed out")??;
        let mut response = send(stream, to, method, path, headers).await?;
        response.client_cert = presented;
        Ok(response)
    }
}

/// Sends one plaintext HTTP request (a workload outside the mesh).
pub async fn plaintext_request(
    to: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<MeshResponse> {
    let tcp = TcpStream::connect(to).await?;
    send(tcp, to, method, path, headers).await
}

async fn send<S>(
    stream: S,
    to: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<MeshResponse>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(conn);
    let mut builder = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, to.to_string());
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let response = tokio::time::timeout(
        IO_TIMEOUT,
        sender.send_request(builder.body(Full::new(Bytes::new()))?),
    )
    .await
    .context("request timed out")??;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = response.into_body().collect().await?.to_bytes().to_vec();
    driver.abort();
    Ok(MeshResponse {
        status,
        headers,
        body,
        client_cert: None,
    })
}

async fn rotate_loop(inner: Arc<Inner>, ca: CaClient, tokens: Arc<TokenIssuer>, id: SpiffeId) {
    loop {
        let Some(current) = inner.info.borrow().clone() else {
            return;
        };
        let delay = rotation_delay(&current, inner.config.rotate_between, SystemTime::now());
        tokio::time::sleep(delay).await;
        loop {
            match issue(&ca, &tokens, &inner.config, &id).await {
                Ok((key, leaf, roots)) => match CertInfo::parse(&leaf, current.generation + 1) {
                    Ok(info) => {
                        // Trust first: the new certificate may chain to a root
                        // this sidecar has not trusted yet.
                        if let Err(e) = inner.update_trust(&roots) {
                            tracing::warn!(identity = %inner.spiffe_id, "unusable root set, keeping the old one: {e:#}");
                        }
                        inner.cert.set(key);
                        tracing::info!(identity = %inner.spiffe_id, generation = info.generation, "certificate rotated");
                        inner.info.send_replace(Some(info));
                        break;
                    }
                    Err(e) => tracing::warn!("rotation: unreadable leaf: {e:#}"),
                },
                Err(e) => {
                    tracing::warn!(identity = %inner.spiffe_id, "rotation failed, retrying: {e:#}")
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            continue;
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            if let Err(e) = handle_connection(inner, tcp, peer).await {
                tracing::debug!(%peer, "connection ended: {e:#}");
            }
        });
    }
}

async fn handle_connection(
    inner: Arc<Inner>,
    tcp: TcpStream,
    peer: SocketAddr,
) -> anyhow::Result<()> {
    let local = tcp.local_addr()?;
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(IO_TIMEOUT, tcp.peek(&mut first)).await??;
    if n == 0 {
        return Ok(());
    }
    let id = inner.next_conn.fetch_add(1, Ordering::Relaxed);
    if first == [0x16] {
        let acceptor = inner.trust().acceptor;
        let tls = match tokio::time::timeout(IO_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                inner.handshake_failures.fetch_add(1, Ordering::Relaxed);
                return Err(e.into());
            }
            Err(e) => {
                inner.handshake_failures.fetch_add(1, Ordering::Relaxed);
                return Err(e.into());
            }
        };
        let (_, conn) = tls.get_ref();
        let peer_cert = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec());
        let version = conn.protocol_version().map(|v| format!("{v:?}"));
        let local_cert = inner.cert.get().map(|k| {
            k.end_entity_cert()
                .map(|c| c.as_ref().to_vec())
                .unwrap_or_default()
        });
        let info = ConnectionInfo {
            id,
            source: peer,
            destination: local,
            tls_version: version.as_deref(),
            peer_cert: peer_cert.as_deref(),
            local_cert: local_cert.as_deref(),
            expose_peer_certificate: inner.config.expose_peer_certificate,
        };
        let props = connection_properties(&info);
        let xfcc = xfcc_sanitize_set(local_cert.as_deref(), peer_cert.as_deref());
        serve(inner, tls, props, xfcc, true).await
    } else if inner.config.permissive {
        let info = ConnectionInfo {
            id,
            source: peer,
            destination: local,
            tls_version: None,
            peer_cert: None,
            local_cert: None,
            expose_peer_certificate: false,
        };
        serve(
            inner.clone(),
            tcp,
            connection_properties(&info),
            None,
            false,
        )
        .await
    } else {
        tracing::debug!(%peer, "plaintext connection refused (STRICT)");
        Ok(())
    }
}

async fn serve<S>(
    inner: Arc<Inner>,
    mut stream: S,
    props: Properties,
    xfcc: Option<String>,
    tls: bool,
) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut prefix = Vec::new();
    let mut net_ctx = None;
    if let Some(net) = &inner.network {
        let (ctx, outcome) = net.connection(&props).await?;
        if outcome == ConnOutcome::Close {
            net.finish_connection(ctx)?;
            return Ok(());
        }
        // Like Envoy, the network filter sees the first bytes before they pass.
        let mut buf = vec![0u8; 16 * 1024];
        let n = tokio::time::timeout(IO_TIMEOUT, stream.read(&mut buf)).await??;
        buf.truncate(n);
        let (_, data) = net.with(|p| p.downstream_data(ctx, &buf, n == 0))?;
        if net.with(|p| p.connection_state(ctx))? == ConnOutcome::Close {
            net.finish_connection(ctx)?;
            return Ok(());
        }
        prefix = data;
        net_ctx = Some(ctx);
    }
    let stream = Rewind::new(prefix, stream);
    let svc_inner = inner.clone();
    let svc = service_fn(move |req: http::Request<Incoming>| {
        let inner = svc_inner.clone();
        let props = props.clone();
        let xfcc = xfcc.clone();
        async move { handle_request(inner, req, props, xfcc, tls).await }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), svc)
        .await;
    if let (Some(net), Some(ctx)) = (&inner.network, net_ctx) {
        net.finish_connection(ctx)?;
    }
    served.map_err(Into::into)
}

type Reply = http::Response<Full<Bytes>>;

fn reply(status: u16, headers: &[(String, String)], body: Vec<u8>) -> anyhow::Result<Reply> {
    let mut builder = http::Response::builder().status(status);
    for (k, v) in headers {
        if !k.starts_with(':') {
            builder = builder.header(k.as_str(), v.as_str());
        }
    }
    Ok(builder.body(Full::new(Bytes::from(body)))?)
}

async fn handle_request(
    inner: Arc<Inner>,
    req: http::Request<Incoming>,
    props: Properties,
    xfcc: Option<String>,
    tls: bool,
) -> anyhow::Result<Reply> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes().to_vec();
    let authority = parts
        .headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.to_string());
    let mut headers: Vec<(String, String)> = vec![
        (":method".into(), parts.method.as_str().to_owned()),
        (":path".into(), path),
        (":authority".into(), authority),
        (
            ":scheme".into(),
            if tls { "https" } else { "http" }.to_owned(),
        ),
    ];
    for (k, v) in &parts.headers {
        let name = k.as_str();
        if name == "host" || IDENTITY_HEADERS.contains(&name) {
            continue;
        }
        headers.push((
            name.to_owned(),
            String::from_utf8_lossy(v.as_bytes()).into_owned(),
        ));
    }
    if let Some(x) = xfcc {
        headers.push(("x-forwarded-client-cert".into(), x));
    }
    let Some(plugin) = &inner.http else {
        let (status, headers, body) = forward(&inner, &headers, body).await?;
        return reply(status, &headers, body);
    };
    let (ctx, outcome) = match plugin.http_request(&props, &headers, &body).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("filter failed, failing closed: {e}");
            return reply(
                503,
                &[],
                b"meshward: filter failed (fail closed)\n".to_vec(),
            );
        }
    };
    let result = match outcome {
        HttpOutcome::Continue { headers } => match forward(&inner, &headers, body).await {
            Ok((status, resp_headers, resp_body)) => {
                let mut with_status = vec![(":status".to_owned(), status.to_string())];
                with_status.extend(resp_headers);
                match plugin.http_response(ctx, &with_status) {
                    Ok(HttpOutcome::Continue { headers }) => reply(status, &headers, resp_body),
                    Ok(HttpOutcome::LocalResponse(r)) => {
                        reply(u16::try_from(r.status).unwrap_or(500), &r.headers, r.body)
                    }
                    Ok(_) => Err(anyhow::anyhow!("the filter reset the response")),
                    Err(e) => reply(
                        503,
                        &[],
                        format!("meshward: filter failed: {e}\n").into_bytes(),
                    ),
                }
            }
            Err(e) => reply(
                503,
                &[],
                format!("upstream connect error: {e:#}\n").into_bytes(),
            ),
        },
        HttpOutcome::LocalResponse(r) => {
            reply(u16::try_from(r.status).unwrap_or(500), &r.headers, r.body)
        }
        HttpOutcome::Reset | HttpOutcome::Paused => {
            Err(anyhow::anyhow!("the filter reset the stream"))
        }
    };
    plugin.finish(ctx)?;
    result
}

async fn forward(
    inner: &Inner,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> anyhow::Result<(u16, Vec<(String, String)>, Vec<u8>)> {
    let backend = inner
        .config
        .backend
        .context("no local application behind this sidecar")?;
    let pseudo = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let tcp = TcpStream::connect(backend).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    let driver = tokio::spawn(conn);
    let mut builder = http::Request::builder()
        .method(pseudo(":method").as_str())
        .uri(pseudo(":path"))
        .header(http::header::HOST, pseudo(":authority"));
    for (k, v) in headers {
        if !k.starts_with(':') {
            builder = builder.header(k.as_str(), v.as_str());
        }
    }
    let response = tokio::time::timeout(
        IO_TIMEOUT,
        sender.send_request(builder.body(Full::new(Bytes::from(body)))?),
    )
    .await
    .context("backend timed out")??;
    let status = response.status().as_u16();
    let resp_headers = response
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let resp_body = response.into_body().collect().await?.to_bytes().to_vec();
    driver.abort();
    Ok((status, resp_headers, resp_body))
}
