//! Fused epilogues of the matrix kernels (GEMV and GEMM), shared so both families offer the
//! same set and name their extra parameters the same way.
//!
//! An epilogue turns the f32 accumulator(s) of one output element into the stored value;
//! its arithmetic is an [`Expr`] lowered by `kiln_codegen::ptx::lower_expr`, never written
//! by hand in a generator. This file defines the set and the expressions; it emits no PTX.

use kiln_codegen::expr::Expr;
use serde::{Deserialize, Serialize};

/// What happens to the accumulator before the store. `out` is `[M, N]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Epilogue {
    /// `out = acc`.
    None,
    /// `out = acc + bias[n]`; extra parameter `bias` `[N]`.
    Bias,
    /// `out = acc + residual[m, n]`; extra parameter `residual` `[M, N]`.
    Residual,
    /// SwiGLU over concatenated weights: `weight` is `[2N, K]`, gate rows `0..N` then up rows
    /// `N..2N`; `out[m, n] = silu(gate[m, n]) · up[m, n]`.
    SwiGlu,
}

impl Epilogue {
    /// The accumulators an output element needs: 2 for SwiGLU (gate and up), else 1.
    pub fn accumulators(self) -> usize {
        match self {
            Epilogue::SwiGlu => 2,
            _ => 1,
        }
    }

    /// The extra pointer parameter this epilogue reads, if any.
    pub fn extra_param(self) -> Option<&'static str> {
        match self {
            Epilogue::Bias => Some("bias"),
            Epilogue::Residual => Some("residual"),
            Epilogue::None | Epilogue::SwiGlu => None,
        }
    }

    /// Rows of the weight matrix per output column: 2 for SwiGLU, else 1.
    pub fn weight_rows_per_output(self) -> usize {
        self.accumulators()
    }

    /// The epilogue as an expression over inputs `0` = the (gate) accumulator, `1` = the up
    /// accumulator (SwiGLU) or the extra operand (bias, residual), all in f32.
    pub fn expr(self) -> Expr {
        match self {
            Epilogue::None => Expr::input(0),
            Epilogue::Bias | Epilogue::Residual => Expr::input(0) + Expr::input(1),
            Epilogue::SwiGlu => Expr::input(0).silu() * Expr::input(1),
        }
    }

    /// The short name used in kernel entry names and reports.
    pub fn name(self) -> &'static str {
        match self {
            Epilogue::None => "plain",
            Epilogue::Bias => "bias",
            Epilogue::Residual => "residual",
            Epilogue::SwiGlu => "swiglu",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expressions_compute_the_documented_values() {
        assert_eq!(Epilogue::None.expr().evaluate(&[3.0]), 3.0);
        assert_eq!(Epilogue::Bias.expr().evaluate(&[3.0, 0.5]), 3.5);
        let silu_2 = 2.0 / (1.0 + (-2f64).exp());
        assert!((Epilogue::SwiGlu.expr().evaluate(&[2.0, 3.0]) - 3.0 * silu_2).abs() < 1e-12);
        assert_eq!(
            Epilogue::SwiGlu.expr().arity(),
            Epilogue::SwiGlu.accumulators()
        );
        assert_eq!(Epilogue::Residual.extra_param(), Some("residual"));
    }
}
