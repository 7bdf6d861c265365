//! The e-graph language: one e-node per graph [`Op`], plus projections of multi-result ops.
//!
//! An [`ENode`] is an operation and its operand e-classes. Graph ops appear as themselves, with
//! all their attributes (an `Input` keeps its name, kind and type; a `Transpose` its
//! permutation), so converting back to a graph is exact. A node with several results (`TopK`,
//! `MoeRouter`, `AddRmsNorm`, …) stands for a tuple; its results are read through explicit
//! `Project(i)` nodes, so every other e-class holds one tensor value.
//!
//! Equality, hashing and order go through a canonical text key of the op (its `Debug` form),
//! computed once per node and shared by reference, so e-nodes are cheap to clone and hash,
//! and ordering them (as egg does inside e-classes) is deterministic and independent of memory
//! addresses or interning order.

use crate::op::Op;
use egg::{Id, Language};
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// What an e-node computes.
#[derive(Clone, Debug, PartialEq)]
pub enum NodeOp {
    /// A graph operation.
    Graph(Op),
    /// Result `i` of the multi-result node in the single operand's e-class.
    Project(usize),
}

#[derive(Debug)]
struct Entry {
    op: NodeOp,
    key: String,
    name: &'static str,
}

/// An e-node: an operation and its operand e-classes.
#[derive(Clone)]
pub struct ENode {
    entry: Arc<Entry>,
    children: Vec<Id>,
}

impl ENode {
    /// A graph op applied to operand e-classes.
    pub fn new(op: Op, children: Vec<Id>) -> ENode {
        let key = format!("{op:?}");
        let name = op.name();
        ENode {
            entry: Arc::new(Entry {
                op: NodeOp::Graph(op),
                key,
                name,
            }),
            children,
        }
    }

    /// Result `index` of the multi-result node in e-class `tuple`.
    pub fn project(index: usize, tuple: Id) -> ENode {
        ENode {
            entry: Arc::new(Entry {
                op: NodeOp::Project(index),
                key: format!("Project({index})"),
                name: "project",
            }),
            children: vec![tuple],
        }
    }

    /// What the node computes.
    pub fn node_op(&self) -> &NodeOp {
        &self.entry.op
    }

    /// The graph op, or `None` for a projection.
    pub fn op(&self) -> Option<&Op> {
        match &self.entry.op {
            NodeOp::Graph(op) => Some(op),
            NodeOp::Project(_) => None,
        }
    }

    /// The projected result index, for a projection.
    pub fn projection(&self) -> Option<usize> {
        match &self.entry.op {
            NodeOp::Project(index) => Some(*index),
            NodeOp::Graph(_) => None,
        }
    }

    /// The op's short name (`Op::name`), or `project`.
    pub fn name(&self) -> &'static str {
        self.entry.name
    }

    /// The canonical key of the op (without operands).
    pub fn key(&self) -> &str {
        &self.entry.key
    }
}

impl PartialEq for ENode {
    fn eq(&self, other: &ENode) -> bool {
        (Arc::ptr_eq(&self.entry, &other.entry) || self.entry.key == other.entry.key)
            && self.children == other.children
    }
}

impl Eq for ENode {}

impl Hash for ENode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.entry.key.hash(state);
        self.children.hash(state);
    }
}

impl PartialOrd for ENode {
    fn partial_cmp(&self, other: &ENode) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ENode {
    fn cmp(&self, other: &ENode) -> Ordering {
        self.entry
            .key
            .cmp(&other.entry.key)
            .then_with(|| self.children.cmp(&other.children))
    }
}

impl fmt::Debug for ENode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{:?}", self.entry.key, self.children)
    }
}

impl fmt::Display for ENode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.entry.name)
    }
}

impl Language for ENode {
    type Discriminant = &'static str;

    fn discriminant(&self) -> &'static str {
        self.entry.name
    }

    fn matches(&self, other: &ENode) -> bool {
        self.entry.key == other.entry.key && self.children.len() == other.children.len()
    }

    fn children(&self) -> &[Id] {
        &self.children
    }

    fn children_mut(&mut self) -> &mut [Id] {
        &mut self.children
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    #[test]
    fn equal_ops_are_equal_nodes() {
        let a = ENode::new(
            Op::Constant {
                value: 1.0,
                dtype: DType::F32,
            },
            vec![],
        );
        let b = ENode::new(
            Op::Constant {
                value: 1.0,
                dtype: DType::F32,
            },
            vec![],
        );
        let c = ENode::new(
            Op::Constant {
                value: 1.0,
                dtype: DType::F16,
            },
            vec![],
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.discriminant(), "constant");
        let p = ENode::project(1, Id::from(3));
        assert_eq!(p.projection(), Some(1));
        assert!(p.op().is_none());
        assert_ne!(p, ENode::project(0, Id::from(3)));
    }
}
