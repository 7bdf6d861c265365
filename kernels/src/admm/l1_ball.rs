//! Euclidean projection onto the ℓ1 ball `{v : ‖v‖₁ ≤ r}`, the core of NILE-Pro's ℓ∞ prox:
//! by the Moreau decomposition `prox_{‖·‖∞/ρ}(y) = y − Π_{‖·‖₁ ≤ 1/ρ}(y)`, which equals
//! `clamp(y, −θ, θ)` where `θ` is the projection's threshold.
//!
//! The projection is `sign(v)·max(|v| − θ, 0)` with `θ = 0` inside the ball and otherwise the
//! unique `θ > 0` with `Σ max(|vᵢ| − θ, 0) = r`. Finding `θ` is not elementwise:
//! [`threshold_by_sorting`] is the reference (sort `|v|` descending, Duchi et al. 2008,
//! O(m log m)); [`threshold`] is the fast variant (Michelot's pivoting: `θ ← (Σ_{|vᵢ|>θ}|vᵢ| −
//! r)/#{|vᵢ| > θ}` from `θ = (‖v‖₁ − r)/m`, which increases monotonically to the exact value
//! in a few O(m) passes over a shrinking candidate set). Applying `θ` is elementwise:
//! [`shrink_map`] (the projection) and [`clamp_map`] (the prox), both reading `θ` as an input
//! so one compilation serves every `θ`.

use kiln_codegen::cpu::{ElemType, MapSpec};
use kiln_codegen::expr::Expr;

/// The threshold of the projection of `v` onto the ℓ1 ball of radius `radius` (> 0), by
/// sorting. Zero when `v` is inside the ball.
pub fn threshold_by_sorting(v: &[f64], radius: f64) -> f64 {
    let norm: f64 = v.iter().map(|x| x.abs()).sum();
    if norm <= radius {
        return 0.0;
    }
    let mut u: Vec<f64> = v.iter().map(|x| x.abs()).collect();
    u.sort_unstable_by(|a, b| b.total_cmp(a));
    let (mut cumulative, mut theta) = (0.0, 0.0);
    for (j, &uj) in u.iter().enumerate() {
        cumulative += uj;
        let candidate = (cumulative - radius) / (j + 1) as f64;
        if uj > candidate {
            theta = candidate;
        } else {
            break;
        }
    }
    theta.max(0.0)
}

/// The same threshold by Michelot's pivoting (expected linear time, no sort).
pub fn threshold(v: &[f64], radius: f64) -> f64 {
    let mut candidates: Vec<f64> = v.iter().map(|x| x.abs()).filter(|&a| a > 0.0).collect();
    let norm: f64 = candidates.iter().sum();
    if norm <= radius {
        return 0.0;
    }
    let mut theta = (norm - radius) / candidates.len() as f64;
    loop {
        let before = candidates.len();
        candidates.retain(|&a| a > theta);
        let sum: f64 = candidates.iter().sum();
        theta = (sum - radius) / candidates.len() as f64;
        if candidates.len() == before {
            return theta.max(0.0);
        }
    }
}

/// The projection given its threshold: `x0 − clamp(x0, −x1, x1) = sign(x0)·max(|x0| − x1, 0)`
/// with `x1 = θ` (an input, broadcast by the caller).
pub fn shrink_map(ty: ElemType) -> MapSpec {
    let clamped = Expr::input(0).max(-Expr::input(1)).min(Expr::input(1));
    MapSpec::new(Expr::input(0) - clamped, 2, ty)
}

/// The ℓ∞ prox given the projection's threshold: `clamp(x0, −x1, x1)` with `x1 = θ`.
pub fn clamp_map(ty: ElemType) -> MapSpec {
    MapSpec::new(
        Expr::input(0).max(-Expr::input(1)).min(Expr::input(1)),
        2,
        ty,
    )
}

/// Reference projection (sorting threshold, then shrink), in f64.
pub fn project_reference(v: &[f64], radius: f64) -> Vec<f64> {
    let theta = threshold_by_sorting(v, radius);
    v.iter()
        .map(|&x| x.signum() * (x.abs() - theta).max(0.0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_agree_on_small_cases() {
        let v = [3.0, -1.0, 0.5, 0.0, -2.5];
        for radius in [0.1, 1.0, 2.0, 6.9, 7.0, 10.0] {
            let (a, b) = (threshold_by_sorting(&v, radius), threshold(&v, radius));
            assert!((a - b).abs() < 1e-14, "radius {radius}: {a} vs {b}");
            let p = project_reference(&v, radius);
            let norm: f64 = p.iter().map(|x| x.abs()).sum();
            assert!(norm <= radius + 1e-12);
        }
        assert_eq!(threshold(&v, 7.0), 0.0);
        // radius 1: |v| sorted 3, 2.5, 1, 0.5 → θ = (3 + 2.5 − 1)/2 = 2.25
        assert!((threshold(&v, 1.0) - 2.25).abs() < 1e-15);
    }
}
