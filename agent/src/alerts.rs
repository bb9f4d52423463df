//! The device's alerts: common's alert rule ([`AlertTracker`]) over the model's scores (those past the tail of
//! the device's own scores, [`ScoreTail`]) and the readings out of the range the device has seen
//! ([`SeenRange`]), and the snapshots waiting for the control plane's acknowledgement.
//!
//! Both live in the outbox's database (tree `alerts`) and are committed with the records the collector scored,
//! so a power cut neither loses an alert nor reuses its number. Snapshots wait, keyed by `rev`, until an
//! acknowledgement names them (`Ack::alerts`); the uplink sends them before any telemetry, so that an alert
//! raised offline is not stuck behind the backlog it was raised in.

use crate::outbox::{Outbox, OutboxError};
use edgeloop_common::alerts::{AlertEvent, AlertPolicy, AlertTracker};
use edgeloop_common::score_tail::{ScoreTail, TailFit, Verdict};
use edgeloop_common::seen_range::SeenRange;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

const STATE_KEY: &[u8] = b"state";
/// The model sensor's [`SeenRange`].
const RANGE_KEY: &[u8] = b"range";
/// The model's [`ScoreTail`] on this device.
const TAIL_KEY: &[u8] = b"tail";
/// The highest `rev` acknowledged (and so deleted): sent with every snapshot as its `floor`.
const ACKED_KEY: &[u8] = b"acked";
const QUEUE_PREFIX: u8 = b'q';

fn queue_key(rev: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = QUEUE_PREFIX;
    k[1..].copy_from_slice(&rev.to_be_bytes());
    k
}

/// The CBOR value under `key`, or the default where there is none.
fn load<T: serde::de::DeserializeOwned + Default>(tree: &sled::Tree, key: &[u8], what: &str) -> Result<T, OutboxError> {
    match tree.get(key)? {
        Some(v) => ciborium::from_reader(&v[..]).map_err(|e| corrupt(what, e)),
        None => Ok(T::default()),
    }
}

fn cbor(value: &impl serde::Serialize, what: &str) -> Result<Vec<u8>, OutboxError> {
    let mut bytes = Vec::new();
    ciborium::into_writer(value, &mut bytes).map_err(|e| corrupt(what, e))?;
    Ok(bytes)
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> OutboxError {
    OutboxError::Corrupt { seq: 0, reason: format!("alerts: {what}: {e}") }
}

/// The alert state and the snapshots to send.
#[derive(Debug)]
pub struct AlertBook {
    tree: sled::Tree,
    tracker: Mutex<AlertTracker>,
    range: Mutex<SeenRange>,
    tail: Mutex<ScoreTail>,
    /// The highest `rev` written, and the highest made durable by a commit: only those are sent, so that a
    /// power cut cannot take back a snapshot the control plane already has (and reuse its number).
    written: AtomicU64,
    durable: AtomicU64,
}

impl AlertBook {
    /// Opens the book in the outbox's database.
    pub fn open(outbox: &Outbox) -> Result<AlertBook, OutboxError> {
        let tree = outbox.tree("alerts")?;
        let tracker: AlertTracker = load(&tree, STATE_KEY, "state")?;
        let range: SeenRange = load(&tree, RANGE_KEY, "range")?;
        let tail: ScoreTail = load(&tree, TAIL_KEY, "tail")?;
        // What survived a restart is durable: the outbox committed it when it opened.
        let last = tracker.last_rev();
        Ok(AlertBook {
            tree,
            tracker: Mutex::new(tracker),
            range: Mutex::new(range),
            tail: Mutex::new(tail),
            written: last.into(),
            durable: last.into(),
        })
    }

    /// The outbox committed: every snapshot written so far is durable and may be sent.
    pub fn committed(&self) {
        self.durable.fetch_max(self.written.load(Ordering::Acquire), Ordering::AcqRel);
    }

    /// The last snapshot number handed out.
    pub fn last_rev(&self) -> u64 {
        self.lock().last_rev()
    }

    /// The highest `rev` acknowledged so far (0 if none).
    pub fn floor(&self) -> Result<u64, OutboxError> {
        Ok(self.tree.get(ACKED_KEY)?.map_or(0, |v| u64::from_be_bytes(v[..8].try_into().unwrap_or_default())))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AlertTracker> {
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Judges one reading of the model's sensor (one value per channel) against the range seen before it, when
    /// `judge` (a model scored its window), then takes it into the range. Returns whether it was out of range
    /// by the policy's `range_tolerance`. A changed range is written with the records the collector commits.
    pub fn reading(&self, policy: &AlertPolicy, values: &[f64], judge: bool) -> Result<bool, OutboxError> {
        let mut r = self.range.lock().unwrap_or_else(|p| p.into_inner());
        let out = judge && r.is_out(values, policy.range_tolerance);
        // Only a new extreme is written: the count alone moves no decision once learning is done.
        let learning = r.readings() < edgeloop_common::seen_range::LEARN_READINGS;
        if r.take(values) || learning {
            self.tree.insert(RANGE_KEY, cbor(&*r, "range")?)?;
        }
        Ok(out)
    }

    /// Takes one window's `score` at event time `ts_ms` under `model` (its label) into the device's score tail,
    /// and says whether a flag of the model on it should count towards an alert: its score is past the tail for
    /// the policy's `tail_days` for windows `window_secs` apart (the model's own tail, `prior`, while the
    /// device's is learnt), or neither tail is known yet (the model's flag then decides alone), or the rule is
    /// off. A changed tail is written with the records the collector commits.
    pub fn past_tail(
        &self,
        policy: &AlertPolicy,
        window_secs: f64,
        (model, prior): (&str, Option<&TailFit>),
        ts_ms: u64,
        score: f32,
    ) -> Result<bool, OutboxError> {
        let risk = policy.tail_risk(window_secs);
        if risk <= 0.0 {
            return Ok(true);
        }
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        let (verdict, changed) = tail.observe(model, ts_ms, score, risk, prior);
        if changed {
            self.tree.insert(TAIL_KEY, cbor(&*tail, "tail")?)?;
        }
        Ok(verdict != Verdict::Below)
    }

    /// Runs the rule on one scored window; a snapshot it makes waits to be sent. Written, not yet durable:
    /// the collector's commit of the same records makes it so.
    pub fn observe(
        &self,
        policy: &AlertPolicy,
        sensor: &str,
        ts_ms: u64,
        score: f32,
        flagged: bool,
        model: Option<&str>,
    ) -> Result<Option<AlertEvent>, OutboxError> {
        let mut t = self.lock();
        let before = t.clone();
        let event = t.observe(policy, sensor, ts_ms, score, flagged, model);
        if *t != before {
            let mut batch = sled::Batch::default();
            batch.insert(STATE_KEY, cbor(&*t, "state")?);
            if let Some(ev) = &event {
                batch.insert(&queue_key(ev.rev), cbor(ev, "snapshot")?);
            }
            self.tree.apply_batch(batch)?;
            if let Some(ev) = &event {
                self.written.fetch_max(ev.rev, Ordering::AcqRel);
            }
        }
        if let Some(ev) = &event {
            // A warning (which the device's logs carry to the control plane) once per alert; its later
            // snapshots (a new peak, closing, reopening within the cool-down) are information.
            if before.raises(ev) {
                tracing::warn!(alert = ev.id, sensor = %ev.sensor, onset_ms = ev.onset_ms, "alert raised");
            } else {
                tracing::info!(alert = ev.id, sensor = %ev.sensor, open = ev.is_open(), peak = ev.peak_score, "alert updated");
            }
        }
        Ok(event)
    }

    /// The open alert, if any.
    pub fn open_alert(&self) -> Option<AlertEvent> {
        self.lock().open_alert().cloned()
    }

    /// Durable snapshots waiting for an acknowledgement, oldest first, at most `max`.
    pub fn pending(&self, max: usize) -> Result<Vec<AlertEvent>, OutboxError> {
        let mut out = Vec::new();
        let durable = self.durable.load(Ordering::Acquire);
        for kv in self.tree.range(queue_key(0)..=queue_key(durable)).take(max) {
            let (_, v) = kv?;
            out.push(ciborium::from_reader(&v[..]).map_err(|e| corrupt("snapshot", e))?);
        }
        Ok(out)
    }

    /// Forgets the snapshots up to `rev`, which the control plane has stored. Returns how many went; the
    /// deletion is committed with the outbox's next commit (a crash before it only sends them again).
    pub fn ack(&self, rev: u64) -> Result<usize, OutboxError> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for kv in self.tree.range(queue_key(0)..=queue_key(rev)) {
            let (k, _) = kv?;
            batch.remove(k);
            n += 1;
        }
        if rev > self.floor()? {
            batch.insert(ACKED_KEY, &rev.to_be_bytes());
        }
        self.tree.apply_batch(batch)?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::updater::slot::ModelInfo;
    use edgeloop_common::durable::Durability;

    const P: AlertPolicy =
        AlertPolicy { open_after: 2, close_after: 2, cooldown_secs: 0, range_tolerance: 0.02, tail_days: 365.0 };

    fn flag(book: &AlertBook, ts_s: u64, flagged: bool) -> Option<AlertEvent> {
        book.observe(&P, "s", ts_s * 1000, if flagged { 5.0 } else { 0.0 }, flagged, Some("m v1")).unwrap()
    }

    #[test]
    fn alerts_survive_a_restart_and_go_once_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        {
            let outbox = Outbox::open(dir.path(), Durability::Flush, 1 << 20).unwrap();
            let book = AlertBook::open(&outbox).unwrap();
            assert_eq!(flag(&book, 1, true), None);
            let opened = flag(&book, 2, true).unwrap();
            assert_eq!((opened.id, opened.rev), (1, 1));
            // Not sent before the commit that makes it durable.
            assert!(book.pending(10).unwrap().is_empty());
            outbox.commit().unwrap();
            book.committed();
            assert_eq!(book.pending(10).unwrap().len(), 1);
        }
        // After a restart: the open alert goes on (no new number), and its snapshot still waits.
        let outbox = Outbox::open(dir.path(), Durability::Flush, 1 << 20).unwrap();
        let book = AlertBook::open(&outbox).unwrap();
        assert_eq!(book.open_alert().map(|a| a.id), Some(1));
        assert_eq!(flag(&book, 3, false), None);
        let closed = flag(&book, 4, false).unwrap();
        assert_eq!((closed.id, closed.rev, closed.end_ms), (1, 2, Some(4000)));
        book.committed();
        assert_eq!(book.pending(10).unwrap().iter().map(|a| a.rev).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(book.ack(1).unwrap(), 1);
        assert_eq!(book.pending(10).unwrap().iter().map(|a| a.rev).collect::<Vec<_>>(), [2]);
        assert_eq!(book.ack(2).unwrap(), 1);
        assert!(book.pending(10).unwrap().is_empty());
        assert_eq!((book.floor().unwrap(), book.last_rev()), (2, 2));
        // The next alert takes the next number.
        flag(&book, 10, true);
        assert_eq!(flag(&book, 11, true).map(|a| (a.id, a.rev)), Some((2, 3)));
    }

    #[test]
    fn the_seen_range_is_judged_before_it_grows_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let outbox = Outbox::open(dir.path(), Durability::Flush, 1 << 20).unwrap();
            let book = AlertBook::open(&outbox).unwrap();
            for i in 0..200 {
                assert!(!book.reading(&P, &[(i % 10) as f64], true).unwrap(), "inside the range at {i}");
            }
            // 0..9: past 9 by more than 2% of 9 is out; not judged without a model's score.
            assert!(book.reading(&P, &[12.0], true).unwrap());
            assert!(!book.reading(&P, &[20.0], false).unwrap());
            outbox.commit().unwrap();
        }
        let outbox = Outbox::open(dir.path(), Durability::Flush, 1 << 20).unwrap();
        let book = AlertBook::open(&outbox).unwrap();
        // The range (now 0..20) came back: 15 is inside it, 25 is out, and with the rule off nothing is.
        assert!(!book.reading(&P, &[15.0], true).unwrap());
        assert!(book.reading(&P, &[25.0], true).unwrap());
        let off = AlertPolicy { range_tolerance: 0.0, ..P };
        assert!(!book.reading(&off, &[99.0], true).unwrap());
    }

    #[test]
    fn a_flag_counts_only_past_the_devices_own_tail_once_learnt_and_the_tail_survives_a_restart() {
        use edgeloop_common::score_tail::TailFit;
        let dir = tempfile::tempdir().unwrap();
        // A window every quarter of an hour, so that the first 1,000 span the week the tail learns over.
        const WINDOW_SECS: f64 = 900.0;
        let (score, ts) = (|i: u64| (i % 100) as f32 / 100.0, |i: u64| i * 15 * 60_000);
        let model = |version: u32, score_tail: Option<TailFit>| ModelInfo {
            name: "m".into(),
            version,
            sha256: "ab".repeat(32),
            threshold: Some(0.5),
            frames: 1,
            gaps: Default::default(),
            score_tail,
            nnef_sha256: None,
        };
        let past = |book: &AlertBook, p: &AlertPolicy, m: &ModelInfo, t: u64, s: f32| {
            book.past_tail(p, WINDOW_SECS, (&m.label(), m.score_tail.as_ref()), t, s)
        };
        let v1 = model(1, None);
        {
            let outbox = Outbox::open(dir.path(), Durability::Flush, 1 << 20).unwrap();
            let book = AlertBook::open(&outbox).unwrap();
            for i in 0..edgeloop_common::score_tail::CALIBRATION_WINDOWS {
                assert!(past(&book, &P, &v1, ts(i), score(i)).unwrap(), "learning: the flag decides at {i}");
            }
            // Learnt: the device's ordinary scores no longer count, far beyond them they do.
            assert!(!past(&book, &P, &v1, ts(1000), 0.99).unwrap());
            assert!(past(&book, &P, &v1, ts(1001), 5.0).unwrap());
            outbox.commit().unwrap();
        }
        let outbox = Outbox::open(dir.path(), Durability::Flush, 1 << 20).unwrap();
        let book = AlertBook::open(&outbox).unwrap();
        assert!(!past(&book, &P, &v1, ts(1002), 0.99).unwrap(), "the tail came back");
        assert!(past(&book, &P, &v1, ts(1003), 5.0).unwrap());
        // Off: every flag counts.
        assert!(past(&book, &AlertPolicy { tail_days: 0.0, ..P }, &v1, ts(1004), 0.5).unwrap());
        // A new model learns afresh; with its training's tail, that tail judges meanwhile.
        assert!(past(&book, &P, &model(2, None), ts(1005), 0.5).unwrap());
        let prior = TailFit { peak_threshold: 1.0, shape: 0.0, scale: 0.1, peak_share: 0.02 };
        let v3 = model(3, Some(prior));
        assert!(!past(&book, &P, &v3, ts(1006), 1.2).unwrap());
        assert!(past(&book, &P, &v3, ts(1007), 2.0).unwrap());
    }
}
