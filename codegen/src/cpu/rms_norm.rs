//! The row RMSNorm kernel, with the residual add optionally fused (ABI and numerics in
//! [`RmsNormSpec`]): for each row of the range, one pass forms the sum of squares — and, with
//! `residual`, `s = x + residual`, written to `residual_out` on the way — on `unroll`
//! independent f32x4 accumulators, then a one-vector loop and a scalar tail; then the inverse
//! root; then a second pass writes `(x · inverse) · weight` (reading `s` back from
//! `residual_out` when fused), vectorised the same way.
//!
//! Owns the loop structure and the arithmetic order of the norm. It must not choose which rows
//! run where (the runtime splits rows into tasks) and must not know storage formats beyond the
//! f32 it reads through [`load`](super::load).

use super::load::{element_address, load, store};
use super::loops::strided_loop;
use super::simd::{fconst, hsum, mul_add, sum_tree, Lanes};
use super::{abi_signature, CpuTarget, ElemType, ElementFormat, RmsNormSpec};
use cranelift_codegen::ir::{types, Function, InstBuilder, Signature, Value};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};

/// The RMSNorm kernel's C ABI signature.
pub fn signature(target: &CpuTarget) -> Signature {
    abi_signature(RmsNormSpec::abi(), target)
}

const F32: ElementFormat = ElementFormat::F32;

/// Fills `function` (whose signature is [`signature`]) with the RMSNorm `spec` describes.
pub fn build(spec: &RmsNormSpec, target: &CpuTarget, function: &mut Function) {
    let mut context = FunctionBuilderContext::new();
    let mut fb = FunctionBuilder::new(function, &mut context);
    let entry = fb.create_block();
    fb.append_block_params_for_function_params(entry);
    fb.switch_to_block(entry);
    fb.seal_block(entry);
    let &[x, residual, weight, out, residual_out, hidden, row_start, row_end, eps] =
        fb.block_params(entry)
    else {
        unreachable!("the rms_norm ABI has nine parameters")
    };

    let vector = Lanes::vector(ElemType::F32);
    let scalar = Lanes::scalar(ElemType::F32);
    let width = vector.count();
    let unroll = spec.unroll;
    let pointer = target.pointer_type();
    let eps = fb.ins().fdemote(types::F32, eps);
    let hidden_f32 = fb.ins().fcvt_from_uint(types::F32, hidden);
    let one = fconst(&mut fb, scalar, 1.0);
    let zero_index = fb.ins().iconst(pointer, 0);

    let row = fb.declare_var(pointer);
    let index = fb.declare_var(pointer);
    fb.def_var(row, row_start);
    // accumulators[u] for the vector loops; `sum` for the horizontal sum and scalar tail
    let accumulators: Vec<Variable> = (0..unroll).map(|_| fb.declare_var(vector.ty())).collect();
    let sum = fb.declare_var(scalar.ty());

    strided_loop(&mut fb, row, row_end, 1, |fb, r| {
        let offset = fb.ins().imul(r, hidden);
        let x_row = element_address(fb, F32, x, offset);
        let out_row = element_address(fb, F32, out, offset);
        // (residual row, residual_out row) when fused
        let fused = spec.residual.then(|| {
            (
                element_address(fb, F32, residual, offset),
                element_address(fb, F32, residual_out, offset),
            )
        });

        // Pass 1: accumulate squares of x (or of s = x + residual, storing s).
        let square = |fb: &mut FunctionBuilder, lanes: Lanes, i: Value, at: i64, acc: Variable| {
            let address = element_address(fb, F32, x_row, i);
            let mut v = load(fb, F32, lanes, address, at);
            if let Some((residual_row, sum_row)) = fused {
                let address = element_address(fb, F32, residual_row, i);
                let r = load(fb, F32, lanes, address, at);
                v = fb.ins().fadd(v, r);
                let address = element_address(fb, F32, sum_row, i);
                store(fb, lanes, address, at, v);
            }
            let old = fb.use_var(acc);
            let new = mul_add(fb, target, v, v, old);
            fb.def_var(acc, new);
        };
        for &acc in &accumulators {
            let zero = fconst(fb, vector, 0.0);
            fb.def_var(acc, zero);
        }
        fb.def_var(index, zero_index);
        strided_loop(fb, index, hidden, width * unroll, |fb, i| {
            for (u, &acc) in accumulators.iter().enumerate() {
                square(fb, vector, i, (u as u32 * width).into(), acc);
            }
        });
        if unroll > 1 {
            strided_loop(fb, index, hidden, width, |fb, i| {
                square(fb, vector, i, 0, accumulators[0])
            });
        }
        let parts = accumulators.iter().map(|&acc| fb.use_var(acc)).collect();
        let total = sum_tree(fb, parts);
        let total = hsum(fb, vector, total);
        fb.def_var(sum, total);
        strided_loop(fb, index, hidden, 1, |fb, i| square(fb, scalar, i, 0, sum));

        // inverse = 1 / √(Σ / hidden + eps)
        let total = fb.use_var(sum);
        let mean = fb.ins().fdiv(total, hidden_f32);
        let shifted = fb.ins().fadd(mean, eps);
        let root = fb.ins().sqrt(shifted);
        let inverse = fb.ins().fdiv(one, root);
        let inverse_vector = fb.ins().splat(vector.ty(), inverse);

        // Pass 2: out = (v · inverse) · weight, v = x or the stored s.
        let source = fused.map_or(x_row, |(_, sum_row)| sum_row);
        let normalise = |fb: &mut FunctionBuilder, lanes: Lanes, i: Value, at: i64| {
            let address = element_address(fb, F32, source, i);
            let v = load(fb, F32, lanes, address, at);
            let address = element_address(fb, F32, weight, i);
            let w = load(fb, F32, lanes, address, at);
            let inverse = if lanes.vector {
                inverse_vector
            } else {
                inverse
            };
            let scaled = fb.ins().fmul(v, inverse);
            let result = fb.ins().fmul(scaled, w);
            let address = element_address(fb, F32, out_row, i);
            store(fb, lanes, address, at, result);
        };
        fb.def_var(index, zero_index);
        strided_loop(fb, index, hidden, width * unroll, |fb, i| {
            for u in 0..unroll {
                normalise(fb, vector, i, (u * width).into());
            }
        });
        if unroll > 1 {
            strided_loop(fb, index, hidden, width, |fb, i| {
                normalise(fb, vector, i, 0)
            });
        }
        strided_loop(fb, index, hidden, 1, |fb, i| normalise(fb, scalar, i, 0));
    });
    fb.ins().return_(&[]);
    fb.finalize(target.frontend);
}
