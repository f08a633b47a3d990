//! Issuer backends: the seam between "this request is allowed" and "here is a
//! signed chain".
//!
//! Everything before this seam (authentication, CSR checks, TTL policy) is
//! backend-independent. A backend receives an [`IssueRequest`] that has
//! already been validated — the CSR's self-signature verified, its key type
//! allowed, its identity equal to the caller's — and returns an
//! [`IssuedChain`]. Backends:
//!
//! - [`builtin`]: a self-signed root + intermediate made with rcgen and kept
//!   in a data directory.
//! - `cacerts` (Istio's plugged-in CA layout) and `vault` (Vault / OpenBao PKI)
//!   plug in here behind the same trait.

pub mod builtin;
pub mod cacerts;
pub mod vault;

use std::future::Future;
use std::pin::Pin;

use rustls_pki_types::CertificateDer;
use spiffe::SpiffeId;
use time::OffsetDateTime;

/// What the signer asks a backend to sign. Built by the request pipeline only
/// after authentication, CSR validation and policy have passed.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// The CSR exactly as received (DER), already verified. Backends that
    /// forward a CSR (e.g. Vault `sign-verbatim`) send this; backends that
    /// sign locally use only [`IssueRequest::spki_der`].
    pub csr_der: Vec<u8>,
    /// The CSR's SubjectPublicKeyInfo (DER): the only thing taken from the CSR
    /// by local backends.
    pub spki_der: Vec<u8>,
    /// The key type of [`IssueRequest::spki_der`].
    pub key_kind: KeyKind,
    /// The one identity the certificate carries, as its only URI SAN.
    pub spiffe_id: SpiffeId,
    /// DNS SANs. Always empty for workload certificates (the CSR checks refuse
    /// DNS names); used only for the signer's own serving certificate.
    pub dns_names: Vec<String>,
    /// Start of validity (already backdated by the policy).
    pub not_before: OffsetDateTime,
    /// End of validity (already clamped to the policy max and to
    /// [`Issuer::signing_validity`]).
    pub not_after: OffsetDateTime,
}

/// Public-key types the signer accepts in a CSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyKind {
    /// ECDSA on NIST P-256.
    EcdsaP256,
    /// ECDSA on NIST P-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
    /// RSA with a modulus of the given bit length (>= 2048).
    Rsa {
        /// Modulus length in bits.
        bits: u32,
    },
}

impl KeyKind {
    /// A short name for logs, metrics and policy (`p256`, `p384`, `ed25519`, `rsa`).
    pub fn name(&self) -> &'static str {
        match self {
            KeyKind::EcdsaP256 => "p256",
            KeyKind::EcdsaP384 => "p384",
            KeyKind::Ed25519 => "ed25519",
            KeyKind::Rsa { .. } => "rsa",
        }
    }

    /// Whether the key is RSA (the leaf then also gets keyEncipherment).
    pub fn is_rsa(&self) -> bool {
        matches!(self, KeyKind::Rsa { .. })
    }
}

/// A signed chain, leaf first.
#[derive(Debug, Clone)]
pub struct IssuedChain {
    /// The new certificate.
    pub leaf: CertificateDer<'static>,
    /// Intermediates, nearest to the leaf first; each becomes its own entry
    /// in the Istio response.
    pub intermediates: Vec<CertificateDer<'static>>,
    /// Trust anchors; all of them go, concatenated, in the last entry of the
    /// Istio response.
    pub roots: Vec<CertificateDer<'static>>,
}

/// The validity window of the certificate that signs leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SigningValidity {
    /// notBefore of the signing certificate.
    pub not_before: OffsetDateTime,
    /// notAfter of the signing certificate; no leaf outlives it.
    pub not_after: OffsetDateTime,
}

/// Why a backend did not sign.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The backend refuses this request (e.g. a Vault role forbids it).
    /// Maps to PERMISSION_DENIED.
    #[error("issuer {backend} refused the request: {reason}")]
    Refused {
        /// Backend name.
        backend: &'static str,
        /// What the backend said.
        reason: String,
    },
    /// The backend cannot be reached or is not ready. Maps to UNAVAILABLE.
    #[error("issuer {backend} unavailable: {reason}")]
    Unavailable {
        /// Backend name.
        backend: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// The backend failed or returned something unusable. Maps to INTERNAL.
    #[error("issuer {backend} failed: {reason}")]
    Internal {
        /// Backend name.
        backend: &'static str,
        /// What went wrong.
        reason: String,
    },
}

/// The future returned by [`Issuer::sign`].
pub type IssueFuture<'a> =
    Pin<Box<dyn Future<Output = Result<IssuedChain, IssueError>> + Send + 'a>>;

/// A certificate-signing backend.
///
/// Implementations must not panic on any request, must put exactly the
/// identity, validity and DNS names of the [`IssueRequest`] in the leaf (or
/// check that a remote CA did), and must set CA:false, KU digitalSignature
/// (+ keyEncipherment for RSA keys) and EKU serverAuth + clientAuth.
pub trait Issuer: Send + Sync {
    /// Backend name for logs, metrics and the ledger (`builtin`, `cacerts`, `vault`).
    fn name(&self) -> &'static str;

    /// Sign one validated request.
    fn sign<'a>(&'a self, req: &'a IssueRequest) -> IssueFuture<'a>;

    /// The roots a relying party should trust (all of them during a rotation).
    fn trust_anchors(&self) -> Vec<CertificateDer<'static>>;

    /// The validity of the certificate that signs leaves: the policy never
    /// issues outside it, and its end is exported as a metric.
    fn signing_validity(&self) -> SigningValidity;

    /// Whether [`Issuer::sign_crl`] can work (the key is local).
    fn signs_crls(&self) -> bool {
        false
    }

    /// The CRL the backend publishes itself (Vault's `<mount>/crl`), DER,
    /// for backends whose CA key is elsewhere; `None` for the others.
    fn fetch_crl(&self) -> Option<BackendFuture<'_, Vec<u8>>> {
        None
    }

    /// Revoke a certificate at the backend too (Vault's `<mount>/revoke`),
    /// by serial (lowercase hex); `None` when the backend keeps no
    /// revocations of its own.
    fn revoke_at_backend<'a>(&'a self, serial: &'a str) -> Option<BackendFuture<'a, ()>> {
        let _ = serial;
        None
    }

    /// Sign a CRL (RFC 5280 v2) with the key that signs leaves, so a relying
    /// party finds it by the leaves' issuer. A backend whose CRL is someone
    /// else's (Vault publishes its own) says so.
    fn sign_crl(&self, crl: &CrlRequest) -> Result<Vec<u8>, String> {
        let _ = crl;
        debug_assert!(!self.signs_crls());
        Err(format!(
            "the {} backend does not sign CRLs itself",
            self.name()
        ))
    }
}

/// A backend call made outside signing (its CRL, a revocation).
pub type BackendFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

/// What a CRL lists and when it is valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlRequest {
    /// thisUpdate.
    pub this_update: OffsetDateTime,
    /// nextUpdate: relying parties treat the CRL as stale after it.
    pub next_update: OffsetDateTime,
    /// cRLNumber: grows with every CRL the signer issues.
    pub number: u64,
    /// The revoked certificates.
    pub entries: Vec<CrlEntry>,
}

/// One revoked certificate in a CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlEntry {
    /// Serial number, big-endian magnitude.
    pub serial: Vec<u8>,
    /// revocationDate.
    pub revoked_at: OffsetDateTime,
    /// reasonCode (RFC 5280 `CRLReason`).
    pub reason: crate::ledger::RevocationReason,
}

/// Sign `crl` with a local CA key (the builtin and cacerts backends).
pub fn sign_crl_with(
    crl: &CrlRequest,
    issuer: &rcgen::Issuer<'_, impl rcgen::SigningKey>,
) -> Result<Vec<u8>, String> {
    use crate::ledger::RevocationReason as R;
    use rcgen::RevocationReason as Rc;
    let revoked_certs = crl
        .entries
        .iter()
        .map(|e| rcgen::RevokedCertParams {
            serial_number: rcgen::SerialNumber::from_slice(&e.serial),
            revocation_time: e.revoked_at,
            reason_code: Some(match e.reason {
                R::Unspecified => Rc::Unspecified,
                R::KeyCompromise => Rc::KeyCompromise,
                R::CaCompromise => Rc::CaCompromise,
                R::AffiliationChanged => Rc::AffiliationChanged,
                R::Superseded => Rc::Superseded,
                R::CessationOfOperation => Rc::CessationOfOperation,
                R::PrivilegeWithdrawn => Rc::PrivilegeWithdrawn,
            }),
            invalidity_date: None,
        })
        .collect();
    let params = rcgen::CertificateRevocationListParams {
        this_update: crl.this_update,
        next_update: crl.next_update,
        crl_number: rcgen::SerialNumber::from(crl.number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    params
        .signed_by(issuer)
        .map(|c| c.der().to_vec())
        .map_err(|e| format!("signing the CRL: {e}"))
}

/// A random, positive, non-zero 128-bit serial number (RFC 5280 allows up to
/// 20 octets; istiod uses 128 random bits too).
pub fn random_serial() -> rcgen::SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    if let Some(first) = bytes.first_mut() {
        // Positive, and never a leading zero octet that DER would strip.
        *first = (*first & 0x7f) | 0x40;
    }
    rcgen::SerialNumber::from_slice(&bytes)
}

/// The leaf certificate parameters every local backend uses, as istiod makes
/// them: empty subject (so the SAN extension is critical), the SPIFFE ID as
/// the only URI SAN, the request's DNS names, CA:false, KU digitalSignature
/// (+ keyEncipherment for RSA keys), EKU serverAuth + clientAuth, a random
/// serial and the request's validity.
pub fn leaf_params(req: &IssueRequest) -> Result<rcgen::CertificateParams, String> {
    use rcgen::{ExtendedKeyUsagePurpose as Eku, KeyUsagePurpose as Ku, SanType};
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let uri = rcgen::string::Ia5String::try_from(req.spiffe_id.to_string())
        .map_err(|e| format!("SPIFFE ID is not IA5: {e}"))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    for dns in &req.dns_names {
        let name = rcgen::string::Ia5String::try_from(dns.as_str())
            .map_err(|e| format!("DNS name {dns:?} is not IA5: {e}"))?;
        params.subject_alt_names.push(SanType::DnsName(name));
    }
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = if req.key_kind.is_rsa() {
        vec![Ku::DigitalSignature, Ku::KeyEncipherment]
    } else {
        vec![Ku::DigitalSignature]
    };
    params.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
    params.serial_number = Some(random_serial());
    params.not_before = req.not_before;
    params.not_after = req.not_after;
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Sign the leaf for `req` with a local CA key.
pub fn sign_leaf(
    req: &IssueRequest,
    issuer: &rcgen::Issuer<'_, impl rcgen::SigningKey>,
) -> Result<CertificateDer<'static>, String> {
    if req.not_after <= req.not_before {
        return Err("empty validity window".to_string());
    }
    let params = leaf_params(req)?;
    let public_key = rcgen::SubjectPublicKeyInfo::from_der(&req.spki_der)
        .map_err(|e| format!("CSR public key: {e}"))?;
    let cert = params
        .signed_by(&public_key, issuer)
        .map_err(|e| format!("signing the leaf: {e}"))?;
    Ok(cert.der().clone())
}
