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
            let (lo_c, span_c) = (e.ints(&[], vec![lo]), e.ints(&[], vec![span as i64]));
            let xi = e.cast(x, INT64);
            let (inside, found) = table_lookup(e, &xi, &lo_c, &span_c, None, &table);
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

/// Whether a `LabelEncoder` can join a batched lookup: integer keys over a bounded span, float values.
pub(crate) fn batchable_encoder(node: &NodeProto) -> bool {
    let a = Attrs::of(node);
    match (numbers(&a, "keys"), numbers(&a, "values")) {
        (Ok(Numbers::Int(k)), Ok(Numbers::Float(v))) => {
            k.len() == v.len()
                && !k.is_empty()
                && k.iter().max().unwrap().abs_diff(*k.iter().min().unwrap()) < MAX_TABLE as u64
        }
        _ => false,
    }
}

/// Batchable `LabelEncoder`s (see [`batchable_encoder`]), each reading a float `[N, 1]` tensor cast to int64
/// (skl2onnx's two per tree of an IsolationForest, after a merged walk): one lookup in one table for all of
/// them, then a `Gather` of each one's column into its output. `members` pairs each encoder with the float
/// tensor before its cast.
pub(crate) fn label_encoders_batched(members: &[(&NodeProto, String)], e: &mut Emit) -> Result<(), RewriteError> {
    let (mut table, mut lows, mut spans, mut offsets, mut defaults) = (vec![], vec![], vec![], vec![], vec![]);
    for (node, _) in members {
        let a = Attrs::of(node);
        let (Numbers::Int(keys), Numbers::Float(values)) = (numbers(&a, "keys")?, numbers(&a, "values")?) else {
            return Err(a.err("integer keys and float values were expected"));
        };
        let default = match a.tensor("default_tensor") {
            Some(t) => *tensor_floats(t).map_err(|r| a.err(format!("`default_tensor`: {r}")))?.first().unwrap_or(&0.0),
            None => a.float("default_float", 0.0),
        };
        let lo = *keys.iter().min().ok_or_else(|| a.err("no keys"))?;
        let span = (keys.iter().max().unwrap() - lo + 1) as usize;
        let mut segment = vec![default; span];
        keys.iter().zip(&values).for_each(|(&k, &v)| segment[(k - lo) as usize] = v);
        offsets.push(table.len() as i64);
        table.extend(segment);
        lows.push(lo);
        spans.push(span as i64);
        defaults.push(default);
    }
    let m = members.len() as i64;
    let sources: Vec<&str> = members.iter().map(|(_, s)| s.as_str()).collect();
    let x = e.op("Concat", &sources, vec![attr_int("axis", 1)]);
    let xi = e.cast(&x, INT64);
    let (lo, span, offset) = (e.ints(&[m], lows), e.ints(&[m], spans), e.ints(&[m], offsets));
    let table = e.floats(&[table.len() as i64], table);
    let (inside, found) = table_lookup(e, &xi, &lo, &span, Some(&offset), &table);
    let defaults = e.floats(&[m], defaults);
    let y = e.op("Where", &[&inside, &found, &defaults], vec![]);
    for (j, (node, _)) in members.iter().enumerate() {
        let column = e.ints(&[1], vec![j as i64]);
        e.op_into("Gather", &[&y, &column], vec![attr_int("axis", 1)], output(node)?);
    }
    Ok(())
}

/// Looks integer keys `xi` up in `table`: a key is at `xi - lo` (plus `offset`, where several tables share one)
/// when `0 <= xi - lo < span`. Returns whether each key is inside, and what the table holds there (slot 0 of
/// the segment for keys outside, to be replaced by the default).
fn table_lookup(e: &mut Emit, xi: &str, lo: &str, span: &str, offset: Option<&str>, table: &str) -> (String, String) {
    let zero = e.ints(&[], vec![0]);
    let idx = e.op("Sub", &[xi, lo], vec![]);
    let below = e.op("Less", &[&idx, &zero], vec![]);
    let above = e.op("Less", &[&idx, span], vec![]);
    let not_below = e.op("Not", &[&below], vec![]);
    let inside = e.op("And", &[&not_below, &above], vec![]);
    // `idx` where inside, else 0: a product rather than an integer `Where` with a scalar, which tract's NNEF
    // archive reads back with mismatched integer types, so that the conversion agents run is possible.
    let keep = e.cast(&inside, INT64);
    let mut at = e.op("Mul", &[&idx, &keep], vec![]);
    if let Some(offset) = offset {
        at = e.op("Add", &[&at, offset], vec![]);
    }
    let found = e.gather(table, &at, 0);
    (inside, found)
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

#[cfg(test)]
mod tests {
    //! `LabelEncoder`s of every numeric form, rewritten and run by tract, against a direct lookup.

    use super::super::graph::{attr_int, FLOAT, INT64};
    use super::super::{prepare, ScoreSpec};
    use crate::ml::training::onnx::run_tract;
    use prost::Message;
    use tract_onnx::pb::{self, attribute_proto::AttributeType, type_proto, AttributeProto, NodeProto};

    fn attr(name: &str, ints: Vec<i64>, floats: Vec<f32>) -> AttributeProto {
        let r#type = if ints.is_empty() { AttributeType::Floats } else { AttributeType::Ints } as i32;
        AttributeProto { name: name.into(), r#type, ints, floats, ..Default::default() }
    }

    /// X (float) → [Cast to int64 when `int_keys`] → LabelEncoder → [Cast to float when `int_values`] → Y.
    fn model(int_keys: bool, int_values: bool, attrs: Vec<AttributeProto>) -> Vec<u8> {
        let mut nodes = Vec::new();
        let mut x = "X".to_string();
        if int_keys {
            nodes.push(NodeProto {
                input: vec![x],
                output: vec!["xi".into()],
                op_type: "Cast".into(),
                attribute: vec![attr_int("to", INT64 as i64)],
                ..Default::default()
            });
            x = "xi".into();
        }
        let encoded = if int_values { "yi" } else { "Y" };
        nodes.push(NodeProto {
            input: vec![x],
            output: vec![encoded.into()],
            op_type: "LabelEncoder".into(),
            domain: "ai.onnx.ml".into(),
            attribute: attrs,
            ..Default::default()
        });
        if int_values {
            nodes.push(NodeProto {
                input: vec!["yi".into()],
                output: vec!["Y".into()],
                op_type: "Cast".into(),
                attribute: vec![attr_int("to", FLOAT as i64)],
                ..Default::default()
            });
        }
        let float = || pb::TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor { elem_type: FLOAT, shape: None })),
            ..Default::default()
        };
        pb::ModelProto {
            ir_version: 8,
            opset_import: vec![
                pb::OperatorSetIdProto { domain: String::new(), version: 17 },
                pb::OperatorSetIdProto { domain: "ai.onnx.ml".into(), version: 2 },
            ],
            graph: Some(pb::GraphProto {
                node: nodes,
                input: vec![pb::ValueInfoProto { name: "X".into(), r#type: Some(float()), ..Default::default() }],
                output: vec![pb::ValueInfoProto { name: "Y".into(), r#type: Some(float()), ..Default::default() }],
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn check(what: &str, onnx: Vec<u8>, lookup: impl Fn(f32) -> f32) {
        let served = prepare(&onnx, &ScoreSpec::default()).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(served.rewritten.get("LabelEncoder"), Some(&1), "{what}");
        let rows: Vec<Vec<f32>> =
            vec![vec![-3.0, 0.0, 1.0, 2.0], vec![5.0, 7.0, 100_000.0, -1.0], vec![0.5, 2.5, 7.0, 9.0]];
        let got = run_tract(&served.onnx, &rows).unwrap_or_else(|e| panic!("{what}: tract: {e}"));
        let want: Vec<f32> = rows.iter().flatten().map(|&x| lookup(x)).collect();
        assert_eq!(got, want, "{what}");
    }

    #[test]
    fn numeric_label_encoders_give_what_a_lookup_gives() {
        let keys = vec![-1i64, 0, 2, 7];
        let values = vec![10.5f32, 11.0, -4.0, 3.25];
        // Integer keys see the input cast to int64, which truncates (2.5 is 2).
        let find =
            |x: f32, default: f32| keys.iter().position(|&k| k as f32 == x.trunc()).map_or(default, |i| values[i]);
        // Integer keys over a short span: a table.
        let a = vec![attr("keys_int64s", keys.clone(), vec![]), attr("values_floats", vec![], values.clone())];
        check("dense int keys", model(true, false, a), |x| find(x, 0.0));
        // Integer keys spread wide: compared one by one; a default given.
        let wide = vec![-1i64, 0, 100_000, 7_000_000];
        let mut a = vec![attr("keys_int64s", wide.clone(), vec![]), attr("values_floats", vec![], values.clone())];
        a.push(AttributeProto {
            name: "default_float".into(),
            r#type: AttributeType::Float as i32,
            f: -9.0,
            ..Default::default()
        });
        check("sparse int keys", model(true, false, a), |x| {
            wide.iter().position(|&k| k as f32 == x.trunc()).map_or(-9.0, |i| values[i])
        });
        // Float keys to int values, the default -1.
        let fkeys = vec![0.5f32, 2.5, 7.0];
        let a = vec![attr("keys_floats", vec![], fkeys.clone()), attr("values_int64s", vec![4, 5, 6], vec![])];
        check("float keys", model(false, true, a), |x| {
            fkeys.iter().position(|&k| k == x).map_or(-1.0, |i| (4 + i) as f32)
        });
        // The tensor form (ai.onnx.ml 4).
        let tensor = |name: &str, t: pb::TensorProto| AttributeProto {
            name: name.into(),
            r#type: AttributeType::Tensor as i32,
            t: Some(t),
            ..Default::default()
        };
        let a = vec![
            tensor(
                "keys_tensor",
                pb::TensorProto { dims: vec![4], data_type: INT64, int64_data: keys.clone(), ..Default::default() },
            ),
            tensor(
                "values_tensor",
                pb::TensorProto { dims: vec![4], data_type: FLOAT, float_data: values.clone(), ..Default::default() },
            ),
            tensor(
                "default_tensor",
                pb::TensorProto { dims: vec![1], data_type: FLOAT, float_data: vec![42.0], ..Default::default() },
            ),
        ];
        check("tensor attributes", model(true, false, a), |x| find(x, 42.0));
    }

    #[test]
    fn string_label_encoders_are_refused_naming_the_node() {
        let a = vec![AttributeProto {
            name: "keys_strings".into(),
            r#type: AttributeType::Strings as i32,
            strings: vec![b"a".to_vec()],
            ..Default::default()
        }];
        let err = prepare(&model(false, false, a), &ScoreSpec::default()).unwrap_err().to_string();
        assert!(err.contains("(LabelEncoder): string keys: only numeric keys and values are supported"), "{err}");
    }
}
