//! The tensor graph: typed nodes in topological order.
//!
//! Owns [`Graph`], [`Node`] (op, operands, result types, label and decoder layer),
//! [`ValueId`] and [`TensorType`], and the building API that adds a node after inferring its
//! result types (through `verify::infer`). Nodes only refer to earlier nodes, so the node
//! order is an execution order. It must not execute anything (that is `interp`) or rewrite
//! anything (that is `rewrite`, later).

use crate::dtype::DType;
use crate::op::{InputKind, Op};
use crate::shape::Shape;
use crate::verify::{self, VerifyError, VerifyProblem};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The type of a tensor value: dtype and shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Shape,
}

impl TensorType {
    pub fn new(dtype: DType, shape: Shape) -> TensorType {
        TensorType { dtype, shape }
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, self.shape)
    }
}

/// The values of an MoE layer added by [`Graph::add_moe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeValues {
    /// The router's weights `[.., k]` (f32) and chosen experts `[.., k]` (i32).
    pub weights: ValueId,
    pub experts: ValueId,
    /// The dispatch: slots sorted by expert, and each expert's offsets.
    pub order: ValueId,
    pub offsets: ValueId,
    /// The expert FFN's rows `[.., k, hidden]`, in dispatch order.
    pub rows: ValueId,
    /// The combined output `[.., hidden]`.
    pub out: ValueId,
}

/// A value in the graph: output `output` of node `node`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ValueId {
    pub node: usize,
    pub output: usize,
}

impl fmt::Display for ValueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.output == 0 {
            write!(f, "%{}", self.node)
        } else {
            write!(f, "%{}.{}", self.node, self.output)
        }
    }
}

/// A [`ValueId`] that names no value of the graph: the node or the output is missing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValueRefError {
    /// The node does not exist (yet).
    #[error("operand {value} refers to a node that does not exist yet")]
    MissingNode { value: ValueId },
    /// The node exists but has fewer outputs.
    #[error(
        "operand {value} refers to output {} of `{label}`, which has {outputs} outputs",
        value.output
    )]
    MissingOutput {
        value: ValueId,
        /// The node's label.
        label: String,
        /// How many outputs the node has.
        outputs: usize,
    },
}

/// One operation applied to earlier values, with its inferred result types.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<TensorType>,
    /// A readable name such as `layers.3.attn.q_proj`, used in errors and reports. Nothing
    /// reads facts out of it: those are typed fields such as `layer`.
    pub label: String,
    /// The decoder layer the node belongs to, if any. The model builder sets `Some(i)` on
    /// every node it adds for layer `i` (the layer's weights, KV-cache state inputs and ops);
    /// nodes outside the layers (embedding, final norm, head, shared inputs) and nodes added
    /// through [`Graph::add`] have `None`. Rewriting carries it like the label, scheduling
    /// records it on each kernel, and per-layer passes (Quest) read it.
    #[serde(default)]
    pub layer: Option<usize>,
}

/// A typed dataflow graph with named outputs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    pub name: String,
    pub nodes: Vec<Node>,
    pub outputs: Vec<(String, ValueId)>,
}

impl Graph {
    /// An empty graph.
    pub fn new(name: &str) -> Graph {
        Graph {
            name: name.to_string(),
            ..Graph::default()
        }
    }

    /// Adds a node, inferring and checking its result types. The error names the label.
    pub fn add(
        &mut self,
        label: &str,
        op: Op,
        inputs: &[ValueId],
    ) -> Result<Vec<ValueId>, VerifyError> {
        let node_index = self.nodes.len();
        let error = |problem: VerifyProblem| VerifyError {
            node: node_index,
            label: label.to_string(),
            op: op.name(),
            message: Box::new(problem),
        };
        let mut input_types = Vec::with_capacity(inputs.len());
        for value in inputs {
            input_types.push(
                self.value_type(*value)
                    .map_err(|e| error(e.into()))?
                    .clone(),
            );
        }
        let outputs = verify::infer(&op, &input_types).map_err(|e| error(e.into()))?;
        let ids = (0..outputs.len())
            .map(|output| ValueId {
                node: node_index,
                output,
            })
            .collect();
        self.nodes.push(Node {
            op,
            inputs: inputs.to_vec(),
            outputs,
            label: label.to_string(),
            layer: None,
        });
        Ok(ids)
    }

    /// Adds a single-result node and returns its value.
    pub fn add1(
        &mut self,
        label: &str,
        op: Op,
        inputs: &[ValueId],
    ) -> Result<ValueId, VerifyError> {
        let values = self.add(label, op, inputs)?;
        Ok(values[0])
    }

    /// Adds a graph input; its label is its name.
    pub fn input(
        &mut self,
        name: &str,
        kind: InputKind,
        dtype: DType,
        shape: Shape,
    ) -> Result<ValueId, VerifyError> {
        let op = Op::Input {
            name: name.to_string(),
            kind,
            dtype,
            shape,
        };
        self.add1(name, op, &[])
    }

    /// Adds a scalar constant.
    pub fn constant(
        &mut self,
        label: &str,
        value: f32,
        dtype: DType,
    ) -> Result<ValueId, VerifyError> {
        self.add1(label, Op::Constant { value, dtype }, &[])
    }

    /// Adds a mixture-of-experts layer on tokens `x` with router `logits`: `{block}.router`
    /// (`MoeRouter`), `{block}.dispatch`, `{block}.experts` (`MoeExpertFfn` over
    /// `expert_weights`, each expert's `[gate, up, down]`) and `{block}.combine`. The error
    /// names the node that did not verify.
    pub fn add_moe(
        &mut self,
        block: &str,
        x: ValueId,
        logits: ValueId,
        expert_weights: &[[ValueId; 3]],
        top_k: usize,
        normalize: bool,
    ) -> Result<MoeValues, VerifyError> {
        let num_experts = expert_weights.len();
        let routed = self.add(
            &format!("{block}.router"),
            Op::MoeRouter { top_k, normalize },
            &[logits],
        )?;
        let dispatched = self.add(
            &format!("{block}.dispatch"),
            Op::MoeDispatch { num_experts },
            &[routed[1]],
        )?;
        let mut operands = vec![x, dispatched[0], dispatched[1]];
        operands.extend(expert_weights.iter().flatten());
        let rows = self.add1(
            &format!("{block}.experts"),
            Op::MoeExpertFfn { num_experts },
            &operands,
        )?;
        let out = self.add1(
            &format!("{block}.combine"),
            Op::MoeCombine,
            &[rows, dispatched[0], routed[0]],
        )?;
        Ok(MoeValues {
            weights: routed[0],
            experts: routed[1],
            order: dispatched[0],
            offsets: dispatched[1],
            rows,
            out,
        })
    }

    /// Marks `value` as a named graph output.
    pub fn output(&mut self, name: &str, value: ValueId) {
        self.outputs.push((name.to_string(), value));
    }

    /// The type of `value`, or why it does not exist.
    pub fn value_type(&self, value: ValueId) -> Result<&TensorType, ValueRefError> {
        let node = self
            .nodes
            .get(value.node)
            .ok_or(ValueRefError::MissingNode { value })?;
        node.outputs
            .get(value.output)
            .ok_or_else(|| ValueRefError::MissingOutput {
                value,
                label: node.label.clone(),
                outputs: node.outputs.len(),
            })
    }

    /// The graph inputs: `(node index, name, kind, type)` in node order.
    pub fn inputs(&self) -> impl Iterator<Item = (usize, &str, InputKind, &TensorType)> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(index, node)| match &node.op {
                Op::Input { name, kind, .. } => {
                    Some((index, name.as_str(), *kind, &node.outputs[0]))
                }
                _ => None,
            })
    }

    /// The weight inputs: `(name, type)` in node order.
    pub fn weights(&self) -> impl Iterator<Item = (&str, &TensorType)> {
        self.inputs()
            .filter(|(_, _, kind, _)| *kind == InputKind::Weight)
            .map(|(_, name, _, ty)| (name, ty))
    }

    /// Checks the whole graph: operand references, types, unique input and output names.
    pub fn verify(&self) -> Result<(), VerifyError> {
        verify::verify_graph(self)
    }
}

impl fmt::Display for Graph {
    /// A readable listing, one node a line: `%3 = linear(%1, %2) : f16[batch, 4096]  # label`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "graph {} {{", self.name)?;
        for (index, node) in self.nodes.iter().enumerate() {
            let operands: Vec<String> = node.inputs.iter().map(|v| v.to_string()).collect();
            let types: Vec<String> = node.outputs.iter().map(|t| t.to_string()).collect();
            writeln!(
                f,
                "  %{index} = {}({}) : {}  # {}",
                node.op.name(),
                operands.join(", "),
                types.join(", "),
                node.label
            )?;
        }
        for (name, value) in &self.outputs {
            writeln!(f, "  output {name} = {value}")?;
        }
        f.write_str("}")
    }
}
