//! The meshward signer: an Istio-compatible certificate authority for SPIFFE
//! workload certificates.
//!
//! Request pipeline, one module per stage: [`authn`] → [`csr`] → [`policy`]
//! → [`issuer`] → [`observer`] → response ([`server`]). [`admin`] serves
//! health and [`metrics`]; [`client`] is an istio-agent-like CA client for
//! tests, the demo and benchmarks.
//!
//! Start one with [`Signer::start`]:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let mut config = meshward_signer::config::Config::default();
//! config.server.grpc_addr = "127.0.0.1:0".parse()?;
//! config.server.admin_addr = "127.0.0.1:0".parse()?;
//! let signer = meshward_signer::Signer::start(config).await?;
//! println!("CA API on {}", signer.grpc_addr());
//! signer.shutdown().await?;
//! # Ok(()) }
//! ```

pub mod admin;
pub mod authn;
pub mod bundle;
pub mod client;
pub mod config;
pub mod csr;
pub mod dashboard;
pub mod issuer;
pub mod kube_api;
pub mod ledger;
pub mod metrics;
pub mod observer;
pub mod policy;
pub mod revocation;
pub mod runtime;
pub mod server;

pub use config::Config;
pub use runtime::{RunningSigner, Signer, StartError, Stopper};

/// PEM with LF line endings, as istiod, istio-csr and openssl write it (the
/// `pem` crate's default is CRLF). The root-certificate ConfigMap is compared
/// byte for byte by every writer: with CRLF, meshward and istiod (or
/// istio-csr) running side by side during a migration kept rewriting each
/// other's `istio-ca-root-cert`.
pub fn pem_encode(tag: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(tag, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// The integration tests' PostgreSQL fixture, for the store's unit tests.
#[cfg(test)]
#[path = "../tests/support/postgres.rs"]
mod test_postgres;
