//! The agent's own warnings and errors: kept in a bounded ring and shipped on `up/logs` within a budget, so
//! that an operator sees why a device misbehaves without logging in to it.
//!
//! - [`LogRing`] is pure (time is passed in): a line comes in, the class's `[logs]` budget (a token bucket of
//!   lines a minute) decides whether it is kept, and the ring keeps the newest `ring_entries` of those until the
//!   uplink takes them as a batch. A line over the budget, or pushed out of a full ring, is only counted; the
//!   count goes up with the next batch as `suppressed`. A flood therefore costs a counter, not memory or
//!   bandwidth, and never delays telemetry: the uplink sends a log batch only every `batch_secs`, after the
//!   telemetry that is ready.
//! - [`RingLayer`] is the `tracing` layer that feeds the rings with every WARN and ERROR event, whatever the
//!   log filter on stderr says.
//! - [`LogHub`] routes an event to its agent's ring: by the `device` field of the event or of a span around
//!   it, or, in a process that is one agent and nothing else (the `edgeloop-agent` binary, which says so with
//!   [`LogHub::sole_agent`]), to that agent. A process that runs many agents or a control plane beside them (the
//!   fleet simulator) attributes only events that name their device.

use edgeloop_common::config::LogsConfig;
use edgeloop_common::envelope::{
    LogBatch, LogEntry, LogLevel, MAX_LOG_ENTRIES, MAX_LOG_MESSAGE_BYTES, MAX_LOG_TARGET_BYTES,
};
use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, LazyLock, Mutex, RwLock};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// Lines waiting to go up, and the budget that lets them in.
#[derive(Debug)]
pub struct LogRing {
    cfg: LogsConfig,
    entries: VecDeque<LogEntry>,
    /// Tokens left and when they were counted.
    bucket: (f64, u64),
    /// Lines left out since the last batch was taken.
    suppressed: u64,
    /// Lines left out since the agent started.
    pub suppressed_total: u64,
    /// Lines shipped (taken in batches) since the agent started.
    pub shipped_total: u64,
    /// The newest lines kept, shipped or not: what `edgeloop-agent status` shows at the device.
    recent: VecDeque<LogEntry>,
}

/// The newest lines [`LogRing::recent`] keeps.
pub const RECENT: usize = 5;

/// The ring, as the device's status file shows it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LogsView {
    /// Lines waiting to go up.
    pub waiting: usize,
    pub shipped_total: u64,
    pub suppressed_total: u64,
    /// The newest lines kept, oldest first.
    pub recent: Vec<LogEntry>,
}

impl LogRing {
    pub fn new(cfg: LogsConfig, now_ms: u64) -> LogRing {
        let burst = f64::from(cfg.burst);
        LogRing {
            cfg,
            entries: VecDeque::new(),
            bucket: (burst, now_ms),
            suppressed: 0,
            suppressed_total: 0,
            shipped_total: 0,
            recent: VecDeque::new(),
        }
    }

    /// What the status file shows.
    pub fn view(&self) -> LogsView {
        LogsView {
            waiting: self.entries.len(),
            shipped_total: self.shipped_total,
            suppressed_total: self.suppressed_total,
            recent: self.recent.iter().cloned().collect(),
        }
    }

    /// Follows a new `[logs]` section (a class configuration rolled out): the budget and the ring's size
    /// change now; lines already kept stay, up to the new size.
    pub fn follow(&mut self, cfg: LogsConfig) {
        self.bucket.0 = self.bucket.0.min(f64::from(cfg.burst));
        self.cfg = cfg;
        while self.entries.len() > self.cfg.ring_entries {
            self.entries.pop_front();
            self.left_out(1);
        }
    }

    pub fn config(&self) -> &LogsConfig {
        &self.cfg
    }

    fn left_out(&mut self, n: u64) {
        self.suppressed += n;
        self.suppressed_total += n;
    }

    /// Takes a line logged at `now_ms`, if the budget allows. Returns whether it was kept.
    pub fn push(&mut self, entry: LogEntry, now_ms: u64) -> bool {
        let admitted = self.admit(now_ms);
        if admitted {
            self.keep(entry);
        }
        admitted
    }

    /// Spends one line of the budget at `now_ms`; a line with none left is counted as suppressed. A line
    /// admitted must then be [`LogRing::keep`]-ed. Apart from `push` so that the logging layer formats only
    /// the lines it keeps: a flood costs a counter.
    pub fn admit(&mut self, now_ms: u64) -> bool {
        let (tokens, last) = self.bucket;
        let rate_per_ms = f64::from(self.cfg.lines_per_minute) / 60_000.0;
        let tokens = (tokens + now_ms.saturating_sub(last) as f64 * rate_per_ms).min(f64::from(self.cfg.burst));
        self.bucket = (tokens, now_ms.max(last));
        if tokens < 1.0 {
            self.left_out(1);
            return false;
        }
        self.bucket.0 -= 1.0;
        true
    }

    /// Keeps a line [`LogRing::admit`] let in: cut to the protocol's limits, the oldest pushed out of a full ring.
    pub fn keep(&mut self, mut entry: LogEntry) {
        cut(&mut entry.message, MAX_LOG_MESSAGE_BYTES);
        cut(&mut entry.target, MAX_LOG_TARGET_BYTES);
        if self.entries.len() >= self.cfg.ring_entries {
            self.entries.pop_front();
            self.left_out(1);
        }
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(entry.clone());
        self.entries.push_back(entry);
    }

    /// Whether a batch is worth sending: lines are waiting, or lines were left out since the last batch.
    pub fn has_news(&self) -> bool {
        !self.entries.is_empty() || self.suppressed > 0
    }

    /// The oldest waiting lines (at most [`MAX_LOG_ENTRIES`]) and the count left out since the last batch.
    pub fn take_batch(&mut self) -> LogBatch {
        let n = self.entries.len().min(MAX_LOG_ENTRIES);
        let entries: Vec<LogEntry> = self.entries.drain(..n).collect();
        self.shipped_total += entries.len() as u64;
        LogBatch { entries, suppressed: std::mem::take(&mut self.suppressed) }
    }

    /// Lines waiting to go up.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Cuts `s` to at most `max` bytes, at a character boundary.
fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// A ring shared by the agent's uplink and the logging layer.
pub type SharedRing = Arc<Mutex<LogRing>>;

/// Where each running agent's ring is, by device id.
#[derive(Debug, Default)]
pub struct LogHub {
    rings: RwLock<HashMap<String, SharedRing>>,
    /// Whether the process is one agent: events that name no device are its own.
    sole_agent: std::sync::atomic::AtomicBool,
}

static GLOBAL: LazyLock<Arc<LogHub>> = LazyLock::new(Default::default);

/// Takes the ring off the hub when the agent stops.
#[derive(Debug)]
pub struct Registration {
    hub: Arc<LogHub>,
    device: String,
    ring: SharedRing,
}

impl Registration {
    pub fn ring(&self) -> &SharedRing {
        &self.ring
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut rings = self.hub.rings.write().unwrap_or_else(|p| p.into_inner());
        if rings.get(&self.device).is_some_and(|r| Arc::ptr_eq(r, &self.ring)) {
            rings.remove(&self.device);
        }
    }
}

impl LogHub {
    /// The process's hub: the one [`RingLayer::global`] feeds and agents register with.
    pub fn global() -> Arc<LogHub> {
        GLOBAL.clone()
    }

    /// Declares the process one agent and nothing else: events that name no device go to its ring.
    pub fn sole_agent(&self) {
        self.sole_agent.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Gives `device` a ring with `cfg`; events for it go there until the registration is dropped.
    pub fn register(self: &Arc<Self>, device: &str, cfg: LogsConfig, now_ms: u64) -> Registration {
        let ring = Arc::new(Mutex::new(LogRing::new(cfg, now_ms)));
        self.rings.write().unwrap_or_else(|p| p.into_inner()).insert(device.to_string(), ring.clone());
        Registration { hub: self.clone(), device: device.to_string(), ring }
    }

    /// The ring an event belongs to: its device's, or the only one there is.
    fn route(&self, device: Option<&str>) -> Option<SharedRing> {
        let rings = self.rings.read().unwrap_or_else(|p| p.into_inner());
        match device {
            Some(d) => rings.get(d).cloned(),
            None if rings.len() == 1 && self.sole_agent.load(std::sync::atomic::Ordering::Relaxed) => {
                rings.values().next().cloned()
            }
            None => None,
        }
    }
}

/// The `tracing` layer that feeds a hub's rings with WARN and ERROR events.
#[derive(Debug, Clone)]
pub struct RingLayer {
    hub: Arc<LogHub>,
}

impl RingLayer {
    pub fn new(hub: Arc<LogHub>) -> RingLayer {
        RingLayer { hub }
    }

    /// The layer over [`LogHub::global`], for a binary's logger.
    pub fn global() -> RingLayer {
        RingLayer::new(LogHub::global())
    }
}

/// A span's `device` field, kept in its extensions.
struct SpanDevice(String);

/// Reads only an event's `device` field.
#[derive(Default)]
struct DeviceField(Option<String>);

impl Visit for DeviceField {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "device" {
            self.0 = Some(value.to_string());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "device" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

/// Collects an event's message and fields as the text log prints them (but `device`: the line is the device's).
#[derive(Default)]
struct Line {
    message: String,
    fields: String,
}

impl Visit for Line {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            "device" => {}
            name => {
                let _ = write!(self.fields, " {name}={value}");
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            "device" => {}
            name => {
                let _ = write!(self.fields, " {name}={value:?}");
            }
        }
    }
}

impl<S> tracing_subscriber::Layer<S> for RingLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &tracing::span::Attributes<'_>, id: &tracing::span::Id, ctx: Context<'_, S>) {
        let mut named = DeviceField::default();
        attrs.record(&mut named);
        if let (Some(device), Some(span)) = (named.0, ctx.span(id)) {
            span.extensions_mut().insert(SpanDevice(device));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let level = match *event.metadata().level() {
            Level::ERROR => LogLevel::Error,
            Level::WARN => LogLevel::Warn,
            _ => return,
        };
        let mut named = DeviceField::default();
        event.record(&mut named);
        let device = named.0.or_else(|| {
            ctx.event_scope(event)?.find_map(|span| span.extensions().get::<SpanDevice>().map(|d| d.0.clone()))
        });
        let Some(ring) = self.hub.route(device.as_deref()) else { return };
        let now = edgeloop_common::unix_millis();
        // The budget first: a line over it is counted, never formatted.
        if !ring.lock().unwrap_or_else(|p| p.into_inner()).admit(now) {
            return;
        }
        let mut line = Line::default();
        event.record(&mut line);
        let mut message = line.message;
        message.push_str(&line.fields);
        let entry = LogEntry { ts_ms: now, level, target: event.metadata().target().to_string(), message };
        ring.lock().unwrap_or_else(|p| p.into_inner()).keep(entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    fn cfg(lines_per_minute: u32, burst: u32, ring_entries: usize) -> LogsConfig {
        LogsConfig { lines_per_minute, burst, ring_entries, ..Default::default() }
    }

    fn line(i: u64) -> LogEntry {
        LogEntry { ts_ms: i, level: LogLevel::Warn, target: "t".into(), message: format!("line {i}") }
    }

    #[test]
    fn the_budget_lets_a_burst_through_then_its_rate_and_counts_the_rest() {
        let mut ring = LogRing::new(cfg(60, 5, 100), 0);
        let kept = (0..100).filter(|&i| ring.push(line(i), 0)).count();
        assert_eq!(kept, 5, "the burst");
        // One line a second refills; ten seconds later ten more get in.
        let kept = (0..100).filter(|&i| ring.push(line(i), 10_000)).count();
        assert_eq!(kept, 5, "refilled to the burst at most");
        let kept = (0..3).filter(|&i| ring.push(line(i), 12_000)).count();
        assert_eq!(kept, 2);
        let batch = ring.take_batch();
        assert_eq!(batch.entries.len(), 12);
        assert_eq!(batch.suppressed, 95 + 95 + 1);
        assert!(!ring.has_news());
        assert_eq!((ring.shipped_total, ring.suppressed_total), (12, 191));
        // The device's own view keeps the newest kept lines after they were shipped.
        let v = ring.view();
        assert_eq!((v.waiting, v.shipped_total, v.suppressed_total, v.recent.len()), (0, 12, 191, RECENT));
        assert_eq!(v.recent.last().unwrap().message, "line 1");
    }

    #[test]
    fn a_full_ring_keeps_the_newest_and_batches_are_bounded() {
        let mut ring = LogRing::new(cfg(6000, 1000, 300), 0);
        for i in 0..310 {
            assert!(ring.push(line(i), 0));
        }
        assert_eq!(ring.len(), 300);
        let first = ring.take_batch();
        assert_eq!(first.entries.len(), MAX_LOG_ENTRIES);
        assert_eq!(first.entries[0].message, "line 10", "the ten oldest were pushed out");
        assert_eq!(first.suppressed, 10);
        let second = ring.take_batch();
        assert_eq!((second.entries.len(), second.suppressed), (100, 0));
        assert_eq!(second.entries.last().unwrap().message, "line 309");
        // A smaller ring rolled out drops the oldest now, and counts them.
        for i in 0..50 {
            ring.push(line(i), 0);
        }
        ring.follow(cfg(6000, 1000, 20));
        assert_eq!(ring.len(), 20);
        assert_eq!(ring.take_batch().suppressed, 30);
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        let mut ring = LogRing::new(cfg(60, 5, 100), 0);
        let long = LogEntry { message: "é".repeat(MAX_LOG_MESSAGE_BYTES), target: "t".repeat(500), ..line(0) };
        ring.push(long, 0);
        let e = &ring.take_batch().entries[0];
        assert_eq!(e.message.len(), MAX_LOG_MESSAGE_BYTES);
        assert!(e.message.chars().all(|c| c == 'é'));
        assert_eq!(e.target.len(), MAX_LOG_TARGET_BYTES);
    }

    #[test]
    fn the_layer_routes_warnings_and_errors_to_their_device_and_skips_the_rest() {
        let hub = Arc::new(LogHub::default());
        hub.sole_agent();
        let a = hub.register("dev-a", cfg(6000, 1000, 100), edgeloop_common::unix_millis());
        let subscriber = tracing_subscriber::registry().with(RingLayer::new(hub.clone()));
        tracing::subscriber::with_default(subscriber, || {
            // The only agent: a warning that names no device is its own.
            tracing::warn!(reason = "bad json", "bad sample refused");
            tracing::info!("not shipped");
            let b = hub.register("dev-b", cfg(6000, 1000, 100), edgeloop_common::unix_millis());
            // Two agents: by the event's field, or a span's around it; otherwise nowhere.
            tracing::error!(device = "dev-b", "disk full");
            tracing::info_span!("agent", device = "dev-a").in_scope(|| tracing::warn!(from = 3, "outbox full"));
            tracing::warn!("whose?");
            let batch = b.ring().lock().unwrap().take_batch();
            assert_eq!(batch.entries.len(), 1);
            assert_eq!((batch.entries[0].level, batch.entries[0].message.as_str()), (LogLevel::Error, "disk full"));
            drop(b);
            assert!(hub.route(Some("dev-b")).is_none(), "a stopped agent's ring is gone");
        });
        let batch = a.ring().lock().unwrap().take_batch();
        let got: Vec<(LogLevel, &str)> = batch.entries.iter().map(|e| (e.level, e.message.as_str())).collect();
        assert_eq!(
            got,
            [(LogLevel::Warn, "bad sample refused reason=bad json"), (LogLevel::Warn, "outbox full from=3")]
        );
        assert!(batch.entries[0].target.ends_with("logs::tests"), "{}", batch.entries[0].target);
        // A process that is not only an agent (a simulator with its control plane) keeps unnamed events out.
        let shared = Arc::new(LogHub::default());
        let c = shared.register("dev-c", cfg(6000, 1000, 100), 0);
        tracing::subscriber::with_default(tracing_subscriber::registry().with(RingLayer::new(shared.clone())), || {
            tracing::warn!("ingest: a message refused");
            tracing::warn!(device = "dev-c", "its own");
        });
        let got: Vec<String> = c.ring().lock().unwrap().take_batch().entries.into_iter().map(|e| e.message).collect();
        assert_eq!(got, ["its own"]);
    }
}
