//! What one plan step computes, at the IR level, without the graph it came from.
//!
//! Owns [`Computation`]: the op of a scheduled kernel or load-time op with the types of its
//! operands (in the shapes the op reads them, views applied) and of its results. A plan
//! carries one per step so that whatever runs a step on the host needs only the plan, never
//! the graph. This file must not evaluate anything (the reference interpreter does, on
//! [`Computation::node`]).

use crate::graph::{Graph, Node, TensorType, ValueId};
use crate::op::Op;
use serde::{Deserialize, Serialize};

/// The op of one plan step and the types it reads and writes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Computation {
    pub op: Op,
    /// Operand types, in the op's operand order and in the shapes it reads them.
    pub inputs: Vec<TensorType>,
    /// Result types.
    pub outputs: Vec<TensorType>,
}

impl Computation {
    /// The computation of `node` of `graph` (whose operands must exist in the graph).
    pub fn of(graph: &Graph, node: &Node) -> Computation {
        Computation {
            op: node.op.clone(),
            inputs: node
                .inputs
                .iter()
                .map(|&v| {
                    graph
                        .value_type(v)
                        .cloned()
                        .expect("a verified graph's operands exist")
                })
                .collect(),
            outputs: node.outputs.clone(),
        }
    }

    /// A stand-alone node with this op and result types whose operands are placeholders
    /// (operand `i` is output `i` of a node 0 that does not exist), labelled `label`: the
    /// form the reference interpreter's `eval` takes.
    pub fn node(&self, label: &str) -> Node {
        Node {
            op: self.op.clone(),
            inputs: (0..self.inputs.len())
                .map(|output| ValueId { node: 0, output })
                .collect(),
            outputs: self.outputs.clone(),
            label: label.to_string(),
            layer: None,
        }
    }
}
