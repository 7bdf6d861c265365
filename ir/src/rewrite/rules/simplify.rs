//! Simplification: cancellation of layout ops, identities, constant folding, cast chains.
//!
//! | rule | rewrite | condition |
//! |---|---|---|
//! | `transpose-identity` | `transpose[0,1,…](x) → x` | |
//! | `transpose-transpose` | `transpose[p₂](transpose[p₁](x)) → transpose[p₁∘p₂](x)`, or `x` when that is the identity | |
//! | `reshape-identity` | `reshape[s](x) → x` | `x` already has shape `s` |
//! | `reshape-reshape` | `reshape[s₂](reshape[s₁](x)) → reshape[s₂](x)`, or `x` | |
//! | `slice-full` | `slice(x)` over a whole axis `→ x` | |
//! | `add-zero` | `x + 0 → x`, `0 + x → x` | the sum has `x`'s type |
//! | `mul-one` | `x · 1 → x`, `1 · x → x` | the product has `x`'s type |
//! | `fold-constants` | `add/mul/silu/sigmoid/cast` of constants `→` constant | rounded to the dtype |
//! | `fold-constant-factors` | `(x · c₁) · c₂ → x · (c₁c₂)`, `(x + c₁) + c₂ → x + (c₁ + c₂)` | scalar constants of one dtype (a reassociation: may differ in the last bit) |
//! | `cast-identity` | `cast[t](x) → x` | `x` is already `t` |
//! | `cast-cast` | `cast[a](cast[b](x)) → cast[a](x)`, or `x` | `b` holds every value of `x`'s dtype exactly |
//!
//! Each rule removes an op or replaces constants by one, so none can grow the e-graph without
//! bound (permutations of a fixed rank are finitely many).

use super::{add, add_constant, constant, nodes_named, operands, rule, ty, Found, Rule};
use crate::dtype::DType;
use crate::op::Op;
use crate::rewrite::analysis::EGraph;
use crate::rewrite::language::ENode;
use egg::Id;

/// The simplification rules.
pub fn rules() -> Vec<Rule> {
    vec![
        rule("transpose-identity", &["transpose"], transpose_identity),
        rule("transpose-transpose", &["transpose"], transpose_transpose),
        rule("reshape-identity", &["reshape"], reshape_identity),
        rule("reshape-reshape", &["reshape"], reshape_reshape),
        rule("slice-full", &["slice"], slice_full),
        rule("add-zero", &["add"], add_zero),
        rule("mul-one", &["mul"], mul_one),
        rule(
            "fold-constants",
            &["add", "mul", "silu", "sigmoid", "cast"],
            fold_constants,
        ),
        rule(
            "fold-constant-factors",
            &["add", "mul"],
            fold_constant_factors,
        ),
        rule("cast-identity", &["cast"], cast_identity),
        rule("cast-cast", &["cast"], cast_cast),
    ]
}

fn is_identity(perm: &[usize]) -> bool {
    perm.iter().enumerate().all(|(i, &p)| i == p)
}

fn transpose_identity(egraph: &mut EGraph, class: Id, node: &ENode) -> Found {
    match node.op() {
        Some(Op::Transpose { perm }) if is_identity(perm) => {
            vec![(class, operands(egraph, node)[0])]
        }
        _ => Vec::new(),
    }
}

fn transpose_transpose(egraph: &mut EGraph, class: Id, node: &ENode) -> Found {
    let Some(Op::Transpose { perm: outer }) = node.op() else {
        return Vec::new();
    };
    let inner_class = operands(egraph, node)[0];
    let mut found = Vec::new();
    for inner in nodes_named(egraph, inner_class, "transpose") {
        let Some(Op::Transpose { perm: first }) = inner.op() else {
            continue;
        };
        // Output axis i of the outer reads inner axis outer[i], which reads x's axis
        // first[outer[i]].
        let composed: Vec<usize> = outer.iter().map(|&i| first[i]).collect();
        let x = operands(egraph, &inner)[0];
        if is_identity(&composed) {
            found.push((class, x));
        } else if let Some(new) = add(egraph, Op::Transpose { perm: composed }, vec![x]) {
            found.push((class, new));
        }
    }
    found
}

fn reshape_identity(egraph: &mut EGraph, class: Id, node: &ENode) -> Found {
    let Some(Op::Reshape { shape }) = node.op() else {
        return Vec::new();
    };
    let x = operands(egraph, node)[0];
    match ty(egraph, x) {
        Some(t) if &t.shape == shape => vec![(class, x)],
        _ => Vec::new(),
    }
}

fn reshape_reshape(egraph: &mut EGraph, class: Id, node: &ENode) -> Found {
    let Some(Op::Reshape { shape }) = node.op() else {
        return Vec::new();
    };
    let inner_class = operands(egraph, node)[0];
    let mut found = Vec::new();
    for inner in nodes_named(egraph, inner_class, "reshape") {
        let x = operands(egraph, &inner)[0];
        if ty(egraph, x).is_some_and(|t| &t.shape == shape) {
            found.push((class, x));
        } else if let Some(new) = add(
            egraph,
            Op::Reshape {
                shape: shape.clone(),
            },
            vec![x],
        ) {
            found.push((class, new));
        }
    }
    found
}

fn slice_full(egraph: &mut EGraph, class: Id, node: &ENode) -> Found {
    let Some(Op::Slice { axis, start, end }) = node.op() else {
        return Vec::new();
    };
    let x = operands(egraph, node)[0];
    // Whole when it starts at 0 and ends at the end, counting negative bounds from a known end.
    let size = ty(egraph, x).and_then(|t| t.shape.dims().get(*axis)?.as_const());
    let fix = |v: i64| match size {
        Some(n) if v < 0 => Some(v + n as i64),
        _ if v < 0 => None,
        _ => Some(v),
    };
    let whole = fix(*start) == Some(0)
        && match end {
            None => true,
            Some(e) => size.is_some() && fix(*e) == size.map(|n| n as i64),
        };
    if whole {
        vec![(class, x)]
    } else {
        Vec::new()
    }
}

/// `a ⊕ b → other` when one side is the constant `neutral` and the result has the other's type.
fn drop_neutral(egraph: &EGraph, class: Id, node: &ENode, neutral: f32) -> Found {
    let ids = operands(egraph, node);
    let result = ty(egraph, class);
    let mut found = Vec::new();
    for (keep, other) in [(ids[0], ids[1]), (ids[1], ids[0])] {
        if constant(egraph, other).is_some_and(|(v, _)| v == neutral)
            && result.is_some()
            && ty(egraph, keep) == result
        {
            found.push((class, keep));
        }
    }
    found
}

fn add_zero(egraph: &mut EGraph, class: Id, node: &ENode) -> Found {
    drop_neutral(egraph, class, node, 0.0)
}

fn mul_one(egraph: &mut EGraph, class: Id, node: &ENode) -> Found {
    drop_neutral(egraph, class, node, 1.0)
}

fn fold_constants(egraph: &mut EGraph, class: Id, node: &ENode) -> Found {
    let ids = operands(egraph, node);
    let values: Option<Vec<(f32, DType)>> = ids.iter().map(|&id| constant(egraph, id)).collect();
    let Some(values) = values else {
        return Vec::new();
    };
    let Some(dtype) = ty(egraph, class).map(|t| t.dtype) else {
        return Vec::new();
    };
    // The plain ops' formulas, in f32 (see `interp`), rounded to the result dtype.
    let value = match (node.op(), values.as_slice()) {
        (Some(Op::Add), [(a, _), (b, _)]) => a + b,
        (Some(Op::Mul), [(a, _), (b, _)]) => a * b,
        (Some(Op::Silu), [(x, _)]) => x / (1.0 + (-x).exp()),
        (Some(Op::Sigmoid), [(x, _)]) => 1.0 / (1.0 + (-x).exp()),
        (Some(Op::Cast { .. }), [(x, _)]) => *x,
        _ => return Vec::new(),
    };
    vec![(class, add_constant(egraph, value, dtype))]
}

fn fold_constant_factors(egraph: &mut EGraph, class: Id, node: &ENode) -> Found {
    let Some(op) = node.op().cloned() else {
        return Vec::new();
    };
    let ids = operands(egraph, node);
    let mut found = Vec::new();
    for (inner_class, outer_constant) in [(ids[0], ids[1]), (ids[1], ids[0])] {
        let Some((c2, dtype)) = constant(egraph, outer_constant) else {
            continue;
        };
        for inner in nodes_named(egraph, inner_class, op.name()) {
            let inner_ids = operands(egraph, &inner);
            for (x, inner_constant) in [(inner_ids[0], inner_ids[1]), (inner_ids[1], inner_ids[0])]
            {
                let Some((c1, inner_dtype)) = constant(egraph, inner_constant) else {
                    continue;
                };
                if inner_dtype != dtype || constant(egraph, x).is_some() {
                    continue;
                }
                let folded = match op {
                    Op::Mul => c1 * c2,
                    _ => c1 + c2,
                };
                let c = add_constant(egraph, folded, dtype);
                if let Some(new) = add(egraph, op.clone(), vec![x, c]) {
                    found.push((class, new));
                }
            }
        }
    }
    found
}

fn cast_identity(egraph: &mut EGraph, class: Id, node: &ENode) -> Found {
    let Some(Op::Cast { to }) = node.op() else {
        return Vec::new();
    };
    let x = operands(egraph, node)[0];
    match ty(egraph, x) {
        Some(t) if t.dtype == *to => vec![(class, x)],
        _ => Vec::new(),
    }
}

/// Whether every value of `narrow` is exactly representable in `wide`.
pub fn holds_exactly(wide: DType, narrow: DType) -> bool {
    use DType::*;
    wide == narrow
        || matches!(
            (narrow, wide),
            (F16 | BF16, F32) | (I4, I8 | I32 | F16 | BF16 | F32) | (I8, I32 | F16 | BF16 | F32)
        )
}

fn cast_cast(egraph: &mut EGraph, class: Id, node: &ENode) -> Found {
    let Some(Op::Cast { to }) = node.op() else {
        return Vec::new();
    };
    let inner_class = operands(egraph, node)[0];
    let mut found = Vec::new();
    for inner in nodes_named(egraph, inner_class, "cast") {
        let Some(Op::Cast { to: middle }) = inner.op() else {
            continue;
        };
        let x = operands(egraph, &inner)[0];
        let Some(source) = ty(egraph, x).map(|t| t.dtype) else {
            continue;
        };
        if !holds_exactly(*middle, source) {
            continue;
        }
        if source == *to {
            found.push((class, x));
        } else if let Some(new) = add(egraph, Op::Cast { to: *to }, vec![x]) {
            found.push((class, new));
        }
    }
    found
}
