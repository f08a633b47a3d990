//! Start and stop a whole signer: CA, authenticator, gRPC over TLS and the
//! admin port. This is the entry point other crates (e2e, demo, benchmarks)
//! and the binary use.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use spiffe::TrustDomain;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::admin::{self, AdminState};
use crate::authn::cache::TokenCacheOptions;
use crate::authn::client_cert::ClientCertAuthenticator;
use crate::authn::jwt::{JwtAuthenticator, KeySource, TrustedIssuer};
use crate::authn::keys::{self, KeyError};
use crate::authn::oidc::{DiscoveredKeys, DiscoveryOptions};
use crate::authn::token_review::TokenReviewer;
use crate::authn::{Authenticator, CertificateOrToken};
use crate::config::{Config, ConfigError};
use crate::issuer::Issuer;
use crate::issuer::builtin::{BuiltinError, BuiltinIssuer, BuiltinOptions};
use crate::metrics::Metrics;
use crate::observer::IssuanceObserver;
use crate::policy::namespaces::{KubeNamespaceLabels, NamespaceLabels};
use crate::policy::nodes::{KubeNodeAuthorizer, NodeAuthorizer};
use crate::policy::rate::{AuthFailureLimit, IssuanceRateLimit};
use crate::server::ca_service::{CaPipeline, CaService, to_pem};
use crate::server::connections::ConnectionLimit;
use crate::server::serving::{
    IssuerFingerprint, ServingCertResolver, ServingError, ServingParams, issue_serving_identity,
    spawn_serving_renewal,
};
use crate::server::tls::{server_config, tls_incoming};

/// Why the signer did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The built-in CA could not be loaded or created.
    #[error(transparent)]
    Ca(#[from] BuiltinError),
    /// A JWT key file is unusable.
    #[error("JWT keys for issuer {issuer} from {path}: {source}")]
    Keys {
        /// Issuer.
        issuer: String,
        /// The file.
        path: PathBuf,
        /// Why.
        source: KeyError,
    },
    /// A JWT key file cannot be read.
    #[error("reading JWT keys {path}: {source}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A listener could not bind.
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The serving certificate could not be made.
    #[error(transparent)]
    Serving(#[from] ServingError),
    /// TLS setup failed.
    #[error("gRPC TLS: {0}")]
    Tls(String),
    /// A background task failed.
    #[error("start-up task: {0}")]
    Task(String),
    /// The issuance ledger could not be opened.
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    /// The trust bundle or one of its sinks could not be set up.
    #[error(transparent)]
    Bundle(#[from] crate::bundle::BundleError),
    /// The built-in CA's rotation state is unusable.
    #[error(transparent)]
    Rotation(#[from] crate::bundle::rotation::RotationError),
}

/// A signer to start: a [`Config`] plus optional replacements for its parts.
pub struct Signer {
    config: Config,
    issuer: Option<Arc<dyn Issuer>>,
    authenticator: Option<Arc<dyn Authenticator>>,
    observers: Vec<Arc<dyn IssuanceObserver>>,
}

impl Signer {
    /// Start a signer with everything taken from `config`.
    pub async fn start(config: Config) -> Result<RunningSigner, StartError> {
        Self::builder(config).serve().await
    }

    /// A builder, to plug in another issuer backend, authenticator or
    /// issuance observers (e.g. the ledger) before starting.
    pub fn builder(config: Config) -> Self {
        Self {
            config,
            issuer: None,
            authenticator: None,
            observers: Vec::new(),
        }
    }

    /// Use this issuer instead of the one `config.ca` describes.
    pub fn issuer(mut self, issuer: Arc<dyn Issuer>) -> Self {
        self.issuer = Some(issuer);
        self
    }

    /// Use this authenticator instead of the one `config.authn` describes.
    pub fn authenticator(mut self, authenticator: Arc<dyn Authenticator>) -> Self {
        self.authenticator = Some(authenticator);
        self
    }

    /// Run `observer` after every issuance.
    pub fn observer(mut self, observer: Arc<dyn IssuanceObserver>) -> Self {
        self.observers.push(observer);
        self
    }

    /// Load the CA and keys, bind both ports, and serve in the background.
    pub async fn serve(self) -> Result<RunningSigner, StartError> {
        let config = self.config;
        config.validate()?;
        let trust_domain = TrustDomain::new(&config.trust_domain)
            .map_err(|e| ConfigError::Invalid(format!("trust_domain: {e}")))?;

        let mut cacerts_metrics = None;
        let mut vault_metrics = None;
        let mut rotating: Option<Arc<crate::bundle::rotation::live::RotatingBuiltin>> = None;
        let issuer: Arc<dyn Issuer> = match self.issuer {
            Some(i) => i,
            None => match (
                config.ca.backend.as_str(),
                &config.ca.cacerts,
                &config.ca.vault,
            ) {
                ("cacerts", Some(c), _) => {
                    let ca =
                        crate::issuer::cacerts::CaCertsIssuer::start(c, OffsetDateTime::now_utc())
                            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
                    cacerts_metrics = Some(ca.metrics().clone());
                    ca as Arc<dyn Issuer>
                }
                ("vault", _, Some(v)) => {
                    let vault = crate::issuer::vault::VaultIssuer::connect(v)
                        .await
                        .map_err(|e| ConfigError::Invalid(e.to_string()))?;
                    vault_metrics = Some(vault.metrics().clone());
                    let vault = Arc::new(vault);
                    // Ends with the issuer (it holds a weak reference).
                    drop(vault.spawn_roots_reloader(v.roots_reload_interval));
                    vault
                }
                _ => {
                    let ca = Arc::new(load_rotating_builtin(&config, &trust_domain).await?);
                    rotating = Some(ca.clone());
                    ca
                }
            },
        };
        let mut token_cache_metrics = None;
        let token_authenticator: Arc<dyn Authenticator> = match self.authenticator {
            Some(a) => a,
            None => {
                let jwt = jwt_authenticator(&config, &trust_domain)?;
                token_cache_metrics = jwt.token_cache().map(|c| c.metrics().clone());
                Arc::new(jwt)
            }
        };
        let authenticator: Arc<dyn Authenticator> = Arc::new(CertificateOrToken {
            client_cert: config
                .authn
                .mtls_renewal
                .then(|| ClientCertAuthenticator::new(trust_domain.clone(), issuer.clone())),
            token: token_authenticator,
        });
        let playground = config
            .dashboard
            .playground_wasm
            .as_deref()
            .map(crate::dashboard::load_playground)
            .transpose()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let ledger =
            crate::ledger::LedgerService::open(&config.ledger, &config.ca.data_dir).await?;
        let mut metrics = Metrics::new();
        if let Some(l) = &ledger {
            l.metrics().register(metrics.registry_mut());
        }
        if let Some(m) = &cacerts_metrics {
            m.register(metrics.registry_mut());
        }
        if let Some(m) = &vault_metrics {
            m.register(metrics.registry_mut());
        }
        if let Some(m) = &token_cache_metrics {
            m.register(metrics.registry_mut());
        }
        let connection_limit = ConnectionLimit::with_per_ip(
            config.server.max_connections,
            (!config.server.max_connection_age.is_zero())
                .then(|| config.server.max_connection_age + config.server.max_connection_age_grace),
            Some(config.server.max_connections_per_ip),
        );
        connection_limit.register(metrics.registry_mut(), "grpc");
        let admin_limit = ConnectionLimit::with_per_ip(
            config.server.admin_max_connections,
            Some(admin::CONNECTION_LIFETIME),
            Some(config.server.admin_max_connections_per_ip),
        );
        admin_limit.register(metrics.registry_mut(), "admin");
        let watchers = Arc::new(crate::bundle::grpc::Watchers::with_per_ip(
            config.bundle.max_watchers,
            (config.bundle.max_watchers_per_ip > 0).then_some(config.bundle.max_watchers_per_ip),
        ));
        watchers.register(metrics.registry_mut());
        let endpoint_limit = ConnectionLimit::new(
            config.bundle.endpoint_max_connections,
            Some(crate::bundle::endpoint::CONNECTION_LIFETIME),
        );
        if config.bundle.endpoint_addr.is_some() {
            endpoint_limit.register(metrics.registry_mut(), "bundle_endpoint");
        }
        let bundle_gauges = crate::bundle::BundleGauges::default();
        bundle_gauges.register(metrics.registry_mut());
        let crl_metrics = crate::revocation::CrlMetrics::default();
        if ledger.is_some() {
            crl_metrics.register(metrics.registry_mut());
        }
        let metrics = Arc::new(metrics);
        metrics.set_ca_expiry(issuer.signing_validity().not_after.unix_timestamp());

        let grpc_listener = bind(
            "gRPC",
            config.server.grpc_addr,
            config.server.listen_backlog,
        )?;
        let admin_listener = bind("admin", config.server.admin_addr, ADMIN_BACKLOG)?;
        let grpc_addr = local_addr("gRPC", &grpc_listener, config.server.grpc_addr)?;
        let admin_addr = local_addr("admin", &admin_listener, config.server.admin_addr)?;

        let serving = issue_serving_identity(
            issuer.as_ref(),
            &trust_domain,
            &config.server.dns_names,
            config.server.serving_cert_ttl,
            OffsetDateTime::now_utc(),
        )
        .await?;
        let serving_issued_under = IssuerFingerprint::of(issuer.as_ref());
        let serving_certs = Arc::new(ServingCertResolver::new(&serving)?);
        let tls =
            server_config(serving_certs.clone()).map_err(|e| StartError::Tls(e.to_string()))?;

        let policy = config.issuance_policy()?;
        let namespace_labels: Option<Arc<dyn NamespaceLabels>> = match &config.policy.kubernetes {
            Some(k) => Some(Arc::new(KubeNamespaceLabels::new(
                crate::kube_api::client(k)
                    .map_err(|e| ConfigError::Invalid(format!("policy.kubernetes: {e}")))?,
                config.policy.namespace_label_cache,
            ))),
            None => None,
        };
        info!(policy = %policy.base.describe(), "issuance policy for namespaces in no tier");
        for t in &policy.tiers {
            let effective = crate::policy::tiers::EffectivePolicy {
                tier: t.name.clone(),
                ttl: t.ttl,
                allowed_keys: t.allowed_keys.clone(),
            };
            info!(namespaces = %t.namespaces, selector = ?t.selector, policy = %effective.describe(), "issuance policy tier");
        }
        let node_authorizer: Option<Arc<dyn NodeAuthorizer>> =
            match &config.authn.node_authorization {
                Some(n) => Some(Arc::new(KubeNodeAuthorizer::new(
                    crate::kube_api::client(&n.kube_api()).map_err(|e| {
                        ConfigError::Invalid(format!("authn.node_authorization: {e}"))
                    })?,
                    n.pod_cache,
                ))),
                None => None,
            };
        if !config.authn.trusted_node_accounts.is_empty() {
            if node_authorizer.is_some() {
                info!(accounts = ?config.authn.trusted_node_accounts, "trusted node agents (may use ImpersonatedIdentity for pods on their own node)");
            } else {
                warn!(accounts = ?config.authn.trusted_node_accounts, "trusted node agents may use ImpersonatedIdentity for ANY identity on any node (authn.unbound_node_agents = true)");
            }
        }
        let live =
            crate::server::ca_service::LiveSettings::new(crate::server::ca_service::Reloadable {
                policy,
                trusted_node_accounts: config.trusted_node_accounts(),
            });
        let pipeline = Arc::new(CaPipeline {
            trust_domain: trust_domain.clone(),
            authenticator,
            issuer: issuer.clone(),
            live: live.clone(),
            node_authorizer,
            rate_limit: IssuanceRateLimit::new(
                config.policy.rate_limit_burst,
                config.policy.rate_limit_interval,
            ),
            auth_failures: AuthFailureLimit::new(
                config.authn.failure_limit_burst,
                config.authn.failure_limit_interval,
                config.authn.address_failure_limit_burst,
                config.authn.address_failure_limit_interval,
            ),
            namespace_labels,
            observers: self
                .observers
                .into_iter()
                .chain(
                    ledger
                        .iter()
                        .map(|l| l.observer() as Arc<dyn IssuanceObserver>),
                )
                .collect(),
            revocations: ledger.as_ref().map(|l| l.ledger().clone()),
            metrics: metrics.clone(),
        });
        let service = CaService::new(pipeline).into_server(config.server.max_concurrent_requests);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let serving_flag = Arc::new(AtomicBool::new(false));
        let mut bundle = crate::bundle::BundleService::start(
            &config.bundle,
            trust_domain.as_ref(),
            issuer.trust_anchors(),
            serving_certs.clone(),
            endpoint_limit,
            shutdown_rx.clone(),
        )
        .await?;
        bundle_gauges.attach(bundle.channel().clone());

        let server = &config.server;
        let mut builder = tonic::transport::Server::builder()
            .max_concurrent_streams(server.max_concurrent_streams);
        if !server.max_connection_age.is_zero() {
            // GOAWAY at the age; `Limited` closes what is left after the grace
            // (tonic's own grace would skip the GOAWAY).
            builder = builder.max_connection_age(server.max_connection_age);
        }
        if !server.keepalive_interval.is_zero() {
            builder = builder
                .http2_keepalive_interval(Some(server.keepalive_interval))
                .http2_keepalive_timeout(Some(server.keepalive_timeout));
        }
        let router = builder
            .add_service(service)
            .add_service(bundle.grpc_service(watchers));
        let mut rx = shutdown_rx.clone();
        let mut drain_rx = shutdown_rx.clone();
        let drain = config.server.shutdown_drain;
        let incoming = tls_incoming(grpc_listener, tls, connection_limit, shutdown_rx.clone());
        let grpc_task = tokio::spawn(async move {
            let serve = router.serve_with_incoming_shutdown(incoming, async move {
                let _ = rx.wait_for(|stop| *stop).await;
            });
            // A graceful shutdown waits for every connection to close; a peer
            // that never answers the GOAWAY ping would hold the signer up
            // until keepalive drops it (or the kubelet kills it).
            let result = tokio::select! {
                r = serve => r,
                _ = async {
                    let _ = drain_rx.wait_for(|stop| *stop).await;
                    tokio::time::sleep(drain).await;
                } => {
                    warn!(drain = ?drain, "gRPC connections still open at the end of server.shutdown_drain; closing them");
                    Ok(())
                }
            };
            if let Err(e) = &result {
                error!(error = %e, "gRPC server stopped with an error");
            }
            result.map_err(|e| e.to_string())
        });
        serving_flag.store(true, Ordering::Release);

        let replica = crate::ledger::service::host_name().unwrap_or_else(|| "unknown".into());
        let instance = crate::dashboard::new_instance_id();
        let fleet = match config.dashboard.fleet_settings() {
            Some(settings) => Some(Arc::new(
                crate::dashboard::fleet::Fleet::new(settings, instance.clone())
                    .map_err(ConfigError::Invalid)?,
            )),
            None => None,
        };
        // The CRL: from the ledger's revocations, signed by the issuing CA
        // when the key is here (builtin, cacerts).
        let why_no_crl = if !config.revocation.crl {
            "no CRL: revocation.crl = false"
        } else if !issuer.signs_crls() && issuer.fetch_crl().is_none() {
            "no CRL from this signer: the backend's CA key is elsewhere (with Vault, publish Vault's CRL: <vault>/v1/<mount>/crl)"
        } else {
            ""
        };
        let crl = match &ledger {
            Some(l) if why_no_crl.is_empty() => Some(crate::revocation::CrlPublisher::new(
                issuer.clone(),
                l.ledger().clone(),
                config.revocation.clone(),
                config
                    .revocation
                    .crl_dir
                    .clone()
                    .or_else(|| config.bundle.dir.clone()),
                crl_metrics.clone(),
            )),
            _ => None,
        };
        let crl = match (crl, &config.bundle.configmap) {
            (Some(c), Some(cm)) => Some(
                c.with_configmaps(
                    crate::bundle::service::configmap_sink(cm)
                        .await
                        .map_err(|e| ConfigError::Invalid(e.to_string()))?,
                ),
            ),
            (c, _) => c,
        };
        let revocation_routes = ledger
            .as_ref()
            .map(|l| crate::revocation::routes(crl.clone(), l.ledger().clone(), why_no_crl))
            .unwrap_or_default();
        let admin_router = admin::router(AdminState {
            metrics: metrics.clone(),
            serving: serving_flag.clone(),
            issuer: issuer.clone(),
        })
        .merge(bundle.admin_routes())
        .merge(ledger.as_ref().map(|l| l.routes()).unwrap_or_default())
        .merge(revocation_routes)
        .merge(crate::dashboard::routes(crate::dashboard::DashboardState {
            issuer: issuer.clone(),
            bundle: bundle.channel().clone(),
            rotation: rotating.clone(),
            ledger: match (&ledger, &config.ledger.postgres) {
                (None, _) => crate::dashboard::LedgerKind::Off,
                (Some(_), Some(_)) => crate::dashboard::LedgerKind::Postgres,
                (Some(_), None) => crate::dashboard::LedgerKind::Sqlite,
            },
            replica,
            instance,
            started_at: OffsetDateTime::now_utc(),
            playground,
            fleet,
        }));
        let mut tasks = bundle.take_tasks();
        if let Some(crl) = &crl {
            tasks.push(crl.spawn(shutdown_rx.clone()));
        }
        if let Some(l) = &ledger {
            tasks.push(l.spawn_maintenance(
                config.ledger.retention,
                config.ledger.prune_interval,
                shutdown_rx.clone(),
            ));
        }
        // The serving certificate and the trust bundle follow the issuer:
        // checked as often as the CA itself can change (rotation tick,
        // cacerts reload, Vault roots reload) and on every bundle change.
        let reload_interval = match (&cacerts_metrics, &vault_metrics) {
            (Some(_), _) => config.ca.cacerts.as_ref().map(|c| c.reload_interval),
            (_, Some(_)) => config.ca.vault.as_ref().map(|v| v.roots_reload_interval),
            _ => None,
        };
        let serving_check_interval = reload_interval
            .map_or(config.bundle.rotation_check_interval, |r| {
                r.min(config.bundle.rotation_check_interval)
            });
        tasks.push(spawn_serving_renewal(
            issuer.clone(),
            ServingParams {
                trust_domain: trust_domain.clone(),
                dns_names: config.server.dns_names.clone(),
                ttl: config.server.serving_cert_ttl,
            },
            serving_certs,
            metrics.clone(),
            serving,
            serving_issued_under,
            serving_check_interval,
            Some(bundle.channel().subscribe()),
            shutdown_rx.clone(),
        ));
        if rotating.is_none() {
            tasks.push(crate::bundle::spawn_roots_follower(
                issuer.clone(),
                bundle.channel().clone(),
                serving_check_interval,
                shutdown_rx.clone(),
            ));
        }
        if let Some(ca) = rotating {
            // The longest TTL any tier may grant bounds how long an old root
            // must stay trusted after a switch.
            let max_ttl = config
                .policy
                .tiers
                .iter()
                .filter_map(|t| t.max_ttl)
                .fold(config.policy.max_ttl, std::cmp::max);
            tasks.push(crate::bundle::rotation::live::spawn_rotation(
                ca,
                bundle.channel().clone(),
                ledger.as_ref().map(|l| l.ledger().clone()),
                max_ttl,
                config.bundle.rotation_check_interval,
                shutdown_rx.clone(),
            ));
        }
        let admin_task = tokio::spawn(async move {
            let result = admin::serve(
                admin_listener,
                admin_router,
                admin_limit,
                drain,
                shutdown_rx,
            )
            .await;
            if let Err(e) = &result {
                error!(error = %e, "admin server stopped with an error");
            }
            result.map_err(|e| e.to_string())
        });

        let roots_pem: String = issuer.trust_anchors().iter().map(|c| to_pem(c)).collect();
        let v = issuer.signing_validity();
        info!(
            %grpc_addr,
            %admin_addr,
            trust_domain = %trust_domain,
            backend = issuer.name(),
            ca_not_after = %v.not_after,
            default_ttl = %humantime::format_duration(config.policy.default_ttl),
            max_ttl = %humantime::format_duration(config.policy.max_ttl),
            dns_names = ?config.server.dns_names,
            "meshward-signer serving"
        );
        Ok(RunningSigner {
            grpc_addr,
            admin_addr,
            roots_pem,
            trust_domain,
            issuer,
            metrics,
            shutdown: shutdown_tx,
            bundle: bundle.channel().clone(),
            bundle_endpoint: bundle.endpoint_addr(),
            ledger: ledger.map(|l| l.ledger().clone()),
            tasks: [grpc_task, admin_task].into_iter().chain(tasks).collect(),
            reloader: Reloader {
                live,
                config: Arc::new(std::sync::Mutex::new(config)),
            },
        })
    }
}

async fn load_builtin(
    config: &Config,
    trust_domain: &TrustDomain,
) -> Result<BuiltinIssuer, StartError> {
    let opts = BuiltinOptions {
        data_dir: config.ca.data_dir.clone(),
        key_algorithm: config.ca.key_algorithm,
        organization: trust_domain.to_string(),
        root_ttl: config.ca.root_ttl,
        intermediate_ttl: config.ca.intermediate_ttl,
    };
    // RSA key generation takes a while: keep it off the async workers.
    let ca = tokio::task::spawn_blocking(move || {
        BuiltinIssuer::load_or_create(&opts, OffsetDateTime::now_utc())
    })
    .await
    .map_err(|e| StartError::Task(e.to_string()))??;
    if ca.was_created() {
        info!(data_dir = %config.ca.data_dir.display(), algorithm = ?config.ca.key_algorithm, "created a new built-in CA");
    } else {
        info!(data_dir = %config.ca.data_dir.display(), "loaded the built-in CA");
    }
    Ok(ca)
}

/// The built-in CA, reloadable so `ca rotate-*` take effect without a restart.
async fn load_rotating_builtin(
    config: &Config,
    trust_domain: &TrustDomain,
) -> Result<crate::bundle::rotation::live::RotatingBuiltin, StartError> {
    load_builtin(config, trust_domain).await?;
    let opts = BuiltinOptions {
        data_dir: config.ca.data_dir.clone(),
        key_algorithm: config.ca.key_algorithm,
        organization: trust_domain.to_string(),
        root_ttl: config.ca.root_ttl,
        intermediate_ttl: config.ca.intermediate_ttl,
    };
    let ca = tokio::task::spawn_blocking(move || {
        crate::bundle::rotation::live::RotatingBuiltin::load(opts, OffsetDateTime::now_utc())
    })
    .await
    .map_err(|e| StartError::Task(e.to_string()))??;
    Ok(ca)
}

/// Build the JWT authenticator `config.authn` describes (reads key files).
pub fn jwt_authenticator(
    config: &Config,
    trust_domain: &TrustDomain,
) -> Result<JwtAuthenticator, StartError> {
    let mut issuers = Vec::new();
    for j in &config.authn.jwt {
        let keys_error = |path: &std::path::Path, source| StartError::Keys {
            issuer: j.issuer.clone(),
            path: path.to_path_buf(),
            source,
        };
        let (source, keys) = if let Some(path) = &j.jwks_file {
            let text = read(path)?;
            let (keys, skipped) = keys::parse_jwks(&text).map_err(|e| keys_error(path, e))?;
            for s in skipped {
                tracing::warn!(issuer = %j.issuer, path = %path.display(), reason = %s, "skipped a JWKS key");
            }
            (
                format!("JWKS file {}", path.display()),
                KeySource::Static(keys),
            )
        } else if let Some(path) = &j.public_key_file {
            let text = read(path)?;
            let keys = keys::parse_pem_public_keys(&text).map_err(|e| keys_error(path, e))?;
            (
                format!("PEM file {}", path.display()),
                KeySource::Static(keys),
            )
        } else if j.oidc_discovery {
            let mut http = reqwest::Client::builder().use_rustls_tls();
            if let Some(path) = &j.ca_file {
                let text = read(path)?;
                for block in pem::parse_many(text.as_bytes())
                    .map_err(|e| ConfigError::Invalid(format!("{}: {e}", path.display())))?
                {
                    let cert = reqwest::Certificate::from_der(block.contents())
                        .map_err(|e| ConfigError::Invalid(format!("{}: {e}", path.display())))?;
                    http = http.add_root_certificate(cert);
                }
            }
            let http = http
                .build()
                .map_err(|e| ConfigError::Invalid(format!("HTTP client for {}: {e}", j.issuer)))?;
            let discovered = DiscoveredKeys::new(
                DiscoveryOptions {
                    issuer: j.issuer.clone(),
                    max_age: j.refresh_interval,
                    min_refresh_interval: j.min_refresh_interval,
                },
                http,
            );
            (
                "OIDC discovery".to_string(),
                KeySource::Discovery(Arc::new(discovered)),
            )
        } else if let Some(tr) = &j.token_review {
            let reviewer = TokenReviewer::new(tr, j.audiences.clone())
                .map_err(|e| ConfigError::Invalid(format!("token_review for {}: {e}", j.issuer)))?;
            (
                format!("TokenReview at {}", tr.api_server),
                KeySource::TokenReview(Arc::new(reviewer)),
            )
        } else {
            return Err(ConfigError::Invalid(format!(
                "authn.jwt issuer {} has no key source",
                j.issuer
            ))
            .into());
        };
        info!(
            issuer = %j.issuer,
            audiences = ?j.audiences,
            cluster_id = j.cluster_id.as_deref().unwrap_or("<own cluster>"),
            %source,
            "trusting JWT issuer"
        );
        issuers.push(TrustedIssuer {
            issuer: j.issuer.clone(),
            audiences: j.audiences.clone(),
            keys,
            clock_skew: j.clock_skew,
            cluster_id: j.cluster_id.clone(),
        });
    }
    Ok(
        JwtAuthenticator::new(trust_domain.clone(), issuers).with_token_cache(TokenCacheOptions {
            ttl: config.authn.token_cache_ttl,
            max_entries: config.authn.token_cache_entries,
        }),
    )
}

fn read(path: &std::path::Path) -> Result<String, StartError> {
    std::fs::read_to_string(path).map_err(|source| StartError::KeyFile {
        path: path.to_path_buf(),
        source,
    })
}

/// The admin port's backlog (scrapes and probes; std's default).
const ADMIN_BACKLOG: u32 = 1024;

/// A listener on `addr` with `backlog` pending connections (the kernel caps
/// it at `net.core.somaxconn`), `SO_REUSEADDR` as std sets it.
pub(crate) fn bind(
    what: &'static str,
    addr: SocketAddr,
    backlog: u32,
) -> Result<TcpListener, StartError> {
    let err = |source| StartError::Bind { what, addr, source };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(backlog).map_err(err)
}

fn local_addr(
    what: &'static str,
    l: &TcpListener,
    addr: SocketAddr,
) -> Result<SocketAddr, StartError> {
    l.local_addr()
        .map_err(|source| StartError::Bind { what, addr, source })
}

/// A signer that is serving. Dropping it does not stop it; call
/// [`RunningSigner::shutdown`].
pub struct RunningSigner {
    grpc_addr: SocketAddr,
    admin_addr: SocketAddr,
    roots_pem: String,
    trust_domain: TrustDomain,
    issuer: Arc<dyn Issuer>,
    metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    bundle: crate::bundle::BundleChannel,
    bundle_endpoint: Option<SocketAddr>,
    ledger: Option<Arc<dyn crate::ledger::Ledger>>,
    tasks: Vec<JoinHandle<Result<(), String>>>,
    reloader: Reloader,
}

/// Applies a new configuration to a running signer (`SIGHUP`): the
/// issuance policy (`[policy]` TTLs, tiers, allowed key types) and
/// `authn.trusted_node_accounts` take effect for the next request, without
/// dropping a connection. Anything else that changed is reported as needing
/// a restart and keeps its running value. A configuration that does not
/// validate is refused whole: the running one stays.
#[derive(Clone)]
pub struct Reloader {
    live: crate::server::ca_service::LiveSettings,
    config: Arc<std::sync::Mutex<Config>>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader").finish_non_exhaustive()
    }
}

/// What [`Reloader::reload`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Live settings that changed and now apply.
    pub applied: Vec<&'static str>,
    /// Settings that changed but need a restart (their running values stay).
    pub need_restart: Vec<&'static str>,
}

impl Reloader {
    /// Apply `next` (already loaded from the same sources as at start).
    pub fn reload(&self, next: Config) -> Result<ReloadReport, ConfigError> {
        next.validate()?;
        let policy = next.issuance_policy()?;
        let mut running = self
            .config
            .lock()
            .map_err(|_| ConfigError::Invalid("configuration lock poisoned".into()))?;
        let mut applied = Vec::new();
        if next.policy != running.policy {
            applied.push("policy");
        }
        if next.authn.trusted_node_accounts != running.authn.trusted_node_accounts {
            applied.push("authn.trusted_node_accounts");
        }
        let mut need_restart = Vec::new();
        let p = (&next.policy, &running.policy);
        if p.0.rate_limit_burst != p.1.rate_limit_burst
            || p.0.rate_limit_interval != p.1.rate_limit_interval
            || p.0.kubernetes != p.1.kubernetes
            || p.0.namespace_label_cache != p.1.namespace_label_cache
        {
            need_restart
                .push("policy.rate_limit_*, policy.kubernetes, policy.namespace_label_cache");
        }
        let mut authn = next.authn.clone();
        authn.trusted_node_accounts = running.authn.trusted_node_accounts.clone();
        for (name, changed) in [
            ("trust_domain", next.trust_domain != running.trust_domain),
            ("server", next.server != running.server),
            ("ca", next.ca != running.ca),
            (
                "authn (other than trusted_node_accounts)",
                authn != running.authn,
            ),
            ("ledger", next.ledger != running.ledger),
            ("bundle", next.bundle != running.bundle),
            ("dashboard", next.dashboard != running.dashboard),
            ("revocation", next.revocation != running.revocation),
        ] {
            if changed {
                need_restart.push(name);
            }
        }
        self.live.set(crate::server::ca_service::Reloadable {
            policy,
            trusted_node_accounts: next.trusted_node_accounts(),
        });
        running.policy = next.policy.clone();
        running.authn.trusted_node_accounts = next.authn.trusted_node_accounts.clone();
        Ok(ReloadReport {
            applied,
            need_restart,
        })
    }
}

impl RunningSigner {
    /// Where the Istio CA API (gRPC over TLS) listens.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// Where `/healthz`, `/readyz`, `/metrics` listen.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The trust anchors, PEM (what clients use to verify the serving
    /// certificate and issued chains).
    pub fn roots_pem(&self) -> &str {
        &self.roots_pem
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The issuer backend in use.
    pub fn issuer(&self) -> &Arc<dyn Issuer> {
        &self.issuer
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The trust bundle channel (current bundle; rotation publishes here).
    pub fn bundle(&self) -> &crate::bundle::BundleChannel {
        &self.bundle
    }

    /// Where the HTTPS SPIFFE bundle endpoint listens, if `bundle.endpoint_addr` is set.
    pub fn bundle_endpoint(&self) -> Option<SocketAddr> {
        self.bundle_endpoint
    }

    /// The issuance ledger, unless `ledger.enabled = false`.
    pub fn ledger(&self) -> Option<&Arc<dyn crate::ledger::Ledger>> {
        self.ledger.as_ref()
    }

    /// Stop accepting, finish in-flight requests, and wait for both servers.
    pub async fn shutdown(self) -> Result<(), String> {
        let _ = self.shutdown.send(true);
        self.wait().await
    }

    /// Wait until both servers stop (after [`RunningSigner::shutdown`] or an error).
    pub async fn wait(self) -> Result<(), String> {
        let mut first_error = None;
        for t in self.tasks {
            let r = match t.await {
                Ok(r) => r,
                Err(e) => Err(e.to_string()),
            };
            if let (Err(e), None) = (r, &first_error) {
                first_error = Some(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// A handle that applies a new configuration (for `SIGHUP` in the
    /// binary, and tests).
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// A handle that stops the signer when `stop()` is called (for signal
    /// handlers in the binary).
    pub fn stopper(&self) -> Stopper {
        Stopper(self.shutdown.clone())
    }
}

/// Stops a [`RunningSigner`] from elsewhere.
#[derive(Clone)]
pub struct Stopper(watch::Sender<bool>);

impl Stopper {
    /// Ask the signer to stop.
    pub fn stop(&self) {
        let _ = self.0.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;
    use std::time::Duration;

    /// Binds with `backlog`, never accepts, and opens connections until one
    /// is not established within `timeout` or `max` are; how many were.
    async fn queued_connections(backlog: u32, max: usize, timeout: Duration) -> usize {
        let listener = bind("test", SocketAddr::from(([127, 0, 0, 1], 0)), backlog).unwrap();
        let addr = listener.local_addr().unwrap();
        let queued = tokio::task::spawn_blocking(move || {
            let mut open = Vec::new();
            while open.len() < max {
                match TcpStream::connect_timeout(&addr, timeout) {
                    Ok(s) => open.push(s),
                    Err(_) => break,
                }
            }
            open.len()
        })
        .await
        .unwrap();
        drop(listener);
        queued
    }

    /// A mass restart opens one connection per agent at once: those the
    /// accept loop has not reached yet must wait in the listen queue, not be
    /// dropped at SYN (the agent would retry only a second or more later).
    #[tokio::test]
    async fn connection_storm_within_the_listen_backlog_is_queued_not_dropped() {
        let queued = queued_connections(256, 200, Duration::from_secs(2)).await;
        assert_eq!(queued, 200, "connections dropped below the backlog");

        // The backlog is what bounds it: a queue of 4 turns the rest away.
        let queued = queued_connections(4, 50, Duration::from_millis(300)).await;
        assert!(queued < 50, "a backlog of 4 queued {queued} connections");
    }
}
