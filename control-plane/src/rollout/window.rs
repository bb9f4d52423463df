//! Maintenance windows: weekly spans of local time in a named time zone ("Sat 01:00-05:00" in
//! "Europe/Berlin"), during which a device may receive a desired state. Pure: time comes in as an argument.
//!
//! Local times follow the zone's rules on each date, daylight-saving changes included. A local time the clocks
//! skip is moved forward by the length of the gap (02:30 on the night the clocks jump from 02:00 to 03:00 is
//! 03:30), and one they repeat takes its first instance (RFC 9557's and Temporal's "compatible" rule), so a
//! window is never dropped and never runs twice. A window whose end is not after its start ("Fri 23:00-02:00") runs past midnight.

use jiff::civil::{Date, Time, Weekday};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use serde::{Deserialize, Serialize};

/// What is wrong with a window's description.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("`{0}` is not of the form \"DAY HH:MM-HH:MM\" (DAY: Mon..Sun, a range like Mon-Fri, or daily)")]
    Form(String),
    #[error("`{0}` is not a day (Mon, Tue, Wed, Thu, Fri, Sat, Sun)")]
    Day(String),
    #[error("`{0}` is not a time of day HH:MM")]
    Time(String),
    #[error("`{spec}`: the window starts and ends at {time}; it would be empty")]
    Empty { spec: String, time: String },
    #[error("time zone `{zone}`: {reason}")]
    Zone { zone: String, reason: String },
}

/// One weekly span: the days it starts on and its local start and end.
#[derive(Debug, Clone, PartialEq)]
pub struct Weekly {
    days: Vec<Weekday>,
    start: Time,
    end: Time,
}

const DAYS: [(&str, Weekday); 7] = [
    ("mon", Weekday::Monday),
    ("tue", Weekday::Tuesday),
    ("wed", Weekday::Wednesday),
    ("thu", Weekday::Thursday),
    ("fri", Weekday::Friday),
    ("sat", Weekday::Saturday),
    ("sun", Weekday::Sunday),
];

fn day(s: &str) -> Result<Weekday, WindowError> {
    let l = s.to_ascii_lowercase();
    DAYS.iter()
        .find(|(name, _)| l.get(..3) == Some(*name) && full_name(name).starts_with(&l))
        .map(|(_, d)| *d)
        .ok_or_else(|| WindowError::Day(s.to_string()))
}

fn full_name(short: &str) -> &'static str {
    match short {
        "mon" => "monday",
        "tue" => "tuesday",
        "wed" => "wednesday",
        "thu" => "thursday",
        "fri" => "friday",
        "sat" => "saturday",
        _ => "sunday",
    }
}

fn time_of_day(s: &str) -> Result<Time, WindowError> {
    let bad = || WindowError::Time(s.to_string());
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return Err(bad());
    }
    let (h, m): (i8, i8) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h == 24 && m == 0 {
        // "24:00" is the end of the day: the last representable minute boundary.
        return Ok(Time::MAX);
    }
    Time::new(h, m, 0, 0).map_err(|_| bad())
}

impl std::str::FromStr for Weekly {
    type Err = WindowError;

    /// `"Sat 01:00-05:00"`, `"Mon-Fri 22:00-04:00"`, `"daily 02:00-03:00"`; an en dash works as well.
    fn from_str(spec: &str) -> Result<Weekly, WindowError> {
        let s = spec.replace(['\u{2013}', '\u{2014}'], "-");
        let mut parts = s.split_whitespace();
        let (Some(days), Some(span), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(WindowError::Form(spec.to_string()));
        };
        let days = if days.eq_ignore_ascii_case("daily") {
            DAYS.iter().map(|(_, d)| *d).collect()
        } else if let Some((a, b)) = days.split_once('-') {
            let (a, b) = (day(a)?, day(b)?);
            let mut v = vec![a];
            let mut d = a;
            while d != b {
                d = d.next();
                v.push(d);
            }
            v
        } else {
            vec![day(days)?]
        };
        let (a, b) = span.split_once('-').ok_or_else(|| WindowError::Form(spec.to_string()))?;
        let (start, end) = (time_of_day(a)?, time_of_day(b)?);
        if start == end {
            return Err(WindowError::Empty { spec: spec.to_string(), time: a.to_string() });
        }
        Ok(Weekly { days, start, end })
    }
}

/// A window's weekly spans in one time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub name: String,
    spans: Vec<Weekly>,
    zone: TimeZone,
}

/// Whether a device may receive a desired state now, and when that changes.
#[derive(utoipa::ToSchema, Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Opening {
    /// No window applies: any time.
    #[default]
    Always,
    /// Inside a window until `closes_ms`.
    Open { closes_ms: u64 },
    /// Outside; the next window opens at `opens_ms`.
    Closed { opens_ms: u64 },
}

impl Opening {
    pub fn is_open(self) -> bool {
        !matches!(self, Opening::Closed { .. })
    }

    /// Of two schedules that both apply, the device may receive when either is open.
    fn either(self, other: Opening) -> Opening {
        match (self, other) {
            (Opening::Always, _) | (_, Opening::Always) => Opening::Always,
            (Opening::Open { closes_ms: a }, Opening::Open { closes_ms: b }) => Opening::Open { closes_ms: a.max(b) },
            (o @ Opening::Open { .. }, Opening::Closed { .. }) | (Opening::Closed { .. }, o @ Opening::Open { .. }) => {
                o
            }
            (Opening::Closed { opens_ms: a }, Opening::Closed { opens_ms: b }) => {
                Opening::Closed { opens_ms: a.min(b) }
            }
        }
    }
}

/// The opening under several schedules (any of them open is open); [`Opening::Always`] when there are none.
pub fn opening(schedules: &[&Schedule], now_ms: u64) -> Opening {
    let mut it = schedules.iter().map(|s| s.at(now_ms));
    let Some(first) = it.next() else { return Opening::Always };
    it.fold(first, Opening::either)
}

fn millis(t: Timestamp) -> u64 {
    u64::try_from(t.as_millisecond()).unwrap_or(0)
}

impl Schedule {
    /// Parses every span and looks the zone up (the system's time zone database, or the copy built in).
    pub fn new(name: &str, spans: &[String], zone: &str) -> Result<Schedule, WindowError> {
        let zone_err = |reason: String| WindowError::Zone { zone: zone.to_string(), reason };
        let tz = jiff::tz::db().get(zone).map_err(|e| zone_err(e.to_string()))?;
        if spans.is_empty() {
            return Err(WindowError::Form(String::new()));
        }
        let spans = spans.iter().map(|s| s.parse()).collect::<Result<Vec<Weekly>, _>>()?;
        Ok(Schedule { name: name.to_string(), spans, zone: tz })
    }

    /// The instants (ms) each span occurrence covers, for spans starting on local dates `from..=to`.
    fn occurrences(&self, from: Date, to: Date) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut date = from;
        while date <= to {
            for w in self.spans.iter().filter(|w| w.days.contains(&date.weekday())) {
                let end_date = if w.end > w.start { date } else { date.tomorrow().unwrap_or(date) };
                // Local times resolve as the zone's rules say that day: a skipped time moves forward, a
                // repeated one takes its first instance.
                let start = date.to_datetime(w.start).to_zoned(self.zone.clone());
                let end = end_date.to_datetime(w.end).to_zoned(self.zone.clone());
                if let (Ok(s), Ok(e)) = (start, end) {
                    let (s, e) = (millis(s.timestamp()), millis(e.timestamp()));
                    if e > s {
                        out.push((s, e));
                    }
                }
            }
            match date.tomorrow() {
                Ok(d) => date = d,
                Err(_) => break,
            }
        }
        out
    }

    /// Whether the schedule is open at `now_ms`, and when that changes.
    pub fn at(&self, now_ms: u64) -> Opening {
        let Ok(now) = Timestamp::from_millisecond(now_ms as i64) else { return Opening::Always };
        let today = now.to_zoned(self.zone.clone()).date();
        // Spans last at most a day, so yesterday's may still be open; the next one starts within 8 days.
        let (Ok(from), Ok(to)) = (today.checked_sub(1.day()), today.checked_add(8.days())) else {
            return Opening::Always;
        };
        let occ = self.occurrences(from, to);
        if let Some(closes_ms) = occ.iter().filter(|(s, e)| *s <= now_ms && now_ms < *e).map(|(_, e)| *e).max() {
            return Opening::Open { closes_ms };
        }
        match occ.iter().map(|(s, _)| *s).filter(|s| *s > now_ms).min() {
            Some(opens_ms) => Opening::Closed { opens_ms },
            None => Opening::Always,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Milliseconds of a local time in a zone.
    fn at(zone: &str, local: &str) -> u64 {
        let dt: jiff::civil::DateTime = local.parse().unwrap();
        millis(dt.to_zoned(jiff::tz::db().get(zone).unwrap()).unwrap().timestamp())
    }

    fn berlin(spans: &[&str]) -> Schedule {
        Schedule::new("night", &spans.iter().map(|s| s.to_string()).collect::<Vec<_>>(), "Europe/Berlin").unwrap()
    }

    #[test]
    fn a_weekly_window_is_open_inside_and_says_when_it_next_opens_outside() {
        let s = berlin(&["Sat 01:00-05:00"]);
        // 2026-12-05 is a Saturday.
        let open = s.at(at("Europe/Berlin", "2026-12-05T02:00"));
        assert_eq!(open, Opening::Open { closes_ms: at("Europe/Berlin", "2026-12-05T05:00") });
        // Just before, and just at its end: closed, next opening is the coming Saturday's.
        assert_eq!(
            s.at(at("Europe/Berlin", "2026-12-05T00:59")),
            Opening::Closed { opens_ms: at("Europe/Berlin", "2026-12-05T01:00") }
        );
        assert_eq!(
            s.at(at("Europe/Berlin", "2026-12-05T05:00")),
            Opening::Closed { opens_ms: at("Europe/Berlin", "2026-12-12T01:00") }
        );
        // Berlin is UTC+1 in winter: the window opens at 00:00 UTC.
        assert_eq!(at("Europe/Berlin", "2026-12-05T01:00"), at("UTC", "2026-12-05T00:00"));
    }

    #[test]
    fn windows_follow_daylight_saving_changes() {
        let s = berlin(&["Sun 01:00-05:00"]);
        // Clocks go forward on Sunday 2026-03-29 at 02:00: the window is 3 hours long that night.
        let (open, close) = (at("Europe/Berlin", "2026-03-29T01:00"), at("Europe/Berlin", "2026-03-29T05:00"));
        assert_eq!(close - open, 3 * 3600 * 1000);
        assert_eq!(open, at("UTC", "2026-03-29T00:00"), "01:00 is still winter time (UTC+1)");
        assert_eq!(close, at("UTC", "2026-03-29T03:00"), "05:00 is summer time (UTC+2)");
        assert_eq!(s.at(open - 1), Opening::Closed { opens_ms: open });
        assert_eq!(s.at(open + 1), Opening::Open { closes_ms: close });
        // Clocks go back on Sunday 2026-10-25 at 03:00: that night's window is 5 hours long.
        let (open, close) = (at("Europe/Berlin", "2026-10-25T01:00"), at("Europe/Berlin", "2026-10-25T05:00"));
        assert_eq!(close - open, 5 * 3600 * 1000);
        let week_before = at("Europe/Berlin", "2026-10-18T05:00");
        assert_eq!(s.at(week_before), Opening::Closed { opens_ms: open });
        // A window after the change: from one Sunday's opening to the next is 7 days and 1 hour of real time.
        let morning = berlin(&["Sun 06:00-07:00"]);
        let first = at("Europe/Berlin", "2026-10-18T06:00");
        let Opening::Closed { opens_ms: next } = morning.at(first + 3600 * 1000) else { panic!("closed at 07:00") };
        assert_eq!(next, at("UTC", "2026-10-25T05:00"), "06:00 winter time is 05:00 UTC");
        assert_eq!(next - first, (7 * 24 + 1) * 3600 * 1000);
    }

    #[test]
    fn a_window_starting_in_the_skipped_hour_starts_when_the_clock_resumes() {
        let s = berlin(&["Sun 02:30-04:00"]);
        // 02:30 does not exist on 2026-03-29 in Berlin: the window starts an hour of wall time later, 03:30
        // summer time (01:30 UTC), and still ends at 04:00 summer time.
        let now = at("UTC", "2026-03-29T00:45");
        assert_eq!(s.at(now), Opening::Closed { opens_ms: at("UTC", "2026-03-29T01:30") });
        assert_eq!(s.at(at("UTC", "2026-03-29T01:45")), Opening::Open { closes_ms: at("UTC", "2026-03-29T02:00") });
    }

    #[test]
    fn windows_past_midnight_and_day_ranges() {
        let s = berlin(&["Mon-Fri 23:00-02:00"]);
        // Saturday 00:30 is still inside Friday's window; Saturday 23:30 is not in any.
        assert_eq!(
            s.at(at("Europe/Berlin", "2026-12-05T00:30")),
            Opening::Open { closes_ms: at("Europe/Berlin", "2026-12-05T02:00") }
        );
        assert_eq!(
            s.at(at("Europe/Berlin", "2026-12-05T23:30")),
            Opening::Closed { opens_ms: at("Europe/Berlin", "2026-12-07T23:00") }
        );
        let daily = berlin(&["daily 12:00-13:00"]);
        assert!(daily.at(at("Europe/Berlin", "2026-12-06T12:30")).is_open());
    }

    #[test]
    fn several_schedules_are_open_when_any_is() {
        let (a, b) = (berlin(&["Sat 01:00-05:00"]), berlin(&["Sat 04:00-08:00"]));
        let t = at("Europe/Berlin", "2026-12-05T04:30");
        assert_eq!(opening(&[&a, &b], t), Opening::Open { closes_ms: at("Europe/Berlin", "2026-12-05T08:00") });
        assert_eq!(opening(&[], t), Opening::Always);
        let t = at("Europe/Berlin", "2026-12-05T00:00");
        assert_eq!(opening(&[&a, &b], t), Opening::Closed { opens_ms: at("Europe/Berlin", "2026-12-05T01:00") });
    }

    #[test]
    fn bad_windows_name_what_is_wrong() {
        let bad = |spec: &str, zone: &str| Schedule::new("w", &[spec.to_string()], zone).unwrap_err().to_string();
        assert!(bad("Sat 01:00", "UTC").contains("not of the form"), "{}", bad("Sat 01:00", "UTC"));
        assert!(bad("Caturday 01:00-02:00", "UTC").contains("`Caturday` is not a day"));
        assert!(bad("Sat 25:00-26:00", "UTC").contains("`25:00` is not a time of day"));
        assert!(bad("Sat 01:00-01:00", "UTC").contains("would be empty"));
        assert!(bad("Sat 01:00-02:00", "Mars/Olympus_Mons").contains("time zone `Mars/Olympus_Mons`"));
        assert!("Saturday 01:00–05:00".parse::<Weekly>().is_ok(), "full names and an en dash");
        assert!("Sat 22:00-24:00".parse::<Weekly>().is_ok());
    }
}
