//! The outcome of one authorization.

use crate::cert::{CertSource, CertTimes};
use std::fmt;

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allow,
    Deny,
}

impl Verdict {
    /// `allow` / `deny`, as used in metric tags.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

/// Why the verdict is what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// `requireMtls` and the peer presented no client certificate.
    PlaintextPeer,
    /// The peer's URI SAN is not a valid SPIFFE ID.
    InvalidPeerIdentity,
    /// The path has dot segments or encoded separators (see `path_is_ambiguous`).
    AmbiguousPath,
    /// The signer's ledger holds the peer's certificate as revoked.
    RevokedCertificate(crate::cert::Revoked),
    /// A DENY rule matched (its name is [`Decision::rule`]).
    DenyRule,
    /// An ALLOW rule matched (its name is [`Decision::rule`]).
    AllowRule,
    /// ALLOW rules exist and none matched.
    NoAllowRuleMatched,
    /// No ALLOW rules and no DENY rule matched.
    NoAllowRules,
    /// The plugin could not evaluate (no valid config, host call failed, ...).
    /// Produced by the shim, never by the policy.
    Internal(String),
}

impl Reason {
    /// A stable short code for metric tags and logs.
    pub fn code(&self) -> &'static str {
        match self {
            Self::PlaintextPeer => "plaintext_peer",
            Self::InvalidPeerIdentity => "invalid_peer_identity",
            Self::AmbiguousPath => "ambiguous_path",
            Self::RevokedCertificate(_) => "revoked_certificate",
            Self::DenyRule => "deny_rule",
            Self::AllowRule => "allow_rule",
            Self::NoAllowRuleMatched => "no_allow_rule_matched",
            Self::NoAllowRules => "no_allow_rules",
            Self::Internal(_) => "internal_error",
        }
    }
}

/// The decision for one connection or request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<'p> {
    pub verdict: Verdict,
    /// Name of the DENY or ALLOW rule that decided, if one did.
    pub rule: Option<&'p str>,
    pub reason: Reason,
    /// Name of the first AUDIT rule that matched (marks only; never changes the verdict).
    pub audit: Option<&'p str>,
    /// False in `shadow` mode: the verdict is reported, not enforced.
    pub enforced: bool,
    /// Age and remaining validity of the peer certificate at `now`, when known.
    pub cert: Option<(CertTimes, CertSource)>,
}

impl Decision<'_> {
    /// A deny that the shim produces when it cannot evaluate the policy.
    pub fn internal_error(message: impl Into<String>) -> Decision<'static> {
        Decision {
            verdict: Verdict::Deny,
            rule: None,
            reason: Reason::Internal(message.into()),
            audit: None,
            enforced: true,
            cert: None,
        }
    }

    /// True when the proxy must refuse the request / close the connection.
    pub fn blocks(&self) -> bool {
        self.verdict == Verdict::Deny && self.enforced
    }
}

impl fmt::Display for Decision<'_> {
    /// Short, header-safe text (ASCII, no control characters): what
    /// `x-meshward-deny-reason` carries.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.reason, self.rule) {
            (Reason::DenyRule, Some(rule)) => write!(f, "denied by rule {rule}"),
            (Reason::AllowRule, Some(rule)) => write!(f, "allowed by rule {rule}"),
            (Reason::PlaintextPeer, _) => {
                f.write_str("peer presented no client certificate (requireMtls)")
            }
            (Reason::InvalidPeerIdentity, _) => {
                f.write_str("peer URI SAN is not a valid SPIFFE ID")
            }
            (Reason::AmbiguousPath, _) => {
                f.write_str("path has dot segments or encoded separators")
            }
            (Reason::RevokedCertificate(r), _) => write!(
                f,
                "peer certificate revoked at {} ({})",
                r.at.0,
                r.reason_name()
            ),
            (Reason::NoAllowRuleMatched, _) => f.write_str("no ALLOW rule matched"),
            (Reason::NoAllowRules, _) => f.write_str("no ALLOW rules"),
            (Reason::Internal(_), _) => f.write_str("internal error (fail closed)"),
            (Reason::DenyRule | Reason::AllowRule, None) => f.write_str(self.reason.code()),
        }
    }
}
