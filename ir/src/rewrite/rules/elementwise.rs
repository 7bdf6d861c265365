//! Fusion of elementwise chains into one `fused_map`.
//!
//! Rule `fuse-elementwise` starts from an elementwise e-node (`add`, `mul`, `silu`, `sigmoid`
//! or a `fused_map`) and, for each of its operand e-classes that holds an elementwise e-node
//! of the same float dtype, adds the fused map that computes both at once. Scalar constant
//! operands become constants inside the program. Repeated over iterations this grows maps
//! along chains; a map is only formed while it has at most [`MAX_OPERANDS`] operands and
//! [`MAX_STEPS`] steps, so growth is bounded. Whether a fused map is worth it (it may
//! recompute a value that another reader needs anyway) is left to extraction, which counts
//! shared values once.
//!
//! Programs are canonical: steps in post-order with identical sub-expressions computed once,
//! operands numbered by first use, so equal computations become the same e-node.

use super::{constant, operands, rule, ty, Found, Rule};
use crate::dtype::DType;
use crate::op::{MapStep, Op};
use crate::rewrite::analysis::EGraph;
use crate::rewrite::language::ENode;
use egg::{Id, Language};
use std::collections::HashMap;

/// At most this many operands in a fused map.
pub const MAX_OPERANDS: usize = 6;
/// At most this many steps in a fused map.
pub const MAX_STEPS: usize = 16;

const ELEMENTWISE: &[&str] = &["add", "mul", "silu", "sigmoid", "fused_map"];

/// The elementwise fusion rule.
pub fn rules() -> Vec<Rule> {
    vec![rule("fuse-elementwise", ELEMENTWISE, fuse)]
}

/// An elementwise expression over e-classes.
#[derive(Clone, Debug, PartialEq)]
enum Expr {
    Leaf(Id),
    Constant(f32),
    Add(Box<Expr>, Box<Expr>),
    Mul(Box<Expr>, Box<Expr>),
    Silu(Box<Expr>),
    Sigmoid(Box<Expr>),
}

impl Expr {
    /// Replaces every leaf `id` by `with`.
    fn substitute(&self, id: Id, with: &Expr) -> Expr {
        let go = |e: &Expr| Box::new(e.substitute(id, with));
        match self {
            Expr::Leaf(leaf) if *leaf == id => with.clone(),
            Expr::Leaf(_) | Expr::Constant(_) => self.clone(),
            Expr::Add(a, b) => Expr::Add(go(a), go(b)),
            Expr::Mul(a, b) => Expr::Mul(go(a), go(b)),
            Expr::Silu(x) => Expr::Silu(go(x)),
            Expr::Sigmoid(x) => Expr::Sigmoid(go(x)),
        }
    }

    /// The distinct leaves, in first-use (post-)order.
    fn leaves(&self, out: &mut Vec<Id>) {
        match self {
            Expr::Leaf(id) => {
                if !out.contains(id) {
                    out.push(*id)
                }
            }
            Expr::Constant(_) => {}
            Expr::Add(a, b) | Expr::Mul(a, b) => {
                a.leaves(out);
                b.leaves(out);
            }
            Expr::Silu(x) | Expr::Sigmoid(x) => x.leaves(out),
        }
    }
}

/// The dtype of elementwise e-node `node` if it is a float op whose operands share it.
fn float_dtype(egraph: &EGraph, class: Id, node: &ENode) -> Option<DType> {
    let dtype = ty(egraph, class)?.dtype;
    let ok = dtype.is_float()
        && operands(egraph, node)
            .iter()
            .all(|&c| ty(egraph, c).is_some_and(|t| t.dtype == dtype));
    ok.then_some(dtype)
}

/// A leaf, or the constant it holds.
fn leaf(egraph: &EGraph, id: Id, dtype: DType) -> Expr {
    match constant(egraph, id) {
        Some((value, d)) if d == dtype => Expr::Constant(value),
        _ => Expr::Leaf(id),
    }
}

/// The expression an elementwise e-node computes over its operand e-classes.
fn expr_of(egraph: &EGraph, node: &ENode, dtype: DType) -> Option<Expr> {
    let ids = operands(egraph, node);
    let arg = |i: usize| Box::new(leaf(egraph, ids[i], dtype));
    Some(match node.op()? {
        Op::Add => Expr::Add(arg(0), arg(1)),
        Op::Mul => Expr::Mul(arg(0), arg(1)),
        Op::Silu => Expr::Silu(arg(0)),
        Op::Sigmoid => Expr::Sigmoid(arg(0)),
        Op::FusedMap { steps } => {
            let mut built: Vec<Expr> = Vec::with_capacity(steps.len());
            for step in steps {
                let at = |i: usize| Box::new(built[i].clone());
                let e = match *step {
                    MapStep::Operand { index } => leaf(egraph, *ids.get(index)?, dtype),
                    MapStep::Constant { value } => Expr::Constant(value),
                    MapStep::Add { a, b } => Expr::Add(at(a), at(b)),
                    MapStep::Mul { a, b } => Expr::Mul(at(a), at(b)),
                    MapStep::Silu { x } => Expr::Silu(at(x)),
                    MapStep::Sigmoid { x } => Expr::Sigmoid(at(x)),
                };
                built.push(e);
            }
            built.pop()?
        }
        _ => return None,
    })
}

/// Key of a step for sharing identical sub-expressions.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum StepKey {
    Operand(usize),
    Constant(u32),
    Add(usize, usize),
    Mul(usize, usize),
    Silu(usize),
    Sigmoid(usize),
}

/// Lowers `expr` to canonical steps over its leaves; returns the steps and the operand
/// e-classes.
fn lower(expr: &Expr) -> (Vec<MapStep>, Vec<Id>) {
    struct Lowering {
        steps: Vec<MapStep>,
        operands: Vec<Id>,
        seen: HashMap<StepKey, usize>,
    }
    impl Lowering {
        fn emit(&mut self, key: StepKey, step: MapStep) -> usize {
            if let Some(&index) = self.seen.get(&key) {
                return index;
            }
            self.steps.push(step);
            self.seen.insert(key, self.steps.len() - 1);
            self.steps.len() - 1
        }
        fn go(&mut self, e: &Expr) -> usize {
            match e {
                Expr::Leaf(id) => {
                    let index = match self.operands.iter().position(|o| o == id) {
                        Some(i) => i,
                        None => {
                            self.operands.push(*id);
                            self.operands.len() - 1
                        }
                    };
                    self.emit(StepKey::Operand(index), MapStep::Operand { index })
                }
                Expr::Constant(value) => self.emit(
                    StepKey::Constant(value.to_bits()),
                    MapStep::Constant { value: *value },
                ),
                Expr::Add(a, b) => {
                    let (a, b) = (self.go(a), self.go(b));
                    self.emit(StepKey::Add(a, b), MapStep::Add { a, b })
                }
                Expr::Mul(a, b) => {
                    let (a, b) = (self.go(a), self.go(b));
                    self.emit(StepKey::Mul(a, b), MapStep::Mul { a, b })
                }
                Expr::Silu(x) => {
                    let x = self.go(x);
                    self.emit(StepKey::Silu(x), MapStep::Silu { x })
                }
                Expr::Sigmoid(x) => {
                    let x = self.go(x);
                    self.emit(StepKey::Sigmoid(x), MapStep::Sigmoid { x })
                }
            }
        }
    }
    let mut lowering = Lowering {
        steps: Vec::new(),
        operands: Vec::new(),
        seen: HashMap::new(),
    };
    lowering.go(expr);
    (lowering.steps, lowering.operands)
}

fn fuse(egraph: &mut EGraph, class: Id, node: &ENode) -> Found {
    let Some(dtype) = float_dtype(egraph, class, node) else {
        return Vec::new();
    };
    let Some(outer) = expr_of(egraph, node, dtype) else {
        return Vec::new();
    };
    let mut leaves = Vec::new();
    outer.leaves(&mut leaves);
    let mut candidates = Vec::new();
    for inner_class in leaves {
        if inner_class == class {
            continue;
        }
        for inner in egraph[inner_class].nodes.clone() {
            if !ELEMENTWISE.contains(&inner.name())
                || float_dtype(egraph, inner_class, &inner) != Some(dtype)
                || inner.children().iter().any(|&c| egraph.find(c) == class)
            {
                continue;
            }
            if let Some(inner_expr) = expr_of(egraph, &inner, dtype) {
                candidates.push(outer.substitute(inner_class, &inner_expr));
            }
        }
    }
    let mut found = Vec::new();
    for fused in candidates {
        let (steps, operand_ids) = lower(&fused);
        if operand_ids.is_empty() || operand_ids.len() > MAX_OPERANDS || steps.len() > MAX_STEPS {
            continue;
        }
        if let Some(new) = super::add(egraph, Op::FusedMap { steps }, operand_ids) {
            found.push((class, new));
        }
    }
    found
}
