//! The signer's configuration: a TOML file (unknown keys refused) whose every
//! field has a default, so an empty file — or no file — runs the signer on
//! the embedded defaults shown in `config/defaults.toml`.
//!
//! Parsing gives [`Config`]; [`Config::validate`] checks what serde cannot
//! (trust domain syntax, TTL ordering). The binary applies flag and
//! environment overrides on top.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::issuer::builtin::CaKeyAlgorithm;
use crate::issuer::cacerts::CaCertsConfig;
use crate::issuer::vault::VaultConfig;
use crate::policy::TtlPolicy;
use crate::policy::tiers::{
    EffectivePolicy, IssuancePolicy, KeyType, NamespaceMatcher, Tier, TierConfig,
};

/// The embedded defaults, as a TOML document (what `Config::default()` is).
pub const DEFAULTS_TOML: &str = include_str!("config/defaults.toml");

/// Why a configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is invalid or has unknown keys.
    #[error("parsing config {origin}: {message}")]
    Parse {
        /// File name or `<inline>`.
        origin: String,
        /// What toml said (names the key and line).
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Complete signer configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// SPIFFE trust domain of issued identities (Istio's default: `cluster.local`).
    pub trust_domain: String,
    /// Network listeners.
    pub server: ServerConfig,
    /// The certificate authority backend.
    pub ca: CaConfig,
    /// Issuance policy.
    pub policy: PolicyConfig,
    /// Caller authentication.
    pub authn: AuthnConfig,
    /// The issuance ledger (`[ledger]`).
    pub ledger: crate::ledger::LedgerConfig,
    /// Trust bundle publication (`[bundle]`).
    pub bundle: crate::bundle::BundleConfig,
    /// The admin port's dashboard page (`[dashboard]`).
    pub dashboard: crate::dashboard::DashboardConfig,
    /// Revocation and the CRL (`[revocation]`).
    pub revocation: crate::revocation::RevocationConfig,
}

/// Listeners and the serving certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// gRPC (Istio CA API) over TLS. `127.0.0.1:0` picks a free port.
    pub grpc_addr: SocketAddr,
    /// Admin HTTP: `/healthz`, `/readyz`, `/metrics`.
    pub admin_addr: SocketAddr,
    /// DNS names in the gRPC serving certificate.
    pub dns_names: Vec<String>,
    /// Requests handled at once; beyond this, RESOURCE_EXHAUSTED at once.
    pub max_concurrent_requests: usize,
    /// Pending-connection queue of the gRPC listener (`listen(2)` backlog;
    /// the kernel caps it at `net.core.somaxconn`). When every agent of a
    /// node pool reconnects at once, connections beyond it are dropped at
    /// SYN and retried by the client a second or more later.
    pub listen_backlog: u32,
    /// Connections open on the gRPC port at once (TLS handshakes included).
    /// At the limit the signer stops accepting, so further connections wait
    /// in the listen backlog: a connection needs no credentials, and each
    /// costs ~35 KiB, so without a bound a flood of them is an OOM kill.
    pub max_connections: usize,
    /// Connections one address may hold at once; more are closed at
    /// accept. Without it one client (a compromised pod) could take every
    /// slot of `max_connections` and lock every agent out. A pod has its own
    /// address and an agent one connection; raise it where many clients
    /// share an address (SNAT in front of the signer).
    pub max_connections_per_ip: usize,
    /// Connections open on the admin port at once (kubelet probes,
    /// Prometheus, the filters' ledger lookups); beyond it they wait in the
    /// backlog. The port needs no credentials either.
    pub admin_max_connections: usize,
    /// Admin-port connections one address may hold (more are closed at
    /// accept), so one pod cannot take every slot — and with them the
    /// kubelet's probes.
    pub admin_max_connections_per_ip: usize,
    /// HTTP/2 streams (requests) open at once on one connection (advertised
    /// as SETTINGS_MAX_CONCURRENT_STREAMS; tonic's default is no limit). An
    /// istio-agent sends one request at a time; ztunnel, for the pods of its
    /// node, a few dozen.
    pub max_concurrent_streams: u32,
    /// A connection is sent GOAWAY this long after it was accepted (agents
    /// reconnect when they next need a certificate); `0s`: never.
    #[serde(with = "human")]
    pub max_connection_age: Duration,
    /// After `max_connection_age`, how long a connection may finish what it
    /// is doing (an issuance, a `WatchBundle` stream) before it is closed.
    #[serde(with = "human")]
    pub max_connection_age_grace: Duration,
    /// HTTP/2 ping interval on idle gRPC connections, to find peers that are
    /// gone without closing (a deleted node); `0s`: no pings.
    #[serde(with = "human")]
    pub keepalive_interval: Duration,
    /// A connection whose ping is not answered within this is closed.
    #[serde(with = "human")]
    pub keepalive_timeout: Duration,
    /// On shutdown, how long open gRPC connections get to finish (after
    /// GOAWAY) before they are closed. Keep it under the pod's
    /// `terminationGracePeriodSeconds` (30 s by default).
    #[serde(with = "human")]
    pub shutdown_drain: Duration,
    /// Validity of the serving certificate (re-made at each start).
    #[serde(with = "human")]
    pub serving_cert_ttl: Duration,
}

/// Which CA backend signs, and its settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaConfig {
    /// Backend name: `builtin`, `cacerts` (needs `[ca.cacerts]`) or `vault`
    /// (needs `[ca.vault]`).
    pub backend: String,
    /// Where the built-in CA keeps its root, intermediate and keys.
    pub data_dir: PathBuf,
    /// Key algorithm for a new built-in CA: `ecdsa-p256` or `rsa-2048`.
    pub key_algorithm: CaKeyAlgorithm,
    /// Validity of a new root.
    #[serde(with = "human")]
    pub root_ttl: Duration,
    /// Validity of a new intermediate.
    #[serde(with = "human")]
    pub intermediate_ttl: Duration,
    /// Istio plugged-in CA directory (`backend = "cacerts"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cacerts: Option<CaCertsConfig>,
    /// Vault / OpenBao PKI (`backend = "vault"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vault: Option<VaultConfig>,
}

/// TTL policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// TTL when the request's `validity_duration` is 0.
    #[serde(with = "human")]
    pub default_ttl: Duration,
    /// Longest TTL issued; longer requests are clamped to it.
    #[serde(with = "human")]
    pub max_ttl: Duration,
    /// How far notBefore is set in the past, for clock skew.
    #[serde(with = "human")]
    pub backdate: Duration,
    /// Key types accepted in CSRs (`p256`, `p384`, `ed25519`, `rsa`).
    pub allowed_key_types: Vec<KeyType>,
    /// Per-namespace tiers (`[[policy.tiers]]`); the first match wins.
    pub tiers: Vec<TierConfig>,
    /// API server for namespace labels (needed by tiers with a
    /// `namespace_selector`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubeApiConfig>,
    /// How long namespace labels are cached.
    #[serde(with = "human")]
    pub namespace_label_cache: Duration,
    /// Certificates one pod may ask for at once (per identity it asks for),
    /// before `rate_limit_interval` applies; 0 = no limit.
    pub rate_limit_burst: u32,
    /// After the burst, one more request per this long per pod and identity;
    /// `0s` = no limit. Past it: RESOURCE_EXHAUSTED before the CSR is parsed.
    #[serde(with = "human")]
    pub rate_limit_interval: Duration,
}

/// Authentication settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthnConfig {
    /// Service accounts (`<namespace>/<service-account>`) that may ask for
    /// another identity's certificate with the `ImpersonatedIdentity`
    /// request metadata (node agents such as `istio-system/ztunnel`; like
    /// istio-csr's `--ca-trusted-node-accounts`). Everyone else who sets it
    /// is refused.
    pub trusted_node_accounts: Vec<String>,
    /// Where a node agent's `ImpersonatedIdentity` is checked against its
    /// node: the identity needs a pod on the agent's node (istiod's node
    /// authorizer). Required with `trusted_node_accounts`, unless
    /// `unbound_node_agents`.
    pub node_authorization: Option<NodeAuthorizationConfig>,
    /// Let trusted node agents have any identity, on any node, without
    /// asking the API server (a cluster whose tokens name no pod, a test
    /// mesh). One compromised node agent then holds every identity.
    pub unbound_node_agents: bool,
    /// Accept a client certificate from this CA instead of a token (renewal
    /// over mTLS; the caller can only get its own identity again).
    pub mtls_renewal: bool,
    /// How long a token that verified is trusted again without verifying
    /// its signature (never past its own `exp`; TokenReview answers are not
    /// cached). `0s` turns the cache off.
    #[serde(with = "human")]
    pub token_cache_ttl: Duration,
    /// Most verified tokens remembered.
    pub token_cache_entries: usize,
    /// Failed authentications one credential (the bearer token, else the
    /// client certificate) may cause at once before `failure_limit_interval`
    /// applies; 0 = no limit.
    pub failure_limit_burst: u32,
    /// After the burst, one more failure per this long per credential;
    /// further requests with it are refused RESOURCE_EXHAUSTED before it is
    /// verified. Callers behind the same address with other credentials
    /// are not affected. `0s` = no limit.
    #[serde(with = "human")]
    pub failure_limit_interval: Duration,
    /// The coarse guard: failed authentications one peer address may cause
    /// at once (with any credentials) before `address_failure_limit_interval`
    /// applies — far above a healthy cluster, whose agents may all share an
    /// east-west gateway's address; 0 = no limit.
    pub address_failure_limit_burst: u32,
    /// After that burst, one more failure per this long per address.
    #[serde(with = "human")]
    pub address_failure_limit_interval: Duration,
    /// Trusted service-account token issuers (`[[authn.jwt]]`).
    pub jwt: Vec<JwtIssuerConfig>,
}

/// One trusted JWT issuer and where its keys come from: exactly one of
/// `jwks_file`, `public_key_file`, `oidc_discovery = true` or
/// `[authn.jwt.token_review]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtIssuerConfig {
    /// Required `iss` claim.
    pub issuer: String,
    /// Accepted audiences (`aud` must contain one).
    #[serde(default = "default_audiences")]
    pub audiences: Vec<String>,
    /// A JWKS file (`{"keys": [...]}`) with RSA or P-256 public keys.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// A PEM file with one or more public keys (`PUBLIC KEY`, RSA or P-256).
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
    /// Find the keys by OIDC discovery at
    /// `<issuer>/.well-known/openid-configuration` (cached; refetched on an
    /// unknown `kid`, at most once per `min_refresh_interval`).
    #[serde(default)]
    pub oidc_discovery: bool,
    /// PEM roots for HTTPS discovery / JWKS URLs (default: none, so an
    /// HTTPS issuer needs this).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Refetch discovered keys at least this often.
    #[serde(default = "default_refresh", with = "human")]
    pub refresh_interval: Duration,
    /// Never refetch discovered keys more often than this (kid floods).
    #[serde(default = "default_min_refresh", with = "human")]
    pub min_refresh_interval: Duration,
    /// Check tokens online with the Kubernetes TokenReview API.
    #[serde(default)]
    pub token_review: Option<TokenReviewConfig>,
    /// The cluster (istio-agent's `ClusterID` header) this issuer signs
    /// for; unset = the signer's own cluster. When any issuer sets one, a
    /// request is checked only against the issuers of the cluster it names.
    #[serde(default)]
    pub cluster_id: Option<String>,
    /// Allowed clock skew for `exp` / `nbf`.
    #[serde(default = "default_jwt_skew", with = "human")]
    pub clock_skew: Duration,
}

/// How to reach a Kubernetes API server.
pub type TokenReviewConfig = KubeApiConfig;

/// `[authn.node_authorization]`: the API server that says which node a node
/// agent's pod runs on and which pods run there (the signer needs `get` and
/// `list` on `pods`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeAuthorizationConfig {
    /// API server URL, e.g. `https://kubernetes.default.svc`.
    pub api_server: String,
    /// PEM CA bundle of the API server.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// File with the bearer token the signer calls the API with.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// How long a node's pod list (and an agent's node) is reused. A miss
    /// re-lists the node's pods once if the list is older than 1 s.
    #[serde(with = "human", default = "default_pod_cache")]
    pub pod_cache: Duration,
}

fn default_pod_cache() -> Duration {
    Duration::from_secs(5)
}

impl NodeAuthorizationConfig {
    /// The API connection part.
    pub fn kube_api(&self) -> KubeApiConfig {
        KubeApiConfig {
            api_server: self.api_server.clone(),
            ca_file: self.ca_file.clone(),
            token_file: self.token_file.clone(),
        }
    }
}

/// How to reach a Kubernetes API server (TokenReview, namespace labels).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeApiConfig {
    /// API server URL, e.g. `https://kubernetes.default.svc`.
    pub api_server: String,
    /// PEM CA bundle of the API server.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// File with the bearer token the signer calls the API with (its own
    /// service-account token, which needs `create` on `tokenreviews`).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

impl JwtIssuerConfig {
    /// An issuer with default audiences, skew and refresh settings and no
    /// key source yet (set one of the source fields).
    pub fn new(issuer: impl Into<String>) -> Self {
        Self {
            issuer: issuer.into(),
            audiences: default_audiences(),
            jwks_file: None,
            public_key_file: None,
            oidc_discovery: false,
            ca_file: None,
            refresh_interval: default_refresh(),
            min_refresh_interval: default_min_refresh(),
            token_review: None,
            cluster_id: None,
            clock_skew: default_jwt_skew(),
        }
    }

    /// How many key sources are set (must be exactly one).
    fn sources(&self) -> usize {
        usize::from(self.jwks_file.is_some())
            + usize::from(self.public_key_file.is_some())
            + usize::from(self.oidc_discovery)
            + usize::from(self.token_review.is_some())
    }
}

fn default_refresh() -> Duration {
    Duration::from_secs(HOUR)
}

fn default_min_refresh() -> Duration {
    Duration::from_secs(30)
}

fn default_audiences() -> Vec<String> {
    vec!["istio-ca".to_string()]
}

fn default_jwt_skew() -> Duration {
    Duration::from_secs(60)
}

const HOUR: u64 = 3600;

/// Highest `server.max_connections`: a million connections is ~35 GiB.
pub const MAX_CONNECTIONS: usize = 1_000_000;

impl Default for Config {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".to_string(),
            server: ServerConfig::default(),
            ca: CaConfig::default(),
            policy: PolicyConfig::default(),
            authn: AuthnConfig::default(),
            ledger: crate::ledger::LedgerConfig::default(),
            bundle: crate::bundle::BundleConfig::default(),
            dashboard: crate::dashboard::DashboardConfig::default(),
            revocation: crate::revocation::RevocationConfig::default(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            grpc_addr: SocketAddr::from(([0, 0, 0, 0], 15012)),
            admin_addr: SocketAddr::from(([0, 0, 0, 0], 15014)),
            dns_names: vec![
                "istiod.istio-system.svc".to_string(),
                "meshward-signer.istio-system.svc".to_string(),
                "localhost".to_string(),
            ],
            max_concurrent_requests: 256,
            listen_backlog: 4096,
            max_connections: 8192,
            max_connections_per_ip: 64,
            admin_max_connections: 4096,
            admin_max_connections_per_ip: 32,
            max_concurrent_streams: 100,
            max_connection_age: Duration::from_secs(30 * 60),
            max_connection_age_grace: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            shutdown_drain: Duration::from_secs(15),
            serving_cert_ttl: Duration::from_secs(30 * 24 * HOUR),
        }
    }
}

impl Default for CaConfig {
    fn default() -> Self {
        Self {
            backend: "builtin".to_string(),
            data_dir: PathBuf::from("meshward-signer-data"),
            key_algorithm: CaKeyAlgorithm::EcdsaP256,
            root_ttl: Duration::from_secs(10 * 365 * 24 * HOUR),
            intermediate_ttl: Duration::from_secs(365 * 24 * HOUR),
            cacerts: None,
            vault: None,
        }
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(24 * HOUR),
            max_ttl: Duration::from_secs(24 * HOUR),
            backdate: Duration::from_secs(60),
            allowed_key_types: KeyType::ALL.to_vec(),
            tiers: Vec::new(),
            kubernetes: None,
            namespace_label_cache: Duration::from_secs(60),
            rate_limit_burst: 10,
            rate_limit_interval: Duration::from_secs(60),
        }
    }
}

impl Default for AuthnConfig {
    fn default() -> Self {
        Self {
            trusted_node_accounts: Vec::new(),
            node_authorization: None,
            unbound_node_agents: false,
            mtls_renewal: true,
            token_cache_ttl: Duration::from_secs(60),
            token_cache_entries: 100_000,
            failure_limit_burst: 20,
            failure_limit_interval: Duration::from_secs(1),
            address_failure_limit_burst: 2000,
            address_failure_limit_interval: Duration::from_millis(10),
            jwt: vec![JwtIssuerConfig {
                public_key_file: Some(PathBuf::from("/var/run/meshward/sa-signing-key.pub")),
                ..JwtIssuerConfig::new("https://kubernetes.default.svc.cluster.local")
            }],
        }
    }
}

impl Config {
    /// Parse TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string(),
        })
    }

    /// Read and parse a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Render as TOML (for `--print-config` style output and docs).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| ConfigError::Invalid(e.to_string()))
    }

    /// Check what the types cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.revocation.validate().map_err(ConfigError::Invalid)?;
        spiffe::TrustDomain::new(&self.trust_domain).map_err(|e| {
            ConfigError::Invalid(format!("trust_domain {:?}: {e}", self.trust_domain))
        })?;
        if self.trust_domain.contains(':') || self.trust_domain.contains('/') {
            return Err(ConfigError::Invalid(format!(
                "trust_domain {:?} must be a bare name, not a SPIFFE ID",
                self.trust_domain
            )));
        }
        self.dashboard.validate().map_err(ConfigError::Invalid)?;
        let p = &self.policy;
        if p.default_ttl.is_zero() || p.max_ttl.is_zero() {
            return Err(ConfigError::Invalid(
                "policy.default_ttl and policy.max_ttl must be positive".to_string(),
            ));
        }
        if p.default_ttl > p.max_ttl {
            return Err(ConfigError::Invalid(format!(
                "policy.default_ttl ({}) is longer than policy.max_ttl ({})",
                humantime::format_duration(p.default_ttl),
                humantime::format_duration(p.max_ttl)
            )));
        }
        let policy = self.issuance_policy()?;
        if self.policy.rate_limit_burst > 0 && !self.policy.rate_limit_interval.is_zero() {
            let shortest = policy
                .tiers
                .iter()
                .map(|t| t.ttl.default_ttl)
                .chain([policy.base.ttl.default_ttl])
                .min()
                .unwrap_or(policy.base.ttl.default_ttl);
            if self.policy.rate_limit_interval > shortest / 4 {
                return Err(ConfigError::Invalid(format!(
                    "policy.rate_limit_interval {} is more than a quarter of the shortest default \
                     TTL ({}): agents rotating at half their TTL would be throttled",
                    humantime::format_duration(self.policy.rate_limit_interval),
                    humantime::format_duration(shortest)
                )));
            }
        }
        for a in &self.authn.trusted_node_accounts {
            match a.split_once('/') {
                Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {}
                _ => {
                    return Err(ConfigError::Invalid(format!(
                        "authn.trusted_node_accounts entry {a:?} is not <namespace>/<service-account>"
                    )));
                }
            }
        }
        if !self.authn.trusted_node_accounts.is_empty()
            && self.authn.node_authorization.is_none()
            && !self.authn.unbound_node_agents
        {
            return Err(ConfigError::Invalid(
                "authn.trusted_node_accounts needs [authn.node_authorization] (the API server \
                 that shows an impersonated identity has a pod on the node agent's node), or \
                 authn.unbound_node_agents = true to let a node agent have any identity on any \
                 node"
                    .to_string(),
            ));
        }
        if self.server.max_concurrent_requests == 0 {
            return Err(ConfigError::Invalid(
                "server.max_concurrent_requests must be at least 1".to_string(),
            ));
        }
        if !(1..=65_535).contains(&self.server.listen_backlog) {
            return Err(ConfigError::Invalid(format!(
                "server.listen_backlog {} must be between 1 and 65535",
                self.server.listen_backlog
            )));
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.server.max_connections) {
            return Err(ConfigError::Invalid(format!(
                "server.max_connections {} must be between 1 and {MAX_CONNECTIONS}",
                self.server.max_connections
            )));
        }
        if !(1..=1_000_000).contains(&self.bundle.max_watchers) {
            return Err(ConfigError::Invalid(format!(
                "bundle.max_watchers {} must be between 1 and 1000000",
                self.bundle.max_watchers
            )));
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.bundle.endpoint_max_connections) {
            return Err(ConfigError::Invalid(format!(
                "bundle.endpoint_max_connections {} must be between 1 and {MAX_CONNECTIONS}",
                self.bundle.endpoint_max_connections
            )));
        }
        for (name, value) in [
            ("admin_max_connections", self.server.admin_max_connections),
            (
                "admin_max_connections_per_ip",
                self.server.admin_max_connections_per_ip,
            ),
        ] {
            if !(1..=MAX_CONNECTIONS).contains(&value) {
                return Err(ConfigError::Invalid(format!(
                    "server.{name} {value} must be between 1 and {MAX_CONNECTIONS}"
                )));
            }
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.server.max_connections_per_ip) {
            return Err(ConfigError::Invalid(format!(
                "server.max_connections_per_ip {} must be between 1 and {MAX_CONNECTIONS}",
                self.server.max_connections_per_ip
            )));
        }
        if !(1..=10_000).contains(&self.server.max_concurrent_streams) {
            return Err(ConfigError::Invalid(format!(
                "server.max_concurrent_streams {} must be between 1 and 10000",
                self.server.max_concurrent_streams
            )));
        }
        if !self.server.keepalive_interval.is_zero() && self.server.keepalive_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "server.keepalive_timeout must be above 0s when keepalive_interval is set"
                    .to_string(),
            ));
        }
        match (self.ca.backend.as_str(), &self.ca.cacerts, &self.ca.vault) {
            ("builtin", _, _) | ("cacerts", Some(_), _) | ("vault", _, Some(_)) => {}
            ("cacerts" | "vault", _, _) => {
                return Err(ConfigError::Invalid(format!(
                    "ca.backend = {:?} needs a [ca.{}] section",
                    self.ca.backend, self.ca.backend
                )));
            }
            _ => {
                return Err(ConfigError::Invalid(format!(
                    "ca.backend {:?} is not known (known: builtin, cacerts, vault)",
                    self.ca.backend
                )));
            }
        }
        for (i, j) in self.authn.jwt.iter().enumerate() {
            if j.issuer.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "authn.jwt[{i}].issuer is empty"
                )));
            }
            if j.audiences.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "authn.jwt[{i}] ({}) has no audiences",
                    j.issuer
                )));
            }
            if j.sources() != 1 {
                return Err(ConfigError::Invalid(format!(
                    "authn.jwt[{i}] ({}) needs exactly one of jwks_file, public_key_file, oidc_discovery = true, token_review",
                    j.issuer
                )));
            }
            if self
                .authn
                .jwt
                .iter()
                .take(i)
                .any(|o| o.issuer == j.issuer && o.cluster_id == j.cluster_id)
            {
                return Err(ConfigError::Invalid(format!(
                    "authn.jwt[{i}]: issuer {} is configured twice for the same cluster",
                    j.issuer
                )));
            }
        }
        Ok(())
    }
}

impl Config {
    /// Compile the issuance policy (base + tiers), checking each tier.
    pub fn issuance_policy(&self) -> Result<IssuancePolicy, ConfigError> {
        let p = &self.policy;
        if p.allowed_key_types.is_empty() {
            return Err(ConfigError::Invalid(
                "policy.allowed_key_types is empty: nothing could be issued".to_string(),
            ));
        }
        let base_ttl = TtlPolicy::from(p);
        let base = EffectivePolicy {
            tier: "default".to_string(),
            ttl: base_ttl,
            allowed_keys: p.allowed_key_types.iter().copied().collect(),
        };
        let mut tiers = Vec::new();
        for (i, t) in p.tiers.iter().enumerate() {
            let ttl = TtlPolicy {
                default_ttl: t.default_ttl.unwrap_or(base_ttl.default_ttl),
                max_ttl: t.max_ttl.unwrap_or(base_ttl.max_ttl),
                backdate: base_ttl.backdate,
            };
            let name = if t.name.is_empty() {
                format!("#{i}")
            } else {
                t.name.clone()
            };
            if ttl.default_ttl.is_zero() || ttl.default_ttl > ttl.max_ttl {
                return Err(ConfigError::Invalid(format!(
                    "policy tier {name}: default_ttl {} must be positive and at most max_ttl {}",
                    humantime::format_duration(ttl.default_ttl),
                    humantime::format_duration(ttl.max_ttl)
                )));
            }
            if t.namespaces.is_empty() && t.namespace_selector.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "policy tier {name} has neither namespaces nor a namespace_selector"
                )));
            }
            if !t.namespace_selector.is_empty() && p.kubernetes.is_none() {
                return Err(ConfigError::Invalid(format!(
                    "policy tier {name} selects namespaces by label: set [policy.kubernetes] so labels can be read"
                )));
            }
            let allowed_keys: std::collections::BTreeSet<KeyType> = t
                .allowed_key_types
                .as_ref()
                .map(|v| v.iter().copied().collect())
                .unwrap_or_else(|| base.allowed_keys.clone());
            if allowed_keys.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "policy tier {name}: allowed_key_types is empty"
                )));
            }
            tiers.push(Tier {
                name,
                namespaces: NamespaceMatcher::new(&t.namespaces),
                selector: t.namespace_selector.clone(),
                ttl,
                allowed_keys,
            });
        }
        Ok(IssuancePolicy { base, tiers })
    }

    /// Trusted node accounts as `(namespace, service account)` pairs.
    pub fn trusted_node_accounts(&self) -> Vec<(String, String)> {
        self.authn
            .trusted_node_accounts
            .iter()
            .filter_map(|a| a.split_once('/'))
            .map(|(ns, sa)| (ns.to_string(), sa.to_string()))
            .collect()
    }
}

/// serde for `Option<Duration>` as humantime strings.
pub(crate) mod human_opt {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("duration {text:?}: {e}")))
    }
}

/// serde for `Duration` as humantime strings (`"24h"`, `"90s"`, `"1h 30m"`).
pub(crate) mod human {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("duration {text:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_file_is_the_default() {
        let parsed = Config::from_toml(DEFAULTS_TOML, "defaults.toml").unwrap();
        assert_eq!(parsed, Config::default());
        parsed.validate().unwrap();
    }

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(Config::from_toml("", "empty").unwrap(), Config::default());
    }

    #[test]
    fn unknown_key_is_refused() {
        let err = Config::from_toml("[policy]\nmax_tll = \"1h\"\n", "typo").unwrap_err();
        assert!(err.to_string().contains("max_tll"), "{err}");
    }

    #[test]
    fn default_ttl_above_max_is_refused() {
        let c = Config::from_toml(
            "[policy]\ndefault_ttl = \"48h\"\nmax_ttl = \"24h\"\n",
            "inline",
        )
        .unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn a_rate_limit_slower_than_rotation_is_refused() {
        let err = Config::from_toml(
            "[policy]\ndefault_ttl = \"1h\"\nmax_ttl = \"1h\"\nrate_limit_interval = \"20m\"\n",
            "inline",
        )
        .unwrap()
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("rate_limit_interval"), "{err}");
        Config::from_toml(
            "[policy]\ndefault_ttl = \"1h\"\nmax_ttl = \"1h\"\nrate_limit_interval = \"15m\"\n",
            "inline",
        )
        .unwrap()
        .validate()
        .unwrap();
        // Off: no constraint.
        Config::from_toml(
            "[policy]\ndefault_ttl = \"1h\"\nmax_ttl = \"1h\"\nrate_limit_burst = 0\nrate_limit_interval = \"2h\"\n",
            "inline",
        )
        .unwrap()
        .validate()
        .unwrap();
    }

    #[test]
    fn trusted_node_agents_need_node_binding_or_an_explicit_opt_out() {
        let base = "[authn]\ntrusted_node_accounts = [\"istio-system/ztunnel\"]\n";
        let err = Config::from_toml(base, "inline")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(
            err.to_string().contains("authn.node_authorization"),
            "{err}"
        );
        let opted_out = format!("{base}unbound_node_agents = true\n");
        Config::from_toml(&opted_out, "inline")
            .unwrap()
            .validate()
            .unwrap();
        let bound = format!(
            "{base}[authn.node_authorization]\napi_server = \"https://kubernetes.default.svc\"\n"
        );
        let c = Config::from_toml(&bound, "inline").unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.authn.node_authorization.unwrap().pod_cache,
            Duration::from_secs(5)
        );
    }

    #[test]
    fn max_connections_of_zero_or_absurd_and_keepalive_without_timeout_are_refused() {
        for bad in [0, 10_001] {
            let err = Config::from_toml(
                &format!("[server]\nmax_concurrent_streams = {bad}\n"),
                "inline",
            )
            .unwrap()
            .validate()
            .unwrap_err();
            assert!(err.to_string().contains("max_concurrent_streams"), "{err}");
        }
        for bad in [0, MAX_CONNECTIONS + 1] {
            let err = Config::from_toml(
                &format!("[server]\nmax_connections_per_ip = {bad}\n"),
                "inline",
            )
            .unwrap()
            .validate()
            .unwrap_err();
            assert!(err.to_string().contains("max_connections_per_ip"), "{err}");
            let err = Config::from_toml(&format!("[server]\nmax_connections = {bad}\n"), "inline")
                .unwrap()
                .validate()
                .unwrap_err();
            assert!(err.to_string().contains("max_connections"), "{err}");
            let err = Config::from_toml(
                &format!("[bundle]\nendpoint_max_connections = {bad}\n"),
                "inline",
            )
            .unwrap()
            .validate()
            .unwrap_err();
            assert!(
                err.to_string().contains("endpoint_max_connections"),
                "{err}"
            );
            if bad == 0 {
                let err = Config::from_toml("[bundle]\nmax_watchers = 0\n", "inline")
                    .unwrap()
                    .validate()
                    .unwrap_err();
                assert!(err.to_string().contains("max_watchers"), "{err}");
            }
            for name in ["admin_max_connections", "admin_max_connections_per_ip"] {
                let err = Config::from_toml(&format!("[server]\n{name} = {bad}\n"), "inline")
                    .unwrap()
                    .validate()
                    .unwrap_err();
                assert!(err.to_string().contains(name), "{err}");
            }
        }
        let err = Config::from_toml(
            "[server]\nkeepalive_interval = \"10s\"\nkeepalive_timeout = \"0s\"\n",
            "inline",
        )
        .unwrap()
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("keepalive_timeout"), "{err}");
        let off = Config::from_toml(
            "[server]\nkeepalive_interval = \"0s\"\nmax_connection_age = \"0s\"\n",
            "inline",
        )
        .unwrap();
        off.validate().unwrap();
    }

    #[test]
    fn listen_backlog_outside_the_kernel_range_is_refused() {
        for bad in [0, 65_536] {
            let c = Config::from_toml(&format!("[server]\nlisten_backlog = {bad}\n"), "inline")
                .unwrap();
            let err = c.validate().unwrap_err();
            assert!(err.to_string().contains("listen_backlog"), "{err}");
        }
    }

    #[test]
    fn tiers_choose_ttl_and_keys_by_namespace() {
        let c = Config::from_toml(
            r#"
[policy]
default_ttl = "24h"
max_ttl = "24h"
[[policy.tiers]]
name = "critical"
namespaces = ["payments"]
default_ttl = "12h"
max_ttl = "12h"
allowed_key_types = ["p256"]
[[policy.tiers]]
name = "dev"
namespaces = ["dev-*"]
default_ttl = "24h"
max_ttl = "7d"
"#,
            "inline",
        )
        .unwrap();
        c.validate().unwrap();
        let p = c.issuance_policy().unwrap();
        let policy = p;
        let p = |ns: &str| policy.for_namespace(ns, None);
        assert_eq!(p("payments").tier, "critical");
        assert_eq!(p("payments").ttl.max_ttl, Duration::from_secs(12 * 3600));
        assert_eq!(p("dev-bob").ttl.max_ttl, Duration::from_secs(7 * 86400));
        assert_eq!(p("default").tier, "default");
        assert!(
            p("payments")
                .check_key(crate::issuer::KeyKind::Rsa { bits: 2048 })
                .is_err()
        );
        assert!(
            p("default")
                .check_key(crate::issuer::KeyKind::Rsa { bits: 2048 })
                .is_ok()
        );
        let text = c.to_toml().unwrap();
        assert_eq!(Config::from_toml(&text, "rt").unwrap(), c);
    }

    #[test]
    fn malformed_trusted_node_account_is_refused() {
        let c = Config::from_toml("[authn]\ntrusted_node_accounts = [\"ztunnel\"]\n", "inline")
            .unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn round_trips_through_toml() {
        let c = Config::default();
        let text = c.to_toml().unwrap();
        assert_eq!(Config::from_toml(&text, "rt").unwrap(), c);
    }
}
