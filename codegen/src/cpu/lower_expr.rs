//! Lowering of the elementwise expression IR ([`Expr`]) to Cranelift values, on scalar or
//! vector lanes of f32 or f64. Owns the meaning of every [`UnaryOp`] and [`BinaryOp`] on the
//! CPU; it must not access memory (inputs arrive as values) or emit control flow.

use super::exp::exp;
use super::simd::{fconst, Lanes};
use super::CpuTarget;
use crate::expr::{BinaryOp, Expr, UnaryOp};
use cranelift_codegen::ir::{InstBuilder, Value};
use cranelift_frontend::FunctionBuilder;

/// The value of `expr` on `lanes`, given the value of each input.
///
/// Each operation follows [`Expr::evaluate`] in the lanes' precision: `rsqrt` is `1/√x` and
/// `recip` is `1/x` (exactly rounded divisions, not approximations), `sigmoid` is
/// `1/(1 + e^(−x))` and `silu` is `x/(1 + e^(−x))` with the polynomial [`exp`]; `max`/`min`
/// propagate NaN.
pub fn lower_expr(
    b: &mut FunctionBuilder,
    target: &CpuTarget,
    lanes: Lanes,
    expr: &Expr,
    inputs: &[Value],
) -> Value {
    match expr {
        Expr::Input(n) => inputs[*n],
        Expr::Const(c) => fconst(b, lanes, *c),
        Expr::Unary(op, a) => {
            let x = lower_expr(b, target, lanes, a, inputs);
            lower_unary(b, target, lanes, *op, x)
        }
        Expr::Binary(op, a, c) => {
            let x = lower_expr(b, target, lanes, a, inputs);
            let y = lower_expr(b, target, lanes, c, inputs);
            lower_binary(b, *op, x, y)
        }
    }
}

/// `op(x)` on `lanes`.
pub fn lower_unary(
    b: &mut FunctionBuilder,
    target: &CpuTarget,
    lanes: Lanes,
    op: UnaryOp,
    x: Value,
) -> Value {
    match op {
        UnaryOp::Neg => b.ins().fneg(x),
        UnaryOp::Abs => b.ins().fabs(x),
        UnaryOp::Exp => exp(b, target, lanes, x),
        UnaryOp::Sqrt => b.ins().sqrt(x),
        UnaryOp::Rsqrt => {
            let one = fconst(b, lanes, 1.0);
            let root = b.ins().sqrt(x);
            b.ins().fdiv(one, root)
        }
        UnaryOp::Recip => {
            let one = fconst(b, lanes, 1.0);
            b.ins().fdiv(one, x)
        }
        UnaryOp::Sigmoid | UnaryOp::Silu => {
            let one = fconst(b, lanes, 1.0);
            let minus_x = b.ins().fneg(x);
            let e = exp(b, target, lanes, minus_x);
            let denominator = b.ins().fadd(one, e);
            let numerator = if op == UnaryOp::Sigmoid { one } else { x };
            b.ins().fdiv(numerator, denominator)
        }
    }
}

/// `op(x, y)`.
pub fn lower_binary(b: &mut FunctionBuilder, op: BinaryOp, x: Value, y: Value) -> Value {
    match op {
        BinaryOp::Add => b.ins().fadd(x, y),
        BinaryOp::Sub => b.ins().fsub(x, y),
        BinaryOp::Mul => b.ins().fmul(x, y),
        BinaryOp::Div => b.ins().fdiv(x, y),
        BinaryOp::Max => b.ins().fmax(x, y),
        BinaryOp::Min => b.ins().fmin(x, y),
    }
}
