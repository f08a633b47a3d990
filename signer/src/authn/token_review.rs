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
        let client = crate::kube_api::client(cfg)?;
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
