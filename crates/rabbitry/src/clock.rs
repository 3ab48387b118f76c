//! The wall clock as rabbitry writes it into messages and rows: epoch
//! milliseconds (deadlines, row times) and RFC 3339 (`x-rabbitry-failed-at`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, ErrorKind, Result};

/// Milliseconds since the epoch, now.
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// `t` in milliseconds since the epoch (negative before it).
pub fn millis_of(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis().min(i64::MAX as u128) as i64,
        Err(e) => -(e.duration().as_millis().min(i64::MAX as u128) as i64),
    }
}

/// The time `millis` milliseconds after the epoch.
pub fn time_of(millis: i64) -> SystemTime {
    if millis >= 0 {
        UNIX_EPOCH + Duration::from_millis(millis as u64)
    } else {
        UNIX_EPOCH - Duration::from_millis(millis.unsigned_abs())
    }
}

/// Parses an RFC 3339 time such as `2026-12-01T09:00:00Z`,
/// `2026-12-01T10:00:00.250+01:00` or `2026-12-01 09:00:00Z`, into
/// milliseconds since the epoch. The offset is required: a time without
/// one is ambiguous, and an error.
pub fn parse_rfc3339(text: &str) -> Result<i64> {
    let bad = |why: &str| {
        Error::new(
            ErrorKind::Invalid,
            format!("`{text}` is not an RFC 3339 time ({why}); write e.g. 2026-12-01T09:00:00Z"),
        )
    };
    let t = text.trim();
    if !t.is_ascii() {
        return Err(bad("only ASCII digits, separators and an offset"));
    }
    let b = t.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return Err(bad("expected YYYY-MM-DDTHH:MM:SS and an offset"));
    }
    if b[13] != b':' || b[16] != b':' {
        return Err(bad("expected HH:MM:SS"));
    }
    let num = |range: std::ops::Range<usize>| -> Result<i64> {
        t.get(range)
            .filter(|s| s.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("a field is not a number"))
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &t[19..];
    let mut millis = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad("no digits after the decimal point"));
        }
        let ms: String = frac[..digits]
            .chars()
            .chain("000".chars())
            .take(3)
            .collect();
        millis = ms.parse::<i64>().map_err(|_| bad("bad fraction"))?;
        rest = &frac[digits..];
    }
    let offset_min = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) && &o[3..4] == ":" => {
            let h: i64 = o[1..3].parse().map_err(|_| bad("bad offset"))?;
            let m: i64 = o[4..6].parse().map_err(|_| bad("bad offset"))?;
            // RFC 3339's time-numoffset: hours 00-23, minutes 00-59.
            if h > 23 || m > 59 {
                return Err(bad(
                    "the offset's hours are 00 to 23 and its minutes 00 to 59",
                ));
            }
            let sign = if o.starts_with('-') { -1 } else { 1 };
            sign * (h * 60 + m)
        }
        "" => return Err(bad("no offset: add Z for UTC, or +01:00")),
        _ => return Err(bad("bad offset")),
    };
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        _ => return Err(bad("no such month")),
    };
    if day < 1 || day > days_in_month || hour > 23 || minute > 59 || second > 60 {
        return Err(bad("no such day or time"));
    }
    // Days-from-civil (Howard Hinnant's algorithm), the inverse of the
    // one in `rfc3339`.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_min * 60;
    Ok(secs * 1000 + millis)
}

/// Formats a time as RFC 3339 in UTC, to the millisecond.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_parse_back_to_what_was_formatted() {
        for ms in [0, 1_764_578_096_123, 951_782_400_000, 4_102_444_799_999] {
            assert_eq!(parse_rfc3339(&rfc3339(time_of(ms))).unwrap(), ms);
        }
        assert_eq!(
            parse_rfc3339("2026-12-01T10:00:00.25+01:00").unwrap(),
            parse_rfc3339("2026-12-01T09:00:00.250Z").unwrap()
        );
        assert_eq!(parse_rfc3339("1970-01-01 00:00:01Z").unwrap(), 1000);
        for bad in [
            "2026-12-01T09:00:00",
            "2026-02-30T09:00:00Z",
            "2026-12-01T25:00:00Z",
            "tomorrow",
            "2026-12-01T09:00:00.Z",
            "2026-13-01T09:00:00Z",
        ] {
            let e = parse_rfc3339(bad).unwrap_err();
            assert!(e.to_string().contains(bad), "{bad}: {e}");
        }
        assert_eq!(millis_of(time_of(-1500)), -1500);
    }
    use std::time::Duration;

    #[test]
    fn offsets_past_23_hours_or_59_minutes_are_refused() {
        assert!(parse_rfc3339("2026-12-01T09:00:00+25:99").is_err());
        assert!(parse_rfc3339("2026-12-01T09:00:00+05:60").is_err());
        assert!(parse_rfc3339("2026-12-01T09:00:00-24:00").is_err());
        assert_eq!(
            parse_rfc3339("2026-12-01T09:00:00+23:59").unwrap(),
            parse_rfc3339("2026-11-30T09:01:00Z").unwrap()
        );
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_799_302_123);
        assert_eq!(rfc3339(t), "2026-11-27T17:08:22.123Z");
    }
}
