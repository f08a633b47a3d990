//! Plugged-in CA fixtures for the cacerts tests, generated with rcgen:
//! roots, intermediates, and Istio's `cacerts` directory layout.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    dead_code
)]

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer as RcIssuer, KeyPair, KeyUsagePurpose,
};
use time::OffsetDateTime;

pub fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// A CA certificate + key, and the rcgen issuer that signs with it.
pub struct Ca {
    pub cert: rcgen::Certificate,
    pub key_pem: String,
    pub issuer: RcIssuer<'static, KeyPair>,
}

pub fn ca_params(cn: &str, key_usages: Vec<KeyUsagePurpose>, ca: bool) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(DnType::OrganizationName, "cluster.local");
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = if ca {
        IsCa::Ca(BasicConstraints::Unconstrained)
    } else {
        IsCa::ExplicitNoCa
    };
    p.key_usages = key_usages;
    p.not_before = now() - time::Duration::hours(1);
    p.not_after = now() + time::Duration::days(365);
    p.use_authority_key_identifier_extension = true;
    p
}

pub fn ca_usages() -> Vec<KeyUsagePurpose> {
    vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ]
}

pub fn root(cn: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let params = ca_params(cn, ca_usages(), true);
    let cert = params.self_signed(&key).unwrap();
    let key_pem = key.serialize_pem();
    Ca {
        cert,
        key_pem,
        issuer: RcIssuer::new(params, key),
    }
}

pub fn child(cn: &str, parent: &Ca, params: CertificateParams, key: KeyPair) -> Ca {
    let cert = params.signed_by(&key, &parent.issuer).unwrap();
    let key_pem = key.serialize_pem();
    let _ = cn;
    Ca {
        cert,
        key_pem,
        issuer: RcIssuer::new(params, key),
    }
}

pub fn intermediate(cn: &str, parent: &Ca) -> Ca {
    child(
        cn,
        parent,
        ca_params(cn, ca_usages(), true),
        KeyPair::generate().unwrap(),
    )
}

/// Writes Istio's layout: ca-cert, ca-key, cert-chain (ca-cert + `chain` +
/// root), root-cert.
pub fn write_istio(dir: &Path, ca: &Ca, chain: &[&Ca], root: &Ca) {
    let mut cert_chain = ca.cert.pem();
    for c in chain {
        cert_chain.push_str(&c.cert.pem());
    }
    cert_chain.push_str(&root.cert.pem());
    std::fs::write(dir.join("ca-cert.pem"), ca.cert.pem()).unwrap();
    std::fs::write(dir.join("ca-key.pem"), &ca.key_pem).unwrap();
    std::fs::write(dir.join("cert-chain.pem"), cert_chain).unwrap();
    std::fs::write(dir.join("root-cert.pem"), root.cert.pem()).unwrap();
}
