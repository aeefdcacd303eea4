//! Time stamps as RFC 3339 UTC: the one place they are formatted for the audit trail, the
//! status of operations and attachments, and the files of the state directory.

use std::time::SystemTime;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// `t` as RFC 3339 UTC to the second (`2026-12-03T15:04:05Z`); empty if it cannot be written.
pub fn rfc3339(t: SystemTime) -> String {
    OffsetDateTime::from(t)
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// The current time as RFC 3339 UTC with milliseconds (`2026-12-03T15:04:05.123Z`).
pub fn now() -> String {
    let t = OffsetDateTime::now_utc();
    let t = t
        .replace_nanosecond(t.millisecond() as u32 * 1_000_000)
        .unwrap_or(t);
    t.format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_seconds_and_milliseconds() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_764_774_245_123);
        assert_eq!(rfc3339(t), "2025-12-03T15:04:05Z");
        // Milliseconds at most (RFC 3339 drops trailing zeros of the fraction: .360 is .36).
        let n = now();
        let parsed = OffsetDateTime::parse(&n, &Rfc3339).expect("now() parses as RFC 3339");
        assert_eq!(parsed.nanosecond() % 1_000_000, 0, "{n}");
        assert!(n.ends_with('Z'), "{n}");
    }
}
