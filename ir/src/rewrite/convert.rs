//! Graph ⇄ e-graph.
//!
//! [`to_egraph`] adds the graph's nodes in order: each op becomes an e-node over its operands'
//! e-classes; a multi-result node becomes a tuple e-class whose results are read through
//! `Project(i)` nodes. Graph inputs keep their names, kinds and types (they are `Input` ops),
//! and the graph's named outputs become the roots, in order. Identical nodes (same op, same
//! operands) fall into one e-class; every op is pure, so that is common-subexpression
//! elimination. Each e-class remembers the label of the first graph node that produced it.
//!
//! [`to_graph`] rebuilds a graph from one chosen e-node per e-class: a depth-first walk from
//! the outputs, in output order and operand order, so the same choice always gives the same
//! graph. Projections become value references (`%node.i`); graph inputs that nothing reads
//! any more are kept, after the rest, so the graph's interface does not change. A node whose
//! e-class has no label of its own is named after the node that first reads it.

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
    /// `(e-class, label)` of every graph node, in graph order.
    pub labels: Vec<(Id, String)>,
}

/// Adds every node of `graph` to a new e-graph.
pub fn to_egraph(graph: &Graph) -> Result<Converted, RewriteError> {
    graph.verify().map_err(RewriteError::InvalidInput)?;
    let mut egraph = EGraph::new(TypeAnalysis::default());
    let mut values: HashMap<ValueId, Id> = HashMap::new();
    let mut inputs = Vec::new();
    let mut labels = Vec::new();
    for (index, node) in graph.nodes.iter().enumerate() {
        let children = node.inputs.iter().map(|v| values[v]).collect::<Vec<Id>>();
        let id = egraph.add(ENode::new(node.op.clone(), children));
        labels.push((id, node.label.clone()));
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
                labels.push((projection, format!("{}.{output}", node.label)));
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
        labels,
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
    let mut class_labels: HashMap<Id, &str> = HashMap::new();
    for (id, label) in &converted.labels {
        class_labels.entry(egraph.find(*id)).or_insert(label);
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
    // new node comes just before its first reader. Entries: (class, expanded, reader label).
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
        .labels
        .iter()
        .map(|(id, _)| egraph.find(*id))
        .filter(|id| needed.contains(id) || inputs.contains_key(id))
        .collect();
    for root in roots {
        let mut stack: Vec<(Id, bool, Rc<str>)> = vec![(root, false, Rc::from("output"))];
        while let Some((class, expanded, reader)) = stack.pop() {
            if values.contains_key(&class) {
                continue;
            }
            let node = choice
                .get(&class)
                .or_else(|| inputs.get(&class))
                .ok_or_else(|| extraction(format!("no e-node was chosen for e-class {class}")))?;
            let label: Rc<str> = match class_labels.get(&class) {
                Some(label) => Rc::from(*label),
                None => Rc::from(format!("{reader}.{}", node.name())),
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
                        stack.push((child, false, label.clone()));
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
