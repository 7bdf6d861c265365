//! The dot-product kernel family: `C[i, j] = alpha · Σ_k A[i, k] · B[j, k] (+ beta · C[i, j])`
//! over a row and column range of C, both operands K-contiguous (ABI in [`DotSpec`]).
//!
//! Owns the loop nest and register blocking of dense products: rows of C in steps of
//! `tile_rows`, columns in steps of `tile_cols` (then 1-wide edge tiles), and for each tile a
//! k loop that loads one vector from each of its A rows and B rows and feeds one accumulator
//! per element of the tile — each load is reused `tile_cols` or `tile_rows` times. Small tiles
//! get several accumulators per element over k instead, so every tile has about eight
//! independent multiply-add chains; each iteration makes at least two vector k steps. Then a
//! one-vector k loop, horizontal sums, a scalar k tail, and the alpha/beta epilogue. Cache blocking (which columns to run while a block of B is hot) and
//! threading are the caller's: it chooses the ranges. Formats unpack in [`load`](super::load).

use super::load::{element_address, load, store};
use super::loops::strided_loop;
use super::simd::{fconst, hsum, mul_add, sum_tree, Lanes};
use super::{abi_signature, CpuTarget, DotSpec, ElemType, ElementFormat};
use cranelift_codegen::ir::{types, Function, InstBuilder, Signature, Value};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};

/// The dot kernel's C ABI signature.
pub fn signature(target: &CpuTarget) -> Signature {
    abi_signature(DotSpec::abi(), target)
}

/// The kernel's arguments and the state shared by all tiles.
struct Dot<'s> {
    spec: &'s DotSpec,
    target: &'s CpuTarget,
    a: Value,
    b: Value,
    c: Value,
    lda: Value,
    ldb: Value,
    ldc: Value,
    k: Value,
    /// `alpha` and `beta` in the compute type.
    alpha: Value,
    beta: Value,
    /// The k index of the tile being emitted.
    kk: Variable,
}

/// Accumulator sets: vector accumulators per tile element, so that a tile has about eight
/// independent multiply-add chains.
fn accumulator_sets(rows: u32, cols: u32) -> u32 {
    (8 / (rows * cols)).clamp(1, 4)
}

/// Vector k steps per main-loop iteration (at least two, to amortise the loop overhead and the
/// register moves Cranelift's allocator places on the back edge), round-robin over the sets.
fn k_steps(sets: u32) -> u32 {
    sets.max(2)
}

/// Pointers to rows `first`, `first + 1`, … (`count` of them) of an array at `base` with row
/// stride `ld` elements (one multiply, then a stride add per row).
fn row_pointers(
    fb: &mut FunctionBuilder,
    format: ElementFormat,
    base: Value,
    ld: Value,
    first: Value,
    count: u32,
) -> Vec<Value> {
    let offset = fb.ins().imul(first, ld);
    let mut row = element_address(fb, format, base, offset);
    let stride = fb
        .ins()
        .ishl_imm_u(ld, i64::from(format.size().trailing_zeros()));
    let mut rows = vec![row];
    for _ in 1..count {
        row = fb.ins().iadd(row, stride);
        rows.push(row);
    }
    rows
}

impl Dot<'_> {
    /// Emits the tile of `rows × cols` elements of C at row `i`, column `j`.
    fn tile(&self, fb: &mut FunctionBuilder, rows: u32, cols: u32, i: Value, j: Value) {
        let spec = self.spec;
        let vector = Lanes::vector(spec.compute);
        let scalar = Lanes::scalar(spec.compute);
        let width = vector.count();
        let sets = accumulator_sets(rows, cols);
        let steps = k_steps(sets);
        let pointer = self.target.pointer_type();

        // The current k position in each A and B row, as loop-carried pointers bumped by
        // every k loop: Cranelift sinks loop-invariant pure values *into* loops (it does
        // not hoist them), so `row + k·size` would recompute the row address every step.
        let pointers = |fb: &mut FunctionBuilder, rows: Vec<Value>| -> Vec<Variable> {
            rows.into_iter()
                .map(|p| {
                    let v = fb.declare_var(pointer);
                    fb.def_var(v, p);
                    v
                })
                .collect()
        };
        let a_rows = row_pointers(fb, spec.a, self.a, self.lda, i, rows);
        let b_rows = row_pointers(fb, spec.b, self.b, self.ldb, j, cols);
        let a_ptrs = pointers(fb, a_rows);
        let b_ptrs = pointers(fb, b_rows);
        let bump = |fb: &mut FunctionBuilder, elements: u32| {
            for (&v, format) in a_ptrs
                .iter()
                .map(|v| (v, spec.a))
                .chain(b_ptrs.iter().map(|v| (v, spec.b)))
            {
                let p = fb.use_var(v);
                let next = fb.ins().iadd_imm_s(p, i64::from(elements * format.size()));
                fb.def_var(v, next);
            }
        };
        let load_all = |fb: &mut FunctionBuilder, lanes: Lanes, offset: i64| {
            let av: Vec<Value> = a_ptrs
                .iter()
                .map(|&v| {
                    let p = fb.use_var(v);
                    load(fb, spec.a, lanes, p, offset)
                })
                .collect();
            let bv: Vec<Value> = b_ptrs
                .iter()
                .map(|&v| {
                    let p = fb.use_var(v);
                    load(fb, spec.b, lanes, p, offset)
                })
                .collect();
            (av, bv)
        };

        // accumulators[(r · cols + c) · sets + u]
        let accumulators: Vec<Variable> = (0..rows * cols * sets)
            .map(|_| {
                let v = fb.declare_var(vector.ty());
                let zero = fconst(fb, vector, 0.0);
                fb.def_var(v, zero);
                v
            })
            .collect();
        let zero_index = fb.ins().iconst(pointer, 0);
        fb.def_var(self.kk, zero_index);

        // One k step of `width` elements into accumulator set `u`, `offset` elements ahead.
        let step = |fb: &mut FunctionBuilder, u: u32, offset: i64| {
            let (av, bv) = load_all(fb, vector, offset);
            for r in 0..rows {
                for c in 0..cols {
                    let acc = accumulators[((r * cols + c) * sets + u) as usize];
                    let old = fb.use_var(acc);
                    let new = mul_add(fb, self.target, av[r as usize], bv[c as usize], old);
                    fb.def_var(acc, new);
                }
            }
        };
        strided_loop(fb, self.kk, self.k, width * steps, |fb, _| {
            for u in 0..steps {
                step(fb, u % sets, i64::from(u * width));
            }
            bump(fb, width * steps);
        });
        strided_loop(fb, self.kk, self.k, width, |fb, _| {
            step(fb, 0, 0);
            bump(fb, width);
        });

        // Horizontal sums, then the scalar tail over the last k % width elements.
        let sums: Vec<Variable> = (0..rows * cols)
            .map(|e| {
                let parts = (0..sets)
                    .map(|u| fb.use_var(accumulators[(e * sets + u) as usize]))
                    .collect();
                let v = sum_tree(fb, parts);
                let s = hsum(fb, vector, v);
                let var = fb.declare_var(scalar.ty());
                fb.def_var(var, s);
                var
            })
            .collect();
        strided_loop(fb, self.kk, self.k, 1, |fb, _| {
            let (av, bv) = load_all(fb, scalar, 0);
            for r in 0..rows {
                for c in 0..cols {
                    let sum = sums[(r * cols + c) as usize];
                    let old = fb.use_var(sum);
                    let new = mul_add(fb, self.target, av[r as usize], bv[c as usize], old);
                    fb.def_var(sum, new);
                }
            }
            bump(fb, 1);
        });

        // Epilogue: C[i + r, j + c] = alpha · sum (+ beta · C[i + r, j + c]).
        let c_format = spec.compute.format();
        let c_rows = row_pointers(fb, c_format, self.c, self.ldc, i, rows);
        for (r, &c_row) in (0..rows).zip(&c_rows) {
            let c_first = element_address(fb, c_format, c_row, j);
            for c in 0..cols {
                let mut value = fb.use_var(sums[(r * cols + c) as usize]);
                if spec.scale {
                    value = fb.ins().fmul(value, self.alpha);
                }
                if spec.accumulate {
                    let old = load(fb, c_format, scalar, c_first, i64::from(c));
                    value = mul_add(fb, self.target, self.beta, old, value);
                }
                store(fb, scalar, c_first, i64::from(c), value);
            }
        }
    }
}

/// Fills `function` (whose signature is [`signature`]) with the dot kernel `spec` describes.
pub fn build(spec: &DotSpec, target: &CpuTarget, function: &mut Function) {
    let mut context = FunctionBuilderContext::new();
    let mut fb = FunctionBuilder::new(function, &mut context);
    let entry = fb.create_block();
    fb.append_block_params_for_function_params(entry);
    fb.switch_to_block(entry);
    fb.seal_block(entry);
    let &[a, b, c, lda, ldb, ldc, k, row_start, row_end, col_start, col_end, alpha, beta] =
        fb.block_params(entry)
    else {
        unreachable!("the dot ABI has thirteen parameters")
    };
    let (alpha, beta) = match spec.compute {
        ElemType::F64 => (alpha, beta),
        ElemType::F32 => (
            fb.ins().fdemote(types::F32, alpha),
            fb.ins().fdemote(types::F32, beta),
        ),
    };
    let pointer = target.pointer_type();
    let kk = fb.declare_var(pointer);
    let dot = Dot {
        spec,
        target,
        a,
        b,
        c,
        lda,
        ldb,
        ldc,
        k,
        alpha,
        beta,
        kk,
    };

    let row = fb.declare_var(pointer);
    let col = fb.declare_var(pointer);
    fb.def_var(row, row_start);
    let mut row_tiles = vec![spec.tile_rows];
    if spec.tile_rows > 1 {
        row_tiles.push(1);
    }
    let mut col_tiles = vec![spec.tile_cols];
    if spec.tile_cols > 1 {
        col_tiles.push(1);
    }
    for &rows in &row_tiles {
        strided_loop(&mut fb, row, row_end, rows, |fb, i| {
            fb.def_var(col, col_start);
            for &cols in &col_tiles {
                strided_loop(fb, col, col_end, cols, |fb, j| {
                    dot.tile(fb, rows, cols, i, j)
                });
            }
        });
    }
    fb.ins().return_(&[]);
    fb.finalize(target.frontend);
}
