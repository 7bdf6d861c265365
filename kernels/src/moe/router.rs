//! The MoE router: each token's logits over the experts → softmax → its `top_k` experts and
//! their routing weights (`kiln_ir::op::Op::MoeRouter`), or, with the router's linear fused
//! ([`MoeRouterSpec::hidden`], `kiln_ir::op::Op::MoeRouterLinear`), the logits first computed
//! from the token's activations `x` and the router weight `w` in the same kernel.
//!
//! For token `t`, with `l` its row of `experts` logits (f16, bf16 or f32, widened to f32):
//! `m = max l`, `s = Σ exp(l − m)`; the chosen experts are the `top_k` largest logits in
//! descending order, ties to the lower expert index (the same experts as the largest
//! probabilities, softmax being monotone); the weight of expert `e` is `exp(l_e − m) / s`,
//! divided by the sum of the chosen weights when `normalize`. Computed in f32 with
//! `ex2.approx` (the interpreter uses f64: weights agree to a few ulp, experts exactly where
//! the probabilities of distinct logits are distinct in f32). `-0` and `+0` tie. A row whose
//! logits are all NaN chooses expert −1; NaN logits are otherwise unsupported (the result is
//! unspecified, but nothing is read or written out of bounds).
//!
//! **Stored logits** (`hidden: None`). Parameters: `logits` (read, `[tokens, experts]` of
//! `dtype`), `weights` (write, f32 `[tokens, top_k]`), `experts` (write, i32
//! `[tokens, top_k]`); scalar `tokens`. Launch: one warp per token, [`WARPS_PER_BLOCK`]
//! warps per block (`grid.x = ceil(tokens / 4)`, block 128 threads); a warp past the last
//! token does nothing. No shared memory and no block barrier.
//!
//! **Fused linear** (`hidden: Some(h)`). Parameters: `x` (read, `[tokens, h]` of `dtype`),
//! `w` (read, `[experts, h]` of `dtype`), then `weights`, `experts` and `tokens` as above.
//! Launch: one block of [`LINEAR_WARPS_PER_BLOCK`] warps per token (`grid.x = tokens`).
//! Warp `v` computes the logits of experts `v, v + 8, …`: lane `i` reads 16 bytes at chunk
//! `i, i + 32, …` of the expert's row and of `x`'s row (`ld.global.nc.v4`, the weights with
//! `L1::no_allocate`, `x`, read by every warp, with `L1::evict_last`), widens them to f32 and
//! accumulates with `fma.rn` into [`LINEAR_UNROLL`] partial sums (every load of an iteration
//! issued before the first is used), then a butterfly warp sum. Each logit is rounded to the
//! dtype, as the interpreter rounds the `Linear` it stands for, and lane 0 stores it to a
//! shared array of `experts` f32 (4 KiB at 1024 experts); after one block barrier, warp 0
//! routes the row as below, reading its logits from shared memory. `h` must be a multiple of
//! 8 and `x` and `w` 16-byte aligned (device allocations and plan buffers are). The product
//! is accumulated in f32 where the interpreter uses f64, so a logit can round to the
//! neighbouring dtype value where the exact product lies within an f32 ulp of a rounding
//! boundary.
//!
//! **Routing** (both forms). The routing warp's lane `i` holds experts `i, i + 32, …` in
//! registers (so `experts ≤` [`MAX_EXPERTS`]); the max and the sum are butterfly
//! all-reductions; pick `j` is a warp argmax over the entries after pick `j − 1` in the order
//! (logit descending, index ascending), so every pick is found without marking anything. Lane
//! `j` keeps pick `j` and writes it (`top_k ≤` [`MAX_TOP_K`]). This file generates PTX; it
//! must not launch anything.

use crate::vector::{load_scalar, round_to_dtype, widen_pair};
use crate::SpecError;
use kiln_codegen::kernel::{Access, Extent, GpuKernel, LaunchRule};
use kiln_codegen::ptx::{
    Cmp, KernelBuilder, L1Eviction, Load, Mem, Pred, Reg, SharedArray, Target, WarpReduce, F32,
    U32, U64,
};
use kiln_ir::dtype::DType;
use serde::{Deserialize, Serialize};

const FAMILY: &str = "moe_router";
/// Warps (tokens) per block of the router over stored logits.
pub const WARPS_PER_BLOCK: u32 = 4;
/// Warps per block (one block per token) of the router with its linear fused.
pub const LINEAR_WARPS_PER_BLOCK: u32 = 8;
/// Partial sums per lane of the fused linear, and 16-byte chunks per lane loaded together.
pub const LINEAR_UNROLL: usize = 4;
/// The most experts: 32 logits per lane, held in registers.
pub const MAX_EXPERTS: usize = 1024;
/// The most experts chosen per token: one per lane.
pub const MAX_TOP_K: usize = 32;
/// The widest fused linear (keeps every row offset a small u32).
pub const MAX_HIDDEN: usize = 1 << 20;
/// The fused linear's `hidden` must be a multiple of this (one 16-byte chunk of halves).
pub const HIDDEN_MULTIPLE: usize = 8;
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// Bytes of one lane's load, and of a warp's step along a row (32 lanes).
const CHUNK_BYTES: u32 = 16;
const STEP_BYTES: u32 = 32 * CHUNK_BYTES;

/// An MoE router kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MoeRouterSpec {
    /// Storage dtype of the logits, or with the linear fused of `x` and `w` (f16, bf16 or
    /// f32).
    pub dtype: DType,
    /// Experts per token (the logits' row length), `1..=1024`.
    pub experts: usize,
    /// Experts chosen per token, `1..=min(experts, 32)`.
    pub top_k: usize,
    /// Renormalise the chosen weights to sum to 1.
    pub normalize: bool,
    /// With the router's linear fused: the width of `x` and of the weight `[experts,
    /// hidden]`, a multiple of 8 in `8..=2^20`; `None` reads stored logits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden: Option<usize>,
}

impl MoeRouterSpec {
    /// Threads per block: [`WARPS_PER_BLOCK`] warps, or [`LINEAR_WARPS_PER_BLOCK`] with the
    /// linear fused.
    pub fn threads(&self) -> u32 {
        32 * match self.hidden {
            None => WARPS_PER_BLOCK,
            Some(_) => LINEAR_WARPS_PER_BLOCK,
        }
    }

    /// The kernel entry name: `moe_router_bf16_e8_k2_norm`, or with the linear fused
    /// `moe_router_linear_bf16_h4096_e8_k2_norm` (`_norm` when normalising).
    pub fn entry(&self) -> String {
        let norm = if self.normalize { "_norm" } else { "" };
        let (dtype, experts, top_k) = (self.dtype, self.experts, self.top_k);
        match self.hidden {
            None => format!("moe_router_{dtype}_e{experts}_k{top_k}{norm}"),
            Some(hidden) => {
                format!("moe_router_linear_{dtype}_h{hidden}_e{experts}_k{top_k}{norm}")
            }
        }
    }

    /// Why the generator cannot build this spec, naming the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        if !matches!(self.dtype, DType::F16 | DType::BF16 | DType::F32) {
            return Err(SpecError::new(
                FAMILY,
                format!("dtype must be f16, bf16 or f32, got {}", self.dtype),
            ));
        }
        if self.experts == 0 || self.experts > MAX_EXPERTS {
            return Err(SpecError::new(
                FAMILY,
                format!("experts must be 1..={MAX_EXPERTS}, got {}", self.experts),
            ));
        }
        let most = self.experts.min(MAX_TOP_K);
        if self.top_k == 0 || self.top_k > most {
            return Err(SpecError::new(
                FAMILY,
                format!(
                    "top_k must be 1..=min(experts, {MAX_TOP_K}) = {most}, got {}",
                    self.top_k
                ),
            ));
        }
        if let Some(hidden) = self.hidden {
            if hidden == 0 || hidden % HIDDEN_MULTIPLE != 0 || hidden > MAX_HIDDEN {
                return Err(SpecError::new(
                    FAMILY,
                    format!(
                        "hidden (the fused linear's width) must be a multiple of \
                         {HIDDEN_MULTIPLE} in {HIDDEN_MULTIPLE}..={MAX_HIDDEN} (16-byte \
                         loads), got {hidden}"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn element_bytes(&self) -> u32 {
        match self.dtype {
            DType::F32 => 4,
            _ => 2,
        }
    }
}

/// One logit held by a lane.
#[derive(Clone, Copy)]
struct Entry {
    value: Reg<F32>,
    /// The expert index.
    index: Reg<U32>,
    /// Whether the index is below `experts`; `None` where it is for every lane.
    valid: Option<Reg<Pred>>,
}

/// Loads one stored logit at `address` as f32.
fn load_logit(k: &mut KernelBuilder, dtype: DType, address: Mem) -> Reg<F32> {
    match dtype {
        DType::F32 => k.ld::<F32>(Load::GLOBAL.non_coherent(), address),
        _ => load_scalar(k, dtype, address),
    }
}

/// `(a, i)` comes before `(b, j)` in the pick order: `a > b`, or `a == b` and `i < j`.
/// False when `a` is NaN.
fn before(k: &mut KernelBuilder, a: Reg<F32>, i: Reg<U32>, b: Reg<F32>, j: Reg<U32>) -> Reg<Pred> {
    let greater = k.setp(Cmp::Gt, a, b);
    let equal = k.setp(Cmp::Eq, a, b);
    let lower = k.setp(Cmp::Lt, i, j);
    let tie = k.and(equal, lower);
    k.or(greater, tie)
}

/// `exp(value − max)` as `2^((value − max) · log2 e)`.
fn exp_shifted(k: &mut KernelBuilder, value: Reg<F32>, max: Reg<F32>) -> Reg<F32> {
    let shifted = k.sub(value, max);
    let exponent = k.mul(shifted, LOG2_E);
    k.ex2_approx(exponent)
}

/// The routing warp's entries: lane `i`'s logits of experts `i, i + 32, …`, read by `load`
/// from the expert's byte offset `32 · c · stride` past the lane's own; entries past the last
/// expert hold NaN (never picked).
fn load_entries(
    k: &mut KernelBuilder,
    experts: u32,
    lane: Reg<U32>,
    stride: u32,
    mut load: impl FnMut(&mut KernelBuilder, i64) -> Reg<F32>,
) -> Vec<Entry> {
    k.comment("load the logits; entries past the last expert hold NaN (never picked)");
    let mut entries = Vec::new();
    for c in 0..experts.div_ceil(32) {
        let index = k.add(lane, 32 * c);
        let offset = (32 * c * stride) as i64;
        if (c + 1) * 32 <= experts {
            let value = load(k, offset);
            entries.push(Entry {
                value,
                index,
                valid: None,
            });
        } else {
            let valid = k.setp(Cmp::Lt, index, experts);
            let value = k.mov::<F32>(f32::NAN);
            k.if_then(valid, |k| {
                let loaded = load(k, offset);
                k.assign(value, loaded);
            });
            entries.push(Entry {
                value,
                index,
                valid: Some(valid),
            });
        }
    }
    entries
}

/// The output pointers and the routing warp's coordinates.
struct Outputs {
    weights: Reg<U64>,
    chosen: Reg<U64>,
    lane: Reg<U32>,
    token: Reg<U32>,
}

/// Softmax statistics, the top-k picks and their (renormalised) weights of the routing
/// warp's `entries`, written to row `token` of `weights` and `experts`.
fn route(k: &mut KernelBuilder, spec: &MoeRouterSpec, entries: &[Entry], out: &Outputs) {
    let top_k = spec.top_k as u32;
    let lane = out.lane;
    k.comment("softmax statistics: the row's max and sum of exp(l - max)");
    let lane_max = k.mov::<F32>(f32::NEG_INFINITY);
    for &Entry { value, .. } in entries {
        // `max.f32` ignores a NaN operand: padding does not count.
        let m = k.max(lane_max, value);
        k.assign(lane_max, m);
    }
    let max = k.warp_all_reduce(lane_max, WarpReduce::Max);
    let lane_sum = k.mov::<F32>(0.0);
    for &Entry { value, valid, .. } in entries {
        let mut e = exp_shifted(k, value, max);
        if let Some(valid) = valid {
            e = k.select(valid, e, 0.0);
        }
        let s = k.add(lane_sum, e);
        k.assign(lane_sum, s);
    }
    let sum = k.warp_all_reduce(lane_sum, WarpReduce::Sum);

    k.comment(
        "top-k: pick j is the warp argmax (logit descending, index ascending) over the\n\
         entries after pick j - 1; lane j keeps pick j",
    );
    let previous_value = k.mov::<F32>(0.0);
    let previous_index = k.mov::<U32>(0u32);
    let my_weight = k.mov::<F32>(0.0);
    let my_expert = k.mov::<U32>(u32::MAX);
    k.for_range(0u32, top_k, 1u32, |k, j| {
        let first = k.setp(Cmp::Eq, j, 0u32);
        let best_value = k.mov::<F32>(f32::NEG_INFINITY);
        let best_index = k.mov::<U32>(u32::MAX);
        for &Entry { value, index, .. } in entries {
            let after = before(k, previous_value, previous_index, value, index);
            let eligible = k.or(first, after);
            let better = before(k, value, index, best_value, best_index);
            let take = k.and(eligible, better);
            let v = k.select(take, value, best_value);
            let i = k.select(take, index, best_index);
            k.assign(best_value, v);
            k.assign(best_index, i);
        }
        for lane_mask in [16, 8, 4, 2, 1] {
            let other_value = k.shfl_bfly(best_value, lane_mask);
            let other_index = k.shfl_bfly(best_index, lane_mask);
            let better = before(k, other_value, other_index, best_value, best_index);
            let v = k.select(better, other_value, best_value);
            let i = k.select(better, other_index, best_index);
            k.assign(best_value, v);
            k.assign(best_index, i);
        }
        let e = exp_shifted(k, best_value, max);
        let weight = k.div_rn(e, sum);
        let mine = k.setp(Cmp::Eq, lane, j);
        let w = k.select(mine, weight, my_weight);
        let x = k.select(mine, best_index, my_expert);
        k.assign(my_weight, w);
        k.assign(my_expert, x);
        k.assign(previous_value, best_value);
        k.assign(previous_index, best_index);
    });

    let writes = k.setp(Cmp::Lt, lane, top_k);
    if spec.normalize {
        k.comment("renormalise the chosen weights to sum to 1");
        let contribution = k.select(writes, my_weight, 0.0);
        let total = k.warp_all_reduce(contribution, WarpReduce::Sum);
        let normalised = k.div_rn(my_weight, total);
        k.assign(my_weight, normalised);
    }

    k.comment("lane j < top_k writes pick j");
    k.if_then(writes, |k| {
        let offset = k.mul_wide(lane, 4u32);
        let weight_row = k.mad_wide(out.token, top_k * 4, out.weights);
        let weight_address = k.add(weight_row, offset);
        k.st_global(weight_address, my_weight);
        let expert_row = k.mad_wide(out.token, top_k * 4, out.chosen);
        let expert_address = k.add(expert_row, offset);
        k.st_global(expert_address, my_expert);
    });
}

/// The 16-byte chunk of `dtype` values in four words, widened to f32 (8 halves or 4 f32).
fn widen_chunk(k: &mut KernelBuilder, dtype: DType, words: [Reg<U32>; 4]) -> Vec<Reg<F32>> {
    match dtype {
        DType::F32 => words.iter().map(|&w| k.bitcast::<F32>(w)).collect(),
        _ => words
            .iter()
            .flat_map(|&w| widen_pair(k, dtype, w))
            .collect(),
    }
}

/// One warp's product of `x`'s row with one expert's row, lane-partial: the registers of the
/// fused linear and the emission of its steps.
struct RowProduct {
    dtype: DType,
    /// `x`'s row of the block's token and the expert's row, each plus this lane's 16 bytes.
    x_lane: Reg<U64>,
    w_lane: Reg<U64>,
    /// [`LINEAR_UNROLL`] partial sums.
    partials: Vec<Reg<F32>>,
}

impl RowProduct {
    /// `count` warp steps (512 bytes of each row) from byte `base` past the run-time
    /// `offset`: every weight and `x` load issued first, then the products.
    fn steps(&self, k: &mut KernelBuilder, offset: Option<Reg<U64>>, base: u32, count: usize) {
        let w_load = Load::GLOBAL.non_coherent().l1(L1Eviction::NoAllocate);
        let x_load = Load::GLOBAL.non_coherent().l1(L1Eviction::Last);
        let (x_at, w_at) = match offset {
            Some(offset) => (k.add(self.x_lane, offset), k.add(self.w_lane, offset)),
            None => (self.x_lane, self.w_lane),
        };
        let at = |u: usize| (base + u as u32 * STEP_BYTES) as i64;
        let loaded: Vec<_> = (0..count)
            .map(|u| {
                let w = k.ld_vector::<U32, 4>(w_load, w_at.at(at(u)));
                let x = k.ld_vector::<U32, 4>(x_load, x_at.at(at(u)));
                (w, x)
            })
            .collect();
        for (u, (w, x)) in loaded.into_iter().enumerate() {
            let ws = widen_chunk(k, self.dtype, w);
            let xs = widen_chunk(k, self.dtype, x);
            let sum = self.partials[u % self.partials.len()];
            for (&w, &x) in ws.iter().zip(&xs) {
                let next = k.fma(w, x, sum);
                k.assign(sum, next);
            }
        }
    }
}

/// This thread's place in the fused router's block: the block's token, its warp and lane.
#[derive(Clone, Copy)]
struct Place {
    token: Reg<U32>,
    warp: Reg<U32>,
    lane: Reg<U32>,
}

/// The fused linear: warp `v` of the block computes the logits `x[token] · w[e]` of experts
/// `e = v, v + 8, …`, rounded to the dtype, into `logits[e]` in shared memory.
fn linear_logits(
    k: &mut KernelBuilder,
    spec: &MoeRouterSpec,
    hidden: usize,
    (x, w): (Reg<U64>, Reg<U64>),
    place: &Place,
    logits: &SharedArray,
) {
    let Place { token, warp, lane } = *place;
    let row_bytes = hidden as u32 * spec.element_bytes();
    let chunks = row_bytes / CHUNK_BYTES;
    let full_steps = (chunks / 32) as usize;
    let partial_lanes = chunks % 32;
    let loops = full_steps / LINEAR_UNROLL;
    let tail = full_steps % LINEAR_UNROLL;
    k.comment(&format!(
        "the fused linear: warp v computes the logits of experts v, v + {LINEAR_WARPS_PER_BLOCK}, \
         ...; lane l reads 16 bytes at chunk l, l + 32, ... of x's row and the expert's row \
         ({chunks} chunks)"
    ));
    let lane_bytes = k.mul_wide(lane, CHUNK_BYTES);
    let x_row = k.mad_wide(token, row_bytes, x);
    let x_lane = k.add(x_row, lane_bytes);
    let w_lane = k.add(w, lane_bytes);
    let logits_base = k.shared_address(logits);
    let experts = spec.experts as u32;
    k.for_range(warp, experts, LINEAR_WARPS_PER_BLOCK, |k, expert| {
        let product = RowProduct {
            dtype: spec.dtype,
            x_lane,
            w_lane: k.mad_wide(expert, row_bytes, w_lane),
            partials: (0..LINEAR_UNROLL).map(|_| k.mov::<F32>(0.0)).collect(),
        };
        if loops > 0 {
            let stride = LINEAR_UNROLL as u32 * STEP_BYTES;
            k.comment(&format!(
                "{loops} iterations of {LINEAR_UNROLL} steps of 512 bytes per row"
            ));
            k.for_range_no_unroll(0u32, loops as u32 * stride, stride, |k, offset| {
                let offset = k.cvt::<U64>(offset);
                product.steps(k, Some(offset), 0, LINEAR_UNROLL);
            });
        }
        let base = (loops * LINEAR_UNROLL) as u32 * STEP_BYTES;
        if tail > 0 {
            k.comment(&format!("the last {tail} whole steps, unrolled"));
            product.steps(k, None, base, tail);
        }
        if partial_lanes > 0 {
            k.comment(&format!(
                "the last {partial_lanes} chunks of the row: lanes below {partial_lanes}"
            ));
            let reads = k.setp(Cmp::Lt, lane, partial_lanes);
            k.if_then(reads, |k| {
                product.steps(k, None, base + tail as u32 * STEP_BYTES, 1);
            });
        }
        k.comment("the warp's sum, rounded to the dtype as the linear's result; lane 0 stores it");
        let mut total = product.partials[0];
        for &partial in &product.partials[1..] {
            total = k.add(total, partial);
        }
        let mut logit = k.warp_all_reduce(total, WarpReduce::Sum);
        if spec.dtype != DType::F32 {
            logit = round_to_dtype(k, spec.dtype, logit);
        }
        let lane0 = k.setp(Cmp::Eq, lane, 0u32);
        k.if_then(lane0, |k| {
            let address = k.mul_add(expert, 4u32, logits_base);
            k.st_shared(address.at(0), logit);
        });
    });
}

/// Generates the router kernel for `spec`.
pub fn generate(spec: &MoeRouterSpec) -> Result<GpuKernel, SpecError> {
    spec.validate()?;
    let experts = spec.experts as u32;
    let mut k = KernelBuilder::new(&spec.entry(), Target::Sm80);
    let launch = match spec.hidden {
        None => {
            let logits = k.param_pointer("logits", Access::Read);
            let weights = k.param_pointer("weights", Access::Write);
            let chosen = k.param_pointer("experts", Access::Write);
            let tokens = k.param_u32("tokens");

            k.comment("this warp's token and this lane's experts: lane, lane + 32, ...");
            let tid = k.tid_x();
            let lane = k.and(tid, 31u32);
            let warp = k.shr(tid, 5u32);
            let block = k.ctaid_x();
            let token = k.mul_add(block, WARPS_PER_BLOCK, warp);
            let in_range = k.setp(Cmp::Lt, token, tokens);
            k.if_then(in_range, |k| {
                let bytes = spec.element_bytes();
                let row = k.mad_wide(token, experts * bytes, logits);
                let lane_row: Reg<U64> = k.mad_wide(lane, bytes, row);
                let entries = load_entries(k, experts, lane, bytes, |k, offset| {
                    load_logit(k, spec.dtype, lane_row.at(offset))
                });
                let out = Outputs {
                    weights,
                    chosen,
                    lane,
                    token,
                };
                route(k, spec, &entries, &out);
            });
            LaunchRule::linear(Extent::ceil_div("tokens", WARPS_PER_BLOCK), spec.threads())
        }
        Some(hidden) => {
            let x = k.param_pointer("x", Access::Read);
            let w = k.param_pointer("w", Access::Read);
            let weights = k.param_pointer("weights", Access::Write);
            let chosen = k.param_pointer("experts", Access::Write);
            // Launched with one block per token: `tokens` only sizes the grid.
            k.param_u32("tokens");
            let logits = k.shared_array("logits", experts * 4, 16);

            k.comment("this block's token; its warps and lanes");
            let tid = k.tid_x();
            let lane = k.and(tid, 31u32);
            let warp = k.shr(tid, 5u32);
            let token = k.ctaid_x();
            let place = Place { token, warp, lane };
            linear_logits(&mut k, spec, hidden, (x, w), &place, &logits);
            k.bar_sync(0);

            k.comment("warp 0 routes the token, its lane i holding experts i, i + 32, ...");
            let router_warp = k.setp(Cmp::Eq, warp, 0u32);
            k.if_then(router_warp, |k| {
                let logits_base = k.shared_address(&logits);
                let lane_logits = k.mul_add(lane, 4u32, logits_base);
                let entries = load_entries(k, experts, lane, 4, |k, offset| {
                    k.ld_shared::<F32>(lane_logits.at(offset))
                });
                let out = Outputs {
                    weights,
                    chosen,
                    lane,
                    token,
                };
                route(k, spec, &entries, &out);
            });
            LaunchRule::linear(Extent::ceil_div("tokens", 1), spec.threads())
        }
    };
    Ok(k.finish(launch))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(experts: usize, top_k: usize) -> MoeRouterSpec {
        MoeRouterSpec {
            dtype: DType::BF16,
            experts,
            top_k,
            normalize: true,
            hidden: None,
        }
    }

    fn fused(experts: usize, top_k: usize, hidden: usize) -> MoeRouterSpec {
        MoeRouterSpec {
            hidden: Some(hidden),
            ..spec(experts, top_k)
        }
    }

    #[test]
    fn names_and_parameters() {
        assert_eq!(spec(8, 2).entry(), "moe_router_bf16_e8_k2_norm");
        let plain = MoeRouterSpec {
            normalize: false,
            ..spec(128, 8)
        };
        assert_eq!(plain.entry(), "moe_router_bf16_e128_k8");
        let kernel = generate(&spec(8, 2)).unwrap();
        let names: Vec<_> = kernel.params.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["logits", "weights", "experts", "tokens"]);
        assert_eq!(
            fused(8, 2, 4096).entry(),
            "moe_router_linear_bf16_h4096_e8_k2_norm"
        );
        let kernel = generate(&fused(8, 2, 4096)).unwrap();
        let names: Vec<_> = kernel.params.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["x", "w", "weights", "experts", "tokens"]);
    }

    #[test]
    fn bad_specs_are_refused_naming_the_field() {
        for (bad, field) in [
            (spec(0, 1), "experts"),
            (spec(MAX_EXPERTS + 1, 2), "experts"),
            (spec(8, 0), "top_k"),
            (spec(8, 9), "top_k"),
            (spec(64, 33), "top_k"),
            (fused(8, 2, 0), "hidden"),
            (fused(8, 2, 4100), "hidden"),
            (fused(8, 2, MAX_HIDDEN + 8), "hidden"),
        ] {
            let err = generate(&bad).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
        let i32 = MoeRouterSpec {
            dtype: DType::I32,
            ..spec(8, 2)
        };
        let err = generate(&i32).unwrap_err().to_string();
        assert!(err.contains("dtype"), "{err}");
    }
}
