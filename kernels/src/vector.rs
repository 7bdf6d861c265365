//! 16-byte vector access to half-precision tensors: eight f16 or bf16 values loaded with one
//! `ld.global.v4.b32` and widened to f32 registers, and eight f32 results narrowed and stored
//! with one `st.global.v4.b32`.
//!
//! Shared by every memory-bound generator so that the widening and narrowing are written
//! once. bf16 widens with integer shifts (exact, and valid on sm_80 where `cvt.f32.bf16` is
//! not); f16 with `cvt.f32.f16`. Narrowing rounds to nearest even. Nothing here decides
//! addresses or loops: callers pass the address of a 16-byte aligned chunk.

use crate::SpecError;
use kiln_codegen::ptx::{BF16x2, F16x2, KernelBuilder, Load, Mem, Reg, Store, B32, F32, U32};
use kiln_ir::dtype::DType;

/// Elements in one 16-byte chunk of a half-precision tensor.
pub const HALVES_PER_CHUNK: usize = 8;

/// The half-precision storage dtypes the memory-bound generators accept.
pub fn check_half(family: &'static str, dtype: DType) -> Result<(), SpecError> {
    match dtype {
        DType::F16 | DType::BF16 => Ok(()),
        other => Err(SpecError::new(
            family,
            format!("dtype must be f16 or bf16, got {other}"),
        )),
    }
}

/// Widens one 32-bit word holding two halves (low element first) into two f32 registers.
pub fn widen_pair(k: &mut KernelBuilder, dtype: DType, word: Reg<U32>) -> [Reg<F32>; 2] {
    match dtype {
        DType::BF16 => {
            // A bf16 is the top half of an f32: shift the low element up, mask the high one.
            let lo = k.shl(word, 16u32);
            let hi = k.and(word, 0xffff_0000u32);
            [k.bitcast::<F32>(lo), k.bitcast::<F32>(hi)]
        }
        _ => {
            let pair = k.bitcast::<F16x2>(word);
            let (lo, hi) = k.unpack(pair);
            [k.cvt::<F32>(lo), k.cvt::<F32>(hi)]
        }
    }
}

/// Narrows two f32 values to one 32-bit word of two halves (round to nearest even).
pub fn narrow_pair(k: &mut KernelBuilder, dtype: DType, lo: Reg<F32>, hi: Reg<F32>) -> Reg<B32> {
    match dtype {
        DType::BF16 => {
            let packed: Reg<BF16x2> = k.cvt_pack_bf16x2(lo, hi);
            k.bitcast::<B32>(packed)
        }
        _ => {
            let packed: Reg<F16x2> = k.cvt_pack_f16x2(lo, hi);
            k.bitcast::<B32>(packed)
        }
    }
}

/// Loads eight halves at `address` (16-byte aligned) as f32 values.
pub fn load_chunk(
    k: &mut KernelBuilder,
    load: Load,
    dtype: DType,
    address: impl Into<Mem>,
) -> [Reg<F32>; 8] {
    let words = k.ld_vector::<U32, 4>(load, address);
    let mut out = Vec::with_capacity(HALVES_PER_CHUNK);
    for word in words {
        out.extend(widen_pair(k, dtype, word));
    }
    out.try_into().expect("four words hold eight halves")
}

/// Stores eight f32 values at `address` (16-byte aligned) as halves.
pub fn store_chunk(
    k: &mut KernelBuilder,
    store: Store,
    dtype: DType,
    address: impl Into<Mem>,
    values: &[Reg<F32>; 8],
) {
    let words: Vec<Reg<B32>> = values
        .chunks(2)
        .map(|pair| narrow_pair(k, dtype, pair[0], pair[1]))
        .collect();
    let words: [Reg<B32>; 4] = words.try_into().expect("eight halves make four words");
    k.st_vector(store, address, words);
}

/// Loads one half at `address` as an f32 value.
pub fn load_scalar(k: &mut KernelBuilder, dtype: DType, address: impl Into<Mem>) -> Reg<F32> {
    match dtype {
        DType::BF16 => {
            let bits = k.ld_narrow::<U32>(Load::GLOBAL, kiln_codegen::ptx::Narrow::U16, address);
            let shifted = k.shl(bits, 16u32);
            k.bitcast::<F32>(shifted)
        }
        _ => {
            let half = k.ld_global::<kiln_codegen::ptx::F16>(address);
            k.cvt::<F32>(half)
        }
    }
}

/// Stores one f32 value at `address` as a half (round to nearest even).
pub fn store_scalar(k: &mut KernelBuilder, dtype: DType, address: impl Into<Mem>, value: Reg<F32>) {
    let word = narrow_pair(k, dtype, value, value);
    let bits = k.bitcast::<U32>(word);
    k.st_narrow(Store::GLOBAL, kiln_codegen::ptx::Narrow::U16, address, bits);
}

/// `value` rounded to the dtype (nearest even) and widened back to f32, as the reference
/// rounds the gate and up products before the activation.
pub fn round_to_dtype(k: &mut KernelBuilder, dtype: DType, value: Reg<F32>) -> Reg<F32> {
    round_pair_to_dtype(k, dtype, value, value)[0]
}

/// Two values rounded to the dtype (nearest even) and widened back to f32: one narrowing
/// and one widening for the pair.
pub fn round_pair_to_dtype(
    k: &mut KernelBuilder,
    dtype: DType,
    lo: Reg<F32>,
    hi: Reg<F32>,
) -> [Reg<F32>; 2] {
    let word = narrow_pair(k, dtype, lo, hi);
    let word = k.bitcast::<U32>(word);
    widen_pair(k, dtype, word)
}
