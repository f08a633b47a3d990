//! The bundle inside a running signer: `[bundle]` config, the channel, the
//! push sinks' tasks and the HTTPS SPIFFE bundle endpoint.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::configmap::{ConfigMapSink, LabelSelector};
use super::dir::DirSink;
use super::grpc::WatchBundleService;
use super::{BundleChannel, BundleError, BundleSink, TrustBundle, endpoint, run_sink};
use crate::ledger::service::humantime_serde;

/// `[bundle]`: where the trust bundle is published. The admin port
/// (`/v1/bundle.jwks.json`, `/v1/root-cert.pem`) and the gRPC
/// `WatchBundle` always serve it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BundleConfig {
    /// `spiffe_refresh_hint`: how often pollers should re-fetch.
    #[serde(with = "humantime_serde")]
    pub refresh_hint: Duration,
    /// How often push sinks are re-written even without a change (repairs
    /// drift, reaches namespaces labelled later).
    #[serde(with = "humantime_serde")]
    pub resync_interval: Duration,
    /// Directory sink: `root-cert.pem` and `bundle.jwks.json` written here.
    pub dir: Option<PathBuf>,
    /// SPIFFE bundle endpoint over HTTPS (serving certificate from this CA:
    /// the `https_spiffe` profile), e.g. `0.0.0.0:8443`.
    pub endpoint_addr: Option<SocketAddr>,
    /// Connections the bundle endpoint holds at once (TLS handshakes
    /// included); at the limit it stops accepting. Each connection is closed
    /// after 60 s at most.
    pub endpoint_max_connections: usize,
    /// `WatchBundle` streams open at once on the gRPC port; beyond it a new
    /// one is refused RESOURCE_EXHAUSTED (each lives as long as its client
    /// keeps it).
    pub max_watchers: usize,
    /// `WatchBundle` streams one client address may hold at once (0: no
    /// per-address share); beyond it a new one from that address is refused
    /// RESOURCE_EXHAUSTED, so one pod cannot take every place.
    pub max_watchers_per_ip: usize,
    /// `ca rotate-root` without `--overlap`: how long the new root is
    /// published before issuance switches to it.
    #[serde(with = "humantime_serde")]
    pub rotation_overlap: Duration,
    /// How often a running built-in CA checks its rotation state (switch,
    /// retire, or a `ca rotate-*` run by another process).
    #[serde(with = "humantime_serde")]
    pub rotation_check_interval: Duration,
    /// Istio's `istio-ca-root-cert` ConfigMap sink.
    pub configmap: Option<ConfigMapConfig>,
}

/// `[bundle.configmap]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigMapConfig {
    /// Namespaces to write into, as an equality-based label selector
    /// (e.g. `istio-injection=enabled`).
    pub namespace_selector: String,
    /// API server URL without authentication (e.g. `kubectl proxy` at
    /// `http://127.0.0.1:8001`); default: in-cluster service account or
    /// kubeconfig.
    #[serde(default)]
    pub api_server: Option<String>,
}

impl Default for BundleConfig {
    fn default() -> Self {
        Self {
            refresh_hint: Duration::from_secs(300),
            resync_interval: Duration::from_secs(60),
            dir: None,
            endpoint_addr: None,
            endpoint_max_connections: 1024,
            max_watchers: 4096,
            max_watchers_per_ip: 16,
            rotation_overlap: Duration::from_secs(24 * 3600),
            rotation_check_interval: Duration::from_secs(30),
            configmap: None,
        }
    }
}

/// The bundle of a running signer.
#[derive(Debug)]
pub struct BundleService {
    channel: BundleChannel,
    endpoint_addr: Option<SocketAddr>,
    tasks: Vec<JoinHandle<Result<(), String>>>,
    shutdown: watch::Receiver<bool>,
}

impl BundleService {
    /// Build the first bundle from `roots`, start the configured sinks and
    /// the HTTPS endpoint, which presents whatever `serving` resolves at each
    /// handshake (the signer's serving certificate, renewed when the CA
    /// changes).
    /// The initial sequence is the current Unix time, so it keeps
    /// increasing across restarts.
    pub async fn start(
        config: &BundleConfig,
        trust_domain: &str,
        roots: Vec<CertificateDer<'static>>,
        serving: Arc<dyn rustls::server::ResolvesServerCert>,
        endpoint_limit: crate::server::connections::ConnectionLimit,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, BundleError> {
        let sequence = u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp()).unwrap_or(1);
        let bundle = TrustBundle::new(trust_domain, roots, sequence, config.refresh_hint)?;
        let channel = BundleChannel::new(bundle);
        let mut sinks: Vec<Arc<dyn BundleSink>> = Vec::new();
        if let Some(dir) = &config.dir {
            sinks.push(Arc::new(DirSink::new(dir)));
        }
        if let Some(cm) = &config.configmap {
            sinks.push(Arc::new(configmap_sink(cm).await?));
        }
        if config.resync_interval.is_zero() {
            return Err(BundleError::Sink {
                sink: "config",
                reason: "bundle.resync_interval must be positive".to_string(),
            });
        }
        let mut tasks = Vec::new();
        for sink in sinks {
            let rx = channel.subscribe();
            let stop = shutdown.clone();
            let every = config.resync_interval;
            tasks.push(tokio::spawn(async move {
                run_sink(sink, rx, every, stop).await;
                Ok(())
            }));
        }
        let mut endpoint_addr = None;
        if let Some(addr) = config.endpoint_addr {
            let tls = server_tls_resolved(serving)?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| endpoint_err(format!("binding {addr}: {e}")))?;
            let local = listener
                .local_addr()
                .map_err(|e| endpoint_err(e.to_string()))?;
            endpoint_addr = Some(local);
            let ch = channel.clone();
            let stop = shutdown.clone();
            tracing::info!(addr = %local, "SPIFFE bundle endpoint (HTTPS) serving");
            tasks.push(tokio::spawn(async move {
                endpoint::serve_https(listener, tls, ch, endpoint_limit, stop)
                    .await
                    .map_err(|e| e.to_string())
            }));
        }
        Ok(Self {
            channel,
            endpoint_addr,
            tasks,
            shutdown,
        })
    }

    /// The channel: publish a new bundle here (rotation does).
    pub fn channel(&self) -> &BundleChannel {
        &self.channel
    }

    /// Where the HTTPS bundle endpoint listens, if configured.
    pub fn endpoint_addr(&self) -> Option<SocketAddr> {
        self.endpoint_addr
    }

    /// `/v1/bundle.jwks.json` and `/v1/root-cert.pem` for the admin router.
    pub fn admin_routes(&self) -> Router {
        endpoint::admin_routes(self.channel.clone())
    }

    /// The `meshward.v1.TrustBundleService` gRPC service.
    pub fn grpc_service(
        &self,
        watchers: Arc<super::grpc::Watchers>,
    ) -> meshward_proto::meshward::v1::trust_bundle_service_server::TrustBundleServiceServer<
        WatchBundleService,
    > {
        WatchBundleService::new(self.channel.clone())
            .with_shutdown(self.shutdown.clone())
            .with_watchers(watchers)
            .into_server()
            // A WatchBundleRequest is a trust domain name.
            .max_decoding_message_size(4096)
    }

    /// The background tasks (sinks, endpoint); they end on shutdown.
    pub fn take_tasks(&mut self) -> Vec<JoinHandle<Result<(), String>>> {
        std::mem::take(&mut self.tasks)
    }
}

fn endpoint_err(reason: String) -> BundleError {
    BundleError::Sink {
        sink: "endpoint",
        reason,
    }
}

pub(crate) async fn configmap_sink(cm: &ConfigMapConfig) -> Result<ConfigMapSink, BundleError> {
    let err = |reason: String| BundleError::Sink {
        sink: "configmap",
        reason,
    };
    let selector = LabelSelector::parse(&cm.namespace_selector).map_err(|e| err(e.to_string()))?;
    let client = match &cm.api_server {
        Some(url) => {
            let uri: http::Uri = url
                .parse()
                .map_err(|e| err(format!("api_server {url:?}: {e}")))?;
            kube::Client::try_from(kube::Config::new(uri)).map_err(|e| err(e.to_string()))?
        }
        None => kube::Client::try_default()
            .await
            .map_err(|e| err(format!("no Kubernetes client configuration: {e}")))?,
    };
    Ok(ConfigMapSink::new(client, selector))
}

/// A rustls server config presenting what `resolver` gives at each handshake.
pub fn server_tls_resolved(
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
) -> Result<Arc<rustls::ServerConfig>, BundleError> {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| endpoint_err(e.to_string()))?
    .with_no_client_auth()
    .with_cert_resolver(resolver);
    Ok(Arc::new(config))
}

/// A rustls server config from a PEM chain and a PKCS#8 PEM key.
pub fn server_tls(
    chain_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ServerConfig>, BundleError> {
    let certs: Vec<CertificateDer<'static>> = pem::parse_many(chain_pem.as_bytes())
        .map_err(|e| endpoint_err(format!("serving chain: {e}")))?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| CertificateDer::from(p.into_contents()))
        .collect();
    let key =
        pem::parse(key_pem.as_bytes()).map_err(|e| endpoint_err(format!("serving key: {e}")))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.into_contents()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| endpoint_err(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| endpoint_err(format!("serving certificate: {e}")))?;
    Ok(Arc::new(config))
}
