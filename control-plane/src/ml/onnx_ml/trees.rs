//! `TreeEnsembleRegressor` as core operators.
//!
//! Every node of every tree gets a global index; per index, tables hold the feature it tests, its threshold,
//! and the index of its true and false child (a leaf points at itself). The walk keeps one current index per
//! tree and per row, `[N, trees]`, and takes one step per level of the deepest tree:
//! `feature = Gather(features, node)`, `x = GatherElements(X, feature, 1)`, `cond = x ≤ threshold` (the node's
//! mode), `node = Where(cond, Gather(true, node), Gather(false, node))`. The leaves' values are then
//! gathered per target and summed over the trees with a `MatMul` against ones (or `1/trees` to average).
//! The graph grows with depth, not with the number of nodes, and the tables are as large as the trees.

use super::graph::{attr_int, Attrs, Emit, FLOAT};
use super::ops::{input, output};
use super::RewriteError;
use std::collections::{BTreeMap, HashMap};
use tract_onnx::pb::NodeProto;

/// A tree node's test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Leq,
    Lt,
    Gte,
    Gt,
    Eq,
    Neq,
    Leaf,
}

impl Mode {
    fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "BRANCH_LEQ" => Mode::Leq,
            "BRANCH_LT" => Mode::Lt,
            "BRANCH_GTE" => Mode::Gte,
            "BRANCH_GT" => Mode::Gt,
            "BRANCH_EQ" => Mode::Eq,
            "BRANCH_NEQ" => Mode::Neq,
            "LEAF" => Mode::Leaf,
            _ => return None,
        })
    }

    /// The comparison of `x` with `t` that sends a row to the true child.
    fn compare(self, e: &mut Emit, x: &str, t: &str) -> String {
        match self {
            Mode::Lt => e.op("Less", &[x, t], vec![]),
            Mode::Gt => e.op("Greater", &[x, t], vec![]),
            Mode::Eq | Mode::Leaf => e.op("Equal", &[x, t], vec![]),
            Mode::Neq => {
                let eq = e.op("Equal", &[x, t], vec![]);
                e.op("Not", &[&eq], vec![])
            }
            // `Or(<, =)` rather than `LessOrEqual`: the same answer for NaN (false), in every opset.
            Mode::Leq | Mode::Gte => {
                let strict = e.op(if self == Mode::Leq { "Less" } else { "Greater" }, &[x, t], vec![]);
                let eq = e.op("Equal", &[x, t], vec![]);
                e.op("Or", &[&strict, &eq], vec![])
            }
        }
    }
}

/// The ensemble, flattened to tables indexed by global node.
struct Flat {
    feature: Vec<i64>,
    threshold: Vec<f32>,
    true_next: Vec<i64>,
    false_next: Vec<i64>,
    mode: Vec<Mode>,
    nan_true: Vec<bool>,
    /// Global index of each tree's root, trees in id order.
    roots: Vec<i64>,
    depth: usize,
}

fn flatten(a: &Attrs) -> Result<Flat, RewriteError> {
    let trees = a.ints("nodes_treeids");
    let ids = a.ints("nodes_nodeids");
    let features = a.ints("nodes_featureids");
    let modes = a.strings("nodes_modes");
    let values = a.floats("nodes_values")?;
    let trues = a.ints("nodes_truenodeids");
    let falses = a.ints("nodes_falsenodeids");
    let nan_true = a.ints("nodes_missing_value_tracks_true");
    let n = trees.len();
    if n == 0 {
        return Err(a.err("no nodes"));
    }
    for (name, len) in [
        ("nodes_nodeids", ids.len()),
        ("nodes_featureids", features.len()),
        ("nodes_modes", modes.len()),
        ("nodes_values", values.len()),
        ("nodes_truenodeids", trues.len()),
        ("nodes_falsenodeids", falses.len()),
    ] {
        if len != n {
            return Err(a.err(format!("`{name}` has {len} entries for {n} nodes")));
        }
    }
    if !nan_true.is_empty() && nan_true.len() != n {
        return Err(a.err(format!("`nodes_missing_value_tracks_true` has {} entries for {n} nodes", nan_true.len())));
    }
    let mut index = HashMap::with_capacity(n);
    for (g, (&t, &i)) in trees.iter().zip(&ids).enumerate() {
        if index.insert((t, i), g as i64).is_some() {
            return Err(a.err(format!("node {i} of tree {t} is listed twice")));
        }
    }
    let mut flat = Flat {
        feature: vec![0; n],
        threshold: values,
        true_next: vec![0; n],
        false_next: vec![0; n],
        mode: Vec::with_capacity(n),
        nan_true: (0..n).map(|g| nan_true.get(g).is_some_and(|&v| v != 0)).collect(),
        roots: Vec::new(),
        depth: 0,
    };
    let mut referenced = vec![false; n];
    for g in 0..n {
        let mode = Mode::parse(&modes[g]).ok_or_else(|| a.err(format!("node mode `{}` is unknown", modes[g])))?;
        flat.mode.push(mode);
        if mode == Mode::Leaf {
            (flat.true_next[g], flat.false_next[g]) = (g as i64, g as i64);
            continue;
        }
        if features[g] < 0 {
            return Err(a.err(format!("node {} of tree {} tests feature {}", ids[g], trees[g], features[g])));
        }
        flat.feature[g] = features[g];
        for (child, slot) in [(trues[g], &mut flat.true_next[g]), (falses[g], &mut flat.false_next[g])] {
            let c = *index
                .get(&(trees[g], child))
                .ok_or_else(|| a.err(format!("node {} of tree {} points at missing node {child}", ids[g], trees[g])))?;
            referenced[c as usize] = true;
            *slot = c;
        }
    }
    let mut roots = BTreeMap::new();
    for g in (0..n).filter(|&g| !referenced[g]) {
        if roots.insert(trees[g], g as i64).is_some() {
            return Err(a.err(format!("tree {} has more than one root", trees[g])));
        }
    }
    if roots.len() != trees.iter().collect::<std::collections::BTreeSet<_>>().len() {
        return Err(a.err("a tree has no root (its nodes form a cycle)"));
    }
    flat.roots = roots.into_values().collect();
    flat.depth = depth(&flat).ok_or_else(|| a.err("a tree's nodes form a cycle"))?;
    Ok(flat)
}

/// Depth of the deepest tree in edges, or `None` when a walk revisits a node.
fn depth(f: &Flat) -> Option<usize> {
    let n = f.mode.len();
    let mut deepest = 0;
    let mut stack: Vec<(usize, usize)> = f.roots.iter().map(|&r| (r as usize, 0)).collect();
    let mut seen = vec![false; n];
    while let Some((g, d)) = stack.pop() {
        if std::mem::replace(&mut seen[g], true) {
            return None;
        }
        deepest = deepest.max(d);
        if f.mode[g] != Mode::Leaf {
            stack.push((f.true_next[g] as usize, d + 1));
            stack.push((f.false_next[g] as usize, d + 1));
        }
    }
    Some(deepest)
}

/// `TreeEnsembleRegressor` (ai.onnx.ml 1 and 3).
pub(crate) fn regressor(node: &NodeProto, e: &mut Emit) -> Result<(), RewriteError> {
    let a = Attrs::of(node);
    let flat = flatten(&a)?;
    let targets = a.int("n_targets", 1);
    if !(1..=1024).contains(&targets) {
        return Err(a.err(format!("`n_targets` is {targets}")));
    }
    let targets = targets as usize;
    let scale = aggregate_scale(&a, flat.roots.len())?;
    let leaves = leaf_values(&a, &flat, targets)?;
    let base = a.floats("base_values")?;
    if !base.is_empty() && base.len() != targets {
        return Err(a.err(format!("{} base values for {targets} targets", base.len())));
    }
    let post = a.string("post_transform", "NONE");
    if !matches!(post.as_str(), "NONE" | "LOGISTIC" | "SOFTMAX") {
        return Err(a.err(format!("post transform {post}: NONE, LOGISTIC and SOFTMAX are supported")));
    }

    let x = e.cast(input(node, 0)?, FLOAT);
    let node_at = walk(e, &flat, &x);
    let n = flat.mode.len() as i64;
    let trees = flat.roots.len() as i64;
    let ones = e.floats(&[trees, 1], vec![scale; flat.roots.len()]);
    let mut sums = Vec::with_capacity(targets);
    for table in leaves {
        let table = e.floats(&[n], table);
        let per_tree = e.gather(&table, &node_at, 0);
        sums.push(e.op("MatMul", &[&per_tree, &ones], vec![]));
    }
    let mut y = if sums.len() == 1 {
        sums.pop().unwrap()
    } else {
        let refs: Vec<&str> = sums.iter().map(String::as_str).collect();
        e.op("Concat", &refs, vec![attr_int("axis", 1)])
    };
    if !base.is_empty() {
        let base = e.floats(&[targets as i64], base);
        y = e.op("Add", &[&y, &base], vec![]);
    }
    match post.as_str() {
        "LOGISTIC" => e.op_into("Sigmoid", &[&y], vec![], output(node)?),
        "SOFTMAX" => e.op_into("Softmax", &[&y], vec![attr_int("axis", 1)], output(node)?),
        _ => e.op_into("Identity", &[&y], vec![], output(node)?),
    }
    Ok(())
}

/// What each tree's value is multiplied by: 1 to sum, 1/trees to average.
fn aggregate_scale(a: &Attrs, trees: usize) -> Result<f32, RewriteError> {
    match a.string("aggregate_function", "SUM").as_str() {
        "SUM" => Ok(1.0),
        "AVERAGE" => Ok(1.0 / trees as f32),
        other => Err(a.err(format!("aggregate function {other}: only SUM and AVERAGE are supported"))),
    }
}

/// Whether a node can join a merged walk: one target, no post transform.
pub(crate) fn mergeable(node: &NodeProto) -> bool {
    let a = Attrs::of(node);
    a.int("n_targets", 1) == 1 && a.string("post_transform", "NONE") == "NONE"
}

/// One ensemble of a merged walk: the node, and the columns of the walk's input its features name (`None`: the
/// same columns).
pub(crate) struct Member<'a> {
    pub node: &'a NodeProto,
    pub columns: Option<Vec<i64>>,
}

/// Several single-target ensembles reading the same tensor, directly or through a constant column `Gather`
/// (skl2onnx makes one ensemble per tree of a forest, each behind its own `Gather`): one walk over all their
/// trees, then one `MatMul` that sums each ensemble's trees into its own column, and a `Gather` of the column
/// into each ensemble's output. A forest of 100 trees walks once instead of 100 times.
pub(crate) fn regressors_merged(input: &str, members: &[Member], e: &mut Emit) -> Result<(), RewriteError> {
    let mut all = Flat {
        feature: Vec::new(),
        threshold: Vec::new(),
        true_next: Vec::new(),
        false_next: Vec::new(),
        mode: Vec::new(),
        nan_true: Vec::new(),
        roots: Vec::new(),
        depth: 0,
    };
    let (mut leaves, mut owner, mut bases) = (Vec::new(), Vec::new(), Vec::new());
    for (j, m) in members.iter().enumerate() {
        let a = Attrs::of(m.node);
        let mut flat = flatten(&a)?;
        if let Some(columns) = &m.columns {
            for (g, f) in flat.feature.iter_mut().enumerate() {
                if flat.mode[g] == Mode::Leaf {
                    continue;
                }
                *f = *usize::try_from(*f).ok().and_then(|i| columns.get(i)).ok_or_else(|| {
                    a.err(format!("a node tests feature {f}, but its input has {} columns", columns.len()))
                })?;
            }
        }
        let values = leaf_values(&a, &flat, 1)?.pop().expect("one target");
        let scale = aggregate_scale(&a, flat.roots.len())?;
        let base = a.floats("base_values")?;
        if base.len() > 1 {
            return Err(a.err(format!("{} base values for one target", base.len())));
        }
        let offset = all.mode.len() as i64;
        all.feature.extend(flat.feature);
        all.threshold.extend(flat.threshold);
        all.true_next.extend(flat.true_next.iter().map(|g| g + offset));
        all.false_next.extend(flat.false_next.iter().map(|g| g + offset));
        all.mode.extend(flat.mode);
        all.nan_true.extend(flat.nan_true);
        owner.extend(std::iter::repeat_n((j, scale), flat.roots.len()));
        all.roots.extend(flat.roots.iter().map(|g| g + offset));
        all.depth = all.depth.max(flat.depth);
        leaves.extend(values);
        bases.push(base.first().copied().unwrap_or(0.0));
    }
    let x = e.cast(input, FLOAT);
    let node_at = walk(e, &all, &x);
    let table = e.floats(&[all.mode.len() as i64], leaves);
    let per_tree = e.gather(&table, &node_at, 0);
    let (trees, groups) = (owner.len(), members.len());
    let mut select = vec![0.0f32; trees * groups];
    for (t, &(j, scale)) in owner.iter().enumerate() {
        select[t * groups + j] = scale;
    }
    let select = e.floats(&[trees as i64, groups as i64], select);
    let sums = e.op("MatMul", &[&per_tree, &select], vec![]);
    let base = e.floats(&[groups as i64], bases);
    let y = e.op("Add", &[&sums, &base], vec![]);
    for (j, m) in members.iter().enumerate() {
        let column = e.ints(&[1], vec![j as i64]);
        e.op_into("Gather", &[&y, &column], vec![attr_int("axis", 1)], output(m.node)?);
    }
    Ok(())
}

/// The leaves' values per target, indexed by global node.
fn leaf_values(a: &Attrs, f: &Flat, targets: usize) -> Result<Vec<Vec<f32>>, RewriteError> {
    let trees = a.ints("target_treeids");
    let nodes = a.ints("target_nodeids");
    let ids = a.ints("target_ids");
    let weights = a.floats("target_weights")?;
    if [nodes.len(), ids.len(), weights.len()].iter().any(|&l| l != trees.len()) {
        return Err(a.err("`target_treeids`, `target_nodeids`, `target_ids` and `target_weights` differ in length"));
    }
    let index: HashMap<(i64, i64), usize> =
        a.ints("nodes_treeids").into_iter().zip(a.ints("nodes_nodeids")).enumerate().map(|(g, k)| (k, g)).collect();
    let mut out = vec![vec![0.0f32; f.mode.len()]; targets];
    for i in 0..trees.len() {
        let g = *index
            .get(&(trees[i], nodes[i]))
            .ok_or_else(|| a.err(format!("a weight names missing node {} of tree {}", nodes[i], trees[i])))?;
        let t = usize::try_from(ids[i])
            .ok()
            .filter(|&t| t < targets)
            .ok_or_else(|| a.err(format!("a weight names target {} of {targets}", ids[i])))?;
        out[t][g] += weights[i];
    }
    Ok(out)
}

/// Emits the walk from the roots to the leaves; returns the `[N, trees]` leaf indices.
fn walk(e: &mut Emit, f: &Flat, x: &str) -> String {
    let n = f.mode.len() as i64;
    let feature = e.ints(&[n], f.feature.clone());
    let threshold = e.floats(&[n], f.threshold.clone());
    let true_next = e.ints(&[n], f.true_next.clone());
    let false_next = e.ints(&[n], f.false_next.clone());
    let mut modes: Vec<Mode> = f.mode.iter().copied().filter(|&m| m != Mode::Leaf).collect();
    modes.sort();
    modes.dedup();
    let codes = (modes.len() > 1)
        .then(|| e.ints(&[n], f.mode.iter().map(|m| modes.iter().position(|x| x == m).unwrap_or(0) as i64).collect()));
    let nan = f.nan_true.iter().any(|&b| b).then(|| e.ints(&[n], f.nan_true.iter().map(|&b| b as i64).collect()));
    let mut node = e.ints(&[f.roots.len() as i64], f.roots.clone());
    // One step at least: the first makes the indices `[N, trees]`; a leaf's further steps keep it.
    for step in 0..f.depth.max(1) {
        let feat = e.gather(&feature, &node, 0);
        let xv = if step == 0 {
            e.gather(x, &feat, 1)
        } else {
            e.op("GatherElements", &[x, &feat], vec![attr_int("axis", 1)])
        };
        let t = e.gather(&threshold, &node, 0);
        let mut cond = match &codes {
            None => modes.first().copied().unwrap_or(Mode::Leaf).compare(e, &xv, &t),
            Some(codes) => {
                let code = e.gather(codes, &node, 0);
                let mut acc = modes[0].compare(e, &xv, &t);
                for (i, m) in modes.iter().enumerate().skip(1) {
                    let c = e.ints(&[], vec![i as i64]);
                    let is = e.op("Equal", &[&code, &c], vec![]);
                    let cmp = m.compare(e, &xv, &t);
                    acc = e.op("Where", &[&is, &cmp, &acc], vec![]);
                }
                acc
            }
        };
        if let Some(nan) = &nan {
            let tracks = e.gather(nan, &node, 0);
            let one = e.ints(&[], vec![1]);
            let tracks = e.op("Equal", &[&tracks, &one], vec![]);
            let missing = e.op("IsNaN", &[&xv], vec![]);
            let goes = e.op("And", &[&missing, &tracks], vec![]);
            cond = e.op("Or", &[&cond, &goes], vec![]);
        }
        let yes = e.gather(&true_next, &node, 0);
        let no = e.gather(&false_next, &node, 0);
        node = e.op("Where", &[&cond, &yes, &no], vec![]);
    }
    node
}

#[cfg(test)]
mod tests {
    //! Random ensembles, rewritten and run by tract, against a direct walk of the same trees: every mode,
    //! missing values that track true, several targets, sums and averages, base values, node and tree ids
    //! out of order, and ensembles merged behind column `Gather`s.

    use super::super::graph::{attr_int, FLOAT, INT64};
    use super::super::{prepare, ScoreSpec};
    use crate::ml::training::onnx::run_tract;
    use prost::Message;
    use rand::{Rng, SeedableRng};
    use tract_onnx::pb::{self, attribute_proto::AttributeType, type_proto, AttributeProto, NodeProto};

    const MODES: [&str; 6] = ["BRANCH_LEQ", "BRANCH_LT", "BRANCH_GTE", "BRANCH_GT", "BRANCH_EQ", "BRANCH_NEQ"];

    struct TreeNode {
        id: i64,
        mode: &'static str,
        feature: usize,
        value: f32,
        nan_true: bool,
        yes: usize,
        no: usize,
        weights: Vec<(usize, f32)>,
    }

    /// One random ensemble: trees of nodes (indices into `nodes`), with ids shuffled.
    struct Ensemble {
        trees: Vec<(i64, Vec<TreeNode>)>,
        targets: usize,
        average: bool,
        base: Vec<f32>,
        /// The input columns it reads (through a `Gather`), or all of them.
        columns: Option<Vec<i64>>,
    }

    fn grow(
        rng: &mut rand::rngs::StdRng,
        nodes: &mut Vec<TreeNode>,
        depth: usize,
        width: usize,
        targets: usize,
        grid: &[f32],
    ) -> usize {
        let i = nodes.len();
        let leaf = depth == 0 || rng.gen_bool(0.25);
        nodes.push(TreeNode {
            id: 0,
            mode: if leaf { "LEAF" } else { MODES[rng.gen_range(0..MODES.len())] },
            feature: rng.gen_range(0..width),
            value: grid[rng.gen_range(0..grid.len())],
            nan_true: rng.gen_bool(0.5),
            yes: i,
            no: i,
            weights: if leaf {
                (0..rng.gen_range(1..3)).map(|_| (rng.gen_range(0..targets), rng.gen_range(-2.0..2.0))).collect()
            } else {
                vec![]
            },
        });
        if !leaf {
            let yes = grow(rng, nodes, depth - 1, width, targets, grid);
            let no = grow(rng, nodes, depth - 1, width, targets, grid);
            (nodes[i].yes, nodes[i].no) = (yes, no);
        }
        i
    }

    fn random_ensemble(rng: &mut rand::rngs::StdRng, width: usize, grid: &[f32], merged: bool) -> Ensemble {
        let targets = if merged { 1 } else { rng.gen_range(1..3) };
        let columns =
            merged.then(|| (0..rng.gen_range(1..=width)).map(|_| rng.gen_range(0..width as i64)).collect::<Vec<_>>());
        let read = columns.as_ref().map_or(width, |c| c.len());
        let trees = (0..rng.gen_range(1..4))
            .map(|t| {
                let mut nodes = Vec::new();
                let depth = rng.gen_range(0..5);
                grow(rng, &mut nodes, depth, read, targets, grid);
                // Ids out of order: a shuffled permutation, offset.
                let mut ids: Vec<i64> = (0..nodes.len() as i64).map(|i| i * 3 + 5).collect();
                for i in (1..ids.len()).rev() {
                    ids.swap(i, rng.gen_range(0..=i));
                }
                for (n, id) in nodes.iter_mut().zip(ids) {
                    n.id = id;
                }
                (t as i64 * 7 + 2, nodes)
            })
            .collect();
        let base = if rng.gen_bool(0.5) { (0..targets).map(|_| rng.gen_range(-1.0..1.0)).collect() } else { vec![] };
        Ensemble { trees, targets, average: rng.gen_bool(0.5), base, columns }
    }

    fn goes_true(n: &TreeNode, x: f32) -> bool {
        if x.is_nan() && n.nan_true {
            return true;
        }
        match n.mode {
            "BRANCH_LEQ" => x <= n.value,
            "BRANCH_LT" => x < n.value,
            "BRANCH_GTE" => x >= n.value,
            "BRANCH_GT" => x > n.value,
            "BRANCH_EQ" => x == n.value,
            _ => x != n.value,
        }
    }

    /// The ensemble's outputs for one row, walking the trees directly.
    fn reference(e: &Ensemble, row: &[f32]) -> Vec<f32> {
        let x: Vec<f32> = match &e.columns {
            Some(c) => c.iter().map(|&i| row[i as usize]).collect(),
            None => row.to_vec(),
        };
        let mut out = vec![0.0f32; e.targets];
        for (_, nodes) in &e.trees {
            let mut at = 0;
            while nodes[at].mode != "LEAF" {
                at = if goes_true(&nodes[at], x[nodes[at].feature]) { nodes[at].yes } else { nodes[at].no };
            }
            for &(t, w) in &nodes[at].weights {
                out[t] += w;
            }
        }
        let scale = if e.average { 1.0 / e.trees.len() as f32 } else { 1.0 };
        out.iter().enumerate().map(|(t, v)| v * scale + e.base.get(t).copied().unwrap_or(0.0)).collect()
    }

    fn ints(name: &str, v: Vec<i64>) -> AttributeProto {
        AttributeProto { name: name.into(), r#type: AttributeType::Ints as i32, ints: v, ..Default::default() }
    }
    fn floats(name: &str, v: Vec<f32>) -> AttributeProto {
        AttributeProto { name: name.into(), r#type: AttributeType::Floats as i32, floats: v, ..Default::default() }
    }
    fn strings(name: &str, v: Vec<&str>) -> AttributeProto {
        let strings = v.into_iter().map(|s| s.as_bytes().to_vec()).collect();
        AttributeProto { name: name.into(), r#type: AttributeType::Strings as i32, strings, ..Default::default() }
    }
    fn string(name: &str, v: &str) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::String as i32,
            s: v.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    fn node_of(e: &Ensemble, input: &str, output: &str) -> NodeProto {
        let mut a: Vec<AttributeProto> = vec![attr_int("n_targets", e.targets as i64)];
        let all = || e.trees.iter().flat_map(|(t, nodes)| nodes.iter().map(move |n| (*t, n, nodes)));
        a.push(ints("nodes_treeids", all().map(|(t, _, _)| t).collect()));
        a.push(ints("nodes_nodeids", all().map(|(_, n, _)| n.id).collect()));
        a.push(ints("nodes_featureids", all().map(|(_, n, _)| n.feature as i64).collect()));
        a.push(strings("nodes_modes", all().map(|(_, n, _)| n.mode).collect()));
        a.push(floats("nodes_values", all().map(|(_, n, _)| n.value).collect()));
        a.push(ints(
            "nodes_truenodeids",
            all().map(|(_, n, ns)| if n.mode == "LEAF" { 0 } else { ns[n.yes].id }).collect(),
        ));
        a.push(ints(
            "nodes_falsenodeids",
            all().map(|(_, n, ns)| if n.mode == "LEAF" { 0 } else { ns[n.no].id }).collect(),
        ));
        a.push(ints("nodes_missing_value_tracks_true", all().map(|(_, n, _)| n.nan_true as i64).collect()));
        let weights: Vec<(i64, i64, usize, f32)> =
            all().flat_map(|(t, n, _)| n.weights.iter().map(move |&(k, w)| (t, n.id, k, w))).collect();
        a.push(ints("target_treeids", weights.iter().map(|w| w.0).collect()));
        a.push(ints("target_nodeids", weights.iter().map(|w| w.1).collect()));
        a.push(ints("target_ids", weights.iter().map(|w| w.2 as i64).collect()));
        a.push(floats("target_weights", weights.iter().map(|w| w.3).collect()));
        a.push(string("aggregate_function", if e.average { "AVERAGE" } else { "SUM" }));
        if !e.base.is_empty() {
            a.push(floats("base_values", e.base.clone()));
        }
        NodeProto {
            input: vec![input.into()],
            output: vec![output.into()],
            op_type: "TreeEnsembleRegressor".into(),
            domain: "ai.onnx.ml".into(),
            attribute: a,
            ..Default::default()
        }
    }

    /// A model of the ensembles, each behind its `Gather` when it has columns, outputs concatenated.
    fn model(ensembles: &[Ensemble], width: usize) -> Vec<u8> {
        let mut graph = pb::GraphProto::default();
        let mut outs = Vec::new();
        for (i, e) in ensembles.iter().enumerate() {
            let mut input = "X".to_string();
            if let Some(c) = &e.columns {
                let idx = format!("cols{i}");
                graph.initializer.push(pb::TensorProto {
                    name: idx.clone(),
                    dims: vec![c.len() as i64],
                    data_type: INT64,
                    int64_data: c.clone(),
                    ..Default::default()
                });
                input = format!("x{i}");
                graph.node.push(NodeProto {
                    input: vec!["X".into(), idx],
                    output: vec![input.clone()],
                    op_type: "Gather".into(),
                    attribute: vec![attr_int("axis", 1)],
                    ..Default::default()
                });
            }
            let out = format!("y{i}");
            graph.node.push(node_of(e, &input, &out));
            outs.push(out);
        }
        graph.node.push(NodeProto {
            input: outs,
            output: vec!["Y".into()],
            op_type: "Concat".into(),
            attribute: vec![attr_int("axis", 1)],
            ..Default::default()
        });
        let tensor = |dims: Vec<i64>| pb::TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: FLOAT,
                shape: Some(pb::TensorShapeProto {
                    dim: dims
                        .into_iter()
                        .map(|d| pb::tensor_shape_proto::Dimension {
                            value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(d)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        };
        graph.input.push(pb::ValueInfoProto {
            name: "X".into(),
            r#type: Some(tensor(vec![1, width as i64])),
            ..Default::default()
        });
        graph.output.push(pb::ValueInfoProto {
            name: "Y".into(),
            r#type: Some(pb::TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor { elem_type: FLOAT, shape: None })),
                ..Default::default()
            }),
            ..Default::default()
        });
        pb::ModelProto {
            ir_version: 8,
            opset_import: vec![
                pb::OperatorSetIdProto { domain: String::new(), version: 17 },
                pb::OperatorSetIdProto { domain: "ai.onnx.ml".into(), version: 3 },
            ],
            graph: Some(graph),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn random_ensembles_give_what_a_direct_walk_gives() {
        let width = 4;
        let grid: Vec<f32> = vec![-2.0, -0.5, 0.0, 0.25, 1.0, 3.5];
        for seed in 0..40u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            // Half the models: several single-target ensembles behind column Gathers, merged into one walk.
            let merged = seed % 2 == 0;
            let ensembles: Vec<Ensemble> = (0..if merged { rng.gen_range(2..5) } else { 1 })
                .map(|_| random_ensemble(&mut rng, width, &grid, merged))
                .collect();
            let onnx = model(&ensembles, width);
            let served = prepare(&onnx, &ScoreSpec::default()).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            // Rows on the thresholds, between them, and missing.
            let rows: Vec<Vec<f32>> = (0..24)
                .map(|_| {
                    (0..width)
                        .map(|_| match rng.gen_range(0..4) {
                            0 => f32::NAN,
                            1 => rng.gen_range(-3.0..4.0),
                            _ => grid[rng.gen_range(0..grid.len())],
                        })
                        .collect()
                })
                .collect();
            let got = run_tract(&served.onnx, &rows).unwrap_or_else(|e| panic!("seed {seed}: tract: {e}"));
            let want: Vec<f32> = rows.iter().flat_map(|r| ensembles.iter().flat_map(|e| reference(e, r))).collect();
            assert_eq!(got.len(), want.len(), "seed {seed}");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "seed {seed} value {i}: tract {g}, direct walk {w}");
            }
        }
    }
}
