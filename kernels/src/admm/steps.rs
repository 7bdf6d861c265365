//! The elementwise proximal and dual steps of the ADMM solvers as map specs.
//!
//! Constants (δ, thresholds, step sizes) are compiled in: they are fixed for a whole solve,
//! so each map is compiled once per solve, whatever the number of iterations.

use kiln_codegen::cpu::{ElemType, MapSpec};
use kiln_codegen::expr::Expr;

/// NuMax's `q` step on the active secants: `q = clip(x0 + x1, 1 − δ, 1 + δ) · x2` with
/// `x0 = 𝒜(L)`, `x1 = ω` and `x2` the 0/1 mask of active secants (inactive entries stay 0).
pub fn clip_shift(ty: ElemType, delta: f64) -> MapSpec {
    let clipped = (Expr::input(0) + Expr::input(1)).clamp(1.0 - delta, 1.0 + delta);
    MapSpec::new(clipped * Expr::input(2), 3, ty)
}

/// The eigenvalue soft-threshold of NuMax's P step, clipped at zero: `max(x0 − t, 0)`.
pub fn soft_threshold_nonneg(ty: ElemType, t: f64) -> MapSpec {
    MapSpec::new(
        (Expr::input(0) - Expr::constant(t)).max(Expr::constant(0.0)),
        1,
        ty,
    )
}

/// FroMax's eigenvalue step before the rank-r selection: `s · max(x0, 0)`.
pub fn scale_nonneg(ty: ElemType, s: f64) -> MapSpec {
    MapSpec::new(
        Expr::input(0).max(Expr::constant(0.0)) * Expr::constant(s),
        1,
        ty,
    )
}

/// A scaled dual update `x0 − η·(x1 − x2)`: `Λ ← Λ − η(L − P)`, `ω ← ω − η(q − 𝒜(L))`, and
/// with η = −1 NILE-Pro's `U ← U + (Ψ − Z)`.
pub fn dual_update(ty: ElemType, eta: f64) -> MapSpec {
    MapSpec::new(
        Expr::input(0) - Expr::constant(eta) * (Expr::input(1) - Expr::input(2)),
        3,
        ty,
    )
}

/// NILE-Pro's `u ← u + (a − 1 − z)` on active secants: `(x0 + x1 − 1 − x2) · x3` with
/// `x0 = u`, `x1 = 𝒜(Ψ)`, `x2 = z` and `x3` the mask.
pub fn residual_dual_update(ty: ElemType) -> MapSpec {
    MapSpec::new(
        (Expr::input(0) + Expr::input(1) - Expr::constant(1.0) - Expr::input(2)) * Expr::input(3),
        4,
        ty,
    )
}

/// `(x0 + x1 − 1) · x2`: NILE-Pro's `y = 𝒜(Ψ) − 1 + u` on the active secants, and with
/// `x1 = 0` the isometry defect `𝒜(Ψ) − 1`.
pub fn shifted_defect(ty: ElemType) -> MapSpec {
    MapSpec::new(
        (Expr::input(0) + Expr::input(1) - Expr::constant(1.0)) * Expr::input(2),
        3,
        ty,
    )
}

/// `(x0 − x1 + c) · x2` on the active secants (`x2` the mask): NuMax's right-hand-side
/// weights `q − ω` (`c = 0`) and NILE-Pro's `1 + z − u` (`c = 1`).
pub fn weights(ty: ElemType, c: f64) -> MapSpec {
    MapSpec::new(
        (Expr::input(0) - Expr::input(1) + Expr::constant(c)) * Expr::input(2),
        3,
        ty,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_follow_the_documented_formulas() {
        let ty = ElemType::F64;
        assert_eq!(clip_shift(ty, 0.1).expr.evaluate(&[1.5, 0.2, 1.0]), 1.1);
        assert_eq!(clip_shift(ty, 0.1).expr.evaluate(&[0.5, 0.2, 0.0]), 0.0);
        assert_eq!(soft_threshold_nonneg(ty, 1.0).expr.evaluate(&[0.5]), 0.0);
        assert_eq!(scale_nonneg(ty, 0.5).expr.evaluate(&[3.0]), 1.5);
        assert_eq!(dual_update(ty, 2.0).expr.evaluate(&[1.0, 3.0, 2.0]), -1.0);
        assert_eq!(
            residual_dual_update(ty)
                .expr
                .evaluate(&[1.0, 2.0, 0.5, 1.0]),
            1.5
        );
        assert_eq!(shifted_defect(ty).expr.evaluate(&[1.5, 0.25, 1.0]), 0.75);
        assert_eq!(weights(ty, 1.0).expr.evaluate(&[0.5, 0.25, 1.0]), 1.25);
        for spec in [
            clip_shift(ty, 0.3),
            dual_update(ty, 1.618),
            weights(ty, 0.0),
        ] {
            spec.validate().unwrap();
        }
    }
}
