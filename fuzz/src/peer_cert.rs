//! `peer_cert`: how the filter reads the peer certificate and identity the
//! proxy reports: `connection.peer_certificate` (URL-encoded PEM) through
//! `cert::der_from_url_encoded_pem` and the minimal DER validity reader
//! `cert::validity_from_der`, and the URI SAN through `SpiffeIdentity::parse`
//! / `Peer::from_connection`.
//!
//! Input, by its first byte:
//! - `D` a DER certificate;
//! - `U` a URI SAN;
//! - anything else: the `connection.peer_certificate` property's text.
//!
//! Promises checked: a certificate x509-parser and webpki read has, by the
//! minimal reader, exactly x509-parser's notBefore / notAfter (or is refused
//! as inverted); a DER the reader accepts is read the same from its
//! URL-encoded PEM; the minimal reader's times are in 0000..=9999 and
//! ordered; `SpiffeIdentity::parse` accepts what the spiffe crate accepts
//! (plus its own 2048-byte and non-empty-path limits) with the same trust
//! domain and principal; the per-VM identity cache answers as a fresh parse.

use meshward_filter::cert::{self, CertError, CertSource, PeerCert};
use meshward_filter::peer::{IdentityCache, MAX_SPIFFE_ID_BYTES, PeerIdentity, SpiffeIdentity};
use meshward_filter::{Peer, UnixTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Unix seconds of 9999-12-31T23:59:59Z, the latest GeneralizedTime.
const MAX_TIME: i64 = 253_402_300_799;
/// Unix seconds of 0000-01-01T00:00:00Z.
const MIN_TIME: i64 = -62_167_219_200;

/// The target.
pub fn run(data: &[u8]) {
    match data.split_first() {
        Some((b'D', der)) => der_certificate(der),
        Some((b'U', uri)) => {
            if let Ok(uri) = std::str::from_utf8(uri) {
                uri_san(uri);
            }
        }
        _ => {
            if let Ok(text) = std::str::from_utf8(data) {
                property(text);
            }
        }
    }
}

fn property(text: &str) {
    let Ok(der) = cert::der_from_url_encoded_pem(text) else {
        return;
    };
    der_certificate(&der);
}

fn der_certificate(der: &[u8]) {
    let ours = cert::validity_from_der(der);
    if let Ok(v) = &ours {
        assert!(v.not_before <= v.not_after, "{v:?}");
        for t in [v.not_before.0, v.not_after.0] {
            assert!((MIN_TIME..=MAX_TIME).contains(&t), "{v:?}");
        }
        // The same certificate, as Envoy hands it over.
        let pem_text = pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()));
        let encoded =
            percent_encoding::utf8_percent_encode(&pem_text, percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        let decoded = cert::der_from_url_encoded_pem(&encoded).expect("our own encoding");
        assert_eq!(decoded, der);
        assert_eq!(cert::validity_from_der(&decoded).as_ref(), Ok(v));
    }
    // The oracle: a certificate both x509-parser and webpki (strict DER,
    // as the proxy's TLS stack) read. x509-parser alone takes some
    // malformed encodings the filter rightly refuses.
    let Ok((_, parsed)) = X509Certificate::from_der(der) else {
        return;
    };
    let strict = rustls_pki_types::CertificateDer::from(der);
    if webpki::EndEntityCert::try_from(&strict).is_err() {
        return;
    }
    let (nb, na) = (
        parsed.validity().not_before.timestamp(),
        parsed.validity().not_after.timestamp(),
    );
    match ours {
        Ok(v) => assert_eq!((v.not_before.0, v.not_after.0), (nb, na)),
        Err(CertError::InvertedValidity) => assert!(na < nb),
        // x509-parser (and webpki, which reads the validity only when it
        // verifies) take some encodings DER forbids — a Time tag of another
        // class, BER lengths — which the filter refuses on purpose.
        Err(CertError::UnexpectedTag { .. } | CertError::Der(_)) => {}
        Err(e) => panic!("x509-parser reads validity {nb}..{na}, the filter refuses: {e}"),
    }

    // The peer the policy sees, with this certificate's URI SAN.
    let uri = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
        });
    if let Some(uri) = uri {
        uri_san(uri);
    }
    let validity: Option<PeerCert> = ours
        .ok()
        .map(|v| crate::peer_cert(v, CertSource::PeerCertificateProperty));
    let peer = Peer::from_connection(true, uri, validity);
    assert_eq!(peer.cert, validity);
    let plaintext = Peer::from_connection(false, uri, validity);
    assert_eq!(*plaintext.identity, PeerIdentity::Plaintext);
    assert_eq!(plaintext.cert, None);
    if let Some(v) = validity {
        let t = v.validity.times_at(UnixTime(crate::NOW));
        assert_eq!(
            t.age_secs,
            crate::NOW.saturating_sub(v.validity.not_before.0)
        );
    }
}

fn uri_san(uri: &str) {
    let ours = SpiffeIdentity::parse(uri);
    let theirs = spiffe::SpiffeId::new(uri);
    match (&ours, &theirs) {
        (Ok(id), Ok(reference)) => {
            assert_eq!(
                id.principal(),
                format!("{}{}", reference.trust_domain_name(), reference.path())
            );
            assert_eq!(id.trust_domain(), reference.trust_domain_name());
            if let Some(ns) = id.namespace() {
                assert!(!ns.is_empty() && !ns.contains('/'));
                assert!(id.principal().contains(&format!("/ns/{ns}")));
            }
        }
        (Err(_), Err(_)) => {}
        (Err(_), Ok(reference))
            if reference.path().is_empty() || uri.len() > MAX_SPIFFE_ID_BYTES => {}
        _ => panic!("{uri:?}: filter {ours:?}, spiffe crate {theirs:?}"),
    }
    let peer = Peer::from_connection(true, Some(uri), None);
    match (&*peer.identity, &ours) {
        (PeerIdentity::Spiffe(a), Ok(b)) => assert_eq!(a, b),
        (PeerIdentity::Invalid { .. }, Err(_)) => {}
        (PeerIdentity::NoUriSan, _) if uri.is_empty() => {}
        (other, _) => panic!("{uri:?}: peer {other:?} but parse {ours:?}"),
    }
    let cache = IdentityCache::default();
    for _ in 0..2 {
        if !uri.is_empty() {
            assert_eq!(cache.identity(uri), peer.identity);
        }
    }
}
