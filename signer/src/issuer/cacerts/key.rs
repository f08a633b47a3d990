//! Private keys as plugged-in CAs ship them: PKCS#8 (`PRIVATE KEY`), PKCS#1
//! (`RSA PRIVATE KEY`, what `openssl genrsa` and Istio's own tooling write)
//! or SEC1 (`EC PRIVATE KEY`). The signing library takes PKCS#8 only, so the
//! other two are wrapped into a PKCS#8 PrivateKeyInfo first.

use rcgen::KeyPair;
use rustls_pki_types::PrivatePkcs8KeyDer;

/// rsaEncryption, then NULL parameters.
const RSA_ALG_ID: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];
/// id-ecPublicKey.
const EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// prime256v1.
const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// secp384r1.
const P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// Parses the one private key in a PEM text.
pub fn parse_private_key(pem_text: &[u8]) -> Result<KeyPair, String> {
    let blocks = pem::parse_many(pem_text).map_err(|e| format!("not PEM: {e}"))?;
    let keys: Vec<_> = blocks
        .into_iter()
        .filter(|b| b.tag().ends_with("PRIVATE KEY"))
        .collect();
    let [block] = <[_; 1]>::try_from(keys)
        .map_err(|k| format!("expected one private key, found {}", k.len()))?;
    let der = block.contents();
    match block.tag() {
        "PRIVATE KEY" => from_pkcs8(der),
        "RSA PRIVATE KEY" => from_pkcs8(&pkcs8(RSA_ALG_ID, der)),
        "EC PRIVATE KEY" => {
            // The curve is named inside the SEC1 key too; the signing library
            // refuses a wrapping that names another one, so try both.
            [P256, P384]
                .iter()
                .find_map(|curve| from_pkcs8(&pkcs8(&[EC_PUBLIC_KEY, curve].concat(), der)).ok())
                .ok_or_else(|| "EC key is not on P-256 or P-384, or is malformed".to_owned())
        }
        "ENCRYPTED PRIVATE KEY" => Err("encrypted private keys are not supported".to_owned()),
        other => Err(format!("unsupported key type {other:?}")),
    }
}

fn from_pkcs8(der: &[u8]) -> Result<KeyPair, String> {
    KeyPair::try_from(&PrivatePkcs8KeyDer::from(der)).map_err(|e| format!("unusable key: {e}"))
}

/// PKCS#8 v1 PrivateKeyInfo { version 0, algorithm, privateKey }.
fn pkcs8(alg_id_contents: &[u8], key: &[u8]) -> Vec<u8> {
    let mut body = vec![0x02, 0x01, 0x00];
    body.extend(tlv(0x30, alg_id_contents));
    body.extend(tlv(0x04, key));
    tlv(0x30, &body)
}

/// DER tag-length-value.
fn tlv(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = value.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        let significant = bytes.get(skip..).unwrap_or_default();
        out.push(0x80 | significant.len() as u8);
        out.extend_from_slice(significant);
    }
    out.extend_from_slice(value);
    out
}

/// The private key inside a PKCS#8 PrivateKeyInfo (test helper: how to make
/// PKCS#1 / SEC1 files from generated PKCS#8 keys).
#[cfg(test)]
pub(crate) fn unwrap_pkcs8(der: &[u8]) -> Vec<u8> {
    use x509_parser::der_parser::ber::BerObjectContent;
    let (_, obj) = x509_parser::der_parser::parse_der(der).unwrap();
    let BerObjectContent::Sequence(items) = obj.content else {
        panic!("not a sequence")
    };
    items[2].as_slice().unwrap().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem_of(tag: &str, der: &[u8]) -> Vec<u8> {
        crate::pem_encode(tag, der).into_bytes()
    }

    #[test]
    fn pkcs8_sec1_and_pkcs1_keys_load_to_the_same_public_key() {
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
        ] {
            let key = KeyPair::generate_for(alg).unwrap();
            let p8 = key.serialize_der();
            let a = parse_private_key(&pem_of("PRIVATE KEY", &p8)).unwrap();
            let b = parse_private_key(&pem_of("EC PRIVATE KEY", &unwrap_pkcs8(&p8))).unwrap();
            assert_eq!(a.public_key_raw(), key.public_key_raw());
            assert_eq!(b.public_key_raw(), key.public_key_raw());
        }
        let rsa = crate::issuer::builtin::generate_rsa_pkcs8(2048).unwrap();
        let a = parse_private_key(&pem_of("PRIVATE KEY", &rsa)).unwrap();
        let b = parse_private_key(&pem_of("RSA PRIVATE KEY", &unwrap_pkcs8(&rsa))).unwrap();
        assert_eq!(a.public_key_raw(), b.public_key_raw());
    }

    #[test]
    fn files_with_zero_or_two_keys_are_refused() {
        let k1 = KeyPair::generate().unwrap().serialize_pem();
        let k2 = KeyPair::generate().unwrap().serialize_pem();
        assert!(parse_private_key(format!("{k1}{k2}").as_bytes()).is_err());
        assert!(parse_private_key(b"").is_err());
        assert!(parse_private_key(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n").is_err());
    }

    #[test]
    fn garbage_inside_a_key_block_is_an_error_not_a_panic() {
        for tag in ["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"] {
            assert!(parse_private_key(&pem_of(tag, &[0x30, 0x82, 0xff])).is_err());
            assert!(parse_private_key(&pem_of(tag, &[0u8; 300])).is_err());
        }
    }
}
