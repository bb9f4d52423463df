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
