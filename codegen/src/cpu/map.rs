//! The elementwise map kernel: `out[i] = expr(in_0[i], …)` for `i` in `[start, end)` (ABI in
//! [`MapSpec`]). Owns the loop structure of maps — a main loop of `unroll` independent
//! 128-bit vectors per iteration, a one-vector loop, then a scalar tail — and nothing about
//! what the expression means ([`lower_expr`](super::lower_expr)) or how formats unpack
//! ([`load`](super::load)).

use super::load::{element_address, load, store};
use super::loops::strided_loop;
use super::lower_expr::lower_expr;
use super::simd::Lanes;
use super::{abi_signature, CpuTarget, MapSpec};
use crate::expr::Expr;
use cranelift_codegen::ir::{Function, InstBuilder, MemFlagsData, Signature, Value};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};

/// The map kernel's C ABI signature.
pub fn signature(target: &CpuTarget) -> Signature {
    abi_signature(MapSpec::abi(), target)
}

/// Which inputs `expr` reads.
fn used_inputs(expr: &Expr, used: &mut [bool]) {
    match expr {
        Expr::Input(n) => used[*n] = true,
        Expr::Const(_) => {}
        Expr::Unary(_, a) => used_inputs(a, used),
        Expr::Binary(_, a, c) => {
            used_inputs(a, used);
            used_inputs(c, used);
        }
    }
}

/// Fills `function` (whose signature is [`signature`]) with the map `spec` describes.
pub fn build(spec: &MapSpec, target: &CpuTarget, function: &mut Function) {
    let mut context = FunctionBuilderContext::new();
    let mut b = FunctionBuilder::new(function, &mut context);
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    b.seal_block(entry);
    let &[inputs, out, start, end] = b.block_params(entry) else {
        unreachable!("the map ABI has four parameters")
    };

    let pointer = target.pointer_type();
    let pointer_bytes = pointer.bytes() as i32;
    let mut used = vec![false; spec.inputs.len()];
    used_inputs(&spec.expr, &mut used);
    let input_pointers: Vec<Option<Value>> = used
        .iter()
        .enumerate()
        .map(|(j, &used)| {
            used.then(|| {
                let flags = MemFlagsData::new().with_notrap().with_readonly();
                b.ins()
                    .load(pointer, flags, inputs, j as i32 * pointer_bytes)
            })
        })
        .collect();

    let index = b.declare_var(pointer);
    b.def_var(index, start);
    let vector = Lanes::vector(spec.compute);
    let width = vector.count();

    // One group of `lanes.count()` elements at element `i + offset`.
    let group = |b: &mut FunctionBuilder, lanes: Lanes, i: Value, offset: i64| {
        let values: Vec<Value> = input_pointers
            .iter()
            .zip(&spec.inputs)
            .map(|(pointer, &format)| match pointer {
                Some(p) => {
                    let address = element_address(b, format, *p, i);
                    load(b, format, lanes, address, offset)
                }
                // Never read by the expression: any value will do.
                None => i,
            })
            .collect();
        let result = lower_expr(b, target, lanes, &spec.expr, &values);
        let address = element_address(b, lanes.elem.format(), out, i);
        store(b, lanes, address, offset, result);
    };

    strided_loop(&mut b, index, end, width * spec.unroll, |b, i| {
        for u in 0..spec.unroll {
            group(b, vector, i, i64::from(u * width));
        }
    });
    if spec.unroll > 1 {
        strided_loop(&mut b, index, end, width, |b, i| group(b, vector, i, 0));
    }
    strided_loop(&mut b, index, end, 1, |b, i| {
        group(b, Lanes::scalar(spec.compute), i, 0)
    });
    b.ins().return_(&[]);
    b.finalize(target.frontend);
}
