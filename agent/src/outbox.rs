//! The durable outbox: every record the agent produces waits here until the control plane acknowledges it
//! end to end.
//!
//! - Sequence numbers start at 1 and are monotonic per device across restarts: the next one is persisted in
//!   the same atomic sled batch as the records that use it.
//! - The outbox is bounded in bytes. An append that would pass the bound first drops the oldest records; each
//!   dropped range is merged, persisted and reported upstream in status messages. Nothing leaves silently.
//! - Only [`Outbox::ack`] deletes records, and only up to a cumulative acknowledgement.
//! - Only committed records are readable by the uplink ([`Outbox::read_batch`] stops at the durable
//!   sequence), so a sequence number that reached the network is never reused after a crash.
//!
//! The outbox owns storage and accounting; when and what to send is the uplink's business.

use edgeloop_common::durable::{Durability, DurableDb, DurableError};
use edgeloop_common::envelope::{Record, SeqRange};
use std::path::Path;
use std::sync::Mutex;

const RECORD_PREFIX: u8 = b'r';
const META_NEXT_SEQ: &[u8] = b"m/next_seq";
const META_ACKED: &[u8] = b"m/acked";
const META_DROPPED_TOTAL: &[u8] = b"m/dropped_total";
const META_DROPPED_RANGES: &[u8] = b"m/dropped_ranges";
/// Dropped ranges kept for reporting; older ones still count in `dropped_total`.
pub const MAX_REPORTED_RANGES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(transparent)]
    Durable(#[from] DurableError),
    #[error("outbox store: {0}")]
    Sled(#[from] sled::Error),
    #[error("outbox record {seq} is corrupt: {reason}")]
    Corrupt { seq: u64, reason: String },
}

/// A record before it has a sequence number.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRecord {
    pub ts_ms: u64,
    pub sensor: String,
    pub features: Vec<f32>,
    pub score: Option<f32>,
    pub flags: u32,
}

/// What one append did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AppendOutcome {
    /// Sequence numbers given to the appended records, `first..=last`; `None` if nothing was appended.
    pub assigned: Option<SeqRange>,
    /// Ranges dropped to stay under the byte bound.
    pub dropped: Vec<SeqRange>,
}

/// A snapshot of the outbox's bookkeeping.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OutboxStats {
    pub depth: u64,
    pub bytes: u64,
    /// Highest sequence number assigned (0 if none).
    pub last_seq: u64,
    /// Highest sequence number committed durably (0 if none).
    pub durable_seq: u64,
    pub acked: u64,
    pub dropped_total: u64,
    pub dropped_ranges: Vec<SeqRange>,
}

#[derive(Debug, Default)]
struct Accounting {
    next_seq: u64,
    durable_seq: u64,
    acked: u64,
    depth: u64,
    bytes: u64,
    dropped_total: u64,
    dropped_ranges: Vec<SeqRange>,
}

/// The sled-backed outbox.
#[derive(Debug)]
pub struct Outbox {
    db: DurableDb,
    tree: sled::Tree,
    /// The bound on stored record bytes; a class configuration rolled out changes it while the agent runs.
    max_bytes: std::sync::atomic::AtomicU64,
    acc: Mutex<Accounting>,
}

fn record_key(seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = RECORD_PREFIX;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn seq_of(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[1..9]);
    u64::from_be_bytes(b)
}

fn read_u64(tree: &sled::Tree, key: &[u8]) -> Result<u64, sled::Error> {
    Ok(tree.get(key)?.map_or(0, |v| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&v[..8.min(v.len())]);
        u64::from_be_bytes(b)
    }))
}

/// Adds `r` to `ranges`, merging it with the last range when contiguous, keeping at most the newest
/// [`MAX_REPORTED_RANGES`].
fn push_range(ranges: &mut Vec<SeqRange>, r: SeqRange) {
    match ranges.last_mut() {
        Some(last) if last.to + 1 == r.from => last.to = r.to,
        _ => ranges.push(r),
    }
    if ranges.len() > MAX_REPORTED_RANGES {
        ranges.remove(0);
    }
}

impl Outbox {
    /// Opens (or creates) the outbox under `dir`.
    pub fn open(dir: &Path, durability: Durability, max_bytes: u64) -> Result<Outbox, OutboxError> {
        let db = DurableDb::open(dir, durability)?;
        let tree = db.tree("outbox")?;
        let mut acc = Accounting {
            next_seq: read_u64(&tree, META_NEXT_SEQ)?.max(1),
            acked: read_u64(&tree, META_ACKED)?,
            dropped_total: read_u64(&tree, META_DROPPED_TOTAL)?,
            ..Default::default()
        };
        if let Some(v) = tree.get(META_DROPPED_RANGES)? {
            acc.dropped_ranges = ciborium::from_reader(&v[..])
                .map_err(|e| OutboxError::Corrupt { seq: 0, reason: format!("dropped ranges: {e}") })?;
        }
        for kv in tree.scan_prefix([RECORD_PREFIX]) {
            let (_, v) = kv?;
            acc.depth += 1;
            acc.bytes += v.len() as u64;
        }
        // Whatever survived a restart becomes durable before the uplink may read it.
        db.commit()?;
        acc.durable_seq = acc.next_seq - 1;
        Ok(Outbox { db, tree, max_bytes: max_bytes.into(), acc: Mutex::new(acc) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Accounting> {
        // A panic while holding the lock leaves plain counters behind; they stay usable.
        self.acc.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Assigns sequence numbers and writes `records` (not yet durable: call [`Outbox::commit`]), dropping the
    /// oldest records first if the byte bound would be passed.
    pub fn append(&self, records: Vec<NewRecord>) -> Result<AppendOutcome, OutboxError> {
        if records.is_empty() {
            return Ok(AppendOutcome::default());
        }
        let mut acc = self.lock();
        let first = acc.next_seq;
        let mut encoded = Vec::with_capacity(records.len());
        for (i, r) in records.into_iter().enumerate() {
            let rec = Record {
                seq: first + i as u64,
                ts_ms: r.ts_ms,
                sensor: r.sensor,
                features: r.features,
                score: r.score,
                flags: r.flags,
            };
            let buf = edgeloop_common::signing::to_cbor_with_capacity(&rec, 64 + 5 * rec.features.len());
            encoded.push((rec.seq, buf));
        }
        let last = first + encoded.len() as u64 - 1;
        let new_bytes: u64 = encoded.iter().map(|(_, b)| b.len() as u64).sum();

        let mut batch = sled::Batch::default();
        let mut dropped: Vec<SeqRange> = Vec::new();
        let mut bytes = acc.bytes;
        let mut depth = acc.depth;
        let max_bytes = self.max_bytes();
        // Drop stored records, oldest first, until the new ones fit.
        if bytes + new_bytes > max_bytes {
            for kv in self.tree.scan_prefix([RECORD_PREFIX]) {
                if bytes + new_bytes <= max_bytes {
                    break;
                }
                let (k, v) = kv?;
                let seq = seq_of(&k);
                batch.remove(k);
                bytes -= v.len() as u64;
                depth -= 1;
                push_range(&mut dropped, SeqRange { from: seq, to: seq });
            }
        }
        // If the new records alone pass the bound, the oldest of them go too.
        let mut kept_bytes = new_bytes;
        for (seq, buf) in &encoded {
            if bytes + kept_bytes > max_bytes {
                kept_bytes -= buf.len() as u64;
                push_range(&mut dropped, SeqRange { from: *seq, to: *seq });
            } else {
                batch.insert(&record_key(*seq)[..], buf.as_slice());
                depth += 1;
            }
        }
        bytes += kept_bytes;
        let dropped_count: u64 = dropped.iter().map(SeqRange::len).sum();
        let mut ranges = acc.dropped_ranges.clone();
        for r in &dropped {
            push_range(&mut ranges, *r);
        }
        batch.insert(META_NEXT_SEQ, &(last + 1).to_be_bytes());
        if dropped_count > 0 {
            batch.insert(META_DROPPED_TOTAL, &(acc.dropped_total + dropped_count).to_be_bytes());
            batch.insert(META_DROPPED_RANGES, edgeloop_common::signing::to_cbor(&ranges));
        }
        self.tree.apply_batch(batch)?;
        acc.next_seq = last + 1;
        acc.bytes = bytes;
        acc.depth = depth;
        acc.dropped_total += dropped_count;
        acc.dropped_ranges = ranges;
        Ok(AppendOutcome { assigned: Some(SeqRange { from: first, to: last }), dropped })
    }

    /// Makes every append so far durable; from then on the uplink may read those records. Blocking.
    pub fn commit(&self) -> Result<u64, OutboxError> {
        let upto = self.lock().next_seq - 1;
        self.db.commit()?;
        let mut acc = self.lock();
        acc.durable_seq = acc.durable_seq.max(upto);
        Ok(acc.durable_seq)
    }

    /// Up to `max` committed records with `seq >= from`, in order.
    pub fn read_batch(&self, from: u64, max: usize) -> Result<Vec<Record>, OutboxError> {
        let durable = self.lock().durable_seq;
        let mut out = Vec::new();
        if from > durable {
            return Ok(out);
        }
        for kv in self.tree.range(record_key(from)..=record_key(durable)).take(max) {
            let (k, v) = kv?;
            let seq = seq_of(&k);
            let rec: Record =
                ciborium::from_reader(&v[..]).map_err(|e| OutboxError::Corrupt { seq, reason: e.to_string() })?;
            out.push(rec);
        }
        Ok(out)
    }

    /// Deletes every record with `seq <= upto` after a cumulative acknowledgement. Returns how many went.
    pub fn ack(&self, upto: u64) -> Result<u64, OutboxError> {
        let mut acc = self.lock();
        if upto <= acc.acked {
            return Ok(0);
        }
        let mut batch = sled::Batch::default();
        let (mut n, mut freed) = (0u64, 0u64);
        for kv in self.tree.range(record_key(acc.acked.saturating_add(1).min(upto))..=record_key(upto)) {
            let (k, v) = kv?;
            freed += v.len() as u64;
            n += 1;
            batch.remove(k);
        }
        batch.insert(META_ACKED, &upto.to_be_bytes());
        self.tree.apply_batch(batch)?;
        acc.acked = upto;
        acc.depth -= n;
        acc.bytes -= freed;
        Ok(n)
    }

    /// The bound on stored record bytes.
    /// Another tree of the outbox's database, committed by [`Outbox::commit`] with the records (the alerts).
    pub fn tree(&self, name: &str) -> Result<sled::Tree, OutboxError> {
        Ok(self.db.tree(name)?)
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Changes the bound; records already stored stay until the next append needs their room.
    pub fn set_max_bytes(&self, max_bytes: u64) {
        self.max_bytes.store(max_bytes, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn stats(&self) -> OutboxStats {
        let acc = self.lock();
        OutboxStats {
            depth: acc.depth,
            bytes: acc.bytes,
            last_seq: acc.next_seq - 1,
            durable_seq: acc.durable_seq,
            acked: acc.acked,
            dropped_total: acc.dropped_total,
            dropped_ranges: acc.dropped_ranges.clone(),
        }
    }

    pub fn durability(&self) -> Durability {
        self.db.mode()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u64) -> NewRecord {
        NewRecord { ts_ms: i, sensor: "t".into(), features: vec![i as f32; 4], score: None, flags: 0 }
    }

    fn open(dir: &Path, max: u64) -> Outbox {
        Outbox::open(dir, Durability::Flush, max).unwrap()
    }

    #[test]
    fn seqs_are_monotonic_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ob = open(dir.path(), 1 << 20);
            let out = ob.append(vec![rec(1), rec(2), rec(3)]).unwrap();
            assert_eq!(out.assigned, Some(SeqRange { from: 1, to: 3 }));
            ob.commit().unwrap();
            assert_eq!(ob.ack(2).unwrap(), 2);
        }
        let ob = open(dir.path(), 1 << 20);
        let s = ob.stats();
        assert_eq!((s.last_seq, s.acked, s.depth), (3, 2, 1));
        let out = ob.append(vec![rec(4)]).unwrap();
        assert_eq!(out.assigned, Some(SeqRange { from: 4, to: 4 }));
    }

    #[test]
    fn uncommitted_records_are_not_readable() {
        let dir = tempfile::tempdir().unwrap();
        let ob = open(dir.path(), 1 << 20);
        ob.append(vec![rec(1), rec(2)]).unwrap();
        assert!(ob.read_batch(1, 10).unwrap().is_empty());
        ob.commit().unwrap();
        let seqs: Vec<u64> = ob.read_batch(1, 10).unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![1, 2]);
        assert_eq!(ob.read_batch(2, 10).unwrap()[0].features, vec![2.0; 4]);
    }

    #[test]
    fn full_outbox_drops_oldest_and_reports_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let one = {
            let mut b = Vec::new();
            ciborium::into_writer(
                &Record { seq: 1, ts_ms: 1, sensor: "t".into(), features: vec![1.0; 4], score: None, flags: 0 },
                &mut b,
            )
            .unwrap();
            b.len() as u64
        };
        let ob = open(dir.path(), one * 10);
        for i in 0..10 {
            ob.append(vec![rec(i)]).unwrap();
        }
        assert!(ob.stats().dropped_ranges.is_empty());
        let out = ob.append(vec![rec(10), rec(11), rec(12)]).unwrap();
        assert_eq!(out.dropped, vec![SeqRange { from: 1, to: 3 }]);
        ob.commit().unwrap();
        let s = ob.stats();
        assert_eq!((s.depth, s.dropped_total), (10, 3));
        assert!(s.bytes <= one * 10);
        assert_eq!(ob.read_batch(1, 1).unwrap()[0].seq, 4);
        // After an ack, drops continue from what is left, and ranges merge when contiguous.
        ob.ack(5).unwrap();
        ob.append((0..4).map(rec).collect()).unwrap();
        ob.append((0..3).map(rec).collect()).unwrap();
        let s = ob.stats();
        assert_eq!(s.dropped_ranges, vec![SeqRange { from: 1, to: 3 }, SeqRange { from: 6, to: 10 }]);
        drop(ob);
        let ob = open(dir.path(), one * 10);
        assert_eq!(ob.stats().dropped_total, 8);
        assert_eq!(ob.stats().dropped_ranges.len(), 2);
    }

    #[test]
    fn oversize_append_keeps_newest() {
        let dir = tempfile::tempdir().unwrap();
        let ob = open(dir.path(), 1024);
        let big: Vec<NewRecord> = (0..200).map(rec).collect();
        let out = ob.append(big).unwrap();
        let kept = ob.stats().depth;
        assert!(kept > 0 && kept < 200);
        assert_eq!(out.dropped, vec![SeqRange { from: 1, to: 200 - kept }]);
        ob.commit().unwrap();
        assert_eq!(ob.read_batch(0, 1).unwrap()[0].seq, 201 - kept);
    }

    #[test]
    fn stale_ack_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let ob = open(dir.path(), 1 << 20);
        ob.append((0..5).map(rec).collect()).unwrap();
        ob.commit().unwrap();
        assert_eq!(ob.ack(4).unwrap(), 4);
        assert_eq!(ob.ack(2).unwrap(), 0);
        assert_eq!(ob.stats().acked, 4);
        assert_eq!(ob.stats().depth, 1);
    }
}
