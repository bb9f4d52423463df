//! Rollouts: moving signed model versions onto the fleet in stages, gated on how the model behaves.
//!
//! - [`engine`]: the pure state machine (stages, device order, gates, breach handling, timeouts, late
//!   joiners).
//! - [`window`]: maintenance windows in named time zones (pure).
//! - [`store`]: rollouts, issued desired states and device tags in sled.
//! - [`service`]: the thin shell: ticks the engine with the registry's view of the fleet, signs and
//!   persists desired states, then publishes them retained on `down/desired`.

pub mod bundle;
pub mod config;
pub mod configs;
pub mod engine;
pub mod releases;
pub(crate) mod service;
pub mod store;
pub(crate) mod view;
pub mod window;

pub use service::{CreateRollout, Rollouts, WindowView};

/// The default strategy: one canary device, then half the class, then all of it.
pub fn default_stages() -> Vec<engine::Stage> {
    use engine::{Share, Stage};
    vec![
        Stage { name: "canary".into(), share: Share::Count(1), bake_secs: 30, timeout_secs: None },
        Stage { name: "half".into(), share: Share::Percent(50.0), bake_secs: 30, timeout_secs: None },
        Stage { name: "all".into(), share: Share::Percent(100.0), bake_secs: 0, timeout_secs: None },
    ]
}

pub use engine::{Share, Stage, State};
pub use view::{RolloutView, StageView};
