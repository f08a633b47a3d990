//! Online token checks with the Kubernetes TokenReview API
//! (`authentication.k8s.io/v1`), for clusters whose tokens must be checked by
//! the API server — e.g. bound tokens, which it refuses once their pod is
//! gone. Uses kube-rs.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

use super::AuthnError;
use crate::config::TokenReviewConfig;

/// Calls TokenReview on one API server.
#[derive(Clone)]
pub struct TokenReviewer {
    api: Api<TokenReview>,
    audiences: Vec<String>,
    api_server: String,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("api_server", &self.api_server)
            .field("audiences", &self.audiences)
            .finish_non_exhaustive()
    }
}

/// The service account an API server vouched for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewedAccount {
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
}

impl TokenReviewer {
    /// A reviewer for `cfg`, asking the API server to check `audiences`.
    pub fn new(cfg: &TokenReviewConfig, audiences: Vec<String>) -> Result<Self, String> {
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
        let client = kube::Client::try_from(config).map_err(|e| e.to_string())?;
        Ok(Self {
            api: Api::all(client),
            audiences,
            api_server: cfg.api_server.clone(),
        })
    }

    /// Ask the API server about `token`.
    pub async fn review(&self, token: &str) -> Result<ReviewedAccount, AuthnError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(self.audiences.clone()),
            },
            ..TokenReview::default()
        };
        let answer = self
            .api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthnError::ReviewUnavailable(format!("{}: {e}", self.api_server)))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AuthnError::Rejected(
                status
                    .error
                    .unwrap_or_else(|| "not authenticated".to_string()),
            ));
        }
        if let Some(auds) = &status.audiences
            && !auds.iter().any(|a| self.audiences.contains(a))
        {
            return Err(AuthnError::WrongAudience {
                found: auds.clone(),
                expected: self.audiences.clone(),
            });
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        let account = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'));
        match account {
            Some((ns, sa)) => Ok(ReviewedAccount {
                namespace: ns.to_string(),
                service_account: sa.to_string(),
            }),
            None => Err(AuthnError::NoIdentity(format!(
                "the API server authenticated {username:?}, not a service account"
            ))),
        }
    }
}
