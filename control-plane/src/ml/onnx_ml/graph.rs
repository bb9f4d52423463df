//! Reading ONNX nodes' attributes and emitting core-op nodes in their place.

use super::RewriteError;
use tract_onnx::pb::{attribute_proto::AttributeType, tensor_proto::DataType, AttributeProto, NodeProto, TensorProto};

/// ONNX element types edgeloop writes or checks.
pub(crate) const FLOAT: i32 = DataType::Float as i32;
pub(crate) const DOUBLE: i32 = DataType::Double as i32;
pub(crate) const INT64: i32 = DataType::Int64 as i32;

/// One node's attributes, read with errors that name the node and the attribute.
pub(crate) struct Attrs<'a> {
    node: &'a NodeProto,
}

impl<'a> Attrs<'a> {
    pub fn of(node: &'a NodeProto) -> Attrs<'a> {
        Attrs { node }
    }

    fn get(&self, name: &str) -> Option<&'a AttributeProto> {
        self.node.attribute.iter().find(|a| a.name == name)
    }

    pub fn err(&self, reason: impl Into<String>) -> RewriteError {
        RewriteError::node(self.node, reason)
    }

    pub fn int(&self, name: &str, default: i64) -> i64 {
        self.get(name).map_or(default, |a| a.i)
    }

    pub fn float(&self, name: &str, default: f32) -> f32 {
        self.get(name).map_or(default, |a| a.f)
    }

    pub fn string(&self, name: &str, default: &str) -> String {
        self.get(name).map_or_else(|| default.to_string(), |a| String::from_utf8_lossy(&a.s).into_owned())
    }

    pub fn ints(&self, name: &str) -> Vec<i64> {
        self.get(name).map(|a| a.ints.clone()).unwrap_or_default()
    }

    pub fn strings(&self, name: &str) -> Vec<String> {
        self.get(name)
            .map(|a| a.strings.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect())
            .unwrap_or_default()
    }

    /// A list of floats, from `name` or from the tensor `name_as_tensor` (double precision in ai.onnx.ml 3).
    pub fn floats(&self, name: &str) -> Result<Vec<f32>, RewriteError> {
        if let Some(a) = self.get(&format!("{name}_as_tensor")) {
            let t = a.t.as_ref().ok_or_else(|| self.err(format!("attribute `{name}_as_tensor` holds no tensor")))?;
            return tensor_floats(t).map_err(|reason| self.err(format!("attribute `{name}_as_tensor`: {reason}")));
        }
        Ok(self.get(name).map(|a| a.floats.clone()).unwrap_or_default())
    }

    /// A tensor attribute (`keys_tensor` and friends), if present.
    pub fn tensor(&self, name: &str) -> Option<&'a TensorProto> {
        self.get(name).and_then(|a| a.t.as_ref())
    }
}

/// A numeric tensor's values as f32 (float, double, or integers).
pub(crate) fn tensor_floats(t: &TensorProto) -> Result<Vec<f32>, String> {
    let raw = &t.raw_data;
    Ok(match t.data_type {
        x if x == FLOAT && !raw.is_empty() => {
            raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        }
        x if x == FLOAT => t.float_data.clone(),
        x if x == DOUBLE && !raw.is_empty() => raw
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        x if x == DOUBLE => t.double_data.iter().map(|&v| v as f32).collect(),
        x if x == INT64 => tensor_ints(t)?.into_iter().map(|v| v as f32).collect(),
        other => return Err(format!("element type {other} where numbers were expected")),
    })
}

/// An int64 tensor's values.
pub(crate) fn tensor_ints(t: &TensorProto) -> Result<Vec<i64>, String> {
    if t.data_type != INT64 {
        return Err(format!("element type {} where int64 was expected", t.data_type));
    }
    if t.raw_data.is_empty() {
        return Ok(t.int64_data.clone());
    }
    Ok(t.raw_data
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

pub(crate) fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: AttributeType::Int as i32, i, ..Default::default() }
}

/// Emits the core-op nodes and constants that replace one node, with names unique to it.
pub(crate) struct Emit {
    prefix: String,
    next: usize,
    pub nodes: Vec<NodeProto>,
    pub constants: Vec<TensorProto>,
}

impl Emit {
    pub fn new(prefix: String) -> Emit {
        Emit { prefix, next: 0, nodes: Vec::new(), constants: Vec::new() }
    }

    fn fresh(&mut self, what: &str) -> String {
        self.next += 1;
        format!("{}/{what}{}", self.prefix, self.next)
    }

    /// A node with one output, named here; returns the output's name.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let out = self.fresh(&op.to_ascii_lowercase());
        self.op_into(op, inputs, attrs, &out);
        out
    }

    /// A node writing the given output name.
    pub fn op_into(&mut self, op: &str, inputs: &[&str], attribute: Vec<AttributeProto>, output: &str) {
        let name = self.fresh(op);
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            name,
            op_type: op.into(),
            attribute,
            ..Default::default()
        });
    }

    pub fn floats(&mut self, dims: &[i64], values: Vec<f32>) -> String {
        let name = self.fresh("const");
        self.constants.push(TensorProto {
            name: name.clone(),
            dims: dims.to_vec(),
            data_type: FLOAT,
            float_data: values,
            ..Default::default()
        });
        name
    }

    pub fn ints(&mut self, dims: &[i64], values: Vec<i64>) -> String {
        let name = self.fresh("const");
        self.constants.push(TensorProto {
            name: name.clone(),
            dims: dims.to_vec(),
            data_type: INT64,
            int64_data: values,
            ..Default::default()
        });
        name
    }

    /// `Cast(x, to)`.
    pub fn cast(&mut self, x: &str, to: i32) -> String {
        self.op("Cast", &[x], vec![attr_int("to", to as i64)])
    }

    /// `Gather(table, indices, axis)`.
    pub fn gather(&mut self, table: &str, indices: &str, axis: i64) -> String {
        self.op("Gather", &[table, indices], vec![attr_int("axis", axis)])
    }
}
