//! What the signer checks on a certificate Vault returned, before answering.
//!
//! Vault is trusted to sign, not to decide who gets which identity: the result
//! must carry exactly the SPIFFE ID the caller proved, the CSR's key, leaf
//! constraints, a validity inside what policy allowed, and must chain to the
//! roots configured in the signer (not to whatever Vault says is its CA).
//!
//! Pure: time is passed in as Unix seconds.

use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

/// What the issued certificate must match.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// The SPIFFE ID (URI) the caller authenticated as and policy allowed.
    pub spiffe_id: &'a str,
    /// DNS names policy put in the request (empty for workloads).
    pub dns_names: &'a [String],
    /// DER SubjectPublicKeyInfo of the CSR that was sent.
    pub public_key_spki: &'a [u8],
    /// Latest acceptable notAfter (policy TTL plus tolerated clock skew), Unix s.
    pub not_after_max: i64,
    /// Latest acceptable notBefore (now plus tolerated clock skew), Unix s.
    pub not_before_max: i64,
    /// Current time, Unix seconds.
    pub now: i64,
}

/// Validity of an accepted certificate, Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

/// Why a certificate from Vault was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Rejection {
    #[error("certificate from Vault is not valid X.509: {0}")]
    Unparsable(String),
    #[error("certificate from Vault has SANs {found:?}, expected exactly {expected:?}")]
    WrongSan {
        expected: Vec<String>,
        found: Vec<String>,
    },
    #[error("certificate from Vault has a subject ({0}); leaves carry only the URI SAN")]
    Subject(String),
    #[error("certificate from Vault is a CA certificate")]
    IsCa,
    #[error("certificate from Vault is for another public key than the CSR's")]
    WrongKey,
    #[error("certificate from Vault expires at {not_after}, after the policy limit {limit}")]
    TooLong { not_after: i64, limit: i64 },
    #[error(
        "certificate from Vault is not valid now (notBefore {not_before}, notAfter {not_after}, now {now})"
    )]
    NotValidNow {
        not_before: i64,
        not_after: i64,
        now: i64,
    },
    #[error("certificate from Vault does not chain to the configured roots: {0}")]
    Chain(String),
}

/// Checks a leaf Vault returned. `intermediates` are the CA certificates Vault
/// sent along (untrusted: only used to build a path to `roots`).
pub fn check_issued(
    leaf_der: &[u8],
    intermediates: &[CertificateDer<'static>],
    roots: &[TrustAnchor<'static>],
    expected: &Expected<'_>,
) -> Result<Validity, Rejection> {
    let (_, cert) =
        X509Certificate::from_der(leaf_der).map_err(|e| Rejection::Unparsable(e.to_string()))?;

    // Identity: exactly the SAN entries we asked for: the URI (+ DNS names).
    let mut sans = Vec::new();
    let mut san_extensions = 0;
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            san_extensions += 1;
            for name in &san.general_names {
                sans.push(match name {
                    GeneralName::URI(u) => format!("URI:{u}"),
                    GeneralName::DNSName(d) => format!("DNS:{d}"),
                    other => format!("{other:?}"),
                });
            }
        }
    }
    let mut wanted = vec![format!("URI:{}", expected.spiffe_id)];
    wanted.extend(expected.dns_names.iter().map(|d| format!("DNS:{d}")));
    let mut found = sans.clone();
    found.sort();
    wanted.sort();
    if san_extensions != 1 || found != wanted {
        return Err(Rejection::WrongSan {
            expected: wanted,
            found: sans,
        });
    }
    if cert.subject().iter_attributes().next().is_some() {
        return Err(Rejection::Subject(cert.subject().to_string()));
    }
    if cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca)
    {
        return Err(Rejection::IsCa);
    }
    if cert.public_key().raw != expected.public_key_spki {
        return Err(Rejection::WrongKey);
    }

    let validity = Validity {
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    };
    if validity.not_after > expected.not_after_max {
        return Err(Rejection::TooLong {
            not_after: validity.not_after,
            limit: expected.not_after_max,
        });
    }
    if validity.not_before > expected.not_before_max || validity.not_after <= expected.now {
        return Err(Rejection::NotValidNow {
            not_before: validity.not_before,
            not_after: validity.not_after,
            now: expected.now,
        });
    }

    // Path to one of the configured roots, for both mTLS usages.
    let leaf = CertificateDer::from(leaf_der);
    let ee = webpki::EndEntityCert::try_from(&leaf).map_err(|e| Rejection::Chain(e.to_string()))?;
    let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(expected.now).unwrap_or(0),
    ));
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            roots,
            intermediates,
            at,
            usage,
            None,
            None,
        )
        .map_err(|e| Rejection::Chain(format!("{e:?}")))?;
    }
    Ok(validity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };

    const ID: &str = "spiffe://cluster.local/ns/default/sa/foo";
    const NOW: i64 = 1_900_000_000;

    struct Pki {
        root: rcgen::Certificate,
        int_der: CertificateDer<'static>,
        int_issuer: Issuer<'static, KeyPair>,
    }

    fn at(t: i64) -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp(t).unwrap()
    }

    fn ca_params(cn: &str) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.not_before = at(NOW - 86_400);
        p.not_after = at(NOW + 86_400 * 365);
        p
    }

    fn make_pki() -> Pki {
        let root_key = KeyPair::generate().unwrap();
        let root = ca_params("root").self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(ca_params("root"), root_key);
        let int_key = KeyPair::generate().unwrap();
        let int = ca_params("istioca")
            .signed_by(&int_key, &root_issuer)
            .unwrap();
        Pki {
            root,
            int_der: int.der().clone(),
            int_issuer: Issuer::new(ca_params("istioca"), int_key),
        }
    }

    fn leaf(pki: &Pki, key: &KeyPair, sans: Vec<SanType>, nb: i64, na: i64) -> Vec<u8> {
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = at(nb);
        p.not_after = at(na);
        p.signed_by(key, &pki.int_issuer).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    fn expected<'a>(spki: &'a [u8]) -> Expected<'a> {
        Expected {
            spiffe_id: ID,
            dns_names: &[],
            public_key_spki: spki,
            not_after_max: NOW + 3600 + 60,
            not_before_max: NOW + 60,
            now: NOW,
        }
    }

    fn anchors(pki: &Pki) -> Vec<TrustAnchor<'static>> {
        vec![
            webpki::anchor_from_trusted_cert(pki.root.der())
                .unwrap()
                .to_owned(),
        ]
    }

    /// Check `der` as a leaf for `key`, issued under `pki`'s intermediate.
    fn check_leaf(pki: &Pki, key: &KeyPair, der: &[u8]) -> Result<Validity, Rejection> {
        let spki = spki(key);
        check_issued(
            der,
            std::slice::from_ref(&pki.int_der),
            &anchors(pki),
            &expected(&spki),
        )
    }

    fn spki(key: &KeyPair) -> Vec<u8> {
        rcgen::PublicKeyData::subject_public_key_info(key)
    }

    #[test]
    fn good_leaf_is_accepted() {
        let pki = make_pki();
        let key = KeyPair::generate().unwrap();
        let der = leaf(&pki, &key, vec![uri(ID)], NOW - 30, NOW + 3600);
        let v = check_leaf(&pki, &key, &der);
        assert_eq!(
            v,
            Ok(Validity {
                not_before: NOW - 30,
                not_after: NOW + 3600
            })
        );
    }

    #[test]
    fn leaf_for_another_spiffe_id_is_refused() {
        let pki = make_pki();
        let key = KeyPair::generate().unwrap();
        let der = leaf(
            &pki,
            &key,
            vec![uri("spiffe://cluster.local/ns/kube-system/sa/admin")],
            NOW - 30,
            NOW + 3600,
        );
        let r = check_leaf(&pki, &key, &der);
        assert!(matches!(r, Err(Rejection::WrongSan { .. })), "{r:?}");
    }

    #[test]
    fn leaf_with_an_extra_dns_san_is_refused() {
        let pki = make_pki();
        let key = KeyPair::generate().unwrap();
        let der = leaf(
            &pki,
            &key,
            vec![
                uri(ID),
                SanType::DnsName("evil.example".try_into().unwrap()),
            ],
            NOW - 30,
            NOW + 3600,
        );
        let r = check_leaf(&pki, &key, &der);
        assert!(matches!(r, Err(Rejection::WrongSan { .. })), "{r:?}");
    }

    #[test]
    fn leaf_for_another_key_is_refused() {
        let pki = make_pki();
        let key = KeyPair::generate().unwrap();
        let other = KeyPair::generate().unwrap();
        let der = leaf(&pki, &key, vec![uri(ID)], NOW - 30, NOW + 3600);
        let spki = spki(&other);
        let r = check_issued(
            &der,
            std::slice::from_ref(&pki.int_der),
            &anchors(&pki),
            &expected(&spki),
        );
        assert_eq!(r, Err(Rejection::WrongKey));
    }

    #[test]
    fn leaf_longer_than_policy_is_refused() {
        let pki = make_pki();
        let key = KeyPair::generate().unwrap();
        let der = leaf(&pki, &key, vec![uri(ID)], NOW - 30, NOW + 48 * 3600);
        let r = check_leaf(&pki, &key, &der);
        assert!(matches!(r, Err(Rejection::TooLong { .. })), "{r:?}");
    }

    #[test]
    fn leaf_not_yet_valid_is_refused() {
        let pki = make_pki();
        let key = KeyPair::generate().unwrap();
        let der = leaf(&pki, &key, vec![uri(ID)], NOW + 600, NOW + 3600);
        let r = check_leaf(&pki, &key, &der);
        assert!(matches!(r, Err(Rejection::NotValidNow { .. })), "{r:?}");
    }

    #[test]
    fn leaf_from_a_ca_outside_the_configured_roots_is_refused() {
        let pki = make_pki();
        let other = make_pki();
        let key = KeyPair::generate().unwrap();
        let der = leaf(&pki, &key, vec![uri(ID)], NOW - 30, NOW + 3600);
        let spki = spki(&key);
        let r = check_issued(
            &der,
            std::slice::from_ref(&pki.int_der),
            &anchors(&other),
            &expected(&spki),
        );
        assert!(matches!(r, Err(Rejection::Chain(_))), "{r:?}");
    }

    #[test]
    fn leaf_without_its_intermediate_is_refused() {
        let pki = make_pki();
        let key = KeyPair::generate().unwrap();
        let der = leaf(&pki, &key, vec![uri(ID)], NOW - 30, NOW + 3600);
        let spki = spki(&key);
        let r = check_issued(&der, &[], &anchors(&pki), &expected(&spki));
        assert!(matches!(r, Err(Rejection::Chain(_))), "{r:?}");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_from_vault_are_refused_without_panicking(
            leaf in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            int in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
        ) {
            let pki = make_pki();
            let r = check_issued(&leaf, &[CertificateDer::from(int)], &anchors(&pki), &expected(b""));
            proptest::prop_assert!(r.is_err());
        }
    }

    #[test]
    fn garbage_is_refused() {
        let pki = make_pki();
        let r = check_issued(b"\x30\x03junk", &[], &anchors(&pki), &expected(b""));
        assert!(matches!(r, Err(Rejection::Unparsable(_))), "{r:?}");
    }
}
