//! The istio-agent part of a sidecar: a key and CSR per certificate, sent
//! to the signer over the Istio CA API with the workload's service-account
//! token; the answer written to SDS (`default` = leaf + intermediates and
//! key, `ROOTCA` = the roots of the answer's last entry, which carries the
//! signer's whole root set, plus any root pinned in the mesh's bundle);
//! rotation at a jittered 50–80 % of the lifetime, Envoy picking up the
//! new files without a restart.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use meshward_signer::client::token::TokenIssuer;
use meshward_signer::client::{CaClient, CallOptions, WorkloadKey, WorkloadKeyType};
use rand::Rng;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use spiffe::SpiffeId;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::sds::SdsDir;
use crate::mesh::CertInfo;
use crate::mesh::tls::root_ders;

/// Where an agent gets its certificates.
#[derive(Clone)]
pub struct CaAccess {
    /// The signer's gRPC address.
    pub grpc: std::net::SocketAddr,
    /// The bundle the agent verifies the signer with (and pins).
    pub roots_pem: String,
    /// Mints the workload's service-account token.
    pub tokens: Arc<TokenIssuer>,
}

impl std::fmt::Debug for CaAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaAccess")
            .field("grpc", &self.grpc)
            .finish_non_exhaustive()
    }
}

/// Who the workload is and how it asks.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// Trust domain.
    pub trust_domain: String,
    /// Requested lifetime.
    pub cert_ttl: Duration,
    /// Rotate between these fractions of the lifetime (within 0.5–0.8).
    pub rotate_between: (f64, f64),
    /// The mounted CRL (`ca-crl.pem` of the `istio-ca-crl` ConfigMap, or
    /// the signer's directory sink): watched, and put into `ROOTCA` so
    /// Envoy refuses revoked peers at the handshake.
    pub crl_file: Option<std::path::PathBuf>,
}

impl Workload {
    /// `cluster.local`, 24 h, rotation at 50–80 %.
    pub fn new(namespace: &str, service_account: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            trust_domain: "cluster.local".to_owned(),
            cert_ttl: Duration::from_secs(24 * 3600),
            rotate_between: (0.5, 0.8),
            crl_file: None,
        }
    }

    /// The SPIFFE ID.
    pub fn spiffe_id(&self) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// One issued identity: what the signer answered, in the forms Envoy and
/// rustls take.
#[derive(Clone)]
pub struct Identity {
    /// Leaf then intermediates, PEM.
    pub chain_pem: String,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The same for rustls.
    pub certified: Arc<CertifiedKey>,
    /// The leaf, DER.
    pub leaf: Vec<u8>,
    /// The roots of the answer's last entry.
    pub roots: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

/// Asks the signer for a certificate for `workload`, with a new P-256 key.
pub async fn issue(
    ca: &CaClient,
    tokens: &TokenIssuer,
    workload: &Workload,
) -> anyhow::Result<Identity> {
    let id = SpiffeId::new(workload.spiffe_id()).context("SPIFFE ID")?;
    let key = WorkloadKey::generate(WorkloadKeyType::EcdsaP256)?;
    let now = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs())?;
    let token = tokens.token_for(&workload.namespace, &workload.service_account, now)?;
    let opts = CallOptions {
        token: Some(token),
        validity_secs: i64::try_from(workload.cert_ttl.as_secs())?,
        cluster_id: Some("Kubernetes".to_owned()),
        impersonated_identity: None,
    };
    let issued = ca.request_certificate(&key, &id, &opts).await?;
    let mut chain = vec![issued.leaf.clone()];
    chain.extend(issued.intermediates.iter().cloned());
    let chain_pem: String = chain
        .iter()
        .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec())))
        .collect();
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.key_pair().serialize_der()));
    let signing = rustls::crypto::ring::sign::any_supported_type(&der)?;
    Ok(Identity {
        chain_pem,
        key_pem: key.private_key_pem(),
        certified: Arc::new(CertifiedKey::new(chain, signing)),
        leaf: issued.leaf.to_vec(),
        roots: issued.roots,
    })
}

/// PEM of a list of certificates.
pub fn certs_pem(certs: &[CertificateDer<'static>]) -> String {
    certs
        .iter()
        .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec())))
        .collect()
}

struct State {
    workload: Workload,
    sds: SdsDir,
    info: watch::Sender<Option<CertInfo>>,
    roots: watch::Sender<Vec<CertificateDer<'static>>>,
    chain: watch::Sender<Vec<CertificateDer<'static>>>,
    pinned: Vec<CertificateDer<'static>>,
    /// The CRL in `ROOTCA` now.
    crl: watch::Sender<Option<String>>,
}

impl State {
    /// Writes the trust bundle first (a new leaf may chain to a root the
    /// peers' Envoys need first), then the certificate.
    fn install(&self, identity: &Identity, generation: u64) -> anyhow::Result<CertInfo> {
        let mut roots = identity.roots.clone();
        for r in &self.pinned {
            if !roots.contains(r) {
                roots.push(r.clone());
            }
        }
        if *self.roots.borrow() != roots {
            self.sds
                .write_rootca(&certs_pem(&roots), self.crl.borrow().as_deref())?;
            tracing::info!(identity = %self.workload.spiffe_id(), roots = roots.len(), "ROOTCA written");
            self.roots.send_replace(roots);
        }
        self.sds
            .write_default(&identity.chain_pem, &identity.key_pem)?;
        self.chain.send_replace(identity.certified.cert.clone());
        let info = CertInfo::parse(&identity.leaf, generation)?;
        self.info.send_replace(Some(info.clone()));
        Ok(info)
    }
}

/// A running agent.
pub struct Agent {
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("identity", &self.state.workload.spiffe_id())
            .finish_non_exhaustive()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Agent {
    /// Gets the first certificate, writes both secrets, starts rotating.
    pub async fn start(workload: Workload, ca: &CaAccess, sds: SdsDir) -> anyhow::Result<Self> {
        let (lo, hi) = workload.rotate_between;
        anyhow::ensure!(
            (0.5..=0.8).contains(&lo) && (0.5..=0.8).contains(&hi) && lo <= hi,
            "rotate_between must lie within 0.5..=0.8, got {lo}..{hi}"
        );
        let client = CaClient::connect(ca.grpc, &ca.roots_pem, "localhost").await?;
        let first = issue(&client, &ca.tokens, &workload).await?;
        let pinned: Vec<_> = root_ders(&ca.roots_pem)?
            .into_iter()
            .filter(|r| !first.roots.contains(r))
            .collect();
        let state = Arc::new(State {
            workload,
            sds,
            info: watch::channel(None).0,
            roots: watch::channel(Vec::new()).0,
            chain: watch::channel(Vec::new()).0,
            pinned,
            crl: watch::channel(None).0,
        });
        if let Some(file) = &state.workload.crl_file {
            state.crl.send_replace(read_crl(file));
        }
        state.install(&first, 1)?;
        let rotate = tokio::spawn(rotate_loop(state.clone(), client, ca.tokens.clone()));
        let task = match state.workload.crl_file.clone() {
            Some(file) => {
                let state = state.clone();
                tokio::spawn(async move {
                    let crl = tokio::spawn(crl_loop(state, file));
                    let _ = rotate.await;
                    crl.abort();
                })
            }
            None => rotate,
        };
        Ok(Self { state, task })
    }

    /// The SPIFFE ID.
    pub fn spiffe_id(&self) -> String {
        self.state.workload.spiffe_id()
    }

    /// The certificate Envoy has now (as last written).
    pub fn cert(&self) -> Option<CertInfo> {
        self.state.info.borrow().clone()
    }

    /// The chain written to `default` last (leaf, then intermediates).
    pub fn presented_chain(&self) -> Vec<CertificateDer<'static>> {
        self.state.chain.borrow().clone()
    }

    /// The CRL written to `ROOTCA` last.
    pub fn crl(&self) -> Option<String> {
        self.state.crl.borrow().clone()
    }

    /// The roots written to `ROOTCA` last.
    pub fn trusted_roots(&self) -> Vec<CertificateDer<'static>> {
        self.state.roots.borrow().clone()
    }

    /// Waits (at most `limit`) until the certificate generation exceeds `after`.
    pub async fn wait_for_rotation(&self, after: u64, limit: Duration) -> anyhow::Result<CertInfo> {
        let mut rx = self.state.info.subscribe();
        let fut = rx.wait_for(|i| i.as_ref().is_some_and(|i| i.generation > after));
        let info = tokio::time::timeout(limit, fut)
            .await
            .context("no rotation in time")??
            .clone();
        info.context("no certificate")
    }
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
    (info.not_before + lifetime.mul_f64(frac))
        .duration_since(now)
        .unwrap_or_default()
}

async fn rotate_loop(state: Arc<State>, client: CaClient, tokens: Arc<TokenIssuer>) {
    loop {
        let Some(current) = state.info.borrow().clone() else {
            return;
        };
        tokio::time::sleep(rotation_delay(
            &current,
            state.workload.rotate_between,
            SystemTime::now(),
        ))
        .await;
        loop {
            let outcome = issue(&client, &tokens, &state.workload)
                .await
                .and_then(|identity| state.install(&identity, current.generation + 1));
            match outcome {
                Ok(info) => {
                    tracing::info!(identity = %state.workload.spiffe_id(), generation = info.generation, "certificate rotated");
                    break;
                }
                Err(e) => {
                    tracing::warn!(identity = %state.workload.spiffe_id(), "rotation failed, retrying: {e:#}")
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// The CRL file's PEM, if it holds one.
fn read_crl(file: &std::path::Path) -> Option<String> {
    std::fs::read_to_string(file)
        .ok()
        .filter(|t| t.contains("-----BEGIN X509 CRL-----"))
}

/// Re-writes `ROOTCA` whenever the mounted CRL changes (polled, as a
/// kubelet-updated ConfigMap volume would be).
async fn crl_loop(state: Arc<State>, file: std::path::PathBuf) {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = read_crl(&file);
        if now.is_none() || *state.crl.borrow() == now {
            continue;
        }
        let roots = state.roots.borrow().clone();
        match state.sds.write_rootca(&certs_pem(&roots), now.as_deref()) {
            Ok(()) => {
                tracing::info!(identity = %state.workload.spiffe_id(), "ROOTCA written with a new CRL");
                state.crl.send_replace(now);
            }
            Err(e) => tracing::warn!(error = %e, "writing ROOTCA with the CRL failed"),
        }
    }
}
