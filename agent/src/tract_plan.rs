//! The tract plan a model runs with.
//!
//! A model arrives typed for one feature vector, `[1, width]`, and tract optimises it for that shape. Its
//! optimiser does not always find the cheapest plan there: for a stack of dense layers it drops the unit
//! batch axis after the first layer, adds it back around every later product, and can then no longer fuse
//! their bias and ReLU into the product (the small autoencoder's plan has 28 nodes this way, 20 with the
//! batch left open). With the batch left open, though, it chooses its matrix kernels for any number of rows,
//! and for a product with few outputs that can be the slower choice (the forecaster's last layers).
//!
//! So a model whose batch axis is open (`[N, width]`: the control plane converts models that declare it so,
//! as every model it trains does) gets both plans: the one-row plan, with `N` bound to 1, and the open one,
//! run with one row. The agent keeps the open plan only where it gives the one-row plan's outputs on
//! [`PROBES`] inputs, and then keeps whichever runs faster here, timed in alternating rounds ([`quickest`]).
//! Measuring the two on the device itself is what generalises: which plan wins depends on the model's shapes
//! and on the CPU's kernels, and both are known only here. A model typed for one row runs its one-row plan,
//! as before.

use std::collections::HashMap;
use std::time::{Duration, Instant};
use tract_nnef::internal::*;

/// Probe inputs the two plans must agree on before the open-batch one may be used.
pub const PROBES: usize = 4;
/// Largest relative difference allowed between the two plans on a probe (relative to `max(1, |output|)`).
pub const AGREEMENT: f32 = 1e-4;
/// Timed rounds; each runs every plan back to back. With [`ROUND_BUDGET`], a small model's choice takes
/// about 25 ms at load; a model of 10 ms a call, about a quarter of a second.
const ROUNDS: usize = 11;
/// About how long one plan's share of a round lasts (at least one call, at most [`MAX_CALLS`]).
const ROUND_BUDGET: Duration = Duration::from_millis(1);
const MAX_CALLS: usize = 256;

/// Which plan a model runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanKind {
    /// Optimised for exactly one row.
    OneRow,
    /// Optimised for any number of rows, run with one.
    OpenBatch,
}

impl std::fmt::Display for PlanKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PlanKind::OneRow => "one-row",
            PlanKind::OpenBatch => "open-batch",
        })
    }
}

/// The state a model typed for `[1, width]` or `[N, width]` runs with, and which plan that is. A model
/// whose batch axis is a symbol gets both plans, the one-row plan with the symbol bound to 1; a model typed
/// for one row gets that plan alone.
pub fn fastest(model: TypedModel, width: usize) -> TractResult<(TypedSimpleState, PlanKind)> {
    let shape = model.input_fact(0)?.shape.to_tvec();
    ensure!(
        shape.len() == 2 && shape[1] == width.to_dim(),
        "the model's input is {shape:?}, not one row of {width} features"
    );
    let (one_row, open) = match &shape[0] {
        TDim::Val(1) => (model, None),
        TDim::Sym(n) => (model.set_symbols(&HashMap::from([(n.clone(), TDim::Val(1))]))?, Some(model)),
        other => bail!("the model's batch axis is {other}, neither 1 nor a symbol"),
    };
    let mut one_row = optimised_state(one_row)?;
    let Some(mut open) = open.and_then(|m| optimised_state(m).ok()) else {
        return Ok((one_row, PlanKind::OneRow));
    };
    if !agree(&mut one_row, &mut open, width).unwrap_or(false) {
        return Ok((one_row, PlanKind::OneRow));
    }
    let mut states = [one_row, open];
    let pick = match time(&mut states, width) {
        Ok(rounds) => quickest(&rounds),
        Err(_) => 0,
    };
    let [one_row, open] = states;
    Ok(if pick == 1 { (open, PlanKind::OpenBatch) } else { (one_row, PlanKind::OneRow) })
}

fn optimised_state(model: TypedModel) -> TractResult<TypedSimpleState> {
    TypedSimpleState::new(&model.into_optimized()?.into_runnable()?)
}

/// Deterministic probe inputs: spread values of both signs and a few scales.
fn probe(i: usize, width: usize) -> Vec<f32> {
    (0..width).map(|j| (((i * width + j) as f32 + 1.0) * 0.618).sin() * (1.0 + i as f32)).collect()
}

fn run(state: &mut TypedSimpleState, x: &[f32]) -> TractResult<Vec<f32>> {
    let out = state.run(tvec!(Tensor::from_shape(&[1, x.len()], x)?.into()))?;
    Ok(out[0].to_plain_array_view::<f32>()?.iter().copied().collect())
}

/// Whether the two plans give the same outputs on every probe, within [`AGREEMENT`].
fn agree(a: &mut TypedSimpleState, b: &mut TypedSimpleState, width: usize) -> TractResult<bool> {
    for i in 0..PROBES {
        let x = probe(i, width);
        let (ya, yb) = (run(a, &x)?, run(b, &x)?);
        // Equal (infinities included), or within the tolerance; a NaN on either side is never close.
        let close = |(p, q): (&f32, &f32)| p == q || (p.is_finite() && (p - q).abs() <= AGREEMENT * p.abs().max(1.0));
        if ya.len() != yb.len() || !ya.iter().zip(&yb).all(close) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Each plan's time for its share of every round, plans alternating within a round.
fn time(states: &mut [TypedSimpleState], width: usize) -> TractResult<Vec<Vec<Duration>>> {
    let x = probe(0, width);
    let mut slowest = Duration::from_nanos(1);
    for s in states.iter_mut() {
        run(s, &x)?;
        let t = Instant::now();
        run(s, &x)?;
        slowest = slowest.max(t.elapsed());
    }
    let calls = (ROUND_BUDGET.as_nanos() / slowest.as_nanos().max(1)).clamp(1, MAX_CALLS as u128) as usize;
    let mut rounds = vec![Vec::with_capacity(ROUNDS); states.len()];
    for _ in 0..ROUNDS {
        for (s, times) in states.iter_mut().zip(&mut rounds) {
            let t = Instant::now();
            for _ in 0..calls {
                run(s, &x)?;
            }
            times.push(t.elapsed());
        }
    }
    Ok(rounds)
}

/// The index of the plan with the lowest median round time; the first of equals, so the one-row plan (index
/// 0) keeps a tie.
pub fn quickest(rounds: &[Vec<Duration>]) -> usize {
    let median = |v: &Vec<Duration>| {
        let mut v = v.clone();
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or(Duration::MAX)
    };
    let medians: Vec<Duration> = rounds.iter().map(median).collect();
    (0..medians.len()).min_by_key(|&i| (medians[i], i)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn the_lowest_median_wins_and_a_tie_keeps_the_one_row_plan() {
        // One slow outlier round does not decide: medians 5 against 4.
        assert_eq!(quickest(&[ms(&[5, 5, 5, 5, 5]), ms(&[4, 4, 90, 4, 4])]), 1);
        assert_eq!(quickest(&[ms(&[3, 3, 3]), ms(&[4, 4, 1])]), 0);
        assert_eq!(quickest(&[ms(&[4, 4, 4]), ms(&[4, 4, 4])]), 0);
        assert_eq!(quickest(&[ms(&[4]), vec![]]), 0);
    }

    /// `[batch, 4]` through a dense layer of 3 with ReLU and a second of 1: one score a row.
    fn dense(open: bool) -> TypedModel {
        let mut m = TypedModel::default();
        let batch = if open { m.symbols.sym("N").to_dim() } else { 1.to_dim() };
        let x = m.add_source("features", f32::fact(&[batch, 4.to_dim()])).unwrap();
        let w = [[0.5f32, -1.0, 0.25], [1.0, 0.5, -0.5], [-0.25, 0.75, 1.0], [0.1, 0.2, 0.3]];
        let w = m.add_const("w", tensor2(&w)).unwrap();
        let matmul = || tract_core::ops::einsum::EinSum::new("mk,kn->mn".parse().unwrap(), f32::datum_type());
        let h = m.wire_node("h", matmul(), &[x, w]).unwrap();
        let zero = m.add_const("zero", tensor2(&[[0f32]])).unwrap();
        let h = m.wire_node("relu", tract_core::ops::math::max(), &[h[0], zero]).unwrap();
        let v = m.add_const("v", tensor2(&[[1.0f32], [-2.0], [0.5]])).unwrap();
        let y = m.wire_node("score", matmul(), &[h[0], v]).unwrap();
        m.select_output_outlets(&y).unwrap();
        m
    }

    // relu([1, 2, 3, 4] · w) = relu([2.15, 3.05, 3.45]); · v = 2.15 - 6.1 + 1.725.
    const EXPECTED: f32 = 2.15 - 6.1 + 1.725;

    #[test]
    fn a_model_typed_for_one_row_runs_its_one_row_plan() {
        let (mut state, kind) = fastest(dense(false), 4).unwrap();
        assert_eq!(kind, PlanKind::OneRow);
        assert!((run(&mut state, &[1.0, 2.0, 3.0, 4.0]).unwrap()[0] - EXPECTED).abs() < 1e-5);
    }

    #[test]
    fn a_model_with_an_open_batch_runs_either_plan_with_the_same_outputs() {
        let (mut state, kind) = fastest(dense(true), 4).unwrap();
        let y = run(&mut state, &[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!((y[0] - EXPECTED).abs() < 1e-5, "the {kind} plan gave {y:?}");
        // Its open plan really takes any number of rows.
        let mut open = optimised_state(dense(true)).unwrap();
        let rows = Tensor::from_shape(&[2, 4], &[1.0f32, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]).unwrap();
        assert_eq!(open.run(tvec!(rows.into())).unwrap()[0].shape(), &[2, 1]);
    }

    #[test]
    fn an_input_that_is_not_one_row_of_the_width_is_refused() {
        let e = fastest(dense(false), 5).unwrap_err();
        assert!(format!("{e:#}").contains("not one row of 5 features"), "{e:#}");
        let mut two = TypedModel::default();
        let x = two.add_source("features", f32::fact([2, 4])).unwrap();
        two.select_output_outlets(&[x]).unwrap();
        let e = fastest(two, 4).unwrap_err();
        assert!(format!("{e:#}").contains("batch axis is 2, neither 1 nor a symbol"), "{e:#}");
    }

    #[test]
    fn plans_that_disagree_on_a_probe_are_told_apart() {
        let (mut a, mut b) = (optimised_state(dense(false)).unwrap(), optimised_state(dense(true)).unwrap());
        assert!(agree(&mut a, &mut b, 4).unwrap());
        let mut other = dense(false);
        let v = other.node_by_name("v").unwrap().id;
        let changed = tensor2(&[[1.0f32], [-2.0], [0.6]]).into_arc_tensor();
        other.nodes[v].op = Box::new(tract_core::ops::konst::Const::new(changed).unwrap());
        assert!(!agree(&mut a, &mut optimised_state(other).unwrap(), 4).unwrap());
    }
}
