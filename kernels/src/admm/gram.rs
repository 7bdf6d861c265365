//! The Gram-trick operators of the embedding problem as CPU kernel specs.
//!
//! Points are the rows of `X` (n × d, row-major), `Xᵀ` is kept as well (d × n) so every
//! product is "NT" (both operands K-contiguous), and `1/Dᵢⱼ = 1/‖xᵢ − xⱼ‖²` is an n × n matrix
//! that is zero on the diagonal and on secants outside the active set. With Ψ symmetric:
//!
//! | step | kernel | shape (m × n × k) |
//! |---|---|---|
//! | `Y = XΨ` | [`product`] (`A = X`, `B = Ψ`) | n × d × d |
//! | `G = YXᵀ` | [`product`] (`A = Y`, `B = X`) on the upper block triangle, mirrored | ½ n × n × d |
//! | `G ← h1ᵀ + 1hᵀ − 2G`, `h = diag G` | [`update`] with `A = [h 1]`, `B = [1 h]`, α = 1, β = −2 | n × n × 2 |
//! | `𝒜(Ψ) = G ⊙ (1/D)` | [`secant_map`] | n² |
//! | `M = −w ⊙ (1/D)` | [`weight_map`] | n² |
//! | `s = M·1`, then `Mᵢᵢ = −sᵢ` | [`product`] (`B` = a row of ones) | n × 1 × n |
//! | `Zᵀ = XᵀLₕ` | [`product`] (`A = Xᵀ`, `B = Lₕ`) on the lower block triangle | ½ d × n × n |
//! | `R = ZᵀX`, `𝒜*(w) = R + Rᵀ` | [`product`] (`A = Zᵀ`, `B = Xᵀ`) | d × d × n |
//!
//! The conjugate-gradient operator `𝒜*𝒜` is fused per block of rows (one task each, kept in
//! cache): `G`'s lower block triangle ([`product`], `Y_I·X_{<i₁}ᵀ`), the weights
//! `Mᵢⱼ = (2Gᵢⱼ − hᵢ − hⱼ)/Dᵢⱼ²` of its strict lower triangle ([`normal_weight_map`], one row
//! at a time, `h = diag G` computed up front), and `Z_I = M_I·X` ([`product`]); the row and
//! column sums of `M` give the diagonal `−½sᵢ` of `Lₕ`, added to `Z` before `R = ZᵀX`. No
//! n × n matrix is written and read back between the steps.
//!
//! `diag(C1) − C` is `M` with its diagonal set to minus its row sums; `M = Lₕ + Lₕᵀ` with
//! `Lₕ` its strict lower triangle plus half its diagonal, so `XᵀMX = R + Rᵀ` and only the
//! lower block triangle of `Lₕ` enters a product (blocks of 128 rows). The conjugate-gradient
//! vector operations: `⟨a, b⟩` is a 1 × 1 × len product, `y ← αx + βy` the map
//! [`axpby_map`] with α and β broadcast (run-time scalars, one compilation).

use kiln_codegen::cpu::{DotSpec, ElemType, MapSpec};
use kiln_codegen::expr::Expr;

/// `C = A·Bᵀ`: every NT product of the operators, on 3 × 2 register tiles (measured on the
/// 2-core EPYC dev machine, f64, one thread, best of 20 interleaved runs: 5–15% faster than
/// the default 4 × 2 at every shape of the solvers — 16 × 81 × 80, 32 × 1797 × 61,
/// 32 × 61 × 1797, 61 × 61 × 1797, 1797 × 61 × 61 — e.g. 11.9 vs 10.6 GFLOP/s at
/// 61 × 61 × 1797; `tests/embed_bench.rs`).
pub fn product(ty: ElemType) -> DotSpec {
    DotSpec::new(ty).with_tile(3, 2)
}

/// `C = α·A·Bᵀ + β·C` with run-time α and β: the rank-2 update of `G` and `y ← αx + βy`.
pub fn update(ty: ElemType) -> DotSpec {
    DotSpec::new(ty).with_scale(true).with_accumulate(true)
}

/// `out = x0 · x1`: `𝒜(Ψ)ᵢⱼ = (Gᵢᵢ + Gⱼⱼ − 2Gᵢⱼ) · (1/Dᵢⱼ)` after the rank-2 update.
pub fn secant_map(ty: ElemType) -> MapSpec {
    MapSpec::new(Expr::input(0) * Expr::input(1), 2, ty)
}

/// `out = x0 · x2 + x1 · x3`: `y ← αx + βy` with `x2 = α` and `x3 = β` broadcast by the
/// caller (a map: one pass, no threads below 16 Ki elements; the len × 1 × 1 [`update`]
/// product is the alternative, measured 4× slower at d² = 6400 as each 64-row task pays
/// rayon and edge-tile overhead).
pub fn axpby_map(ty: ElemType) -> MapSpec {
    MapSpec::new(
        Expr::input(0) * Expr::input(2) + Expr::input(1) * Expr::input(3),
        4,
        ty,
    )
}

/// `out = (2·x0 − x1 − x3) · x2`: the fused `𝒜*𝒜` weights `Mᵢⱼ = (2Gᵢⱼ − hᵢ − hⱼ)/Dᵢⱼ²`
/// (= −𝒜(Ψ)ᵢⱼ/Dᵢⱼ on active secants) of one row of `G`'s lower triangle: `x0 = Gᵢ·`,
/// `x1 = h`, `x2` the row of `1/D²` over the active secants and `x3 = hᵢ` broadcast.
pub fn normal_weight_map(ty: ElemType) -> MapSpec {
    MapSpec::new(
        (Expr::input(0) * Expr::constant(2.0) - Expr::input(1) - Expr::input(3)) * Expr::input(2),
        4,
        ty,
    )
}

/// `out = −(x0 · x1)`: `−Cᵢⱼ = −wᵢⱼ · (1/Dᵢⱼ)`, the off-diagonal of `diag(C1) − C`.
pub fn weight_map(ty: ElemType) -> MapSpec {
    MapSpec::new(-(Expr::input(0) * Expr::input(1)), 2, ty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_valid_and_size_free() {
        for ty in [ElemType::F32, ElemType::F64] {
            product(ty).validate().unwrap();
            update(ty).validate().unwrap();
            secant_map(ty).validate().unwrap();
            weight_map(ty).validate().unwrap();
            axpby_map(ty).validate().unwrap();
            normal_weight_map(ty).validate().unwrap();
            assert_eq!(
                normal_weight_map(ty).expr.evaluate(&[3.0, 1.0, 0.5, 2.0]),
                1.5
            );
            assert_eq!(weight_map(ty).expr.evaluate(&[2.0, 0.25]), -0.5);
        }
    }
}
