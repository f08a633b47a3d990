//! `xfcc`: the filter's `x-forwarded-client-cert` parser and the lookup of
//! the verified peer certificate in it (`xfcc::parse`,
//! `xfcc::peer_cert_from_xfcc`).
//!
//! Input: the header value, optionally followed by [`SEP`](crate::SEP) and a
//! peer certificate digest.
//!
//! A parsed header must: have only non-empty elements with non-empty,
//! trimmed keys; parse to the same elements when written back (every value
//! quoted and escaped). The lookup must: find nothing without a digest;
//! find, for every `Cert=` that decodes, exactly that certificate's
//! validity when asked with its SHA-256 (either case); and for any other
//! digest give only a certificate with that digest.

use meshward_filter::cert::{self, CertSource};
use meshward_filter::xfcc::{self, XfccElement};

use crate::parts;

/// The target.
pub fn run(data: &[u8]) {
    let p = parts(data, 2);
    let Ok(header) = std::str::from_utf8(p[0]) else {
        return;
    };
    let digest = p
        .get(1)
        .and_then(|d| std::str::from_utf8(d).ok())
        .unwrap_or("");

    let parsed = xfcc::parse(header);
    if let Ok(elements) = &parsed {
        round_trip(header, elements);
    }

    assert_eq!(xfcc::peer_cert_from_xfcc(header, ""), Ok(None));
    if let Ok(Some(found)) = xfcc::peer_cert_from_xfcc(header, digest) {
        // Only a certificate whose digest was asked for.
        let elements = parsed.as_ref().expect("a match needs a parsed header");
        let matching = elements
            .iter()
            .flat_map(|e| e.values("Cert"))
            .filter_map(|v| cert::der_from_url_encoded_pem(v).ok())
            .find(|der| cert::sha256_hex(der).eq_ignore_ascii_case(digest))
            .expect("a Cert= with the digest asked for");
        assert_eq!(Ok(found.validity), cert::validity_from_der(&matching));
    }
    let Ok(elements) = &parsed else {
        return;
    };
    for value in elements.iter().flat_map(|e| e.values("Cert")).take(4) {
        let Ok(der) = cert::der_from_url_encoded_pem(value) else {
            continue;
        };
        let digest = cert::sha256_hex(&der);
        let expected = cert::validity_from_der(&der).map(Some).map_err(|_| ());
        let read = |digest: &str| {
            xfcc::peer_cert_from_xfcc(header, digest)
                .map(|found| {
                    found.map(|c| {
                        assert_eq!(c.source, CertSource::XfccCert);
                        c.validity
                    })
                })
                .map_err(|_| ())
        };
        assert_eq!(read(&digest), expected, "digest {digest}");
        assert_eq!(read(&digest.to_ascii_uppercase()), expected);
    }
}

/// Writes `elements` back as a header, every value quoted, and parses it.
fn round_trip(header: &str, elements: &[XfccElement]) {
    let written = elements
        .iter()
        .map(|element| {
            assert!(
                element.pairs().next().is_some(),
                "an empty element from {header:?}"
            );
            element
                .pairs()
                .map(|(k, v)| {
                    assert!(!k.is_empty() && k.trim() == k, "key {k:?} from {header:?}");
                    format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
                })
                .collect::<Vec<_>>()
                .join(";")
        })
        .collect::<Vec<_>>()
        .join(",");
    let again = xfcc::parse(&written).expect("a written-back header parses");
    assert_eq!(again, elements, "{header:?} written back as {written:?}");
}
