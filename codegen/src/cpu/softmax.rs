//! The row softmax kernel: in place over a range of rows, each scaled, with a per-row count of
//! taking-part leading elements and zeros after them (ABI and numerics in [`SoftmaxSpec`]).
//! Owns the three-pass loop structure (max, exp and sum, divide) and the masked tail; the
//! exponential is [`exp`](super::exp), formats are [`load`](super::load).

use super::exp::exp;
use super::load::{element_address, load, store};
use super::loops::strided_loop;
use super::simd::{bitcast, fconst, hsum, Lanes};
use super::softmax_spec::SoftmaxSpec;
use super::{abi_signature, CpuTarget, ElemType};
use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{types, Function, InstBuilder, Signature, Value};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};

/// The softmax kernel's C ABI signature.
pub fn signature(target: &CpuTarget) -> Signature {
    abi_signature(SoftmaxSpec::abi(), target)
}

/// `m < x ? x : m` per lane: the larger value, keeping `m` when `x` is NaN (the
/// compare-and-select shape Cranelift lowers to one `maxps`/`maxpd` on vectors).
fn max_skipping_nan(b: &mut FunctionBuilder, lanes: Lanes, m: Value, x: Value) -> Value {
    let larger = b.ins().fcmp(FloatCC::LessThan, m, x);
    if lanes.vector {
        let mask = bitcast(b, lanes.ty(), larger);
        b.ins().bitselect(mask, x, m)
    } else {
        b.ins().select(larger, x, m)
    }
}

/// Fills `function` (whose signature is [`signature`]) with the softmax `spec` describes.
pub fn build(spec: &SoftmaxSpec, target: &CpuTarget, function: &mut Function) {
    let mut context = FunctionBuilderContext::new();
    let mut b = FunctionBuilder::new(function, &mut context);
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    b.seal_block(entry);
    let &[x, ld, n, row_start, row_end, valid, valid_step, scale] = b.block_params(entry) else {
        unreachable!("the softmax ABI has eight parameters")
    };

    let elem = spec.compute;
    let format = elem.format();
    let vector = Lanes::vector(elem);
    let scalar = Lanes::scalar(elem);
    let width = vector.count();
    let pointer = target.pointer_type();
    let scale = match elem {
        ElemType::F64 => scale,
        ElemType::F32 => b.ins().fdemote(types::F32, scale),
    };
    let scale_v = b.ins().splat(vector.ty(), scale);

    let row = b.declare_var(pointer);
    let j = b.declare_var(pointer);
    let vmax = b.declare_var(vector.ty());
    let smax = b.declare_var(scalar.ty());
    let vsum = b.declare_var(vector.ty());
    let ssum = b.declare_var(scalar.ty());
    b.def_var(row, row_start);

    strided_loop(&mut b, row, row_end, 1, |b, r| {
        let offset = b.ins().imul(r, ld);
        let base = element_address(b, format, x, offset);
        let extra = b.ins().imul(r, valid_step);
        let count = b.ins().iadd(valid, extra);
        let zero_index = b.ins().iconst(pointer, 0);
        let at = |b: &mut FunctionBuilder, i: Value| element_address(b, format, base, i);
        let scale_of = |lanes: Lanes| if lanes.vector { scale_v } else { scale };

        // Pass 1: m = max of scale·x over the valid elements.
        let minus_inf = fconst(b, vector, f64::NEG_INFINITY);
        b.def_var(vmax, minus_inf);
        b.def_var(j, zero_index);
        strided_loop(b, j, count, width, |b, i| {
            let address = at(b, i);
            let v = load(b, format, vector, address, 0);
            let v = b.ins().fmul(v, scale_v);
            let m = b.use_var(vmax);
            let m = max_skipping_nan(b, vector, m, v);
            b.def_var(vmax, m);
        });
        let m = b.use_var(vmax);
        let mut reduced = b.ins().extractlane(m, 0);
        for l in 1..width {
            let lane = b.ins().extractlane(m, l as u8);
            reduced = max_skipping_nan(b, scalar, reduced, lane);
        }
        b.def_var(smax, reduced);
        strided_loop(b, j, count, 1, |b, i| {
            let address = at(b, i);
            let v = load(b, format, scalar, address, 0);
            let v = b.ins().fmul(v, scale);
            let m = b.use_var(smax);
            let m = max_skipping_nan(b, scalar, m, v);
            b.def_var(smax, m);
        });
        let max_s = b.use_var(smax);
        let max_v = b.ins().splat(vector.ty(), max_s);

        // Pass 2: e = exp(scale·x − m), stored back and summed.
        let step = |b: &mut FunctionBuilder, lanes: Lanes, i: Value, max: Value| {
            let address = at(b, i);
            let v = load(b, format, lanes, address, 0);
            let v = b.ins().fmul(v, scale_of(lanes));
            let v = b.ins().fsub(v, max);
            let e = exp(b, target, lanes, v);
            store(b, lanes, address, 0, e);
            e
        };
        let zero_v = fconst(b, vector, 0.0);
        b.def_var(vsum, zero_v);
        b.def_var(j, zero_index);
        strided_loop(b, j, count, width, |b, i| {
            let e = step(b, vector, i, max_v);
            let s = b.use_var(vsum);
            let s = b.ins().fadd(s, e);
            b.def_var(vsum, s);
        });
        let s = b.use_var(vsum);
        let s = hsum(b, vector, s);
        b.def_var(ssum, s);
        strided_loop(b, j, count, 1, |b, i| {
            let e = step(b, scalar, i, max_s);
            let s = b.use_var(ssum);
            let s = b.ins().fadd(s, e);
            b.def_var(ssum, s);
        });
        let sum_s = b.use_var(ssum);
        let sum_v = b.ins().splat(vector.ty(), sum_s);

        // Pass 3: e / Σ over the valid elements, then zeros up to n.
        b.def_var(j, zero_index);
        for lanes in [vector, scalar] {
            let sum = if lanes.vector { sum_v } else { sum_s };
            strided_loop(b, j, count, lanes.count(), |b, i| {
                let address = at(b, i);
                let e = load(b, format, lanes, address, 0);
                let p = b.ins().fdiv(e, sum);
                store(b, lanes, address, 0, p);
            });
        }
        for lanes in [vector, scalar] {
            strided_loop(b, j, n, lanes.count(), |b, i| {
                let address = at(b, i);
                let zero = fconst(b, lanes, 0.0);
                store(b, lanes, address, 0, zero);
            });
        }
    });
    b.ins().return_(&[]);
    b.finalize(target.frontend);
}
