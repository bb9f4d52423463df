//! Learning from the fleet's data: datasets, training, the model registry, jobs, triggers and drift.
//!
//! - [`dataset`]: training sets from stored telemetry: cleaning, imputation, features, time split,
//!   standardisation, quality report.
//! - [`training`]: candle training (autoencoder, classifier, forecaster), hyper-parameter search, ONNX
//!   export and verification.
//! - [`models`]: the model registry: versions, manifests, lineage, promotion, artifacts, labels.
//! - [`jobs`]: training jobs on request, one at a time, with progress.
//! - [`triggers`]: retraining per class on a schedule, after N new records, or on drift.
//! - [`drift`]: population stability index of features against the training distribution.

pub mod config;
pub mod dataset;
pub(crate) mod drift;
pub(crate) mod jobs;
pub(crate) mod models;
pub mod nnef;
pub mod onnx_ml;
pub mod training;
pub(crate) mod triggers;
pub(crate) mod upload;

pub use jobs::{JobState, Learning};
pub use models::{ModelKind, ModelRegistry, ModelVersion};
pub use training::run::{train_class, TrainRequest};
pub use training::Hyper;
pub use triggers::{Cause, DriftedWindow, TriggerConfig, TriggerEvent};
