//! Hooks run after every issuance, before the response is sent: the ledger
//! (certificate digest → identity and validity) plugs in here.

use std::future::Future;
use std::pin::Pin;

use spiffe::SpiffeId;
use time::OffsetDateTime;

use crate::authn::CallerIdentity;
use crate::issuer::KeyKind;

/// One issued certificate.
#[derive(Debug, Clone)]
pub struct IssuanceEvent {
    /// Who asked (for impersonation, the node agent).
    pub caller: CallerIdentity,
    /// The identity in the certificate.
    pub spiffe_id: SpiffeId,
    /// Serial number, lowercase hex.
    pub serial_hex: String,
    /// SHA-256 of the leaf DER, lowercase hex (Envoy's
    /// `connection.sha256_peer_certificate_digest`).
    pub sha256_hex: String,
    /// The leaf DER.
    pub leaf_der: Vec<u8>,
    /// notBefore.
    pub not_before: OffsetDateTime,
    /// notAfter.
    pub not_after: OffsetDateTime,
    /// Backend that signed (`builtin`, ...).
    pub backend: &'static str,
    /// Key type of the certificate.
    pub key_kind: KeyKind,
}

/// The future returned by [`IssuanceObserver::record`].
pub type ObserveFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// Something that must know about every issuance. An error fails the request
/// (INTERNAL): a certificate that could not be recorded is not handed out.
pub trait IssuanceObserver: Send + Sync {
    /// Name for logs.
    fn name(&self) -> &'static str;
    /// Record one issuance.
    fn record<'a>(&'a self, event: &'a IssuanceEvent) -> ObserveFuture<'a>;
}
