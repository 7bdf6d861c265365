//! Extraction: choosing one e-node per e-class by a cost model of the target.
//!
//! The cost of a node is the time it would take on the [`Target`]: a kernel launch plus the
//! larger of its memory time (bytes moved / bandwidth) and its compute time (FLOPs / peak), a
//! roofline. Bytes and FLOPs come from `cost::node_cost`, the same counts `kiln inspect`
//! reports, with symbolic dimensions bound by [`CostModel::bindings`]. Layout-only nodes
//! (`reshape`, projections), inputs and constants cost nothing, and so does a node that
//! depends only on weights and constants: it runs once at load time, not per call.
//!
//! Extraction is DAG-aware. A tree cost counts a value once per reader, so it would, for
//! example, choose a residual add and a fused add + RMSNorm that recomputes it at the same
//! time. Here every e-class keeps the set of e-classes its current choice needs (a bitset) and
//! its cost is the sum of their node costs, each counted once. Choices are improved with a
//! worklist until nothing changes (the "greedy DAG" method): an e-class is re-examined when a
//! class it reads changes. A choice that would need its own e-class is a cycle and is never
//! taken. The greedy method settles each e-class for itself, so a local search follows: switch
//! one reached e-class to another of its e-nodes (with the e-classes that can read other
//! results of the same multi-result node), and keep the switch when the cost of the whole
//! extraction, every e-class counted once, drops. Everything iterates in e-class id order and
//! ties keep the earlier choice, so the result is deterministic.

use super::analysis::{EGraph, NodeTypeError};
use super::language::{ENode, NodeOp};
use super::RewriteError;
use crate::cost::{node_cost, CostError};
use crate::graph::{Graph, Node, ValueId};
use crate::op::{InputKind, Op};
use crate::shape::Bindings;
use egg::{Id, Language};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// The machine extraction optimises for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    /// Memory bandwidth, bytes per second (read + write).
    pub bandwidth: f64,
    /// Peak arithmetic rate, FLOP per second.
    pub flops: f64,
    /// Fixed cost of one kernel launch, seconds.
    pub launch: f64,
}

impl Target {
    /// An H100 (figures from DESIGN.md: 2973 GB/s copy bandwidth, ~736 TFLOP/s f16 GEMM)
    /// with a few microseconds per launch.
    pub fn h100() -> Target {
        Target {
            name: "h100".to_string(),
            bandwidth: 2.97e12,
            flops: 7.36e14,
            launch: 4e-6,
        }
    }

    /// The development CPU (99 GB/s host copy bandwidth; a call costs little).
    pub fn cpu() -> Target {
        Target {
            name: "cpu".to_string(),
            bandwidth: 9.9e10,
            flops: 1e12,
            launch: 2e-7,
        }
    }
}

/// Launches, bytes and FLOPs of some work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Work {
    pub launches: f64,
    pub bytes: f64,
    pub flops: f64,
}

impl Work {
    /// Estimated seconds on `target`: launches, plus the roofline (the larger of memory and
    /// compute time) with a thousandth of the smaller added, since the overlap of the two is
    /// never perfect (and so that, of two forms moving the same bytes, the one that computes
    /// less is chosen).
    pub fn seconds(&self, target: &Target) -> f64 {
        let memory = self.bytes / target.bandwidth;
        let compute = self.flops / target.flops;
        self.launches * target.launch + memory.max(compute) + 1e-3 * memory.min(compute)
    }
}

/// Why the work of an e-node could not be estimated: its operands have no single type, or the
/// cost model could not count it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum WorkError {
    #[error(transparent)]
    Operands(#[from] NodeTypeError),
    #[error(transparent)]
    Cost(#[from] CostError),
}

/// A target and the sizes of symbolic dimensions.
#[derive(Clone, Debug)]
pub struct CostModel {
    pub target: Target,
    pub bindings: Bindings,
}

/// Bytes of the scalar (rank-0) operands among `types`: they are kernel parameters, not
/// memory traffic, so the cost model does not count them.
fn scalar_bytes(types: &[crate::graph::TensorType]) -> f64 {
    types
        .iter()
        .filter(|t| t.shape.rank() == 0)
        .map(|t| t.dtype.bits() as f64 / 8.0)
        .sum()
}

/// Whether an op moves no data and launches nothing (views, inputs, constants).
pub fn is_free(op: &Op) -> bool {
    matches!(
        op,
        Op::Input { .. } | Op::Constant { .. } | Op::Reshape { .. }
    )
}

impl CostModel {
    /// The work of `node` applied to operands of types `operand_types`.
    fn op_work(
        &self,
        op: &Op,
        operand_types: &[crate::graph::TensorType],
        outputs: &[crate::graph::TensorType],
    ) -> Result<Work, CostError> {
        if is_free(op) {
            return Ok(Work::default());
        }
        // A scratch graph of inputs of the operand types and the node itself.
        let mut scratch = Graph::new("cost");
        for (i, ty) in operand_types.iter().enumerate() {
            scratch.nodes.push(Node {
                op: Op::Input {
                    name: format!("x{i}"),
                    kind: InputKind::Activation,
                    dtype: ty.dtype,
                    shape: ty.shape.clone(),
                },
                inputs: Vec::new(),
                outputs: vec![ty.clone()],
                label: String::new(),
                layer: None,
            });
        }
        let node = Node {
            op: op.clone(),
            inputs: (0..operand_types.len())
                .map(|node| ValueId { node, output: 0 })
                .collect(),
            outputs: outputs.to_vec(),
            label: String::new(),
            layer: None,
        };
        let (flops, bytes) = node_cost(&scratch, &node, &self.bindings)?;
        Ok(Work {
            launches: 1.0,
            bytes: bytes - scalar_bytes(operand_types),
            flops,
        })
    }

    /// The per-call work of e-node `node` of e-class `class`.
    pub fn enode_work(&self, egraph: &EGraph, class: Id, node: &ENode) -> Result<Work, WorkError> {
        let NodeOp::Graph(op) = node.node_op() else {
            return Ok(Work::default());
        };
        if is_free(op) || node.children().iter().all(|&c| egraph[c].data.load_time) {
            return Ok(Work::default());
        }
        let operand_types = super::analysis::operand_types(egraph, node)?;
        Ok(self.op_work(op, &operand_types, &egraph[class].data.types)?)
    }
}

/// Counts and estimated cost of a graph.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GraphSummary {
    /// All nodes.
    pub nodes: usize,
    /// Nodes other than inputs, constants and reshapes.
    pub kernel_like: usize,
    /// Kernel-like nodes that depend only on weights and constants (run once at load time).
    pub load_time: usize,
    /// Kernel-like nodes run per call (`kernel_like − load_time`): the kernel launches.
    pub launches: usize,
    /// Per-call bytes and FLOPs.
    pub bytes: f64,
    pub flops: f64,
    /// Estimated seconds per call on the target.
    pub seconds: f64,
    /// Node count per op name, for the kernel-like nodes.
    pub ops: BTreeMap<String, usize>,
}

/// Counts the nodes of `graph` and estimates its per-call cost under `model`.
pub fn summarize(graph: &Graph, model: &CostModel) -> Result<GraphSummary, CostError> {
    let mut load_time: Vec<Vec<bool>> = Vec::with_capacity(graph.nodes.len());
    let mut summary = GraphSummary {
        nodes: graph.nodes.len(),
        ..GraphSummary::default()
    };
    let mut work = Work::default();
    for (index, node) in graph.nodes.iter().enumerate() {
        let at_load = match &node.op {
            Op::Input { kind, .. } => *kind == InputKind::Weight,
            Op::Constant { .. } => true,
            _ => !node.inputs.is_empty() && node.inputs.iter().all(|v| load_time[v.node][v.output]),
        };
        load_time.push(vec![at_load; node.outputs.len()]);
        if is_free(&node.op) {
            continue;
        }
        summary.kernel_like += 1;
        *summary.ops.entry(node.op.name().to_string()).or_default() += 1;
        if at_load {
            summary.load_time += 1;
            continue;
        }
        let (flops, bytes) =
            node_cost(graph, node, &model.bindings).map_err(|source| CostError::Node {
                index,
                label: node.label.clone(),
                source: Box::new(source),
            })?;
        let operand_types: Vec<_> = node
            .inputs
            .iter()
            .map(|v| graph.nodes[v.node].outputs[v.output].clone())
            .collect();
        work.launches += 1.0;
        work.bytes += bytes - scalar_bytes(&operand_types);
        work.flops += flops;
    }
    summary.launches = summary.kernel_like - summary.load_time;
    summary.bytes = work.bytes;
    summary.flops = work.flops;
    summary.seconds = work.seconds(&model.target);
    Ok(summary)
}

/// A fixed-size set of e-class indices.
#[derive(Clone, Debug, PartialEq, Eq)]
struct BitSet(Vec<u64>);

impl BitSet {
    fn new(size: usize) -> BitSet {
        BitSet(vec![0; size.div_ceil(64)])
    }
    fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn contains(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
    fn union_with(&mut self, other: &BitSet) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a |= b;
        }
    }
    fn sum(&self, values: &[f64]) -> f64 {
        let mut total = 0.0;
        for (w, &word) in self.0.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let i = w * 64 + bits.trailing_zeros() as usize;
                total += values[i];
                bits &= bits - 1;
            }
        }
        total
    }
}

/// One candidate e-node of an e-class.
struct Candidate {
    node: ENode,
    children: Vec<usize>,
    /// The children that are not leaves (see `extract`).
    inner: Vec<usize>,
    seconds: f64,
}

struct Choice {
    candidate: usize,
    needs: BitSet,
}

/// The chosen e-node per e-class needed by the roots, and what they cost together.
pub struct Extraction {
    /// Chosen e-node (operands canonical) per canonical e-class id.
    pub choice: BTreeMap<Id, ENode>,
    /// Estimated seconds per call of everything the roots need, each e-class counted once.
    pub seconds: f64,
    /// Worklist steps taken.
    pub steps: usize,
}

/// Chooses the e-nodes that compute `roots` at the least DAG cost under `model`.
pub fn extract(
    egraph: &EGraph,
    roots: &[Id],
    model: &CostModel,
) -> Result<Extraction, RewriteError> {
    let mut ids: Vec<Id> = egraph.classes().map(|c| c.id).collect();
    ids.sort();
    let index: BTreeMap<Id, usize> = ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let n = ids.len();
    let mut candidates: Vec<Vec<Candidate>> = Vec::with_capacity(n);
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (c, &id) in ids.iter().enumerate() {
        let mut list = Vec::new();
        for node in &egraph[id].nodes {
            let node = node.clone().map_children(|child| egraph.find(child));
            let children: Vec<usize> = node.children().iter().map(|ch| index[ch]).collect();
            let work =
                model
                    .enode_work(egraph, id, &node)
                    .map_err(|source| RewriteError::NodeCost {
                        enode: node.clone(),
                        source: Box::new(source),
                    })?;
            let mut seconds = work.seconds(&model.target);
            if work.launches > 0.0 {
                // Never free, so that no cycle of nodes can look as cheap as its entry.
                seconds += 1e-15;
            }
            for &child in &children {
                if !readers[child].contains(&c) {
                    readers[child].push(c);
                }
            }
            list.push(Candidate {
                node,
                children,
                inner: Vec::new(),
                seconds,
            });
        }
        candidates.push(list);
    }

    let mut chosen: Vec<Option<Choice>> = (0..n).map(|_| None).collect();
    // Sets hold only e-classes with an operand somewhere: leaves (inputs, constants) cost
    // nothing and cannot be on a cycle, and most e-classes of a big model are weights.
    let mut bit_of = vec![usize::MAX; n];
    let mut bits = 0usize;
    for (c, list) in candidates.iter().enumerate() {
        if list.iter().any(|cand| !cand.children.is_empty()) {
            bit_of[c] = bits;
            bits += 1;
        }
    }
    let mut own = vec![0.0f64; bits];
    for list in candidates.iter_mut() {
        for candidate in list.iter_mut() {
            candidate.inner = candidate
                .children
                .iter()
                .copied()
                .filter(|&ch| bit_of[ch] != usize::MAX)
                .collect();
        }
    }
    // Start in an order where operands come before their readers (a depth-first post-order,
    // e-class id order among equals; a cycle is cut where the walk meets it), so that most
    // e-classes are settled on first visit and changes rarely travel up the graph again.
    let mut queue: VecDeque<usize> = VecDeque::with_capacity(n);
    let mut state = vec![0u8; n]; // 0 unseen, 1 on the walk, 2 done
    let operand_lists: Vec<Vec<usize>> = candidates
        .iter()
        .map(|list| {
            list.iter()
                .flat_map(|cand| cand.children.iter().copied())
                .collect()
        })
        .collect();
    for start in 0..n {
        if state[start] != 0 {
            continue;
        }
        let mut walk: Vec<(usize, usize)> = vec![(start, 0)];
        state[start] = 1;
        while let Some(&mut (c, ref mut next)) = walk.last_mut() {
            if let Some(&child) = operand_lists[c].get(*next) {
                *next += 1;
                if state[child] == 0 {
                    state[child] = 1;
                    walk.push((child, 0));
                }
            } else {
                state[c] = 2;
                queue.push_back(c);
                walk.pop();
            }
        }
    }
    let mut queued = vec![true; n];
    let mut steps = 0usize;
    let max_steps = 50 * n + 1000;
    while let Some(c) = queue.pop_front() {
        queued[c] = false;
        steps += 1;
        if steps > max_steps {
            break;
        }
        let mut best: Option<(f64, usize, BitSet)> = None;
        let mut current: Option<(f64, BitSet)> = None;
        for (k, candidate) in candidates[c].iter().enumerate() {
            if candidate
                .children
                .iter()
                .any(|&ch| ch == c || chosen[ch].is_none())
            {
                continue;
            }
            let mut needs = BitSet::new(bits);
            for &ch in &candidate.children {
                needs.union_with(&chosen[ch].as_ref().expect("checked").needs);
            }
            let bit = bit_of[c];
            if bit != usize::MAX && needs.contains(bit) {
                continue;
            }
            let total = candidate.seconds + needs.sum(&own);
            if bit != usize::MAX {
                needs.insert(bit);
            }
            if chosen[c].as_ref().is_some_and(|ch| ch.candidate == k) {
                current = Some((total, needs.clone()));
            }
            if best.as_ref().is_none_or(|(t, _, _)| total < *t) {
                best = Some((total, k, needs));
            }
        }
        // Keep the current choice unless another is cheaper by a clear margin.
        let next = match (best, current) {
            (Some((t, k, needs)), Some((tc, current_needs))) => {
                if t < tc * (1.0 - 1e-9) - 1e-18 {
                    Some((k, needs))
                } else {
                    let k = chosen[c].as_ref().expect("current").candidate;
                    Some((k, current_needs))
                }
            }
            (Some((_, k, needs)), None) => Some((k, needs)),
            (None, _) => None,
        };
        let Some((k, needs)) = next else {
            continue;
        };
        let changed = match &chosen[c] {
            Some(old) => old.candidate != k || old.needs != needs,
            None => true,
        };
        if changed {
            if bit_of[c] != usize::MAX {
                own[bit_of[c]] = candidates[c][k].seconds;
            }
            chosen[c] = Some(Choice {
                candidate: k,
                needs,
            });
            for &reader in &readers[c] {
                if !queued[reader] {
                    queued[reader] = true;
                    queue.push_back(reader);
                }
            }
        }
    }

    // Refine: the greedy choice settles each e-class on its own, so two readers of one value
    // can pick forms that compute it twice (a residual add, and the fused add + RMSNorm that
    // also yields it). Try switching one e-class at a time (together with the e-classes that
    // can read another result of the same multi-result node) and keep a switch when the whole
    // extraction, each e-class counted once, gets cheaper.
    let root_classes: Vec<usize> = roots
        .iter()
        .map(|root| {
            index
                .get(&egraph.find(*root))
                .copied()
                .ok_or_else(|| RewriteError::Extraction(format!("root {root} is not an e-class")))
        })
        .collect::<Result<_, _>>()?;
    let mut pick: Vec<Option<usize>> = chosen
        .iter()
        .map(|c| c.as_ref().map(|c| c.candidate))
        .collect();
    let mut siblings: BTreeMap<usize, Vec<(usize, usize)>> = BTreeMap::new();
    for (c, list) in candidates.iter().enumerate() {
        for (k, candidate) in list.iter().enumerate() {
            if candidate.node.projection().is_some() {
                siblings
                    .entry(candidate.children[0])
                    .or_default()
                    .push((c, k));
            }
        }
    }
    let mut total = Total::new(n);
    let mut best = total.cost(&root_classes, &pick, &candidates);
    // Only e-classes the current extraction reaches can change its cost.
    let mut reached = total.reached();
    for _pass in 0..4 {
        let mut improved = false;
        for c in 0..n {
            for k in 0..candidates[c].len() {
                if !reached[c] || pick[c] == Some(k) || pick[c].is_none() {
                    continue;
                }
                let mut moves = vec![(c, k)];
                if candidates[c][k].node.projection().is_some() {
                    let tuple = candidates[c][k].children[0];
                    moves.extend(
                        siblings[&tuple]
                            .iter()
                            .filter(|&&(d, _)| d != c && pick[d].is_some()),
                    );
                }
                let undo: Vec<(usize, Option<usize>)> =
                    moves.iter().map(|&(d, _)| (d, pick[d])).collect();
                for &(d, kd) in &moves {
                    pick[d] = Some(kd);
                }
                let cost = total.cost(&root_classes, &pick, &candidates);
                if cost < best * (1.0 - 1e-9) - 1e-18 {
                    best = cost;
                    improved = true;
                    reached = total.reached();
                } else {
                    for (d, old) in undo.into_iter().rev() {
                        pick[d] = old;
                    }
                }
            }
        }
        if !improved {
            break;
        }
    }
    if !best.is_finite() {
        return Err(RewriteError::Extraction(
            "no acyclic choice computes the outputs".to_string(),
        ));
    }

    // Collect the choices the roots need.
    let mut choice = BTreeMap::new();
    let mut stack: Vec<usize> = root_classes.clone();
    while let Some(c) = stack.pop() {
        if choice.contains_key(&ids[c]) {
            continue;
        }
        let picked = pick[c].ok_or_else(|| {
            RewriteError::Extraction(format!(
                "no acyclic choice for e-class {} ({:?})",
                ids[c], egraph[ids[c]].nodes
            ))
        })?;
        let candidate = &candidates[c][picked];
        choice.insert(ids[c], candidate.node.clone());
        stack.extend(candidate.children.iter().copied());
    }
    Ok(Extraction {
        choice,
        seconds: best,
        steps,
    })
}

/// The DAG cost of a whole choice: each e-class the roots need counted once (leaves, which
/// cost nothing, are not visited); infinite when the choice has a cycle or misses an e-class.
struct Total {
    done: Vec<u32>,
    on_walk: Vec<u32>,
    epoch: u32,
}

impl Total {
    fn new(n: usize) -> Total {
        Total {
            done: vec![0; n],
            on_walk: vec![0; n],
            epoch: 0,
        }
    }

    /// The e-classes the last [`Total::cost`] walk reached (all of them when it was finite).
    fn reached(&self) -> Vec<bool> {
        self.done.iter().map(|&d| d == self.epoch).collect()
    }

    fn cost(
        &mut self,
        roots: &[usize],
        pick: &[Option<usize>],
        candidates: &[Vec<Candidate>],
    ) -> f64 {
        self.epoch += 1;
        let epoch = self.epoch;
        let mut total = 0.0;
        let mut walk: Vec<(usize, usize)> = Vec::new();
        for &root in roots {
            if self.done[root] == epoch {
                continue;
            }
            self.on_walk[root] = epoch;
            walk.push((root, 0));
            while let Some(&mut (c, ref mut next)) = walk.last_mut() {
                let Some(k) = pick[c] else {
                    return f64::INFINITY;
                };
                let candidate = &candidates[c][k];
                if let Some(&child) = candidate.inner.get(*next) {
                    *next += 1;
                    if self.done[child] == epoch {
                        continue;
                    }
                    if self.on_walk[child] == epoch {
                        return f64::INFINITY;
                    }
                    self.on_walk[child] = epoch;
                    walk.push((child, 0));
                } else {
                    self.done[c] = epoch;
                    self.on_walk[c] = 0;
                    total += candidate.seconds;
                    walk.pop();
                }
            }
        }
        total
    }
}
