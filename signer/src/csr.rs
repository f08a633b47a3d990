//! CSR checks: parse, verify, and reduce a certificate signing request to the
//! two things the signer takes from it — a public key and the identity it
//! claims.
//!
//! Pure functions of their input. Following istio-csr's strictness:
//!
//! - at most [`MAX_CSR_BYTES`], PEM (`CERTIFICATE REQUEST`) or raw DER, one
//!   request, no trailing data;
//! - self-signature verified with SHA-256 or stronger (ECDSA, Ed25519, RSA
//!   PKCS#1 v1.5);
//! - key: ECDSA P-256 or P-384, Ed25519, or RSA 2048..=8192 bits;
//! - exactly one SAN, a URI that is a canonical SPIFFE ID; DNS, IP, email or
//!   any other SAN type refused; no CN or email in the subject;
//! - no `CA:true` request, at most one extension request.
//!
//! Whether that identity is the caller's is decided by the pipeline with
//! [`ValidatedCsr::check_identity`].

use spiffe::SpiffeId;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA,
    OID_PKCS9_EMAIL_ADDRESS, OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ED25519,
    OID_X509_COMMON_NAME, OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_SUBJECT_ALT_NAME,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::issuer::KeyKind;

/// Largest CSR accepted, in bytes (PEM or DER). Real ones are under 2 KiB.
pub const MAX_CSR_BYTES: usize = 64 * 1024;
/// Smallest RSA modulus accepted.
pub const MIN_RSA_BITS: usize = 2048;
/// Largest RSA modulus accepted (bounds the verification cost).
pub const MAX_RSA_BITS: usize = 8192;

/// What is wrong with a CSR. Every variant is the client's fault
/// (INVALID_ARGUMENT) except [`CsrError::IdentityMismatch`] (PERMISSION_DENIED).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// Empty input.
    #[error("CSR is empty")]
    Empty,
    /// Bigger than [`MAX_CSR_BYTES`].
    #[error("CSR is {size} bytes, more than the {max} allowed")]
    TooLarge {
        /// Size received.
        size: usize,
        /// Limit.
        max: usize,
    },
    /// Not PEM and not DER, or the wrong PEM block.
    #[error("CSR is not a PEM CERTIFICATE REQUEST or DER: {0}")]
    Encoding(String),
    /// DER did not parse as a PKCS#10 request.
    #[error("CSR is not a valid PKCS#10 request: {0}")]
    Malformed(String),
    /// The self-signature does not verify.
    #[error("CSR signature does not verify with its own public key")]
    BadSignature,
    /// Signature algorithm not allowed.
    #[error(
        "CSR signature algorithm {0} is not allowed (use ECDSA/RSA with SHA-256 or stronger, or Ed25519)"
    )]
    SignatureAlgorithm(String),
    /// Key type or size not allowed.
    #[error("CSR key {0} is not allowed (allowed: ECDSA P-256/P-384, Ed25519, RSA 2048..=8192)")]
    KeyType(String),
    /// Subject names something (CN, email) the signer refuses.
    #[error("CSR subject must not carry {0}; the identity goes in the URI SAN only")]
    Subject(&'static str),
    /// SAN content not allowed.
    #[error("CSR subject alternative names: {0}")]
    San(String),
    /// The CSR asks to be a CA.
    #[error("CSR asks for CA:true; only leaf certificates are issued")]
    CaRequested,
    /// Extension request structure not acceptable.
    #[error("CSR extensions: {0}")]
    Extensions(String),
    /// The URI SAN is not a canonical SPIFFE ID.
    #[error("CSR URI SAN {uri:?} is not a canonical SPIFFE ID: {reason}")]
    NotSpiffe {
        /// The URI found.
        uri: String,
        /// Why it is refused.
        reason: String,
    },
    /// The CSR asks for an identity other than the caller's.
    #[error("CSR asks for {requested} but the caller is {caller}")]
    IdentityMismatch {
        /// Identity in the CSR.
        requested: String,
        /// Identity the caller proved (or is allowed to act for).
        caller: String,
    },
}

/// A CSR that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedCsr {
    /// The request, DER.
    pub der: Vec<u8>,
    /// Its SubjectPublicKeyInfo, DER.
    pub spki_der: Vec<u8>,
    /// Its key type.
    pub key_kind: KeyKind,
    /// The identity it asks for (its only SAN).
    pub spiffe_id: SpiffeId,
}

impl ValidatedCsr {
    /// Refuse unless the CSR asks for exactly `caller`.
    pub fn check_identity(&self, caller: &SpiffeId) -> Result<(), CsrError> {
        if &self.spiffe_id == caller {
            Ok(())
        } else {
            Err(CsrError::IdentityMismatch {
                requested: self.spiffe_id.to_string(),
                caller: caller.to_string(),
            })
        }
    }
}

/// Decode PEM or DER into DER, enforcing the size limit first.
pub fn decode(input: &[u8]) -> Result<Vec<u8>, CsrError> {
    if input.is_empty() {
        return Err(CsrError::Empty);
    }
    if input.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge {
            size: input.len(),
            max: MAX_CSR_BYTES,
        });
    }
    // DER: a SEQUENCE tag. PEM text never starts with 0x30 ('0') followed by
    // a valid structure, and we try PEM only when it does not look like DER.
    if input.first() == Some(&0x30) {
        return Ok(input.to_vec());
    }
    let blocks = pem::parse_many(input).map_err(|e| CsrError::Encoding(e.to_string()))?;
    let mut blocks = blocks.into_iter();
    let block = blocks
        .next()
        .ok_or_else(|| CsrError::Encoding("no PEM block found".to_string()))?;
    if blocks.next().is_some() {
        return Err(CsrError::Encoding("more than one PEM block".to_string()));
    }
    match block.tag() {
        "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST" => Ok(block.into_contents()),
        other => Err(CsrError::Encoding(format!(
            "PEM block is {other:?}, expected \"CERTIFICATE REQUEST\""
        ))),
    }
}

/// Run every check on a CSR given as PEM or DER bytes.
pub fn validate(input: &[u8]) -> Result<ValidatedCsr, CsrError> {
    let der = decode(input)?;
    let (rest, csr) =
        X509CertificationRequest::from_der(&der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(format!(
            "{} bytes of trailing data",
            rest.len()
        )));
    }
    let info = &csr.certification_request_info;
    let key_kind = key_kind(info)?;
    verify_signature(&csr, key_kind)?;

    for attr in info.subject.iter_attributes() {
        let oid = attr.attr_type();
        if *oid == OID_X509_COMMON_NAME {
            return Err(CsrError::Subject("a common name (CN)"));
        }
        if *oid == OID_PKCS9_EMAIL_ADDRESS {
            return Err(CsrError::Subject("an email address"));
        }
    }

    let mut ext_requests = info
        .iter_attributes()
        .filter_map(|a| match a.parsed_attribute() {
            ParsedCriAttribute::ExtensionRequest(r) => Some(r),
            _ => None,
        });
    let Some(requested) = ext_requests.next() else {
        return Err(CsrError::San(
            "none; exactly one URI SAN with the SPIFFE ID is required".to_string(),
        ));
    };
    if ext_requests.next().is_some() {
        return Err(CsrError::Extensions(
            "more than one extension request attribute".to_string(),
        ));
    }

    let mut san_seen = false;
    let mut uris: Vec<&str> = Vec::new();
    for ext in &requested.extensions {
        if ext.oid == OID_X509_EXT_BASIC_CONSTRAINTS {
            match ext.parsed_extension() {
                ParsedExtension::BasicConstraints(bc) => {
                    if bc.ca {
                        return Err(CsrError::CaRequested);
                    }
                }
                _ => {
                    return Err(CsrError::Extensions(
                        "unparseable basicConstraints".to_string(),
                    ));
                }
            }
        } else if ext.oid == OID_X509_EXT_SUBJECT_ALT_NAME {
            if san_seen {
                return Err(CsrError::San("more than one SAN extension".to_string()));
            }
            san_seen = true;
            let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() else {
                return Err(CsrError::San("unparseable SAN extension".to_string()));
            };
            for name in &san.general_names {
                match name {
                    GeneralName::URI(u) => uris.push(u),
                    GeneralName::DNSName(d) => {
                        return Err(CsrError::San(format!("DNS name {d:?} is not allowed")));
                    }
                    GeneralName::IPAddress(_) => {
                        return Err(CsrError::San("IP address is not allowed".to_string()));
                    }
                    GeneralName::RFC822Name(e) => {
                        return Err(CsrError::San(format!("email {e:?} is not allowed")));
                    }
                    _ => {
                        return Err(CsrError::San(
                            "only a URI SAN is allowed (found another name type)".to_string(),
                        ));
                    }
                }
            }
        }
    }
    let uri = match uris.as_slice() {
        [one] => *one,
        [] => {
            return Err(CsrError::San(
                "no URI SAN; exactly one with the SPIFFE ID is required".to_string(),
            ));
        }
        many => {
            return Err(CsrError::San(format!(
                "{} URI SANs; exactly one is allowed",
                many.len()
            )));
        }
    };
    let spiffe_id = canonical_spiffe_id(uri)?;
    Ok(ValidatedCsr {
        spki_der: info.subject_pki.raw.to_vec(),
        der: der.clone(),
        key_kind,
        spiffe_id,
    })
}

/// Parse a SPIFFE ID and insist it is written in canonical form.
pub fn canonical_spiffe_id(uri: &str) -> Result<SpiffeId, CsrError> {
    let id = SpiffeId::new(uri).map_err(|e| CsrError::NotSpiffe {
        uri: uri.to_string(),
        reason: e.to_string(),
    })?;
    if id.to_string() != uri {
        return Err(CsrError::NotSpiffe {
            uri: uri.to_string(),
            reason: format!("not canonical (canonical form is {id})"),
        });
    }
    Ok(id)
}

fn key_kind(
    info: &x509_parser::certification_request::X509CertificationRequestInfo<'_>,
) -> Result<KeyKind, CsrError> {
    let spki = &info.subject_pki;
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| CsrError::KeyType("EC key without a named curve".to_string()))?;
        if curve == OID_EC_P256 {
            Ok(KeyKind::EcdsaP256)
        } else if curve == OID_NIST_EC_P384 {
            Ok(KeyKind::EcdsaP384)
        } else {
            Err(CsrError::KeyType(format!("EC curve {curve}")))
        }
    } else if *alg == OID_SIG_ED25519 {
        Ok(KeyKind::Ed25519)
    } else if *alg == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => rsa.key_size(),
            _ => return Err(CsrError::KeyType("unparseable RSA key".to_string())),
        };
        if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
            return Err(CsrError::KeyType(format!("RSA-{bits}")));
        }
        let bits = u32::try_from(bits).map_err(|_| CsrError::KeyType("RSA size".to_string()))?;
        Ok(KeyKind::Rsa { bits })
    } else {
        Err(CsrError::KeyType(format!("algorithm {alg}")))
    }
}

fn verify_signature(csr: &X509CertificationRequest<'_>, key_kind: KeyKind) -> Result<(), CsrError> {
    use ring::signature as sig;
    let oid = &csr.signature_algorithm.algorithm;
    let alg: &'static dyn sig::VerificationAlgorithm = match key_kind {
        KeyKind::EcdsaP256 if *oid == OID_SIG_ECDSA_WITH_SHA256 => &sig::ECDSA_P256_SHA256_ASN1,
        KeyKind::EcdsaP256 if *oid == OID_SIG_ECDSA_WITH_SHA384 => &sig::ECDSA_P256_SHA384_ASN1,
        KeyKind::EcdsaP384 if *oid == OID_SIG_ECDSA_WITH_SHA384 => &sig::ECDSA_P384_SHA384_ASN1,
        KeyKind::EcdsaP384 if *oid == OID_SIG_ECDSA_WITH_SHA256 => &sig::ECDSA_P384_SHA256_ASN1,
        KeyKind::Ed25519 if *oid == OID_SIG_ED25519 => &sig::ED25519,
        KeyKind::Rsa { .. } if *oid == OID_PKCS1_SHA256WITHRSA => &sig::RSA_PKCS1_2048_8192_SHA256,
        KeyKind::Rsa { .. } if *oid == OID_PKCS1_SHA384WITHRSA => &sig::RSA_PKCS1_2048_8192_SHA384,
        KeyKind::Rsa { .. } if *oid == OID_PKCS1_SHA512WITHRSA => &sig::RSA_PKCS1_2048_8192_SHA512,
        _ => {
            return Err(CsrError::SignatureAlgorithm(format!(
                "{oid} with a {} key",
                key_kind.name()
            )));
        }
    };
    let spki = &csr.certification_request_info.subject_pki;
    let key = sig::UnparsedPublicKey::new(alg, spki.subject_public_key.data.as_ref());
    key.verify(
        csr.certification_request_info.raw,
        csr.signature_value.data.as_ref(),
    )
    .map_err(|_| CsrError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = validate(&bytes);
        }

        #[test]
        fn garbage_pem_never_panics(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
            use base64::Engine;
            let text = format!(
                "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
                base64::engine::general_purpose::STANDARD.encode(&body)
            );
            prop_assert!(validate(text.as_bytes()).is_err());
        }
    }

    #[test]
    fn non_canonical_spiffe_id_is_refused() {
        assert!(canonical_spiffe_id("spiffe://Example.org/ns/a/sa/b").is_err());
        assert!(canonical_spiffe_id("spiffe://example.org/ns/a/sa/b").is_ok());
    }
}
