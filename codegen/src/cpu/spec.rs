//! Serialisable specifications of the CPU kernels and their C ABI.
//!
//! A spec says what a kernel computes and in which formats it reads and writes; it never
//! contains a problem size (lengths, M/N/K, strides and ranges are run-time arguments), so one
//! compiled function serves every size. Specs are `serde` types and their JSON text
//! ([`CpuKernelSpec::cache_key`]) is the key of the runtime's compiled-function cache.
//! This file must not build IR.

use super::CpuCodegenError;
use crate::expr::Expr;
use serde::{Deserialize, Serialize};

/// A compute (and output) element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ElemType {
    F32,
    F64,
}

impl ElemType {
    /// Size of one element in bytes.
    pub fn size(self) -> u32 {
        match self {
            ElemType::F32 => 4,
            ElemType::F64 => 8,
        }
    }

    /// Lanes of one 128-bit vector.
    pub fn lanes(self) -> u32 {
        16 / self.size()
    }

    /// The storage format that holds this type unchanged.
    pub fn format(self) -> ElementFormat {
        match self {
            ElemType::F32 => ElementFormat::F32,
            ElemType::F64 => ElementFormat::F64,
        }
    }
}

/// How an input operand's elements are stored in memory.
///
/// Each input is unpacked to the kernel's compute type in registers by
/// [`load`](super::load), the one place that knows storage formats.
///
/// Planned (not implemented, so not representable yet): packed `Int4 { group }` — two unsigned
/// nibbles `q + 8` per byte, low nibble first, with one scale per `group` elements of a row
/// (Atom's weight layout). Its unpack is four lanes from two bytes: load a `u16`, splat it to
/// `i32x4`, shift lane `l` right by `4·l`, mask `0xF`, subtract 8, convert to f32 and multiply
/// by the group's scale; the scale pointer becomes one more ABI argument of the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ElementFormat {
    F32,
    F64,
    /// bfloat16 (the high half of an f32), unpacked to f32 by a 16-bit shift.
    Bf16,
}

impl ElementFormat {
    /// Size of one element in bytes.
    pub fn size(self) -> u32 {
        match self {
            ElementFormat::F32 => 4,
            ElementFormat::F64 => 8,
            ElementFormat::Bf16 => 2,
        }
    }

    /// Whether elements of this format can be unpacked to `compute`.
    pub fn unpacks_to(self, compute: ElemType) -> bool {
        matches!(
            (self, compute),
            (ElementFormat::F32, ElemType::F32)
                | (ElementFormat::Bf16, ElemType::F32)
                | (ElementFormat::F64, ElemType::F64)
        )
    }
}

/// The type of one C ABI parameter of a generated kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AbiType {
    /// A data pointer (`*const u8` / `*mut u8`).
    Pointer,
    /// A `usize` length, index or stride (in elements, never bytes).
    Usize,
    /// An `f64` scalar (converted to the compute type inside the kernel).
    F64,
}

/// One named C ABI parameter, in order.
pub type AbiParam = (&'static str, AbiType);

/// Elementwise map: `out[i] = expr(in_0[i], …, in_{n-1}[i])` for `i` in `[start, end)`.
///
/// C ABI (`extern "C"`, no return value):
/// `fn(inputs: *const *const u8, out: *mut u8, start: usize, end: usize)` where `inputs`
/// points at `inputs.len()` element pointers (input `j` stored in format `inputs[j]`), `out`
/// holds compute-type elements, and indices are in elements from each pointer. Elements
/// outside `[start, end)` are neither read nor written.
///
/// Numerics: the expression is computed in `compute` precision with the IEEE operations of
/// [`Expr::evaluate`], except `exp` (a polynomial, see [`exp`](super::exp)) and `max`/`min`,
/// which propagate NaN (Cranelift's `fmax`/`fmin`) where `f64::max` ignores it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MapSpec {
    pub expr: Expr,
    /// Storage format of each input; there must be at least `expr.arity()` of them.
    pub inputs: Vec<ElementFormat>,
    /// Compute type, which is also the output type.
    pub compute: ElemType,
    /// Independent vectors per main-loop iteration (1–8).
    pub unroll: u32,
}

impl MapSpec {
    /// Largest number of inputs a map may read.
    pub const MAX_INPUTS: usize = 32;

    /// A map of `inputs` inputs all stored in `compute`'s own format, unrolled 4 times.
    pub fn new(expr: Expr, inputs: usize, compute: ElemType) -> MapSpec {
        MapSpec {
            expr,
            inputs: vec![compute.format(); inputs],
            compute,
            unroll: 4,
        }
    }

    pub fn with_unroll(mut self, unroll: u32) -> MapSpec {
        self.unroll = unroll;
        self
    }

    pub fn with_input_formats(mut self, inputs: Vec<ElementFormat>) -> MapSpec {
        self.inputs = inputs;
        self
    }

    /// The kernel's C ABI parameters, in order.
    pub fn abi() -> &'static [AbiParam] {
        &[
            ("inputs", AbiType::Pointer),
            ("out", AbiType::Pointer),
            ("start", AbiType::Usize),
            ("end", AbiType::Usize),
        ]
    }

    pub fn validate(&self) -> Result<(), CpuCodegenError> {
        let invalid = |m: String| Err(CpuCodegenError::InvalidSpec(m));
        if self.inputs.len() < self.expr.arity() {
            return invalid(format!(
                "map: the expression reads {} inputs but the spec lists {}",
                self.expr.arity(),
                self.inputs.len()
            ));
        }
        if self.inputs.len() > Self::MAX_INPUTS {
            return invalid(format!(
                "map: {} inputs, at most {} supported",
                self.inputs.len(),
                Self::MAX_INPUTS
            ));
        }
        for (j, format) in self.inputs.iter().enumerate() {
            if !format.unpacks_to(self.compute) {
                return invalid(format!(
                    "map: input {j} stored as {format:?} cannot be computed in {:?}",
                    self.compute
                ));
            }
        }
        if !(1..=8).contains(&self.unroll) {
            return invalid(format!("map: unroll {} outside 1..=8", self.unroll));
        }
        check_constants(&self.expr)
    }
}

/// Constants must be finite: JSON (plans, cache keys) cannot carry NaN or infinities.
fn check_constants(expr: &Expr) -> Result<(), CpuCodegenError> {
    match expr {
        Expr::Input(_) => Ok(()),
        Expr::Const(c) if !c.is_finite() => Err(CpuCodegenError::InvalidSpec(format!(
            "map: constant {c} is not finite (JSON cannot carry it; use a finite bound such as f64::MAX)"
        ))),
        Expr::Const(_) => Ok(()),
        Expr::Unary(_, a) => check_constants(a),
        Expr::Binary(_, a, b) => check_constants(a).and(check_constants(b)),
    }
}

/// Dot-product family ("NT" matrix product):
/// `C[i, j] = alpha · Σ_{k < K} A[i, k] · B[j, k] (+ beta · C[i, j])`
/// for `i` in `[row_start, row_end)`, `j` in `[col_start, col_end)`.
///
/// Both operands are K-contiguous (row `i` of A and row `j` of B are contiguous runs of K
/// elements), which also covers Gram matrices `X·Xᵀ` (pass X as both). C is row-major.
///
/// C ABI (`extern "C"`, no return value):
/// `fn(a: *const u8, b: *const u8, c: *mut u8, lda: usize, ldb: usize, ldc: usize, k: usize,
///     row_start: usize, row_end: usize, col_start: usize, col_end: usize,
///     alpha: f64, beta: f64)`; `ld*` are row strides in elements. `alpha` is read only when
/// `scale`, `beta` and the old C only when `accumulate` (without it C is write-only, so NaN
/// garbage in C never leaks into the result, as in BLAS with `beta = 0`).
///
/// Code shape: a `tile_rows × tile_cols` block of C is computed at once with one vector
/// accumulator per element of the block (A and B vectors are loaded once per k step and
/// reused across the block), then horizontal sums and a scalar tail over k; edge rows and
/// columns use 1-wide tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DotSpec {
    pub a: ElementFormat,
    pub b: ElementFormat,
    /// Compute type, which is also C's type.
    pub compute: ElemType,
    /// Multiply the sum by the run-time `alpha`.
    pub scale: bool,
    /// Add the run-time `beta` times the old C.
    pub accumulate: bool,
    /// Rows of C per register tile (1–4).
    pub tile_rows: u32,
    /// Columns of C per register tile (1–4); `tile_rows · tile_cols` ≤ 12.
    pub tile_cols: u32,
}

impl DotSpec {
    /// `C = A·Bᵀ` with both operands in `compute`'s own format and a 4×2 register tile: four
    /// rows of A stay in L1 while two rows of B stream from L2. Measured at 1024³ on one core
    /// of a dedicated Xeon host (GFLOP/s, f64 / f32): 4×2 14.3 / 29.0, 3×3 13.5 / 25.8,
    /// 2×2 12.0 / 14.3, 2×4 7.2 / 23.2.
    pub fn new(compute: ElemType) -> DotSpec {
        DotSpec {
            a: compute.format(),
            b: compute.format(),
            compute,
            scale: false,
            accumulate: false,
            tile_rows: 4,
            tile_cols: 2,
        }
    }

    pub fn with_scale(mut self, scale: bool) -> DotSpec {
        self.scale = scale;
        self
    }

    pub fn with_accumulate(mut self, accumulate: bool) -> DotSpec {
        self.accumulate = accumulate;
        self
    }

    pub fn with_formats(mut self, a: ElementFormat, b: ElementFormat) -> DotSpec {
        self.a = a;
        self.b = b;
        self
    }

    pub fn with_tile(mut self, rows: u32, cols: u32) -> DotSpec {
        self.tile_rows = rows;
        self.tile_cols = cols;
        self
    }

    /// The kernel's C ABI parameters, in order.
    pub fn abi() -> &'static [AbiParam] {
        &[
            ("a", AbiType::Pointer),
            ("b", AbiType::Pointer),
            ("c", AbiType::Pointer),
            ("lda", AbiType::Usize),
            ("ldb", AbiType::Usize),
            ("ldc", AbiType::Usize),
            ("k", AbiType::Usize),
            ("row_start", AbiType::Usize),
            ("row_end", AbiType::Usize),
            ("col_start", AbiType::Usize),
            ("col_end", AbiType::Usize),
            ("alpha", AbiType::F64),
            ("beta", AbiType::F64),
        ]
    }

    pub fn validate(&self) -> Result<(), CpuCodegenError> {
        let invalid = |m: String| Err(CpuCodegenError::InvalidSpec(m));
        for (name, format) in [("a", self.a), ("b", self.b)] {
            if !format.unpacks_to(self.compute) {
                return invalid(format!(
                    "dot: operand {name} stored as {format:?} cannot be computed in {:?}",
                    self.compute
                ));
            }
        }
        let (r, c) = (self.tile_rows, self.tile_cols);
        if !(1..=4).contains(&r) || !(1..=4).contains(&c) || r * c > 12 {
            return invalid(format!(
                "dot: register tile {r}×{c} outside 1..=4 × 1..=4 with at most 12 accumulators"
            ));
        }
        Ok(())
    }
}

/// Row RMSNorm, with an optional fused residual add:
/// `out[r, i] = x[r, i] · (1 / √(Σ_i x[r, i]² / hidden + eps)) · weight[i]` for rows `r` in
/// `[row_start, row_end)`; with `residual`, `s = x + residual` is formed first, written to
/// `residual_out`, and normalised in place of `x` (the interpreter's `Op::RmsNorm` and
/// `Op::AddRmsNorm`, whose sum the kernel leaves in f32: the caller rounds it to a narrower
/// dtype if it has one).
///
/// C ABI (`extern "C"`, no return value):
/// `fn(x: *const u8, residual: *const u8, weight: *const u8, out: *mut u8,
///     residual_out: *mut u8, hidden: usize, row_start: usize, row_end: usize, eps: f64)`:
/// `x`, `residual`, `out` and `residual_out` are row-major f32 arrays of rows of `hidden`
/// elements, `weight` holds `hidden` f32. `residual` and `residual_out` are read and written
/// only when the spec has `residual` (pass null otherwise). Rows outside
/// `[row_start, row_end)` are neither read nor written.
///
/// Numerics: all in f32. The sum of squares runs on `unroll` independent f32x4 accumulators
/// (fused multiply-add where the host has it), summed pairwise, then a scalar tail over the
/// last `hidden % 4` elements; the mean divides by `hidden` as f32 (exact below 2²⁴), `eps` is
/// rounded to f32, and the output is `(x · inverse) · weight`, in the interpreter's order. The
/// interpreter sums in f64: the two agree to a few f32 ulps while the squares stay inside f32
/// (|x| below ~1.8·10¹⁹; beyond that the sum overflows to infinity and the row becomes 0).
/// Rows are independent, so how a caller splits rows over threads never changes a result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RmsNormSpec {
    /// Fuse `s = x + residual` (written to `residual_out`) before the norm.
    pub residual: bool,
    /// Independent vector accumulators of the sum of squares, and vectors per iteration of
    /// the output loop (1–8).
    pub unroll: u32,
}

impl RmsNormSpec {
    /// A plain RMSNorm (no residual) with four accumulators.
    pub fn new() -> RmsNormSpec {
        RmsNormSpec {
            residual: false,
            unroll: 4,
        }
    }

    pub fn with_residual(mut self, residual: bool) -> RmsNormSpec {
        self.residual = residual;
        self
    }

    pub fn with_unroll(mut self, unroll: u32) -> RmsNormSpec {
        self.unroll = unroll;
        self
    }

    /// The kernel's C ABI parameters, in order.
    pub fn abi() -> &'static [AbiParam] {
        &[
            ("x", AbiType::Pointer),
            ("residual", AbiType::Pointer),
            ("weight", AbiType::Pointer),
            ("out", AbiType::Pointer),
            ("residual_out", AbiType::Pointer),
            ("hidden", AbiType::Usize),
            ("row_start", AbiType::Usize),
            ("row_end", AbiType::Usize),
            ("eps", AbiType::F64),
        ]
    }

    pub fn validate(&self) -> Result<(), CpuCodegenError> {
        if !(1..=8).contains(&self.unroll) {
            return Err(CpuCodegenError::InvalidSpec(format!(
                "rms_norm: unroll {} outside 1..=8",
                self.unroll
            )));
        }
        Ok(())
    }
}

impl Default for RmsNormSpec {
    fn default() -> RmsNormSpec {
        RmsNormSpec::new()
    }
}

/// Rotary position embedding with "rotate half" pairing (the interpreter's `Op::Rope`): in
/// every head of `head_dim` elements, element `i < head_dim / 2` pairs with `i + head_dim / 2`,
/// and for the token's angles `(cos_i, sin_i)`
/// `out[i] = x[i] · cos_i − x[i + h] · sin_i`, `out[i + h] = x[i + h] · cos_i + x[i] · sin_i`
/// (`h = head_dim / 2`), for tokens in `[token_start, token_end)`.
///
/// Cranelift has no sine or cosine, so the kernel does not compute angles: the caller passes
/// tables of `cos(position · theta^(−2i/head_dim))` and the sine, one row of `head_dim / 2`
/// entries per token, and the kernel does the rotation multiply-adds on vectors. `theta` and
/// the positions therefore never reach generated code (the runtime wrapper takes them at run
/// time and fills the tables).
///
/// C ABI (`extern "C"`, no return value):
/// `fn(x: *const u8, out: *mut u8, cos: *const u8, sin: *const u8, heads: usize,
///     head_dim: usize, token_start: usize, token_end: usize)`: `x` and `out` are row-major
/// f32 arrays of `[tokens, heads, head_dim]`; `cos` and `sin` hold
/// `token_end − token_start` rows of `head_dim / 2` elements of the `rotation` type, row `t`
/// belonging to token `token_start + t`. `head_dim` must be even (an odd one leaves the last
/// element of each head unwritten). Tokens outside the range are neither read nor written.
///
/// Numerics: with `rotation = F64` the pair is promoted to f64, rotated with separate
/// multiplies and a subtract/add (no fused multiply-add), and rounded to f32 — the
/// interpreter's arithmetic exactly, so with f64 tables from the same formula the result is
/// bit-identical. With `F32` the tables are f32 and the rotation runs on f32x4 (twice the
/// lanes), within a few f32 ulps of the pair's magnitude.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RopeSpec {
    /// Precision of the tables and of the rotation arithmetic.
    pub rotation: ElemType,
    /// Vectors of pairs per main-loop iteration (1–8).
    pub unroll: u32,
}

impl RopeSpec {
    /// The interpreter-exact RoPE: f64 tables and rotation, two vectors per iteration.
    pub fn new() -> RopeSpec {
        RopeSpec {
            rotation: ElemType::F64,
            unroll: 2,
        }
    }

    pub fn with_rotation(mut self, rotation: ElemType) -> RopeSpec {
        self.rotation = rotation;
        self
    }

    /// The kernel's C ABI parameters, in order.
    pub fn abi() -> &'static [AbiParam] {
        &[
            ("x", AbiType::Pointer),
            ("out", AbiType::Pointer),
            ("cos", AbiType::Pointer),
            ("sin", AbiType::Pointer),
            ("heads", AbiType::Usize),
            ("head_dim", AbiType::Usize),
            ("token_start", AbiType::Usize),
            ("token_end", AbiType::Usize),
        ]
    }

    pub fn with_unroll(mut self, unroll: u32) -> RopeSpec {
        self.unroll = unroll;
        self
    }

    pub fn validate(&self) -> Result<(), CpuCodegenError> {
        if !(1..=8).contains(&self.unroll) {
            return Err(CpuCodegenError::InvalidSpec(format!(
                "rope: unroll {} outside 1..=8",
                self.unroll
            )));
        }
        Ok(())
    }
}

impl Default for RopeSpec {
    fn default() -> RopeSpec {
        RopeSpec::new()
    }
}

/// Any CPU kernel kiln generates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuKernelSpec {
    Map(MapSpec),
    Dot(DotSpec),
    RmsNorm(RmsNormSpec),
    Rope(RopeSpec),
    Softmax(super::softmax_spec::SoftmaxSpec),
    Int4Dot(super::int4_dot_spec::Int4DotSpec),
}

impl CpuKernelSpec {
    pub fn validate(&self) -> Result<(), CpuCodegenError> {
        match self {
            CpuKernelSpec::Map(m) => m.validate(),
            CpuKernelSpec::Dot(d) => d.validate(),
            CpuKernelSpec::RmsNorm(r) => r.validate(),
            CpuKernelSpec::Rope(r) => r.validate(),
            CpuKernelSpec::Softmax(s) => s.validate(),
            CpuKernelSpec::Int4Dot(d) => d.validate(),
        }
    }

    /// The spec's JSON text: deterministic, exact for every finite constant (shortest
    /// round-trip floats), and the key of compiled-function caches.
    pub fn cache_key(&self) -> String {
        serde_json::to_string(self).expect("CPU kernel specs always serialise")
    }

    /// The kernel's C ABI parameters, in order.
    pub fn abi(&self) -> &'static [AbiParam] {
        match self {
            CpuKernelSpec::Map(_) => MapSpec::abi(),
            CpuKernelSpec::Dot(_) => DotSpec::abi(),
            CpuKernelSpec::RmsNorm(_) => RmsNormSpec::abi(),
            CpuKernelSpec::Rope(_) => RopeSpec::abi(),
            CpuKernelSpec::Softmax(_) => super::softmax_spec::SoftmaxSpec::abi(),
            CpuKernelSpec::Int4Dot(_) => super::int4_dot_spec::Int4DotSpec::abi(),
        }
    }
}

impl From<MapSpec> for CpuKernelSpec {
    fn from(spec: MapSpec) -> CpuKernelSpec {
        CpuKernelSpec::Map(spec)
    }
}

impl From<DotSpec> for CpuKernelSpec {
    fn from(spec: DotSpec) -> CpuKernelSpec {
        CpuKernelSpec::Dot(spec)
    }
}

impl From<RmsNormSpec> for CpuKernelSpec {
    fn from(spec: RmsNormSpec) -> CpuKernelSpec {
        CpuKernelSpec::RmsNorm(spec)
    }
}

impl From<RopeSpec> for CpuKernelSpec {
    fn from(spec: RopeSpec) -> CpuKernelSpec {
        CpuKernelSpec::Rope(spec)
    }
}
