//! Where training runs: on the CPU, in a thread pool sized to the model, or on an NVIDIA GPU through candle's
//! CUDA backend when the control plane is built with the `cuda` feature.
//!
//! `training.device` is `"auto"`, `"cpu"` or `"cuda:N"`. Each trial is planned on its own, from the work of one
//! optimiser step (parameters × batch, in multiply-adds):
//!
//! - `auto` trains on GPU 0 when the build has CUDA, a GPU is present, and a step is at least
//!   [`GPU_MIN_MACS`]; below that, kernel launches cost more than the arithmetic and the CPU is faster;
//! - on the CPU, the thread count grows with the step's work ([`cpu_threads`]): tiny models run slower on
//!   many threads than on two, because every matrix product pays to wake and join the threads;
//! - `cuda:N` trains on that GPU whatever the size, and is refused up front when the build has no CUDA or the
//!   GPU is not there.

use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

/// `training.device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSetting {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

/// A `training.device` that is not `auto`, `cpu` or `cuda:N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected \"auto\", \"cpu\" or \"cuda:N\" (N a GPU number), got \"{0}\"")]
pub struct BadDeviceSetting(pub String);

impl FromStr for DeviceSetting {
    type Err = BadDeviceSetting;

    fn from_str(s: &str) -> Result<Self, BadDeviceSetting> {
        let bad = || BadDeviceSetting(s.to_string());
        match s {
            "auto" => Ok(DeviceSetting::Auto),
            "cpu" => Ok(DeviceSetting::Cpu),
            _ => match s.strip_prefix("cuda:") {
                Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                    n.parse().map(DeviceSetting::Cuda).map_err(|_| bad())
                }
                _ => Err(bad()),
            },
        }
    }
}

impl TryFrom<String> for DeviceSetting {
    type Error = BadDeviceSetting;

    fn try_from(s: String) -> Result<Self, BadDeviceSetting> {
        s.parse()
    }
}

impl From<DeviceSetting> for String {
    fn from(d: DeviceSetting) -> String {
        d.to_string()
    }
}

impl fmt::Display for DeviceSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSetting::Auto => f.write_str("auto"),
            DeviceSetting::Cpu => f.write_str("cpu"),
            DeviceSetting::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The work of one optimiser step of a dense network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Work {
    pub params: usize,
    pub batch: usize,
}

impl Work {
    /// Layers `sizes[0] -> sizes[1] -> ...` trained at `batch`.
    pub fn of(sizes: &[usize], batch: usize) -> Work {
        Work { params: sizes.windows(2).map(|p| p[0] * p[1] + p[1]).sum(), batch: batch.max(1) }
    }

    /// Multiply-adds of one forward pass over a batch (backward is about twice that again).
    pub fn macs(&self) -> u64 {
        self.params as u64 * self.batch as u64
    }
}

/// Steps of at least this many multiply-adds go to the GPU under `auto`. Measured on an H200
/// (docs/benchmarks.md, "Training on a GPU"): the small autoencoder (32-64-16-64-32, 6,320 parameters) at batch
/// 4,096 is 25.9 M per step and trains 6.5 times faster on the GPU than on a 2-core EPYC; at batch 256 (1.6 M)
/// the GPU's epoch is launch-bound (0.36 s) and that CPU is faster (0.27 s). A slow host CPU moves the
/// crossover down (the H200 host's own cores took 1.28 s at batch 256); this threshold keeps small steps on
/// the CPU, where edgeloop's usual models (a few thousand parameters, batches of 32 to 128) train fastest.
pub const GPU_MIN_MACS: u64 = 8_000_000;

/// CPU threads get one more per this many multiply-adds of a step.
pub const MACS_PER_THREAD: u64 = 64_000_000;

/// Threads for a step of `work` on a machine with `cores` cores: at least 1, at most `cores`, one per
/// [`MACS_PER_THREAD`]. Measured on 16 cores: the small autoencoder was fastest on 1 or 2 threads at both
/// batches (16 threads: 1.5 to 1.8 times slower); the big one (256-1024-256-64-256-1024-256) on 4 threads at
/// batch 256 (277 M, the rule gives 5) and on 8 to 16 at batch 4,096 (4.4 G, the rule gives all 16).
pub fn cpu_threads(work: Work, cores: usize) -> usize {
    (work.macs().div_ceil(MACS_PER_THREAD) as usize).clamp(1, cores.max(1))
}

/// Where one trial runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Cpu { threads: usize },
    Cuda(usize),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Cpu { threads } => write!(f, "cpu ({threads} threads)"),
            Target::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// A target and why it was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub target: Target,
    pub reason: String,
}

/// What this machine offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Machine {
    /// Built with the `cuda` feature.
    pub cuda_built: bool,
    /// GPUs the driver reports (0 without the feature or without a driver).
    pub gpus: usize,
    pub cores: usize,
}

impl Machine {
    pub fn probe() -> Machine {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Machine { cuda_built: cfg!(feature = "cuda"), gpus: gpu_count(), cores }
    }
}

#[cfg(feature = "cuda")]
fn gpu_count() -> usize {
    candle_core::cuda_backend::cudarc::driver::CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

#[cfg(not(feature = "cuda"))]
fn gpu_count() -> usize {
    0
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("training.device = \"{0}\", but this control plane was built without the `cuda` feature (see docs/operations.md, \"Training on a GPU\")")]
    NotBuilt(DeviceSetting),
    #[error("training.device = \"cuda:{ordinal}\", but the driver reports {found} GPU(s)")]
    NoSuchGpu { ordinal: usize, found: usize },
    #[error("opening GPU {ordinal}: {message}")]
    Open { ordinal: usize, message: String },
    #[error("starting a pool of {threads} training threads: {message}")]
    Pool { threads: usize, message: String },
}

/// Whether GPU `ordinal` can be asked for on `machine` (the build has CUDA and the driver lists it).
fn check_gpu(ordinal: usize, machine: Machine) -> Result<(), DeviceError> {
    if !machine.cuda_built {
        Err(DeviceError::NotBuilt(DeviceSetting::Cuda(ordinal)))
    } else if ordinal >= machine.gpus {
        Err(DeviceError::NoSuchGpu { ordinal, found: machine.gpus })
    } else {
        Ok(())
    }
}

/// Plans one step of `work` under `setting` on `machine`.
pub fn plan(setting: DeviceSetting, work: Work, machine: Machine) -> Result<Plan, DeviceError> {
    let cpu = |why: String| Plan { target: Target::Cpu { threads: cpu_threads(work, machine.cores) }, reason: why };
    let size = |verdict: &str| {
        format!(
            "auto: {} parameters × batch {} is {:.1} M multiply-adds per step, {verdict} the GPU's {:.0} M",
            work.params,
            work.batch,
            work.macs() as f64 / 1e6,
            GPU_MIN_MACS as f64 / 1e6
        )
    };
    match setting {
        DeviceSetting::Cpu => Ok(cpu("training.device = \"cpu\"".into())),
        DeviceSetting::Cuda(n) => {
            check_gpu(n, machine)?;
            Ok(Plan { target: Target::Cuda(n), reason: format!("training.device = \"cuda:{n}\"") })
        }
        DeviceSetting::Auto if !machine.cuda_built => Ok(cpu("auto: built without CUDA".into())),
        DeviceSetting::Auto if machine.gpus == 0 => Ok(cpu("auto: no GPU found".into())),
        DeviceSetting::Auto if work.macs() < GPU_MIN_MACS => Ok(cpu(size("under"))),
        DeviceSetting::Auto => Ok(Plan { target: Target::Cuda(0), reason: size("at least") }),
    }
}

/// The devices of one training job: plans each trial, opens GPUs once, keeps one thread pool per size, and
/// logs each distinct choice once.
pub struct Devices {
    setting: DeviceSetting,
    machine: Machine,
    gpus: Mutex<BTreeMap<usize, Device>>,
    pools: Mutex<BTreeMap<usize, Arc<rayon::ThreadPool>>>,
    logged: Mutex<BTreeSet<Target>>,
}

impl Devices {
    /// Checks `setting` against this machine: an explicit `cuda:N` must be usable.
    pub fn new(setting: DeviceSetting) -> Result<Devices, DeviceError> {
        Devices::on(setting, Machine::probe())
    }

    /// As [`Devices::new`], for a given machine.
    pub fn on(setting: DeviceSetting, machine: Machine) -> Result<Devices, DeviceError> {
        if let DeviceSetting::Cuda(n) = setting {
            check_gpu(n, machine)?;
        }
        Ok(Devices {
            setting,
            machine,
            gpus: Mutex::new(BTreeMap::new()),
            pools: Mutex::new(BTreeMap::new()),
            logged: Mutex::new(BTreeSet::new()),
        })
    }

    /// Training on the CPU only.
    pub fn cpu() -> Devices {
        Devices::on(DeviceSetting::Cpu, Machine { cuda_built: false, gpus: 0, ..Machine::probe() })
            .expect("the CPU is always there")
    }

    pub fn machine(&self) -> Machine {
        self.machine
    }

    /// Plans `work`, then runs `f` there; returns what `f` returned and the plan.
    /// Under `auto`, a GPU that cannot be opened (another process holds its memory, a driver mismatch) sends
    /// the trial to the CPU with a warning; an explicit `cuda:N` fails instead.
    pub fn run<T: Send>(&self, work: Work, f: impl FnOnce(&Device) -> T + Send) -> Result<(T, Plan), DeviceError> {
        let mut plan = plan(self.setting, work, self.machine)?;
        if let (DeviceSetting::Auto, Target::Cuda(n)) = (self.setting, plan.target) {
            if let Err(e) = self.gpu(n) {
                tracing::warn!(error = %e, "auto: the GPU cannot be used; training on the CPU");
                plan = Plan {
                    target: Target::Cpu { threads: cpu_threads(work, self.machine.cores) },
                    reason: format!("auto: {e}; on the CPU instead"),
                };
            }
        }
        if self.logged.lock().expect("device log").insert(plan.target) {
            tracing::info!(device = %plan.target, reason = %plan.reason, "training device");
        }
        Ok((self.run_on(plan.target, f)?, plan))
    }

    /// Runs `f` on `target`, whatever the setting says (equivalence checks and benchmarks).
    pub fn run_on<T: Send>(&self, target: Target, f: impl FnOnce(&Device) -> T + Send) -> Result<T, DeviceError> {
        match target {
            Target::Cpu { threads } => {
                let pool = self.pool(threads)?;
                Ok(pool.install(|| f(&Device::Cpu)))
            }
            Target::Cuda(n) => {
                let dev = self.gpu(n)?;
                Ok(f(&dev))
            }
        }
    }

    fn pool(&self, threads: usize) -> Result<Arc<rayon::ThreadPool>, DeviceError> {
        let mut pools = self.pools.lock().expect("thread pools");
        if let Some(p) = pools.get(&threads) {
            return Ok(p.clone());
        }
        let p = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("train-{i}"))
            .build()
            .map_err(|e| DeviceError::Pool { threads, message: e.to_string() })?;
        Ok(pools.entry(threads).or_insert(Arc::new(p)).clone())
    }

    fn gpu(&self, ordinal: usize) -> Result<Device, DeviceError> {
        let mut gpus = self.gpus.lock().expect("gpus");
        if let Some(d) = gpus.get(&ordinal) {
            return Ok(d.clone());
        }
        check_gpu(ordinal, self.machine)?;
        let d = Device::new_cuda(ordinal).map_err(|e| DeviceError::Open { ordinal, message: e.to_string() })?;
        Ok(gpus.entry(ordinal).or_insert(d).clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: [usize; 5] = [32, 64, 16, 64, 32];
    const BIG: [usize; 7] = [256, 1024, 256, 64, 256, 1024, 256];

    fn machine(cuda_built: bool, gpus: usize) -> Machine {
        Machine { cuda_built, gpus, cores: 16 }
    }

    #[test]
    fn settings_parse_and_print_back() {
        for s in ["auto", "cpu", "cuda:0", "cuda:3"] {
            assert_eq!(s.parse::<DeviceSetting>().unwrap().to_string(), s);
        }
        for bad in ["", "gpu", "cuda", "cuda:", "cuda:x", "cuda:-1", "CPU", "cuda:0 "] {
            let err = bad.parse::<DeviceSetting>().unwrap_err();
            assert!(err.to_string().contains(&format!("got \"{bad}\"")), "{err}");
        }
        assert_eq!(serde_json::from_str::<DeviceSetting>("\"cuda:1\"").unwrap(), DeviceSetting::Cuda(1));
        assert_eq!(serde_json::to_string(&DeviceSetting::Auto).unwrap(), "\"auto\"");
        assert!(serde_json::from_str::<DeviceSetting>("\"tpu\"").is_err());
    }

    #[test]
    fn work_counts_weights_and_biases() {
        assert_eq!(Work::of(&SMALL, 256).params, 32 * 64 + 64 + 64 * 16 + 16 + 16 * 64 + 64 + 64 * 32 + 32);
        assert_eq!(Work::of(&SMALL, 256).macs(), 6_320 * 256);
        assert_eq!(Work::of(&BIG, 4096).params, 1_084_224);
    }

    #[test]
    fn auto_sends_only_big_steps_to_the_gpu() {
        let gpu = machine(true, 1);
        let small = |b| plan(DeviceSetting::Auto, Work::of(&SMALL, b), gpu).unwrap().target;
        assert!(matches!(small(256), Target::Cpu { .. }));
        assert_eq!(small(4096), Target::Cuda(0));
        assert_eq!(plan(DeviceSetting::Auto, Work::of(&BIG, 256), gpu).unwrap().target, Target::Cuda(0));
        // Without the build or the card, auto stays on the CPU and says why.
        let p = plan(DeviceSetting::Auto, Work::of(&BIG, 4096), machine(false, 0)).unwrap();
        assert!(matches!(p.target, Target::Cpu { .. }) && p.reason.contains("without CUDA"), "{p:?}");
        let p = plan(DeviceSetting::Auto, Work::of(&BIG, 4096), machine(true, 0)).unwrap();
        assert!(matches!(p.target, Target::Cpu { .. }) && p.reason.contains("no GPU"), "{p:?}");
        let p = plan(DeviceSetting::Auto, Work::of(&SMALL, 64), gpu).unwrap();
        assert!(p.reason.contains("under the GPU"), "{p:?}");
    }

    #[test]
    fn explicit_settings_are_obeyed_or_refused() {
        let w = Work::of(&SMALL, 32);
        assert_eq!(plan(DeviceSetting::Cuda(0), w, machine(true, 1)).unwrap().target, Target::Cuda(0));
        assert!(matches!(
            plan(DeviceSetting::Cpu, Work::of(&BIG, 4096), machine(true, 1)).unwrap().target,
            Target::Cpu { .. }
        ));
        assert_eq!(
            plan(DeviceSetting::Cuda(1), w, machine(true, 1)).unwrap_err(),
            DeviceError::NoSuchGpu { ordinal: 1, found: 1 }
        );
        let err = Devices::on(DeviceSetting::Cuda(0), machine(false, 0)).err().unwrap();
        assert!(err.to_string().contains("without the `cuda` feature"), "{err}");
        assert!(Devices::on(DeviceSetting::Auto, machine(false, 0)).is_ok());
    }

    #[test]
    fn threads_grow_with_the_step() {
        assert_eq!(cpu_threads(Work::of(&SMALL, 256), 16), 1);
        assert_eq!(cpu_threads(Work::of(&SMALL, 4096), 16), 1);
        assert_eq!(cpu_threads(Work::of(&BIG, 256), 16), 5);
        assert_eq!(cpu_threads(Work::of(&BIG, 4096), 16), 16);
        assert_eq!(cpu_threads(Work::of(&BIG, 4096), 2), 2);
        assert_eq!(cpu_threads(Work { params: 0, batch: 1 }, 0), 1);
    }

    #[test]
    fn runs_in_a_pool_of_the_planned_size() {
        let d = Devices::cpu();
        let n = d.run_on(Target::Cpu { threads: 3 }, |_| rayon::current_num_threads()).unwrap();
        assert_eq!(n, 3);
        let (n, plan) = d.run(Work::of(&SMALL, 16), |dev| (dev.is_cpu(), rayon::current_num_threads())).unwrap();
        assert_eq!(n, (true, 1));
        assert_eq!(plan.target, Target::Cpu { threads: 1 });
        assert!(matches!(d.run_on(Target::Cuda(0), |_| ()), Err(DeviceError::NotBuilt(_))));
    }

    /// A GPU the driver lists but that cannot be opened: `auto` trains on the CPU and says why; `cuda:0` fails.
    /// (In a build without CUDA, candle cannot open any GPU, which stands in for the failure.)
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn auto_falls_back_to_the_cpu_when_the_gpu_cannot_be_opened() {
        let m = Machine { cuda_built: true, gpus: 1, cores: 2 };
        let auto = Devices::on(DeviceSetting::Auto, m).unwrap();
        let (on_cpu, plan) = auto.run(Work::of(&BIG, 4096), |dev| dev.is_cpu()).unwrap();
        assert!(on_cpu);
        assert_eq!(plan.target, Target::Cpu { threads: 2 });
        assert!(
            plan.reason.starts_with("auto: opening GPU 0: ") && plan.reason.ends_with("on the CPU instead"),
            "{}",
            plan.reason
        );
        let explicit = Devices::on(DeviceSetting::Cuda(0), m).unwrap();
        assert!(matches!(explicit.run(Work::of(&BIG, 4096), |_| ()), Err(DeviceError::Open { ordinal: 0, .. })));
    }
}
