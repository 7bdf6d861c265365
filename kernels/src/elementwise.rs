//! The fused elementwise map: `out[i] = expr(in_0[i], …, in_{n−1}[i])` over any expression
//! of `kiln_codegen::expr`, for f16 and bf16 tensors of the same length.
//!
//! Each thread handles 16-byte chunks (eight elements per input) in a grid-stride loop, so
//! every global access is a 16-byte vector; the last `n mod 8` elements are handled one by
//! one by the first threads. The arithmetic is f32, lowered by `lower_expr`. Parameters:
//! `in0`, `in1`, … (read), `out` (write), scalar `n` (elements). This file generates PTX; it
//! must not launch anything.

use crate::vector::{
    check_half, load_chunk, load_scalar, store_chunk, store_scalar, HALVES_PER_CHUNK,
};
use crate::SpecError;
use kiln_codegen::expr::Expr;
use kiln_codegen::kernel::{Access, Extent, GpuKernel, LaunchRule};
use kiln_codegen::ptx::{
    lower_expr, Axis, Cmp, KernelBuilder, Load, Reg, Special, Store, Target, F32, U64,
};
use kiln_ir::dtype::DType;
use serde::{Deserialize, Serialize};

const FAMILY: &str = "elementwise";
/// Threads per block.
pub const THREADS: u32 = 256;
/// Chunks per thread per grid-stride step, sizing the grid: enough blocks to fill the GPU
/// without one thread per chunk.
const CHUNKS_PER_THREAD: u32 = 4;

/// A fused elementwise map.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ElementwiseSpec {
    /// Storage dtype of every input and of the output.
    pub dtype: DType,
    /// The number of inputs the kernel takes; `expr` may read fewer.
    pub inputs: usize,
    pub expr: Expr,
}

impl ElementwiseSpec {
    /// The kernel entry name: family, dtype, arity and a short hash of the expression, so
    /// two different maps never share a name.
    pub fn entry(&self) -> String {
        let text = serde_json::to_string(&self.expr).expect("expressions serialise");
        // FNV-1a: stable across runs and platforms.
        let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        format!(
            "elementwise_{}_{}in_{:08x}",
            self.dtype, self.inputs, hash as u32
        )
    }
}

/// Generates the map kernel for `spec`.
pub fn generate(spec: &ElementwiseSpec) -> Result<GpuKernel, SpecError> {
    check_half(FAMILY, spec.dtype)?;
    if spec.inputs == 0 || spec.inputs > 8 {
        return Err(SpecError::new(
            FAMILY,
            format!("inputs must be 1..=8, got {}", spec.inputs),
        ));
    }
    if spec.expr.arity() > spec.inputs {
        return Err(SpecError::new(
            FAMILY,
            format!(
                "the expression reads input {} but the map has {} inputs",
                spec.expr.arity() - 1,
                spec.inputs
            ),
        ));
    }
    let dtype = spec.dtype;
    let mut k = KernelBuilder::new(&spec.entry(), Target::Sm80);
    let inputs: Vec<Reg<U64>> = (0..spec.inputs)
        .map(|i| k.param_pointer(&format!("in{i}"), Access::Read))
        .collect();
    let out = k.param_pointer("out", Access::Write);
    let n = k.param_u32("n");

    k.comment("vector part: 16-byte chunks of eight elements, grid-stride");
    let chunks = k.shr(n, 3u32);
    let first = k.global_index_x();
    let blocks = k.special(Special::Nctaid(Axis::X));
    let stride = k.mul(blocks, THREADS);
    let load = Load::GLOBAL.non_coherent();
    k.for_range(first, chunks, stride, |k, chunk| {
        let offset = k.mul_wide(chunk, 16u32);
        let values: Vec<[Reg<F32>; 8]> = inputs
            .iter()
            .map(|&base| {
                let address = k.add(base, offset);
                load_chunk(k, load, dtype, address)
            })
            .collect();
        let results: Vec<Reg<F32>> = (0..HALVES_PER_CHUNK)
            .map(|lane| {
                let operands: Vec<Reg<F32>> = values.iter().map(|v| v[lane]).collect();
                lower_expr(k, &spec.expr, &operands)
            })
            .collect();
        let destination = k.add(out, offset);
        let results: [Reg<F32>; 8] = results.try_into().expect("eight lanes");
        store_chunk(k, Store::GLOBAL, dtype, destination, &results);
    });

    k.comment("scalar tail: the last n mod 8 elements, one per thread of the first block");
    let vector_elements = k.shl(chunks, 3u32);
    let element = k.add(vector_elements, first);
    let in_tail = k.setp(Cmp::Lt, element, n);
    k.if_then(in_tail, |k| {
        let offset = k.mul_wide(element, 2u32);
        let operands: Vec<Reg<F32>> = inputs
            .iter()
            .map(|&base| {
                let address = k.add(base, offset);
                load_scalar(k, dtype, address)
            })
            .collect();
        let result = lower_expr(k, &spec.expr, &operands);
        let destination = k.add(out, offset);
        store_scalar(k, dtype, destination, result);
    });
    let per_block = THREADS * CHUNKS_PER_THREAD * HALVES_PER_CHUNK as u32;
    Ok(k.finish(LaunchRule::linear(
        Extent::ceil_div("n", per_block),
        THREADS,
    )))
}
