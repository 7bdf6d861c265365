//! The specification and C ABI of the row softmax kernel ([`SoftmaxSpec`]). Kept apart from
//! [`spec`](super::spec) (which lists it in [`CpuKernelSpec`]) so the kernel family lives in
//! its own files; like `spec.rs`, this file must not build IR (that is
//! [`softmax`](super::softmax)).

use super::spec::{AbiParam, AbiType, CpuKernelSpec};
use super::{CpuCodegenError, ElemType};
use serde::{Deserialize, Serialize};

/// Row softmax, in place, over the leading `valid_r` elements of each row, each scaled first:
/// `x[r, j] ← exp(scale·x[r, j] − m_r) / Σ_{j' < valid_r} exp(scale·x[r, j'] − m_r)` for
/// `j < valid_r`, where `m_r = max_{j < valid_r} scale·x[r, j]`, and `x[r, j] ← 0` for
/// `valid_r ≤ j < n`, for rows `r` in `[row_start, row_end)`.
///
/// The count of taking-part elements grows by a fixed step per row,
/// `valid_r = valid + r · valid_step`, which is the key mask of attention: a causal prefill
/// query `i` sees `i + T − S + 1` keys and a decode query `i` sees `lengths[b] − (S − 1 − i)`,
/// both `first + i` (step 1), and a non-causal query sees all `T` (step 0). Elements at or
/// beyond `valid_r` are never read (they may hold NaN), only overwritten with 0. A row with
/// `valid_r = 0` becomes all zeros.
///
/// C ABI (`extern "C"`, no return value):
/// `fn(x: *mut u8, ld: usize, n: usize, row_start: usize, row_end: usize, valid: usize,
///     valid_step: usize, scale: f64)`; row `r` starts at element `r · ld` of `x` (compute
/// type), and the caller guarantees `valid_r ≤ n ≤ ld` for every row it names.
///
/// Code shape, per row: three passes over the valid elements, each on 128-bit vectors
/// (f32x4 / f64x2) with a scalar tail — the maximum of `scale·x` (compare-and-select, so a NaN
/// element is skipped as by `f64::max`), `e = exp(scale·x − m)` stored back and summed in one
/// vector accumulator (then a horizontal sum and the tail), and `e / Σ` (an exact division,
/// not a reciprocal) — then zeros over the masked tail. `exp` is the polynomial of
/// [`exp`](super::exp).
///
/// Numerics: the reference interpreter (`kiln_ir::interp`) computes softmax in f64 and
/// rounds the result to f32; this kernel computes in the compute type. In f32 it matches the
/// f64 formula to a relative error of at most 1e-5 per element on random rows (measured about
/// 1e-6 for rows of a few thousand elements; `kiln-runtime`'s `cpu_softmax` test checks it):
/// the errors are the f32 rounding of `scale·x` (relative to `|scale·x|`), ~2 ulp of `exp`,
/// the f32 sum and the division.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SoftmaxSpec {
    /// Compute type, which is also the (in-place) storage type.
    pub compute: ElemType,
}

impl SoftmaxSpec {
    pub fn new(compute: ElemType) -> SoftmaxSpec {
        SoftmaxSpec { compute }
    }

    /// The kernel's C ABI parameters, in order.
    pub fn abi() -> &'static [AbiParam] {
        &[
            ("x", AbiType::Pointer),
            ("ld", AbiType::Usize),
            ("n", AbiType::Usize),
            ("row_start", AbiType::Usize),
            ("row_end", AbiType::Usize),
            ("valid", AbiType::Usize),
            ("valid_step", AbiType::Usize),
            ("scale", AbiType::F64),
        ]
    }

    /// Every compute type is supported.
    pub fn validate(&self) -> Result<(), CpuCodegenError> {
        Ok(())
    }
}

impl From<SoftmaxSpec> for CpuKernelSpec {
    fn from(spec: SoftmaxSpec) -> CpuKernelSpec {
        CpuKernelSpec::Softmax(spec)
    }
}
