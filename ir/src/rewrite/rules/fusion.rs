//! Fusion of fixed patterns around matrix products and norms.
//!
//! | rule | rewrite |
//! |---|---|
//! | `linear-add` | `linear(x, w) + a → linear_add(x, w, a)` (bias or residual epilogue; `a` must not enlarge the result) |
//! | `add-rms-norm` | `s = a + b; n = rms_norm(s, w)` → both results of `add_rms_norm(a, b, w)` (`a`, `b` of one type) |
//! | `swiglu` | `silu(linear(x, w_gate)) · linear(x, w_up) → swiglu_linear(x, concat₀(w_gate, w_up))` |
//! | `dequantize-linear` | `linear(x, dequantize(q, s[, z])) → quantized_linear(x, q, s[, z])` |
//! | `router-linear` | `moe_router(linear(x, w))` → both results of `moe_router_linear(x, w)` (the logits are never stored; only for a router weight of at most [`FUSED_ROUTER_MAX_WEIGHT`] elements) |
//!
//! Products commute here (`a + b` and `b + a` are the same f32 value), so each rule tries both
//! operand orders of the `add`/`mul` it starts from. The concatenated SwiGLU weight depends only
//! on weights: it is computed once at load time (see the cost model in `extract`).

use super::{add, nodes_named, operands, project, rule, ty, Found, Rule};
use crate::op::Op;
use crate::rewrite::analysis::EGraph;
use crate::rewrite::language::ENode;
use crate::shape::Bindings;
use egg::Id;

/// The pattern-fusion rules (attention is in `attention`).
pub fn rules() -> Vec<Rule> {
    vec![
        rule("linear-add", &["add"], linear_add),
        rule("add-rms-norm", &["rms_norm"], add_rms_norm),
        rule("swiglu", &["mul"], swiglu),
        rule("dequantize-linear", &["linear"], dequantize_linear),
        rule("router-linear", &["moe_router"], router_linear),
    ]
}

/// Both operand orders of a binary node.
fn both_orders(ids: &[Id]) -> [(Id, Id); 2] {
    [(ids[0], ids[1]), (ids[1], ids[0])]
}

fn linear_add(egraph: &mut EGraph, class: Id, node: &ENode) -> Found {
    let ids = operands(egraph, node);
    let mut found = Vec::new();
    for (product, addend) in both_orders(&ids) {
        for linear in nodes_named(egraph, product, "linear") {
            let xw = operands(egraph, &linear);
            if let Some(new) = add(egraph, Op::LinearAdd, vec![xw[0], xw[1], addend]) {
                found.push((class, new));
            }
        }
    }
    found
}

fn add_rms_norm(egraph: &mut EGraph, class: Id, node: &ENode) -> Found {
    let Some(Op::RmsNorm { eps }) = node.op() else {
        return Vec::new();
    };
    let eps = *eps;
    let ids = operands(egraph, node);
    let (sum, weight) = (ids[0], ids[1]);
    let mut found = Vec::new();
    for plus in nodes_named(egraph, sum, "add") {
        let ab = operands(egraph, &plus);
        let sum_type = ty(egraph, sum);
        if sum_type.is_none() || ty(egraph, ab[0]) != sum_type || ty(egraph, ab[1]) != sum_type {
            continue;
        }
        let Some(fused) = add(egraph, Op::AddRmsNorm { eps }, vec![ab[0], ab[1], weight]) else {
            continue;
        };
        if let (Some(s), Some(n)) = (project(egraph, 0, fused), project(egraph, 1, fused)) {
            found.push((sum, s));
            found.push((class, n));
        }
    }
    found
}

fn swiglu(egraph: &mut EGraph, class: Id, node: &ENode) -> Found {
    let ids = operands(egraph, node);
    let mut found = Vec::new();
    for (activated, up) in both_orders(&ids) {
        for silu in nodes_named(egraph, activated, "silu") {
            let gate = operands(egraph, &silu)[0];
            for gate_linear in nodes_named(egraph, gate, "linear") {
                let [x, w_gate] = operands(egraph, &gate_linear)[..] else {
                    continue;
                };
                for up_linear in nodes_named(egraph, up, "linear") {
                    let [x_up, w_up] = operands(egraph, &up_linear)[..] else {
                        continue;
                    };
                    if x_up != x || ty(egraph, w_gate) != ty(egraph, w_up) {
                        continue;
                    }
                    let Some(stacked) = add(egraph, Op::Concat { axis: 0 }, vec![w_gate, w_up])
                    else {
                        continue;
                    };
                    if let Some(new) = add(egraph, Op::SwiGluLinear, vec![x, stacked]) {
                        found.push((class, new));
                    }
                }
            }
        }
    }
    found
}

fn dequantize_linear(egraph: &mut EGraph, class: Id, node: &ENode) -> Found {
    let ids = operands(egraph, node);
    let (x, weight) = (ids[0], ids[1]);
    let Some(x_dtype) = ty(egraph, x).map(|t| t.dtype) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for dequantize in nodes_named(egraph, weight, "dequantize") {
        let Some(Op::Dequantize { scheme, to }) = dequantize.op() else {
            continue;
        };
        if *to != x_dtype {
            continue;
        }
        let mut children = vec![x];
        children.extend(operands(egraph, &dequantize));
        if let Some(new) = add(egraph, Op::QuantizedLinear { scheme: *scheme }, children) {
            found.push((class, new));
        }
    }
    found
}

/// The largest router weight (`experts × hidden` elements) the `router-linear` rule fuses.
///
/// The fused kernel gives each token one block, which streams the whole router weight through
/// one SM; the separate linear spreads it over the machine. Mixtral's `8 × 4096` (64 KiB in
/// bf16) is under the bound; Qwen3-30B-A3B's `128 × 2048` (512 KiB) is not, and keeps its
/// GEMV + router pair. This is a design estimate, not a measurement: `kiln bench moe` on a GPU
/// should set it.
pub const FUSED_ROUTER_MAX_WEIGHT: u64 = 1 << 16;

fn router_linear(egraph: &mut EGraph, class: Id, node: &ENode) -> Found {
    let Some(&Op::MoeRouter { top_k, normalize }) = node.op() else {
        return Vec::new();
    };
    let logits = operands(egraph, node)[0];
    let mut found = Vec::new();
    for linear in nodes_named(egraph, logits, "linear") {
        let xw = operands(egraph, &linear);
        let small = ty(egraph, xw[1])
            .and_then(|w| w.shape.num_elements(&Bindings::new()).ok())
            .is_some_and(|elements| elements as u64 <= FUSED_ROUTER_MAX_WEIGHT);
        if !small {
            continue;
        }
        // The router's tuple e-class gains the fused node: the projections reading it stay.
        if let Some(fused) = add(egraph, Op::MoeRouterLinear { top_k, normalize }, xw) {
            found.push((class, fused));
        }
    }
    found
}
