//! The rotary position embedding kernel (ABI and numerics in [`RopeSpec`]): for each token of
//! the range and each head, the "rotate half" pairs `(i, i + head_dim/2)` are rotated by the
//! token's angles, read from caller-filled cos/sin tables — a main loop of `unroll` vectors of
//! pairs per iteration, a one-vector loop, then a scalar tail over the last pairs of the half.
//! With f64 rotation, f32 elements are widened to f64 lanes (two per vector) and narrowed on
//! store; with f32 rotation they are used as they are (four per vector).
//!
//! Owns the loop structure and the rotation arithmetic, which uses separate multiplies and a
//! subtract/add — never a fused multiply-add — so that the f64 path rounds exactly like the
//! interpreter. It must not compute angles, sines or cosines (Cranelift has none; the runtime
//! fills the tables) and must not choose which tokens run where.

use super::load::{element_address, load, load_f32_widened, store, store_f64_narrowed};
use super::loops::strided_loop;
use super::simd::Lanes;
use super::{abi_signature, CpuTarget, ElemType, ElementFormat, RopeSpec};
use cranelift_codegen::ir::{Function, InstBuilder, Signature, Value};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};

/// The RoPE kernel's C ABI signature.
pub fn signature(target: &CpuTarget) -> Signature {
    abi_signature(RopeSpec::abi(), target)
}

const F32: ElementFormat = ElementFormat::F32;

/// Loads `lanes.count()` f32 elements of x as `lanes` (widened for f64 rotation).
fn load_x(fb: &mut FunctionBuilder, lanes: Lanes, address: Value, at: i64) -> Value {
    match lanes.elem {
        ElemType::F32 => load(fb, F32, lanes, address, at),
        ElemType::F64 => load_f32_widened(fb, lanes, address, at),
    }
}

/// Stores `value` of `lanes` as f32 elements (narrowed for f64 rotation).
fn store_x(fb: &mut FunctionBuilder, lanes: Lanes, address: Value, at: i64, value: Value) {
    match lanes.elem {
        ElemType::F32 => store(fb, lanes, address, at, value),
        ElemType::F64 => store_f64_narrowed(fb, lanes, address, at, value),
    }
}

/// Fills `function` (whose signature is [`signature`]) with the RoPE `spec` describes.
pub fn build(spec: &RopeSpec, target: &CpuTarget, function: &mut Function) {
    let mut context = FunctionBuilderContext::new();
    let mut fb = FunctionBuilder::new(function, &mut context);
    let entry = fb.create_block();
    fb.append_block_params_for_function_params(entry);
    fb.switch_to_block(entry);
    fb.seal_block(entry);
    let &[x, out, cos, sin, heads, head_dim, token_start, token_end] = fb.block_params(entry)
    else {
        unreachable!("the rope ABI has eight parameters")
    };

    let table = spec.rotation.format();
    let vector = Lanes::vector(spec.rotation);
    let scalar = Lanes::scalar(spec.rotation);
    let width = vector.count();
    let unroll = spec.unroll;
    let pointer = target.pointer_type();
    let half = fb.ins().ushr_imm_u(head_dim, 1);
    let token_elements = fb.ins().imul(heads, head_dim);
    let zero_index = fb.ins().iconst(pointer, 0);

    let token = fb.declare_var(pointer);
    let head = fb.declare_var(pointer);
    let index = fb.declare_var(pointer);
    fb.def_var(token, token_start);
    strided_loop(&mut fb, token, token_end, 1, |fb, t| {
        let table_row = fb.ins().isub(t, token_start);
        let table_offset = fb.ins().imul(table_row, half);
        let cos_row = element_address(fb, table, cos, table_offset);
        let sin_row = element_address(fb, table, sin, table_offset);
        let token_offset = fb.ins().imul(t, token_elements);
        let x_token = element_address(fb, F32, x, token_offset);
        let out_token = element_address(fb, F32, out, token_offset);

        fb.def_var(head, zero_index);
        strided_loop(fb, head, heads, 1, |fb, h| {
            let head_offset = fb.ins().imul(h, head_dim);
            let x_first = element_address(fb, F32, x_token, head_offset);
            let x_second = element_address(fb, F32, x_first, half);
            let out_first = element_address(fb, F32, out_token, head_offset);
            let out_second = element_address(fb, F32, out_first, half);

            // Pairs i .. i + lanes.count() of the head, `at` elements ahead.
            let rotate = |fb: &mut FunctionBuilder, lanes: Lanes, i: Value, at: i64| {
                let address = element_address(fb, F32, x_first, i);
                let x1 = load_x(fb, lanes, address, at);
                let address = element_address(fb, F32, x_second, i);
                let x2 = load_x(fb, lanes, address, at);
                let address = element_address(fb, table, cos_row, i);
                let c = load(fb, table, lanes, address, at);
                let address = element_address(fb, table, sin_row, i);
                let s = load(fb, table, lanes, address, at);
                // x1·cos − x2·sin and x2·cos + x1·sin, each product rounded (as the interpreter)
                let x1c = fb.ins().fmul(x1, c);
                let x2s = fb.ins().fmul(x2, s);
                let first = fb.ins().fsub(x1c, x2s);
                let x2c = fb.ins().fmul(x2, c);
                let x1s = fb.ins().fmul(x1, s);
                let second = fb.ins().fadd(x2c, x1s);
                let address = element_address(fb, F32, out_first, i);
                store_x(fb, lanes, address, at, first);
                let address = element_address(fb, F32, out_second, i);
                store_x(fb, lanes, address, at, second);
            };
            fb.def_var(index, zero_index);
            strided_loop(fb, index, half, width * unroll, |fb, i| {
                for u in 0..unroll {
                    rotate(fb, vector, i, (u * width).into());
                }
            });
            if unroll > 1 {
                strided_loop(fb, index, half, width, |fb, i| rotate(fb, vector, i, 0));
            }
            strided_loop(fb, index, half, 1, |fb, i| rotate(fb, scalar, i, 0));
        });
    });
    fb.ins().return_(&[]);
    fb.finalize(target.frontend);
}
