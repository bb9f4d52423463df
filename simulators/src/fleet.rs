//! Many agents in one process, for demos, tests and load runs. Each has its own device id, sled data dir and
//! signal seed, and is fed through its own in-process channel source.

use crate::signals::Generator;
use edgeloop_agent::config::AgentConfig;
use edgeloop_agent::source::channel::ChannelSource;
use edgeloop_agent::source::Sample;
use edgeloop_agent::{Agent, AgentHandle};
use edgeloop_common::config::ClassConfig;
use std::path::{Path, PathBuf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One simulated device.
pub struct SimDevice {
    pub agent: AgentHandle,
    pub samples: mpsc::Sender<Sample>,
    pub generator: Generator,
    pub class: String,
}

/// How to build each agent.
#[derive(Clone)]
pub struct FleetSpec {
    pub classes: Vec<ClassConfig>,
    pub mqtt: (String, u16),
    pub data_root: PathBuf,
    /// Tweaks applied to every agent config (model, durability, byte bound...).
    pub customise: fn(&mut AgentConfig),
}

fn no_change(_: &mut AgentConfig) {}

impl FleetSpec {
    pub fn new(classes: Vec<ClassConfig>, mqtt: (String, u16), data_root: &Path) -> Self {
        FleetSpec { classes, mqtt, data_root: data_root.to_path_buf(), customise: no_change }
    }
}

/// Starts `n` agents named `sim-0000`.., cycling through the classes.
pub async fn start(spec: &FleetSpec, n: usize, cancel: &CancellationToken) -> anyhow::Result<Vec<SimDevice>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let class = spec.classes[i % spec.classes.len()].clone();
        let id = format!("sim-{i:04}");
        let mut cfg = AgentConfig::in_process(&id, class.clone(), spec.mqtt.clone(), spec.data_root.join(&id));
        (spec.customise)(&mut cfg);
        let (tx, source) = ChannelSource::new(1024);
        let agent = Agent::start(cfg, vec![Box::new(source)], cancel.child_token()).await?;
        out.push(SimDevice {
            agent,
            samples: tx,
            generator: Generator::new(class.clone(), i as u64, edgeloop_common::unix_millis()),
            class: class.class,
        });
    }
    Ok(out)
}
