//! The dense layer `y = x·W + b`, then ReLU unless it is the last layer, as one candle op on the CPU: forward
//! and backward in one pass each, the matrix products by ndarray (matrixmultiply), split by rows over the
//! training thread pool.
//!
//! Why not candle's own ops: on the CPU, candle 0.11's matrix product counts the machine's physical cores on
//! every call (`num_cpus::get_physical`, which reads and parses `/proc/cpuinfo`) unless `RAYON_NUM_THREADS` is
//! set: 29% of an epoch of the small autoencoder went there (`perf`, docs/benchmarks.md). And a layer is four
//! candle ops (product, broadcast add, ReLU, and in the backward pass a transpose per product, a reduction for
//! the bias and a comparison for ReLU), each a pass over memory with its own allocation. Here the forward pass
//! writes the bias, adds the product and clips in one buffer; the backward pass masks the gradient once and
//! derives the three gradients from it.
//!
//! Results do not depend on the thread count: every output row (forward, input gradient) or weight row
//! (weight gradient) is computed by one task, and matrixmultiply sums each element over the inner dimension
//! in the same order however the rows are split (`tests/devices.rs` finds one and several threads identical).
//!
//! ReLU's gradient at exactly zero is 0 here, as in PyTorch; candle's own ReLU (still used on GPUs) passes it
//! through there. It matters only for a pre-activation of exactly 0.0, and `tests/devices.rs` bounds the
//! difference between devices.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor};
use ndarray::linalg::general_mat_mul;
use ndarray::{s, ArrayView2, ArrayViewMut2};
use rayon::prelude::*;

/// Fewest rows a task takes when a product is split over the pool's threads.
const MIN_ROWS_PER_TASK: usize = 32;

/// `x·W + b` (then ReLU if `relu`) for `x: [m, k]`, `w: [k, n]`, `b: [n]`, f32 on the CPU, with gradients for
/// every argument that tracks one.
pub fn forward(x: &Tensor, w: &Tensor, b: &Tensor, relu: bool) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, Dense { relu })
}

/// The op itself; see [`forward`].
struct Dense {
    relu: bool,
}

fn msg(what: String) -> candle_core::Error {
    candle_core::Error::Msg(format!("dense layer: {what}"))
}

/// A contiguous f32 slice of `s` under layout `l`.
fn slice<'a>(s: &'a CpuStorage, l: &Layout, name: &str) -> candle_core::Result<&'a [f32]> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| msg(format!("`{name}` is not contiguous")))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

fn matrix<'a>(data: &'a [f32], rows: usize, cols: usize, name: &str) -> candle_core::Result<ArrayView2<'a, f32>> {
    ArrayView2::from_shape((rows, cols), data).map_err(|e| msg(format!("`{name}` as [{rows}, {cols}]: {e}")))
}

/// Rows per task for `rows` rows on the current pool: all of them in one task unless there are enough for two.
fn rows_per_task(rows: usize) -> usize {
    let tasks = rayon::current_num_threads().min(rows / MIN_ROWS_PER_TASK).max(1);
    rows.div_ceil(tasks).max(1)
}

/// `out[m, n] = a[m, k]·b[k, n] + out` (the caller fills `out` first), split by rows of `a` and `out`.
fn add_product(a: ArrayView2<f32>, b: ArrayView2<f32>, out: &mut [f32]) {
    let (m, n) = (a.nrows(), b.ncols());
    if m == 0 || n == 0 {
        return;
    }
    let per = rows_per_task(m);
    out.par_chunks_mut(per * n).enumerate().for_each(|(i, chunk)| {
        let r0 = i * per;
        let rows = chunk.len() / n;
        let mut c = ArrayViewMut2::from_shape((rows, n), chunk).expect("a chunk of whole rows");
        general_mat_mul(1.0, &a.slice(s![r0..r0 + rows, ..]), &b, 1.0, &mut c);
    });
}

impl CustomOp3 for Dense {
    fn name(&self) -> &'static str {
        "edgeloop-dense"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = lx.shape().dims2()?;
        let (kw, n) = lw.shape().dims2()?;
        let nb = lb.shape().dims1()?;
        if kw != k || nb != n {
            return Err(msg(format!("x [{m}, {k}], weights [{kw}, {n}] and bias [{nb}] do not fit")));
        }
        let x = matrix(slice(sx, lx, "x")?, m, k, "x")?;
        let w = matrix(slice(sw, lw, "weights")?, k, n, "weights")?;
        let b = slice(sb, lb, "bias")?;
        let mut y: Vec<f32> = Vec::with_capacity(m * n);
        for _ in 0..m {
            y.extend_from_slice(b);
        }
        add_product(x, w, &mut y);
        if self.relu {
            y.iter_mut().for_each(|v| *v = v.max(0.0));
        }
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, k) = x.dims2()?;
        let n = w.dim(1)?;
        let grad_y = grad_y.contiguous()?;
        // The gradient through ReLU: zero where the output was clipped (y = max(z, 0) > 0 exactly when z > 0;
        // at z = 0 the gradient is 0, see the module's note).
        let g: Vec<f32> = {
            let (gs, gl) = grad_y.storage_and_layout();
            let Storage::Cpu(gs) = &*gs else { return Err(msg("the gradient is not on the CPU".into())) };
            let gy = slice(gs, gl, "output gradient")?;
            if self.relu {
                let (ys, yl) = y.storage_and_layout();
                let Storage::Cpu(ys) = &*ys else { return Err(msg("the output is not on the CPU".into())) };
                gy.iter().zip(slice(ys, yl, "output")?).map(|(g, y)| if *y > 0.0 { *g } else { 0.0 }).collect()
            } else {
                gy.to_vec()
            }
        };
        let gm = matrix(&g, m, n, "output gradient")?;
        let grad_b = b.track_op().then(|| {
            let mut sums = vec![0f32; n];
            for row in g.chunks_exact(n.max(1)) {
                sums.iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
            sums
        });
        let (grad_x, grad_w) = {
            let (xs, xl) = x.storage_and_layout();
            let Storage::Cpu(xs) = &*xs else { return Err(msg("x is not on the CPU".into())) };
            let xm = matrix(slice(xs, xl, "x")?, m, k, "x")?;
            let (ws, wl) = w.storage_and_layout();
            let Storage::Cpu(ws) = &*ws else { return Err(msg("the weights are not on the CPU".into())) };
            let wm = matrix(slice(ws, wl, "weights")?, k, n, "weights")?;
            // dL/dx = g·Wᵀ, by rows of x; dL/dW = xᵀ·g, by rows of W.
            let grad_x = x.track_op().then(|| {
                let mut out = vec![0f32; m * k];
                add_product(gm, wm.t(), &mut out);
                out
            });
            let grad_w = w.track_op().then(|| {
                let mut out = vec![0f32; k * n];
                add_product(xm.t(), gm, &mut out);
                out
            });
            (grad_x, grad_w)
        };
        let dev = x.device();
        Ok((
            grad_x.map(|v| Tensor::from_vec(v, (m, k), dev)).transpose()?,
            grad_w.map(|v| Tensor::from_vec(v, (k, n), dev)).transpose()?,
            grad_b.map(|v| Tensor::from_vec(v, n, dev)).transpose()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn random(rng: &mut StdRng, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn close(a: &Tensor, b: &Tensor, what: &str) {
        let (a, b) =
            (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (i, (p, q)) in a.iter().zip(&b).enumerate() {
            assert!((p - q).abs() <= 1e-4 * (1.0 + q.abs()), "{what}[{i}]: {p} against candle's {q}");
        }
    }

    /// The fused op against candle's own product, broadcast add and ReLU: outputs and all three gradients,
    /// with and without ReLU, on one thread and split over four, for a batch that does not divide evenly.
    #[test]
    fn forward_and_gradients_match_candles_own_ops() {
        let mut rng = StdRng::seed_from_u64(3);
        for threads in [1, 4] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for relu in [true, false] {
                let (m, k, n) = (203, 17, 9);
                let x = Var::from_tensor(&random(&mut rng, &[m, k])).unwrap();
                let w = Var::from_tensor(&random(&mut rng, &[k, n])).unwrap();
                let b = Var::from_tensor(&random(&mut rng, &[n])).unwrap();
                let target = random(&mut rng, &[m, n]);
                let loss_of = |y: Tensor| y.sub(&target).unwrap().sqr().unwrap().mean_all().unwrap();
                let ours = pool.install(|| forward(x.as_tensor(), w.as_tensor(), b.as_tensor(), relu).unwrap());
                let mut theirs = x.as_tensor().matmul(w.as_tensor()).unwrap().broadcast_add(b.as_tensor()).unwrap();
                if relu {
                    theirs = theirs.relu().unwrap();
                }
                close(&ours, &theirs, "output");
                let g_ours = pool.install(|| loss_of(ours).backward().unwrap());
                let g_theirs = loss_of(theirs).backward().unwrap();
                for (v, name) in [(&x, "dx"), (&w, "dW"), (&b, "db")] {
                    close(g_ours.get(v.as_tensor()).unwrap(), g_theirs.get(v.as_tensor()).unwrap(), name);
                }
            }
        }
    }

    /// An input that tracks no gradient (the data) gets none, and the op runs the same either way.
    #[test]
    fn data_without_a_gradient_gets_none() {
        let mut rng = StdRng::seed_from_u64(4);
        let x = random(&mut rng, &[64, 5]);
        let w = Var::from_tensor(&random(&mut rng, &[5, 3])).unwrap();
        let b = Var::from_tensor(&random(&mut rng, &[3])).unwrap();
        let grads = forward(&x, w.as_tensor(), b.as_tensor(), true).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        assert!(grads.get(w.as_tensor()).is_some() && grads.get(b.as_tensor()).is_some());
    }

    #[test]
    fn shapes_that_do_not_fit_are_an_error_that_says_so() {
        let mut rng = StdRng::seed_from_u64(5);
        let err = forward(&random(&mut rng, &[4, 3]), &random(&mut rng, &[2, 5]), &random(&mut rng, &[5]), true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("x [4, 3], weights [2, 5] and bias [5] do not fit"), "{err}");
    }
}
