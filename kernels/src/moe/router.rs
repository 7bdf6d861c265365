//! The MoE router: each token's logits over the experts → softmax → its `top_k` experts and
//! their routing weights (`kiln_ir::op::Op::MoeRouter`).
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
//! Parameters: `logits` (read, `[tokens, experts]` of `dtype`), `weights` (write, f32
//! `[tokens, top_k]`), `experts` (write, i32 `[tokens, top_k]`); scalar `tokens`.
//!
//! Launch: one warp per token, [`WARPS_PER_BLOCK`] warps per block (`grid.x =
//! ceil(tokens / 4)`, block 128 threads); a warp past the last token does nothing. Lane `i`
//! holds experts `i, i + 32, …` in registers (so `experts ≤` [`MAX_EXPERTS`]); the max and the
//! sum are butterfly all-reductions; pick `j` is a warp argmax over the entries after pick
//! `j − 1` in the order (logit descending, index ascending), so every pick is found without
//! marking anything. Lane `j` keeps pick `j` and writes it (`top_k ≤` [`MAX_TOP_K`]). No
//! shared memory and no block barrier. This file generates PTX; it must not launch anything.

use crate::vector::load_scalar;
use crate::SpecError;
use kiln_codegen::kernel::{Access, Extent, GpuKernel, LaunchRule};
use kiln_codegen::ptx::{Cmp, KernelBuilder, Load, Pred, Reg, Target, WarpReduce, F32, U32, U64};
use kiln_ir::dtype::DType;
use serde::{Deserialize, Serialize};

const FAMILY: &str = "moe_router";
/// Warps (tokens) per block.
pub const WARPS_PER_BLOCK: u32 = 4;
/// The most experts: 32 logits per lane, held in registers.
pub const MAX_EXPERTS: usize = 1024;
/// The most experts chosen per token: one per lane.
pub const MAX_TOP_K: usize = 32;
const LOG2_E: f32 = std::f32::consts::LOG2_E;

/// An MoE router kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MoeRouterSpec {
    /// Storage dtype of the logits (f16, bf16 or f32).
    pub dtype: DType,
    /// Experts per token (the logits' row length), `1..=1024`.
    pub experts: usize,
    /// Experts chosen per token, `1..=min(experts, 32)`.
    pub top_k: usize,
    /// Renormalise the chosen weights to sum to 1.
    pub normalize: bool,
}

impl MoeRouterSpec {
    /// Threads per block: [`WARPS_PER_BLOCK`] warps.
    pub fn threads(&self) -> u32 {
        WARPS_PER_BLOCK * 32
    }

    /// The kernel entry name: `moe_router_bf16_e8_k2_norm` (`_norm` when normalising).
    pub fn entry(&self) -> String {
        let norm = if self.normalize { "_norm" } else { "" };
        format!(
            "moe_router_{}_e{}_k{}{norm}",
            self.dtype, self.experts, self.top_k
        )
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

/// Loads one logit at `address` as f32.
fn load_logit(k: &mut KernelBuilder, dtype: DType, address: kiln_codegen::ptx::Mem) -> Reg<F32> {
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

/// Generates the router kernel for `spec`.
pub fn generate(spec: &MoeRouterSpec) -> Result<GpuKernel, SpecError> {
    spec.validate()?;
    let experts = spec.experts as u32;
    let top_k = spec.top_k as u32;
    let bytes = spec.element_bytes();
    let chunks = experts.div_ceil(32);

    let mut k = KernelBuilder::new(&spec.entry(), Target::Sm80);
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
        let row = k.mad_wide(token, experts * bytes, logits);
        let lane_row: Reg<U64> = k.mad_wide(lane, bytes, row);
        let mut entries: Vec<Entry> = Vec::new();
        k.comment("load the logits; entries past the last expert hold NaN (never picked)");
        for c in 0..chunks {
            let index = k.add(lane, 32 * c);
            let address = lane_row.at((32 * c * bytes) as i64);
            if (c + 1) * 32 <= experts {
                let value = load_logit(k, spec.dtype, address);
                entries.push(Entry {
                    value,
                    index,
                    valid: None,
                });
            } else {
                let valid = k.setp(Cmp::Lt, index, experts);
                let value = k.mov::<F32>(f32::NAN);
                k.if_then(valid, |k| {
                    let loaded = load_logit(k, spec.dtype, address);
                    k.assign(value, loaded);
                });
                entries.push(Entry {
                    value,
                    index,
                    valid: Some(valid),
                });
            }
        }

        k.comment("softmax statistics: the row's max and sum of exp(l - max)");
        let lane_max = k.mov::<F32>(f32::NEG_INFINITY);
        for &Entry { value, .. } in &entries {
            // `max.f32` ignores a NaN operand: padding does not count.
            let m = k.max(lane_max, value);
            k.assign(lane_max, m);
        }
        let max = k.warp_all_reduce(lane_max, WarpReduce::Max);
        let lane_sum = k.mov::<F32>(0.0);
        for &Entry { value, valid, .. } in &entries {
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
            for &Entry { value, index, .. } in &entries {
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
            let weight_row = k.mad_wide(token, top_k * 4, weights);
            let weight_address = k.add(weight_row, offset);
            k.st_global(weight_address, my_weight);
            let expert_row = k.mad_wide(token, top_k * 4, chosen);
            let expert_address = k.add(expert_row, offset);
            k.st_global(expert_address, my_expert);
        });
    });
    Ok(k.finish(LaunchRule::linear(
        Extent::ceil_div("tokens", WARPS_PER_BLOCK),
        spec.threads(),
    )))
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
    }

    #[test]
    fn bad_specs_are_refused_naming_the_field() {
        for (bad, field) in [
            (spec(0, 1), "experts"),
            (spec(MAX_EXPERTS + 1, 2), "experts"),
            (spec(8, 0), "top_k"),
            (spec(8, 9), "top_k"),
            (spec(64, 33), "top_k"),
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
