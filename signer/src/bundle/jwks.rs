//! The SPIFFE bundle format (SPIFFE Trust Domain and Bundle, §4): a JWK Set
//! with `spiffe_sequence` and `spiffe_refresh_hint`, one JWK per root with
//! `use: "x509-svid"`, the key's public parameters, and `x5c` holding exactly
//! that one certificate as standard (padded) base64 DER. X.509-SVID keys
//! carry no `kid`.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

use super::{BundleError, TrustBundle};

const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_ED25519: &str = "1.3.101.112";

/// A SPIFFE bundle document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwks {
    /// One JWK per root.
    pub keys: Vec<Jwk>,
    /// `spiffe_sequence`.
    pub spiffe_sequence: u64,
    /// `spiffe_refresh_hint`, seconds.
    pub spiffe_refresh_hint: u64,
}

/// One root as a JWK. Unknown members are kept out on output and ignored on
/// input (the spec lets other key uses and members exist).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// `x509-svid`.
    #[serde(rename = "use")]
    pub use_: String,
    /// `EC`, `RSA` or `OKP`.
    pub kty: String,
    /// Curve (`P-256`, `P-384`, `Ed25519`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    /// EC / OKP x coordinate, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    /// EC y coordinate, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    /// RSA modulus, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    /// RSA exponent, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
    /// Key ID: never set for x509-svid keys; read only to refuse it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// The certificate, standard base64 DER; exactly one.
    #[serde(default)]
    pub x5c: Vec<String>,
}

impl Jwks {
    /// The JWK Set of a bundle.
    pub fn from_bundle(bundle: &TrustBundle) -> Result<Self, BundleError> {
        let keys = bundle
            .roots()
            .iter()
            .enumerate()
            .map(|(index, der)| {
                jwk_for_root(der).map_err(|reason| BundleError::BadRoot { index, reason })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            keys,
            spiffe_sequence: bundle.sequence(),
            spiffe_refresh_hint: bundle.refresh_hint().as_secs(),
        })
    }

    /// JSON text.
    pub fn to_json(&self) -> Result<String, BundleError> {
        serde_json::to_string_pretty(self).map_err(|e| BundleError::Jwks(e.to_string()))
    }

    /// Parse a SPIFFE bundle and return its X.509 roots, checking what the
    /// spec requires of x509-svid keys: one `x5c`, no `kid`, and key
    /// parameters that match the certificate. Keys of other uses are skipped.
    pub fn parse_x509_roots(
        json: &str,
    ) -> Result<(Self, Vec<CertificateDer<'static>>), BundleError> {
        let doc: Jwks = serde_json::from_str(json).map_err(|e| BundleError::Jwks(e.to_string()))?;
        let mut roots = Vec::new();
        for (i, k) in doc.keys.iter().enumerate() {
            if k.use_ != "x509-svid" {
                continue;
            }
            if k.kid.is_some() {
                return Err(BundleError::Jwks(format!(
                    "key {i}: x509-svid key has a kid"
                )));
            }
            let [b64] = k.x5c.as_slice() else {
                return Err(BundleError::Jwks(format!(
                    "key {i}: x5c must hold exactly one certificate, has {}",
                    k.x5c.len()
                )));
            };
            let der = STANDARD.decode(b64).map_err(|e| {
                BundleError::Jwks(format!("key {i}: x5c is not standard base64: {e}"))
            })?;
            let der = CertificateDer::from(der);
            let expected =
                jwk_for_root(&der).map_err(|e| BundleError::Jwks(format!("key {i}: {e}")))?;
            if expected != *k {
                return Err(BundleError::Jwks(format!(
                    "key {i}: key parameters do not match the x5c certificate"
                )));
            }
            roots.push(der);
        }
        Ok((doc, roots))
    }
}

/// The JWK for one root certificate.
pub fn jwk_for_root(der: &CertificateDer<'_>) -> Result<Jwk, String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let spki = cert.public_key();
    let x5c = vec![STANDARD.encode(der.as_ref())];
    let alg_oid = spki.algorithm.algorithm.to_id_string();
    if alg_oid == OID_ED25519 {
        return Ok(Jwk {
            use_: "x509-svid".to_string(),
            kty: "OKP".to_string(),
            crv: Some("Ed25519".to_string()),
            x: Some(URL_SAFE_NO_PAD.encode(&spki.subject_public_key.data)),
            y: None,
            n: None,
            e: None,
            kid: None,
            x5c,
        });
    }
    match spki
        .parsed()
        .map_err(|e| format!("unreadable public key: {e}"))?
    {
        PublicKey::EC(point) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .unwrap_or_default();
            let (crv, len) = match curve.as_str() {
                OID_P256 => ("P-256", 32),
                OID_P384 => ("P-384", 48),
                other => return Err(format!("unsupported EC curve {other:?}")),
            };
            let data = point.data();
            let coords = match data.split_first() {
                Some((4, rest)) if rest.len() == 2 * len => rest,
                _ => return Err("EC point is not an uncompressed point of the curve's size".into()),
            };
            let (x, y) = coords.split_at(len);
            Ok(Jwk {
                use_: "x509-svid".to_string(),
                kty: "EC".to_string(),
                crv: Some(crv.to_string()),
                x: Some(URL_SAFE_NO_PAD.encode(x)),
                y: Some(URL_SAFE_NO_PAD.encode(y)),
                n: None,
                e: None,
                kid: None,
                x5c,
            })
        }
        PublicKey::RSA(rsa) => Ok(Jwk {
            use_: "x509-svid".to_string(),
            kty: "RSA".to_string(),
            crv: None,
            x: None,
            y: None,
            n: Some(URL_SAFE_NO_PAD.encode(strip_zeros(rsa.modulus))),
            e: Some(URL_SAFE_NO_PAD.encode(strip_zeros(rsa.exponent))),
            kid: None,
            x5c,
        }),
        _ => Err(format!("unsupported public key algorithm {alg_oid}")),
    }
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    b.get(start..).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::test_roots::root;
    use super::*;

    #[test]
    fn jwks_roundtrips_ec_and_ed25519_roots() {
        let roots = vec![
            root(&rcgen::PKCS_ECDSA_P256_SHA256, "p256"),
            root(&rcgen::PKCS_ECDSA_P384_SHA384, "p384"),
            root(&rcgen::PKCS_ED25519, "ed"),
        ];
        let b = TrustBundle::new("td", roots.clone(), 3, Duration::from_secs(300)).unwrap();
        let json = b.to_jwks().unwrap().to_json().unwrap();
        let (doc, parsed) = Jwks::parse_x509_roots(&json).unwrap();
        assert_eq!(parsed, roots);
        assert_eq!(doc.spiffe_sequence, 3);
        assert_eq!(doc.spiffe_refresh_hint, 300);
        let kty: Vec<_> = doc.keys.iter().map(|k| k.kty.as_str()).collect();
        assert_eq!(kty, ["EC", "EC", "OKP"]);
    }

    #[test]
    fn jwks_with_two_certs_in_x5c_is_refused() {
        let a = root(&rcgen::PKCS_ECDSA_P256_SHA256, "a");
        let b = TrustBundle::new("td", vec![a], 1, Duration::from_secs(60)).unwrap();
        let mut doc = b.to_jwks().unwrap();
        let dup = doc.keys[0].x5c[0].clone();
        doc.keys[0].x5c.push(dup);
        let json = serde_json::to_string(&doc).unwrap();
        assert!(Jwks::parse_x509_roots(&json).is_err());
    }

    #[test]
    fn jwks_with_kid_on_x509_key_is_refused() {
        let a = root(&rcgen::PKCS_ECDSA_P256_SHA256, "a");
        let b = TrustBundle::new("td", vec![a], 1, Duration::from_secs(60)).unwrap();
        let mut doc = b.to_jwks().unwrap();
        doc.keys[0].kid = Some("k".into());
        let json = serde_json::to_string(&doc).unwrap();
        assert!(Jwks::parse_x509_roots(&json).is_err());
    }

    #[test]
    fn jwks_whose_key_params_do_not_match_x5c_is_refused() {
        let a = root(&rcgen::PKCS_ECDSA_P256_SHA256, "a");
        let c = root(&rcgen::PKCS_ECDSA_P256_SHA256, "c");
        let b = TrustBundle::new("td", vec![a, c], 1, Duration::from_secs(60)).unwrap();
        let mut doc = b.to_jwks().unwrap();
        let other_x = doc.keys[1].x.clone();
        doc.keys[0].x = other_x;
        let json = serde_json::to_string(&doc).unwrap();
        assert!(Jwks::parse_x509_roots(&json).is_err());
    }
}
