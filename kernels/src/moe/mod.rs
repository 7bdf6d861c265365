//! Mixture-of-experts on the GPU: the four kernels an `Moe` layer lowers to, one file each.
//!
//! - [`router`]: router logits → softmax → top-k experts and their weights (renormalised
//!   when the config says so), one warp per token; or, with the router's linear fused, the
//!   logits first computed from `x` and the router weight, one block per token.
//! - [`dispatch`]: the slots (`token · k + j`) sorted by expert, stably, and each expert's
//!   run offsets, computed on the device (no host round trip).
//! - [`expert_ffn`]: the grouped expert FFN over the dispatched slots, in two stages: gate
//!   and up products with the SwiGLU activation, then the down product. Each block reads one
//!   expert's weights; an expert no token chose costs nothing. Two generators take the
//!   same parameters: a warp-per-row GEMV (decode) and the grouped tensor-core GEMM of
//!   `crate::gemm` (prefill and large batches), chosen by the spec's `kernel`.
//! - [`combine`]: each token's output, the routing-weighted sum of its `k` expert rows.
//!
//! The semantics are those of `kiln_ir::op::Op::{MoeRouter, MoeRouterLinear, MoeDispatch,
//! MoeExpertFfn, MoeCombine}` and every kernel is checked against `kiln_ir::interp` on a GPU
//! (`tests/gpu_moe_routing.rs`, `tests/gpu_moe_expert_ffn.rs`). These files generate PTX; they must not launch anything.

pub mod combine;
pub mod dispatch;
pub mod expert_ffn;
pub mod router;

use kiln_codegen::ptx::{Cmp, KernelBuilder, Reg, U32, U64};

/// Expert `expert`'s pointer of each group, chosen from the per-expert parameters by a
/// `setp.eq` / `selp` chain (PTX cannot index parameters); one `setp` per expert serves
/// every group.
pub(crate) fn select_expert(
    k: &mut KernelBuilder,
    groups: &[Vec<Reg<U64>>],
    expert: Reg<U32>,
) -> Vec<Reg<U64>> {
    k.comment("select expert e's weight pointers: a setp/selp chain over the parameters");
    let mut chosen: Vec<Reg<U64>> = groups.iter().map(|group| group[0]).collect();
    let experts = groups.first().map_or(0, Vec::len);
    for e in 1..experts {
        let is_e = k.setp(Cmp::Eq, expert, e as u32);
        for (pointer, group) in chosen.iter_mut().zip(groups) {
            *pointer = k.select(is_e, group[e], *pointer);
        }
    }
    chosen
}
