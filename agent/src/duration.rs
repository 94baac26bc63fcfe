//! The one duration syntax of the config and the policy (`90s`, `15m`, `2h`, `1h30m`), parsed once, when
//! they load, into a `Duration`.

use std::time::Duration;

/// Why a duration did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("`{0}` is not a duration; write a number and a unit: s, m or h (e.g. 90s, 15m, 2h)")]
    Syntax(String),
    #[error("`{0}` is too long")]
    TooLong(String),
    #[error("`{0}` is zero; a grant needs a positive ttl")]
    Zero(String),
    #[error("`{0}` is not a duration; write a number and a unit: s, m, h or d (e.g. 90s, 1m, 400d)")]
    SyntaxDays(String),
    #[error("`{0}` is zero; give a positive duration")]
    ZeroSpan(String),
}

/// Parses a positive duration such as `90s`, `15m`, `2h` or `1h30m`.
pub fn parse(s: &str) -> Result<Duration, DurationError> {
    parse_units(s, false)
}

/// Like [`parse`], and days too (`400d`): for retention periods and intervals, not grant ttls.
pub fn parse_days(s: &str) -> Result<Duration, DurationError> {
    parse_units(s, true)
}

fn parse_units(s: &str, days: bool) -> Result<Duration, DurationError> {
    let syntax =
        || if days { DurationError::SyntaxDays(s.to_owned()) } else { DurationError::Syntax(s.to_owned()) };
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' if days => 86_400,
            _ => return Err(syntax()),
        };
        let n: u64 = digits.parse().map_err(|_| syntax())?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| DurationError::TooLong(s.to_owned()))?;
        digits.clear();
    }
    if !digits.is_empty() || s.trim().is_empty() {
        return Err(syntax());
    }
    if total == 0 {
        return Err(if days {
            DurationError::ZeroSpan(s.to_owned())
        } else {
            DurationError::Zero(s.to_owned())
        });
    }
    Ok(Duration::from_secs(total))
}

/// A duration written in this syntax in a TOML file, parsed as it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written(pub Duration);

impl<'de> serde::Deserialize<'de> for Written {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map(Written).map_err(serde::de::Error::custom)
    }
}

/// A duration with days allowed ([`parse_days`]) in a TOML file, parsed as it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrittenDays(pub Duration);

impl<'de> serde::Deserialize<'de> for WrittenDays {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_days(&s).map(WrittenDays).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        for bad in ["", "15", "m", "15 minutes", "1.5h", "0s", "-3m", "1d"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_days("400d"), Ok(Duration::from_secs(400 * 86_400)));
        assert_eq!(parse_days("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_days("0d"), Err(DurationError::ZeroSpan("0d".into())));
        assert!(parse_days("1y").is_err());
    }
}
