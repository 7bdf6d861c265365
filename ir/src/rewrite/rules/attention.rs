//! Recovers attention from its plain-op form: `softmax(scale · QKᵀ + mask) · V`.
//!
//! The form is the one a framework exporter writes (and
//! `kiln_models::BuildOptions::decompose_attention` builds), over `q [B, S, Hq, D]`, `k`,
//! `v [B, T, Hkv, D]`:
//!
//! ```text
//! qh = transpose[0,2,1,3](q)                          [B, Hq, S, D]
//! kh = transpose[0,2,1,3](k), repeated to Hq heads    [B, Hq, T, D]
//!      (reshape [B, Hkv, 1, T, D] → concat₂ of G copies → reshape [B, Hq, T, D])
//! s  = matmul(qh, transpose[0,1,3,2](kh)) · scale      scale a positive constant (or absent)
//! p  = softmax(s + causal_mask(…[, lengths]))         (or softmax(s): no mask)
//! o  = matmul(p, vh)                                  [B, Hq, S, D]
//! ```
//!
//! Rule `attention` makes the e-class of `o` equal to `transpose[0,2,1,3](A)` where `A` is
//! `attention { causal: true, scale }(q, k, v)` for a mask without lengths,
//! `attention_decode { scale }(q, k, v, lengths)` for a mask with lengths, and
//! `attention { causal: false, scale }(q, k, v)` without a mask; the transpose that follows
//! in the exporter's graph then cancels (`transpose-transpose`). The repeat factor `G` must be
//! `Hq / Hkv`, which is exactly the grouped-query sharing of the attention ops, and the mask
//! must have the scores' batch, query and key dimensions.

use super::{add, constant, nodes_named, operands, rule, ty, Found, Rule};
use crate::op::Op;
use crate::rewrite::analysis::EGraph;
use crate::rewrite::language::ENode;
use crate::shape::Dim;
use egg::Id;

/// The attention rule.
pub fn rules() -> Vec<Rule> {
    vec![rule("attention", &["matmul"], attention)]
}

const HEADS_FIRST: [usize; 4] = [0, 2, 1, 3];
const LAST_TWO: [usize; 4] = [0, 1, 3, 2];

/// The `x` of every `transpose[perm](x)` in e-class `id`.
fn transposed_from(egraph: &EGraph, id: Id, perm: &[usize]) -> Vec<Id> {
    nodes_named(egraph, id, "transpose")
        .iter()
        .filter(|n| matches!(n.op(), Some(Op::Transpose { perm: p }) if p == perm))
        .map(|n| operands(egraph, n)[0])
        .collect()
}

fn dims(egraph: &EGraph, id: Id) -> Option<Vec<Dim>> {
    ty(egraph, id).map(|t| t.shape.0.clone())
}

/// The `k [B, T, Hkv, D]` behind `kh [B, Hq, T, D]`: heads moved forward, and repeated
/// `Hq / Hkv` times when `Hkv < Hq`.
fn kv_sources(egraph: &EGraph, kh: Id) -> Vec<Id> {
    let mut sources = transposed_from(egraph, kh, &HEADS_FIRST);
    let Some(target) = dims(egraph, kh) else {
        return sources;
    };
    for reshape in nodes_named(egraph, kh, "reshape") {
        let copies = operands(egraph, &reshape)[0];
        for concat in nodes_named(egraph, copies, "concat") {
            if !matches!(concat.op(), Some(Op::Concat { axis: 2 })) {
                continue;
            }
            let parts = operands(egraph, &concat);
            if parts.iter().any(|&p| p != parts[0]) {
                continue;
            }
            let group = parts.len();
            for unsqueeze in nodes_named(egraph, parts[0], "reshape") {
                let heads_first = operands(egraph, &unsqueeze)[0];
                let (Some(one), Some(kt)) = (dims(egraph, parts[0]), dims(egraph, heads_first))
                else {
                    continue;
                };
                // kt [B, Hkv, T, D] → one [B, Hkv, 1, T, D] → kh [B, Hkv·G, T, D].
                let expected_one = [
                    kt[0].clone(),
                    kt[1].clone(),
                    Dim::Const(1),
                    kt[2].clone(),
                    kt[3].clone(),
                ];
                let repeated = kt[1].as_const().map(|h| Dim::Const(h * group));
                if kt.len() != 4
                    || one != expected_one
                    || repeated.as_ref() != Some(&target[1])
                    || [&target[0], &target[2], &target[3]] != [&kt[0], &kt[2], &kt[3]]
                {
                    continue;
                }
                sources.extend(transposed_from(egraph, heads_first, &HEADS_FIRST));
            }
        }
    }
    sources
}

/// `(scaled scores, mask node)` for every way e-class `id` is `scaled + mask`, plus `(id, None)`.
fn masked(egraph: &EGraph, id: Id) -> Vec<(Id, Option<ENode>)> {
    let mut out = Vec::new();
    for plus in nodes_named(egraph, id, "add") {
        let ab = operands(egraph, &plus);
        for (scores, mask) in [(ab[0], ab[1]), (ab[1], ab[0])] {
            let (Some(s), Some(m)) = (dims(egraph, scores), dims(egraph, mask)) else {
                continue;
            };
            // The mask must be for these scores: same batch, queries and keys.
            if s.len() != 4 || m.len() != 4 || s[0] != m[0] || s[2] != m[2] || s[3] != m[3] {
                continue;
            }
            for node in nodes_named(egraph, mask, "causal_mask") {
                out.push((scores, Some(node)));
            }
        }
    }
    out.push((id, None));
    out
}

/// `(scores, scale)` for every way e-class `id` is `scores · scale` with a positive constant,
/// plus `(id, 1)`.
fn scaled(egraph: &EGraph, id: Id) -> Vec<(Id, f32)> {
    let mut out = Vec::new();
    for times in nodes_named(egraph, id, "mul") {
        let ab = operands(egraph, &times);
        for (scores, factor) in [(ab[0], ab[1]), (ab[1], ab[0])] {
            if let Some((scale, dtype)) = constant(egraph, factor) {
                if dtype.is_float() && scale > 0.0 && scale.is_finite() {
                    out.push((scores, scale));
                }
            }
        }
    }
    out.push((id, 1.0));
    out
}

fn attention(egraph: &mut EGraph, class: Id, node: &ENode) -> Found {
    let ids = operands(egraph, node);
    let (probabilities, vh) = (ids[0], ids[1]);
    let mut candidates = Vec::new();
    for softmax in nodes_named(egraph, probabilities, "softmax") {
        let logits = operands(egraph, &softmax)[0];
        for (scaled_scores, mask) in masked(egraph, logits) {
            for (scores, scale) in scaled(egraph, scaled_scores) {
                for product in nodes_named(egraph, scores, "matmul") {
                    let [qh, kt] = operands(egraph, &product)[..] else {
                        continue;
                    };
                    for q in transposed_from(egraph, qh, &HEADS_FIRST) {
                        for kh in transposed_from(egraph, kt, &LAST_TWO) {
                            for k in kv_sources(egraph, kh) {
                                for v in kv_sources(egraph, vh) {
                                    candidates.push((q, k, v, scale, mask.clone()));
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    let mut found = Vec::new();
    for (q, k, v, scale, mask) in candidates {
        let mask_operands = mask.as_ref().map(|m| operands(egraph, m));
        let (op, children) = match mask_operands.as_deref() {
            None => (
                Op::Attention {
                    causal: false,
                    scale,
                },
                vec![q, k, v],
            ),
            Some([_scores]) => (
                Op::Attention {
                    causal: true,
                    scale,
                },
                vec![q, k, v],
            ),
            Some([_scores, lengths]) => (Op::AttentionDecode { scale }, vec![q, k, v, *lengths]),
            Some(_) => continue,
        };
        let Some(attended) = add(egraph, op, children) else {
            continue;
        };
        let perm = HEADS_FIRST.to_vec();
        if let Some(new) = add(egraph, Op::Transpose { perm }, vec![attended]) {
            found.push((class, new));
        }
    }
    found
}
