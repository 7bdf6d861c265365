//! Tensor-core instructions: `ldmatrix` (shared memory to per-thread fragments) and warp
//! `mma.sync` for f16/bf16 (f32 accumulators) and s8 (s32 accumulators).
//!
//! These are warp-collective: all 32 lanes execute them with the same shapes. Fragment
//! registers are 32-bit ([`Bits32`]): `ldmatrix` results, packed `f16x2`/`bf16x2` values or
//! four packed bytes. Tile layout and swizzling are the kernel generator's business, not
//! this file's.

use super::builder::KernelBuilder;
use super::types::{Bits32, Mem, Reg, RegType, B32, F32, S32};

fn list<T: RegType>(registers: &[Reg<T>]) -> String {
    let names: Vec<String> = registers.iter().map(|r| r.to_string()).collect();
    format!("{{{}}}", names.join(", "))
}

const fn check_matrix_count<const N: usize>() {
    assert!(
        N == 1 || N == 2 || N == 4,
        "ldmatrix loads 1, 2 or 4 matrices"
    );
}

impl KernelBuilder {
    fn ldmatrix_common<const N: usize>(&mut self, address: Mem, transpose: bool) -> [Reg<B32>; N] {
        const { check_matrix_count::<N>() };
        self.require_sm(75, "ldmatrix");
        let d = self.regs::<B32, N>();
        let trans = if transpose { ".trans" } else { "" };
        self.emit(format!(
            "ldmatrix.sync.aligned.m8n8.x{N}{trans}.shared.b16 {}, {address}",
            list(&d)
        ));
        d
    }

    /// `ldmatrix.sync.aligned.m8n8.x{N}.shared.b16`: loads `N` (1, 2 or 4) 8×8 matrices of
    /// 16-bit elements from shared memory. Lanes `8i..8i+8` give the row addresses of
    /// matrix `i` (16-byte aligned rows); each lane receives, per matrix, one register
    /// with two consecutive elements of row `lane / 4`, columns `2·(lane % 4) + {0, 1}`.
    pub fn ldmatrix<const N: usize>(&mut self, address: impl Into<Mem>) -> [Reg<B32>; N] {
        self.ldmatrix_common::<N>(address.into(), false)
    }

    /// `ldmatrix … .trans`: as [`ldmatrix`](KernelBuilder::ldmatrix), each matrix
    /// transposed; for an `mma` B operand stored row-major (`[k][n]`), which `mma` takes
    /// column-major.
    pub fn ldmatrix_trans<const N: usize>(&mut self, address: impl Into<Mem>) -> [Reg<B32>; N] {
        self.ldmatrix_common::<N>(address.into(), true)
    }

    fn mma<A: Bits32, B: Bits32, C: RegType>(
        &mut self,
        shape_and_types: &str,
        accumulators: [Reg<C>; 4],
        a: [Reg<A>; 4],
        b: [Reg<B>; 2],
    ) {
        self.require_sm(80, "mma.sync");
        let acc = list(&accumulators);
        self.emit(format!(
            "mma.sync.aligned.{shape_and_types} {acc}, {}, {}, {acc}",
            list(&a),
            list(&b)
        ));
    }

    /// `mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32`, accumulating in place:
    /// `accumulators += A·B` for a 16×16 f16 A (row-major) and a 16×8 f16 B (column-major).
    ///
    /// With `g = lane / 4` and `t = lane % 4`: `a[0]` holds A row `g`, columns `2t, 2t+1`;
    /// `a[1]` row `g+8`; `a[2]` row `g`, columns `2t+8, 2t+9`; `a[3]` row `g+8`, those
    /// columns. `b[0]` holds B rows `2t, 2t+1` of column `g`; `b[1]` rows `2t+8, 2t+9`.
    /// `accumulators[0..2]` are C row `g`, columns `2t, 2t+1`; `[2..4]` row `g+8`.
    pub fn mma_m16n8k16_f16<A: Bits32, B: Bits32>(
        &mut self,
        accumulators: [Reg<F32>; 4],
        a: [Reg<A>; 4],
        b: [Reg<B>; 2],
    ) {
        self.mma("m16n8k16.row.col.f32.f16.f16.f32", accumulators, a, b);
    }

    /// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`, accumulating in place; the
    /// fragment layout of [`mma_m16n8k16_f16`](KernelBuilder::mma_m16n8k16_f16).
    pub fn mma_m16n8k16_bf16<A: Bits32, B: Bits32>(
        &mut self,
        accumulators: [Reg<F32>; 4],
        a: [Reg<A>; 4],
        b: [Reg<B>; 2],
    ) {
        self.mma("m16n8k16.row.col.f32.bf16.bf16.f32", accumulators, a, b);
    }

    /// `mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32`, accumulating in place:
    /// `accumulators += A·B` for a 16×32 s8 A (row-major) and a 32×8 s8 B (column-major).
    /// Each fragment register holds four consecutive bytes along K; the register layout
    /// follows [`mma_m16n8k16_f16`](KernelBuilder::mma_m16n8k16_f16) with K doubled
    /// (`a[0]` row `g`, bytes `4t..4t+4`; `a[2]` bytes `4t+16..`).
    pub fn mma_m16n8k32_s8<A: Bits32, B: Bits32>(
        &mut self,
        accumulators: [Reg<S32>; 4],
        a: [Reg<A>; 4],
        b: [Reg<B>; 2],
    ) {
        self.mma("m16n8k32.row.col.s32.s8.s8.s32", accumulators, a, b);
    }
}
