//! The one timestamp format: RFC 3339 in UTC with nine fractional digits (as the audit record's `ts`),
//! for every time Warden writes (records, grants, views), and its parser.

use std::time::SystemTime;

use time::OffsetDateTime;

/// `2026-11-18T11:06:40.000000123Z`.
pub fn format(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    // Written digit by digit (every audit record's `ts`: `format!` costs several times more); years
    // outside 0..=9999 take the general path below.
    if let Ok(year) = u32::try_from(t.year())
        && year <= 9999
    {
        let mut b = *b"0000-00-00T00:00:00.000000000Z";
        let mut put = |range: std::ops::Range<usize>, mut v: u32| {
            for x in b[range].iter_mut().rev() {
                *x = b'0' + u8::try_from(v % 10).unwrap_or(0);
                v /= 10;
            }
        };
        put(0..4, year);
        put(5..7, u32::from(u8::from(t.month())));
        put(8..10, u32::from(t.day()));
        put(11..13, u32::from(t.hour()));
        put(14..16, u32::from(t.minute()));
        put(17..19, u32::from(t.second()));
        put(20..29, t.nanosecond());
        if let Ok(s) = std::str::from_utf8(&b) {
            return s.to_owned();
        }
    }
    general(t)
}

/// The same format through `format!`: any year (a UTC time).
fn general(t: OffsetDateTime) -> String {
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond()
    )
}

/// [`format`] for a `SystemTime`.
pub fn format_system(t: SystemTime) -> String {
    format(OffsetDateTime::from(t))
}

/// Any RFC 3339 time (what [`format`] writes, and older files with fewer fractional digits).
pub fn parse(s: &str) -> Option<SystemTime> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok().map(SystemTime::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nine_digits_in_utc_and_back() {
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_795_000_000_000_000_123).unwrap();
        let s = format(t);
        assert_eq!(s, "2026-11-18T11:06:40.000000123Z");
        assert_eq!(parse(&s), Some(SystemTime::from(t)));
        assert!(parse("2026-01-01T00:00:00Z").is_some());
        assert_eq!(parse("yesterday"), None);
    }

    /// The digit-by-digit path writes what `format!` writes, across dates, times and fractions.
    #[test]
    fn digits_match_the_general_format() {
        let mut n: i128 = -62_000_000_000_000_000_000;
        while n < 250_000_000_000_000_000_000 {
            let t = OffsetDateTime::from_unix_timestamp_nanos(n).unwrap();
            assert_eq!(format(t), general(t), "{n}");
            n += 987_654_321_123_456_789;
        }
        let offset = OffsetDateTime::from_unix_timestamp(0).unwrap().to_offset(time::macros::offset!(+5));
        assert_eq!(format(offset), "1970-01-01T00:00:00.000000000Z");
    }
}
