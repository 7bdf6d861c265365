//! Counts of parameters, FLOPs and bytes moved, per op kind, for `kiln inspect` and the
//! rewriter's cost model (`rewrite::extract`).
//!
//! Counts are analytic, from a verified graph and bindings of its symbolic dimensions: FLOPs
//! count a multiply-add as two; bytes count every operand read and every result written once,
//! at the dtype's storage size, except where an op touches only part of an operand (a KV
//! append writes only the new rows; an embedding reads only the looked-up rows; decode
//! attention reads the valid cache rows, Quest decode attention its page metadata and the
//! budget's rows; MoE experts read only the experts that receive tokens, estimated for
//! uniform routing). This module must not execute graphs.

use crate::graph::{Graph, Node, TensorType, ValueRefError};
use crate::op::{InputKind, Op};
use crate::shape::{Bindings, ShapeError};
use serde::Serialize;
use std::collections::BTreeMap;

/// FLOPs and bytes of all nodes of one op kind.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct OpCost {
    pub op: String,
    pub count: usize,
    pub flops: f64,
    pub bytes: f64,
}

/// Parameter counts of a model graph.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ParameterCount {
    /// Every weight element.
    pub total: u64,
    /// Weight elements used for one token: experts count `top_k / num_experts` of theirs.
    pub active_per_token: u64,
    /// Weight storage in bytes at the weights' dtype.
    pub bytes: u64,
}

/// Why a graph or a node could not be costed: a dimension without a value (naming the weight
/// or the node) or an operand that names no value.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum CostError {
    #[error(transparent)]
    Shape(#[from] ShapeError),
    #[error(transparent)]
    Operand(#[from] ValueRefError),
    /// A weight whose size is not known without bindings.
    #[error("weight `{name}`: {source}")]
    Weight {
        name: String,
        #[source]
        source: ShapeError,
    },
    /// A node of the graph that could not be costed.
    #[error("node %{index} `{label}`: {source}")]
    Node {
        index: usize,
        label: String,
        #[source]
        source: Box<CostError>,
    },
}

fn elements(ty: &TensorType, bindings: &Bindings) -> Result<f64, CostError> {
    Ok(ty.shape.num_elements(bindings)? as f64)
}

fn bytes_of(ty: &TensorType, bindings: &Bindings) -> Result<f64, CostError> {
    Ok(elements(ty, bindings)? * ty.dtype.bits() as f64 / 8.0)
}

/// Parameters of `graph` (its weight inputs).
pub fn parameter_count(graph: &Graph) -> Result<ParameterCount, CostError> {
    let empty = Bindings::new();
    let mut count = ParameterCount::default();
    for (name, ty) in graph.weights() {
        let n = ty
            .shape
            .num_elements(&empty)
            .map_err(|source| CostError::Weight {
                name: name.to_string(),
                source,
            })? as u64;
        count.total += n;
        count.active_per_token += n;
        count.bytes += ty.dtype.storage_bytes(n as usize) as u64;
    }
    for node in &graph.nodes {
        if let (Op::MoeExpertFfn { num_experts }, Some(k)) =
            (&node.op, slots_per_token(graph, node))
        {
            let expert_weights: u64 = node.inputs[3..]
                .iter()
                .map(|v| {
                    graph
                        .value_type(*v)
                        .map(|t| t.shape.num_elements(&empty).unwrap_or(0) as u64)
                })
                .sum::<Result<u64, ValueRefError>>()?;
            let idle = expert_weights - expert_weights * k as u64 / *num_experts as u64;
            count.active_per_token -= idle;
        }
    }
    Ok(count)
}

/// The `k` (experts per token) of a MoE expert node: the last dimension of its `order`.
fn slots_per_token(graph: &Graph, node: &Node) -> Option<usize> {
    let order = graph.value_type(*node.inputs.get(1)?).ok()?;
    order.shape.last()?.as_const()
}

/// FLOPs and bytes of every node of `graph` under `bindings`, summed per op kind and sorted
/// by op name. `Input` and `Constant` nodes cost nothing.
pub fn op_costs(graph: &Graph, bindings: &Bindings) -> Result<Vec<OpCost>, CostError> {
    let mut by_op: BTreeMap<&'static str, OpCost> = BTreeMap::new();
    for (index, node) in graph.nodes.iter().enumerate() {
        let (flops, bytes) =
            node_cost(graph, node, bindings).map_err(|source| CostError::Node {
                index,
                label: node.label.clone(),
                source: Box::new(source),
            })?;
        if matches!(node.op, Op::Input { .. } | Op::Constant { .. }) {
            continue;
        }
        let entry = by_op.entry(node.op.name()).or_insert_with(|| OpCost {
            op: node.op.name().to_string(),
            ..OpCost::default()
        });
        entry.count += 1;
        entry.flops += flops;
        entry.bytes += bytes;
    }
    Ok(by_op.into_values().collect())
}

/// `(flops, bytes)` of one node.
pub fn node_cost(graph: &Graph, node: &Node, bindings: &Bindings) -> Result<(f64, f64), CostError> {
    let operand = |i: usize| graph.value_type(node.inputs[i]);
    let dims = |ty: &TensorType| ty.shape.resolve(bindings);
    let out = &node.outputs[0];
    let out_elements = elements(out, bindings)?;
    let written: f64 = node
        .outputs
        .iter()
        .map(|t| bytes_of(t, bindings))
        .sum::<Result<f64, CostError>>()?;
    let read_all: f64 = node
        .inputs
        .iter()
        .map(|v| bytes_of(graph.value_type(*v)?, bindings))
        .sum::<Result<f64, CostError>>()?;
    Ok(match &node.op {
        Op::Input { .. } | Op::Constant { .. } => (0.0, 0.0),
        Op::Linear => {
            let k = *dims(operand(0)?)?.last().expect("rank ≥ 1") as f64;
            (2.0 * out_elements * k, read_all + written)
        }
        Op::MatMul => {
            let a = dims(operand(0)?)?;
            let k = a[a.len() - 1] as f64;
            (2.0 * out_elements * k, read_all + written)
        }
        Op::Embedding => {
            // Reads the ids and one table row per token.
            (0.0, bytes_of(operand(1)?, bindings)? + 2.0 * written)
        }
        Op::KvAppend => {
            // Reads the new rows and writes them into the cache in place.
            let new = bytes_of(operand(1)?, bindings)?;
            (0.0, 2.0 * new + bytes_of(operand(2)?, bindings)?)
        }
        Op::Attention { .. } | Op::AttentionDecode { .. } => {
            let q = dims(operand(0)?)?;
            let k = dims(operand(1)?)?;
            let (s, heads, head_dim) = (q[1] as f64, q[2] as f64, q[3] as f64);
            let t = k[1] as f64;
            // Average keys seen per query: all of them, or the causal triangle's mean.
            let seen = match node.op {
                Op::Attention { causal: true, .. } => t - s + (s + 1.0) / 2.0,
                _ => t,
            };
            let batch = q[0] as f64;
            let flops = 4.0 * batch * s * seen * heads * head_dim;
            let kv_read = bytes_of(operand(1)?, bindings)? + bytes_of(operand(2)?, bindings)?;
            (flops, bytes_of(operand(0)?, bindings)? + kv_read + written)
        }
        Op::QuestAttentionDecode {
            budget_tokens,
            page_size,
            ..
        } => {
            // Dense when the context fits the budget; else the page metadata (max and min:
            // 2/page_size of the K bytes) scored by every query head, plus attention over the
            // budget's tokens only.
            let q = dims(operand(0)?)?;
            let k = dims(operand(1)?)?;
            let (batch, s, heads, head_dim) = (q[0] as f64, q[1] as f64, q[2] as f64, q[3] as f64);
            let t = k[1] as f64;
            let page = *page_size as f64;
            let pages = (t / page).ceil();
            let budget = (*budget_tokens as f64).min(t);
            let k_bytes = bytes_of(operand(1)?, bindings)?;
            let kv_read = k_bytes + bytes_of(operand(2)?, bindings)?;
            let attention = 4.0 * batch * s * budget * heads * head_dim;
            let (flops, kv) = if pages * page <= *budget_tokens as f64 {
                (attention, kv_read)
            } else {
                let scoring = 4.0 * batch * s * pages * heads * head_dim;
                let metadata = 2.0 * k_bytes / page;
                (attention + scoring, metadata + kv_read * budget / t)
            };
            (flops, bytes_of(operand(0)?, bindings)? + kv + written)
        }
        Op::MoeExpertFfn { num_experts } => {
            let x = dims(operand(0)?)?;
            let hidden = *x.last().expect("rank ≥ 1") as f64;
            let tokens: f64 = x[..x.len() - 1].iter().product::<usize>() as f64;
            let k = slots_per_token(graph, node).unwrap_or(1) as f64;
            let gate = dims(operand(3)?)?;
            let width = gate[0] as f64;
            let e = *num_experts as f64;
            // Experts that receive at least one of tokens·k uniform picks (expected count).
            let touched = e * (1.0 - (1.0 - k / e).powf(tokens));
            let expert_bytes = 3.0 * hidden * width * operand(3)?.dtype.bits() as f64 / 8.0;
            let flops = tokens * k * 3.0 * 2.0 * hidden * width;
            let io = bytes_of(operand(0)?, bindings)? + bytes_of(operand(1)?, bindings)? + written;
            (flops, io + touched * expert_bytes)
        }
        Op::RmsNorm { .. } | Op::Softmax | Op::MoeRouter { .. } => {
            (5.0 * out_elements, read_all + written)
        }
        Op::Rope { .. } => (6.0 * out_elements, read_all + written),
        Op::Silu | Op::Sigmoid => (4.0 * out_elements, read_all + written),
        Op::Add | Op::Mul | Op::MoeCombine | Op::Cast { .. } => (out_elements, read_all + written),
        Op::Quantize { .. } | Op::Dequantize { .. } => (3.0 * out_elements, read_all + written),
        Op::TopK { .. } | Op::MoeDispatch { .. } => (0.0, read_all + written),
        Op::Reshape { .. } => (0.0, 0.0),
        Op::Transpose { .. } | Op::Slice { .. } | Op::Concat { .. } => (0.0, 2.0 * written),
        Op::FusedMap { steps } => (steps.len() as f64 * out_elements, read_all + written),
        Op::SwiGluLinear => {
            // Two products of K per result element, then the activation.
            let k = *dims(operand(0)?)?.last().expect("rank ≥ 1") as f64;
            (
                4.0 * out_elements * k + 5.0 * out_elements,
                read_all + written,
            )
        }
        Op::LinearAdd | Op::QuantizedLinear { .. } | Op::AtomLinear { .. } => {
            let k = *dims(operand(0)?)?.last().expect("rank ≥ 1") as f64;
            (2.0 * out_elements * k + out_elements, read_all + written)
        }
        Op::AddRmsNorm { .. } => (6.0 * out_elements, read_all + written),
        Op::MoeRouterLinear { .. } => {
            // The logits' product (never stored), then the router's softmax over them.
            let x = dims(operand(0)?)?;
            let k = *x.last().expect("rank ≥ 1") as f64;
            let tokens: f64 = x[..x.len() - 1].iter().product::<usize>() as f64;
            let experts = dims(operand(1)?)?[0] as f64;
            let logits = tokens * experts;
            (2.0 * logits * k + 5.0 * logits, read_all + written)
        }
        Op::CausalMask => (0.0, written),
    })
}

/// Whether `kind` inputs of `graph` exist; a helper for reports.
pub fn has_inputs_of_kind(graph: &Graph, kind: InputKind) -> bool {
    graph.inputs().any(|(_, _, k, _)| k == kind)
}
