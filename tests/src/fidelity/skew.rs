//! The SigV4 clock check: a request signed too far from the host's clock is refused, as EC2
//! refuses it.

use std::time::{Duration, SystemTime};

/// EC2 refuses a request whose SigV4 date stamp is more than 15 minutes from its own clock
/// (EC2 API reference, "Common client error codes": RequestExpired). So does the layer, against
/// the host's clock: a guest that signs with a wrong clock is refused as on EC2.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(15 * 60);

/// `20261126T051500Z` (the X-Amz-Date header) as a time.
pub fn parse_amz_date(s: &str) -> Option<SystemTime> {
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    if s.len() != 16 || s.as_bytes()[8] != b'T' || !s.ends_with('Z') {
        return None;
    }
    let (y, mo, d, h, mi, se) = (
        n(0..4)?,
        n(4..6)?,
        n(6..8)?,
        n(9..11)?,
        n(11..13)?,
        n(13..15)?,
    );
    // Days from the civil date (Howard Hinnant's days_from_civil).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = if mo > 2 { mo - 3 } else { mo + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let secs = u64::try_from(days * 86400 + h * 3600 + mi * 60 + se).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

pub(super) fn clock_skew(t: SystemTime) -> Duration {
    let now = SystemTime::now();
    now.duration_since(t)
        .or_else(|_| t.duration_since(now))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amz_dates_parse_and_skew_is_measured() {
        let t = parse_amz_date("20261126T120000Z").unwrap();
        assert_eq!(
            t,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_694_400)
        );
        assert_eq!(parse_amz_date("2026-11-26T12:00:00Z"), None);
        let hours_ago = SystemTime::now() - Duration::from_secs(3 * 3600);
        assert!(clock_skew(hours_ago) > MAX_CLOCK_SKEW);
        assert!(clock_skew(SystemTime::now()) < Duration::from_secs(1));
    }
}
