//! # Near-isometric linear embeddings: NuMax, FroMax and NILE-Pro on the Cranelift CPU backend
//!
//! Given points x₁..xₙ ∈ ℝᵈ, find a low-rank PSD Ψ with `|vᵀΨv − 1| ≤ δ` for every secant
//! `v = (xᵢ − xⱼ)/‖xᵢ − xⱼ‖`; the embedding is `Φ = Σᵣ^{1/2}Uᵣᵀ` from Ψ's top eigenpairs.
//!
//! - [`data`]: CSV point sets (errors name file, line and column) and translating squares;
//! - [`problem`]: principal coordinates (exact reduction to the span of the secants), PCA and
//!   the measured isometry of an embedding over *all* secants with the optimal rescale;
//! - [`operators`]: `𝒜`, `𝒜*`, conjugate gradients, eigendecompositions (faer), all dense work
//!   in JIT kernels from `kiln_kernels::admm`;
//! - [`numax`] (convex, with column generation), [`fromax`] and [`nile_pro`] (rank-r,
//!   non-convex, with a search for the smallest rank that reaches δ);
//! - [`report`]: the JSON report and Φ as CSV; [`cli`]: `kiln embed`.
//!
//! Every solver reports its final embedding with the optimal rescale applied and judges it by
//! the isometry constant over all secants, exactly as PCA is judged.

pub mod cli;
pub mod data;
pub mod fromax;
pub mod nile_pro;
pub mod numax;
pub mod operators;
pub mod problem;
pub mod report;

use anyhow::Result;
use kiln_runtime::cpu::CpuJit;
use std::time::Instant;

pub use data::{load_csv, parse_csv, translating_squares, Dataset};
pub use problem::{Isometry, Problem};
pub use report::Report;

/// Which solver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Numax,
    Fromax,
    NilePro,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Numax => "numax",
            Method::Fromax => "fromax",
            Method::NilePro => "nile-pro",
        }
    }
}

/// Solver settings. Defaults are the documented ones of the issue.
#[derive(Clone, Debug)]
pub struct EmbedOptions {
    pub method: Method,
    /// Target isometry constant.
    pub delta: f64,
    /// Fixed rank (FroMax, NILE-Pro: no rank search; NuMax: truncate Φ to it).
    pub rank: Option<usize>,
    /// Iteration cap: of the whole NuMax run (all column-generation rounds), of each rank probe
    /// of FroMax and NILE-Pro.
    pub max_iter: usize,
    /// Relative-residual tolerance of the ADMM stop.
    pub tol: f64,
    /// Conjugate-gradient steps per ADMM iteration.
    pub cg_steps: usize,
    /// NuMax: start from a random subset of secants and add the worst violators each round.
    pub column_generation: bool,
    /// Iterations between full isometry checks (progress; FroMax / NILE-Pro stop as soon as the
    /// current rank-r iterate reaches δ).
    pub check_every: usize,
    /// NILE-Pro: ρ₁ (on `z = 𝒜(Ψ) − 1`) and ρ₂ (on `Z = Ψ`).
    pub rho: (f64, f64),
    /// NuMax / FroMax: β₁, β₂ and the dual step η.
    pub beta: (f64, f64),
    pub eta: f64,
    /// Seed of the column-generation subset.
    pub seed: u64,
    /// NuMax / FroMax clip `q` to `1 ± δ·(1 − margin)`, so that the final P, which meets the
    /// constraints only up to the ADMM tolerance, still reaches δ (0.01; 0 is the paper's).
    pub margin: f64,
    /// NuMax / FroMax: run the conjugate gradients' `𝒜*𝒜` in f32 (mixed precision; a faster
    /// variant, off by default).
    pub cg_f32: bool,
    /// Wall-time budget of the whole run in seconds: when it is spent, the solver stops at
    /// the next iteration and the run reports the best result so far (`Report::stopped`).
    pub time_limit: Option<f64>,
    /// When the time limit runs out (set by [`embed`] from `time_limit`).
    pub deadline: Option<Instant>,
}

impl EmbedOptions {
    pub fn new(method: Method, delta: f64) -> EmbedOptions {
        EmbedOptions {
            method,
            delta,
            rank: None,
            max_iter: 1000,
            tol: 1e-4,
            cg_steps: 10,
            column_generation: true,
            check_every: 10,
            rho: (0.01, 1.0),
            beta: (1.0, 1.0),
            eta: 1.618,
            seed: 0,
            margin: 0.01,
            cg_f32: false,
            time_limit: None,
            deadline: None,
        }
    }
}

impl EmbedOptions {
    /// Whether the time limit is spent.
    pub fn out_of_time(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

/// What a solver reports while it runs.
#[derive(Clone, Debug)]
pub struct Progress {
    /// e.g. "round 2 (1200 secants)" or "rank 14".
    pub stage: String,
    pub iteration: usize,
    pub max_iter: usize,
    /// The two relative primal residuals.
    pub residuals: (f64, f64),
    /// The isometry constant of the current iterate over all secants, when last measured.
    pub delta: Option<f64>,
    pub rank: usize,
}

/// A solver's result: Φ (rank × d, in the data's coordinates) and its report.
#[derive(Clone, Debug)]
pub struct Embedding {
    pub phi: Vec<f64>,
    pub rank: usize,
    pub dim: usize,
    pub report: Report,
}

/// One rank probe of FroMax or NILE-Pro.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Probe {
    pub rank: usize,
    pub iterations: usize,
    pub seconds: f64,
    /// The best isometry constant reached at this rank.
    pub delta: f64,
    pub reached: bool,
}

/// What a rank-r solve returns.
#[derive(Clone, Debug)]
pub struct RankOutcome {
    pub lowrank: operators::LowRank,
    pub isometry: Isometry,
    pub iterations: usize,
    pub converged: bool,
}

/// Runs `options.method` on `data`, JIT kernels from `jit`.
pub fn embed(
    data: &Dataset,
    options: &EmbedOptions,
    jit: &CpuJit,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Embedding> {
    let start = Instant::now();
    let mut options = options.clone();
    options.deadline = options
        .time_limit
        .map(|s| start + std::time::Duration::from_secs_f64(s.max(0.0)));
    let options = &options;
    let problem = Problem::new(data, jit)?;
    let pca = problem.pca_curve(problem.d);
    let pca_rank = problem::smallest_rank(&pca, options.delta).unwrap_or(problem.d);
    let mut report = Report::new(data, &problem, options, pca_rank, pca[pca_rank - 1].delta());
    let lowrank = match options.method {
        Method::Numax => numax::solve(&problem, options, jit, &mut report, progress)?,
        Method::Fromax | Method::NilePro => {
            let probe = |r: usize, report: &mut Report, progress: &mut dyn FnMut(&Progress)| {
                let t = Instant::now();
                let outcome = match options.method {
                    Method::Fromax => fromax::solve_rank(&problem, options, r, jit, progress)?,
                    _ => nile_pro::solve_rank(&problem, options, r, jit, progress)?,
                };
                report.iterations += outcome.iterations;
                report.probes.push(Probe {
                    rank: r,
                    iterations: outcome.iterations,
                    seconds: t.elapsed().as_secs_f64(),
                    delta: outcome.isometry.delta(),
                    reached: outcome.isometry.delta() <= options.delta * (1.0 + 1e-9),
                });
                anyhow::Ok(outcome)
            };
            rank_search(&problem, options, pca_rank, &mut report, progress, probe)?
        }
    };
    // measure, truncate where allowed, rescale, lift
    let curve = problem.truncation_curve(&lowrank);
    let rank = match (options.method, options.rank) {
        (Method::Numax, Some(r)) => r.min(lowrank.rank),
        (Method::Numax, None) => {
            problem::smallest_rank(&curve, options.delta).unwrap_or(lowrank.rank)
        }
        _ => lowrank.rank,
    };
    let (phi, isometry) = if rank == 0 {
        (Vec::new(), Isometry { min: 0.0, max: 0.0 })
    } else {
        let iso = curve[rank - 1];
        let reduced = lowrank.truncate(rank).phi(iso.scale().sqrt());
        (problem.lift(&reduced, rank), iso)
    };
    report.stopped_by_time_limit = options.out_of_time();
    report.finish(
        rank,
        &isometry,
        start.elapsed().as_secs_f64(),
        jit.compilations(),
    );
    Ok(Embedding {
        phi,
        rank,
        dim: problem.d_full,
        report,
    })
}

/// The smallest rank at which `probe` reaches δ: `options.rank` alone if given; otherwise
/// PCA's rank first (raised until reached, up to the dimension), then bisection below it.
fn rank_search(
    problem: &Problem,
    options: &EmbedOptions,
    pca_rank: usize,
    report: &mut Report,
    progress: &mut dyn FnMut(&Progress),
    mut probe: impl FnMut(usize, &mut Report, &mut dyn FnMut(&Progress)) -> Result<RankOutcome>,
) -> Result<operators::LowRank> {
    let reached = |o: &RankOutcome| o.isometry.delta() <= options.delta * (1.0 + 1e-9);
    if let Some(r) = options.rank {
        let outcome = probe(r.clamp(1, problem.d), report, progress)?;
        report.converged = outcome.converged;
        return Ok(outcome.lowrank);
    }
    let mut hi = pca_rank.clamp(1, problem.d);
    let mut best = probe(hi, report, progress)?;
    while !reached(&best) && hi < problem.d && !options.out_of_time() {
        hi = (hi * 2).min(problem.d);
        best = probe(hi, report, progress)?;
    }
    let mut lo = if reached(&best) { 1 } else { hi };
    while lo < hi && !options.out_of_time() {
        let mid = (lo + hi) / 2;
        let outcome = probe(mid, report, progress)?;
        if reached(&outcome) {
            hi = mid;
            best = outcome;
        } else {
            lo = mid + 1;
        }
    }
    report.converged = reached(&best);
    Ok(best.lowrank)
}
