//! FroMax (Luo, Shapiro, Shi, Yang, Zhu, arXiv 1601.00062): NuMax's ADMM with a Frobenius
//! objective and a rank-r PSD projection in the P step — `L − Λ` scaled by β₂/(1 + β₂), then
//! its top-r non-negative eigenvalues kept (everything else is [`ConvexAdmm`]'s, see
//! [`numax`](super::numax)).
//!
//! It starts from the PCA warm start of NILE-Pro (L = P = the rank-r principal projector,
//! optimally rescaled) rather than NuMax's identity: from the identity, FroMax at PCA's rank
//! often ends worse than PCA (measured on random points). At a fixed rank r it runs until both relative residuals are below `tol` or the current P,
//! optimally rescaled, reaches δ over all secants (checked every `check_every` iterations), or
//! `max_iter`. Every secant is active (no column generation). The best P seen is returned.

use super::numax::{ConvexAdmm, PStep};
use super::problem::Problem;
use super::{EmbedOptions, Progress, RankOutcome};
use anyhow::Result;
use kiln_runtime::cpu::CpuJit;

/// FroMax at rank `rank`.
pub fn solve_rank(
    problem: &Problem,
    options: &EmbedOptions,
    rank: usize,
    jit: &CpuJit,
    progress: &mut dyn FnMut(&Progress),
) -> Result<RankOutcome> {
    let b2 = options.beta.1;
    let pstep = PStep::Rank {
        rank,
        scale: b2 / (1.0 + b2),
    };
    // PCA warm start (as NILE-Pro's): the rank-r principal projector, optimally rescaled
    let (d, r) = (problem.d, rank.clamp(1, problem.d));
    let scale = problem.pca_curve(r)[r - 1].scale();
    let mut start = vec![0.0; d * d];
    for t in 0..r {
        start[t * d + t] = scale;
    }
    let mut admm = ConvexAdmm::new(problem, options, pstep, Some(start), jit)?;
    let mut best: Option<(super::Isometry, super::operators::LowRank)> = None;
    let mut iterations = 0;
    let mut converged = false;
    let mut delta = None;
    let stage = format!("rank {rank}");
    while iterations < options.max_iter && !options.out_of_time() {
        let residuals = admm.step()?;
        iterations += 1;
        converged = residuals.0 < options.tol && residuals.1 < options.tol;
        let check = converged
            || iterations.is_multiple_of(options.check_every.max(1))
            || iterations == options.max_iter;
        if check {
            let iso = admm.measure()?;
            delta = Some(iso.delta());
            if best.as_ref().is_none_or(|(b, _)| iso.delta() < b.delta()) {
                best = Some((iso, admm.lowrank.clone()));
            }
        }
        progress(&Progress {
            stage: stage.clone(),
            iteration: iterations,
            max_iter: options.max_iter,
            residuals,
            delta,
            rank: admm.lowrank.rank,
        });
        if converged || delta.is_some_and(|d| d <= options.delta) {
            break;
        }
    }
    let (isometry, lowrank) = match best {
        Some(b) => b,
        None => (admm.measure()?, admm.lowrank.clone()),
    };
    Ok(RankOutcome {
        lowrank,
        isometry,
        iterations,
        converged,
    })
}
