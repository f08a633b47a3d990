//! Exponential backoff with jitter between attempts to reach Vault.
//!
//! Pure: the random factor is passed in, so the schedule is testable.

use std::time::Duration;

/// Backoff schedule: `initial * 2^(retry-1)` capped at `max`, then scaled by a
/// jitter factor in `[0.5, 1.0]` ("equal jitter"), so replicas that lost
/// Vault together do not retry in lockstep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// Delay before retry number `retry` (1 = first retry). `unit` is a
    /// uniform random number in `[0, 1)`; values outside are clamped.
    pub fn delay(&self, retry: u32, unit: f64) -> Duration {
        let exp = retry.saturating_sub(1).min(20);
        let base = self
            .initial
            .saturating_mul(1u32 << exp)
            .min(self.max.max(self.initial));
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        base.mul_f64(0.5 + unit / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(2),
    };

    #[test]
    fn doubles_until_the_cap() {
        assert_eq!(B.delay(1, 1.0), Duration::from_millis(100));
        assert_eq!(B.delay(2, 1.0), Duration::from_millis(200));
        assert_eq!(B.delay(4, 1.0), Duration::from_millis(800));
        assert_eq!(B.delay(6, 1.0), Duration::from_secs(2));
        assert_eq!(B.delay(u32::MAX, 1.0), Duration::from_secs(2));
    }

    #[test]
    fn jitter_stays_between_half_and_full_delay() {
        assert_eq!(B.delay(2, 0.0), Duration::from_millis(100));
        assert_eq!(B.delay(2, 0.5), Duration::from_millis(150));
        assert_eq!(B.delay(2, 7.0), Duration::from_millis(200));
        assert_eq!(B.delay(2, f64::NAN), Duration::from_millis(100));
    }
}
