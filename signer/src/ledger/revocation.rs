//! Revocations, kept in the ledger beside the issuances they revoke.
//!
//! A revocation names certificates the ledger recorded: by digest, by
//! serial, or by SPIFFE ID. By SPIFFE ID it revokes every certificate of
//! that identity the ledger holds, unexpired and issued up to that moment;
//! one issued later is a new record and stays valid (the key that was
//! stolen is the old one). Each revoked certificate is its own row, so a
//! CRL entry, the filter's lookup and the renewal check all ask the same
//! question: is this digest revoked. An entry stops being listed (and
//! leaves the CRL) once its certificate has expired; the row goes with the
//! certificate's record when the ledger prunes it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::CertDigest;

/// Which certificates `ca revoke` / `ca unrevoke` name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevocationTarget {
    /// One certificate, by the SHA-256 of its DER.
    Sha256(CertDigest),
    /// One certificate, by serial (lowercase hex, no leading zero bytes,
    /// as the ledger records it).
    Serial(String),
    /// Every certificate of one SPIFFE ID.
    SpiffeId(String),
}

impl RevocationTarget {
    /// A serial as given by an operator (`0A:1B…`, `0x0a1b…`, any case,
    /// leading zero bytes) in the ledger's form.
    pub fn serial(text: &str) -> Result<Self, BadTarget> {
        let hex: String = text
            .trim()
            .trim_start_matches("0x")
            .chars()
            .filter(|c| *c != ':')
            .collect::<String>()
            .to_ascii_lowercase();
        if hex.is_empty() || hex.len() > 40 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BadTarget(format!(
                "serial {text:?} is not 1-20 bytes of hex"
            )));
        }
        let hex = if hex.len() % 2 == 1 {
            format!("0{hex}")
        } else {
            hex
        };
        let trimmed = trim_zero_bytes(&hex);
        Ok(Self::Serial(trimmed.to_string()))
    }

    /// A SPIFFE ID as given by an operator: `spiffe://` and a trust domain.
    pub fn spiffe_id(text: &str) -> Result<Self, BadTarget> {
        let id = crate::csr::canonical_spiffe_id(text)
            .map_err(|e| BadTarget(format!("SPIFFE ID {text:?}: {e}")))?;
        Ok(Self::SpiffeId(id.to_string()))
    }
}

/// Leading `00` bytes dropped, as `IssuanceRecord::from_leaf` does.
fn trim_zero_bytes(hex: &str) -> &str {
    let mut s = hex;
    while s.len() > 2 && s.starts_with("00") {
        s = &s[2..];
    }
    s
}

impl fmt::Display for RevocationTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sha256(d) => write!(f, "sha256 {d}"),
            Self::Serial(s) => write!(f, "serial {s}"),
            Self::SpiffeId(id) => write!(f, "SPIFFE ID {id}"),
        }
    }
}

/// A revocation target or reason that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadTarget(pub String);

/// Why a certificate was revoked: RFC 5280's CRLReason values a workload
/// certificate can have (`certificateHold` is left out: a hold is an
/// unrevoke waiting to happen, and `unrevoke` does that directly).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RevocationReason {
    /// No reason given.
    #[default]
    Unspecified,
    /// The private key is known or suspected to be compromised.
    KeyCompromise,
    /// The CA that issued it is compromised.
    CaCompromise,
    /// The workload changed owner or role.
    AffiliationChanged,
    /// Replaced by another certificate.
    Superseded,
    /// The workload is gone.
    CessationOfOperation,
    /// The workload may no longer hold this identity.
    PrivilegeWithdrawn,
}

impl RevocationReason {
    /// Every reason, for parsing stored text.
    pub const ALL: [Self; 7] = [
        Self::Unspecified,
        Self::KeyCompromise,
        Self::CaCompromise,
        Self::AffiliationChanged,
        Self::Superseded,
        Self::CessationOfOperation,
        Self::PrivilegeWithdrawn,
    ];

    /// The name stored in the ledger and shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::KeyCompromise => "key-compromise",
            Self::CaCompromise => "ca-compromise",
            Self::AffiliationChanged => "affiliation-changed",
            Self::Superseded => "superseded",
            Self::CessationOfOperation => "cessation-of-operation",
            Self::PrivilegeWithdrawn => "privilege-withdrawn",
        }
    }

    /// RFC 5280 `CRLReason` code.
    pub fn code(self) -> u8 {
        match self {
            Self::Unspecified => 0,
            Self::KeyCompromise => 1,
            Self::CaCompromise => 2,
            Self::AffiliationChanged => 3,
            Self::Superseded => 4,
            Self::CessationOfOperation => 5,
            Self::PrivilegeWithdrawn => 9,
        }
    }
}

impl fmt::Display for RevocationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RevocationReason {
    type Err = BadTarget;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| BadTarget(format!("unknown revocation reason {s:?}")))
    }
}

/// One revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// SHA-256 of the revoked certificate's DER.
    pub sha256: CertDigest,
    /// Its serial (the CRL entry's key).
    pub serial: String,
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// Its notAfter: past it the entry is no longer listed.
    pub not_after: OffsetDateTime,
    /// When it was revoked.
    pub revoked_at: OffsetDateTime,
    /// Why.
    pub reason: RevocationReason,
}

/// A revocation as `ca revocations -o json`, `/v1/revocations` and the
/// certificate lookup show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RevocationView {
    /// Lowercase hex SHA-256 of the DER.
    pub sha256: String,
    /// Serial, lowercase hex.
    pub serial: String,
    /// The SPIFFE ID.
    pub spiffe_id: String,
    /// notAfter of the certificate, unix seconds.
    pub not_after: i64,
    /// When it was revoked, unix seconds.
    pub revoked_at: i64,
    /// Why (`key-compromise`, …).
    pub reason: RevocationReason,
}

impl From<&Revocation> for RevocationView {
    fn from(r: &Revocation) -> Self {
        Self {
            sha256: r.sha256.to_hex(),
            serial: r.serial.clone(),
            spiffe_id: r.spiffe_id.clone(),
            not_after: r.not_after.unix_timestamp(),
            revoked_at: r.revoked_at.unix_timestamp(),
            reason: r.reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_read_in_any_operator_spelling_and_stored_as_the_ledger_does() {
        for text in ["0A:1B", "0x0a1b", "a1b", "000a1b", "A1B"] {
            assert_eq!(
                RevocationTarget::serial(text),
                Ok(RevocationTarget::Serial("0a1b".to_string())),
                "{text}"
            );
        }
        assert_eq!(
            RevocationTarget::serial("00"),
            Ok(RevocationTarget::Serial("00".to_string()))
        );
        for bad in ["", "xyz", &"ab".repeat(21)] {
            assert!(RevocationTarget::serial(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reasons_round_trip_and_carry_their_rfc5280_codes() {
        for r in RevocationReason::ALL {
            assert_eq!(r.as_str().parse::<RevocationReason>(), Ok(r));
        }
        assert_eq!(RevocationReason::KeyCompromise.code(), 1);
        assert_eq!(RevocationReason::PrivilegeWithdrawn.code(), 9);
        assert!("certificate-hold".parse::<RevocationReason>().is_err());
    }

    #[test]
    fn a_spiffe_id_target_must_be_a_spiffe_id() {
        assert!(RevocationTarget::spiffe_id("spiffe://cluster.local/ns/a/sa/b").is_ok());
        assert!(RevocationTarget::spiffe_id("https://cluster.local/ns/a/sa/b").is_err());
    }
}
