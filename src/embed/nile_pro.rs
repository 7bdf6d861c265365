//! NILE-Pro (Luo, Shapiro, Shi, Yang, Zhu, arXiv 1601.00062): minimise the isometry constant
//! ‖𝒜(Ψ) − 1‖∞ directly over rank-r PSD matrices, by ADMM on the splitting z = 𝒜(Ψ) − 1,
//! Z = Ψ with scaled duals u, U (ρ₁ = 0.01 ≪ ρ₂ = 1, PCA warm start):
//!
//! 1. z ← prox of ‖·‖∞/ρ₁ at y = 𝒜(Ψ) − 1 + u, by the Moreau decomposition
//!    `z = y − (1/ρ₁)·Π_{ℓ1-ball}(ρ₁y) = clamp(y, −θ, θ)` (fast ℓ1 threshold, JIT clamp map);
//! 2. Z ← rank-r PSD projection of Ψ + U (faer eigendecomposition, top r non-negative);
//! 3. Ψ from (ρ₁𝒜*𝒜 + ρ₂I)Ψ = ρ₁𝒜*(1 + z − u) + ρ₂(Z − U) by warm-started conjugate gradients;
//! 4. u ← u + (𝒜(Ψ) − 1 − z), U ← U + (Ψ − Z) (JIT maps).
//!
//! The PCA warm start is the rank-r principal projector with the optimal rescale. Stops when
//! both relative residuals ‖𝒜(Ψ) − 1 − z‖/max(‖𝒜(Ψ) − 1‖, ‖z‖) and ‖Ψ − Z‖/max(‖Ψ‖, ‖Z‖) are
//! below `tol`, when Z (optimally rescaled) reaches δ over all secants (checked every
//! `check_every` iterations), or at `max_iter`. Returns the best Z seen (PCA's included).

use super::operators::{eigen, CgWork, LowRank, Operators};
use super::problem::{Isometry, Problem};
use super::{EmbedOptions, Progress, RankOutcome};
use anyhow::Result;
use kiln_codegen::cpu::ElemType;
use kiln_kernels::admm::steps;
use kiln_runtime::cpu::{CpuJit, Parallelism};

const PAR: Parallelism = Parallelism::Rayon;

/// NILE-Pro at rank `rank`.
pub fn solve_rank(
    problem: &Problem,
    options: &EmbedOptions,
    rank: usize,
    jit: &CpuJit,
    progress: &mut dyn FnMut(&Progress),
) -> Result<RankOutcome> {
    let (n, d) = (problem.n, problem.d);
    let rank = rank.clamp(1, d);
    let (rho1, rho2) = options.rho;
    let ty = ElemType::F64;
    let mut ops = Operators::<f64>::new(jit, &problem.x, n, d)?;
    let defect = jit.map(steps::shifted_defect(ty))?;
    let weights = jit.map(steps::weights(ty, 1.0))?;
    let dual_u = jit.map(steps::residual_dual_update(ty))?;
    let dual_big_u = jit.map(steps::dual_update(ty, -1.0))?;
    let nonneg = jit.map(steps::scale_nonneg(ty, 1.0))?;
    let mask = ops.mask().to_vec();
    let zeros = vec![0.0; n * n];

    // PCA warm start: the leading r principal coordinates, optimally rescaled
    let pca = problem.pca_curve(rank);
    let scale = pca[rank - 1].scale();
    let mut psi = vec![0.0; d * d];
    for t in 0..rank {
        psi[t * d + t] = scale;
    }
    let mut lowrank = {
        let mut w = vec![0.0; d * rank];
        for t in 0..rank {
            w[t * rank + t] = scale.sqrt();
        }
        LowRank {
            w,
            dim: d,
            rank,
            values: vec![scale; rank],
        }
    };
    let mut best = (pca[rank - 1], lowrank.clone());
    let mut big_z = psi.clone();
    let mut big_u = vec![0.0; d * d];
    let mut a = vec![0.0; n * n];
    ops.apply(&psi, &mut a)?;
    let mut u = vec![0.0; n * n];
    let mut z = vec![0.0; n * n];
    let mut y = vec![0.0; n * n];
    let mut tmp_nn = vec![0.0; n * n];
    let mut tmp_dd = vec![0.0; d * d];
    let mut rhs = vec![0.0; d * d];
    let mut work = CgWork::new(n, d);
    let mut values = vec![0.0; d];

    let mut iterations = 0;
    let mut converged = false;
    let mut delta = Some(best.0.delta());
    let stage = format!("rank {rank}");
    while iterations < options.max_iter && !options.out_of_time() {
        // z step: y = 𝒜(Ψ) − 1 + u, z = clamp(y, −θ, θ)
        defect.run(&[&a, &u, &mask], &mut y, PAR)?;
        ops.linf_prox(&y, 1.0 / rho1, &mut z)?;
        // Z step: rank-r PSD projection of Ψ + U
        tmp_dd.copy_from_slice(&psi);
        ops.axpby(1.0, &big_u, 1.0, &mut tmp_dd)?;
        let e = eigen(&tmp_dd, d)?;
        nonneg.run(&[&e.values], &mut values, PAR)?;
        values.iter_mut().skip(rank).for_each(|v| *v = 0.0);
        lowrank = LowRank::from_eigen(&e, &values);
        lowrank.matrix(&ops, &mut big_z)?;
        // Ψ step
        weights.run(&[&z, &u, &mask], &mut tmp_nn, PAR)?;
        ops.adjoint(&tmp_nn, &mut rhs)?;
        ops.axpby(rho2, &big_z, rho1, &mut rhs)?;
        ops.axpby(-rho2, &big_u, 1.0, &mut rhs)?;
        ops.conjugate_gradient(&rhs, &mut psi, rho1, rho2, options.cg_steps, &mut work)?;
        ops.apply(&psi, &mut a)?;
        // duals; residuals from the dual increments
        dual_u.run(&[&u, &a, &z, &mask], &mut tmp_nn, PAR)?;
        let r1 = ops.distance(&tmp_nn, &u)?;
        std::mem::swap(&mut u, &mut tmp_nn);
        dual_big_u.run(&[&big_u, &psi, &big_z], &mut tmp_dd, PAR)?;
        let r2 = ops.distance(&tmp_dd, &big_u)?;
        std::mem::swap(&mut big_u, &mut tmp_dd);
        defect.run(&[&a, &zeros, &mask], &mut tmp_nn, PAR)?;
        let scale1 = ops.inner(&tmp_nn, &tmp_nn)?.max(ops.inner(&z, &z)?).sqrt();
        let scale2 = ops
            .inner(&psi, &psi)?
            .max(ops.inner(&big_z, &big_z)?)
            .sqrt();
        let residuals = (
            r1 / scale1.max(f64::MIN_POSITIVE),
            r2 / scale2.max(f64::MIN_POSITIVE),
        );
        iterations += 1;
        converged = residuals.0 < options.tol && residuals.1 < options.tol;
        if converged
            || iterations.is_multiple_of(options.check_every.max(1))
            || iterations == options.max_iter
        {
            ops.apply_all(&big_z, &mut tmp_nn)?;
            let iso = Isometry::of_values(&tmp_nn, &problem.inv_d);
            delta = Some(iso.delta());
            if iso.delta() < best.0.delta() {
                best = (iso, lowrank.clone());
            }
        }
        progress(&Progress {
            stage: stage.clone(),
            iteration: iterations,
            max_iter: options.max_iter,
            residuals,
            delta,
            rank: lowrank.rank,
        });
        if converged || best.0.delta() <= options.delta {
            break;
        }
    }
    Ok(RankOutcome {
        lowrank: best.1,
        isometry: best.0,
        iterations,
        converged,
    })
}
