//! Graph ⇄ e-graph.
//!
//! [`to_egraph`] adds the graph's nodes in order: each op becomes an e-node over its operands'
//! e-classes; a multi-result node becomes a tuple e-class whose results are read through
//! `Project(i)` nodes. Graph inputs keep their names, kinds and types (they are `Input` ops),
//! and the graph's named outputs become the roots, in order. Identical nodes (same op, same
//! operands) fall into one e-class; every op is pure, so that is common-subexpression
//! elimination. Each e-class remembers the label and decoder layer of the first graph node that
//! produced it.
//!
//! [`to_graph`] rebuilds a graph from one chosen e-node per e-class: a depth-first walk from
//! the outputs, in output order and operand order, so the same choice always gives the same
//! graph. Projections become value references (`%node.i`); graph inputs that nothing reads
//! any more are kept, after the rest, so the graph's interface does not change. A node whose
//! e-class has no origin of its own (a node the rules created) is named after the node that
//! first reads it and takes that reader's layer: a fused SwiGLU's stacked weight belongs to the
//! layer of the `swiglu_linear` that reads it.

use super::analysis::{EGraph, TypeAnalysis};
use super::language::{ENode, NodeOp};
use super::RewriteError;
use crate::graph::{Graph, Node, ValueId};
use crate::op::Op;
use egg::{Id, Language};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::rc::Rc;

/// A graph as an e-graph, with what is needed to convert back.
pub struct Converted {
    pub egraph: EGraph,
    /// The graph's named outputs, in order.
    pub outputs: Vec<(String, Id)>,
    /// The e-classes of the graph inputs, in graph order.
    pub inputs: Vec<Id>,
    /// Where every graph node (and every result of a multi-result node) went, in graph
    /// order.
    pub origins: Vec<Origin>,
}

/// A graph node's e-class with the label and decoder layer that the node rebuilt from it
/// inherits.
#[derive(Clone, Debug, PartialEq)]
pub struct Origin {
    pub class: Id,
    pub label: String,
    pub layer: Option<usize>,
}

/// The label and layer of the node that reads a class, for naming a node without an origin.
type Reader = (Rc<str>, Option<usize>);

/// Adds every node of `graph` to a new e-graph.
pub fn to_egraph(graph: &Graph) -> Result<Converted, RewriteError> {
    graph.verify().map_err(RewriteError::InvalidInput)?;
    let mut egraph = EGraph::new(TypeAnalysis::default());
    let mut values: HashMap<ValueId, Id> = HashMap::new();
    let mut inputs = Vec::new();
    let mut origins = Vec::new();
    for (index, node) in graph.nodes.iter().enumerate() {
        let children = node.inputs.iter().map(|v| values[v]).collect::<Vec<Id>>();
        let id = egraph.add(ENode::new(node.op.clone(), children));
        origins.push(Origin {
            class: id,
            label: node.label.clone(),
            layer: node.layer,
        });
        if matches!(node.op, Op::Input { .. }) {
            inputs.push(id);
        }
        if node.outputs.len() == 1 {
            values.insert(
                ValueId {
                    node: index,
                    output: 0,
                },
                id,
            );
        } else {
            for output in 0..node.outputs.len() {
                let projection = egraph.add(ENode::project(output, id));
                origins.push(Origin {
                    class: projection,
                    label: format!("{}.{output}", node.label),
                    layer: node.layer,
                });
                values.insert(
                    ValueId {
                        node: index,
                        output,
                    },
                    projection,
                );
            }
        }
    }
    egraph.rebuild();
    if let Some(problem) = egraph.analysis.problems.first() {
        return Err(RewriteError::TypeConflict {
            stage: "convert".to_string(),
            message: problem.clone(),
        });
    }
    let outputs = graph
        .outputs
        .iter()
        .map(|(name, value)| (name.clone(), values[value]))
        .collect();
    Ok(Converted {
        egraph,
        outputs,
        inputs,
        origins,
    })
}

/// Builds the graph named `name` that computes `converted`'s outputs with the e-node chosen
/// for each e-class (`choice`, keyed by canonical e-class id).
pub fn to_graph(
    name: &str,
    egraph: &EGraph,
    converted: &Converted,
    choice: &BTreeMap<Id, ENode>,
) -> Result<Graph, RewriteError> {
    let mut class_origins: HashMap<Id, &Origin> = HashMap::new();
    for origin in &converted.origins {
        class_origins
            .entry(egraph.find(origin.class))
            .or_insert(origin);
    }
    let mut graph = Graph::new(name);
    let mut values: HashMap<Id, Vec<ValueId>> = HashMap::new();
    let mut in_progress: HashSet<Id> = HashSet::new();
    let extraction = |message: String| RewriteError::Extraction(message);

    // The e-classes the outputs need under `choice`.
    let mut needed: HashSet<Id> = HashSet::new();
    let mut pending: Vec<Id> = converted
        .outputs
        .iter()
        .map(|(_, id)| egraph.find(*id))
        .collect();
    while let Some(class) = pending.pop() {
        if needed.insert(class) {
            if let Some(node) = choice.get(&class) {
                pending.extend(node.children().iter().map(|&c| egraph.find(c)));
            }
        }
    }
    // Iterative post-order walks from the original nodes' e-classes in graph order (inputs
    // included, needed or not), so the new graph keeps the original order where it can and a
    // new node comes just before its first reader. Entries: (class, expanded, reader), the
    // reader's label and layer naming a node whose class has no origin.
    let inputs: HashMap<Id, ENode> = converted
        .inputs
        .iter()
        .filter_map(|&id| {
            let id = egraph.find(id);
            let input = egraph[id]
                .nodes
                .iter()
                .find(|n| matches!(n.op(), Some(Op::Input { .. })))?;
            Some((id, input.clone()))
        })
        .collect();
    let roots: Vec<Id> = converted
        .origins
        .iter()
        .map(|origin| egraph.find(origin.class))
        .filter(|id| needed.contains(id) || inputs.contains_key(id))
        .collect();
    for root in roots {
        let mut stack: Vec<(Id, bool, Reader)> = vec![(root, false, (Rc::from("output"), None))];
        while let Some((class, expanded, reader)) = stack.pop() {
            if values.contains_key(&class) {
                continue;
            }
            let node = choice
                .get(&class)
                .or_else(|| inputs.get(&class))
                .ok_or_else(|| extraction(format!("no e-node was chosen for e-class {class}")))?;
            let (label, layer): Reader = match class_origins.get(&class) {
                Some(origin) => (Rc::from(origin.label.as_str()), origin.layer),
                None => (Rc::from(format!("{}.{}", reader.0, node.name())), reader.1),
            };
            if !expanded {
                if !in_progress.insert(class) {
                    return Err(extraction(format!(
                        "the chosen e-nodes form a cycle through e-class {class} (`{label}`)"
                    )));
                }
                stack.push((class, true, reader));
                for &child in node.children().iter().rev() {
                    let child = egraph.find(child);
                    if !values.contains_key(&child) {
                        stack.push((child, false, (label.clone(), layer)));
                    }
                }
                continue;
            }
            in_progress.remove(&class);
            let operand = |child: &Id| -> Result<Vec<ValueId>, RewriteError> {
                values
                    .get(&egraph.find(*child))
                    .cloned()
                    .ok_or_else(|| extraction(format!("operand e-class {child} was not built")))
            };
            let result = match node.node_op() {
                NodeOp::Project(index) => {
                    let tuple = operand(&node.children()[0])?;
                    let value = *tuple.get(*index).ok_or_else(|| {
                        extraction(format!(
                            "projection {index} of a {}-result node",
                            tuple.len()
                        ))
                    })?;
                    vec![value]
                }
                NodeOp::Graph(op) => {
                    let mut inputs = Vec::with_capacity(node.children().len());
                    for child in node.children() {
                        match operand(child)?.as_slice() {
                            [value] => inputs.push(*value),
                            other => {
                                return Err(extraction(format!(
                                    "operand of `{label}` is a {}-result tuple",
                                    other.len()
                                )))
                            }
                        }
                    }
                    let outputs = egraph[class].data.types.clone();
                    let index = graph.nodes.len();
                    let count = outputs.len();
                    graph.nodes.push(Node {
                        op: op.clone(),
                        inputs,
                        outputs,
                        label: label.to_string(),
                        layer,
                    });
                    (0..count)
                        .map(|output| ValueId {
                            node: index,
                            output,
                        })
                        .collect()
                }
            };
            values.insert(class, result);
        }
    }
    for (name, id) in &converted.outputs {
        let value = match values[&egraph.find(*id)].as_slice() {
            [value] => *value,
            other => {
                return Err(extraction(format!(
                    "output `{name}` is a {}-result tuple",
                    other.len()
                )))
            }
        };
        graph.output(name, value);
    }
    Ok(graph)
}
