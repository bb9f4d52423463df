//! `SVMRegressor` (scikit-learn's `OneClassSVM`, `SVR`) as core operators: the kernel between the input
//! rows and the support vectors as matrix products, then the weighted sum and `rho`.

use super::graph::{Attrs, Emit, FLOAT};
use super::ops::{input, output};
use super::RewriteError;
use tract_onnx::pb::NodeProto;

pub(crate) fn regressor(node: &NodeProto, e: &mut Emit) -> Result<(), RewriteError> {
    let a = Attrs::of(node);
    let coef = a.floats("coefficients")?;
    let rho = a.floats("rho")?;
    let sv = a.floats("support_vectors")?;
    let n_sv = a.int("n_supports", 0);
    let params = a.floats("kernel_params")?;
    let kernel = a.string("kernel_type", "LINEAR");
    let post = a.string("post_transform", "NONE");
    if post != "NONE" {
        return Err(a.err(format!("post transform {post}: only NONE is supported")));
    }
    let rho = *rho.first().unwrap_or(&0.0);
    let x = e.cast(input(node, 0)?, FLOAT);
    let rho_c = e.floats(&[1], vec![rho]);
    // No support vectors: a linear model whose coefficients are the weights.
    let score = if n_sv <= 0 {
        let w = e.floats(&[coef.len() as i64, 1], coef);
        let xw = e.op("MatMul", &[&x, &w], vec![]);
        e.op("Add", &[&xw, &rho_c], vec![])
    } else {
        let n = n_sv as usize;
        if coef.len() != n || sv.is_empty() || sv.len() % n != 0 {
            return Err(a.err(format!(
                "{} coefficients and {} support-vector values for {n} support vectors",
                coef.len(),
                sv.len()
            )));
        }
        let width = sv.len() / n;
        let (gamma, coef0, degree) =
            (*params.first().unwrap_or(&0.0), *params.get(1).unwrap_or(&0.0), *params.get(2).unwrap_or(&0.0));
        // Support vectors transposed, `[width, n]`, so that `x · svᵀ` is one MatMul.
        let mut svt = vec![0.0f32; sv.len()];
        for s in 0..n {
            for f in 0..width {
                svt[f * n + s] = sv[s * width + f];
            }
        }
        let svt_c = e.floats(&[width as i64, n as i64], svt);
        let dot = e.op("MatMul", &[&x, &svt_c], vec![]);
        let k = match kernel.as_str() {
            "LINEAR" => dot,
            "POLY" | "SIGMOID" => {
                let g = e.floats(&[], vec![gamma]);
                let c = e.floats(&[], vec![coef0]);
                let scaled = e.op("Mul", &[&dot, &g], vec![]);
                let shifted = e.op("Add", &[&scaled, &c], vec![]);
                if kernel == "SIGMOID" {
                    e.op("Tanh", &[&shifted], vec![])
                } else {
                    let d = e.floats(&[], vec![degree]);
                    e.op("Pow", &[&shifted, &d], vec![])
                }
            }
            "RBF" => {
                // ‖x − s‖² = ‖x‖² − 2 x·s + ‖s‖².
                let ones = e.floats(&[width as i64, 1], vec![1.0; width]);
                let xx = e.op("Mul", &[&x, &x], vec![]);
                let x_norm = e.op("MatMul", &[&xx, &ones], vec![]);
                let s_norm: Vec<f32> = sv.chunks_exact(width).map(|s| s.iter().map(|v| v * v).sum()).collect();
                let s_norm = e.floats(&[n as i64], s_norm);
                let minus_two = e.floats(&[], vec![-2.0]);
                let cross = e.op("Mul", &[&dot, &minus_two], vec![]);
                let partial = e.op("Add", &[&cross, &x_norm], vec![]);
                let dist = e.op("Add", &[&partial, &s_norm], vec![]);
                let zero = e.floats(&[], vec![0.0]);
                let dist = e.op("Max", &[&dist, &zero], vec![]);
                let minus_gamma = e.floats(&[], vec![-gamma]);
                let arg = e.op("Mul", &[&dist, &minus_gamma], vec![]);
                e.op("Exp", &[&arg], vec![])
            }
            other => return Err(a.err(format!("kernel {other}: LINEAR, POLY, RBF and SIGMOID are supported"))),
        };
        let c = e.floats(&[n as i64, 1], coef);
        let weighted = e.op("MatMul", &[&k, &c], vec![]);
        e.op("Add", &[&weighted, &rho_c], vec![])
    };
    if a.int("one_class", 0) != 0 {
        // A one-class SVM's decision: +1 inside, −1 outside.
        let zero = e.floats(&[], vec![0.0]);
        let (plus, minus) = (e.floats(&[], vec![1.0]), e.floats(&[], vec![-1.0]));
        let inside = e.op("Greater", &[&score, &zero], vec![]);
        e.op_into("Where", &[&inside, &plus, &minus], vec![], output(node)?);
    } else {
        e.op_into("Identity", &[&score], vec![], output(node)?);
    }
    Ok(())
}
