//! CPU steps: the Cranelift kernels a plan kernel placed on the host runs as.
//!
//! Owns [`CpuStep`] and [`cpu_step`], the choice of CPU kernels for a plan kernel's
//! [`Family`]: a linear is the Cranelift dot kernel (`x · Wᵀ`, both K-contiguous) followed by
//! its epilogue (a map kernel adding the bias or the residual, or `silu(gate) · up` over the
//! two halves of the product of the concatenated `[gate; up]` weights); an elementwise map
//! without broadcasting is one map kernel. Specs hold no sizes (they are run-time arguments),
//! so a step's spec serves every shape, and they are what a compiled artifact stores for its
//! host steps: the runtime compiles them with Cranelift at load. A family with no entry here
//! (RMSNorm, RoPE, attention, KV append, gathers, MoE) still runs on the reference
//! interpreter. This file must not compile or run code.
//!
//! ```
//! use kiln_ir::dtype::DType;
//! use kiln_ir::schedule::{Family, LinearEpilogue, SymExpr};
//! use kiln_kernels::cpu_step::{cpu_step, CpuStep};
//! let family = Family::Linear {
//!     rows: SymExpr::constant(1),
//!     n: 256,
//!     k: 512,
//!     dtype: DType::F32,
//!     epilogue: LinearEpilogue::SwiGlu,
//! };
//! let Some(CpuStep::Linear { epilogue: Some(map), .. }) = cpu_step(&family) else {
//!     panic!("a SwiGLU linear has a product and a map")
//! };
//! assert_eq!(map.inputs.len(), 2);
//! ```

use crate::lower::map_expr;
use kiln_codegen::cpu::{DotSpec, ElemType, MapSpec};
use kiln_codegen::expr::Expr;
use kiln_ir::dtype::DType;
use kiln_ir::schedule::{Family, LinearEpilogue};
use serde::{Deserialize, Serialize};

/// The Cranelift kernels of one host step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CpuStep {
    /// `product = x · Wᵀ` (`[rows, k] · [width, k]ᵀ`, `width = n`, or `2n` for SwiGLU),
    /// rounded to `dtype`, then `epilogue` row by row: `(product, bias)`,
    /// `(product, residual)` or `(gate half, up half)` → the output row; without an epilogue
    /// the product is the output.
    Linear {
        dot: DotSpec,
        epilogue_kind: LinearEpilogue,
        epilogue: Option<MapSpec>,
        n: usize,
        k: usize,
        dtype: DType,
    },
    /// One map kernel over operands of the output's length.
    Map { map: MapSpec, dtype: DType },
}

/// Whether a dtype's values are computed in f32 on the host (the interpreter's rule: floats
/// in f32, rounded to the dtype after each op).
fn float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// The CPU kernels of `family`, or `None` when it has none yet (the interpreter runs it).
pub fn cpu_step(family: &Family) -> Option<CpuStep> {
    match family {
        Family::Linear {
            n,
            k,
            dtype,
            epilogue,
            ..
        } if float(*dtype) => {
            let add = || MapSpec::new(Expr::input(0) + Expr::input(1), 2, ElemType::F32);
            let map = match epilogue {
                LinearEpilogue::None => None,
                LinearEpilogue::Bias | LinearEpilogue::Residual => Some(add()),
                LinearEpilogue::SwiGlu => Some(MapSpec::new(
                    Expr::input(0).silu() * Expr::input(1),
                    2,
                    ElemType::F32,
                )),
            };
            Some(CpuStep::Linear {
                dot: DotSpec::new(ElemType::F32),
                epilogue_kind: *epilogue,
                epilogue: map,
                n: *n,
                k: *k,
                dtype: *dtype,
            })
        }
        Family::Map {
            inputs,
            steps,
            broadcast: false,
            dtype,
            ..
        } if float(*dtype) => Some(CpuStep::Map {
            map: MapSpec::new(map_expr(steps), *inputs, ElemType::F32),
            dtype: *dtype,
        }),
        _ => None,
    }
}

impl CpuStep {
    /// The columns of the product (`2n` for SwiGLU).
    pub fn product_width(&self) -> Option<usize> {
        match self {
            CpuStep::Linear {
                epilogue_kind: LinearEpilogue::SwiGlu,
                n,
                ..
            } => Some(2 * n),
            CpuStep::Linear { n, .. } => Some(*n),
            CpuStep::Map { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::op::MapStep;
    use kiln_ir::schedule::SymExpr;

    fn linear(epilogue: LinearEpilogue, dtype: DType) -> Family {
        Family::Linear {
            rows: SymExpr::constant(3),
            n: 8,
            k: 16,
            dtype,
            epilogue,
        }
    }

    #[test]
    fn linears_and_plain_maps_have_cpu_kernels() {
        for epilogue in [
            LinearEpilogue::None,
            LinearEpilogue::Bias,
            LinearEpilogue::Residual,
            LinearEpilogue::SwiGlu,
        ] {
            let step = cpu_step(&linear(epilogue, DType::F16)).unwrap();
            let width = if epilogue == LinearEpilogue::SwiGlu {
                16
            } else {
                8
            };
            assert_eq!(step.product_width(), Some(width));
            let CpuStep::Linear { epilogue: map, .. } = step else {
                panic!("a linear step")
            };
            assert_eq!(map.is_some(), epilogue != LinearEpilogue::None);
        }
        let map = Family::Map {
            elements: SymExpr::constant(10),
            inputs: 2,
            steps: vec![
                MapStep::Operand { index: 0 },
                MapStep::Operand { index: 1 },
                MapStep::Mul { a: 0, b: 1 },
            ],
            broadcast: false,
            dtype: DType::F32,
        };
        assert!(matches!(cpu_step(&map), Some(CpuStep::Map { .. })));
    }

    #[test]
    fn broadcasts_integers_and_other_families_stay_interpreted() {
        let broadcast = Family::Map {
            elements: SymExpr::constant(10),
            inputs: 2,
            steps: vec![
                MapStep::Operand { index: 0 },
                MapStep::Operand { index: 1 },
                MapStep::Add { a: 0, b: 1 },
            ],
            broadcast: true,
            dtype: DType::F32,
        };
        assert!(cpu_step(&broadcast).is_none());
        assert!(cpu_step(&linear(LinearEpilogue::None, DType::I32)).is_none());
        let norm = Family::RmsNorm {
            rows: SymExpr::constant(1),
            hidden: 8,
            residual: false,
            eps: 1e-5,
            dtype: DType::F32,
        };
        assert!(cpu_step(&norm).is_none());
    }
}
