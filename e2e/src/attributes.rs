//! What a proxy tells the filter about a connection, computed from the real
//! TLS peer certificate the way Envoy computes its attributes, and the
//! `x-forwarded-client-cert` header Envoy writes with `SANITIZE_SET`.

use std::net::SocketAddr;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::host::Properties;

/// Characters Envoy leaves alone when it URL-encodes a PEM (RFC 3986 unreserved).
const PEM_ESCAPE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A TCP connection as the proxy saw it.
#[derive(Debug, Clone)]
pub struct ConnectionInfo<'a> {
    /// Envoy's `connection.id`.
    pub id: u64,
    /// Downstream peer address (`source.*`).
    pub source: SocketAddr,
    /// Local address the peer reached (`destination.*`).
    pub destination: SocketAddr,
    /// TLS version when the connection is TLS.
    pub tls_version: Option<&'a str>,
    /// The peer's leaf certificate (DER), when it presented one.
    pub peer_cert: Option<&'a [u8]>,
    /// The proxy's own leaf certificate (DER), when TLS.
    pub local_cert: Option<&'a [u8]>,
    /// Whether to expose `connection.peer_certificate` (recent Envoy); when
    /// false the filter has to find the validity in XFCC `Cert=`.
    pub expose_peer_certificate: bool,
}

/// The first URI SAN of a DER certificate.
pub fn first_uri_san(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) => Some((*u).to_owned()),
        _ => None,
    })
}

/// Lower-case hex SHA-256 of a DER certificate.
pub fn sha256_hex(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The certificate as URL-encoded PEM (XFCC `Cert=`, `connection.peer_certificate`).
pub fn url_encoded_pem(der: &[u8]) -> String {
    let pem = pem_of(der);
    utf8_percent_encode(&pem, PEM_ESCAPE).to_string()
}

fn pem_of(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Envoy's connection attributes (`connection.*`, `source.*`, `destination.*`).
pub fn connection_properties(info: &ConnectionInfo<'_>) -> Properties {
    let mut p = Properties::new();
    p.set_int("connection.id", i64::try_from(info.id).unwrap_or(i64::MAX))
        .set_str("source.address", info.source.to_string())
        .set_int("source.port", i64::from(info.source.port()))
        .set_str("destination.address", info.destination.to_string())
        .set_int("destination.port", i64::from(info.destination.port()))
        .set_bool("connection.mtls", info.peer_cert.is_some());
    if let Some(v) = info.tls_version {
        p.set_str("connection.tls_version", v);
    }
    if let Some(uri) = info.local_cert.and_then(first_uri_san) {
        p.set_str("connection.uri_san_local_certificate", uri);
    }
    if let Some(peer) = info.peer_cert {
        if let Some(uri) = first_uri_san(peer) {
            p.set_str("connection.uri_san_peer_certificate", uri);
        }
        p.set_str(
            "connection.sha256_peer_certificate_digest",
            sha256_hex(peer),
        );
        if info.expose_peer_certificate {
            p.set_str("connection.peer_certificate", url_encoded_pem(peer));
        }
    }
    p
}

/// The `x-forwarded-client-cert` value Envoy sets with `SANITIZE_SET` and
/// `Cert`, `Hash`, `URI` and `By` details; `None` without a peer certificate
/// (then Envoy removes the header).
pub fn xfcc_sanitize_set(local_cert: Option<&[u8]>, peer_cert: Option<&[u8]>) -> Option<String> {
    let peer = peer_cert?;
    let mut parts = Vec::new();
    if let Some(by) = local_cert.and_then(first_uri_san) {
        parts.push(format!("By={by}"));
    }
    parts.push(format!("Hash={}", sha256_hex(peer)));
    parts.push(format!("Cert=\"{}\"", url_encoded_pem(peer)));
    if let Some(uri) = first_uri_san(peer) {
        parts.push(format!("URI={uri}"));
    }
    Some(parts.join(";"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::PropValue;

    fn cert(uri: &str) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn attributes_come_from_the_peer_certificate() {
        let peer = cert("spiffe://cluster.local/ns/shop/sa/frontend");
        let info = ConnectionInfo {
            id: 7,
            source: "127.0.0.1:5000".parse().unwrap(),
            destination: "127.0.0.1:8443".parse().unwrap(),
            tls_version: Some("TLSv1_3"),
            peer_cert: Some(&peer),
            local_cert: None,
            expose_peer_certificate: false,
        };
        let p = connection_properties(&info);
        assert_eq!(
            p.get_dotted("connection.uri_san_peer_certificate"),
            Some(PropValue::Str(
                "spiffe://cluster.local/ns/shop/sa/frontend".into()
            ))
        );
        assert_eq!(p.get_dotted("connection.mtls"), Some(PropValue::Bool(true)));
        assert_eq!(p.get_dotted("destination.port"), Some(PropValue::Int(8443)));
        assert_eq!(
            p.get_dotted("connection.sha256_peer_certificate_digest"),
            Some(PropValue::Str(sha256_hex(&peer)))
        );
        assert_eq!(p.get_dotted("connection.peer_certificate"), None);
    }

    #[test]
    fn plaintext_connection_is_not_mtls() {
        let info = ConnectionInfo {
            id: 1,
            source: "127.0.0.1:5000".parse().unwrap(),
            destination: "127.0.0.1:8443".parse().unwrap(),
            tls_version: None,
            peer_cert: None,
            local_cert: None,
            expose_peer_certificate: true,
        };
        let p = connection_properties(&info);
        assert_eq!(
            p.get_dotted("connection.mtls"),
            Some(PropValue::Bool(false))
        );
        assert_eq!(p.get_dotted("connection.uri_san_peer_certificate"), None);
        assert_eq!(xfcc_sanitize_set(None, None), None);
    }

    #[test]
    fn xfcc_carries_hash_cert_and_uri() {
        let peer = cert("spiffe://cluster.local/ns/a/sa/b");
        let x = xfcc_sanitize_set(None, Some(&peer)).unwrap();
        assert!(x.starts_with(&format!("Hash={}", sha256_hex(&peer))));
        assert!(x.contains("Cert=\"-----BEGIN%20CERTIFICATE-----%0A"));
        assert!(x.ends_with("URI=spiffe://cluster.local/ns/a/sa/b"));
    }
}
