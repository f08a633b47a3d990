//! A stand-in for the Kubernetes API server's service-account token signer:
//! generates a signing key, mints tokens shaped like projected
//! service-account tokens, and writes the public key as JWKS or PEM for the
//! signer's `[[authn.jwt]]` config.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair, RsaKeyPair};
use serde_json::json;

use super::ClientError;
use crate::authn::keys::JwtAlgorithm;

/// SubjectPublicKeyInfo prefix of an uncompressed P-256 point.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

enum SigningKey {
    Es256(EcdsaKeyPair),
    Rs256 {
        key: RsaKeyPair,
        spki_der: Vec<u8>,
        n: Vec<u8>,
        e: Vec<u8>,
    },
}

/// Mints service-account tokens.
pub struct TokenIssuer {
    issuer: String,
    kid: String,
    key: SigningKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("issuer", &self.issuer)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl TokenIssuer {
    /// A new issuer named `issuer` (the `iss` claim) with a fresh key.
    pub fn generate(issuer: &str, alg: JwtAlgorithm) -> Result<Self, ClientError> {
        let rng = SystemRandom::new();
        let err = |e: &dyn std::fmt::Display| ClientError::Token(e.to_string());
        let key = match alg {
            JwtAlgorithm::Es256 => {
                let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                    .map_err(|e| err(&e))?;
                SigningKey::Es256(
                    EcdsaKeyPair::from_pkcs8(
                        &ECDSA_P256_SHA256_FIXED_SIGNING,
                        pkcs8.as_ref(),
                        &rng,
                    )
                    .map_err(|e| err(&e))?,
                )
            }
            JwtAlgorithm::Rs256 => {
                use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
                use rsa::traits::PublicKeyParts;
                let der =
                    crate::issuer::builtin::generate_rsa_pkcs8(2048).map_err(ClientError::Token)?;
                let private = rsa::RsaPrivateKey::from_pkcs8_der(&der).map_err(|e| err(&e))?;
                let spki_der = private
                    .to_public_key()
                    .to_public_key_der()
                    .map_err(|e| err(&e))?
                    .as_bytes()
                    .to_vec();
                SigningKey::Rs256 {
                    key: RsaKeyPair::from_pkcs8(&der).map_err(|e| err(&e))?,
                    spki_der,
                    n: private.n().to_bytes_be(),
                    e: private.e().to_bytes_be(),
                }
            }
        };
        let digest = ring::digest::digest(&ring::digest::SHA256, &spki(&key));
        let kid = hex::encode(digest.as_ref().get(..8).unwrap_or_default());
        Ok(Self {
            issuer: issuer.to_string(),
            kid,
            key,
            rng,
        })
    }

    /// The `iss` claim.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The `kid` of the key.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The algorithm.
    pub fn algorithm(&self) -> JwtAlgorithm {
        match self.key {
            SigningKey::Es256(_) => JwtAlgorithm::Es256,
            SigningKey::Rs256 { .. } => JwtAlgorithm::Rs256,
        }
    }

    /// The public key as SubjectPublicKeyInfo DER.
    pub fn public_key_der(&self) -> Vec<u8> {
        spki(&self.key)
    }

    /// The public key as a PEM `PUBLIC KEY` block.
    pub fn public_key_pem(&self) -> String {
        crate::pem_encode("PUBLIC KEY", &self.public_key_der())
    }

    /// The public key as a JWKS document.
    pub fn jwks_json(&self) -> String {
        let jwk = match &self.key {
            SigningKey::Es256(k) => {
                let point = k.public_key().as_ref();
                let x = point.get(1..33).unwrap_or_default();
                let y = point.get(33..65).unwrap_or_default();
                json!({"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.kid,
                       "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y)})
            }
            SigningKey::Rs256 { n, e, .. } => {
                json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid,
                       "n": URL_SAFE_NO_PAD.encode(n), "e": URL_SAFE_NO_PAD.encode(e)})
            }
        };
        json!({ "keys": [jwk] }).to_string()
    }

    /// Write [`TokenIssuer::jwks_json`] to `path`.
    pub fn write_jwks(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.jwks_json())
    }

    /// Write [`TokenIssuer::public_key_pem`] to `path`.
    pub fn write_public_key_pem(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.public_key_pem())
    }

    /// The claims of a projected service-account token for `namespace/sa`,
    /// audience `audience`, issued at `now_unix`, valid `ttl_secs`.
    pub fn service_account_claims(
        &self,
        namespace: &str,
        service_account: &str,
        audience: &str,
        now_unix: i64,
        ttl_secs: i64,
    ) -> serde_json::Value {
        json!({
            "iss": self.issuer,
            "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
            "aud": [audience],
            "iat": now_unix,
            "nbf": now_unix,
            "exp": now_unix + ttl_secs,
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": service_account, "uid": "00000000-0000-0000-0000-000000000000"},
                "pod": {"name": format!("{service_account}-0"), "uid": "00000000-0000-0000-0000-000000000001"},
            },
        })
    }

    /// A valid token for `namespace/service_account`, audience `istio-ca`,
    /// valid for an hour from `now_unix`.
    pub fn token_for(
        &self,
        namespace: &str,
        service_account: &str,
        now_unix: i64,
    ) -> Result<String, ClientError> {
        self.sign_claims(&self.service_account_claims(
            namespace,
            service_account,
            "istio-ca",
            now_unix,
            3600,
        ))
    }

    /// Sign `claims` with the usual header (`alg`, `kid`, `typ: JWT`).
    pub fn sign_claims(&self, claims: &serde_json::Value) -> Result<String, ClientError> {
        let header = json!({"alg": self.algorithm().jose(), "kid": self.kid, "typ": "JWT"});
        self.sign_raw(&header, claims)
    }

    /// Sign any header and claims with this key (for tests that forge
    /// headers).
    pub fn sign_raw(
        &self,
        header: &serde_json::Value,
        claims: &serde_json::Value,
    ) -> Result<String, ClientError> {
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = match &self.key {
            SigningKey::Es256(k) => k
                .sign(&self.rng, signing_input.as_bytes())
                .map_err(|e| ClientError::Token(e.to_string()))?
                .as_ref()
                .to_vec(),
            SigningKey::Rs256 { key, .. } => {
                let mut sig = vec![0; key.public().modulus_len()];
                key.sign(
                    &ring::signature::RSA_PKCS1_SHA256,
                    &self.rng,
                    signing_input.as_bytes(),
                    &mut sig,
                )
                .map_err(|e| ClientError::Token(e.to_string()))?;
                sig
            }
        };
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        ))
    }
}

fn spki(key: &SigningKey) -> Vec<u8> {
    match key {
        SigningKey::Es256(k) => {
            let mut v = P256_SPKI_PREFIX.to_vec();
            v.extend_from_slice(k.public_key().as_ref());
            v
        }
        SigningKey::Rs256 { spki_der, .. } => spki_der.clone(),
    }
}
