//! What the agent knows about itself, for heartbeats: counters, inference latency percentiles and RSS.
//!
//! Shared between the collector (which records) and the uplink (which reports); everything here is a cheap
//! atomic or a short critical section.

use edgeloop_common::envelope::Status;
use edgeloop_common::update::UpdateReport;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Latencies kept for percentiles.
const LATENCY_WINDOW: usize = 1024;

#[derive(Debug)]
pub struct Health {
    started: Instant,
    /// Samples handled: turned into durable records, or refused.
    pub samples: AtomicU64,
    pub bad_samples: AtomicU64,
    /// Records made durable in the outbox.
    pub records_appended: AtomicU64,
    pub inference_errors: AtomicU64,
    model_version: Mutex<Option<String>>,
    update: Mutex<Option<UpdateReport>>,
    config_update: Mutex<Option<UpdateReport>>,
    agent_update: Mutex<Option<UpdateReport>>,
    latencies_us: Mutex<VecDeque<u32>>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            started: Instant::now(),
            samples: AtomicU64::new(0),
            bad_samples: AtomicU64::new(0),
            records_appended: AtomicU64::new(0),
            inference_errors: AtomicU64::new(0),
            model_version: Mutex::new(None),
            update: Mutex::new(None),
            config_update: Mutex::new(None),
            agent_update: Mutex::new(None),
            latencies_us: Mutex::new(VecDeque::with_capacity(LATENCY_WINDOW)),
        }
    }
}

impl Health {
    pub fn set_model_version(&self, v: Option<String>) {
        *self.model_version.lock().unwrap_or_else(|p| p.into_inner()) = v;
    }

    pub fn model_version(&self) -> Option<String> {
        self.model_version.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The latest update report, repeated in every heartbeat.
    pub fn set_update(&self, r: UpdateReport) {
        let slot = match r.component {
            edgeloop_common::update::Component::Model => &self.update,
            edgeloop_common::update::Component::Config => &self.config_update,
            edgeloop_common::update::Component::Agent => &self.agent_update,
        };
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    }

    /// The latest class-configuration update report, repeated in every heartbeat.
    pub fn config_update(&self) -> Option<UpdateReport> {
        self.config_update.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn update(&self) -> Option<UpdateReport> {
        self.update.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn record_latency(&self, d: Duration) {
        let mut l = self.latencies_us.lock().unwrap_or_else(|p| p.into_inner());
        if l.len() == LATENCY_WINDOW {
            l.pop_front();
        }
        l.push_back(d.as_micros().min(u32::MAX as u128) as u32);
    }

    /// p50 and p95 of the recent inference latencies, in microseconds.
    pub fn latency_percentiles(&self) -> Option<(u32, u32)> {
        let mut v: Vec<u32> = self.latencies_us.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Some((at(0.5), at(0.95)))
    }

    /// Fills the health part of a heartbeat; the outbox part is the caller's.
    pub fn fill(&self, status: &mut Status) {
        status.uptime_s = self.started.elapsed().as_secs();
        status.model_version = self.model_version();
        if let Some((p50, p95)) = self.latency_percentiles() {
            status.inference_p50_us = Some(p50);
            status.inference_p95_us = Some(p95);
        }
        status.rss_bytes = rss_bytes();
        status.bad_samples = self.bad_samples.load(Ordering::Relaxed);
        status.update = self.update().map(Box::new);
        status.config_update = self.config_update().map(Box::new);
        status.agent_update = self.agent_update.lock().unwrap_or_else(|p| p.into_inner()).clone().map(Box::new);
        status.agent_version = Some(crate::version::build());
        status.arch = Some(std::env::consts::ARCH.to_string());
    }
}

/// Resident set size of this process, from `/proc/self/statm` (Linux); `None` elsewhere.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(resident_pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let h = Health::default();
        assert_eq!(h.latency_percentiles(), None);
        for us in 1..=100 {
            h.record_latency(Duration::from_micros(us));
        }
        assert_eq!(h.latency_percentiles(), Some((51, 95)));
        let mut s = Status::default();
        h.fill(&mut s);
        assert_eq!(s.inference_p95_us, Some(95));
        assert!(s.rss_bytes.unwrap_or(0) > 0);
    }
}
