//! The gRPC serving certificate, issued by the signer's own CA through the
//! same [`Issuer`] seam as workload certificates.

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use spiffe::{SpiffeId, TrustDomain};
use time::OffsetDateTime;

use crate::issuer::{IssueRequest, Issuer, KeyKind};

use super::ca_service::to_pem;

/// A serving certificate chain (leaf + intermediates, PEM) and its key (PEM).
#[derive(Debug, Clone)]
pub struct ServingIdentity {
    /// Leaf then intermediates.
    pub chain_pem: String,
    /// PKCS#8 private key.
    pub key_pem: String,
}

/// Why a serving certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    /// Key generation failed.
    #[error("serving key: {0}")]
    Key(String),
    /// A DNS name or the signer's SPIFFE ID is invalid.
    #[error("serving certificate name: {0}")]
    Name(String),
    /// The issuer failed.
    #[error("serving certificate: {0}")]
    Issue(#[from] crate::issuer::IssueError),
}

/// Issue a serving certificate for `dns_names`, with the signer's own SPIFFE
/// ID `spiffe://<td>/ns/istio-system/sa/meshward-signer`, valid for `ttl`
/// (within the issuer's window).
pub async fn issue_serving_identity(
    issuer: &dyn Issuer,
    trust_domain: &TrustDomain,
    dns_names: &[String],
    ttl: std::time::Duration,
    now: OffsetDateTime,
) -> Result<ServingIdentity, ServingError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| ServingError::Key(e.to_string()))?;
    let spiffe_id = SpiffeId::from_segments(
        trust_domain.clone(),
        &["ns", "istio-system", "sa", "meshward-signer"],
    )
    .map_err(|e| ServingError::Name(e.to_string()))?;
    let signing = issuer.signing_validity();
    let not_before = (now - time::Duration::minutes(1)).max(signing.not_before);
    let not_after = (now + time::Duration::try_from(ttl).unwrap_or(time::Duration::days(30)))
        .min(signing.not_after);
    let mut params = rcgen::CertificateParams::new(dns_names.to_vec())
        .map_err(|e| ServingError::Name(e.to_string()))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let uri = rcgen::string::Ia5String::try_from(spiffe_id.to_string())
        .map_err(|e| ServingError::Name(e.to_string()))?;
    params.subject_alt_names.push(rcgen::SanType::URI(uri));
    let csr = params
        .serialize_request(&key)
        .map_err(|e| ServingError::Key(e.to_string()))?;
    let req = IssueRequest {
        csr_der: csr.der().to_vec(),
        spki_der: rcgen::PublicKeyData::subject_public_key_info(&key),
        key_kind: KeyKind::EcdsaP256,
        spiffe_id,
        dns_names: dns_names.to_vec(),
        not_before,
        not_after,
    };
    let chain = issuer.sign(&req).await?;
    let mut chain_pem = to_pem(&chain.leaf);
    for c in &chain.intermediates {
        chain_pem.push_str(&to_pem(c));
    }
    Ok(ServingIdentity {
        chain_pem,
        key_pem: key.serialize_pem(),
    })
}
