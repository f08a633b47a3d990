//! A kube-rs client for the Kubernetes API server, built from the signer's
//! config (URL, CA file, bearer-token file). Used by TokenReview and by
//! namespace-label lookups for policy tiers.

use crate::config::KubeApiConfig;

/// Build a client for `cfg`.
pub fn client(cfg: &KubeApiConfig) -> Result<kube::Client, String> {
    let uri: http::Uri = cfg
        .api_server
        .parse()
        .map_err(|e| format!("api_server {:?}: {e}", cfg.api_server))?;
    let mut config = kube::Config::new(uri);
    if let Some(path) = &cfg.ca_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        let roots = pem::parse_many(text.as_bytes())
            .map_err(|e| format!("{}: {e}", path.display()))?
            .into_iter()
            .map(|p| p.into_contents())
            .collect();
        config.root_cert = Some(roots);
    }
    if let Some(path) = &cfg.token_file {
        let token = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        config.auth_info.token = Some(token.trim().to_string().into());
    }
    config.connect_timeout = Some(std::time::Duration::from_secs(5));
    config.read_timeout = Some(std::time::Duration::from_secs(10));
    kube::Client::try_from(config).map_err(|e| e.to_string())
}
