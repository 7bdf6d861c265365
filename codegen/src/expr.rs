//! The elementwise expression IR: fused prologues, epilogues and maps of every kernel.
//!
//! An [`Expr`] is a small tree over numbered inputs and constants, computed in the kernel's
//! compute type (f32 on the GPU; f32 or f64 on the CPU). It is lowered to PTX by
//! `ptx::lower_expr` and to Cranelift by the CPU backend; [`Expr::evaluate`] is its
//! reference meaning, in f64. It knows nothing about memory, layouts or ML ops.

use serde::{Deserialize, Serialize};

/// A unary elementwise function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnaryOp {
    Neg,
    Abs,
    Exp,
    Sqrt,
    Rsqrt,
    Recip,
    /// `1 / (1 + e^(−x))`.
    Sigmoid,
    /// `x · sigmoid(x)`.
    Silu,
}

/// A binary elementwise function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
}

/// An elementwise expression.
///
/// ```
/// use kiln_codegen::expr::Expr;
/// // silu(x0) * x1, the SwiGLU activation
/// let e = Expr::input(0).silu() * Expr::input(1);
/// let value = e.evaluate(&[1.0, 2.0]);
/// assert!((value - 2.0 / (1.0 + (-1f64).exp())).abs() < 1e-12);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expr {
    /// The value of input number `n` at the current element.
    Input(usize),
    Const(f64),
    Unary(UnaryOp, Box<Expr>),
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
}

impl Expr {
    pub fn input(n: usize) -> Expr {
        Expr::Input(n)
    }

    pub fn constant(value: f64) -> Expr {
        Expr::Const(value)
    }

    pub fn unary(self, op: UnaryOp) -> Expr {
        Expr::Unary(op, Box::new(self))
    }

    pub fn binary(self, op: BinaryOp, other: Expr) -> Expr {
        Expr::Binary(op, Box::new(self), Box::new(other))
    }

    pub fn silu(self) -> Expr {
        self.unary(UnaryOp::Silu)
    }

    pub fn sigmoid(self) -> Expr {
        self.unary(UnaryOp::Sigmoid)
    }

    pub fn exp(self) -> Expr {
        self.unary(UnaryOp::Exp)
    }

    pub fn max(self, other: Expr) -> Expr {
        self.binary(BinaryOp::Max, other)
    }

    pub fn min(self, other: Expr) -> Expr {
        self.binary(BinaryOp::Min, other)
    }

    /// `min(max(self, lo), hi)`.
    pub fn clamp(self, lo: f64, hi: f64) -> Expr {
        self.max(Expr::constant(lo)).min(Expr::constant(hi))
    }

    /// How many inputs the expression reads: one more than the largest input number.
    pub fn arity(&self) -> usize {
        match self {
            Expr::Input(n) => n + 1,
            Expr::Const(_) => 0,
            Expr::Unary(_, a) => a.arity(),
            Expr::Binary(_, a, b) => a.arity().max(b.arity()),
        }
    }

    /// The reference value of the expression, in f64.
    pub fn evaluate(&self, inputs: &[f64]) -> f64 {
        match self {
            Expr::Input(n) => inputs[*n],
            Expr::Const(c) => *c,
            Expr::Unary(op, a) => {
                let x = a.evaluate(inputs);
                match op {
                    UnaryOp::Neg => -x,
                    UnaryOp::Abs => x.abs(),
                    UnaryOp::Exp => x.exp(),
                    UnaryOp::Sqrt => x.sqrt(),
                    UnaryOp::Rsqrt => 1.0 / x.sqrt(),
                    UnaryOp::Recip => 1.0 / x,
                    UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
                    UnaryOp::Silu => x / (1.0 + (-x).exp()),
                }
            }
            Expr::Binary(op, a, b) => {
                let (x, y) = (a.evaluate(inputs), b.evaluate(inputs));
                match op {
                    BinaryOp::Add => x + y,
                    BinaryOp::Sub => x - y,
                    BinaryOp::Mul => x * y,
                    BinaryOp::Div => x / y,
                    BinaryOp::Max => x.max(y),
                    BinaryOp::Min => x.min(y),
                }
            }
        }
    }
}

macro_rules! binary_operator {
    ($trait:ident, $method:ident, $op:ident) => {
        impl std::ops::$trait for Expr {
            type Output = Expr;
            fn $method(self, other: Expr) -> Expr {
                self.binary(BinaryOp::$op, other)
            }
        }
    };
}
binary_operator!(Add, add, Add);
binary_operator!(Sub, sub, Sub);
binary_operator!(Mul, mul, Mul);
binary_operator!(Div, div, Div);

impl std::ops::Neg for Expr {
    type Output = Expr;
    fn neg(self) -> Expr {
        self.unary(UnaryOp::Neg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arity_counts_the_largest_input() {
        let e = (Expr::input(2) + Expr::constant(1.0)) * Expr::input(0);
        assert_eq!(e.arity(), 3);
        assert_eq!(Expr::constant(3.0).arity(), 0);
    }

    #[test]
    fn evaluate_follows_the_usual_definitions() {
        // clamp(x0 / x1 - 1, 0, 2) at (9, 3): 9/3 - 1 = 2 → 2; at (1, 4): −0.75 → 0
        let e = (Expr::input(0) / Expr::input(1) - Expr::constant(1.0)).clamp(0.0, 2.0);
        assert_eq!(e.evaluate(&[9.0, 3.0]), 2.0);
        assert_eq!(e.evaluate(&[1.0, 4.0]), 0.0);
        assert_eq!(
            (-Expr::input(0)).unary(UnaryOp::Rsqrt).evaluate(&[-4.0]),
            0.5
        );
        assert!((Expr::input(0).sigmoid().evaluate(&[0.0]) - 0.5).abs() < 1e-15);
    }
}
