//! # ir::rewrite — equality saturation over tensor graphs
//!
//! [`optimize`] turns a verified graph into an equivalent one with fused ops:
//!
//! 1. `convert`: the graph becomes an egg e-graph over [`language::ENode`] (graph ops plus
//!    projections of multi-result ops), each e-class typed by [`analysis::TypeAnalysis`];
//! 2. `stage`: staged rule sets run with node, iteration and time limits — simplification
//!    (`rules::simplify`), fixed-pattern fusion (`rules::fusion`, `rules::attention`) and
//!    elementwise fusion (`rules::elementwise`) — each stage reporting why it stopped and how
//!    often each rule applied;
//! 3. `extract`: one e-node per e-class is chosen by a DAG-aware cost model of the target
//!    (kernel launches, bytes moved, FLOPs);
//! 4. `convert` again: the choice becomes a graph with the same inputs (names, kinds, types)
//!    and the same named outputs, which is verified before it is returned.
//!
//! The rewritten graph computes the same values under `ir::interp` (up to f32 rounding where a
//! fused op keeps an intermediate unrounded, see `op`). Output is deterministic: the same
//! graph and options give the same graph, because conversion, rules and extraction iterate in
//! fixed orders (node order, e-class id order, canonical op keys), never in hash order.
//!
//! ```
//! use kiln_ir::rewrite::{optimize, RewriteOptions};
//! use kiln_ir::{dtype::DType, graph::Graph, op::{InputKind, Op}, shape};
//! // A SwiGLU MLP as a model builder (`kiln-models`) writes it: silu(x·gateᵀ) ⊙ (x·upᵀ).
//! let mut mlp = Graph::new("mlp");
//! let f32 = DType::F32;
//! let x = mlp.input("x", InputKind::Activation, f32, shape!["tokens", 64]).unwrap();
//! let gate_w = mlp.input("gate.weight", InputKind::Weight, f32, shape![256, 64]).unwrap();
//! let up_w = mlp.input("up.weight", InputKind::Weight, f32, shape![256, 64]).unwrap();
//! let gate = mlp.add1("gate", Op::Linear, &[x, gate_w]).unwrap();
//! let up = mlp.add1("up", Op::Linear, &[x, up_w]).unwrap();
//! let silu = mlp.add1("silu", Op::Silu, &[gate]).unwrap();
//! let y = mlp.add1("gate_mul_up", Op::Mul, &[silu, up]).unwrap();
//! mlp.output("y", y);
//! let (fused, report) = optimize(&mlp, &RewriteOptions::default()).unwrap();
//! assert!(fused.nodes.iter().any(|n| n.op.name() == "swiglu_linear"));
//! assert!(report.after.launches < report.before.launches);
//! ```

pub mod analysis;
pub mod convert;
pub mod extract;
pub mod language;
pub mod rules;
pub mod stage;

pub use extract::{CostModel, GraphSummary, Target, Work};
pub use rules::RuleSet;
pub use stage::{default_stages, Stage, StageLimits, StageReport, StageStop};

use crate::cost::CostError;
use crate::graph::Graph;
use crate::op::Op;
use crate::shape::{Bindings, Dim};
use crate::verify::VerifyError;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Instant;

/// How to rewrite.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RewriteOptions {
    /// The stages, run in order.
    pub stages: Vec<Stage>,
    /// The machine the cost model describes.
    pub target: Target,
    /// Sizes of symbolic dimensions for the cost model; a dimension not bound here counts
    /// as 1.
    pub bindings: Bindings,
    /// Rules not to run, by name.
    pub disabled_rules: BTreeSet<String>,
}

impl Default for RewriteOptions {
    /// [`default_stages`] for an H100, at batch 1, 128 prompt tokens, a 4096-token context.
    fn default() -> RewriteOptions {
        RewriteOptions {
            stages: default_stages(),
            target: Target::h100(),
            bindings: Bindings::from_pairs(&[("batch", 1), ("seq", 128), ("ctx", 4096)]),
            disabled_rules: BTreeSet::new(),
        }
    }
}

/// Why a graph could not be rewritten.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RewriteError {
    /// The input graph does not verify.
    #[error("the graph to rewrite does not verify: {0}")]
    InvalidInput(VerifyError),
    /// Two merged e-classes (or a rule's two sides) have different types: a wrong rule.
    #[error("type conflict in stage `{stage}` (a rewrite rule is wrong): {message}")]
    TypeConflict { stage: String, message: String },
    /// The cost model could not cost a node of the graph.
    #[error("cost model: {0}")]
    Cost(#[source] CostError),
    /// The cost model could not cost an e-node.
    #[error("cost model: {enode:?}: {source}")]
    NodeCost {
        enode: language::ENode,
        #[source]
        source: Box<extract::WorkError>,
    },
    /// No graph could be built from the e-graph.
    #[error("extraction: {0}")]
    Extraction(String),
    /// The rewritten graph does not verify: a bug in the rewriter.
    #[error("the rewritten graph does not verify (a rewriter bug): {0}")]
    InvalidOutput(VerifyError),
}

/// What [`optimize`] did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RewriteReport {
    pub graph: String,
    pub target: String,
    pub stages: Vec<StageReport>,
    /// Applications per rule over all stages.
    pub applied: BTreeMap<String, usize>,
    /// The input and output graphs, counted and costed by the same model.
    pub before: GraphSummary,
    pub after: GraphSummary,
    /// The e-graph when extraction started.
    pub egraph_nodes: usize,
    pub egraph_classes: usize,
    /// Worklist steps of the DAG extraction.
    pub extraction_steps: usize,
    pub seconds: f64,
}

impl RewriteReport {
    /// Whether any stage was stopped by a limit.
    pub fn hit_limit(&self) -> bool {
        self.stages.iter().any(|s| s.stop.hit_limit())
    }
}

impl fmt::Display for RewriteReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "rewrite of {} for {}: {:.1} ms, e-graph {} e-nodes / {} e-classes",
            self.graph,
            self.target,
            self.seconds * 1e3,
            self.egraph_nodes,
            self.egraph_classes
        )?;
        for stage in &self.stages {
            write!(f, "{stage}")?;
        }
        for (name, s) in [("before", &self.before), ("after", &self.after)] {
            writeln!(
                f,
                "{name}: {} nodes, {} kernel-like ({} at load time), {} launches, {:.3} MB, \
                 {:.3} GFLOP, est. {:.1} µs",
                s.nodes,
                s.kernel_like,
                s.load_time,
                s.launches,
                s.bytes / 1e6,
                s.flops / 1e9,
                s.seconds * 1e6
            )?;
        }
        Ok(())
    }
}

/// The number of kernel-like nodes of `graph`: every node but inputs, constants and reshapes.
pub fn kernel_like_nodes(graph: &Graph) -> usize {
    graph
        .nodes
        .iter()
        .filter(|n| !extract::is_free(&n.op))
        .count()
}

/// `options.bindings`, with every other symbolic dimension of the graph's inputs bound to 1.
fn complete_bindings(graph: &Graph, options: &RewriteOptions) -> Bindings {
    let mut bindings = options.bindings.clone();
    for node in &graph.nodes {
        if let Op::Input { shape, .. } = &node.op {
            for dim in shape.dims() {
                if let Dim::Sym(name) = dim {
                    if bindings.get(name).is_none() {
                        bindings.set(name, 1);
                    }
                }
            }
        }
    }
    bindings
}

/// Rewrites `graph` into an equivalent graph with fused ops; see the module docs.
pub fn optimize(
    graph: &Graph,
    options: &RewriteOptions,
) -> Result<(Graph, RewriteReport), RewriteError> {
    let started = Instant::now();
    let model = CostModel {
        target: options.target.clone(),
        bindings: complete_bindings(graph, options),
    };
    let before = extract::summarize(graph, &model).map_err(RewriteError::Cost)?;
    let mut converted = convert::to_egraph(graph)?;
    let mut stages = Vec::with_capacity(options.stages.len());
    let mut applied: BTreeMap<String, usize> = BTreeMap::new();
    for stage in &options.stages {
        let rules = stage.rules(&options.disabled_rules);
        let egraph = std::mem::take(&mut converted.egraph);
        let (egraph, report) = stage::run_stage(egraph, stage, &rules);
        converted.egraph = egraph;
        if let Some(problem) = converted.egraph.analysis.problems.first() {
            return Err(RewriteError::TypeConflict {
                stage: stage.name.clone(),
                message: problem.clone(),
            });
        }
        for (rule, count) in &report.applied {
            *applied.entry(rule.clone()).or_default() += count;
        }
        stages.push(report);
    }
    let egraph = &converted.egraph;
    let roots: Vec<_> = converted.outputs.iter().map(|(_, id)| *id).collect();
    let extraction = extract::extract(egraph, &roots, &model)?;
    let rewritten = convert::to_graph(&graph.name, egraph, &converted, &extraction.choice)?;
    rewritten.verify().map_err(RewriteError::InvalidOutput)?;
    let after = extract::summarize(&rewritten, &model).map_err(RewriteError::Cost)?;
    let report = RewriteReport {
        graph: graph.name.clone(),
        target: options.target.name.clone(),
        stages,
        applied,
        before,
        after,
        egraph_nodes: egraph.total_size(),
        egraph_classes: egraph.number_of_classes(),
        extraction_steps: extraction.steps,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((rewritten, report))
}
