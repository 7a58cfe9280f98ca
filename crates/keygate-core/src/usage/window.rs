//! UTC calendar windows: which hour, day, month or credit period an instant falls in.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::record::{QuotaWindow, Refill};

const HOUR: u64 = 3600;
const DAY: u64 = 86_400;

/// One counting window: the window kind of a quota and the instants it starts and ends.
///
/// Calendar windows are UTC and half-open: an instant exactly on `end` belongs to the next
/// window. Credits that never refill have one window, from the Unix epoch, with no end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    /// The kind of window.
    pub kind: QuotaWindow,
    /// When the window starts (inclusive).
    pub start: SystemTime,
    /// When it ends (exclusive); `None` for credits that never refill.
    pub end: Option<SystemTime>,
}

impl Window {
    /// The window of `kind` that contains `at` (instants before 1970 count as 1970).
    ///
    /// A monthly credit refill day past the end of a month (`31` in April) falls on the
    /// month's last day, as Unkey does; a day of `0` reads as `1`.
    pub fn containing(kind: QuotaWindow, at: SystemTime) -> Window {
        let secs = at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let (start, end) = match kind {
            QuotaWindow::Hour => floor_span(secs, HOUR),
            QuotaWindow::Day | QuotaWindow::Credits(Refill::Daily) => floor_span(secs, DAY),
            QuotaWindow::Month => month_span(secs, 1),
            QuotaWindow::Credits(Refill::Monthly { day }) => month_span(secs, day.max(1)),
            QuotaWindow::Credits(Refill::Never) => (0, None),
        };
        Window {
            kind,
            start: UNIX_EPOCH + Duration::from_secs(start),
            end: end.map(|e| UNIX_EPOCH + Duration::from_secs(e)),
        }
    }

    /// The window's length (`None` when it never ends). A calendar month is 28 to 31 days.
    pub fn length(&self) -> Option<Duration> {
        self.end
            .map(|e| e.duration_since(self.start).unwrap_or(Duration::ZERO))
    }

    /// How long from `now` until the window ends (zero if it already has; `None` if never).
    pub fn remaining_at(&self, now: SystemTime) -> Option<Duration> {
        self.end
            .map(|e| e.duration_since(now).unwrap_or(Duration::ZERO))
    }

    /// Whether `at` falls in this window.
    pub fn contains(&self, at: SystemTime) -> bool {
        at >= self.start && self.end.is_none_or(|e| at < e)
    }

    /// The start as whole seconds since the Unix epoch (a store's column).
    pub fn start_secs(&self) -> u64 {
        self.start
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

fn floor_span(secs: u64, len: u64) -> (u64, Option<u64>) {
    let start = secs - secs % len;
    (start, Some(start + len))
}

/// The monthly window anchored on `day` (clamped to each month's length) containing `secs`.
fn month_span(secs: u64, day: u8) -> (u64, Option<u64>) {
    let days = (secs / DAY) as i64;
    let (y, m, _) = civil_from_days(days);
    let anchor = |y: i64, m: u32| -> u64 {
        let d = u32::from(day).min(days_in_month(y, m));
        // A window that would start before 1970 (January 1970 with a refill day past the
        // 1st) starts at the epoch, like every instant before it.
        (days_from_civil(y, m, d).max(0) as u64) * DAY
    };
    let this = anchor(y, m);
    let (ny, nm) = next_month(y, m);
    if secs >= this {
        (this, Some(anchor(ny, nm)))
    } else {
        let (py, pm) = prev_month(y, m);
        (anchor(py, pm), Some(this))
    }
}

fn next_month(y: i64, m: u32) -> (i64, u32) {
    if m == 12 {
        (y + 1, 1)
    } else {
        (y, m + 1)
    }
}

fn prev_month(y: i64, m: u32) -> (i64, u32) {
    if m == 1 {
        (y - 1, 12)
    } else {
        (y, m - 1)
    }
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap(y) => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The instant of a UTC date and time (for tests and reports).
pub fn utc(y: i64, m: u32, d: u32, hh: u32, mm: u32, ss: u32) -> SystemTime {
    let days = days_from_civil(y, m, d);
    let secs = days * DAY as i64 + i64::from(hh) * 3600 + i64::from(mm) * 60 + i64::from(ss);
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(y: i64, m: u32, d: u32, hh: u32, mm: u32, ss: u32) -> SystemTime {
        utc(y, m, d, hh, mm, ss)
    }

    /// A window is the window of its own start (the quota layer keeps only kind and start).
    #[test]
    fn a_window_is_rebuilt_from_its_start() {
        let kinds = [
            QuotaWindow::Hour,
            QuotaWindow::Day,
            QuotaWindow::Month,
            QuotaWindow::Credits(Refill::Daily),
            QuotaWindow::Credits(Refill::Never),
            QuotaWindow::Credits(Refill::Monthly { day: 1 }),
            QuotaWindow::Credits(Refill::Monthly { day: 15 }),
            QuotaWindow::Credits(Refill::Monthly { day: 29 }),
            QuotaWindow::Credits(Refill::Monthly { day: 31 }),
        ];
        let instants = [
            UNIX_EPOCH,
            at(2024, 1, 31, 23, 59, 59),
            at(2024, 2, 29, 0, 0, 0),
            at(2024, 2, 29, 12, 0, 0),
            at(2023, 2, 28, 12, 0, 0),
            at(2024, 3, 1, 0, 0, 1),
            at(2024, 12, 31, 23, 0, 0),
            at(2025, 4, 30, 6, 30, 0),
        ];
        // Early January 1970 with a refill day past the 1st: the window starts at the epoch
        // (it used to overflow computing a start in December 1969).
        let w = Window::containing(
            QuotaWindow::Credits(Refill::Monthly { day: 15 }),
            at(1970, 1, 3, 0, 0, 0),
        );
        assert_eq!(w.start, UNIX_EPOCH);
        assert_eq!(w.end, Some(at(1970, 1, 15, 0, 0, 0)));
        for kind in kinds {
            for t in instants {
                let w = Window::containing(kind, t);
                assert_eq!(Window::containing(kind, w.start), w, "{kind:?} at {t:?}");
                let again =
                    Window::containing(kind, UNIX_EPOCH + Duration::from_secs(w.start_secs()));
                assert_eq!(again, w, "{kind:?} at {t:?}");
            }
        }
    }

    #[test]
    fn civil_round_trips() {
        for z in [-1000_i64, 0, 1, 59, 365, 10_957, 20_454, 21_243, 100_000] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(
            at(2026, 1, 1, 0, 0, 0),
            UNIX_EPOCH + Duration::from_secs(1_767_225_600)
        );
    }

    #[test]
    fn hour_and_day_edges() {
        let t = at(2026, 3, 14, 15, 59, 59);
        let h = Window::containing(QuotaWindow::Hour, t);
        assert_eq!(h.start, at(2026, 3, 14, 15, 0, 0));
        assert_eq!(h.end, Some(at(2026, 3, 14, 16, 0, 0)));
        let next = Window::containing(QuotaWindow::Hour, at(2026, 3, 14, 16, 0, 0));
        assert_eq!(next.start, at(2026, 3, 14, 16, 0, 0));
        let d = Window::containing(QuotaWindow::Day, t);
        assert_eq!(d.start, at(2026, 3, 14, 0, 0, 0));
        assert_eq!(d.length(), Some(Duration::from_secs(86_400)));
    }

    #[test]
    fn months_and_leap_day() {
        let feb = Window::containing(QuotaWindow::Month, at(2028, 2, 29, 23, 59, 59));
        assert_eq!(feb.start, at(2028, 2, 1, 0, 0, 0));
        assert_eq!(feb.end, Some(at(2028, 3, 1, 0, 0, 0)));
        assert_eq!(feb.length(), Some(Duration::from_secs(29 * 86_400)));
        let feb27 = Window::containing(QuotaWindow::Month, at(2027, 2, 10, 0, 0, 0));
        assert_eq!(feb27.length(), Some(Duration::from_secs(28 * 86_400)));
        let dec = Window::containing(QuotaWindow::Month, at(2026, 12, 31, 23, 0, 0));
        assert_eq!(dec.end, Some(at(2027, 1, 1, 0, 0, 0)));
        let leap = Window::containing(QuotaWindow::Day, at(2028, 2, 29, 12, 0, 0));
        assert_eq!(leap.start, at(2028, 2, 29, 0, 0, 0));
        assert_eq!(leap.end, Some(at(2028, 3, 1, 0, 0, 0)));
    }

    #[test]
    fn monthly_credits_anchor_on_the_refill_day() {
        let k = QuotaWindow::Credits(Refill::Monthly { day: 31 });
        // January 31 to February's last day (29 in 2028), then to March 31.
        let w = Window::containing(k, at(2028, 2, 15, 0, 0, 0));
        assert_eq!(w.start, at(2028, 1, 31, 0, 0, 0));
        assert_eq!(w.end, Some(at(2028, 2, 29, 0, 0, 0)));
        let w = Window::containing(k, at(2028, 2, 29, 0, 0, 0));
        assert_eq!(w.start, at(2028, 2, 29, 0, 0, 0));
        assert_eq!(w.end, Some(at(2028, 3, 31, 0, 0, 0)));
        let k15 = QuotaWindow::Credits(Refill::Monthly { day: 15 });
        let w = Window::containing(k15, at(2026, 1, 14, 23, 59, 59));
        assert_eq!(w.start, at(2025, 12, 15, 0, 0, 0));
        assert_eq!(w.end, Some(at(2026, 1, 15, 0, 0, 0)));
        let never =
            Window::containing(QuotaWindow::Credits(Refill::Never), at(2026, 1, 1, 0, 0, 0));
        assert_eq!(never.start, UNIX_EPOCH);
        assert_eq!(never.end, None);
        assert_eq!(never.remaining_at(at(2030, 1, 1, 0, 0, 0)), None);
    }
}
