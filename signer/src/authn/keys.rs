//! Public keys that may sign service-account tokens, read from a JWKS
//! document or PEM `PUBLIC KEY` blocks. Only RSA (>= 2048 bits, for RS256)
//! and P-256 (for ES256) keys are kept; each key is bound to the one
//! algorithm it can verify, so a token cannot pick another.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

/// Token signature algorithms the signer accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// ECDSA P-256 with SHA-256.
    Es256,
}

impl JwtAlgorithm {
    /// Parse a JOSE `alg`; anything but RS256 and ES256 is `None`.
    pub fn from_jose(alg: &str) -> Option<Self> {
        match alg {
            "RS256" => Some(Self::Rs256),
            "ES256" => Some(Self::Es256),
            _ => None,
        }
    }

    /// The JOSE name.
    pub fn jose(&self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Es256 => "ES256",
        }
    }
}

/// One verification key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerificationKey {
    /// `kid`, when the source gave one.
    pub kid: Option<String>,
    /// The only algorithm this key verifies.
    pub alg: JwtAlgorithm,
    material: KeyMaterial,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyMaterial {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// Uncompressed SEC1 point (0x04 || x || y).
    P256 {
        point: Vec<u8>,
    },
}

/// Why a key source is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// JSON does not parse as a JWKS.
    #[error("JWKS: {0}")]
    Jwks(String),
    /// PEM does not parse.
    #[error("PEM public key: {0}")]
    Pem(String),
    /// A key is of a type or size that is not allowed.
    #[error("key {kid}: {reason}")]
    Unsupported {
        /// The key's `kid` or position.
        kid: String,
        /// Why.
        reason: String,
    },
    /// No usable key at all.
    #[error("no usable RS256/ES256 key found")]
    Empty,
}

impl VerificationKey {
    /// An RSA key from big-endian modulus and exponent.
    pub fn rsa(kid: Option<String>, n: Vec<u8>, e: Vec<u8>) -> Result<Self, KeyError> {
        let n = strip_leading_zeros(n);
        let bits = n.len() * 8;
        if bits < 2048 {
            return Err(KeyError::Unsupported {
                kid: kid.unwrap_or_default(),
                reason: format!("RSA key of about {bits} bits; at least 2048 required"),
            });
        }
        Ok(Self {
            kid,
            alg: JwtAlgorithm::Rs256,
            material: KeyMaterial::Rsa { n, e },
        })
    }

    /// A P-256 key from its affine coordinates.
    pub fn p256(kid: Option<String>, x: &[u8], y: &[u8]) -> Result<Self, KeyError> {
        if x.len() != 32 || y.len() != 32 {
            return Err(KeyError::Unsupported {
                kid: kid.unwrap_or_default(),
                reason: "P-256 coordinates must be 32 bytes each".to_string(),
            });
        }
        let mut point = Vec::with_capacity(65);
        point.push(0x04);
        point.extend_from_slice(x);
        point.extend_from_slice(y);
        Ok(Self {
            kid,
            alg: JwtAlgorithm::Es256,
            material: KeyMaterial::P256 { point },
        })
    }

    /// Verify `signature` over `message` with this key's algorithm.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        use ring::signature as sig;
        match &self.material {
            KeyMaterial::Rsa { n, e } => sig::RsaPublicKeyComponents { n, e }
                .verify(&sig::RSA_PKCS1_2048_8192_SHA256, message, signature)
                .is_ok(),
            KeyMaterial::P256 { point } => {
                sig::UnparsedPublicKey::new(&sig::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, signature)
                    .is_ok()
            }
        }
    }
}

fn strip_leading_zeros(mut v: Vec<u8>) -> Vec<u8> {
    let zeros = v.iter().take_while(|b| **b == 0).count();
    v.drain(..zeros);
    v
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

/// Parse a JWKS document. Keys of other types (e.g. `oct`, other curves) are
/// skipped with their reason in the returned list; a document with no usable
/// key is an error.
pub fn parse_jwks(json: &str) -> Result<(Vec<VerificationKey>, Vec<KeyError>), KeyError> {
    let doc: Jwks = serde_json::from_str(json).map_err(|e| KeyError::Jwks(e.to_string()))?;
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for (i, value) in doc.keys.into_iter().enumerate() {
        match jwk_to_key(value, i) {
            Ok(k) => keys.push(k),
            Err(e) => skipped.push(e),
        }
    }
    if keys.is_empty() {
        return Err(KeyError::Empty);
    }
    Ok((keys, skipped))
}

fn jwk_to_key(value: serde_json::Value, index: usize) -> Result<VerificationKey, KeyError> {
    let jwk: Jwk = serde_json::from_value(value).map_err(|e| KeyError::Unsupported {
        kid: format!("#{index}"),
        reason: e.to_string(),
    })?;
    let name = jwk.kid.clone().unwrap_or_else(|| format!("#{index}"));
    let bad = |reason: String| KeyError::Unsupported {
        kid: name.clone(),
        reason,
    };
    if let Some(u) = &jwk.use_
        && u != "sig"
    {
        return Err(bad(format!("use {u:?} is not \"sig\"")));
    }
    let b64 = |field: &Option<String>, what: &str| -> Result<Vec<u8>, KeyError> {
        let text = field
            .as_deref()
            .ok_or_else(|| bad(format!("missing {what}")))?;
        URL_SAFE_NO_PAD
            .decode(text.trim_end_matches('='))
            .map_err(|e| bad(format!("{what} is not base64url: {e}")))
    };
    let key = match jwk.kty.as_str() {
        "RSA" => VerificationKey::rsa(jwk.kid.clone(), b64(&jwk.n, "n")?, b64(&jwk.e, "e")?)?,
        "EC" => {
            if jwk.crv.as_deref() != Some("P-256") {
                return Err(bad(format!("curve {:?} is not P-256", jwk.crv)));
            }
            VerificationKey::p256(jwk.kid.clone(), &b64(&jwk.x, "x")?, &b64(&jwk.y, "y")?)?
        }
        other => return Err(bad(format!("key type {other:?} is not RSA or EC"))),
    };
    if let Some(alg) = &jwk.alg
        && alg != key.alg.jose()
    {
        return Err(bad(format!(
            "alg {alg:?} does not match the key type (expected {})",
            key.alg.jose()
        )));
    }
    Ok(key)
}

/// Parse PEM `PUBLIC KEY` blocks (SubjectPublicKeyInfo) into keys without a
/// `kid`.
pub fn parse_pem_public_keys(pem_text: &str) -> Result<Vec<VerificationKey>, KeyError> {
    let blocks = pem::parse_many(pem_text).map_err(|e| KeyError::Pem(e.to_string()))?;
    let mut keys = Vec::new();
    for (i, block) in blocks.iter().enumerate() {
        if block.tag() != "PUBLIC KEY" {
            return Err(KeyError::Pem(format!(
                "block {i} is {:?}, expected \"PUBLIC KEY\"",
                block.tag()
            )));
        }
        keys.push(spki_to_key(block.contents(), i)?);
    }
    if keys.is_empty() {
        return Err(KeyError::Empty);
    }
    Ok(keys)
}

fn spki_to_key(der: &[u8], index: usize) -> Result<VerificationKey, KeyError> {
    let bad = |reason: String| KeyError::Unsupported {
        kid: format!("PEM block {index}"),
        reason,
    };
    let (_, spki) = SubjectPublicKeyInfo::from_der(der).map_err(|e| bad(e.to_string()))?;
    match spki.parsed().map_err(|e| bad(e.to_string()))? {
        PublicKey::RSA(rsa) => {
            VerificationKey::rsa(None, rsa.modulus.to_vec(), rsa.exponent.to_vec())
        }
        PublicKey::EC(point) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .ok_or_else(|| bad("EC key without a named curve".to_string()))?;
            if curve != x509_parser::oid_registry::OID_EC_P256 {
                return Err(bad(format!("EC curve {curve} is not P-256")));
            }
            let data = point.data();
            match (data.first(), data.get(1..33), data.get(33..65), data.len()) {
                (Some(0x04), Some(x), Some(y), 65) => VerificationKey::p256(None, x, y),
                _ => Err(bad("P-256 point is not uncompressed".to_string())),
            }
        }
        _ => Err(bad("only RSA and P-256 public keys are allowed".to_string())),
    }
}
