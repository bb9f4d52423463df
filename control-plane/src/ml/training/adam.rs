//! Adam in two fused passes per parameter tensor, on the CPU and (with the `cuda` feature) on NVIDIA GPUs.
//!
//! candle's `AdamW` spends about eighteen tensor operations per parameter per step (scalings, squares, a
//! square root, a division and three copies back into the variables). On the CPU each is a pass over memory;
//! on a GPU each is a kernel launch, and for the small models edgeloop trains, launches are the cost. Here one
//! pass updates both moments in place and a second updates the weights in place, from the same formulas:
//!
//! ```text
//! m ← β1·m + (1−β1)·g          v ← β2·v + (1−β2)·g²
//! θ ← θ − lr · (m / (1−β1^t)) / (√(v / (1−β2^t)) + ε)
//! ```
//!
//! Each parameter's moments live in one tensor of twice its size (`m` then `v`). No weight decay.

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Layout, Tensor, Var};

/// Adam's constants.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl AdamParams {
    /// The usual constants (β1 0.9, β2 0.999, ε 1e-8) at learning rate `lr`.
    pub fn with_lr(lr: f64) -> AdamParams {
        AdamParams { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

/// The optimiser: each variable with its moments.
pub struct Adam {
    vars: Vec<(Var, Tensor)>,
    params: AdamParams,
    step: i32,
}

impl Adam {
    pub fn new(vars: Vec<Var>, params: AdamParams) -> candle_core::Result<Adam> {
        let vars = vars
            .into_iter()
            .map(|v| {
                if v.dtype() != DType::F32 {
                    candle_core::bail!("Adam: only f32 variables are supported, got {:?}", v.dtype());
                }
                let moments = Tensor::zeros(2 * v.elem_count(), DType::F32, v.device())?;
                Ok((v, moments))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Adam { vars, params, step: 0 })
    }

    /// Back-propagates `loss` and takes one step.
    pub fn backward_step(&mut self, loss: &Tensor) -> candle_core::Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }

    pub fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.step += 1;
        let p = self.params;
        let moments = Moments { beta1: p.beta1 as f32, beta2: p.beta2 as f32 };
        let apply = Apply {
            lr_m: (p.lr / (1.0 - p.beta1.powi(self.step))) as f32,
            scale_v: (1.0 / (1.0 - p.beta2.powi(self.step))) as f32,
            eps: p.eps as f32,
        };
        for (var, mv) in &self.vars {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            mv.inplace_op2(&g.contiguous()?, &moments)?;
            var.as_tensor().inplace_op2(mv, &apply)?;
        }
        Ok(())
    }
}

/// Pass 1: both moments from the gradient, in place in the `[m | v]` tensor.
struct Moments {
    beta1: f32,
    beta2: f32,
}

/// Pass 2: the weights from the moments, in place.
struct Apply {
    /// `lr / (1 − β1^t)`.
    lr_m: f32,
    /// `1 / (1 − β2^t)`.
    scale_v: f32,
    eps: f32,
}

impl Moments {
    fn update(&self, mv: &mut [f32], g: &[f32]) {
        let (m, v) = mv.split_at_mut(g.len());
        let (c1, c2) = (1.0 - self.beta1, 1.0 - self.beta2);
        for ((m, v), &g) in m.iter_mut().zip(v.iter_mut()).zip(g) {
            *m = self.beta1 * *m + c1 * g;
            *v = self.beta2 * *v + c2 * g * g;
        }
    }
}

impl Apply {
    fn update(&self, theta: &mut [f32], mv: &[f32]) {
        let (m, v) = mv.split_at(theta.len());
        for ((t, &m), &v) in theta.iter_mut().zip(m).zip(v) {
            *t -= self.lr_m * m / ((v * self.scale_v).sqrt() + self.eps);
        }
    }
}

/// The contiguous range of `l`, or an error naming the operation.
fn range(op: &str, l: &Layout) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{op}: a tensor is not contiguous")))
}

fn f32s<'a>(op: &str, s: &'a CpuStorage) -> candle_core::Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        other => candle_core::bail!("{op}: expected f32, got {:?}", other.dtype()),
    }
}

fn f32s_mut<'a>(op: &str, s: &'a mut CpuStorage) -> candle_core::Result<&'a mut [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        other => candle_core::bail!("{op}: expected f32, got {:?}", other.dtype()),
    }
}

/// Checks that the in-place tensor is `factor` times the size of the source, and returns both ranges.
fn ranges(
    op: &str,
    dst: &Layout,
    src: &Layout,
    factor: usize,
) -> candle_core::Result<((usize, usize), (usize, usize))> {
    let (d, s) = (range(op, dst)?, range(op, src)?);
    if d.1 - d.0 != factor * (s.1 - s.0) {
        candle_core::bail!("{op}: sizes {} and {} do not match", d.1 - d.0, s.1 - s.0);
    }
    Ok((d, s))
}

impl candle_core::InplaceOp2 for Moments {
    fn name(&self) -> &'static str {
        "adam-moments"
    }

    fn cpu_fwd(&self, mv: &mut CpuStorage, ml: &Layout, g: &CpuStorage, gl: &Layout) -> candle_core::Result<()> {
        let ((m0, m1), (g0, g1)) = ranges(self.name(), ml, gl, 2)?;
        let g = &f32s(self.name(), g)?[g0..g1];
        self.update(&mut f32s_mut(self.name(), mv)?[m0..m1], g);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        mv: &mut candle_core::CudaStorage,
        ml: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let ((m0, m1), (g0, g1)) = ranges(self.name(), ml, gl, 2)?;
        cuda::moments(self, mv, (m0, m1), g, (g0, g1))
    }
}

impl candle_core::InplaceOp2 for Apply {
    fn name(&self) -> &'static str {
        "adam-apply"
    }

    fn cpu_fwd(&self, t: &mut CpuStorage, tl: &Layout, mv: &CpuStorage, ml: &Layout) -> candle_core::Result<()> {
        let ((m0, m1), (t0, t1)) = ranges(self.name(), ml, tl, 2)?;
        let mv = &f32s(self.name(), mv)?[m0..m1];
        self.update(&mut f32s_mut(self.name(), t)?[t0..t1], mv);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        t: &mut candle_core::CudaStorage,
        tl: &Layout,
        mv: &candle_core::CudaStorage,
        ml: &Layout,
    ) -> candle_core::Result<()> {
        let ((m0, m1), (t0, t1)) = ranges(self.name(), ml, tl, 2)?;
        cuda::apply(self, t, (t0, t1), mv, (m0, m1))
    }
}

/// The two passes as CUDA kernels, compiled once per process with NVRTC.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda {
    use super::{Apply, Moments};
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::cudarc::nvrtc;
    use candle_core::cuda_backend::WrapErr;
    use candle_core::CudaStorage;
    use std::sync::OnceLock;

    const MODULE: &str = "edgeloop_adam";
    const SOURCE: &str = r#"
extern "C" __global__ void edgeloop_adam_moments(unsigned int n, float *mv, const float *g, float b1, float b2) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float gi = g[i];
        mv[i] = b1 * mv[i] + (1.0f - b1) * gi;
        mv[n + i] = b2 * mv[n + i] + (1.0f - b2) * gi * gi;
    }
}

extern "C" __global__ void edgeloop_adam_apply(unsigned int n, float *theta, const float *mv, float lr_m, float scale_v,
                                               float eps) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        theta[i] -= lr_m * mv[i] / (sqrtf(mv[n + i] * scale_v) + eps);
    }
}
"#;

    fn ptx() -> candle_core::Result<&'static str> {
        static PTX: OnceLock<Result<String, String>> = OnceLock::new();
        PTX.get_or_init(|| {
            let opts = nvrtc::CompileOptions { prec_sqrt: Some(true), prec_div: Some(true), ..Default::default() };
            nvrtc::compile_ptx_with_opts(SOURCE, opts).map(|p| p.to_src()).map_err(|e| format!("{e:?}"))
        })
        .as_deref()
        .map_err(|e| candle_core::Error::Cuda(format!("compiling the Adam kernels: {e}").into()))
    }

    fn count(n: usize) -> candle_core::Result<u32> {
        u32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("Adam: {n} parameters in one tensor")))
    }

    pub(super) fn moments(
        op: &Moments,
        mv: &mut CudaStorage,
        (m0, m1): (usize, usize),
        g: &CudaStorage,
        (g0, g1): (usize, usize),
    ) -> candle_core::Result<()> {
        let dev = mv.device.clone();
        let func = dev.get_or_load_custom_func("edgeloop_adam_moments", MODULE, ptx()?)?;
        let n = count(g1 - g0)?;
        let g = g.as_cuda_slice::<f32>()?.slice(g0..g1);
        let mut mv = mv.as_cuda_slice_mut::<f32>()?.slice_mut(m0..m1);
        let mut b = func.builder();
        b.arg(&n).arg(&mut mv).arg(&g).arg(&op.beta1).arg(&op.beta2);
        // SAFETY: the kernel's parameters are (u32, f32*, const f32*, f32, f32) in this order, as pushed; it
        // touches indices below n of g and below 2n of mv, and both views are at least that long (checked by
        // `ranges`).
        unsafe { b.launch(LaunchConfig::for_num_elems(n)) }.w()?;
        Ok(())
    }

    pub(super) fn apply(
        op: &Apply,
        t: &mut CudaStorage,
        (t0, t1): (usize, usize),
        mv: &CudaStorage,
        (m0, m1): (usize, usize),
    ) -> candle_core::Result<()> {
        let dev = t.device.clone();
        let func = dev.get_or_load_custom_func("edgeloop_adam_apply", MODULE, ptx()?)?;
        let n = count(t1 - t0)?;
        let mv = mv.as_cuda_slice::<f32>()?.slice(m0..m1);
        let mut t = t.as_cuda_slice_mut::<f32>()?.slice_mut(t0..t1);
        let mut b = func.builder();
        b.arg(&n).arg(&mut t).arg(&mv).arg(&op.lr_m).arg(&op.scale_v).arg(&op.eps);
        // SAFETY: the kernel's parameters are (u32, f32*, const f32*, f32, f32, f32) in this order, as pushed;
        // it touches indices below n of theta and below 2n of mv, and both views are at least that long.
        unsafe { b.launch(LaunchConfig::for_num_elems(n)) }.w()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};

    /// A small least-squares problem: the fused steps follow candle's `AdamW` (no weight decay) step for
    /// step, and the loss goes down.
    #[test]
    fn fused_steps_match_candles_adamw() {
        let dev = Device::Cpu;
        let x = Tensor::from_vec((0..60).map(|i| ((i * 7 % 13) as f32 - 6.0) / 3.0).collect(), (20, 3), &dev).unwrap();
        let y = Tensor::from_vec((0..40).map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0).collect(), (20, 2), &dev).unwrap();
        let init: Vec<f32> = (0..6).map(|i| (i as f32 - 2.5) / 5.0).collect();
        let ours = Var::from_tensor(&Tensor::from_vec(init.clone(), (3, 2), &dev).unwrap()).unwrap();
        let theirs = Var::from_tensor(&Tensor::from_vec(init, (3, 2), &dev).unwrap()).unwrap();
        let loss = |w: &Var| x.matmul(w.as_tensor()).unwrap().sub(&y).unwrap().sqr().unwrap().mean_all().unwrap();
        let mut a = Adam::new(vec![ours.clone()], AdamParams::with_lr(0.05)).unwrap();
        let mut b = AdamW::new(vec![theirs.clone()], ParamsAdamW { lr: 0.05, weight_decay: 0.0, ..Default::default() })
            .unwrap();
        let first = loss(&ours).to_scalar::<f32>().unwrap();
        for _ in 0..50 {
            a.backward_step(&loss(&ours)).unwrap();
            b.backward_step(&loss(&theirs)).unwrap();
        }
        let (p, q): (Vec<f32>, Vec<f32>) = (
            ours.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            theirs.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
        );
        for (p, q) in p.iter().zip(&q) {
            assert!((p - q).abs() < 1e-5, "{p} against {q}");
        }
        let last = loss(&ours).to_scalar::<f32>().unwrap();
        assert!(last < first * 0.8, "loss {first} -> {last}");
    }

    #[test]
    fn non_f32_variables_are_refused() {
        let v = Var::zeros(3, DType::F64, &Device::Cpu).unwrap();
        let err = Adam::new(vec![v], AdamParams::with_lr(0.01)).err().unwrap();
        assert!(err.to_string().contains("only f32"), "{err}");
    }
}
