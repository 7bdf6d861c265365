//! The specification and C ABI of the 4-bit grouped dot kernel ([`Int4DotSpec`]). Kept apart
//! from [`spec`](super::spec) (which lists it in [`CpuKernelSpec`]) so the kernel family lives
//! in its own files; it must not build IR (that is [`int4_dot`](super::int4_dot)).

use super::spec::{AbiParam, AbiType, CpuKernelSpec};
use super::CpuCodegenError;
use serde::{Deserialize, Serialize};

/// Elements of one packed block: 8 bytes of B, two 4-bit values each.
pub const INT4_BLOCK: usize = 16;

/// `C[i, j] = Σ_g scale[j, g] · Σ_{k in group g} A'[i, k] · (q[j, k] − 8)` for rows `i` in
/// `[row_start, row_end)` and columns `j` in `[col_start, col_end)`: a product with a weight
/// stored in 4 bits per value in groups of `group_size` along K, each group with its own
/// scale — Atom's and Fiddler's int4 weights (the `(q − 8) · scale` values are the weight).
///
/// C ABI (`extern "C"`, no return value):
/// `fn(a: *const u8, b: *const u8, scales: *const u8, c: *mut u8, lda: usize, ldb: usize,
///     lds: usize, ldc: usize, k: usize, row_start: usize, row_end: usize, col_start: usize,
///     col_end: usize)`:
/// - `b`: row `j` at byte `j · ldb`, `k / 2` bytes, byte `t` holding value `2t` in its low
///   nibble and `2t + 1` in its high nibble, each stored as `q + 8` (unsigned; the layout of
///   `kiln_models::weights::PACKED_I4`);
/// - `scales`: f32, row `j` at element `j · lds`, `k / group_size` of them;
/// - `a`: f32, row `i` at element `i · lda`, **block-deinterleaved**: each block of 16
///   elements holds the even elements of the block first, then the odd ones (`0, 2, …, 14,
///   1, 3, …, 15`; the runtime's wrapper permutes A once per call), so the kernel multiplies
///   the low and the high nibbles by contiguous vectors;
/// - `c`: f32, row `i` at element `i · ldc`, written (not accumulated).
///
/// `k` must be a multiple of `group_size`, itself a multiple of 16 ([`INT4_BLOCK`]).
///
/// Code shape, per register tile of `tile_rows` rows of A and one column: for each group, an
/// f32x4 accumulator per row takes 4 fused multiply-adds per 8 bytes of B (the bytes
/// zero-extended to i16x8, split into low and high nibbles, widened to i32x4, offset by −8 and
/// converted to f32x4: exact), then the group's sum is scaled into a second accumulator; the
/// lanes are summed at the end. Numerics: f32 throughout (each product of a value of A by an
/// integer in [−8, 7] is one rounding, the sums are f32), against the interpreter's f64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Int4DotSpec {
    /// Values per scale along K: a positive multiple of 16.
    pub group_size: usize,
    /// Rows of C per register tile (1–4): each unpacked block of B serves them all.
    pub tile_rows: u32,
}

impl Int4DotSpec {
    pub fn new(group_size: usize) -> Int4DotSpec {
        Int4DotSpec {
            group_size,
            tile_rows: 4,
        }
    }

    /// The kernel's C ABI parameters, in order.
    pub fn abi() -> &'static [AbiParam] {
        &[
            ("a", AbiType::Pointer),
            ("b", AbiType::Pointer),
            ("scales", AbiType::Pointer),
            ("c", AbiType::Pointer),
            ("lda", AbiType::Usize),
            ("ldb", AbiType::Usize),
            ("lds", AbiType::Usize),
            ("ldc", AbiType::Usize),
            ("k", AbiType::Usize),
            ("row_start", AbiType::Usize),
            ("row_end", AbiType::Usize),
            ("col_start", AbiType::Usize),
            ("col_end", AbiType::Usize),
        ]
    }

    pub fn validate(&self) -> Result<(), CpuCodegenError> {
        let invalid = |m: String| Err(CpuCodegenError::InvalidSpec(m));
        if self.group_size == 0 || !self.group_size.is_multiple_of(INT4_BLOCK) {
            return invalid(format!(
                "int4 dot: group_size {} is not a positive multiple of {INT4_BLOCK}",
                self.group_size
            ));
        }
        if !(1..=4).contains(&self.tile_rows) {
            return invalid(format!(
                "int4 dot: tile_rows {} outside 1..=4",
                self.tile_rows
            ));
        }
        Ok(())
    }
}

impl From<Int4DotSpec> for CpuKernelSpec {
    fn from(spec: Int4DotSpec) -> CpuKernelSpec {
        CpuKernelSpec::Int4Dot(spec)
    }
}
