//! Alerts: what a person is told, as opposed to what a model flags.
//!
//! A model flags windows; a fault flags many of them, not always in a row. An alert is one fault: it opens
//! after `open_after` flagged windows in a row, takes in every flagged window until `close_after` windows in
//! a row pass unflagged (hysteresis: one calm window does not end it), and a flagged window within
//! `cooldown_secs` of its close reopens it rather than raising a new one. [`AlertTracker`] is that rule, pure:
//! the agent runs it on its model's scores (so that alerts are raised offline too) and keeps its state
//! durably, and the simulators run the same rule to score alerts against their ground truth.
//!
//! Each change an operator should see (an alert opens, closes or reopens) is an [`AlertEvent`] snapshot with
//! a new `rev`, sent on `up/alerts` and acknowledged by `rev` ([`crate::envelope::Ack::alerts`]); the control
//! plane keeps the latest snapshot of each alert.

use serde::{Deserialize, Serialize};

/// A class's alert rule, the `[alerts]` section of its class file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AlertPolicy {
    /// Flagged windows in a row that open an alert.
    #[serde(default = "default_open_after")]
    pub open_after: u32,
    /// Unflagged windows in a row that close it.
    #[serde(default = "default_close_after")]
    pub close_after: u32,
    /// A flagged window this soon after an alert closed reopens it, seconds.
    #[serde(default = "default_cooldown_secs")]
    pub cooldown_secs: u64,
    /// A reading of the model's sensor past the range the device has seen by more than this share of the
    /// range counts as a flagged window, and its record is flagged out of range ([`crate::seen_range`]).
    /// 0 turns the rule off.
    #[serde(default = "default_range_tolerance")]
    pub range_tolerance: f64,
    /// How rarely a normal window may count towards an alert, in days of the sensor's readings: a window the
    /// model flags counts only if its score is also above the score the device's own windows pass about once
    /// in `tail_days` (a share of its windows, [`AlertPolicy::tail_risk`]), learnt from the device's scores
    /// under the model it runs ([`crate::score_tail`]). Until that is learnt (at least 1,000 windows over a
    /// week), the tail of the model's validation scores judges, and without one the model's flag counts
    /// alone. 0 turns the rule off.
    #[serde(default = "default_tail_days")]
    pub tail_days: f64,
}

fn default_open_after() -> u32 {
    3
}
fn default_close_after() -> u32 {
    10
}
fn default_cooldown_secs() -> u64 {
    300
}
fn default_range_tolerance() -> f64 {
    0.02
}
fn default_tail_days() -> f64 {
    365.0
}
/// The largest share of windows the alert tail may let through: below the share the tail is fitted to.
pub const MAX_TAIL_RISK: f64 = 0.01;
/// The smallest: one window in a million. Past it the fit reaches too far beyond what a device shows in the
/// week it learns from (a sensor that scores a window every 128 ms makes 4.7 million windows a week).
pub const MIN_TAIL_RISK: f64 = 1e-6;
/// The longest `tail_days`: a century.
pub const MAX_TAIL_DAYS: f64 = 36_500.0;

impl AlertPolicy {
    /// The share of normal windows the alert tail lets through, for windows `window_secs` apart: one in
    /// `tail_days` of them, between [`MIN_TAIL_RISK`] and [`MAX_TAIL_RISK`]. 0 when the rule is off.
    pub fn tail_risk(&self, window_secs: f64) -> f64 {
        if !(self.tail_days > 0.0 && window_secs > 0.0) {
            return 0.0;
        }
        (window_secs / (self.tail_days * 86_400.0)).clamp(MIN_TAIL_RISK, MAX_TAIL_RISK)
    }
}

impl Default for AlertPolicy {
    fn default() -> Self {
        AlertPolicy {
            open_after: default_open_after(),
            close_after: default_close_after(),
            cooldown_secs: default_cooldown_secs(),
            range_tolerance: default_range_tolerance(),
            tail_days: default_tail_days(),
        }
    }
}

/// Largest `open_after` and `close_after`.
pub const MAX_ALERT_WINDOWS: u32 = 10_000;
/// Largest `cooldown_secs`: a week.
pub const MAX_COOLDOWN_SECS: u64 = 7 * 24 * 3600;
/// Longest `sensor` and `model` an alert carries, bytes.
pub const MAX_ALERT_TEXT: usize = 256;

/// One alert as a device raised it: a snapshot, sent when it opens, closes or reopens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AlertEvent {
    /// The device's alert number, from 1, never reused (it survives restarts).
    pub id: u64,
    /// The snapshot's number among all the device's alert snapshots, from 1: acknowledgements name it, and
    /// the control plane keeps the highest it has seen of each alert.
    pub rev: u64,
    /// The sensor whose windows the model scored.
    pub sensor: String,
    /// The model that raised it, as heartbeats name it (`name vN (sha256:...)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Event time of the first flagged window, Unix ms.
    pub onset_ms: u64,
    /// Event time of the latest flagged window.
    pub last_ms: u64,
    /// The highest score, and when.
    pub peak_score: f32,
    pub peak_ms: u64,
    /// Flagged windows it took in.
    pub windows: u32,
    /// When it closed (the event time of the window that closed it); absent while it is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_ms: Option<u64>,
    /// Set by the sender: every snapshot of the device up to this `rev` has been acknowledged and is gone
    /// from it, so it is never sent again (a control plane restored from an older backup moves its mark up to
    /// here instead of waiting for them). 0 when none was.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub floor: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `s` cut to at most [`MAX_ALERT_TEXT`] bytes, at a character boundary.
fn bounded(s: &str) -> String {
    let mut end = s.len().min(MAX_ALERT_TEXT);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

impl AlertEvent {
    pub fn is_open(&self) -> bool {
        self.end_ms.is_none()
    }

    /// From onset to close, or to the latest flagged window while open.
    pub fn duration_ms(&self) -> u64 {
        self.end_ms.unwrap_or(self.last_ms).saturating_sub(self.onset_ms)
    }

    /// Refuses a snapshot no tracker makes: numbers from 1, times in order, bounded text, a finite peak.
    pub fn validate(&self) -> Result<(), String> {
        let fail = |what: &str| Err(format!("alert {}: {what}", self.id));
        if self.id == 0 || self.rev == 0 {
            return fail("id and rev count from 1");
        }
        if self.sensor.is_empty() || self.sensor.len() > MAX_ALERT_TEXT {
            return fail("sensor must be 1 to 256 bytes");
        }
        if self.model.as_ref().is_some_and(|m| m.len() > MAX_ALERT_TEXT) {
            return fail("model is over 256 bytes");
        }
        if !self.peak_score.is_finite() {
            return fail("peak_score is not finite");
        }
        if self.windows == 0 {
            return fail("an alert takes in at least one window");
        }
        let in_span = |t: u64| self.onset_ms <= t && t <= self.last_ms;
        if !in_span(self.peak_ms) || self.end_ms.is_some_and(|e| e < self.last_ms) {
            return fail("times out of order (onset <= peak <= last <= end)");
        }
        Ok(())
    }
}

/// The run of flagged windows before an alert opens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
struct Run {
    windows: u32,
    /// The earliest and latest event time in the run (a clock that steps back keeps them in order).
    onset_ms: u64,
    #[serde(default)]
    last_ms: u64,
    peak_score: f32,
    peak_ms: u64,
}

/// The alert rule's state for one device's model sensor. Serialisable: the agent commits it with the
/// records it scored, so a restart neither loses an open alert nor reuses a number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct AlertTracker {
    /// The last alert number and snapshot number handed out.
    last_id: u64,
    last_rev: u64,
    run: Run,
    /// Unflagged windows in a row while `current` is open.
    quiet: u32,
    /// The open alert, or the last one while its cool-down lasts.
    current: Option<AlertEvent>,
}

impl AlertTracker {
    /// The open alert, if any.
    pub fn open_alert(&self) -> Option<&AlertEvent> {
        self.current.as_ref().filter(|a| a.is_open())
    }

    /// Whether `ev`, a snapshot [`AlertTracker::observe`] made from this state, raises a new alert rather
    /// than updating the open one or reopening the last within its cool-down.
    pub fn raises(&self, ev: &AlertEvent) -> bool {
        self.current.as_ref().map(|a| a.id) != Some(ev.id)
    }

    /// The last snapshot number handed out (0 before the first).
    pub fn last_rev(&self) -> u64 {
        self.last_rev
    }

    fn snapshot(&mut self) -> Option<AlertEvent> {
        self.last_rev += 1;
        let a = self.current.as_mut()?;
        a.rev = self.last_rev;
        Some(a.clone())
    }

    /// Takes one scored window of `sensor` at event time `ts_ms`: whether the model flagged it, its score,
    /// and the model. Returns the snapshot to send when an alert opens, closes or reopens.
    pub fn observe(
        &mut self,
        policy: &AlertPolicy,
        sensor: &str,
        ts_ms: u64,
        score: f32,
        flagged: bool,
        model: Option<&str>,
    ) -> Option<AlertEvent> {
        let score = if score.is_finite() { score } else { 0.0 };
        let open = self.current.as_ref().is_some_and(|a| a.is_open());
        if open {
            let a = self.current.as_mut()?;
            if flagged {
                self.quiet = 0;
                a.windows = a.windows.saturating_add(1);
                a.last_ms = a.last_ms.max(ts_ms);
                if score > a.peak_score {
                    (a.peak_score, a.peak_ms) = (score, a.last_ms);
                }
                return None;
            }
            self.quiet += 1;
            if self.quiet < policy.close_after {
                return None;
            }
            a.end_ms = Some(ts_ms.max(a.last_ms));
            self.quiet = 0;
            return self.snapshot();
        }
        if !flagged {
            self.run = Run::default();
            let cooldown_ms = policy.cooldown_secs.saturating_mul(1000);
            let cooled =
                self.current.as_ref().and_then(|a| a.end_ms).is_some_and(|e| ts_ms > e.saturating_add(cooldown_ms));
            if cooled {
                self.current = None;
            }
            return None;
        }
        // A flagged window soon after the last alert closed: the same fault, so the same alert.
        let cooldown_ms = policy.cooldown_secs.saturating_mul(1000);
        if let Some(a) =
            self.current.as_mut().filter(|a| a.end_ms.is_some_and(|e| ts_ms <= e.saturating_add(cooldown_ms)))
        {
            a.end_ms = None;
            a.windows = a.windows.saturating_add(1);
            a.last_ms = a.last_ms.max(ts_ms);
            if score > a.peak_score {
                (a.peak_score, a.peak_ms) = (score, a.last_ms);
            }
            self.quiet = 0;
            return self.snapshot();
        }
        if self.run.windows == 0 {
            self.run = Run { windows: 0, onset_ms: ts_ms, last_ms: ts_ms, peak_score: score, peak_ms: ts_ms };
        }
        self.run.windows += 1;
        (self.run.onset_ms, self.run.last_ms) = (self.run.onset_ms.min(ts_ms), self.run.last_ms.max(ts_ms));
        if score > self.run.peak_score {
            (self.run.peak_score, self.run.peak_ms) = (score, ts_ms);
        }
        if self.run.windows < policy.open_after.max(1) {
            return None;
        }
        let run = std::mem::take(&mut self.run);
        self.last_id += 1;
        self.current = Some(AlertEvent {
            id: self.last_id,
            rev: 0,
            sensor: bounded(sensor),
            model: model.map(bounded),
            onset_ms: run.onset_ms,
            last_ms: run.last_ms,
            peak_score: run.peak_score,
            peak_ms: run.peak_ms.clamp(run.onset_ms, run.last_ms),
            windows: run.windows,
            end_ms: None,
            floor: 0,
        });
        self.quiet = 0;
        self.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: AlertPolicy =
        AlertPolicy { open_after: 3, close_after: 4, cooldown_secs: 10, range_tolerance: 0.02, tail_days: 365.0 };

    /// Feeds one flag pattern (`x` flagged, `.` not), a window a second from t = 1 s; returns the snapshots.
    fn feed(t: &mut AlertTracker, pattern: &str, start_s: u64) -> Vec<AlertEvent> {
        pattern
            .chars()
            .enumerate()
            .filter_map(|(i, c)| {
                let ts = (start_s + i as u64) * 1000;
                let flagged = c == 'x';
                t.observe(&P, "s", ts, if flagged { 10.0 + i as f32 } else { 0.1 }, flagged, Some("m v1"))
            })
            .collect()
    }

    #[test]
    fn the_tail_lets_one_window_in_tail_days_through_within_bounds() {
        let p = AlertPolicy::default();
        // A reading a minute: one in the 525,600 of a year.
        assert!((p.tail_risk(60.0) - 60.0 / (365.0 * 86_400.0)).abs() < 1e-15);
        // A window every 128 ms would be one in 246 million: held at one in a million.
        assert_eq!(p.tail_risk(0.128), MIN_TAIL_RISK);
        assert_eq!(AlertPolicy { tail_days: 1.0 / 24.0, ..p.clone() }.tail_risk(3600.0), MAX_TAIL_RISK);
        assert_eq!(AlertPolicy { tail_days: 0.0, ..p.clone() }.tail_risk(60.0), 0.0);
        assert_eq!(p.tail_risk(0.0), 0.0);
    }

    #[test]
    fn one_fault_with_calm_windows_inside_is_one_alert() {
        let mut t = AlertTracker::default();
        let events = feed(&mut t, "..xx.xxx.x..x.xx.....", 1);
        // Opens at the third flag in a row (windows 6-8), takes in the flags after it, closes after 4 calm ones.
        assert_eq!(events.len(), 2, "{events:?}");
        let (opened, closed) = (&events[0], &events[1]);
        assert_eq!((opened.id, opened.rev, opened.onset_ms, opened.windows), (1, 1, 6000, 3));
        assert!(opened.is_open());
        assert_eq!((closed.id, closed.rev, closed.windows, closed.last_ms), (1, 2, 7, 16000));
        assert_eq!(closed.end_ms, Some(20000));
        assert_eq!((closed.peak_score, closed.peak_ms), (25.0, 16000));
        assert_eq!(closed.duration_ms(), 14000);
        closed.validate().unwrap();
    }

    #[test]
    fn a_clock_that_steps_back_still_makes_valid_snapshots() {
        let mut t = AlertTracker::default();
        let long = "é".repeat(300);
        let mut out = Vec::new();
        for ts in [10_000, 4_000, 12_000, 11_000, u64::MAX - 5] {
            out.extend(t.observe(&P, &long, ts, ts as f32, true, None));
        }
        for ts in [1_000, 2_000, 3_000, 4_000] {
            out.extend(t.observe(&P, &long, ts, 0.0, false, None));
        }
        assert_eq!(out.len(), 2, "{out:?}");
        for e in &out {
            e.validate().unwrap();
            assert!(e.sensor.len() <= MAX_ALERT_TEXT);
        }
        // Long after, with the clock back: a new alert, and the cool-down arithmetic does not overflow.
        for ts in [5_000, 6_000, 7_000] {
            out.extend(t.observe(&P, "s", ts, 1.0, true, None));
        }
        assert!(out.iter().all(|e| e.validate().is_ok()));
    }

    #[test]
    fn scattered_flags_raise_nothing() {
        let mut t = AlertTracker::default();
        assert!(feed(&mut t, "x.x.xx.x..xx.x.x..x", 1).is_empty());
        assert_eq!(t.open_alert(), None);
    }

    #[test]
    fn a_flag_within_the_cool_down_reopens_after_it_a_new_alert() {
        let mut t = AlertTracker::default();
        let mut events = feed(&mut t, "xxx....", 1);
        assert_eq!(events.len(), 2);
        // 5 s after the close: the same alert reopens.
        events.extend(feed(&mut t, "x", 12));
        assert_eq!((events[2].id, events[2].rev, events[2].windows), (1, 3, 4));
        assert!(events[2].is_open());
        events.extend(feed(&mut t, "....", 13));
        assert_eq!(events.len(), 4);
        // Long after the cool-down: a new alert, a new number.
        events.extend(feed(&mut t, "...........xxx", 17));
        assert_eq!((events[4].id, events[4].rev), (2, 5));
    }

    #[test]
    fn only_the_first_snapshot_of_an_alert_raises_it() {
        let mut t = AlertTracker::default();
        let mut seen = Vec::new();
        // Opens and closes, reopens within the cool-down and closes, then a new alert long after.
        for (pattern, start) in [("xxx....", 1), ("x", 12), ("....", 13), ("...........xxx", 17)] {
            for (i, c) in pattern.chars().enumerate() {
                let before = t.clone();
                for ev in feed(&mut t, &c.to_string(), start + i as u64) {
                    seen.push((ev.id, ev.is_open(), before.raises(&ev)));
                }
            }
        }
        let want = [(1, true, true), (1, false, false), (1, true, false), (1, false, false), (2, true, true)];
        assert_eq!(seen, want);
    }

    #[test]
    fn the_state_survives_a_round_trip() {
        let mut t = AlertTracker::default();
        feed(&mut t, "xxxx", 1);
        let mut bytes = Vec::new();
        ciborium::into_writer(&t, &mut bytes).unwrap();
        let mut back: AlertTracker = ciborium::from_reader(&bytes[..]).unwrap();
        assert_eq!(back, t);
        let closed = feed(&mut back, "....", 5);
        assert_eq!((closed[0].id, closed[0].rev), (1, 2));
    }

    #[test]
    fn malformed_snapshots_are_refused() {
        let mut t = AlertTracker::default();
        let good = feed(&mut t, "xxx", 1).remove(0);
        good.validate().unwrap();
        for (bad, what) in [
            (AlertEvent { id: 0, ..good.clone() }, "count from 1"),
            (AlertEvent { peak_score: f32::NAN, ..good.clone() }, "not finite"),
            (AlertEvent { peak_ms: good.last_ms + 1, ..good.clone() }, "out of order"),
            (AlertEvent { end_ms: Some(good.onset_ms), last_ms: good.onset_ms + 5, ..good.clone() }, "out of order"),
            (AlertEvent { sensor: String::new(), ..good.clone() }, "sensor"),
        ] {
            let e = bad.validate().unwrap_err();
            assert!(e.contains(what), "{e}");
        }
    }
}
