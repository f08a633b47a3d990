//! `csr`: the signer's CSR checks (`meshward_signer::csr::validate`).
//!
//! Input: a CSR as the CA API receives it (PEM or DER), or `S` followed by
//! a `CertificationRequestInfo` that the harness signs with a fixed Ed25519
//! key — mutated contents then get past the self-signature to the SAN,
//! subject and extension checks.
//!
//! An accepted CSR must: be at most 64 KiB; be accepted the same in PEM and
//! DER; parse and verify with x509-parser on its own; carry no CN or email
//! in its subject, no `CA:true`; have exactly one extension request with
//! exactly one SAN extension holding exactly one name, a URI that is a
//! canonical SPIFFE ID equal to the one returned; return its own SPKI and a
//! key type that matches it; and match only its own identity.

use meshward_signer::csr::{self, MAX_CSR_BYTES, ValidatedCsr};
use meshward_signer::issuer::KeyKind;
use spiffe::SpiffeId;
use std::sync::OnceLock;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS9_EMAIL_ADDRESS, OID_SIG_ED25519, OID_X509_COMMON_NAME, OID_X509_EXT_SUBJECT_ALT_NAME,
};
use x509_parser::prelude::FromDer;

use crate::der;

fn signing_key() -> &'static ring::signature::Ed25519KeyPair {
    static KEY: OnceLock<ring::signature::Ed25519KeyPair> = OnceLock::new();
    KEY.get_or_init(|| crate::ed25519(&crate::CSR_KEY_SEED))
}

/// The target.
pub fn run(data: &[u8]) {
    match data.split_first() {
        Some((b'S', info)) => check(&der::sign_ed25519(info, signing_key())),
        _ => check(data),
    }
}

fn check(input: &[u8]) {
    let Ok(accepted) = csr::validate(input) else {
        return;
    };
    assert!(
        input.len() <= MAX_CSR_BYTES,
        "accepted {} bytes",
        input.len()
    );

    // The same request in the other encoding is accepted the same.
    assert_eq!(csr::validate(&accepted.der).as_ref(), Ok(&accepted));
    let pem_text = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", accepted.der.clone()));
    if pem_text.len() <= MAX_CSR_BYTES {
        assert_eq!(csr::validate(pem_text.as_bytes()).as_ref(), Ok(&accepted));
    }

    independent_reading(&accepted);

    // Matches its own identity and no other.
    assert!(accepted.check_identity(&accepted.spiffe_id).is_ok());
    let other = SpiffeId::new("spiffe://cluster.local/ns/kube-system/sa/admin").expect("valid");
    if other != accepted.spiffe_id {
        assert!(accepted.check_identity(&other).is_err());
    }
}

fn independent_reading(accepted: &ValidatedCsr) {
    let (rest, request) =
        X509CertificationRequest::from_der(&accepted.der).expect("an accepted CSR parses");
    assert!(rest.is_empty(), "trailing data after an accepted CSR");
    request
        .verify_signature()
        .expect("an accepted CSR's self-signature verifies");
    let info = &request.certification_request_info;
    assert_eq!(info.subject_pki.raw, &accepted.spki_der[..]);

    for attr in info.subject.iter_attributes() {
        let oid = attr.attr_type();
        assert!(*oid != OID_X509_COMMON_NAME, "accepted a CN");
        assert!(*oid != OID_PKCS9_EMAIL_ADDRESS, "accepted an email subject");
    }

    let requests: Vec<_> = info
        .iter_attributes()
        .filter_map(|a| match a.parsed_attribute() {
            ParsedCriAttribute::ExtensionRequest(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(requests.len(), 1, "extension requests");
    let mut names = Vec::new();
    let mut san_extensions = 0;
    for ext in &requests[0].extensions {
        match ext.parsed_extension() {
            ParsedExtension::BasicConstraints(bc) => assert!(!bc.ca, "accepted CA:true"),
            ParsedExtension::SubjectAlternativeName(san) => {
                san_extensions += 1;
                names.extend(san.general_names.iter());
            }
            _ => assert!(ext.oid != OID_X509_EXT_SUBJECT_ALT_NAME, "unparsed SAN"),
        }
    }
    assert_eq!(san_extensions, 1, "SAN extensions");
    let [GeneralName::URI(uri)] = names.as_slice() else {
        panic!("accepted SAN names {names:?}; exactly one URI is allowed");
    };
    assert_eq!(*uri, accepted.spiffe_id.to_string());
    let reparsed = SpiffeId::new(uri).expect("the URI SAN is a SPIFFE ID");
    assert_eq!(reparsed.to_string(), *uri, "not canonical");

    let algorithm = &info.subject_pki.algorithm;
    let curve = algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
    match accepted.key_kind {
        KeyKind::EcdsaP256 => {
            assert!(algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY && curve == Some(OID_EC_P256))
        }
        KeyKind::EcdsaP384 => assert!(
            algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY && curve == Some(OID_NIST_EC_P384)
        ),
        KeyKind::Ed25519 => assert!(algorithm.algorithm == OID_SIG_ED25519),
        KeyKind::Rsa { bits } => {
            assert!(algorithm.algorithm == OID_PKCS1_RSAENCRYPTION);
            assert!((2048..=8192).contains(&bits), "RSA-{bits}");
        }
    }
}
