//! Durations in policy config: `30s`, `15m`, `12h`, `7d`, or combinations in
//! descending unit order such as `1h30m`. Integers only, no sign, no fraction.

use thiserror::Error;

/// Largest accepted duration: 10 years. Anything longer is almost certainly a typo.
pub const MAX_DURATION_SECS: i64 = 10 * 365 * 24 * 3600;

/// What is wrong with a duration string.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DurationError {
    #[error("is empty")]
    Empty,
    #[error("needs a unit after the number (s, m, h or d)")]
    MissingUnit,
    #[error("needs a number before each unit")]
    MissingNumber,
    #[error("has an unknown unit {0:?} (use s, m, h or d)")]
    UnknownUnit(char),
    #[error("units must appear once each, largest first (like 1h30m)")]
    UnitOrder,
    #[error("is zero")]
    Zero,
    #[error("is longer than 10 years")]
    TooLong,
}

/// Parses a duration into whole seconds.
pub fn parse_duration(text: &str) -> Result<i64, DurationError> {
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    let mut total: i64 = 0;
    let mut number: Option<i64> = None;
    let mut last_unit_rank = u8::MAX;
    for c in text.chars() {
        if let Some(d) = c.to_digit(10) {
            let n = number.unwrap_or(0);
            let n = n
                .checked_mul(10)
                .and_then(|n| n.checked_add(i64::from(d)))
                .ok_or(DurationError::TooLong)?;
            if n > MAX_DURATION_SECS {
                return Err(DurationError::TooLong);
            }
            number = Some(n);
            continue;
        }
        let (rank, unit_secs) = match c {
            'd' => (3, 86_400),
            'h' => (2, 3_600),
            'm' => (1, 60),
            's' => (0, 1),
            other => return Err(DurationError::UnknownUnit(other)),
        };
        let n = number.take().ok_or(DurationError::MissingNumber)?;
        if rank >= last_unit_rank {
            return Err(DurationError::UnitOrder);
        }
        last_unit_rank = rank;
        total = n
            .checked_mul(unit_secs)
            .and_then(|v| total.checked_add(v))
            .ok_or(DurationError::TooLong)?;
        if total > MAX_DURATION_SECS {
            return Err(DurationError::TooLong);
        }
    }
    if number.is_some() {
        return Err(DurationError::MissingUnit);
    }
    if total == 0 {
        return Err(DurationError::Zero);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_single_and_combined_units() {
        assert_eq!(parse_duration("30s"), Ok(30));
        assert_eq!(parse_duration("30m"), Ok(1800));
        assert_eq!(parse_duration("12h"), Ok(43_200));
        assert_eq!(parse_duration("7d"), Ok(604_800));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        assert_eq!(parse_duration("1d2h3m4s"), Ok(93_784));
    }

    #[test]
    fn rejects_malformed_durations() {
        assert_eq!(parse_duration(""), Err(DurationError::Empty));
        assert_eq!(parse_duration("12"), Err(DurationError::MissingUnit));
        assert_eq!(parse_duration("h"), Err(DurationError::MissingNumber));
        assert_eq!(parse_duration("-1h"), Err(DurationError::UnknownUnit('-')));
        assert_eq!(parse_duration("1.5h"), Err(DurationError::UnknownUnit('.')));
        assert_eq!(parse_duration("12 h"), Err(DurationError::UnknownUnit(' ')));
        assert_eq!(
            parse_duration("12hours"),
            Err(DurationError::UnknownUnit('o'))
        );
        assert_eq!(parse_duration("1ms"), Err(DurationError::MissingNumber));
        assert_eq!(parse_duration("30m1h"), Err(DurationError::UnitOrder));
        assert_eq!(parse_duration("1h1h"), Err(DurationError::UnitOrder));
        assert_eq!(parse_duration("0s"), Err(DurationError::Zero));
        assert_eq!(parse_duration("1y"), Err(DurationError::UnknownUnit('y')));
    }

    #[test]
    fn overflowing_duration_is_an_error_not_a_wrap() {
        assert_eq!(
            parse_duration("99999999999999999999999h"),
            Err(DurationError::TooLong)
        );
        assert_eq!(parse_duration("3651d"), Err(DurationError::TooLong));
        assert_eq!(parse_duration("3650d"), Ok(3650 * 86_400));
    }
}
