//! Pre-generated client material: keys, CSRs and identities made before any
//! clock starts, so the load generator measures the signer, not itself.

use anyhow::Context;
use meshward_signer::client::token::TokenIssuer;
use meshward_signer::client::{WorkloadKey, WorkloadKeyType};
use serde::{Deserialize, Serialize};
use spiffe::SpiffeId;

/// The key type of the workloads' CSRs (and of the CA that signs them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    /// ECDSA P-256.
    P256,
    /// RSA-2048.
    Rsa2048,
}

impl KeyType {
    /// How the report names it.
    pub fn label(self) -> &'static str {
        match self {
            KeyType::P256 => "P-256",
            KeyType::Rsa2048 => "RSA-2048",
        }
    }

    fn workload(self) -> WorkloadKeyType {
        match self {
            KeyType::P256 => WorkloadKeyType::EcdsaP256,
            KeyType::Rsa2048 => WorkloadKeyType::Rsa2048,
        }
    }

    /// The matching CA key algorithm.
    pub fn ca_key(self) -> meshward_signer::issuer::builtin::CaKeyAlgorithm {
        use meshward_signer::issuer::builtin::CaKeyAlgorithm;
        match self {
            KeyType::P256 => CaKeyAlgorithm::EcdsaP256,
            KeyType::Rsa2048 => CaKeyAlgorithm::Rsa2048,
        }
    }
}

/// One simulated workload: its service account and its CSR.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// The CSR (PEM), as istio-agent makes it.
    pub csr_pem: String,
}

impl Workload {
    /// A service-account token the signer accepts, valid for an hour.
    pub fn token(&self, tokens: &TokenIssuer) -> anyhow::Result<String> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        tokens
            .token_for(&self.namespace, &self.service_account, now)
            .map_err(|e| anyhow::anyhow!("minting a token: {e}"))
    }
}

/// The identity of workload `i`: 64 namespaces, one service account each.
pub fn identity(i: usize) -> (String, String) {
    (format!("bench-{}", i % 64), format!("sa-{i}"))
}

/// `count` workloads with `kind` CSRs. P-256 workloads each have their own
/// key; RSA-2048 ones share `rsa_pool` keys (RSA key generation takes
/// ~100 ms each and the signer's cost does not depend on which key it is),
/// each with its own CSR for its own identity.
pub fn generate(kind: KeyType, count: usize, rsa_pool: usize) -> anyhow::Result<Vec<Workload>> {
    let pool_size = match kind {
        KeyType::P256 => 0,
        KeyType::Rsa2048 => rsa_pool.clamp(1, count.max(1)),
    };
    let mut pool = Vec::with_capacity(pool_size);
    for _ in 0..pool_size {
        pool.push(WorkloadKey::generate(kind.workload()).map_err(|e| anyhow::anyhow!("{e}"))?);
    }
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let (namespace, service_account) = identity(i);
        let id = SpiffeId::new(format!(
            "spiffe://cluster.local/ns/{namespace}/sa/{service_account}"
        ))
        .with_context(|| format!("SPIFFE ID for workload {i}"))?;
        let csr_pem = match pool.get(i % pool_size.max(1)) {
            Some(key) => key.csr_pem(&id),
            None => WorkloadKey::generate(kind.workload()).and_then(|k| k.csr_pem(&id)),
        }
        .map_err(|e| anyhow::anyhow!("CSR for workload {i}: {e}"))?;
        out.push(Workload {
            namespace,
            service_account,
            csr_pem,
        });
    }
    Ok(out)
}
