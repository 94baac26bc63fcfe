//! The one timestamp format: RFC 3339 in UTC with nine fractional digits (as the audit record's `ts`),
//! for every time Warden writes (records, grants, views), and its parser.

use std::time::SystemTime;

use time::OffsetDateTime;

/// `2026-11-18T11:06:40.000000123Z`.
pub fn format(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
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
}
