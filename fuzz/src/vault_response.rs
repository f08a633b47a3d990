//! `vault_response`: the checks on the certificate Vault returned
//! (`issuer::vault::check::check_issued`), against the fixture PKI
//! (`fixtures/vault_root.der`; the intermediate and leaf keys are fixed
//! Ed25519 seeds in `lib.rs`).
//!
//! Input, by its first byte:
//! - `W` (a workload certificate is expected) or `V` (a serving
//!   certificate, with [`VAULT_DNS_NAME`](crate::VAULT_DNS_NAME)), then the
//!   leaf DER, then [`SEP`](crate::SEP)-separated intermediates;
//! - `w` / `v`: the same, but the first part is a `TBSCertificate` that the
//!   harness signs with the fixture intermediate's key, so mutated leaves
//!   get past the chain check.
//!
//! An accepted leaf must, read again by x509-parser: have exactly one SAN
//! extension whose names are exactly the expected URI (and DNS name); an
//! empty subject; no `CA:true`; the CSR's public key; notAfter within the
//! policy limit, notBefore not after the allowed skew, notAfter after now;
//! and the validity returned must be the certificate's.

use meshward_signer::issuer::vault::check::{Expected, check_issued};
use rustls_pki_types::{CertificateDer, TrustAnchor};
use std::sync::OnceLock;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{NOW, VAULT_DNS_NAME, VAULT_SPIFFE_ID, der, parts};

/// The fixture root CA.
pub const ROOT_DER: &[u8] = include_bytes!("../fixtures/vault_root.der");
/// Longest TTL policy allows in the fixture, seconds.
pub const MAX_TTL: i64 = 3600;
/// Clock skew tolerated, seconds.
pub const SKEW: i64 = 60;

fn anchors() -> &'static [TrustAnchor<'static>] {
    static A: OnceLock<Vec<TrustAnchor<'static>>> = OnceLock::new();
    A.get_or_init(|| {
        let root = CertificateDer::from(ROOT_DER);
        vec![
            webpki::anchor_from_trusted_cert(&root)
                .expect("the fixture root")
                .to_owned(),
        ]
    })
}

fn intermediate_key() -> &'static ring::signature::Ed25519KeyPair {
    static K: OnceLock<ring::signature::Ed25519KeyPair> = OnceLock::new();
    K.get_or_init(|| crate::ed25519(&crate::VAULT_INTERMEDIATE_SEED))
}

fn leaf_spki() -> &'static [u8] {
    static S: OnceLock<Vec<u8>> = OnceLock::new();
    S.get_or_init(|| {
        use ring::signature::KeyPair;
        crate::ed25519_spki(
            crate::ed25519(&crate::VAULT_LEAF_SEED)
                .public_key()
                .as_ref(),
        )
    })
}

/// The target.
pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let serving = match mode {
        b'W' | b'w' => false,
        b'V' | b'v' => true,
        _ => return,
    };
    let p = parts(rest, 5);
    let leaf = if mode.is_ascii_lowercase() {
        der::sign_ed25519(p[0], intermediate_key())
    } else {
        p[0].to_vec()
    };
    let intermediates: Vec<CertificateDer<'static>> = p[1..]
        .iter()
        .map(|c| CertificateDer::from(c.to_vec()))
        .collect();
    let dns: Vec<String> = if serving {
        vec![VAULT_DNS_NAME.to_string()]
    } else {
        Vec::new()
    };
    let expected = Expected {
        spiffe_id: VAULT_SPIFFE_ID,
        dns_names: &dns,
        public_key_spki: leaf_spki(),
        not_after_max: NOW + MAX_TTL + SKEW,
        not_before_max: NOW + SKEW,
        now: NOW,
    };
    let Ok(validity) = check_issued(&leaf, &intermediates, anchors(), &expected) else {
        return;
    };

    let (_, cert) = X509Certificate::from_der(&leaf).expect("an accepted leaf parses");
    let mut san_extensions = 0;
    let mut names = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::BasicConstraints(bc) = ext.parsed_extension() {
            assert!(!bc.ca, "accepted a CA certificate");
        }
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            san_extensions += 1;
            for name in &san.general_names {
                names.push(match name {
                    GeneralName::URI(u) => format!("URI:{u}"),
                    GeneralName::DNSName(d) => format!("DNS:{d}"),
                    other => panic!("accepted a SAN {other:?}"),
                });
            }
        }
    }
    assert_eq!(san_extensions, 1);
    names.sort();
    let mut wanted = vec![format!("URI:{VAULT_SPIFFE_ID}")];
    wanted.extend(dns.iter().map(|d| format!("DNS:{d}")));
    wanted.sort();
    assert_eq!(names, wanted);
    assert!(cert.subject().iter_attributes().next().is_none(), "subject");
    assert_eq!(cert.public_key().raw, leaf_spki());
    let (nb, na) = (
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    );
    assert_eq!((validity.not_before, validity.not_after), (nb, na));
    assert!(na <= expected.not_after_max && nb <= expected.not_before_max && na > NOW);
}
