//! Lowering of the elementwise expression IR ([`Expr`]) to PTX, in `f32`.
//!
//! Owns the instruction sequence chosen for each [`UnaryOp`] / [`BinaryOp`]:
//!
//! | op | PTX |
//! |---|---|
//! | `Neg`, `Abs`, `Add`, `Sub`, `Mul`, `Max`, `Min` | `neg`/`abs`/`add`/`sub`/`mul`/`max`/`min.f32` |
//! | `Div` | `div.rn.f32` (correctly rounded) |
//! | `Exp` | `ex2.approx.f32` of `x · log2(e)` |
//! | `Sqrt` | `sqrt.rn.f32` |
//! | `Rsqrt`, `Recip` | `rsqrt.approx.f32`, `rcp.approx.f32` |
//! | `Sigmoid` | `rcp.approx(1 + ex2.approx(x · −log2(e)))` |
//! | `Silu` | `x · sigmoid(x)` |
//!
//! Constants become exact hex immediates (`0f3F800000`), so the text is deterministic. It
//! does not load or store anything: the caller brings the inputs in registers.

use super::builder::KernelBuilder;
use super::types::{Operand, Reg, F32};
use crate::expr::{BinaryOp, Expr, UnaryOp};

/// `log2(e)`, the factor that turns `e^x` into `2^(x·log2 e)`.
const LOG2_E: f32 = std::f32::consts::LOG2_E;

/// Emits `expr` over `inputs` (input `n` of the expression is `inputs[n]`) and returns
/// the register holding its value. Inputs read twice are read from the same register; no
/// other common subexpression is shared.
///
/// ```
/// use kiln_codegen::expr::Expr;
/// use kiln_codegen::ptx::{lower_expr, KernelBuilder, Target};
///
/// let mut k = KernelBuilder::new("swiglu_example", Target::Sm80);
/// let gate = k.param_f32("gate");
/// let up = k.param_f32("up");
/// let value = lower_expr(&mut k, &(Expr::input(0).silu() * Expr::input(1)), &[gate, up]);
/// # let _ = value;
/// ```
///
/// # Panics
///
/// If the expression reads an input beyond `inputs`.
pub fn lower_expr(k: &mut KernelBuilder, expr: &Expr, inputs: &[Reg<F32>]) -> Reg<F32> {
    assert!(
        expr.arity() <= inputs.len(),
        "lower_expr: the expression reads {} inputs but {} registers were given",
        expr.arity(),
        inputs.len()
    );
    match lower(k, expr, inputs) {
        Operand::Reg(r) => r,
        immediate => k.mov(immediate),
    }
}

/// A register for `operand`, moving an immediate into one.
fn in_register(k: &mut KernelBuilder, operand: Operand<F32>) -> Reg<F32> {
    match operand {
        Operand::Reg(r) => r,
        immediate => k.mov(immediate),
    }
}

fn lower(k: &mut KernelBuilder, expr: &Expr, inputs: &[Reg<F32>]) -> Operand<F32> {
    match expr {
        Expr::Input(n) => Operand::Reg(inputs[*n]),
        Expr::Const(value) => Operand::from(*value as f32),
        Expr::Unary(op, a) => {
            let a = lower(k, a, inputs);
            let x = in_register(k, a);
            Operand::Reg(lower_unary(k, *op, x))
        }
        Expr::Binary(op, a, b) => {
            let a = lower(k, a, inputs);
            let b = lower(k, b, inputs);
            // At most one immediate per instruction.
            let a = match (a, b) {
                (Operand::Imm(_), Operand::Imm(_)) => Operand::Reg(in_register(k, a)),
                _ => a,
            };
            Operand::Reg(match op {
                BinaryOp::Add => k.add(a, b),
                BinaryOp::Sub => k.sub(a, b),
                BinaryOp::Mul => k.mul(a, b),
                BinaryOp::Div => k.div_rn(a, b),
                BinaryOp::Max => k.max(a, b),
                BinaryOp::Min => k.min(a, b),
            })
        }
    }
}

/// `e^x` as `2^(x · log2 e)`.
fn exp(k: &mut KernelBuilder, x: Reg<F32>) -> Reg<F32> {
    let scaled = k.mul(x, LOG2_E);
    k.ex2_approx(scaled)
}

/// `1 / (1 + e^(−x))`; saturates to 0 and 1 (`e^(−x)` overflows to infinity, whose
/// reciprocal is 0).
fn sigmoid(k: &mut KernelBuilder, x: Reg<F32>) -> Reg<F32> {
    let scaled = k.mul(x, -LOG2_E);
    let exp_negative = k.ex2_approx(scaled);
    let denominator = k.add(exp_negative, 1.0);
    k.rcp_approx(denominator)
}

fn lower_unary(k: &mut KernelBuilder, op: UnaryOp, x: Reg<F32>) -> Reg<F32> {
    match op {
        UnaryOp::Neg => k.neg(x),
        UnaryOp::Abs => k.abs(x),
        UnaryOp::Exp => exp(k, x),
        UnaryOp::Sqrt => k.sqrt_rn(x),
        UnaryOp::Rsqrt => k.rsqrt_approx(x),
        UnaryOp::Recip => k.rcp_approx(x),
        UnaryOp::Sigmoid => sigmoid(k, x),
        UnaryOp::Silu => {
            let s = sigmoid(k, x);
            k.mul(x, s)
        }
    }
}
