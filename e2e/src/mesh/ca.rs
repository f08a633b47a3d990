//! A signer for the mesh: meshward's own signer with its built-in CA in a
//! data directory, trusting a service-account token issuer this module holds
//! (the part the Kubernetes API server plays in a cluster).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use meshward_signer::authn::keys::JwtAlgorithm;
use meshward_signer::bundle::rotation::CaDir;
use meshward_signer::client::token::TokenIssuer;
use meshward_signer::config::{Config, JwtIssuerConfig};
use meshward_signer::issuer::builtin::BuiltinOptions;
use meshward_signer::runtime::{RunningSigner, Signer};

/// The `iss` of the mesh's service-account tokens.
pub const TOKEN_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// A running signer plus the token issuer it trusts.
pub struct LocalSigner {
    running: Option<RunningSigner>,
    tokens: Arc<TokenIssuer>,
    data_dir: PathBuf,
    config: Config,
}

impl std::fmt::Debug for LocalSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSigner")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl LocalSigner {
    /// Starts a signer whose CA lives in `data_dir` (created on first start,
    /// loaded afterwards) on loopback ports, with a fresh token issuer.
    pub async fn start(data_dir: &Path, max_ttl: Duration) -> anyhow::Result<Self> {
        let tokens = Arc::new(TokenIssuer::generate(TOKEN_ISSUER, JwtAlgorithm::Es256)?);
        Self::start_with(data_dir, max_ttl, tokens).await
    }

    /// Starts a signer on `data_dir` trusting `tokens` (e.g. after a restart).
    pub async fn start_with(
        data_dir: &Path,
        max_ttl: Duration,
        tokens: Arc<TokenIssuer>,
    ) -> anyhow::Result<Self> {
        Self::start_configured(data_dir, max_ttl, tokens, |_| {}).await
    }

    /// Like [`Self::start_with`], with `tweak` applied to the signer's
    /// configuration last (kept across [`Self::restart`]).
    pub async fn start_configured(
        data_dir: &Path,
        max_ttl: Duration,
        tokens: Arc<TokenIssuer>,
        tweak: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        let key_file = data_dir.join("sa-signing-key.pub");
        tokens.write_public_key_pem(&key_file)?;
        let mut config = Config::default();
        config.server.grpc_addr = "127.0.0.1:0".parse()?;
        config.server.admin_addr = "127.0.0.1:0".parse()?;
        config.ca.data_dir = data_dir.to_path_buf();
        config.policy.max_ttl = max_ttl;
        config.policy.default_ttl = max_ttl;
        config.policy.backdate = Duration::from_secs(1);
        // Seconds-long certificates: the per-pod rate limit follows them
        // (at most a quarter of the TTL, as the signer requires).
        config.policy.rate_limit_interval = (max_ttl / 4).min(config.policy.rate_limit_interval);
        let mut issuer = JwtIssuerConfig::new(TOKEN_ISSUER);
        issuer.public_key_file = Some(key_file);
        config.authn.jwt = vec![issuer];
        tweak(&mut config);
        let running = Signer::start(config.clone())
            .await
            .context("starting the signer")?;
        Ok(Self {
            running: Some(running),
            tokens,
            data_dir: data_dir.to_path_buf(),
            config,
        })
    }

    fn running(&self) -> anyhow::Result<&RunningSigner> {
        self.running.as_ref().context("the signer is stopped")
    }

    /// The running signer (its live trust bundle, issuer, ledger).
    pub fn signer(&self) -> anyhow::Result<&RunningSigner> {
        self.running()
    }

    /// The built-in CA's data directory as rotation sees it (what
    /// `meshward-signer ca rotate-*` acts on).
    pub fn ca_dir(&self) -> CaDir {
        CaDir::new(BuiltinOptions {
            data_dir: self.config.ca.data_dir.clone(),
            key_algorithm: self.config.ca.key_algorithm,
            organization: self.config.trust_domain.clone(),
            root_ttl: self.config.ca.root_ttl,
            intermediate_ttl: self.config.ca.intermediate_ttl,
        })
    }

    /// The gRPC (Istio CA API) address.
    pub fn grpc_addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        Ok(self.running()?.grpc_addr())
    }

    /// The admin (HTTP) address.
    pub fn admin_addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        Ok(self.running()?.admin_addr())
    }

    /// The trust bundle (root certificates, PEM).
    pub fn roots_pem(&self) -> anyhow::Result<String> {
        Ok(self.running()?.roots_pem().to_owned())
    }

    /// The token issuer the signer trusts.
    pub fn tokens(&self) -> Arc<TokenIssuer> {
        self.tokens.clone()
    }

    /// Where the CA lives.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Stops the signer.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(r) = self.running.take() {
            r.shutdown().await.map_err(anyhow::Error::msg)?;
        }
        Ok(())
    }

    /// Stops and starts again on the same data directory (same CA, new ports).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        let running = Signer::start(self.config.clone())
            .await
            .context("restarting the signer")?;
        self.running = Some(running);
        Ok(())
    }
}
