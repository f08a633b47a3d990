//! Generated gRPC types for the APIs meshward speaks.
//!
//! - [`istio::v1::auth`]: Istio's `IstioCertificateService` (the CA API that
//!   istio-agent and ztunnel call), wire-compatible with `istio/api`
//!   `security/v1alpha1/ca.proto`.
//! - [`meshward::v1`]: meshward's own API, `TrustBundleService/WatchBundle`
//!   (server-streaming trust bundle).

/// Istio's protobuf packages.
pub mod istio {
    /// `istio.v1`
    pub mod v1 {
        /// `istio.v1.auth`: the certificate service.
        #[allow(clippy::all, clippy::pedantic, missing_docs)]
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }
}

pub use istio::v1::auth;

/// meshward's own protobuf packages.
pub mod meshward {
    /// `meshward.v1`: trust bundle distribution.
    #[allow(clippy::all, clippy::pedantic, missing_docs)]
    pub mod v1 {
        tonic::include_proto!("meshward.v1");
    }
}
