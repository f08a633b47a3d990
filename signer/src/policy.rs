//! Issuance policy: how long a certificate lives.
//!
//! The TTL rule, in Istio's terms (`validity_duration` is in seconds):
//!
//! - `0` → the default TTL (as istiod does);
//! - negative → INVALID_ARGUMENT;
//! - above the max → **clamped to the max** (as istio-csr does; istiod would
//!   refuse). Clamping keeps an istio-agent that asks for more than the
//!   operator allows working, and the response's notAfter tells it what it
//!   got, so it still rotates at half-life.
//!
//! notBefore is backdated by the configured skew; the window never leaves
//! the signing certificate's own validity.
//!
//! [`tiers`] chooses the TTLs and allowed key types per namespace.

pub mod namespaces;
pub mod nodes;
pub mod rate;
pub mod tiers;

use std::time::Duration;

use time::OffsetDateTime;

use crate::config::PolicyConfig;
use crate::issuer::SigningValidity;

/// Why no validity window can be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// `validity_duration` < 0 (INVALID_ARGUMENT).
    #[error("validity_duration {0} is negative")]
    NegativeTtl(i64),
    /// The signing certificate is expired or not yet valid (UNAVAILABLE).
    #[error("the signing CA certificate is not valid at {now} (valid {not_before} .. {not_after})")]
    IssuerNotValid {
        /// Now.
        now: OffsetDateTime,
        /// Its notBefore.
        not_before: OffsetDateTime,
        /// Its notAfter.
        not_after: OffsetDateTime,
    },
}

/// TTL policy compiled from [`PolicyConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlPolicy {
    /// TTL for `validity_duration = 0`.
    pub default_ttl: Duration,
    /// Longest TTL.
    pub max_ttl: Duration,
    /// notBefore backdating.
    pub backdate: Duration,
}

/// The validity a certificate gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Start.
    pub not_before: OffsetDateTime,
    /// End.
    pub not_after: OffsetDateTime,
    /// The TTL granted from `now` (after clamping).
    pub granted_ttl: Duration,
    /// True when the request asked for more than the max.
    pub clamped_to_max: bool,
    /// True when the end was pulled in to the signing certificate's end.
    pub clamped_to_issuer: bool,
}

impl From<&PolicyConfig> for TtlPolicy {
    fn from(c: &PolicyConfig) -> Self {
        Self {
            default_ttl: c.default_ttl,
            max_ttl: c.max_ttl,
            backdate: c.backdate,
        }
    }
}

impl TtlPolicy {
    /// The TTL for a requested `validity_duration` (seconds), before the
    /// issuer's window is applied. Returns (ttl, clamped_to_max).
    pub fn ttl_for(&self, requested_secs: i64) -> Result<(Duration, bool), PolicyError> {
        match u64::try_from(requested_secs) {
            Err(_) => Err(PolicyError::NegativeTtl(requested_secs)),
            Ok(0) => Ok((self.default_ttl, false)),
            Ok(secs) => {
                let asked = Duration::from_secs(secs);
                if asked > self.max_ttl {
                    Ok((self.max_ttl, true))
                } else {
                    Ok((asked, false))
                }
            }
        }
    }

    /// The validity window for a request at `now`, signed by a certificate
    /// valid over `signing`.
    pub fn validity(
        &self,
        requested_secs: i64,
        now: OffsetDateTime,
        signing: SigningValidity,
    ) -> Result<Validity, PolicyError> {
        let (ttl, clamped_to_max) = self.ttl_for(requested_secs)?;
        if now < signing.not_before || now >= signing.not_after {
            return Err(PolicyError::IssuerNotValid {
                now,
                not_before: signing.not_before,
                not_after: signing.not_after,
            });
        }
        let not_before = now
            .checked_sub(to_time(self.backdate))
            .unwrap_or(signing.not_before)
            .max(signing.not_before);
        let wanted_end = now.checked_add(to_time(ttl)).unwrap_or(signing.not_after);
        let clamped_to_issuer = wanted_end > signing.not_after;
        let not_after = wanted_end.min(signing.not_after);
        let granted = not_after - now;
        Ok(Validity {
            not_before,
            not_after,
            granted_ttl: Duration::try_from(granted).unwrap_or_default(),
            clamped_to_max,
            clamped_to_issuer,
        })
    }
}

fn to_time(d: Duration) -> time::Duration {
    time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3600;

    fn policy() -> TtlPolicy {
        TtlPolicy {
            default_ttl: Duration::from_secs(24 * H),
            max_ttl: Duration::from_secs(24 * H),
            backdate: Duration::from_secs(60),
        }
    }

    fn issuer(now: OffsetDateTime) -> SigningValidity {
        SigningValidity {
            not_before: now - time::Duration::days(1),
            not_after: now + time::Duration::days(365),
        }
    }

    #[test]
    fn zero_means_default() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let v = policy().validity(0, now, issuer(now)).unwrap();
        assert_eq!(v.not_after - now, time::Duration::hours(24));
        assert_eq!(now - v.not_before, time::Duration::seconds(60));
    }

    #[test]
    fn negative_is_refused() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        assert_eq!(
            policy().validity(-1, now, issuer(now)),
            Err(PolicyError::NegativeTtl(-1))
        );
    }

    #[test]
    fn huge_is_clamped_to_max() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let v = policy().validity(i64::MAX, now, issuer(now)).unwrap();
        assert!(v.clamped_to_max);
        assert_eq!(v.not_after - now, time::Duration::hours(24));
    }

    #[test]
    fn never_outlives_the_issuer() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let signing = SigningValidity {
            not_before: now - time::Duration::seconds(10),
            not_after: now + time::Duration::hours(1),
        };
        let v = policy().validity(0, now, signing).unwrap();
        assert_eq!(v.not_after, signing.not_after);
        assert_eq!(v.not_before, signing.not_before);
        assert!(v.clamped_to_issuer);
    }

    #[test]
    fn expired_issuer_is_refused() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let signing = SigningValidity {
            not_before: now - time::Duration::days(2),
            not_after: now - time::Duration::days(1),
        };
        assert!(matches!(
            policy().validity(0, now, signing),
            Err(PolicyError::IssuerNotValid { .. })
        ));
    }
}
