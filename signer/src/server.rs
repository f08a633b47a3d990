//! The gRPC edge: Istio's `IstioCertificateService` over TLS.
//!
//! [`ca_service::CaService`] runs the pipeline (authn → csr → policy →
//! issuer → observers) for each request; [`serving`] makes the TLS serving
//! certificate from the signer's own CA.

pub mod ca_service;
pub mod connections;
pub mod serving;
pub mod tls;
