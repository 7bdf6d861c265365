//! Mixture-of-experts on the GPU: the four kernels an `Moe` layer lowers to, one file each.
//!
//! - [`router`]: router logits → softmax → top-k experts and their weights (renormalised
//!   when the config says so), one warp per token.
//! - [`dispatch`]: the slots (`token · k + j`) sorted by expert, stably, and each expert's
//!   run offsets, computed on the device (no host round trip).
//! - [`expert_ffn`]: the grouped expert FFN over the dispatched slots, in two stages: gate
//!   and up products with the SwiGLU activation, then the down product. Each block reads one
//!   expert's weights; an expert no token chose costs nothing.
//! - [`combine`]: each token's output, the routing-weighted sum of its `k` expert rows.
//!
//! The semantics are those of `kiln_ir::op::Op::{MoeRouter, MoeDispatch, MoeExpertFfn,
//! MoeCombine}` and every kernel is checked against `kiln_ir::interp` on a GPU
//! (`tests/gpu_moe_routing.rs`, `tests/gpu_moe_expert_ffn.rs`). These files generate PTX; they must not launch anything.

pub mod combine;
pub mod dispatch;
pub mod expert_ffn;
pub mod router;
