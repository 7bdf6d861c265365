//! The exponential function in Cranelift IR (Cranelift has no `exp` instruction), for scalar
//! and vector lanes of f32 and f64. Used by `exp`, `sigmoid` and `silu` in
//! [`lower_expr`](super::lower_expr). Owns only this function; no memory access.
//!
//! Method (Cody–Waite range reduction, as in Cephes/fdlibm):
//! 1. clamp `x` to `[lo, hi]` (f32: `[-104, 89]`, f64: `[-746, 710]`) — wide enough that
//!    every result outside is `0` or `+∞` anyway, narrow enough for the scaling below; NaN
//!    passes through the clamp (a compare-and-select that keeps `x` when unordered) and
//!    comes out NaN;
//! 2. `n = round(x / ln 2)` by the "magic number" trick: `t = x·log2(e) + 1.5·2^p` (`p` = 23
//!    or 52) rounds to an integer in the last place, so `n = t − 1.5·2^p` and the low bits of
//!    `t` are `n` as an integer — no float-to-int conversion, which x86 lacks for `i64x2`;
//! 3. `r = (x − n·ln2_hi) − n·ln2_lo` with `ln2_hi` short enough that `n·ln2_hi` is exact, so
//!    `|r| ≤ ln 2 / 2` to nearly working precision;
//! 4. `e^r` by a polynomial: f32 the Cephes `expf` minimax form
//!    `1 + r + r²·P(r)` (degree 5 `P`, relative error ≈ 1e-7 on the interval); f64 the Taylor
//!    series to degree 12 (truncation ≤ (ln2/2)^13/13! ≈ 2e-16);
//! 5. `e^x = e^r · 2^n1 · 2^n2` with `n1 = round(n/2)`, `n2 = n − n1`, each a power of two
//!    built from exponent bits (`(n1 + bias) << mantissa_bits`). Splitting `2^n` keeps both
//!    factors normal, so results that overflow give `+∞` and results in the subnormal range are
//!    rounded correctly instead of flushing to a wrong power of two.
//!
//! Accuracy (tested over `[-80, 80]` against `f64::exp`): f32 ≤ ~2 ulp (relative ≤ 1e-6),
//! f64 relative ≤ 1e-12 (in practice a few ulp).

use super::simd::{bitcast, fconst, iconst, mul_add, Lanes};
use super::{CpuTarget, ElemType};
use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{InstBuilder, Value};
use cranelift_frontend::FunctionBuilder;

/// Constants of one precision.
struct ExpConstants {
    lo: f64,
    hi: f64,
    log2e: f64,
    magic: f64,
    ln2_hi: f64,
    ln2_lo: f64,
    mantissa_bits: i64,
    bias: i64,
    /// Polynomial coefficients, highest degree first (see [`polynomial`]).
    coefficients: &'static [f64],
}

/// Cephes `expf`: `e^r ≈ 1 + r + r²·P(r)`, `P` highest degree first.
const F32_P: [f64; 6] = [
    1.987_569_150_0e-4,
    1.398_199_950_7e-3,
    8.333_451_907_3e-3,
    4.166_579_589_4e-2,
    1.666_666_545_9e-1,
    5.000_000_120_1e-1,
];

/// `1/k!` for k = 12 down to 0.
const F64_TAYLOR: [f64; 13] = [
    1.0 / 479_001_600.0,
    1.0 / 39_916_800.0,
    1.0 / 3_628_800.0,
    1.0 / 362_880.0,
    1.0 / 40_320.0,
    1.0 / 5_040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

fn constants(elem: ElemType) -> ExpConstants {
    match elem {
        ElemType::F32 => ExpConstants {
            lo: -104.0,
            hi: 89.0,
            log2e: std::f64::consts::LOG2_E,
            magic: 12_582_912.0, // 1.5 · 2^23
            // Cephes: C1 = 355/512 exactly, C2 = ln 2 − C1.
            ln2_hi: 0.693_359_375,
            ln2_lo: std::f64::consts::LN_2 - 0.693_359_375,
            mantissa_bits: 23,
            bias: 127,
            coefficients: &F32_P,
        },
        ElemType::F64 => ExpConstants {
            lo: -746.0,
            hi: 710.0,
            log2e: std::f64::consts::LOG2_E,
            magic: 6_755_399_441_055_744.0, // 1.5 · 2^52
            // fdlibm: ln2_hi has 32 significant bits, so n·ln2_hi is exact for |n| < 2^20.
            ln2_hi: f64::from_bits(0x3FE6_2E42_FEE0_0000), // 6.93147180369123816490e-01
            ln2_lo: f64::from_bits(0x3DEA_39EF_3579_3C76), // 1.90821492927058770002e-10
            mantissa_bits: 52,
            bias: 1023,
            coefficients: &F64_TAYLOR,
        },
    }
}

/// Horner evaluation of `coefficients` (highest degree first) at `r`.
fn horner(
    b: &mut FunctionBuilder,
    target: &CpuTarget,
    lanes: Lanes,
    coefficients: &[f64],
    r: Value,
) -> Value {
    let mut acc = fconst(b, lanes, coefficients[0]);
    for &c in &coefficients[1..] {
        let c = fconst(b, lanes, c);
        acc = mul_add(b, target, acc, r, c);
    }
    acc
}

/// `e^r` for `|r| ≤ ln 2 / 2`.
fn polynomial(
    b: &mut FunctionBuilder,
    target: &CpuTarget,
    lanes: Lanes,
    k: &ExpConstants,
    r: Value,
) -> Value {
    match lanes.elem {
        ElemType::F32 => {
            // 1 + r + r²·P(r)
            let p = horner(b, target, lanes, k.coefficients, r);
            let r2 = b.ins().fmul(r, r);
            let one = fconst(b, lanes, 1.0);
            let one_plus_r = b.ins().fadd(r, one);
            mul_add(b, target, p, r2, one_plus_r)
        }
        ElemType::F64 => horner(b, target, lanes, k.coefficients, r),
    }
}

/// `min(max(x, lo), hi)`, with NaN lanes of `x` passed through.
///
/// Written as "`x < lo` ? `lo` : `x`" and "`hi < x` ? `hi` : `x`": on vectors that is the
/// select-of-compare shape Cranelift lowers to single `maxps`/`minps` (`maxpd`/`minpd`)
/// instructions, where `fmax`/`fmin` (IEEE NaN and signed-zero rules) take ~8 instructions.
fn clamp_keeping_nan(
    b: &mut FunctionBuilder,
    lanes: Lanes,
    x: Value,
    lo: Value,
    hi: Value,
) -> Value {
    let select = |b: &mut FunctionBuilder, condition: Value, yes: Value, no: Value| {
        if lanes.vector {
            let mask = bitcast(b, lanes.ty(), condition);
            b.ins().bitselect(mask, yes, no)
        } else {
            b.ins().select(condition, yes, no)
        }
    };
    let below = b.ins().fcmp(FloatCC::LessThan, x, lo);
    let x = select(b, below, lo, x);
    let above = b.ins().fcmp(FloatCC::LessThan, hi, x);
    select(b, above, hi, x)
}

/// `e^x` for each lane of `x` (of shape `lanes`).
pub fn exp(b: &mut FunctionBuilder, target: &CpuTarget, lanes: Lanes, x: Value) -> Value {
    let k = constants(lanes.elem);
    let lo = fconst(b, lanes, k.lo);
    let hi = fconst(b, lanes, k.hi);
    let x = clamp_keeping_nan(b, lanes, x, lo, hi);

    // n = round(x·log2 e), t = n + magic.
    let log2e = fconst(b, lanes, k.log2e);
    let magic = fconst(b, lanes, k.magic);
    let t = mul_add(b, target, x, log2e, magic);
    let n = b.ins().fsub(t, magic);

    // r = x − n·ln2 in two steps.
    let ln2_hi = fconst(b, lanes, k.ln2_hi);
    let ln2_lo = fconst(b, lanes, k.ln2_lo);
    let n_hi = b.ins().fmul(n, ln2_hi);
    let r = b.ins().fsub(x, n_hi);
    let n_lo = b.ins().fmul(n, ln2_lo);
    let r = b.ins().fsub(r, n_lo);

    let p = polynomial(b, target, lanes, &k, r);

    // n1 = round(n/2) (t1 = n1 + magic), n2 = n − n1; 2^m has bits (m + bias) << mantissa.
    // The magic constant's own bits vanish in the shift (its low bits are zero), so
    // (bits(t1) + bias) << mantissa = (n1 + bias) << mantissa.
    let half = fconst(b, lanes, 0.5);
    let t1 = mul_add(b, target, n, half, magic);
    let int_ty = lanes.int_ty();
    let t_bits = bitcast(b, int_ty, t);
    let t1_bits = bitcast(b, int_ty, t1);
    let bias = iconst(b, lanes, k.bias);
    let e1 = b.ins().iadd(t1_bits, bias);
    let e1 = b.ins().ishl_imm_u(e1, k.mantissa_bits);
    let n2 = b.ins().isub(t_bits, t1_bits);
    let e2 = b.ins().iadd(n2, bias);
    let e2 = b.ins().ishl_imm_u(e2, k.mantissa_bits);
    let s1 = bitcast(b, lanes.ty(), e1);
    let s2 = bitcast(b, lanes.ty(), e2);
    let y = b.ins().fmul(p, s1);
    b.ins().fmul(y, s2)
}
