//! Percentiles and summaries of measured samples (nearest-rank method, the
//! one whose p99 is always a value that was actually observed).

use serde::Serialize;

/// The `p`-th percentile (0 < p ≤ 100) of `sorted` (ascending) by the
/// nearest-rank method: the smallest value such that at least `p` % of the
/// samples are ≤ it. `None` for no samples or a `p` outside (0, 100].
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() || !(p > 0.0 && p <= 100.0) {
        return None;
    }
    let n = sorted.len();
    // rank in 1..=n; the float product is exact enough for the sizes we use.
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    sorted.get(rank.clamp(1, n) - 1).copied()
}

/// Sort samples ascending (NaN last: they never come from a clock).
pub fn sort(values: &mut [f64]) {
    values.sort_by(|a, b| a.total_cmp(b));
}

/// The usual figures of a set of samples, in the samples' unit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Smallest.
    pub min: f64,
    /// Median (p50).
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
}

impl Summary {
    /// Summarise `values` (sorted in place). `None` when empty.
    pub fn of(values: &mut [f64]) -> Option<Self> {
        sort(values);
        let n = values.len();
        let min = *values.first()?;
        let max = *values.last()?;
        Some(Self {
            n,
            min,
            p50: percentile(values, 50.0)?,
            p99: percentile(values, 99.0)?,
            max,
            mean: values.iter().sum::<f64>() / n as f64,
        })
    }
}

/// The median of `values` (sorted in place; the lower of the two
/// middle values for an even count, so always a value that was observed). `None` when empty.
pub fn median(values: &mut [f64]) -> Option<f64> {
    sort(values);
    percentile(values, 50.0)
}

impl Summary {
    /// One summary for the same measurement repeated in several rounds:
    /// each percentile is the median of the rounds' (so one round disturbed
    /// by other work on the machine moves none of them), `min` / `max` are
    /// the extremes of all rounds, `n` counts every sample, `mean` is the
    /// mean of the rounds' means. `None` for no rounds.
    pub fn median_of_rounds(rounds: &[Summary]) -> Option<Self> {
        let field = |f: fn(&Summary) -> f64| {
            let mut v: Vec<f64> = rounds.iter().map(f).collect();
            median(&mut v)
        };
        Some(Self {
            n: rounds.iter().map(|r| r.n).sum(),
            min: rounds.iter().map(|r| r.min).reduce(f64::min)?,
            p50: field(|r| r.p50)?,
            p99: field(|r| r.p99)?,
            max: rounds.iter().map(|r| r.max).reduce(f64::max)?,
            mean: rounds.iter().map(|r| r.mean).sum::<f64>() / rounds.len() as f64,
        })
    }
}

/// Durations in milliseconds, for latency samples.
pub fn millis(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_to(n: usize) -> Vec<f64> {
        (1..=n).map(|i| i as f64).collect()
    }

    #[test]
    fn nearest_rank_percentiles_of_one_to_a_hundred() {
        let v = one_to(100);
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&v, 0.5), Some(1.0));
    }

    #[test]
    fn p99_of_few_samples_is_the_largest_not_an_interpolation() {
        // With 10 samples, 99 % of them means all 10: the max, a real sample.
        let v = one_to(10);
        assert_eq!(percentile(&v, 99.0), Some(10.0));
        assert_eq!(percentile(&v, 50.0), Some(5.0));
        assert_eq!(percentile(&[7.0], 50.0), Some(7.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
    }

    #[test]
    fn no_samples_or_a_meaningless_p_gives_none() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[1.0], 0.0), None);
        assert_eq!(percentile(&[1.0], 100.1), None);
        assert_eq!(percentile(&[1.0], f64::NAN), None);
        assert_eq!(Summary::of(&mut []), None);
    }

    fn round(p50: f64, p99: f64) -> Summary {
        Summary {
            n: 10,
            min: p50 - 1.0,
            p50,
            p99,
            max: p99 + 1.0,
            mean: p50,
        }
    }

    #[test]
    fn one_disturbed_round_moves_no_percentile_of_the_rounds() {
        // Round 2 ran while something else took the core: its figures are
        // 60 % higher. The median of three rounds ignores it.
        let rounds = [
            round(820.0, 900.0),
            round(1_340.0, 1_500.0),
            round(830.0, 905.0),
        ];
        let s = Summary::median_of_rounds(&rounds).unwrap();
        assert_eq!((s.p50, s.p99), (830.0, 905.0));
        assert_eq!((s.n, s.min, s.max), (30, 819.0, 1_501.0));
        assert_eq!(Summary::median_of_rounds(&[]), None);
        assert_eq!(
            Summary::median_of_rounds(&rounds[..1]).map(|s| s.p50),
            Some(820.0)
        );
    }

    #[test]
    fn summary_sorts_its_input_first() {
        let mut v = vec![5.0, 1.0, 4.0, 2.0, 3.0];
        let s = Summary::of(&mut v).unwrap();
        assert_eq!(v, vec![1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!((s.n, s.min, s.p50, s.p99, s.max), (5, 1.0, 3.0, 5.0, 5.0));
        assert!((s.mean - 3.0).abs() < 1e-12);
    }
}
