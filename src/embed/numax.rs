//! NuMax (Hegde, Sankaranarayanan, Yin, Baraniuk, IEEE TSP 2015): min tr(P) s.t. P ⪰ 0,
//! ‖𝒜(P) − 1‖∞ ≤ δ, by ADMM with the splitting L = P, q = 𝒜(L), and column generation.
//!
//! One iteration (β₁ = β₂ = 1, η = 1.618):
//! 1. P ← eigenvalue soft-threshold of L − Λ at 1/β₂, clipped at 0 (faer eigendecomposition,
//!    JIT map on the eigenvalues, `P = WWᵀ` by the product kernel);
//! 2. q ← clip(𝒜(L) + ω, 1 − δ, 1 + δ) on the active secants (JIT map);
//! 3. L from (β₁𝒜*𝒜 + 2β₂I)L = β₁𝒜*(q − ω) + 2β₂(P + Λ) by `cg_steps` warm-started
//!    conjugate-gradient steps;
//! 4. Λ ← Λ − η(L − P), ω ← ω − η(q − 𝒜(L)) (JIT maps).
//!
//! The clip uses `δ·(1 − margin)` (margin 0.01 by default, see `EmbedOptions::margin`).
//! Stop when both relative primal residuals ‖L − P‖/max(‖L‖, ‖P‖) and
//! ‖q − 𝒜(L)‖/max(‖q‖, ‖𝒜(L)‖) are below `tol`. Column generation: the active set starts as a
//! random tenth of the secants (at least 500); after each converged round the worst violators
//! among the inactive secants (`|vᵀPv − 1| > δ`, up to a twentieth of all secants, at
//! least 200) join it, warm-starting every variable, until none is left or the iteration
//! budget is spent. If P then still misses δ over all secants, the tolerance is divided by 10
//! and the iteration goes on (at most three times: "polishing"). The reported rank is the
//! smallest truncation of P whose optimally rescaled embedding reaches δ over all secants.
//!
//! [`ConvexAdmm`] is shared with FroMax, which differs only in the P step.

use super::operators::{eigen, CgWork, LowRank, Operators};
use super::problem::{Isometry, Problem};
use super::report::Report;
use super::{EmbedOptions, Progress};
use anyhow::Result;
use kiln_codegen::cpu::ElemType;
use kiln_kernels::admm::steps;
use kiln_runtime::cpu::{CpuJit, MapKernel, Parallelism};
use rand::seq::SliceRandom;
use rand::SeedableRng;

const PAR: Parallelism = Parallelism::Rayon;

/// The P step's eigenvalue rule.
#[derive(Clone, Copy, Debug)]
pub enum PStep {
    /// NuMax: `max(s − t, 0)`.
    SoftThreshold(f64),
    /// FroMax: `scale·max(s, 0)` on the top `rank` eigenvalues, zero below.
    Rank { rank: usize, scale: f64 },
}

/// The ADMM state of NuMax and FroMax over one problem.
#[derive(Debug)]
pub struct ConvexAdmm {
    pub ops: Operators<f64>,
    clip: MapKernel,
    dual: MapKernel,
    weights: MapKernel,
    eigen_map: MapKernel,
    pstep: PStep,
    beta: (f64, f64),
    cg_steps: usize,
    l: Vec<f64>,
    p: Vec<f64>,
    lambda: Vec<f64>,
    rhs: Vec<f64>,
    tmp_dd: Vec<f64>,
    q: Vec<f64>,
    omega: Vec<f64>,
    a: Vec<f64>,
    tmp_nn: Vec<f64>,
    work: CgWork<f64>,
    /// P of the last iteration.
    pub lowrank: LowRank,
    full_mask: Vec<f64>,
}

impl ConvexAdmm {
    /// Starts from L = P = `start` (d × d; default I, an exact isometry on the secants),
    /// Λ = ω = 0.
    pub fn new(
        problem: &Problem,
        options: &EmbedOptions,
        pstep: PStep,
        start: Option<Vec<f64>>,
        jit: &CpuJit,
    ) -> Result<ConvexAdmm> {
        let (n, d) = (problem.n, problem.d);
        let ty = ElemType::F64;
        let mut ops = Operators::<f64>::new(jit, &problem.x, n, d)?;
        if options.cg_f32 {
            ops.use_f32_normal(jit)?;
        }
        let mut identity = vec![0.0; d * d];
        for i in 0..d {
            identity[i * d + i] = 1.0;
        }
        let eigen_spec = match pstep {
            PStep::SoftThreshold(t) => steps::soft_threshold_nonneg(ty, t),
            PStep::Rank { scale, .. } => steps::scale_nonneg(ty, scale),
        };
        let identity = start.unwrap_or(identity);
        let clip_delta = options.delta * (1.0 - options.margin);
        let mut admm = ConvexAdmm {
            clip: jit.map(steps::clip_shift(ty, clip_delta))?,
            dual: jit.map(steps::dual_update(ty, options.eta))?,
            weights: jit.map(steps::weights(ty, 0.0))?,
            eigen_map: jit.map(eigen_spec)?,
            pstep,
            beta: options.beta,
            cg_steps: options.cg_steps,
            l: identity.clone(),
            p: identity,
            lambda: vec![0.0; d * d],
            rhs: vec![0.0; d * d],
            tmp_dd: vec![0.0; d * d],
            q: vec![0.0; n * n],
            omega: vec![0.0; n * n],
            a: vec![0.0; n * n],
            tmp_nn: vec![0.0; n * n],
            work: CgWork::new(n, d),
            lowrank: LowRank {
                w: Vec::new(),
                dim: d,
                rank: 0,
                values: Vec::new(),
            },
            full_mask: problem.inv_d.clone(),
            ops,
        };
        admm.ops.apply(&admm.l, &mut admm.a)?;
        Ok(admm)
    }

    /// Recomputes `𝒜(L)` after the active set changed.
    pub fn refresh(&mut self) -> Result<()> {
        self.ops.apply(&self.l, &mut self.a)?;
        // ω, q outside the active set are meaningless: zero them
        for ((w, q), &m) in self.omega.iter_mut().zip(&mut self.q).zip(self.ops.mask()) {
            if m == 0.0 {
                *w = 0.0;
                *q = 0.0;
            }
        }
        Ok(())
    }

    /// One ADMM iteration; returns the two relative primal residuals.
    pub fn step(&mut self) -> Result<(f64, f64)> {
        let (b1, b2) = self.beta;
        let d = self.ops.dim();
        // P step
        self.tmp_dd.copy_from_slice(&self.l);
        self.ops.axpby(-1.0, &self.lambda, 1.0, &mut self.tmp_dd)?;
        let e = eigen(&self.tmp_dd, d)?;
        let mut values = vec![0.0; d];
        self.eigen_map.run(&[&e.values], &mut values, PAR)?;
        if let PStep::Rank { rank, .. } = self.pstep {
            values.iter_mut().skip(rank).for_each(|v| *v = 0.0);
        }
        self.lowrank = LowRank::from_eigen(&e, &values);
        self.lowrank.matrix(&self.ops, &mut self.p)?;
        // q step
        self.clip
            .run(&[&self.a, &self.omega, self.ops.mask()], &mut self.q, PAR)?;
        // L step
        self.weights.run(
            &[&self.q, &self.omega, self.ops.mask()],
            &mut self.tmp_nn,
            PAR,
        )?;
        self.ops.adjoint(&self.tmp_nn, &mut self.rhs)?;
        self.ops.axpby(2.0 * b2, &self.p, b1, &mut self.rhs)?;
        self.ops.axpby(2.0 * b2, &self.lambda, 1.0, &mut self.rhs)?;
        self.ops.conjugate_gradient(
            &self.rhs,
            &mut self.l,
            b1,
            2.0 * b2,
            self.cg_steps,
            &mut self.work,
        )?;
        self.ops.apply(&self.l, &mut self.a)?;
        // duals and residuals
        self.dual
            .run(&[&self.lambda, &self.l, &self.p], &mut self.tmp_dd, PAR)?;
        std::mem::swap(&mut self.lambda, &mut self.tmp_dd);
        self.dual
            .run(&[&self.omega, &self.q, &self.a], &mut self.tmp_nn, PAR)?;
        std::mem::swap(&mut self.omega, &mut self.tmp_nn);
        let ops = &self.ops;
        let relative = |x: &[f64], y: &[f64]| -> Result<f64> {
            let scale = ops.inner(x, x)?.sqrt().max(ops.inner(y, y)?.sqrt());
            Ok(ops.distance(x, y)? / scale.max(f64::MIN_POSITIVE))
        };
        Ok((relative(&self.l, &self.p)?, relative(&self.q, &self.a)?))
    }

    /// The isometry of the current P over every secant (before rescaling).
    pub fn measure(&mut self) -> Result<Isometry> {
        self.ops.apply_all(&self.p, &mut self.tmp_nn)?;
        Ok(Isometry::of_values(&self.tmp_nn, &self.full_mask))
    }

    /// `vᵀPv` for every secant (n × n).
    pub fn all_values(&mut self) -> Result<&[f64]> {
        self.ops.apply_all(&self.p, &mut self.tmp_nn)?;
        Ok(&self.tmp_nn)
    }
}

/// NuMax with column generation; returns P.
pub fn solve(
    problem: &Problem,
    options: &EmbedOptions,
    jit: &CpuJit,
    report: &mut Report,
    progress: &mut dyn FnMut(&Progress),
) -> Result<LowRank> {
    let n = problem.n;
    let mut admm = ConvexAdmm::new(
        problem,
        options,
        PStep::SoftThreshold(1.0 / options.beta.1),
        None,
        jit,
    )?;
    let mut pairs: Vec<(usize, usize)> = (0..n)
        .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
        .filter(|&(i, j)| problem.inv_d[i * n + j] > 0.0)
        .collect();
    let m = pairs.len();
    let mut active = vec![false; n * n];
    let initial = (m / 10).max(500);
    if options.column_generation && m > initial {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(options.seed);
        pairs.shuffle(&mut rng);
        for &(i, j) in &pairs[..initial] {
            active[i * n + j] = true;
        }
        admm.ops.set_active(&active);
        admm.refresh()?;
    } else {
        active.iter_mut().for_each(|a| *a = true);
    }
    let batch = (m / 20).max(200);
    let mut iterations = 0;
    let mut rounds = 0;
    let mut converged = false;
    let mut delta = None;
    let mut tol = options.tol;
    while iterations < options.max_iter && !options.out_of_time() {
        rounds += 1;
        let stage = format!("round {rounds} ({} secants)", admm.ops.active_secants());
        converged = false;
        while iterations < options.max_iter && !options.out_of_time() {
            let residuals = admm.step()?;
            iterations += 1;
            if iterations.is_multiple_of(options.check_every.max(1)) {
                delta = Some(admm.measure()?.delta());
            }
            progress(&super::Progress {
                stage: stage.clone(),
                iteration: iterations,
                max_iter: options.max_iter,
                residuals,
                delta,
                rank: admm.lowrank.rank,
            });
            if residuals.0 < tol && residuals.1 < tol {
                converged = true;
                break;
            }
        }
        if !converged {
            break;
        }
        if !options.column_generation {
            if polish(&mut admm, options, &mut tol)? {
                continue;
            }
            break;
        }
        // the worst violators among the inactive secants join the active set
        let values = admm.all_values()?;
        let mut violators: Vec<(f64, usize, usize)> = (0..n)
            .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
            .filter(|&(i, j)| !active[i * n + j] && problem.inv_d[i * n + j] > 0.0)
            .map(|(i, j)| ((values[i * n + j] - 1.0).abs(), i, j))
            .filter(|&(v, _, _)| v > options.delta)
            .collect();
        if violators.is_empty() {
            if polish(&mut admm, options, &mut tol)? {
                continue;
            }
            break;
        }
        violators.sort_unstable_by(|x, y| y.0.total_cmp(&x.0));
        for &(_, i, j) in violators.iter().take(batch) {
            active[i * n + j] = true;
        }
        admm.ops.set_active(&active);
        admm.refresh()?;
    }
    report.iterations = iterations;
    report.converged = converged;
    report.final_tol = Some(tol);
    report.rounds = Some(rounds);
    report.active_secants = Some(admm.ops.active_secants());
    report.numerical_rank = Some(admm.lowrank.rank);
    Ok(admm.lowrank)
}

/// After a converged round with no inactive violator: if P still misses δ over all secants
/// (the ℓ2 residual rule lets single active secants stray past the clip margin), divide the
/// tolerance by 10 and go on, down to `tol / 1000`. Returns whether to go on.
fn polish(admm: &mut ConvexAdmm, options: &EmbedOptions, tol: &mut f64) -> Result<bool> {
    if admm.measure()?.delta() <= options.delta || *tol <= options.tol * POLISH_FLOOR {
        return Ok(false);
    }
    *tol /= 10.0;
    Ok(true)
}

/// The tightest tolerance polishing goes to, relative to `EmbedOptions::tol`.
const POLISH_FLOOR: f64 = 1.0001e-3;
