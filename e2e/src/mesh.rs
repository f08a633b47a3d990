//! The parts of the one-machine mesh that are not Envoy: the signer with
//! its token issuer, the echo app behind each sidecar, rustls plumbing for
//! callers that dial mTLS themselves, and what a caller sees. The sidecars
//! themselves are real Envoys (`crate::envoy`).

pub mod backend;
pub mod ca;
pub mod tls;
mod types;

pub use ca::LocalSigner;
pub use types::{CertInfo, MeshResponse};
