//! Rotary position embedding, Llama / Hugging Face "rotate half" style.
//!
//! For a tensor `[tokens, heads, head_dim]` and one position per token, element `i` of the
//! first half pairs with `i + head_dim/2`: `out_i = x_i cos θ − x_{i+D/2} sin θ`,
//! `out_{i+D/2} = x_{i+D/2} cos θ + x_i sin θ`, `θ = position · theta^(−2i/D)`, as the IR's
//! `rope` op defines. Each thread rotates eight pairs with two 16-byte loads and stores.
//! Angles are reduced to [−π, π] before `sin.approx`/`cos.approx`, so long contexts keep
//! their accuracy. Grid: `x` covers heads × pair-chunks, `y` is the token.
//!
//! Parameters: `x`, `positions` (i32 per token), `out`; scalar `tokens`. This file generates
//! PTX; it must not launch anything.

use crate::vector::{check_half, load_chunk, store_chunk, HALVES_PER_CHUNK};
use crate::SpecError;
use kiln_codegen::kernel::{Access, Extent, GpuKernel, LaunchRule};
use kiln_codegen::ptx::{Axis, Cmp, KernelBuilder, Load, Reg, Special, Store, Target, F32, S32};
use kiln_ir::dtype::DType;
use serde::{Deserialize, Serialize};

const FAMILY: &str = "rope";
const THREADS: u32 = 128;

/// A RoPE kernel.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeSpec {
    pub dtype: DType,
    pub heads: usize,
    /// A multiple of 16 (eight pairs per thread).
    pub head_dim: usize,
    pub theta: f32,
}

impl RopeSpec {
    /// The kernel entry name.
    pub fn entry(&self) -> String {
        format!(
            "rope_{}_h{}_d{}_theta{}",
            self.dtype, self.heads, self.head_dim, self.theta as u64
        )
    }
}

/// Generates the RoPE kernel for `spec`.
pub fn generate(spec: &RopeSpec) -> Result<GpuKernel, SpecError> {
    check_half(FAMILY, spec.dtype)?;
    if spec.head_dim == 0 || !spec.head_dim.is_multiple_of(2 * HALVES_PER_CHUNK) {
        return Err(SpecError::new(
            FAMILY,
            format!(
                "head_dim must be a positive multiple of 16, got {}",
                spec.head_dim
            ),
        ));
    }
    if spec.heads == 0 {
        return Err(SpecError::new(FAMILY, "heads must be at least 1"));
    }
    if !(spec.theta > 1.0 && spec.theta.is_finite()) {
        return Err(SpecError::new(
            FAMILY,
            format!("theta must be finite and > 1, got {}", spec.theta),
        ));
    }
    let dtype = spec.dtype;
    let half = spec.head_dim / 2;
    let chunks_per_head = (half / HALVES_PER_CHUNK) as u32;
    let work_per_token = spec.heads as u32 * chunks_per_head;
    let token_bytes = (spec.heads * spec.head_dim * 2) as u32;

    let mut k = KernelBuilder::new(&spec.entry(), Target::Sm80);
    let x = k.param_pointer("x", Access::Read);
    let positions = k.param_pointer("positions", Access::Read);
    let out = k.param_pointer("out", Access::Write);
    let _tokens = k.param_u32("tokens");

    k.comment("which token, head and chunk of eight pairs this thread rotates");
    let token = k.special(Special::Ctaid(Axis::Y));
    let work = k.global_index_x();
    let active = k.setp(Cmp::Lt, work, work_per_token);
    k.if_then(active, |k| {
        let head = k.div(work, chunks_per_head);
        let chunk = k.rem(work, chunks_per_head);
        let position_address = k.mad_wide(token, 4u32, positions);
        let position = k.ld::<S32>(Load::GLOBAL.non_coherent(), position_address);
        let position = k.cvt_rn::<F32>(position);

        k.comment("angles: position * theta^(-2i/D), reduced to [-pi, pi]");
        let first_pair = k.mul(chunk, HALVES_PER_CHUNK as u32);
        let first_pair = k.cvt_rn::<F32>(first_pair);
        let log2_theta = (spec.theta as f64).log2();
        let exponent_step = (-2.0 * log2_theta / spec.head_dim as f64) as f32;
        let mut cos = Vec::new();
        let mut sin = Vec::new();
        for lane in 0..HALVES_PER_CHUNK {
            let i = k.add(first_pair, lane as f32);
            let exponent = k.mul(i, exponent_step);
            let frequency = k.ex2_approx(exponent);
            let angle = k.mul(position, frequency);
            let turns = k.mul(angle, (1.0 / std::f64::consts::TAU) as f32);
            let turns = k.cvt_round::<S32>(turns, kiln_codegen::ptx::Round::Nearest);
            let turns = k.cvt_rn::<F32>(turns);
            // angle − turns·2π with 2π split in two parts, so the product stays exact.
            let high = (std::f64::consts::TAU as f32) as f64;
            let low = (std::f64::consts::TAU - high) as f32;
            let reduced = k.fma(turns, -(high as f32), angle);
            let reduced = k.fma(turns, -low, reduced);
            cos.push(k.cos_approx(reduced));
            sin.push(k.sin_approx(reduced));
        }

        k.comment("rotate: two 16-byte loads (first and second half), two stores");
        let head_offset = k.mul(head, (spec.head_dim * 2) as u32);
        let chunk_offset = k.mul(chunk, 16u32);
        let within = k.add(head_offset, chunk_offset);
        let token_offset = k.mul_wide(token, token_bytes);
        let within = k.cvt::<kiln_codegen::ptx::U64>(within);
        let offset = k.add(token_offset, within);
        let second_half = (half * 2) as i64;
        let source = k.add(x, offset);
        let load = Load::GLOBAL.non_coherent();
        let a = load_chunk(k, load, dtype, source);
        let b = load_chunk(k, load, dtype, source.at(second_half));
        let first: [Reg<F32>; 8] = std::array::from_fn(|i| {
            let t = k.mul(b[i], sin[i]);
            let negated = k.neg(t);
            k.fma(a[i], cos[i], negated)
        });
        let second: [Reg<F32>; 8] = std::array::from_fn(|i| {
            let t = k.mul(a[i], sin[i]);
            k.fma(b[i], cos[i], t)
        });
        let destination = k.add(out, offset);
        store_chunk(k, Store::GLOBAL, dtype, destination, &first);
        store_chunk(
            k,
            Store::GLOBAL,
            dtype,
            destination.at(second_half),
            &second,
        );
    });
    let launch = LaunchRule {
        grid: [
            Extent::fixed(work_per_token.div_ceil(THREADS)),
            Extent::ceil_div("tokens", 1),
            Extent::fixed(1),
        ],
        block: [THREADS, 1, 1],
        shared_bytes: 0,
    };
    Ok(k.finish(launch))
}
