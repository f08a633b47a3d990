//! The gRPC edge: Istio's `IstioCertificateService` over TLS.
//!
//! [`ca_service::CaService`] runs the pipeline (authn → csr → policy →
//! issuer → observers) for each request; [`serving`] makes the TLS serving
//! certificate from the signer's own CA. [`admission`] takes
//! `server.max_concurrent_requests` before a request's body is read.

pub mod admission;
pub mod ca_service;
pub mod connections;
pub mod serving;
pub mod tls;
