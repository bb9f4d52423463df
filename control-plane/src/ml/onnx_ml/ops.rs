//! The small ONNX-ML operators, each as a few core operators: `Scaler`, `ArrayFeatureExtractor` and
//! numeric `LabelEncoder`.

use super::graph::{attr_int, tensor_floats, tensor_ints, Attrs, Emit, FLOAT, INT64};
use super::RewriteError;
use tract_onnx::pb::NodeProto;

/// `Scaler`: `(x - offset) * scale`, per feature or one value for all, in float.
pub(crate) fn scaler(node: &NodeProto, e: &mut Emit) -> Result<(), RewriteError> {
    let a = Attrs::of(node);
    let offset = a.floats("offset")?;
    let scale = a.floats("scale")?;
    if offset.is_empty() || scale.is_empty() {
        return Err(a.err("needs both `offset` and `scale`"));
    }
    let x = e.cast(input(node, 0)?, FLOAT);
    let offset = e.floats(&[offset.len() as i64], offset);
    let scale = e.floats(&[scale.len() as i64], scale);
    let shifted = e.op("Sub", &[&x, &offset], vec![]);
    e.op_into("Mul", &[&shifted, &scale], vec![], output(node)?);
    Ok(())
}

/// `ArrayFeatureExtractor(x, indices)`: `Gather` along the last axis.
pub(crate) fn array_feature_extractor(node: &NodeProto, e: &mut Emit, opset: i64) -> Result<(), RewriteError> {
    // Negative axes came with opset 11; before it, the 2-D inputs scikit-learn's exports use.
    let axis = if opset >= 11 { -1 } else { 1 };
    e.op_into("Gather", &[input(node, 0)?, input(node, 1)?], vec![attr_int("axis", axis)], output(node)?);
    Ok(())
}

/// Largest span of integer keys looked up through a table; sparser keys are compared one by one.
const MAX_TABLE: i64 = 1 << 16;
/// Most keys compared one by one.
const MAX_COMPARED: usize = 512;

/// Keys or values of a `LabelEncoder`.
enum Numbers {
    Int(Vec<i64>),
    Float(Vec<f32>),
}

impl Numbers {
    fn len(&self) -> usize {
        match self {
            Numbers::Int(v) => v.len(),
            Numbers::Float(v) => v.len(),
        }
    }

    /// The constant of element `i`, as a scalar.
    fn scalar(&self, e: &mut Emit, i: usize) -> String {
        match self {
            Numbers::Int(v) => e.ints(&[], vec![v[i]]),
            Numbers::Float(v) => e.floats(&[], vec![v[i]]),
        }
    }
}

/// `LabelEncoder` with numeric keys and values (strings have no tensor type tract runs): a table lookup for
/// integer keys over a bounded span, else a chain of comparisons; unknown keys give the default.
pub(crate) fn label_encoder(node: &NodeProto, e: &mut Emit) -> Result<(), RewriteError> {
    let a = Attrs::of(node);
    let keys = numbers(&a, "keys")?;
    let values = numbers(&a, "values")?;
    if keys.len() != values.len() || keys.len() == 0 {
        return Err(a.err(format!("{} keys for {} values", keys.len(), values.len())));
    }
    let default = match (&values, a.tensor("default_tensor")) {
        (Numbers::Int(_), Some(t)) => Numbers::Int(
            tensor_ints(t).map_err(|r| a.err(format!("`default_tensor`: {r}")))?.into_iter().take(1).collect(),
        ),
        (Numbers::Float(_), Some(t)) => Numbers::Float(
            tensor_floats(t).map_err(|r| a.err(format!("`default_tensor`: {r}")))?.into_iter().take(1).collect(),
        ),
        (Numbers::Int(_), None) => Numbers::Int(vec![a.int("default_int64", -1)]),
        (Numbers::Float(_), None) => Numbers::Float(vec![a.float("default_float", 0.0)]),
    };
    if default.len() != 1 {
        return Err(a.err("`default_tensor` is empty"));
    }
    let (x, out) = (input(node, 0)?, output(node)?);
    let default_c = default.scalar(e, 0);
    match &keys {
        Numbers::Int(ints) if ints.iter().max().unwrap().abs_diff(*ints.iter().min().unwrap()) < MAX_TABLE as u64 => {
            let lo = *ints.iter().min().unwrap();
            let span = (ints.iter().max().unwrap() - lo + 1) as usize;
            let slot = |k: i64| (k - lo) as usize;
            let table = match (&values, &default) {
                (Numbers::Int(v), Numbers::Int(d)) => {
                    let mut t = vec![d[0]; span];
                    ints.iter().zip(v).for_each(|(&k, &v)| t[slot(k)] = v);
                    e.ints(&[span as i64], t)
                }
                (Numbers::Float(v), Numbers::Float(d)) => {
                    let mut t = vec![d[0]; span];
                    ints.iter().zip(v).for_each(|(&k, &v)| t[slot(k)] = v);
                    e.floats(&[span as i64], t)
                }
                _ => unreachable!("the default has the values' type"),
            };
            let (lo_c, span_c, zero) = (e.ints(&[], vec![lo]), e.ints(&[], vec![span as i64]), e.ints(&[], vec![0]));
            let xi = e.cast(x, INT64);
            let idx = e.op("Sub", &[&xi, &lo_c], vec![]);
            let below = e.op("Less", &[&idx, &zero], vec![]);
            let above = e.op("Less", &[&idx, &span_c], vec![]);
            let not_below = e.op("Not", &[&below], vec![]);
            let inside = e.op("And", &[&not_below, &above], vec![]);
            let safe = e.op("Where", &[&inside, &idx, &zero], vec![]);
            let found = e.gather(&table, &safe, 0);
            e.op_into("Where", &[&inside, &found, &default_c], vec![], out);
        }
        _ if keys.len() <= MAX_COMPARED => {
            let xk = e.cast(x, if matches!(keys, Numbers::Int(_)) { INT64 } else { FLOAT });
            let mut acc = default_c;
            for i in 0..keys.len() {
                let (k, v) = (keys.scalar(e, i), values.scalar(e, i));
                let hit = e.op("Equal", &[&xk, &k], vec![]);
                if i + 1 == keys.len() {
                    e.op_into("Where", &[&hit, &v, &acc], vec![], out);
                } else {
                    acc = e.op("Where", &[&hit, &v, &acc], vec![]);
                }
            }
        }
        _ => return Err(a.err(format!("{} sparse keys; at most {MAX_COMPARED} are supported", keys.len()))),
    }
    Ok(())
}

/// A `LabelEncoder`'s keys or values: `{what}_int64s`, `{what}_floats` or `{what}_tensor`.
fn numbers(a: &Attrs, what: &str) -> Result<Numbers, RewriteError> {
    if let Some(t) = a.tensor(&format!("{what}_tensor")) {
        return if t.data_type == INT64 {
            tensor_ints(t).map(Numbers::Int)
        } else {
            tensor_floats(t).map(Numbers::Float)
        }
        .map_err(|r| a.err(format!("`{what}_tensor`: {r}")));
    }
    let ints = a.ints(&format!("{what}_int64s"));
    if !ints.is_empty() {
        return Ok(Numbers::Int(ints));
    }
    let floats = a.floats(&format!("{what}_floats"))?;
    if !floats.is_empty() {
        return Ok(Numbers::Float(floats));
    }
    if !a.strings(&format!("{what}_strings")).is_empty() {
        return Err(a.err(format!("string {what}: only numeric keys and values are supported")));
    }
    Err(a.err(format!("no {what}")))
}

pub(crate) fn input(node: &NodeProto, i: usize) -> Result<&str, RewriteError> {
    node.input
        .get(i)
        .filter(|s| !s.is_empty())
        .map(String::as_str)
        .ok_or_else(|| RewriteError::node(node, format!("input {i} is missing")))
}

pub(crate) fn output(node: &NodeProto) -> Result<&str, RewriteError> {
    node.output.first().map(String::as_str).ok_or_else(|| RewriteError::node(node, "has no output"))
}
