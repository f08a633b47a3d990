//! Peer certificate validity: the DER reader against x509-parser on
//! certificates generated with rcgen, XFCC `Cert=` bound to the verified
//! certificate digest, and identity never taken from headers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use meshward_filter::cert::{self, CertSource};
use meshward_filter::xfcc;
use meshward_filter::{Peer, Policy, Request, UnixTime, Verdict};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use proptest::prelude::*;
use rcgen::{CertificateParams, KeyPair, SanType};
use time::OffsetDateTime;

struct Fixture {
    pem: String,
    der: Vec<u8>,
}

fn make_cert(uri: &str, not_before: i64, not_after: i64) -> Fixture {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    params.not_before = OffsetDateTime::from_unix_timestamp(not_before).unwrap();
    params.not_after = OffsetDateTime::from_unix_timestamp(not_after).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Fixture {
        pem: cert.pem(),
        der: cert.der().to_vec(),
    }
}

fn url_encode(pem: &str) -> String {
    utf8_percent_encode(pem, NON_ALPHANUMERIC).to_string()
}

const NOW: i64 = 1_750_000_000;
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const ADMIN: &str = "spiffe://cluster.local/ns/ops/sa/admin";

#[test]
fn der_validity_equals_x509_parser_on_generated_certificates() {
    // UTCTime (< 2050) and GeneralizedTime (>= 2050) encodings.
    for (nb, na) in [
        (NOW - 60, NOW + 86_400),
        (0, 1),
        (2_524_607_999, 2_524_608_000),
        (-631_152_000, 4_102_444_800),
    ] {
        let f = make_cert(WEB, nb, na);
        let ours = cert::validity_from_der(&f.der).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&f.der).unwrap();
        assert_eq!(ours.not_before.0, parsed.validity().not_before.timestamp());
        assert_eq!(ours.not_after.0, parsed.validity().not_after.timestamp());
        assert_eq!((ours.not_before.0, ours.not_after.0), (nb, na));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn der_reader_agrees_with_x509_parser(nb in -2_000_000_000i64..4_000_000_000, len in 1i64..400_000_000) {
        let f = make_cert(WEB, nb, nb + len);
        let ours = cert::validity_from_der(&f.der).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&f.der).unwrap();
        prop_assert_eq!(ours.not_before.0, parsed.validity().not_before.timestamp());
        prop_assert_eq!(ours.not_after.0, parsed.validity().not_after.timestamp());
    }

    #[test]
    fn truncated_certificates_are_errors_not_panics(cut in 0usize..400) {
        let f = make_cert(WEB, NOW, NOW + 10);
        let cut = cut.min(f.der.len().saturating_sub(1));
        prop_assert!(cert::validity_from_der(&f.der[..cut]).is_err());
    }
}

#[test]
fn url_encoded_pem_with_a_chain_reads_the_leaf() {
    let leaf = make_cert(WEB, NOW - 100, NOW + 100);
    let other = make_cert(ADMIN, 0, 10);
    let chain = format!("{}{}", leaf.pem, other.pem);
    let der = cert::der_from_url_encoded_pem(&url_encode(&chain)).unwrap();
    assert_eq!(der, leaf.der);
    assert!(cert::der_from_url_encoded_pem("%ff%fe").is_err());
    assert!(cert::der_from_url_encoded_pem("no pem here").is_err());
}

fn xfcc_element(by: &str, f: &Fixture, uri: &str) -> String {
    format!(
        r#"By={by};Hash={};Cert="{}";Subject="";URI={uri}"#,
        cert::sha256_hex(&f.der),
        url_encode(&f.pem)
    )
}

#[test]
fn xfcc_cert_of_the_verified_peer_gives_its_validity() {
    let real = make_cert(WEB, NOW - 3600, NOW + 20 * 3600);
    let header = xfcc_element("spiffe://cluster.local/ns/shop/sa/api", &real, WEB);
    let found = xfcc::peer_cert_from_xfcc(&header, &cert::sha256_hex(&real.der))
        .unwrap()
        .unwrap();
    assert_eq!(found.source, CertSource::XfccCert);
    assert_eq!(found.validity.times_at(UnixTime(NOW)).age_secs, 3600);
    // Digest comparison is case-insensitive (Envoy prints lower case hex).
    let upper = cert::sha256_hex(&real.der).to_uppercase();
    assert!(
        xfcc::peer_cert_from_xfcc(&header, &upper)
            .unwrap()
            .is_some()
    );
}

#[test]
fn xfcc_without_the_connection_digest_gives_no_validity() {
    let real = make_cert(WEB, NOW - 3600, NOW + 3600);
    let header = xfcc_element("x", &real, WEB);
    assert_eq!(xfcc::peer_cert_from_xfcc(&header, ""), Ok(None));
}

#[test]
fn xfcc_uri_spoofing_changes_neither_identity_nor_certificate_age() {
    // The verified peer is `web` with a 30 h old certificate. The client
    // prepends an XFCC element claiming to be `admin` with a fresh certificate.
    let real = make_cert(WEB, NOW - 30 * 3600, NOW + 3600);
    let forged = make_cert(ADMIN, NOW - 60, NOW + 86_400);
    let header = format!(
        "{},{}",
        xfcc_element("spiffe://cluster.local/ns/shop/sa/api", &forged, ADMIN),
        xfcc_element("spiffe://cluster.local/ns/shop/sa/api", &real, WEB)
    );
    let digest = cert::sha256_hex(&real.der);
    let validity = xfcc::peer_cert_from_xfcc(&header, &digest).unwrap();
    let peer = Peer::from_connection(true, Some(WEB), validity);
    assert_eq!(
        peer.spiffe().unwrap().principal(),
        "cluster.local/ns/shop/sa/web"
    );
    assert_eq!(
        peer.cert.unwrap().validity.not_before,
        UnixTime(NOW - 30 * 3600)
    );

    let only_admin = Policy::from_json(br#"{"rules":[{"name":"admin","action":"ALLOW","from":[{"principals":["cluster.local/ns/ops/sa/admin"]}]}]}"#).unwrap();
    let req = Request::http(Some("h"), Some("GET"), Some("/"), None);
    assert_eq!(
        only_admin.authorize(&peer, &req, UnixTime(NOW)).verdict,
        Verdict::Deny
    );

    let fresh_only = Policy::from_json(
        br#"{"rules":[{"name":"fresh","action":"ALLOW","when":{"maxCertAge":"24h"}}]}"#,
    )
    .unwrap();
    assert_eq!(
        fresh_only.authorize(&peer, &req, UnixTime(NOW)).verdict,
        Verdict::Deny
    );

    // Only the forged element: no element matches the verified digest.
    let forged_only = xfcc_element("x", &forged, WEB);
    assert_eq!(xfcc::peer_cert_from_xfcc(&forged_only, &digest), Ok(None));
}

#[test]
fn malformed_xfcc_is_an_error_the_shim_treats_as_unknown_validity() {
    let real = make_cert(WEB, NOW - 1, NOW + 1);
    let digest = cert::sha256_hex(&real.der);
    assert!(xfcc::peer_cert_from_xfcc("Cert=\"unterminated", &digest).is_err());
}
