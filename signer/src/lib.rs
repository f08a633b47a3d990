//! The meshward signer: an Istio-compatible certificate authority for SPIFFE
//! workload certificates.
//!
//! Request pipeline, one module per stage: `authn` → `csr` → `policy` →
//! [`issuer`] → response.

pub mod issuer;
