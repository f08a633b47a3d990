//! `CreateCertificate`: the request pipeline and its refusals.
//!
//! Every refusal is a gRPC status whose message names the reason, and is
//! logged at `warn` with the caller (when known) and the reason. Nothing a
//! client sends can panic here: every parser returns an error.

use std::sync::Arc;
use std::time::Instant;

use meshward_proto::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use meshward_proto::auth::{IstioCertificateRequest, IstioCertificateResponse};
use sha2::{Digest, Sha256};
use spiffe::TrustDomain;
use time::OffsetDateTime;
use tonic::{Code, Request, Response, Status};
use tracing::{debug, info, warn};

use crate::authn::{
    AuthMethod, Authenticator, AuthnError, CallerIdentity, Credentials, bearer_token,
};
use crate::csr::{self, CsrError};
use crate::issuer::{IssueError, IssueRequest, IssuedChain, Issuer};
use crate::metrics::{Metrics, Outcome};
use crate::observer::{IssuanceEvent, IssuanceObserver};
use crate::policy::PolicyError;
use crate::policy::namespaces::NamespaceLabels;
use crate::policy::nodes::{NodeAuthorizer, NodeRefusal};
use crate::policy::rate::{AuthFailureLimit, AuthThrottled, IssuanceRateLimit};
use crate::policy::tiers::IssuancePolicy;

/// Request-metadata Struct key with which a node agent (ztunnel) asks for
/// another workload's certificate (Istio `security.ImpersonatedIdentity`).
pub const IMPERSONATED_IDENTITY_KEY: &str = "ImpersonatedIdentity";

/// Largest `CreateCertificate` request message decoded: a CSR at its limit
/// ([`csr::MAX_CSR_BYTES`]) plus metadata fits twice over. tonic's default is
/// 4 MiB, buffered per stream before the request reaches the service (and its
/// concurrency bound), so a few connections declaring 4 MiB messages on each
/// of their streams could hold gigabytes.
pub const MAX_REQUEST_MESSAGE_BYTES: usize = 2 * csr::MAX_CSR_BYTES;

/// A refused request: the gRPC code, the reason, and the metrics outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// gRPC status code.
    pub code: Code,
    /// Human-readable reason (sent to the client and logged).
    pub message: String,
    /// The metrics outcome when it is not the code's.
    outcome: Option<Outcome>,
}

impl Refusal {
    fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            outcome: None,
        }
    }

    fn outcome(&self) -> Outcome {
        if let Some(o) = self.outcome {
            return o;
        }
        match self.code {
            Code::Unauthenticated => Outcome::Unauthenticated,
            Code::PermissionDenied => Outcome::PermissionDenied,
            Code::InvalidArgument => Outcome::InvalidArgument,
            Code::ResourceExhausted => Outcome::ResourceExhausted,
            Code::Unavailable => Outcome::Unavailable,
            _ => Outcome::Internal,
        }
    }
}

impl From<AuthnError> for Refusal {
    fn from(e: AuthnError) -> Self {
        let code = match e {
            AuthnError::ReviewUnavailable(_) => Code::Unavailable,
            _ => Code::Unauthenticated,
        };
        Refusal::new(code, format!("authentication failed: {e}"))
    }
}

impl From<CsrError> for Refusal {
    fn from(e: CsrError) -> Self {
        let code = match e {
            CsrError::IdentityMismatch { .. } => Code::PermissionDenied,
            _ => Code::InvalidArgument,
        };
        Refusal::new(code, e.to_string())
    }
}

impl From<PolicyError> for Refusal {
    fn from(e: PolicyError) -> Self {
        let code = match e {
            PolicyError::NegativeTtl(_) => Code::InvalidArgument,
            PolicyError::IssuerNotValid { .. } => Code::Unavailable,
        };
        Refusal::new(code, e.to_string())
    }
}

impl From<IssueError> for Refusal {
    fn from(e: IssueError) -> Self {
        let code = match e {
            IssueError::Refused { .. } => Code::PermissionDenied,
            IssueError::Unavailable { .. } => Code::Unavailable,
            IssueError::Internal { .. } => Code::Internal,
        };
        Refusal::new(code, e.to_string())
    }
}

/// What a configuration reload changes in a running pipeline.
#[derive(Debug, Clone)]
pub struct Reloadable {
    /// TTL tiers and allowed key types.
    pub policy: IssuancePolicy,
    /// `(namespace, service account)` of node agents allowed to use
    /// `ImpersonatedIdentity`.
    pub trusted_node_accounts: Vec<(String, String)>,
}

/// The [`Reloadable`] settings in effect: each request takes them once at
/// its start, a reload swaps them for the next requests.
#[derive(Debug, Clone)]
pub struct LiveSettings(Arc<std::sync::RwLock<Arc<Reloadable>>>);

impl LiveSettings {
    /// Settings starting as `initial`.
    pub fn new(initial: Reloadable) -> Self {
        Self(Arc::new(std::sync::RwLock::new(Arc::new(initial))))
    }

    /// The settings in effect now.
    pub fn get(&self) -> Arc<Reloadable> {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replace them (requests already running keep the ones they took).
    pub fn set(&self, next: Reloadable) {
        match self.0.write() {
            Ok(mut g) => *g = Arc::new(next),
            Err(p) => *p.into_inner() = Arc::new(next),
        }
    }
}

/// Everything the pipeline needs.
pub struct CaPipeline {
    /// Trust domain of issued identities.
    pub trust_domain: TrustDomain,
    /// Who is calling.
    pub authenticator: Arc<dyn Authenticator>,
    /// Who signs.
    pub issuer: Arc<dyn Issuer>,
    /// The settings a reload (`SIGHUP`) may change: the TTL tiers and
    /// allowed key types, the trusted node agents.
    pub live: LiveSettings,
    /// Binds a node agent's `ImpersonatedIdentity` to its node; `None` only
    /// with `authn.unbound_node_agents`.
    pub node_authorizer: Option<Arc<dyn NodeAuthorizer>>,
    /// Issuance rate per pod; `None`: no limit.
    pub rate_limit: Option<IssuanceRateLimit>,
    /// Failed authentications per peer address; `None`: no limit.
    pub auth_failures: Option<AuthFailureLimit>,
    /// Namespace labels, for tiers with a `namespace_selector`.
    pub namespace_labels: Option<Arc<dyn NamespaceLabels>>,
    /// Run after each issuance.
    pub observers: Vec<Arc<dyn IssuanceObserver>>,
    /// Where revocations are kept (the ledger): a caller renewing with a
    /// revoked client certificate is refused. `None`: no ledger, nothing
    /// can be revoked.
    pub revocations: Option<Arc<dyn crate::ledger::Ledger>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// The tonic service. Mount it with [`CaService::into_server`], which puts
/// the in-flight limit in front of the body's decoding.
#[derive(Clone)]
pub struct CaService {
    pipeline: Arc<CaPipeline>,
}

/// A successful issuance.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The chain.
    pub chain: IssuedChain,
    /// The authenticated caller.
    pub caller: CallerIdentity,
}

impl CaService {
    /// The service around `pipeline`.
    pub fn new(pipeline: Arc<CaPipeline>) -> Self {
        Self { pipeline }
    }

    /// The gRPC service to mount: messages capped at
    /// [`MAX_REQUEST_MESSAGE_BYTES`], at most `max_in_flight` requests
    /// received or handled at once (admitted before their bodies are read;
    /// see [`super::admission`]).
    pub fn into_server(
        self,
        max_in_flight: usize,
    ) -> super::admission::Admitted<
        meshward_proto::auth::istio_certificate_service_server::IstioCertificateServiceServer<
            CaService,
        >,
    > {
        let metrics = self.pipeline.metrics.clone();
        super::admission::Admitted::new(
            IstioCertificateServiceServer::new(self)
                .max_decoding_message_size(MAX_REQUEST_MESSAGE_BYTES),
            max_in_flight,
            metrics,
        )
    }
}

impl CaPipeline {
    /// A client certificate the ledger holds as revoked is no credential:
    /// PERMISSION_DENIED, whoever presents it (the workload itself, a node
    /// agent, or whoever stole its key). A ledger that cannot answer
    /// refuses too (UNAVAILABLE): the issuance could not be recorded either.
    async fn refuse_revoked(&self, credentials: &Credentials) -> Result<(), Refusal> {
        let (Some(ledger), Some(leaf)) = (&self.revocations, credentials.peer_certificates.first())
        else {
            return Ok(());
        };
        let digest = crate::ledger::CertDigest::of(leaf.as_ref());
        match ledger.revocation(digest).await {
            Ok(None) => Ok(()),
            Ok(Some(r)) => Err(Refusal {
                outcome: Some(Outcome::Revoked),
                ..Refusal::new(
                    Code::PermissionDenied,
                    format!(
                        "client certificate sha256 {digest} (serial {}) was revoked at {} ({}); \
                         it is no renewal credential: authenticate with a service-account token",
                        r.serial,
                        r.revoked_at.unix_timestamp(),
                        r.reason
                    ),
                )
            }),
            Err(e) => Err(Refusal::new(
                Code::Unavailable,
                format!("cannot check the client certificate against the revocations: {e}"),
            )),
        }
    }

    /// Handle one request at `now`.
    pub async fn handle(
        &self,
        credentials: &Credentials,
        req: &IstioCertificateRequest,
        now: OffsetDateTime,
    ) -> Result<Issued, (Refusal, Option<CallerIdentity>)> {
        let caller = self
            .authenticator
            .authenticate(credentials, now.unix_timestamp())
            .await
            .map_err(|e| (Refusal::from(e), None))?;
        let with_caller = |r: Refusal| (r, Some(caller.clone()));
        let live = self.live.get();
        if caller.method == AuthMethod::ClientCertificate {
            self.refuse_revoked(credentials)
                .await
                .map_err(with_caller)?;
        }

        let target = self
            .target_identity(&caller, req, &live.trusted_node_accounts)
            .map_err(with_caller)?;
        if target.spiffe_id != caller.spiffe_id
            && let Some(nodes) = &self.node_authorizer
        {
            let node = nodes
                .authorize(&caller, &target.namespace, &target.service_account)
                .await
                .map_err(|e| {
                    with_caller(match e {
                        NodeRefusal::Denied(m) => Refusal::new(Code::PermissionDenied, m),
                        NodeRefusal::Unavailable(m) => Refusal::new(
                            Code::Unavailable,
                            format!("cannot check the node agent's node: {m}"),
                        ),
                    })
                })?;
            info!(
                node_agent = %caller.spiffe_id,
                impersonated = %target.spiffe_id,
                %node,
                "node agent's identity request is for a pod on its node"
            );
        }

        if let Some(limit) = &self.rate_limit
            && let Err(wait) = limit.check(
                &caller,
                &target.spiffe_id.to_string(),
                tokio::time::Instant::now(),
            )
        {
            return Err(with_caller(Refusal {
                outcome: Some(Outcome::RateLimited),
                ..Refusal::new(
                    Code::ResourceExhausted,
                    format!(
                        "pod {} asked for {} more often than policy.rate_limit_* allow; retry in {}s",
                        caller.pod.as_ref().map_or("?", |p| p.name.as_str()),
                        target.spiffe_id,
                        wait.as_secs().max(1)
                    ),
                )
            }));
        }

        let validated = csr::validate(req.csr.as_bytes()).map_err(|e| with_caller(e.into()))?;
        if validated.spiffe_id.trust_domain() != &self.trust_domain {
            return Err(with_caller(Refusal::new(
                Code::PermissionDenied,
                format!(
                    "CSR identity {} is outside trust domain {}",
                    validated.spiffe_id, self.trust_domain
                ),
            )));
        }
        validated
            .check_identity(&target.spiffe_id)
            .map_err(|e| with_caller(e.into()))?;

        let labels = if live.policy.needs_labels() {
            let source = self.namespace_labels.as_ref().ok_or_else(|| {
                with_caller(Refusal::new(
                    Code::Unavailable,
                    "policy tiers select by namespace label but no label source is configured",
                ))
            })?;
            Some(source.labels(&target.namespace).await.map_err(|e| {
                with_caller(Refusal::new(
                    Code::Unavailable,
                    format!("cannot read the labels that choose the policy tier: {e}"),
                ))
            })?)
        } else {
            None
        };
        let effective = live
            .policy
            .for_namespace(&target.namespace, labels.as_ref());
        effective
            .check_key(validated.key_kind)
            .map_err(|m| with_caller(Refusal::new(Code::InvalidArgument, m)))?;

        let validity = effective
            .ttl
            .validity(req.validity_duration, now, self.issuer.signing_validity())
            .map_err(|e| with_caller(e.into()))?;

        let issue = IssueRequest {
            csr_der: validated.der,
            spki_der: validated.spki_der,
            key_kind: validated.key_kind,
            spiffe_id: validated.spiffe_id,
            dns_names: Vec::new(),
            not_before: validity.not_before,
            not_after: validity.not_after,
        };
        let chain = self
            .issuer
            .sign(&issue)
            .await
            .map_err(|e| with_caller(e.into()))?;

        let event = issuance_event(&caller, &issue, &chain, self.issuer.name());
        for observer in &self.observers {
            observer.record(&event).await.map_err(|e| {
                with_caller(Refusal::new(
                    Code::Internal,
                    format!("issuance could not be recorded by {}: {e}", observer.name()),
                ))
            })?;
        }
        info!(
            spiffe_id = %issue.spiffe_id,
            serial = %event.serial_hex,
            sha256 = %event.sha256_hex,
            not_after = %validity.not_after,
            ttl_secs = validity.granted_ttl.as_secs(),
            requested_secs = req.validity_duration,
            clamped_to_max = validity.clamped_to_max,
            clamped_to_issuer = validity.clamped_to_issuer,
            key = issue.key_kind.name(),
            tier = %effective.tier,
            caller = %caller.spiffe_id,
            impersonated = target.spiffe_id != caller.spiffe_id,
            backend = self.issuer.name(),
            "issued certificate"
        );
        Ok(Issued { chain, caller })
    }
}

impl CaPipeline {
    /// Whose certificate this request is for: the caller's own, or — for a
    /// trusted node agent setting `ImpersonatedIdentity` — that identity.
    fn target_identity(
        &self,
        caller: &CallerIdentity,
        req: &IstioCertificateRequest,
        trusted_node_accounts: &[(String, String)],
    ) -> Result<CallerIdentity, Refusal> {
        let asked = req
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY_KEY))
            .map(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => s.clone(),
                _ => "<non-string>".to_string(),
            })
            .filter(|s| !s.is_empty());
        let Some(asked) = asked else {
            return Ok(caller.clone());
        };
        let trusted = trusted_node_accounts
            .iter()
            .any(|(ns, sa)| *ns == caller.namespace && *sa == caller.service_account);
        if !trusted {
            return Err(Refusal::new(
                Code::PermissionDenied,
                format!(
                    "{} may not request certificates for another identity ({IMPERSONATED_IDENTITY_KEY}={asked:?}): not a trusted node agent",
                    caller.spiffe_id
                ),
            ));
        }
        let id = csr::canonical_spiffe_id(&asked).map_err(|e| {
            Refusal::new(
                Code::InvalidArgument,
                format!("{IMPERSONATED_IDENTITY_KEY}: {e}"),
            )
        })?;
        if id.trust_domain() != &self.trust_domain {
            return Err(Refusal::new(
                Code::PermissionDenied,
                format!(
                    "{IMPERSONATED_IDENTITY_KEY} {id} is outside trust domain {}",
                    self.trust_domain
                ),
            ));
        }
        let segments: Vec<&str> = id.path().split('/').skip(1).collect();
        let ["ns", ns, "sa", sa] = segments.as_slice() else {
            return Err(Refusal::new(
                Code::InvalidArgument,
                format!("{IMPERSONATED_IDENTITY_KEY} {id} is not /ns/<ns>/sa/<sa>"),
            ));
        };
        let target =
            CallerIdentity::for_service_account(&self.trust_domain, ns, sa, caller.method.clone())
                .map_err(|e| Refusal::new(Code::InvalidArgument, e.to_string()))?;
        info!(
            node_agent = %caller.spiffe_id,
            impersonated = %target.spiffe_id,
            "trusted node agent requests a certificate for another identity"
        );
        Ok(target)
    }
}

fn issuance_event(
    caller: &CallerIdentity,
    req: &IssueRequest,
    chain: &IssuedChain,
    backend: &'static str,
) -> IssuanceEvent {
    use x509_parser::prelude::FromDer;
    let serial_hex = x509_parser::certificate::X509Certificate::from_der(&chain.leaf)
        .map(|(_, c)| hex::encode(c.raw_serial()))
        .unwrap_or_default();
    IssuanceEvent {
        caller: caller.clone(),
        spiffe_id: req.spiffe_id.clone(),
        serial_hex,
        sha256_hex: hex::encode(Sha256::digest(&chain.leaf)),
        leaf_der: chain.leaf.to_vec(),
        not_before: req.not_before,
        not_after: req.not_after,
        backend,
        key_kind: req.key_kind,
    }
}

/// Istio's response layout: leaf, then each intermediate as its own entry,
/// then every root concatenated in the last entry.
pub fn istio_chain(chain: &IssuedChain) -> Vec<String> {
    let mut out = Vec::with_capacity(chain.intermediates.len() + 2);
    out.push(to_pem(&chain.leaf));
    out.extend(chain.intermediates.iter().map(|c| to_pem(c)));
    out.push(chain.roots.iter().map(|c| to_pem(c)).collect::<String>());
    out
}

/// One certificate as PEM.
pub fn to_pem(der: &[u8]) -> String {
    crate::pem_encode("CERTIFICATE", der)
}

fn credentials_of<T>(request: &Request<T>) -> Credentials {
    let md = request.metadata();
    let bearer_token = md
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .map(str::to_string);
    let cluster_id = md
        .get("clusterid")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let peer_certificates = request
        .peer_certs()
        .map(|c| c.iter().cloned().collect())
        .unwrap_or_default();
    Credentials {
        bearer_token,
        peer_certificates,
        cluster_id,
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let metrics = &self.pipeline.metrics;
        let peer_addr = request.remote_addr();
        let peer = peer_addr.map(|a| a.to_string()).unwrap_or_default();
        let credentials = credentials_of(&request);
        let throttle = self
            .pipeline
            .auth_failures
            .as_ref()
            .zip(peer_addr.map(|a| a.ip()))
            .map(|(limit, ip)| {
                let key = AuthFailureLimit::credential_key(
                    credentials.bearer_token.as_deref(),
                    credentials.peer_certificates.first().map(|c| c.as_ref()),
                    ip,
                );
                (limit, key, ip)
            });
        if let Some((limit, key, ip)) = throttle
            && let Err(throttled) = limit.admit(key, ip, tokio::time::Instant::now())
        {
            metrics.request(Outcome::AuthThrottled);
            let (what, wait) = match throttled {
                AuthThrottled::Credential(wait) => ("with this credential".to_string(), wait),
                AuthThrottled::Address(wait) => (format!("from {ip}"), wait),
            };
            debug!(%peer, "refused: too many failed authentications {what}");
            return Err(Status::resource_exhausted(format!(
                "too many failed authentications {what}; retry in {}s",
                wait.as_secs().max(1)
            )));
        }
        let started = Instant::now();
        let req = request.into_inner();
        match self
            .pipeline
            .handle(&credentials, &req, OffsetDateTime::now_utc())
            .await
        {
            Ok(issued) => {
                metrics.request(Outcome::Issued);
                metrics.issuance_latency(started.elapsed().as_secs_f64());
                Ok(Response::new(IstioCertificateResponse {
                    cert_chain: istio_chain(&issued.chain),
                }))
            }
            Err((refusal, caller)) => {
                metrics.request(refusal.outcome());
                if refusal.code == Code::Unauthenticated
                    && let Some((limit, key, ip)) = throttle
                {
                    limit.failed(key, ip, tokio::time::Instant::now());
                }
                let caller = caller
                    .map(|c| c.spiffe_id.to_string())
                    .unwrap_or_else(|| "<unauthenticated>".to_string());
                warn!(
                    %peer,
                    %caller,
                    code = ?refusal.code,
                    reason = %refusal.message,
                    "refused CreateCertificate"
                );
                Err(Status::new(refusal.code, refusal.message))
            }
        }
    }
}
