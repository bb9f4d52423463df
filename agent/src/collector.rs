//! From samples to durable records: feature pipeline, inference, outbox append, group commit.
//!
//! Samples arrive on a channel. The async loop only gathers them into groups (up to `commit_max_records`, or
//! whatever arrived within `commit_interval`); each group is processed on a blocking thread: features with
//! common's pipeline, a score from the model when one is loaded, one outbox append and one durable commit.
//! Only then are the records counted as appended and the uplink woken. On shutdown the samples already taken
//! are processed and committed before the loop returns.

use crate::health::Health;
use crate::outbox::{NewRecord, Outbox, OutboxError};
use crate::source::Sample;
use crate::updater::slot::ModelSlot;
use edgeloop_common::config::{ClassConfig, SignalKind};
use edgeloop_common::envelope::{FLAG_ANOMALY, FLAG_OUT_OF_RANGE};
use edgeloop_common::features::{as_stored, FeatureKind, Pipeline, PipelineSpec};
use edgeloop_common::gaps::{Gap, GapFiller, ImputeMethod, DEFAULT_MAX_GAP};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

/// The blocking half: owns the pipeline state and the model.
pub struct Collector {
    pipeline: Pipeline,
    /// Slow sensors' gap rule (common's [`GapFiller`]), by sensor name.
    gaps: HashMap<String, GapFiller>,
    slot: Arc<ModelSlot>,
    model_sensor: String,
    outbox: Arc<Outbox>,
    health: Arc<Health>,
    /// The alert rule over the model's scores, with the class configuration in force (its `[alerts]`).
    alerts: Option<(Arc<crate::alerts::AlertBook>, tokio::sync::watch::Receiver<Arc<ClassConfig>>)>,
}

impl Collector {
    pub fn new(
        spec: &PipelineSpec,
        slot: Arc<ModelSlot>,
        model_sensor: String,
        outbox: Arc<Outbox>,
        health: Arc<Health>,
    ) -> Self {
        Collector {
            pipeline: Pipeline::new(spec),
            gaps: HashMap::new(),
            slot,
            model_sensor,
            outbox,
            health,
            alerts: None,
        }
    }

    /// Raises alerts on the model's scores, by the `[alerts]` rule of the class configuration in force.
    pub fn with_alerts(
        mut self,
        book: Arc<crate::alerts::AlertBook>,
        class: tokio::sync::watch::Receiver<Arc<ClassConfig>>,
    ) -> Self {
        self.alerts = Some((book, class));
        self
    }

    /// The collector for a device class: its feature pipeline, and the gap rule on each slow sensor at its
    /// nominal period: [`DEFAULT_MAX_GAP`] and linear, as datasets apply it by default, and on the model's
    /// sensor the rule the active model was trained under (its manifest's `gaps`).
    pub fn for_class(
        class: &ClassConfig,
        slot: Arc<ModelSlot>,
        model_sensor: String,
        outbox: Arc<Outbox>,
        health: Arc<Health>,
    ) -> Self {
        // Short gaps are filled through the pipeline and the model's window (no records, no scores); after a
        // long one the features start over, as in a dataset.
        let mut c = Collector::new(&class.pipeline(), slot, model_sensor, outbox, health);
        c.gaps = (class.sensors.iter().filter(|s| s.kind == SignalKind::Slow))
            .map(|s| {
                let filler = GapFiller::new(ClassConfig::period_ms(s), DEFAULT_MAX_GAP, ImputeMethod::Linear);
                (s.name.clone(), filler)
            })
            .collect();
        c
    }

    fn reject(&self, sensor: &str, reason: &str) {
        let n = self.health.bad_samples.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(sensor, reason, rejected_total = n, "bad sample refused");
        }
    }

    /// Turns samples into records. Blocking (inference).
    pub fn process(&mut self, samples: Vec<Sample>, now_ms: u64) -> Vec<NewRecord> {
        self.follow_model_gap_rule();
        let mut out = Vec::new();
        for s in samples {
            if s.values.iter().any(|v| !v.is_finite()) {
                self.reject(&s.sensor, "non-finite value");
                continue;
            }
            let Some(p) = self.pipeline.sensor_mut(&s.sensor) else {
                self.reject(&s.sensor, "unknown sensor for this class");
                continue;
            };
            let ts_ms = s.ts_ms.unwrap_or(now_ms);
            let model_sensor = s.sensor == self.model_sensor;
            // A slow reading's features come from the reading as its record stores it, as a dataset's do.
            let values = match p.spec().features {
                FeatureKind::Slow { .. } => s.values.iter().map(|&v| as_stored(v)).collect(),
                FeatureKind::Window { .. } => s.values,
            };
            match self.gaps.get_mut(&s.sensor).map(|g| g.next(ts_ms, &values)) {
                None | Some(Gap::None) => {}
                Some(Gap::Fill(filled)) => {
                    for (_, values) in filled {
                        if let (Ok(Some(f)), true) = (p.push(&values), model_sensor) {
                            self.slot.observe(&f);
                        }
                    }
                }
                Some(Gap::Restart { missing }) => {
                    tracing::debug!(sensor = %s.sensor, missing, "long gap: features start over");
                    p.reset();
                    if model_sensor {
                        self.slot.restart();
                    }
                }
            }
            let features = match p.push(&values) {
                Ok(Some(f)) => f,
                Ok(None) => continue,
                Err(e) => {
                    self.reject(&s.sensor, &e.to_string());
                    continue;
                }
            };
            let (score, flagged) = if model_sensor { self.slot.score(&features) } else { (None, false) };
            let mut out_of_range = false;
            if let (true, Some((book, class))) = (model_sensor, &self.alerts) {
                let (policy, window_secs) = {
                    let c = class.borrow();
                    (c.alerts.clone(), c.window_secs(&s.sensor).unwrap_or(0.0))
                };
                // A slow reading is judged against the range the device has seen (a fast sensor's window is
                // the model's to judge).
                if matches!(p.spec().features, FeatureKind::Slow { .. }) {
                    match book.reading(&policy, &values, score.is_some()) {
                        Ok(out) => out_of_range = out,
                        Err(e) => tracing::error!(error = %e, "seen range not written"),
                    }
                }
                if let Some(score) = score {
                    let active = self.slot.active_info();
                    let model = active.as_ref().map(|m| m.label());
                    // The model's flag counts when the score is also past the device's tail (or the model's,
                    // while the device's is learnt).
                    let past_tail = active.as_ref().zip(model.as_deref()).is_none_or(|(a, label)| {
                        book.past_tail(&policy, window_secs, (label, a.score_tail.as_ref()), ts_ms, score)
                            .unwrap_or_else(|e| {
                                tracing::error!(error = %e, "score tail not written");
                                true
                            })
                    });
                    let counts = (flagged && past_tail) || out_of_range;
                    if let Err(e) = book.observe(&policy, &s.sensor, ts_ms, score, counts, model.as_deref()) {
                        tracing::error!(error = %e, "alert state not written");
                    }
                }
            }
            let flags = if flagged { FLAG_ANOMALY } else { 0 } | if out_of_range { FLAG_OUT_OF_RANGE } else { 0 };
            out.push(NewRecord { ts_ms, sensor: s.sensor, features, score, flags });
        }
        out
    }

    /// Fills the model's sensor's gaps as the active model's training did, from the next reading on.
    fn follow_model_gap_rule(&mut self) {
        let rule = self.slot.gap_rule();
        if let Some(g) = self.gaps.get_mut(&self.model_sensor).filter(|g| g.rule() != rule) {
            tracing::info!(sensor = %self.model_sensor, impute = ?rule.impute, max_gap = rule.max_gap, "gap rule of the model");
            g.set_rule(rule);
        }
    }

    /// Appends and commits durably. Blocking.
    pub fn persist(&self, records: Vec<NewRecord>) -> Result<(), OutboxError> {
        if records.is_empty() {
            return Ok(());
        }
        let n = records.len() as u64;
        let outcome = self.outbox.append(records)?;
        self.outbox.commit()?;
        if let Some((book, _)) = &self.alerts {
            book.committed();
        }
        self.health.records_appended.fetch_add(n, Ordering::Relaxed);
        for r in &outcome.dropped {
            tracing::warn!(from = r.from, to = r.to, "outbox full: oldest records dropped (reported in status)");
        }
        Ok(())
    }
}

/// Group-commit settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitParams {
    pub max_records: usize,
    pub interval: Duration,
}

impl CommitParams {
    /// A class's group commit (`[outbox]`).
    pub fn of(class: &edgeloop_common::config::ClassConfig) -> CommitParams {
        CommitParams {
            max_records: class.outbox.commit_max_records,
            interval: Duration::from_millis(class.outbox.commit_interval_ms),
        }
    }
}

/// The async loop around a [`Collector`]. Returns when cancelled (after committing what it took) or when
/// every sender is gone.
pub async fn run(
    mut collector: Collector,
    mut rx: mpsc::Receiver<Sample>,
    params: tokio::sync::watch::Receiver<CommitParams>,
    durable: Arc<Notify>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let mut group = Vec::new();
        let first = tokio::select! {
            _ = cancel.cancelled() => None,
            s = rx.recv() => s,
        };
        let Some(first) = first else { break };
        group.push(first);
        // A class configuration rolled out may change the group commit while the agent runs.
        let params = *params.borrow();
        let deadline = tokio::time::sleep(params.interval);
        tokio::pin!(deadline);
        while group.len() < params.max_records {
            tokio::select! {
                _ = &mut deadline => break,
                _ = cancel.cancelled() => break,
                s = rx.recv() => match s {
                    Some(s) => group.push(s),
                    None => break,
                },
            }
        }
        collector = process_group(collector, group).await?;
        durable.notify_one();
    }
    // Shutdown: what was already taken from sources is committed, not lost.
    rx.close();
    let mut rest = Vec::new();
    while let Ok(s) = rx.try_recv() {
        rest.push(s);
    }
    if !rest.is_empty() {
        process_group(collector, rest).await?;
        durable.notify_one();
    }
    Ok(())
}

async fn process_group(mut collector: Collector, group: Vec<Sample>) -> anyhow::Result<Collector> {
    tokio::task::spawn_blocking(move || {
        let n = group.len() as u64;
        let records = collector.process(group, edgeloop_common::unix_millis());
        collector.persist(records)?;
        // Counted once their records are durable, so "every sample handled" implies "every record committed".
        collector.health.samples.fetch_add(n, Ordering::Relaxed);
        Ok::<_, OutboxError>(collector)
    })
    .await?
    .map_err(|e| anyhow::anyhow!(e).context("appending to the outbox"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::Model;
    use crate::updater::slot::{Loaded, ModelInfo};
    use edgeloop_common::durable::Durability;
    use edgeloop_common::features::{FeatureKind, SensorPipeline, SensorSpec};
    use edgeloop_common::gaps::GapRule;

    fn collector(dir: &std::path::Path, model: bool) -> Collector {
        let spec = PipelineSpec {
            version: 1,
            sensors: vec![SensorSpec {
                name: "t".into(),
                channels: 2,
                features: FeatureKind::Slow { rolling: 4, season: 0 },
            }],
        };
        let outbox = Arc::new(Outbox::open(dir, Durability::Flush, 1 << 20).unwrap());
        let health = Arc::new(Health::default());
        let (slot, _events) = ModelSlot::new(health.clone(), Some(50.0));
        if model {
            let model = Model::load_bytes(&crate::inference::mean_square_nnef(10), 10).unwrap();
            slot.set_active(Some(Loaded { info: ModelInfo::configured(&model), model }));
        }
        Collector::new(&spec, slot, "t".into(), outbox, health)
    }

    fn sample(sensor: &str, values: Vec<f64>) -> Sample {
        Sample { sensor: sensor.into(), ts_ms: Some(7), values }
    }

    #[test]
    fn scores_flags_and_rejects() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = collector(dir.path(), true);
        let recs = c.process(
            vec![
                sample("t", vec![1.0, 2.0]),
                sample("t", vec![100.0, 2.0]),
                sample("nope", vec![1.0]),
                sample("t", vec![f64::NAN, 1.0]),
                sample("t", vec![1.0]),
            ],
            99,
        );
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].features.len(), 10);
        assert_eq!(recs[0].flags, 0);
        assert_eq!(recs[1].flags, FLAG_ANOMALY, "score {:?}", recs[1].score);
        assert!(recs[1].score.unwrap() > 50.0);
        assert_eq!(c.health.bad_samples.load(Ordering::Relaxed), 3);
        c.persist(recs).unwrap();
        assert_eq!(c.outbox.stats().durable_seq, 2);
        assert!(c.health.latency_percentiles().is_some());
    }

    #[test]
    fn without_model_collects_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = collector(dir.path(), false);
        let recs = c.process(vec![sample("t", vec![1.0, 2.0])], 99);
        assert_eq!(recs[0].score, None);
        assert_eq!(recs[0].ts_ms, 7);
    }

    /// Channel 0's delta and rolling mean in the record of a reading of 6 at 4 s, after readings of 0 at 0 s
    /// and 1 s (two missing at a 1 s period), with an active model trained under `rule`.
    fn after_a_gap(rule: Option<GapRule>) -> (f32, f32) {
        let dir = tempfile::tempdir().unwrap();
        let mut c = collector(dir.path(), true);
        if let Some(rule) = rule {
            let model = Model::load_bytes(&crate::inference::mean_square_nnef(10), 10).unwrap();
            let info = ModelInfo { gaps: rule, ..ModelInfo::configured(&model) };
            c.slot.set_active(Some(Loaded { info, model }));
        }
        c.gaps.insert("t".into(), GapFiller::new(1000.0, DEFAULT_MAX_GAP, ImputeMethod::Linear));
        let at = |ts: u64, v: f64| Sample { sensor: "t".into(), ts_ms: Some(ts), values: vec![v, 0.0] };
        let recs = c.process(vec![at(0, 0.0), at(1000, 0.0), at(4000, 6.0)], 99);
        assert_eq!(recs.len(), 3, "filled readings make no records");
        let f = &recs[2].features;
        (f[1], f[2])
    }

    #[test]
    fn fills_gaps_of_the_models_sensor_by_the_active_models_rule() {
        // A model without a rule (configured from a file): linear, 2 and 4 filled; rolling over 0, 2, 4, 6.
        assert_eq!(after_a_gap(None), (2.0, 3.0));
        // Trained with hold: 0 and 0 filled; rolling over 0, 0, 0, 6.
        assert_eq!(after_a_gap(Some(GapRule { impute: ImputeMethod::Hold, max_gap: 5 })), (6.0, 1.5));
        // Trained with at most one reading filled: two missing is a long gap, and the features start over.
        assert_eq!(after_a_gap(Some(GapRule { impute: ImputeMethod::Linear, max_gap: 1 })), (0.0, 6.0));
    }

    #[test]
    fn slow_features_are_the_ones_a_dataset_recomputes_from_the_stored_values() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = collector(dir.path(), false);
        // A meter past 2^24 counting by 1 (an f32 holds only every other integer there), and a small reading.
        let at = |i: u64| Sample {
            sensor: "t".into(),
            ts_ms: Some(i * 1000),
            values: vec![16_777_217.0 + i as f64, 0.1 * i as f64],
        };
        let recs = c.process((0..8).map(at).collect(), 99);
        assert_eq!(recs.len(), 8);
        // What a dataset does: take each record's stored values (the `value` feature of each channel) and run
        // the pipeline over them.
        let mut again = SensorPipeline::new(SensorSpec {
            name: "t".into(),
            channels: 2,
            features: FeatureKind::Slow { rolling: 4, season: 0 },
        });
        for r in &recs {
            let stored = [r.features[0] as f64, r.features[5] as f64];
            assert_eq!(again.push(&stored).unwrap().unwrap(), r.features);
        }
    }

    #[tokio::test]
    async fn shutdown_commits_taken_samples() {
        let dir = tempfile::tempdir().unwrap();
        let c = collector(dir.path(), false);
        let outbox = c.outbox.clone();
        let (tx, rx) = mpsc::channel(100);
        for i in 0..50 {
            tx.send(sample("t", vec![i as f64, 0.0])).await.unwrap();
        }
        let cancel = CancellationToken::new();
        cancel.cancel();
        let params = CommitParams { max_records: 10, interval: Duration::from_secs(60) };
        run(c, rx, tokio::sync::watch::channel(params).1, Arc::new(Notify::new()), cancel).await.unwrap();
        assert_eq!(outbox.stats().durable_seq, 50);
    }
}
