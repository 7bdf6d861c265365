//! Rewrite rules and the small framework they share.
//!
//! Every rule is a Rust function over one e-node of chosen op kinds: it inspects the e-node's
//! operand e-classes (their nodes and types), adds the equivalent form it finds, and returns
//! `(existing e-class, new e-class)` pairs to union. Graph rewrites need conditions on types,
//! constants and attributes (permutations, shapes, scales) that an s-expression pattern cannot
//! say, so rules are written as code; egg still drives them ([`Rewrite`] with our own
//! [`Searcher`] and [`Applier`]), counts their applications and enforces the limits.
//!
//! Before a union the applier checks that both sides have the same type; a rule that would
//! merge values of different types is a bug, recorded with both types and the rule's name in
//! the analysis' problem list (see `analysis`).
//!
//! Rule families: [`simplify`] (cancellation, identities, constant folding, cast chains),
//! [`fusion`] (linear epilogues, residual add + RMSNorm, SwiGLU, dequantize + matmul),
//! [`attention`] (softmax(scale·QKᵀ + mask)·V → attention) and [`elementwise`] (chains of
//! elementwise ops → one fused map). No rule reassociates without bound or recurses over
//! lists: every rule either removes an op, folds constants, or replaces a fixed pattern.

pub mod attention;
pub mod elementwise;
pub mod fusion;
pub mod simplify;

use super::analysis::{operand_types, show_types, EGraph, TypeAnalysis};
use super::language::ENode;
use crate::dtype::DType;
use crate::graph::TensorType;
use crate::op::Op;
use crate::verify;
use egg::{
    Applier, Id, Language, PatternAst, Rewrite, SearchMatches, Searcher, Subst, Symbol, Var,
};
use serde::{Deserialize, Serialize};

/// A rewrite over the rewriter's language.
pub type Rule = Rewrite<ENode, TypeAnalysis>;

/// Equalities a rule found: `(existing e-class, new e-class)`.
pub type Found = Vec<(Id, Id)>;

/// A rule body: the e-graph, the matched e-class and one of its e-nodes of the rule's kinds.
pub type RuleFn = fn(&mut EGraph, Id, &ENode) -> Found;

/// A family of rules, as stages name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleSet {
    /// [`simplify`].
    Simplify,
    /// [`fusion`] and [`attention`]: fixed patterns into fused ops.
    Patterns,
    /// [`elementwise`].
    Elementwise,
}

impl RuleSet {
    /// The rules of the family, in a fixed order.
    pub fn rules(self) -> Vec<Rule> {
        match self {
            RuleSet::Simplify => simplify::rules(),
            RuleSet::Patterns => {
                let mut rules = fusion::rules();
                rules.extend(attention::rules());
                rules
            }
            RuleSet::Elementwise => elementwise::rules(),
        }
    }

    /// The names of the family's rules.
    pub fn rule_names(self) -> Vec<String> {
        self.rules().iter().map(|r| r.name.to_string()).collect()
    }
}

/// Finds the e-classes that hold an e-node of one of `ops`, in e-class id order.
struct OpSearcher {
    ops: &'static [&'static str],
}

impl Searcher<ENode, TypeAnalysis> for OpSearcher {
    fn search_eclass_with_limit(
        &self,
        egraph: &EGraph,
        eclass: Id,
        limit: usize,
    ) -> Option<SearchMatches<'_, ENode>> {
        if limit == 0
            || !egraph[eclass]
                .nodes
                .iter()
                .any(|n| self.ops.contains(&n.name()))
        {
            return None;
        }
        Some(SearchMatches {
            eclass,
            substs: vec![Subst::default()],
            ast: None,
        })
    }

    fn search_with_limit(&self, egraph: &EGraph, limit: usize) -> Vec<SearchMatches<'_, ENode>> {
        let mut ids: Vec<Id> = self
            .ops
            .iter()
            .filter_map(|op| egraph.classes_for_op(op))
            .flatten()
            .collect();
        ids.sort();
        ids.dedup();
        ids.into_iter()
            .take(limit)
            .filter_map(|id| self.search_eclass_with_limit(egraph, id, 1))
            .collect()
    }

    fn vars(&self) -> Vec<Var> {
        Vec::new()
    }
}

/// Runs a rule body on every e-node of the rule's kinds in the matched e-class.
struct FnApplier {
    ops: &'static [&'static str],
    body: RuleFn,
}

impl Applier<ENode, TypeAnalysis> for FnApplier {
    fn apply_one(
        &self,
        egraph: &mut EGraph,
        eclass: Id,
        _subst: &Subst,
        _ast: Option<&PatternAst<ENode>>,
        rule_name: Symbol,
    ) -> Vec<Id> {
        let class = egraph.find(eclass);
        let nodes: Vec<ENode> = egraph[class]
            .nodes
            .iter()
            .filter(|n| self.ops.contains(&n.name()))
            .cloned()
            .collect();
        let mut changed = Vec::new();
        for node in nodes {
            for (existing, new) in (self.body)(egraph, class, &node) {
                let (a, b) = (&egraph[existing].data.types, &egraph[new].data.types);
                if a != b {
                    let message = format!(
                        "rule `{rule_name}` equates values of different types: {} and {}",
                        show_types(a),
                        show_types(b)
                    );
                    egraph.analysis.problems.push(message);
                    continue;
                }
                if egraph.union(existing, new) {
                    changed.push(new);
                }
            }
        }
        changed
    }
}

/// A rule named `name` that runs `body` on e-nodes whose op name is in `ops`.
pub fn rule(name: &str, ops: &'static [&'static str], body: RuleFn) -> Rule {
    Rewrite::new(name, OpSearcher { ops }, FnApplier { ops, body })
        .expect("function rules bind no variables")
}

// ---------------------------------------------------------------------------------------------
// Helpers for rule bodies
// ---------------------------------------------------------------------------------------------

/// The canonical operand e-classes of `node`.
pub fn operands(egraph: &EGraph, node: &ENode) -> Vec<Id> {
    node.children().iter().map(|&c| egraph.find(c)).collect()
}

/// The type of a single-value e-class.
pub fn ty(egraph: &EGraph, id: Id) -> Option<&TensorType> {
    egraph[id].data.single()
}

/// The e-nodes of e-class `id` whose op is named `name`, in e-class order.
pub fn nodes_named(egraph: &EGraph, id: Id, name: &str) -> Vec<ENode> {
    egraph[id]
        .nodes
        .iter()
        .filter(|n| n.name() == name)
        .cloned()
        .collect()
}

/// The scalar constant that e-class `id` holds, if it holds one.
pub fn constant(egraph: &EGraph, id: Id) -> Option<(f32, DType)> {
    egraph[id].nodes.iter().find_map(|n| match n.op() {
        Some(Op::Constant { value, dtype }) => Some((*value, *dtype)),
        _ => None,
    })
}

/// Adds `op` over `children` if its types check, returning its e-class.
pub fn add(egraph: &mut EGraph, op: Op, children: Vec<Id>) -> Option<Id> {
    let node = ENode::new(op, children);
    let operand_types = operand_types(egraph, &node).ok()?;
    let op = node.op().expect("a graph op");
    verify::infer(op, &operand_types).ok()?;
    Some(egraph.add(node))
}

/// Adds the projection of result `index` of tuple e-class `tuple`.
pub fn project(egraph: &mut EGraph, index: usize, tuple: Id) -> Option<Id> {
    (index < egraph[tuple].data.types.len()).then(|| egraph.add(ENode::project(index, tuple)))
}

/// A scalar constant of `dtype` (the value rounded to it).
pub fn add_constant(egraph: &mut EGraph, value: f32, dtype: DType) -> Id {
    egraph.add(ENode::new(
        Op::Constant {
            value: dtype.round(value),
            dtype,
        },
        Vec::new(),
    ))
}
