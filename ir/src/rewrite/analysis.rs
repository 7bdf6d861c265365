//! The e-class analysis: every e-class carries the type of its value.
//!
//! A node's types come from `verify::infer` on its operands' types (a projection reads one
//! result of its tuple), so the e-graph uses exactly the graph's type rules. When two e-classes
//! merge, their types must agree: equal values have equal types, so a disagreement means a
//! rule is wrong. `merge` cannot fail, so it records the disagreement, with both types, in
//! [`TypeAnalysis::problems`]; the pass checks that list after every stage and reports it as
//! [`super::RewriteError::TypeConflict`]. The same list records a node whose types cannot be
//! inferred (rules check types before adding nodes, so that is a bug too).
//!
//! The analysis also tracks whether a value depends only on weights and constants
//! (`load_time`): such values (a concatenation of two weight matrices, say) are computed once
//! when weights are loaded, and the cost model charges nothing for them per call.

use super::language::{ENode, NodeOp};
use crate::graph::TensorType;
use crate::op::{InputKind, Op};
use crate::verify::{self, TypeError};
use egg::{Analysis, DidMerge, Id, Language};

/// The e-graph of the rewriter.
pub type EGraph = egg::EGraph<ENode, TypeAnalysis>;

/// What every e-class knows about its value.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassData {
    /// The value's type; several for the tuple of a multi-result node; empty only after a
    /// recorded problem.
    pub types: Vec<TensorType>,
    /// Whether the value depends only on weights and constants.
    pub load_time: bool,
}

impl ClassData {
    /// The type of a single-value e-class.
    pub fn single(&self) -> Option<&TensorType> {
        match self.types.as_slice() {
            [ty] => Some(ty),
            _ => None,
        }
    }
}

/// Types per e-class, and the problems found while maintaining them.
#[derive(Clone, Debug, Default)]
pub struct TypeAnalysis {
    /// Disagreements and inference failures, in the order found. Empty in a correct run.
    pub problems: Vec<String>,
}

/// Why an e-node has no type: an operand that is not a single value, a projection past the
/// end of its tuple, or an op whose type rule rejects its operand types.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum NodeTypeError {
    #[error(
        "operand {index} of {node} is not a single value: {}",
        show_types(types)
    )]
    NotSingle {
        index: usize,
        /// The e-node's op name.
        node: &'static str,
        types: Vec<TensorType>,
    },
    #[error("projection {index} of a node with results {}", show_types(types))]
    Projection {
        index: usize,
        types: Vec<TensorType>,
    },
    /// The op's type rule rejects the operand types (boxed: type errors are large).
    #[error(transparent)]
    Type(Box<TypeError>),
}

impl From<TypeError> for NodeTypeError {
    fn from(error: TypeError) -> NodeTypeError {
        NodeTypeError::Type(Box::new(error))
    }
}

/// Shows a list of types as `(f32[2, 3], i32[2])`.
pub fn show_types(types: &[TensorType]) -> String {
    let parts: Vec<String> = types.iter().map(|t| t.to_string()).collect();
    format!("({})", parts.join(", "))
}

/// The operand types of a graph-op node, each of which must be a single value.
pub fn operand_types(egraph: &EGraph, enode: &ENode) -> Result<Vec<TensorType>, NodeTypeError> {
    enode
        .children()
        .iter()
        .enumerate()
        .map(|(i, &child)| {
            let data = &egraph[child].data;
            data.single()
                .cloned()
                .ok_or_else(|| NodeTypeError::NotSingle {
                    index: i,
                    node: enode.name(),
                    types: data.types.clone(),
                })
        })
        .collect()
}

/// The result types of `enode` from its operands' types.
pub fn node_types(egraph: &EGraph, enode: &ENode) -> Result<Vec<TensorType>, NodeTypeError> {
    match enode.node_op() {
        NodeOp::Project(index) => {
            let tuple = &egraph[enode.children()[0]].data.types;
            tuple
                .get(*index)
                .cloned()
                .map(|t| vec![t])
                .ok_or_else(|| NodeTypeError::Projection {
                    index: *index,
                    types: tuple.clone(),
                })
        }
        NodeOp::Graph(op) => Ok(verify::infer(op, &operand_types(egraph, enode)?)?),
    }
}

fn node_load_time(egraph: &EGraph, enode: &ENode) -> bool {
    match enode.op() {
        Some(Op::Input { kind, .. }) => *kind == InputKind::Weight,
        Some(Op::Constant { .. }) => true,
        _ => {
            !enode.children().is_empty()
                && enode.children().iter().all(|&c| egraph[c].data.load_time)
        }
    }
}

impl Analysis<ENode> for TypeAnalysis {
    type Data = ClassData;

    fn make(egraph: &mut EGraph, enode: &ENode, _id: Id) -> ClassData {
        let load_time = node_load_time(egraph, enode);
        let types = match node_types(egraph, enode) {
            Ok(types) => types,
            Err(message) => {
                egraph
                    .analysis
                    .problems
                    .push(format!("{enode:?} has no type: {message}"));
                Vec::new()
            }
        };
        ClassData { types, load_time }
    }

    fn merge(&mut self, a: &mut ClassData, b: ClassData) -> DidMerge {
        if a.types != b.types {
            self.problems.push(format!(
                "merged e-classes disagree on their type: {} and {}",
                show_types(&a.types),
                show_types(&b.types)
            ));
        }
        let load_time = a.load_time || b.load_time;
        let did = DidMerge(load_time != a.load_time, load_time != b.load_time);
        a.load_time = load_time;
        did
    }
}
