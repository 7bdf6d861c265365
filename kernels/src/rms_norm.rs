//! RMSNorm, optionally fused with the residual add that precedes it in a decoder layer.
//!
//! One block per row. Plain: `out = x / sqrt(mean(x²) + eps) · weight`. With
//! `residual`: `h = x + residual` is rounded to the dtype and written to `residual_out` (the
//! new hidden state), and `out = rmsnorm(h)`, which is exactly the IR's `add` followed by
//! `rms_norm`. Every global access is a 16-byte vector; each thread keeps its chunks of the
//! row in registers between the reduction and the scaling, so the row is read once.
//!
//! Parameters: `x`, `weight`, [`residual`, `residual_out`], `out`; scalars `rows`, `eps`.
//! This file generates PTX; it must not launch anything.

use crate::reduce::block_sum;
use crate::vector::{
    check_half, load_chunk, narrow_pair, store_chunk, widen_pair, HALVES_PER_CHUNK,
};
use crate::SpecError;
use kiln_codegen::kernel::{Access, Extent, GpuKernel, LaunchRule};
use kiln_codegen::ptx::{Cmp, KernelBuilder, Load, Reg, Store, Target, B32, F32, U32};
use kiln_ir::dtype::DType;
use serde::{Deserialize, Serialize};

const FAMILY: &str = "rms_norm";

/// An RMSNorm kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RmsNormSpec {
    pub dtype: DType,
    /// Row length; a multiple of 8.
    pub hidden: usize,
    /// Fuse the residual add (`h = x + residual`, written to `residual_out`).
    pub residual: bool,
}

impl RmsNormSpec {
    /// Threads per block: one per 16-byte chunk, rounded up to whole warps, at most 1024.
    pub fn threads(&self) -> u32 {
        let chunks = (self.hidden / HALVES_PER_CHUNK) as u32;
        chunks.div_ceil(32).clamp(1, 32) * 32
    }

    /// The kernel entry name.
    pub fn entry(&self) -> String {
        let fused = if self.residual { "_residual" } else { "" };
        format!("rms_norm{fused}_{}_h{}", self.dtype, self.hidden)
    }
}

/// Generates the RMSNorm kernel for `spec`.
pub fn generate(spec: &RmsNormSpec) -> Result<GpuKernel, SpecError> {
    check_half(FAMILY, spec.dtype)?;
    if spec.hidden == 0 || !spec.hidden.is_multiple_of(HALVES_PER_CHUNK) {
        return Err(SpecError::new(
            FAMILY,
            format!(
                "hidden must be a positive multiple of 8, got {}",
                spec.hidden
            ),
        ));
    }
    let dtype = spec.dtype;
    let threads = spec.threads();
    let chunks = (spec.hidden / HALVES_PER_CHUNK) as u32;
    let per_thread = chunks.div_ceil(threads);
    let row_bytes = spec.hidden as u32 * 2;

    let mut k = KernelBuilder::new(&spec.entry(), Target::Sm80);
    let x = k.param_pointer("x", Access::Read);
    let weight = k.param_pointer("weight", Access::Read);
    let residual = spec.residual.then(|| {
        let input = k.param_pointer("residual", Access::Read);
        let output = k.param_pointer("residual_out", Access::Write);
        (input, output)
    });
    let out = k.param_pointer("out", Access::Write);
    let _rows = k.param_u32("rows");
    let eps = k.param_f32("eps");

    k.comment("this block's row and this thread's chunks of it");
    let row = k.ctaid_x();
    let tid = k.tid_x();
    let row_offset = k.mul_wide(row, row_bytes);
    let load = Load::GLOBAL.non_coherent();
    let zero = k.mov::<F32>(0.0);
    let mut values: Vec<[Reg<F32>; 8]> = Vec::new();
    let mut valid = Vec::new();
    let square_sum = k.mov::<F32>(0.0);

    k.comment("stage 1: load the row (adding the residual), sum the squares");
    for j in 0..per_thread {
        let chunk = k.add(tid, j * threads);
        let in_row = k.setp(Cmp::Lt, chunk, chunks);
        let slots: [Reg<F32>; 8] = std::array::from_fn(|_| k.mov::<F32>(zero));
        k.if_then(in_row, |k| {
            let chunk_offset = k.mul_wide(chunk, 16u32);
            let offset = k.add(row_offset, chunk_offset);
            let source = k.add(x, offset);
            let loaded = load_chunk(k, load, dtype, source);
            let loaded = match residual {
                None => loaded,
                Some((input, output)) => {
                    let address = k.add(input, offset);
                    let other = load_chunk(k, load, dtype, address);
                    add_round_and_store(k, dtype, &loaded, &other, output, offset)
                }
            };
            for (slot, value) in slots.iter().zip(loaded) {
                k.assign(*slot, value);
                let sum = k.fma(value, value, square_sum);
                k.assign(square_sum, sum);
            }
        });
        values.push(slots);
        valid.push((chunk, in_row));
    }

    k.comment("stage 2: mean square over the block, inverse root");
    let total = block_sum(&mut k, square_sum, threads, tid, "partial_sums");
    let mean = k.mul(total, 1.0 / spec.hidden as f32);
    let shifted = k.add(mean, eps);
    let inverse = k.rsqrt_approx(shifted);

    k.comment("stage 3: scale by the inverse root and the weight, store");
    for (slots, (chunk, in_row)) in values.iter().zip(valid) {
        k.if_then(in_row, |k| {
            let chunk_offset = k.mul_wide(chunk, 16u32);
            let w_address = k.add(weight, chunk_offset);
            let w = load_chunk(k, load, dtype, w_address);
            let results: [Reg<F32>; 8] = std::array::from_fn(|i| {
                let normalised = k.mul(slots[i], inverse);
                k.mul(normalised, w[i])
            });
            let offset = k.add(row_offset, chunk_offset);
            let destination = k.add(out, offset);
            store_chunk(k, Store::GLOBAL, dtype, destination, &results);
        });
    }
    Ok(k.finish(LaunchRule::linear(Extent::ceil_div("rows", 1), threads)))
}

/// `x + residual` rounded to the dtype: stored to `output + offset` and returned widened,
/// so the norm sees exactly the stored hidden state.
fn add_round_and_store(
    k: &mut KernelBuilder,
    dtype: DType,
    x: &[Reg<F32>; 8],
    residual: &[Reg<F32>; 8],
    output: Reg<kiln_codegen::ptx::U64>,
    offset: Reg<kiln_codegen::ptx::U64>,
) -> [Reg<F32>; 8] {
    let sums: Vec<Reg<F32>> = x.iter().zip(residual).map(|(&a, &b)| k.add(a, b)).collect();
    let words: Vec<Reg<B32>> = sums
        .chunks(2)
        .map(|p| narrow_pair(k, dtype, p[0], p[1]))
        .collect();
    let words: [Reg<B32>; 4] = words.try_into().expect("four words");
    let destination = k.add(output, offset);
    k.st_vector(Store::GLOBAL, destination, words);
    let mut rounded = Vec::with_capacity(8);
    for word in words {
        let word = k.bitcast::<U32>(word);
        rounded.extend(widen_pair(k, dtype, word));
    }
    rounded.try_into().expect("eight values")
}
