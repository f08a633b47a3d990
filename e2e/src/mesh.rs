//! A one-machine mesh: the signer, sidecars on tokio + rustls that get
//! their certificates from it over the Istio CA API and run the filter, and
//! echo applications behind them.

pub mod backend;
pub mod ca;
mod io;
pub mod sidecar;
pub mod tls;

pub use ca::LocalSigner;
pub use sidecar::{CertInfo, MeshContext, MeshResponse, Sidecar, SidecarConfig, plaintext_request};
