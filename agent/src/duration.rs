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
}

/// Parses a positive duration such as `90s`, `15m`, `2h` or `1h30m`.
pub fn parse(s: &str) -> Result<Duration, DurationError> {
    let syntax = || DurationError::Syntax(s.to_owned());
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
        return Err(DurationError::Zero(s.to_owned()));
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
    }
}
