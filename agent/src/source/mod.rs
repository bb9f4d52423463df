//! Where samples come from.
//!
//! A [`Source`] produces [`Sample`]s into a [`SampleSink`] until it is cancelled. Four ship with the agent:
//! - [`channel::ChannelSource`]: an in-process channel, for the fleet runner and embedding;
//! - [`udp::UdpSource`]: JSON lines over UDP, so firmware in any language can feed the agent;
//! - [`stdin::StdinSource`]: the same JSON lines on standard input;
//! - [`modbus::ModbusSource`]: a Modbus TCP device's registers, polled, as the class's `[modbus]` map says.
//!
//! Sources parse; they do not judge. Whether a sample fits the class (known sensor, channel count, finite
//! values) is the collector's check. A line that does not parse is counted and logged (rate-limited) with its
//! origin, and the source goes on.

pub mod channel;
pub mod json;
pub mod modbus;
pub mod stdin;
pub mod udp;

use crate::health::Health;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use json::{parse_line, Sample};

/// Where sources deliver; cloning is cheap.
#[derive(Debug, Clone)]
pub struct SampleSink {
    tx: mpsc::Sender<Sample>,
    health: Arc<Health>,
}

/// The collector has stopped; no more samples are taken.
#[derive(Debug, thiserror::Error)]
#[error("the agent is shutting down")]
pub struct SinkClosed;

impl SampleSink {
    pub fn new(tx: mpsc::Sender<Sample>, health: Arc<Health>) -> Self {
        SampleSink { tx, health }
    }

    /// Delivers a sample, waiting while the collector is busy (backpressure).
    pub async fn send(&self, s: Sample) -> Result<(), SinkClosed> {
        self.tx.send(s).await.map_err(|_| SinkClosed)
    }

    /// Counts input that could not be parsed, logging the first of each burst with its origin.
    pub fn reject(&self, origin: &str, reason: &str) {
        let n = self.health.bad_samples.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(origin, reason, rejected_total = n, "bad sample refused");
        }
    }
}

/// A boxed future, so sources of different types can be started alike.
pub type SourceFuture = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// Something that produces samples until cancelled.
pub trait Source: Send + 'static {
    /// A name for logs, such as `udp 0.0.0.0:7878`.
    fn name(&self) -> String;
    fn run(self: Box<Self>, sink: SampleSink, cancel: CancellationToken) -> SourceFuture;
}
