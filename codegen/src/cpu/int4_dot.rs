//! The 4-bit grouped dot kernel ([`Int4DotSpec`]): register tiles of up to four rows of A by
//! one column, each 8-byte block of B unpacked once to four f32x4 vectors of exact integers
//! and multiplied into every row's group accumulator. Owns this loop nest and the nibble
//! unpacking; threading and the deinterleaving of A are the runtime wrapper's.

use super::int4_dot_spec::{Int4DotSpec, INT4_BLOCK};
use super::loops::strided_loop;
use super::simd::{fconst, hsum, mul_add, Lanes};
use super::{abi_signature, CpuTarget, ElemType};
use cranelift_codegen::ir::{types, Function, InstBuilder, MemFlagsData, Signature, Value};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};

/// The kernel's C ABI signature.
pub fn signature(target: &CpuTarget) -> Signature {
    abi_signature(Int4DotSpec::abi(), target)
}

fn flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// The kernel's arguments.
struct Args {
    a: Value,
    b: Value,
    scales: Value,
    c: Value,
    lda: Value,
    ldb: Value,
    lds: Value,
    ldc: Value,
    k: Value,
}

/// Emits the tile of `rows` rows of C from row `i`, column `j`.
fn tile(
    fb: &mut FunctionBuilder,
    spec: &Int4DotSpec,
    target: &CpuTarget,
    args: &Args,
    rows: u32,
    i: Value,
    j: Value,
) {
    let pointer = target.pointer_type();
    let vector = Lanes::vector(ElemType::F32);
    let var = |fb: &mut FunctionBuilder, ty, value| {
        let v = fb.declare_var(ty);
        fb.def_var(v, value);
        v
    };
    // Loop-carried pointers: the rows of A (f32), the column's bytes of B and its scales.
    let a_rows: Vec<Variable> = (0..rows)
        .map(|r| {
            let row = fb.ins().iadd_imm_s(i, i64::from(r));
            let offset = fb.ins().imul(row, args.lda);
            let bytes = fb.ins().ishl_imm_u(offset, 2);
            let p = fb.ins().iadd(args.a, bytes);
            var(fb, pointer, p)
        })
        .collect();
    let b_offset = fb.ins().imul(j, args.ldb);
    let b_start = fb.ins().iadd(args.b, b_offset);
    let b_ptr = var(fb, pointer, b_start);
    let s_offset = fb.ins().imul(j, args.lds);
    let s_bytes = fb.ins().ishl_imm_u(s_offset, 2);
    let s_start = fb.ins().iadd(args.scales, s_bytes);
    let s_ptr = var(fb, pointer, s_start);
    let zero = fconst(fb, vector, 0.0);
    let totals: Vec<Variable> = (0..rows).map(|_| var(fb, vector.ty(), zero)).collect();
    let groups: Vec<Variable> = (0..rows).map(|_| var(fb, vector.ty(), zero)).collect();

    let kk = fb.declare_var(pointer);
    let start = fb.ins().iconst(pointer, 0);
    fb.def_var(kk, start);
    let inner = fb.declare_var(pointer);
    let group_end = fb.ins().iconst(pointer, spec.group_size as i64);
    let fifteen = fb.ins().iconst(types::I16, 15);
    let low_mask = fb.ins().splat(types::I16X8, fifteen);
    let eight = fb.ins().iconst(types::I32, 8);
    let offset8 = fb.ins().splat(types::I32X4, eight);

    strided_loop(fb, kk, args.k, spec.group_size as u32, |fb, _| {
        for &g in &groups {
            let zero = fconst(fb, vector, 0.0);
            fb.def_var(g, zero);
        }
        let begin = fb.ins().iconst(pointer, 0);
        fb.def_var(inner, begin);
        strided_loop(fb, inner, group_end, INT4_BLOCK as u32, |fb, _| {
            // 8 bytes → i16x8 → low nibbles (values 0, 2, …, 14) and high (1, 3, …, 15).
            let p = fb.use_var(b_ptr);
            let bytes = fb.ins().uload8x8(flags(), p, 0);
            let low = fb.ins().band(bytes, low_mask);
            let high = fb.ins().ushr_imm_u(bytes, 4);
            let unpack = |fb: &mut FunctionBuilder, half: Value| -> [Value; 2] {
                [fb.ins().uwiden_low(half), fb.ins().uwiden_high(half)].map(|wide| {
                    let centred = fb.ins().isub(wide, offset8);
                    fb.ins().fcvt_from_sint(types::F32X4, centred)
                })
            };
            let [even_0, even_1] = unpack(fb, low);
            let [odd_0, odd_1] = unpack(fb, high);
            for (r, &g) in groups.iter().enumerate() {
                let a = fb.use_var(a_rows[r]);
                let mut acc = fb.use_var(g);
                for (l, w) in [even_0, even_1, odd_0, odd_1].into_iter().enumerate() {
                    let x = fb.ins().load(types::F32X4, flags(), a, (16 * l) as i32);
                    acc = mul_add(fb, target, x, w, acc);
                }
                fb.def_var(g, acc);
                let next = fb.ins().iadd_imm_s(a, (4 * INT4_BLOCK) as i64);
                fb.def_var(a_rows[r], next);
            }
            let next = fb.ins().iadd_imm_s(p, (INT4_BLOCK / 2) as i64);
            fb.def_var(b_ptr, next);
        });
        let s = fb.use_var(s_ptr);
        let scale = fb.ins().load(types::F32, flags(), s, 0);
        let scale = fb.ins().splat(types::F32X4, scale);
        for (&g, &t) in groups.iter().zip(&totals) {
            let group = fb.use_var(g);
            let total = fb.use_var(t);
            let total = mul_add(fb, target, group, scale, total);
            fb.def_var(t, total);
        }
        let next = fb.ins().iadd_imm_s(s, 4);
        fb.def_var(s_ptr, next);
    });

    for (r, &t) in totals.iter().enumerate() {
        let total = fb.use_var(t);
        let sum = hsum(fb, vector, total);
        let row = fb.ins().iadd_imm_s(i, r as i64);
        let offset = fb.ins().imul(row, args.ldc);
        let element = fb.ins().iadd(offset, j);
        let bytes = fb.ins().ishl_imm_u(element, 2);
        let address = fb.ins().iadd(args.c, bytes);
        fb.ins().store(flags(), sum, address, 0);
    }
}

/// Fills `function` (whose signature is [`signature`]) with the kernel `spec` describes.
pub fn build(spec: &Int4DotSpec, target: &CpuTarget, function: &mut Function) {
    let mut context = FunctionBuilderContext::new();
    let mut fb = FunctionBuilder::new(function, &mut context);
    let entry = fb.create_block();
    fb.append_block_params_for_function_params(entry);
    fb.switch_to_block(entry);
    fb.seal_block(entry);
    let &[a, b, scales, c, lda, ldb, lds, ldc, k, row_start, row_end, col_start, col_end] =
        fb.block_params(entry)
    else {
        unreachable!("the int4 dot ABI has thirteen parameters")
    };
    let args = Args {
        a,
        b,
        scales,
        c,
        lda,
        ldb,
        lds,
        ldc,
        k,
    };
    let pointer = target.pointer_type();
    let row = fb.declare_var(pointer);
    let col = fb.declare_var(pointer);
    fb.def_var(row, row_start);
    let mut row_tiles = vec![spec.tile_rows];
    if spec.tile_rows > 1 {
        row_tiles.push(1);
    }
    for &rows in &row_tiles {
        strided_loop(&mut fb, row, row_end, rows, |fb, i| {
            fb.def_var(col, col_start);
            strided_loop(fb, col, col_end, 1, |fb, j| {
                tile(fb, spec, target, &args, rows, i, j)
            });
        });
    }
    fb.ins().return_(&[]);
    fb.finalize(target.frontend);
}
