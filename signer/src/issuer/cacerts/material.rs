//! Validation of plugged-in CA files: pure, the file contents and `now` in,
//! a ready-to-sign [`CaMaterial`] or the reason it is unusable out.

use rcgen::KeyPair;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::key::parse_private_key;
use crate::issuer::SigningValidity;

/// The raw contents of a plugged-in CA directory, in Istio's terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluggedInFiles {
    /// The signing CA certificate (`ca-cert.pem`, or the first of `tls.crt`).
    pub ca_cert: Vec<u8>,
    /// Its key (`ca-key.pem` / `tls.key`).
    pub ca_key: Vec<u8>,
    /// `cert-chain.pem` (usually ca-cert, intermediates, root), or the rest of
    /// `tls.crt`. May be empty.
    pub cert_chain: Vec<u8>,
    /// `root-cert.pem` / `ca.crt`: the trust anchors (one or more). May be
    /// empty when `ca_cert` is a self-signed root (istiod's
    /// `istio-ca-secret`): it is then its own trust anchor.
    pub root_cert: Vec<u8>,
}

/// Why plugged-in CA files are refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum MaterialError {
    /// A file is not PEM or does not hold what it should.
    #[error("{file}: {reason}")]
    Malformed {
        /// Which file (Istio name).
        file: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The key is not the key of the CA certificate.
    #[error("ca-key.pem does not match the public key of ca-cert.pem")]
    KeyMismatch,
    /// The CA certificate may not sign certificates.
    #[error("ca-cert.pem cannot sign certificates: {0}")]
    NotCa(String),
    /// The CA certificate (or a chain certificate) is outside its validity.
    #[error("{0} is not valid now")]
    NotValidNow(String),
    /// No path from ca-cert.pem to a certificate of root-cert.pem.
    #[error("ca-cert.pem does not chain to root-cert.pem: {0}")]
    BrokenChain(String),
}

/// A validated plugged-in CA, ready to sign.
#[derive(Debug)]
pub struct CaMaterial {
    /// Signs leaves; its DN and key identifier come from the CA certificate.
    pub issuer: rcgen::Issuer<'static, KeyPair>,
    /// The CA certificate, then each intermediate up to (excluding) the root.
    pub chain: Vec<CertificateDer<'static>>,
    /// The roots from root-cert.pem.
    pub roots: Vec<CertificateDer<'static>>,
    /// Validity of the CA certificate.
    pub validity: SigningValidity,
}

const MAX_DEPTH: usize = 8;

fn certs(
    file: &'static str,
    pem_text: &[u8],
) -> Result<Vec<CertificateDer<'static>>, MaterialError> {
    let blocks = pem::parse_many(pem_text).map_err(|e| MaterialError::Malformed {
        file,
        reason: format!("not PEM: {e}"),
    })?;
    let out: Vec<CertificateDer<'static>> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect();
    for der in &out {
        X509Certificate::from_der(der).map_err(|e| MaterialError::Malformed {
            file,
            reason: format!("certificate does not parse: {e}"),
        })?;
    }
    Ok(out)
}

fn parse<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, MaterialError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| MaterialError::Malformed {
            file: "certificate",
            reason: e.to_string(),
        })
}

fn check_can_sign(what: &str, cert: &X509Certificate<'_>) -> Result<(), MaterialError> {
    let bc = cert
        .basic_constraints()
        .map_err(|e| MaterialError::NotCa(format!("{what}: basicConstraints: {e}")))?;
    if !bc.is_some_and(|b| b.value.ca) {
        return Err(MaterialError::NotCa(format!(
            "{what}: basicConstraints CA is not true"
        )));
    }
    let ku = cert
        .key_usage()
        .map_err(|e| MaterialError::NotCa(format!("{what}: keyUsage: {e}")))?;
    match ku {
        Some(ku) if ku.value.key_cert_sign() => Ok(()),
        Some(_) => Err(MaterialError::NotCa(format!(
            "{what}: keyUsage lacks keyCertSign"
        ))),
        None => Err(MaterialError::NotCa(format!(
            "{what}: no keyUsage extension"
        ))),
    }
}

fn check_valid_at(
    what: &str,
    cert: &X509Certificate<'_>,
    now: OffsetDateTime,
) -> Result<(), MaterialError> {
    let v = cert.validity();
    if v.not_before.to_datetime() > now || v.not_after.to_datetime() <= now {
        return Err(MaterialError::NotValidNow(format!(
            "{what} ({}, valid {} to {})",
            cert.subject(),
            v.not_before,
            v.not_after
        )));
    }
    Ok(())
}

/// `child` is signed by `parent` (name chaining and signature).
fn issued_by(child: &X509Certificate<'_>, parent: &X509Certificate<'_>) -> bool {
    child.issuer().as_raw() == parent.subject().as_raw()
        && child.verify_signature(Some(parent.public_key())).is_ok()
}

/// Checks plugged-in CA files at `now`: the key matches ca-cert.pem, which is
/// a CA allowed to sign (basicConstraints CA:true, keyUsage keyCertSign) and
/// currently valid, and a path of valid CA certificates from cert-chain.pem
/// leads from it to a certificate of root-cert.pem (or ca-cert.pem is a
/// self-signed root and root-cert.pem is empty or absent).
pub fn validate(files: &PluggedInFiles, now: OffsetDateTime) -> Result<CaMaterial, MaterialError> {
    let ca_list = certs("ca-cert.pem", &files.ca_cert)?;
    let ca_der = ca_list.first().cloned().ok_or(MaterialError::Malformed {
        file: "ca-cert.pem",
        reason: "no certificate".into(),
    })?;
    let mut roots = certs("root-cert.pem", &files.root_cert)?;
    if roots.is_empty() {
        // istiod's own CA Secret (`istio-ca-secret`) holds only its
        // self-signed root and key; root-cert.pem is empty, and istiod
        // trusts ca-cert.pem itself. Only a self-signed certificate may
        // stand in for the root: an intermediate never becomes a trust
        // anchor because a file is empty.
        let ca = parse(&ca_der)?;
        if !issued_by(&ca, &ca) {
            return Err(MaterialError::Malformed {
                file: "root-cert.pem",
                reason: "no certificate (only a self-signed ca-cert.pem, as in istiod's \
                         istio-ca-secret, is its own root)"
                    .into(),
            });
        }
        roots.push(ca_der.clone());
    }
    // Anything after the CA certificate in its own file counts as chain too
    // (the tls.crt layout puts the chain there).
    let mut pool = certs("cert-chain.pem", &files.cert_chain)?;
    pool.extend(ca_list.iter().skip(1).cloned());

    let key = parse_private_key(&files.ca_key).map_err(|reason| MaterialError::Malformed {
        file: "ca-key.pem",
        reason,
    })?;
    let ca = parse(&ca_der)?;
    if ca.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(MaterialError::KeyMismatch);
    }
    check_can_sign("ca-cert.pem", &ca)?;
    check_valid_at("ca-cert.pem", &ca, now)?;

    let parsed_roots = roots.iter().map(parse).collect::<Result<Vec<_>, _>>()?;
    let parsed_pool = pool.iter().map(parse).collect::<Result<Vec<_>, _>>()?;

    // Walk up from the CA certificate until a root signs the current one.
    let mut chain = vec![ca_der.clone()];
    let mut current = ca.clone();
    let mut reached = roots.contains(&ca_der);
    for _ in 0..MAX_DEPTH {
        if reached {
            break;
        }
        if let Some(root) = parsed_roots.iter().find(|r| issued_by(&current, r)) {
            check_valid_at("root-cert.pem", root, now)?;
            reached = true;
            break;
        }
        let next = parsed_pool
            .iter()
            .zip(&pool)
            .find(|(p, der)| !chain.contains(der) && issued_by(&current, p));
        let Some((parent, parent_der)) = next else {
            return Err(MaterialError::BrokenChain(format!(
                "no certificate in cert-chain.pem or root-cert.pem issued {}",
                current.subject()
            )));
        };
        check_can_sign("cert-chain.pem", parent)?;
        check_valid_at("cert-chain.pem", parent, now)?;
        chain.push(parent_der.clone());
        current = parent.clone();
    }
    if !reached {
        return Err(MaterialError::BrokenChain(format!(
            "longer than {MAX_DEPTH} certificates"
        )));
    }
    // A CA that is itself the root sends no separate intermediate.
    if roots.contains(&ca_der) {
        chain.clear();
    }

    let validity = SigningValidity {
        not_before: ca.validity().not_before.to_datetime(),
        not_after: ca.validity().not_after.to_datetime(),
    };
    let issuer =
        rcgen::Issuer::from_ca_cert_der(&ca_der, key).map_err(|e| MaterialError::Malformed {
            file: "ca-cert.pem",
            reason: format!("cannot sign with it: {e}"),
        })?;
    Ok(CaMaterial {
        issuer,
        chain,
        roots,
        validity,
    })
}
