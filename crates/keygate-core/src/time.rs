//! Times and durations as text: RFC 3339 formatting that never panics, the duration syntax
//! shared by the `keygate` CLI and the admin API (`30s`, `15m`, `12h`, `90d`), and the range
//! of times keygate stores.
//!
//! ```
//! use std::time::{Duration, UNIX_EPOCH};
//! use keygate_core::time::{self, MAX_DURATION};
//!
//! let t = UNIX_EPOCH + Duration::from_millis(1_767_225_600_250);
//! assert_eq!(time::rfc3339_millis(t).to_string(), "2026-01-01T00:00:00.250Z");
//! assert_eq!(time::parse_duration("90d"), Ok(Duration::from_secs(90 * 86_400)));
//! assert!(time::parse_duration("36501d").is_err());
//! assert_eq!(MAX_DURATION, Duration::from_secs(36_500 * 86_400));
//! ```
//!
//! Key rows hold times from year 0 to 9999 ([`MIN_UNIX_MS`], [`MAX_UNIX_MS`]).
//!
//! `humantime`'s formatters panic on times before 1970 and after 9999; these format every
//! [`SystemTime`]: years after 9999 in ISO 8601's expanded form (`+10000-01-01T...`), years
//! before year 0 with a sign (`-0001-...`), so a damaged value is shown, never a crash.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The longest duration [`parse_duration`] accepts: 36,500 days (about 100 years). An
/// expiry further away than that is no expiry; leave it unset instead.
pub const MAX_DURATION: Duration = Duration::from_secs(36_500 * 86_400);

/// The text of [`MAX_DURATION`] in the duration syntax, for messages.
pub const MAX_DURATION_TEXT: &str = "36500d";

/// The latest time keygate stores and reads back: 9999-12-31T23:59:59.999Z, in milliseconds
/// since the Unix epoch (the end of RFC 3339's four-digit years).
pub const MAX_UNIX_MS: i64 = 253_402_300_799_999;

/// The earliest time keygate stores and reads back: 0000-01-01T00:00:00Z, in milliseconds
/// since the Unix epoch (negative: before 1970).
pub const MIN_UNIX_MS: i64 = -62_167_219_200_000;

/// Whether `t` lies between 0000-01-01T00:00:00Z and 9999-12-31T23:59:59.999Z
/// (inclusive): the range keygate stores, every time of which RFC 3339 can write.
pub fn in_stored_range(t: SystemTime) -> bool {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() <= MAX_UNIX_MS as u128,
        Err(e) => e.duration().as_millis() <= MIN_UNIX_MS.unsigned_abs() as u128,
    }
}

/// `ms` milliseconds since the Unix epoch as a time, if it lies in the stored range
/// (`MIN_UNIX_MS..=MAX_UNIX_MS`); `None` otherwise.
pub fn from_unix_ms(ms: i64) -> Option<SystemTime> {
    if !(MIN_UNIX_MS..=MAX_UNIX_MS).contains(&ms) {
        None
    } else if ms >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_millis(ms.unsigned_abs()))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_millis(ms.unsigned_abs()))
    }
}

/// Why a duration was refused by [`parse_duration`]. The message quotes at most 64
/// characters of the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidDuration {
    /// Not a whole number followed by `s`, `m`, `h` or `d`.
    #[error("{0:?} is not a duration like 30s, 15m, 12h or 90d")]
    Syntax(String),
    /// Longer than [`MAX_DURATION`].
    #[error("{0:?} is too long: the maximum is {MAX_DURATION_TEXT} (about 100 years)")]
    TooLong(String),
}

/// Parses `30s`, `15m`, `12h`, `90d`: a whole number and one unit (seconds, minutes, hours,
/// days), at most [`MAX_DURATION`]. Surrounding whitespace is ignored; nothing else is
/// accepted (no sign, no fraction, no space inside).
pub fn parse_duration(text: &str) -> Result<Duration, InvalidDuration> {
    let clip = || text.chars().take(64).collect::<String>();
    let trimmed = text.trim();
    let digits = trimmed.bytes().take_while(u8::is_ascii_digit).count();
    let (n, unit) = trimmed.split_at(digits);
    let per: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(InvalidDuration::Syntax(clip())),
    };
    if n.is_empty() {
        return Err(InvalidDuration::Syntax(clip()));
    }
    // Digits only: a parse failure is an overflow.
    let secs = n
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(per))
        .filter(|s| *s <= MAX_DURATION.as_secs())
        .ok_or_else(|| InvalidDuration::TooLong(clip()))?;
    Ok(Duration::from_secs(secs))
}

/// A time formatted as RFC 3339 UTC with a fixed number of fractional digits; see
/// [`rfc3339_seconds`], [`rfc3339_millis`], [`rfc3339_micros`]. Formatting never panics
/// and does not allocate.
#[derive(Clone, Copy)]
pub struct Rfc3339 {
    time: SystemTime,
    digits: u8,
}

/// `2026-01-01T00:00:00Z`.
pub fn rfc3339_seconds(time: SystemTime) -> Rfc3339 {
    Rfc3339 { time, digits: 0 }
}

/// `2026-01-01T00:00:00.250Z`.
pub fn rfc3339_millis(time: SystemTime) -> Rfc3339 {
    Rfc3339 { time, digits: 3 }
}

/// `2026-01-01T00:00:00.250000Z`.
pub fn rfc3339_micros(time: SystemTime) -> Rfc3339 {
    Rfc3339 { time, digits: 6 }
}

/// Whole seconds since the epoch (floor) and the nanoseconds after them, for any time.
fn split(t: SystemTime) -> (i128, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (i128::from(d.as_secs()), d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            let (s, n) = (i128::from(d.as_secs()), d.subsec_nanos());
            if n == 0 {
                (-s, 0)
            } else {
                (-s - 1, 1_000_000_000 - n)
            }
        }
    }
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`), for any day count `SystemTime` can produce.
fn civil(days: i128) -> (i128, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32; // [1, 31]
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32; // [1, 12]
    (if m <= 2 { y + 1 } else { y }, m, d)
}

impl Rfc3339 {
    /// Renders the time into `buf` and answers the text: the same as [`Display`](fmt::Display),
    /// without the formatting machinery (the audit writer formats one timestamp per event).
    pub fn render<'a>(&self, buf: &'a mut Rfc3339Buf) -> &'a str {
        let (secs, nanos) = split(self.time);
        let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let (year, month, day) = civil(days);
        let out = &mut buf.0;
        let mut n = 0;
        let mut put = |bytes: &[u8], n: &mut usize| {
            out[*n..*n + bytes.len()].copy_from_slice(bytes);
            *n += bytes.len();
        };
        // `year` is within ±3e11 (what `SystemTime` can hold): at most 12 digits and a sign.
        let (sign, abs) = match year {
            0..=9999 => (None, year as u64),
            10_000.. => (Some(b'+'), year as u64),
            _ => (Some(b'-'), year.unsigned_abs() as u64),
        };
        if let Some(sign) = sign {
            put(&[sign], &mut n);
        }
        let mut digits = [0u8; 20];
        let len = decimal(abs, &mut digits).max(4);
        put(&digits[digits.len() - len..], &mut n);
        let sod = sod as u32;
        let mut tail = *b"-MM-DDTHH:MM:SS";
        two(&mut tail[1..3], month);
        two(&mut tail[4..6], day);
        two(&mut tail[7..9], sod / 3_600);
        two(&mut tail[10..12], sod / 60 % 60);
        two(&mut tail[13..15], sod % 60);
        put(&tail, &mut n);
        match self.digits {
            3 | 6 => {
                let (value, width) = if self.digits == 3 {
                    (nanos / 1_000_000, 3)
                } else {
                    (nanos / 1_000, 6)
                };
                let mut frac = [b'.', 0, 0, 0, 0, 0, 0];
                let mut v = value;
                for slot in frac[1..=width].iter_mut().rev() {
                    *slot = b'0' + (v % 10) as u8;
                    v /= 10;
                }
                put(&frac[..=width], &mut n);
            }
            _ => {}
        }
        put(b"Z", &mut n);
        // Only ASCII digits and punctuation were written.
        std::str::from_utf8(&out[..n]).unwrap_or_default()
    }
}

/// Room for one [`Rfc3339`] text ([`Rfc3339::render`]): the longest is 36 bytes.
pub struct Rfc3339Buf([u8; 40]);

impl Rfc3339Buf {
    /// An empty buffer.
    pub fn new() -> Self {
        Rfc3339Buf([0; 40])
    }
}

impl Default for Rfc3339Buf {
    fn default() -> Self {
        Self::new()
    }
}

/// Writes `v` in decimal at the end of `out`, zero-padded to the left; answers the number of
/// digits (at least one).
fn decimal(mut v: u64, out: &mut [u8; 20]) -> usize {
    out.fill(b'0');
    let mut len = 0;
    loop {
        out[out.len() - 1 - len] = b'0' + (v % 10) as u8;
        len += 1;
        v /= 10;
        if v == 0 {
            return len;
        }
    }
}

/// Writes `v` (below 100) as two digits.
fn two(out: &mut [u8], v: u32) {
    out[0] = b'0' + (v / 10 % 10) as u8;
    out[1] = b'0' + (v % 10) as u8;
}

impl fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.render(&mut Rfc3339Buf::new()))
    }
}

impl fmt::Debug for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64, nanos: u32) -> SystemTime {
        if secs >= 0 {
            UNIX_EPOCH + Duration::new(secs as u64, nanos)
        } else {
            UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
                + Duration::from_nanos(nanos.into())
        }
    }

    #[test]
    fn formats_like_humantime_where_humantime_can() {
        for secs in [
            0i64,
            59,
            86_399,
            951_782_400,     // 2000-02-29
            1_767_225_600,   // 2026-01-01
            4_107_542_399,   // 2100-02-28T23:59:59
            253_402_300_799, // 9999-12-31T23:59:59
        ] {
            for nanos in [0, 1_000, 250_000_000, 999_999_999] {
                let t = at(secs, nanos);
                assert_eq!(
                    rfc3339_millis(t).to_string(),
                    humantime::format_rfc3339_millis(t).to_string()
                );
                assert_eq!(
                    rfc3339_micros(t).to_string(),
                    humantime::format_rfc3339_micros(t).to_string()
                );
                assert_eq!(
                    rfc3339_seconds(t).to_string(),
                    humantime::format_rfc3339_seconds(t).to_string()
                );
            }
        }
    }

    #[test]
    fn formats_like_humantime_across_four_centuries() {
        // A stride that is prime to every calendar period walks days, hours, minutes and
        // seconds through all their values.
        let mut secs = 0i64;
        while secs < 253_402_300_799 {
            let t = at(secs, (secs % 1_000_000_007) as u32 % 1_000_000_000);
            assert_eq!(
                rfc3339_micros(t).to_string(),
                humantime::format_rfc3339_micros(t).to_string()
            );
            secs += 1_234_567_891;
        }
    }

    #[test]
    fn formats_every_time_without_panicking() {
        assert_eq!(
            rfc3339_millis(at(253_402_300_800, 0)).to_string(),
            "+10000-01-01T00:00:00.000Z"
        );
        assert_eq!(
            rfc3339_millis(at(-1, 995_000_000)).to_string(),
            "1969-12-31T23:59:59.995Z"
        );
        assert_eq!(
            rfc3339_seconds(at(-62_167_219_200 - 86_400, 0)).to_string(),
            "-0001-12-31T00:00:00Z"
        );
        // i64::MAX milliseconds: the value a damaged row can hold.
        let far = UNIX_EPOCH + Duration::from_millis(i64::MAX as u64);
        assert_eq!(
            rfc3339_millis(far).to_string(),
            "+292278994-08-17T07:12:55.807Z"
        );
        let before = UNIX_EPOCH - Duration::from_millis(i64::MAX as u64);
        assert_eq!(
            rfc3339_millis(before).to_string(),
            "-292275055-05-16T16:47:04.193Z"
        );
        // The extremes SystemTime itself can hold.
        for t in [
            UNIX_EPOCH + Duration::new(i64::MAX as u64, 999_999_999),
            UNIX_EPOCH - Duration::from_secs(i64::MAX as u64),
        ] {
            assert!(rfc3339_micros(t).to_string().ends_with('Z'));
        }
    }

    #[test]
    fn stored_range() {
        assert!(in_stored_range(UNIX_EPOCH));
        assert!(in_stored_range(at(253_402_300_799, 999_000_000)));
        assert!(!in_stored_range(at(253_402_300_800, 0)));
        assert!(in_stored_range(at(-1, 0)));
        assert!(in_stored_range(at(-62_167_219_200, 0)));
        assert!(!in_stored_range(at(-62_167_219_201, 0)));
        assert_eq!(from_unix_ms(0), Some(UNIX_EPOCH));
        assert_eq!(
            from_unix_ms(-5),
            Some(UNIX_EPOCH - Duration::from_millis(5))
        );
        assert_eq!(
            rfc3339_millis(from_unix_ms(MIN_UNIX_MS).unwrap()).to_string(),
            "0000-01-01T00:00:00.000Z"
        );
        assert_eq!(
            from_unix_ms(MAX_UNIX_MS),
            Some(UNIX_EPOCH + Duration::from_millis(MAX_UNIX_MS as u64))
        );
        for bad in [MIN_UNIX_MS - 1, MAX_UNIX_MS + 1, i64::MAX, i64::MIN] {
            assert_eq!(from_unix_ms(bad), None, "{bad}");
        }
        assert_eq!(
            rfc3339_millis(UNIX_EPOCH + Duration::from_millis(MAX_UNIX_MS as u64)).to_string(),
            "9999-12-31T23:59:59.999Z"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration(" 12h "), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_duration("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration(MAX_DURATION_TEXT), Ok(MAX_DURATION));
        for bad in ["", "s", "10", "10x", "-5d", "1.5h", "10 s", "10S", "1h30m"] {
            assert!(
                matches!(parse_duration(bad), Err(InvalidDuration::Syntax(_))),
                "{bad}"
            );
        }
        // Past the maximum, including the values that once reached past year 9999.
        for long in [
            "36501d",
            "2914000d",
            "3000000d",
            "3153600001s",
            "99999999999999999999d",
        ] {
            let e = parse_duration(long).unwrap_err();
            assert!(matches!(e, InvalidDuration::TooLong(_)), "{long}");
            assert!(e.to_string().contains("the maximum is 36500d"), "{e}");
        }
        let e = parse_duration(&"9".repeat(500)).unwrap_err().to_string();
        assert!(e.len() < 160, "{e}");
    }
}
