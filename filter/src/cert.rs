//! Peer certificate validity: where it came from, how it is read out of DER,
//! and the age / remaining-validity arithmetic.
//!
//! The DER reader is deliberately minimal: it walks `Certificate ->
//! tbsCertificate -> validity` and reads the two times. It does not verify
//! anything (the proxy already verified the chain); it only refuses input it
//! cannot read exactly. Keeping it small keeps the `.wasm` small; the tests
//! check it against `x509-parser`.

use crate::UnixTime;
use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use thiserror::Error;

/// notBefore / notAfter of a certificate, in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertValidity {
    pub not_before: UnixTime,
    pub not_after: UnixTime,
}

/// Where the plugin learned the peer certificate's validity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertSource {
    /// The `connection.peer_certificate` property (URL-encoded PEM).
    PeerCertificateProperty,
    /// The `Cert=` field of the `x-forwarded-client-cert` element whose
    /// certificate digest equals `connection.sha256_peer_certificate_digest`.
    XfccCert,
    /// The signer's issuance ledger, looked up by
    /// `connection.sha256_peer_certificate_digest` (see [`crate::ledger`]).
    Ledger,
}

impl CertSource {
    /// Short name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PeerCertificateProperty => "peer_certificate",
            Self::XfccCert => "xfcc",
            Self::Ledger => "ledger",
        }
    }
}

/// The validity of the peer's leaf certificate and its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCert {
    pub validity: CertValidity,
    pub source: CertSource,
    /// Set when the signer's ledger holds the certificate as revoked (only
    /// the ledger can say so: [`CertSource::Ledger`]).
    pub revoked: Option<Revoked>,
}

/// A revocation the signer's ledger reported for the peer's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revoked {
    /// When it was revoked.
    pub at: UnixTime,
    /// RFC 5280 `CRLReason` code.
    pub reason: u8,
}

impl Revoked {
    /// The reason's name, as the signer spells it (`key-compromise`, …).
    pub fn reason_name(&self) -> &'static str {
        revocation_reason_name(self.reason).unwrap_or("unspecified")
    }
}

/// The signer's name for an RFC 5280 `CRLReason` code it uses.
pub fn revocation_reason_name(code: u8) -> Option<&'static str> {
    Some(match code {
        0 => "unspecified",
        1 => "key-compromise",
        2 => "ca-compromise",
        3 => "affiliation-changed",
        4 => "superseded",
        5 => "cessation-of-operation",
        9 => "privilege-withdrawn",
        _ => return None,
    })
}

/// The code of a reason name the signer reports.
pub fn revocation_reason_code(name: &str) -> Option<u8> {
    [0u8, 1, 2, 3, 4, 5, 9]
        .into_iter()
        .find(|c| revocation_reason_name(*c) == Some(name))
}

/// Age and remaining validity at a given instant. Either can be negative
/// (a certificate from the future, an expired certificate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertTimes {
    /// `now - notBefore`, seconds.
    pub age_secs: i64,
    /// `notAfter - now`, seconds.
    pub remaining_secs: i64,
}

impl CertValidity {
    /// Age and remaining validity at `now` (saturating, never overflowing).
    pub fn times_at(&self, now: UnixTime) -> CertTimes {
        CertTimes {
            age_secs: now.0.saturating_sub(self.not_before.0),
            remaining_secs: self.not_after.0.saturating_sub(now.0),
        }
    }
}

/// Why a certificate could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CertError {
    #[error("no PEM CERTIFICATE block")]
    NoPemBlock,
    #[error("PEM body is not base64")]
    BadBase64,
    #[error("URL-encoded certificate is not valid UTF-8")]
    BadUrlEncoding,
    #[error("DER is truncated or malformed at {0}")]
    Der(&'static str),
    #[error("unexpected DER tag {found:#04x} for {what}")]
    UnexpectedTag { what: &'static str, found: u8 },
    #[error("certificate time is malformed: {0}")]
    BadTime(&'static str),
    #[error("notAfter is before notBefore")]
    InvertedValidity,
}

const TAG_SEQUENCE: u8 = 0x30;
const TAG_INTEGER: u8 = 0x02;
const TAG_EXPLICIT_0: u8 = 0xA0;
const TAG_UTC_TIME: u8 = 0x17;
const TAG_GENERALIZED_TIME: u8 = 0x18;

/// Reads one DER TLV; returns (tag, content, rest).
fn read_tlv<'a>(
    input: &'a [u8],
    what: &'static str,
) -> Result<(u8, &'a [u8], &'a [u8]), CertError> {
    let (&tag, rest) = input.split_first().ok_or(CertError::Der(what))?;
    if tag & 0x1F == 0x1F {
        // High tag numbers never occur on the path we walk.
        return Err(CertError::Der(what));
    }
    let (&first, mut rest) = rest.split_first().ok_or(CertError::Der(what))?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7F);
        if count == 0 || count > 4 {
            // 0x80 is BER's indefinite length; more than 4 bytes is absurd here.
            return Err(CertError::Der(what));
        }
        let (bytes, after) = rest.split_at_checked(count).ok_or(CertError::Der(what))?;
        rest = after;
        let mut len = 0usize;
        for &b in bytes {
            len = len
                .checked_mul(256)
                .and_then(|l| l.checked_add(usize::from(b)))
                .ok_or(CertError::Der(what))?;
        }
        if len < 0x80 || bytes.first() == Some(&0) {
            // Not minimal: DER forbids it.
            return Err(CertError::Der(what));
        }
        len
    };
    let (content, rest) = rest.split_at_checked(len).ok_or(CertError::Der(what))?;
    Ok((tag, content, rest))
}

fn expect_tlv<'a>(
    input: &'a [u8],
    tag: u8,
    what: &'static str,
) -> Result<(&'a [u8], &'a [u8]), CertError> {
    let (found, content, rest) = read_tlv(input, what)?;
    if found != tag {
        return Err(CertError::UnexpectedTag { what, found });
    }
    Ok((content, rest))
}

/// Reads notBefore / notAfter from a DER X.509 certificate.
pub fn validity_from_der(der: &[u8]) -> Result<CertValidity, CertError> {
    let (cert, _) = expect_tlv(der, TAG_SEQUENCE, "Certificate")?;
    let (tbs, _) = expect_tlv(cert, TAG_SEQUENCE, "tbsCertificate")?;
    let mut rest = tbs;
    if rest.first() == Some(&TAG_EXPLICIT_0) {
        let (_, after) = expect_tlv(rest, TAG_EXPLICIT_0, "version")?;
        rest = after;
    }
    let (_, rest) = expect_tlv(rest, TAG_INTEGER, "serialNumber")?;
    let (_, rest) = expect_tlv(rest, TAG_SEQUENCE, "signature")?;
    let (_, rest) = expect_tlv(rest, TAG_SEQUENCE, "issuer")?;
    let (validity, _) = expect_tlv(rest, TAG_SEQUENCE, "validity")?;
    let (nb_tag, nb, rest) = read_tlv(validity, "notBefore")?;
    let (na_tag, na, _) = read_tlv(rest, "notAfter")?;
    let not_before = parse_time(nb_tag, nb)?;
    let not_after = parse_time(na_tag, na)?;
    if not_after < not_before {
        return Err(CertError::InvertedValidity);
    }
    Ok(CertValidity {
        not_before: UnixTime(not_before),
        not_after: UnixTime(not_after),
    })
}

fn digits(bytes: &[u8]) -> Result<i64, CertError> {
    let mut v: i64 = 0;
    for &b in bytes {
        if !b.is_ascii_digit() {
            return Err(CertError::BadTime("non-digit"));
        }
        v = v * 10 + i64::from(b - b'0');
    }
    Ok(v)
}

/// UTCTime `YYMMDDHHMMSSZ` or GeneralizedTime `YYYYMMDDHHMMSSZ` (RFC 5280 4.1.2.5).
fn parse_time(tag: u8, text: &[u8]) -> Result<i64, CertError> {
    let (year, rest) = match tag {
        TAG_UTC_TIME => {
            if text.len() != 13 {
                return Err(CertError::BadTime("UTCTime must be YYMMDDHHMMSSZ"));
            }
            let (yy, rest) = text.split_at(2);
            let yy = digits(yy)?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, rest)
        }
        TAG_GENERALIZED_TIME => {
            if text.len() != 15 {
                return Err(CertError::BadTime(
                    "GeneralizedTime must be YYYYMMDDHHMMSSZ",
                ));
            }
            let (yyyy, rest) = text.split_at(4);
            (digits(yyyy)?, rest)
        }
        found => {
            return Err(CertError::UnexpectedTag {
                what: "Time",
                found,
            });
        }
    };
    // rest = MMDDHHMMSSZ
    let field = |i: usize| {
        rest.get(i..i + 2)
            .ok_or(CertError::BadTime("short"))
            .and_then(digits)
    };
    let (month, day, hour, minute, second) =
        (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    if rest.get(10) != Some(&b'Z') {
        return Err(CertError::BadTime("must end in Z"));
    }
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return Err(CertError::BadTime("field out of range"));
    }
    Ok(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The DER of the first `CERTIFICATE` block of a PEM text.
pub fn der_from_pem(pem: &str) -> Result<Vec<u8>, CertError> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start = pem.find(BEGIN).ok_or(CertError::NoPemBlock)? + BEGIN.len();
    let body = pem.get(start..).ok_or(CertError::NoPemBlock)?;
    let end = body.find(END).ok_or(CertError::NoPemBlock)?;
    let body = body.get(..end).ok_or(CertError::NoPemBlock)?;
    let compact: Vec<u8> = body.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map_err(|_| CertError::BadBase64)
}

/// Decodes a URL-encoded (percent-encoded) PEM, as Envoy writes it in XFCC
/// `Cert=` and in `connection.peer_certificate`.
pub fn der_from_url_encoded_pem(encoded: &str) -> Result<Vec<u8>, CertError> {
    let pem = percent_encoding::percent_decode_str(encoded)
        .decode_utf8()
        .map_err(|_| CertError::BadUrlEncoding)?;
    der_from_pem(&pem)
}

/// Lower-case hex SHA-256 of a DER certificate: the form of Envoy's
/// `connection.sha256_peer_certificate_digest` and of XFCC `Hash=`.
pub fn sha256_hex(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    let mut out = String::with_capacity(64);
    for b in digest {
        for nibble in [b >> 4, b & 0x0F] {
            out.push(char::from_digit(u32::from(nibble), 16).unwrap_or('0'));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn civil_dates_convert_like_the_calendar() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        assert_eq!(
            parse_time(TAG_UTC_TIME, b"491231235959Z"),
            Ok(2_524_607_999)
        );
        assert_eq!(parse_time(TAG_UTC_TIME, b"500101000000Z"), Ok(-631_152_000));
        assert_eq!(
            parse_time(TAG_GENERALIZED_TIME, b"99991231235959Z"),
            Ok(253_402_300_799)
        );
    }

    #[test]
    fn malformed_times_are_refused() {
        for bad in [
            &b"240230000000Z"[..],
            b"241301000000Z",
            b"240101240000Z",
            b"240101006000Z",
            b"240101000060Z",
            b"2401010000Z",
            b"240101000000+",
            b"24010100000aZ",
            b"-40101000000Z",
        ] {
            assert!(parse_time(TAG_UTC_TIME, bad).is_err(), "{bad:?}");
        }
        assert!(parse_time(TAG_GENERALIZED_TIME, b"20240101000000.5Z").is_err());
        assert!(parse_time(0x04, b"240101000000Z").is_err());
    }

    #[test]
    fn indefinite_and_non_minimal_lengths_are_refused() {
        assert!(read_tlv(&[0x30, 0x80, 0, 0], "x").is_err());
        assert!(read_tlv(&[0x30, 0x81, 0x05, 1, 2, 3, 4, 5], "x").is_err());
        assert!(read_tlv(&[0x30, 0x82, 0x00, 0x90], "x").is_err());
        assert!(read_tlv(&[0x30, 0x85, 1, 1, 1, 1, 1], "x").is_err());
        assert!(read_tlv(&[0x30, 0x03, 1], "x").is_err());
        assert!(read_tlv(&[], "x").is_err());
    }

    #[test]
    fn age_and_remaining_saturate() {
        let v = CertValidity {
            not_before: UnixTime(i64::MIN),
            not_after: UnixTime(i64::MAX),
        };
        let t = v.times_at(UnixTime(i64::MAX));
        assert_eq!(t.age_secs, i64::MAX);
        assert_eq!(t.remaining_secs, 0);
    }

    proptest! {
        #[test]
        fn der_reader_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = validity_from_der(&bytes);
        }

        #[test]
        fn pem_decoder_never_panics_on_garbage(text in ".{0,200}") {
            let _ = der_from_url_encoded_pem(&text);
            let _ = der_from_pem(&format!("-----BEGIN CERTIFICATE-----{text}-----END CERTIFICATE-----"));
        }
    }
}
