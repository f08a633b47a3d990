//! Circuit breaker: after `threshold` consecutive failures talking to Vault,
//! requests fail fast (`UNAVAILABLE`) for `open_for`; then one probe request is
//! let through (half-open) and its outcome closes or re-opens the circuit.
//!
//! Pure state machine: the caller passes `now`.

use std::time::{Duration, Instant};

/// Consecutive-failure circuit breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    threshold: u32,
    open_for: Duration,
    state: State,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// A probe is in flight; other requests fail fast until it reports.
    HalfOpen {
        probe_started: Instant,
    },
}

/// What the breaker says about a request about to be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead.
    Allowed,
    /// Fail fast; Vault is considered down for about this long still.
    Rejected { retry_after: Duration },
}

impl Breaker {
    /// A closed breaker. `threshold` 0 is treated as 1.
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            open_for,
            state: State::Closed { failures: 0 },
        }
    }

    /// Whether a request may go to Vault now.
    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.state {
            State::Closed { .. } => Admission::Allowed,
            State::Open { until } if now >= until => {
                self.state = State::HalfOpen { probe_started: now };
                Admission::Allowed
            }
            State::Open { until } => Admission::Rejected {
                retry_after: until.saturating_duration_since(now),
            },
            // A probe that never reported (its task was dropped) must not
            // keep the circuit shut forever.
            State::HalfOpen { probe_started } if now >= probe_started + self.open_for => {
                self.state = State::HalfOpen { probe_started: now };
                Admission::Allowed
            }
            State::HalfOpen { probe_started } => Admission::Rejected {
                retry_after: (probe_started + self.open_for).saturating_duration_since(now),
            },
        }
    }

    /// Vault answered (any answer that shows it is up, including a refusal).
    pub fn record_success(&mut self) {
        self.state = State::Closed { failures: 0 };
    }

    /// Vault could not be reached, timed out or answered 5xx.
    pub fn record_failure(&mut self, now: Instant) {
        self.state = match self.state {
            State::Closed { failures } if failures + 1 < self.threshold => State::Closed {
                failures: failures + 1,
            },
            _ => State::Open {
                until: now + self.open_for,
            },
        };
    }

    /// True while requests are being failed fast.
    pub fn is_open(&self) -> bool {
        !matches!(self.state, State::Closed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN: Duration = Duration::from_secs(10);

    #[test]
    fn opens_after_threshold_consecutive_failures_only() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, OPEN);
        b.record_failure(t0);
        b.record_failure(t0);
        assert_eq!(b.admit(t0), Admission::Allowed);
        b.record_success();
        b.record_failure(t0);
        b.record_failure(t0);
        assert_eq!(b.admit(t0), Admission::Allowed, "success reset the count");
        b.record_failure(t0);
        assert!(matches!(b.admit(t0), Admission::Rejected { .. }));
        assert!(b.is_open());
    }

    #[test]
    fn open_circuit_fails_fast_until_cooldown_then_lets_one_probe_through() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, OPEN);
        b.record_failure(t0);
        assert_eq!(
            b.admit(t0 + Duration::from_secs(4)),
            Admission::Rejected {
                retry_after: Duration::from_secs(6)
            }
        );
        let t1 = t0 + OPEN;
        assert_eq!(b.admit(t1), Admission::Allowed, "probe");
        assert!(
            matches!(b.admit(t1), Admission::Rejected { .. }),
            "only one probe"
        );
        b.record_success();
        assert_eq!(b.admit(t1), Admission::Allowed);
        assert!(!b.is_open());
    }

    #[test]
    fn failed_probe_reopens_the_circuit() {
        let t0 = Instant::now();
        let mut b = Breaker::new(2, OPEN);
        b.record_failure(t0);
        b.record_failure(t0);
        let t1 = t0 + OPEN;
        assert_eq!(b.admit(t1), Admission::Allowed);
        b.record_failure(t1);
        assert!(matches!(
            b.admit(t1 + Duration::from_secs(1)),
            Admission::Rejected { .. }
        ));
    }

    #[test]
    fn lost_probe_does_not_keep_the_circuit_shut_forever() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, OPEN);
        b.record_failure(t0);
        assert_eq!(b.admit(t0 + OPEN), Admission::Allowed);
        // the probe never reports
        assert_eq!(b.admit(t0 + OPEN * 2), Admission::Allowed);
    }

    #[test]
    fn zero_threshold_behaves_as_one() {
        let t0 = Instant::now();
        let mut b = Breaker::new(0, OPEN);
        assert_eq!(b.admit(t0), Admission::Allowed);
        b.record_failure(t0);
        assert!(b.is_open());
    }
}
