//! MoE combine: each token's output, the routing-weighted sum of its `top_k` expert rows
//! (`kiln_ir::op::Op::MoeCombine`).
//!
//! `y` holds the expert FFN's rows in dispatch order: row `p` belongs to slot `order[p]`
//! (`slot = token · top_k + j`). For token `t`, `p_j` is the position with `order[p_j] =
//! t · top_k + j`, and `out[t, h] = Σ_j weights[t, j] · y[p_j, h]`, accumulated in f32 in
//! `j` order and rounded once to the dtype (the interpreter sums in f64: results agree
//! within the dtype's rounding). A slot that appears nowhere in `order` makes the token's
//! whole output row NaN (nothing out of bounds is read); a slot that appears twice uses its
//! lowest position (`atom.shared.min`, so the result does not depend on scheduling).
//!
//! Parameters: `y` (read, `[slots, hidden]` of `dtype`), `order` (read, i32 `[slots]`),
//! `weights` (read, f32 `[tokens, top_k]`), `out` (write, `[tokens, hidden]` of `dtype`);
//! scalar `tokens`, with `slots = tokens · top_k` below 2³¹.
//!
//! Launch: one block per token (`grid.x = tokens`), whose threads (one per 16-byte chunk of
//! a row when `hidden` is a multiple of 8, else one per element; whole warps, at most 256)
//! first scan `order` together for the token's `top_k` positions (kept in shared memory,
//! one barrier), then stride over the row, each reading the `top_k` source rows at its
//! chunk. This file generates PTX; it must not launch anything.

use crate::vector::{
    check_half, load_chunk, load_scalar, store_chunk, store_scalar, HALVES_PER_CHUNK,
};
use crate::SpecError;
use kiln_codegen::kernel::{Access, Extent, GpuKernel, LaunchRule};
use kiln_codegen::ptx::{Cmp, KernelBuilder, Load, Reg, Space, Target, F32, U32};
use kiln_ir::dtype::DType;
use serde::{Deserialize, Serialize};

const FAMILY: &str = "moe_combine";
/// Bytes of one element (f16 and bf16).
const ELEMENT_BYTES: u32 = 2;
/// The longest row, in elements.
pub const MAX_HIDDEN: usize = 1 << 20;
/// The most experts per token: their weights and positions stay in registers.
pub const MAX_TOP_K: usize = 32;

/// An MoE combine kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MoeCombineSpec {
    /// Storage dtype of `y` and `out` (f16 or bf16).
    pub dtype: DType,
    /// Row length, `1..=2^20`.
    pub hidden: usize,
    /// Experts per token, `1..=32`.
    pub top_k: usize,
}

impl MoeCombineSpec {
    /// Whether rows are whole 16-byte chunks, read and written with vector accesses.
    pub fn vectorized(&self) -> bool {
        self.hidden.is_multiple_of(HALVES_PER_CHUNK)
    }

    /// Elements per access: eight (a 16-byte chunk) or one.
    pub fn access_elements(&self) -> usize {
        if self.vectorized() {
            HALVES_PER_CHUNK
        } else {
            1
        }
    }

    /// Threads per block: one per access of a row, whole warps, at most 256.
    pub fn threads(&self) -> u32 {
        let accesses = (self.hidden / self.access_elements()) as u32;
        accesses.div_ceil(32).clamp(1, 8) * 32
    }

    /// The kernel entry name: `moe_combine_bf16_h4096_k2_v16` (vector) or
    /// `moe_combine_f16_h13_k2_s2` (scalar).
    pub fn entry(&self) -> String {
        let access = self.access_elements() as u32 * ELEMENT_BYTES;
        let kind = if self.vectorized() { "v" } else { "s" };
        format!(
            "moe_combine_{}_h{}_k{}_{kind}{access}",
            self.dtype, self.hidden, self.top_k
        )
    }

    /// Why the generator cannot build this spec, naming the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_half(FAMILY, self.dtype)?;
        if self.hidden == 0 || self.hidden > MAX_HIDDEN {
            return Err(SpecError::new(
                FAMILY,
                format!("hidden must be 1..={MAX_HIDDEN}, got {}", self.hidden),
            ));
        }
        if self.top_k == 0 || self.top_k > MAX_TOP_K {
            return Err(SpecError::new(
                FAMILY,
                format!("top_k must be 1..={MAX_TOP_K}, got {}", self.top_k),
            ));
        }
        Ok(())
    }
}

/// Generates the combine kernel for `spec`.
pub fn generate(spec: &MoeCombineSpec) -> Result<GpuKernel, SpecError> {
    spec.validate()?;
    let top_k = spec.top_k as u32;
    let threads = spec.threads();
    let row_bytes = spec.hidden as u32 * ELEMENT_BYTES;
    let accesses = (spec.hidden / spec.access_elements()) as u32;
    let access_bytes = spec.access_elements() as u32 * ELEMENT_BYTES;
    let load = Load::GLOBAL.non_coherent();

    let mut k = KernelBuilder::new(&spec.entry(), Target::Sm80);
    let y = k.param_pointer("y", Access::Read);
    let order = k.param_pointer("order", Access::Read);
    let weights = k.param_pointer("weights", Access::Read);
    let out = k.param_pointer("out", Access::Write);
    let tokens = k.param_u32("tokens");

    let positions = k.shared_array("positions", 4 * top_k, 4);
    let positions_base = k.shared_address(&positions);
    let token = k.ctaid_x();
    let tid = k.tid_x();
    let in_range = k.setp(Cmp::Lt, token, tokens);
    k.if_then(in_range, |k| {
        k.comment("find the token's positions in order: p_j with order[p_j] = token * k + j");
        let none = u32::MAX;
        k.for_range(tid, top_k, threads, |k, j| {
            let address = k.mul_add(j, 4u32, positions_base);
            let missing = k.mov::<U32>(none);
            k.st_shared(address, missing);
        });
        k.bar_sync(0);
        let slots = k.mul(tokens, top_k);
        let first_slot = k.mul(token, top_k);
        k.for_range(tid, slots, threads, |k, p| {
            let source = k.mad_wide(p, 4u32, order);
            let slot = k.ld::<U32>(load, source);
            // Unsigned: a slot below the token's first wraps to a large value.
            let j = k.sub(slot, first_slot);
            let ours = k.setp(Cmp::Lt, j, top_k);
            k.if_then(ours, |k| {
                let address = k.mul_add(j, 4u32, positions_base);
                k.atom_min::<U32>(Space::Shared, address, p);
            });
        });
        k.bar_sync(0);

        k.comment("each choice's weight and row; a missing slot gives weight NaN and row 0");
        let weight_row = k.mad_wide(token, top_k * 4, weights);
        let mut picks: Vec<(Reg<F32>, Reg<U32>)> = Vec::new();
        for j in 0..top_k {
            let position = k.ld_shared::<U32>(positions.at(4 * j as i64));
            let found = k.setp(Cmp::Ne, position, none);
            let weight = k.ld::<F32>(load, weight_row.at(4 * j as i64));
            let weight = k.select(found, weight, f32::NAN);
            let position = k.select(found, position, 0u32);
            picks.push((weight, position));
        }

        k.comment("out[token] = sum_j weight_j * y[p_j], in j order, rounded once");
        let out_row = k.mad_wide(token, row_bytes, out);
        k.for_range(tid, accesses, threads, |k, access| {
            let offset = k.mul_wide(access, access_bytes);
            let destination = k.add(out_row, offset);
            if spec.vectorized() {
                let mut sums: Option<[Reg<F32>; 8]> = None;
                for &(weight, position) in &picks {
                    let row = k.mad_wide(position, row_bytes, y);
                    let source = k.add(row, offset);
                    let values = load_chunk(k, load, spec.dtype, source);
                    sums = Some(match sums {
                        None => values.map(|v| k.mul(weight, v)),
                        Some(acc) => std::array::from_fn(|i| k.fma(weight, values[i], acc[i])),
                    });
                }
                let sums = sums.expect("top_k ≥ 1");
                store_chunk(
                    k,
                    kiln_codegen::ptx::Store::GLOBAL,
                    spec.dtype,
                    destination,
                    &sums,
                );
            } else {
                let mut sum: Option<Reg<F32>> = None;
                for &(weight, position) in &picks {
                    let row = k.mad_wide(position, row_bytes, y);
                    let source = k.add(row, offset);
                    let value = load_scalar(k, spec.dtype, source);
                    sum = Some(match sum {
                        None => k.mul(weight, value),
                        Some(acc) => k.fma(weight, value, acc),
                    });
                }
                let sum = sum.expect("top_k ≥ 1");
                store_scalar(k, spec.dtype, destination, sum);
            }
        });
    });
    Ok(k.finish(LaunchRule::linear(Extent::ceil_div("tokens", 1), threads)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(hidden: usize, top_k: usize) -> MoeCombineSpec {
        MoeCombineSpec {
            dtype: DType::BF16,
            hidden,
            top_k,
        }
    }

    #[test]
    fn names_threads_and_parameters() {
        let wide = spec(4096, 2);
        assert!(wide.vectorized());
        assert_eq!(wide.threads(), 256);
        assert_eq!(wide.entry(), "moe_combine_bf16_h4096_k2_v16");
        let odd = spec(13, 8);
        assert!(!odd.vectorized());
        assert_eq!(odd.threads(), 32);
        assert_eq!(odd.entry(), "moe_combine_bf16_h13_k8_s2");
        let kernel = generate(&wide).unwrap();
        let names: Vec<_> = kernel.params.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["y", "order", "weights", "out", "tokens"]);
    }

    #[test]
    fn bad_specs_are_refused_naming_the_field() {
        for (bad, field) in [
            (spec(0, 2), "hidden"),
            (spec(MAX_HIDDEN + 1, 2), "hidden"),
            (spec(64, 0), "top_k"),
            (spec(64, MAX_TOP_K + 1), "top_k"),
        ] {
            let err = generate(&bad).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
        let f32 = MoeCombineSpec {
            dtype: DType::F32,
            ..spec(64, 2)
        };
        let err = generate(&f32).unwrap_err().to_string();
        assert!(err.contains("f16 or bf16"), "{err}");
    }
}
