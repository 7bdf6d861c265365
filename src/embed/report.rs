//! The JSON report of an embedding run and Φ as CSV. Owns only their shape and text.

use super::data::Dataset;
use super::problem::{Isometry, Problem};
use super::{EmbedOptions, Probe};
use serde::Serialize;

/// What `kiln embed --report` writes.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub method: String,
    pub data: String,
    pub points: usize,
    pub dim: usize,
    /// Dimension of the span of the centred points (where the solvers work).
    pub reduced_dim: usize,
    pub secants: usize,
    pub target_delta: f64,
    /// Achieved isometry constant over all secants: max(delta_min, delta_max).
    pub delta: f64,
    /// `1 − min ‖Φv‖²` over all secants.
    pub delta_min: f64,
    /// `max ‖Φv‖² − 1` over all secants.
    pub delta_max: f64,
    /// The optimal rescale applied to `‖Φv‖²` (Φ is multiplied by its square root).
    pub scale: f64,
    pub rank: usize,
    /// Whether the target δ was reached.
    pub reached: bool,
    pub iterations: usize,
    pub seconds: f64,
    /// Whether the last ADMM run met the residual tolerance (NuMax) / the rank search ended at
    /// a rank that reaches δ (FroMax, NILE-Pro).
    pub converged: bool,
    /// PCA's smallest rank for the same δ and its isometry constant at that rank.
    pub pca_rank: usize,
    pub pca_delta: f64,
    /// NuMax: the rank of P (positive eigenvalues) before truncation.
    pub numerical_rank: Option<usize>,
    /// NuMax: secants in the final active set and column-generation rounds.
    pub active_secants: Option<usize>,
    pub rounds: Option<usize>,
    /// FroMax / NILE-Pro: every rank tried.
    pub probes: Vec<Probe>,
    pub max_iter: usize,
    pub tol: f64,
    /// NuMax: the tolerance at the end, below `tol` where polishing tightened it because P
    /// missed δ after converging.
    pub final_tol: Option<f64>,
    /// Kernels the JIT compiled (the whole process's cache).
    pub compilations: usize,
    pub threads: usize,
    /// The run stopped because `--time-limit` was spent; rank and δ are the best so far.
    pub stopped_by_time_limit: bool,
}

impl Report {
    pub(crate) fn new(
        data: &Dataset,
        problem: &Problem,
        options: &EmbedOptions,
        pca_rank: usize,
        pca_delta: f64,
    ) -> Report {
        Report {
            method: options.method.name().into(),
            data: data.name.clone(),
            points: problem.n,
            dim: problem.d_full,
            reduced_dim: problem.d,
            secants: problem.secants(),
            target_delta: options.delta,
            delta: f64::NAN,
            delta_min: f64::NAN,
            delta_max: f64::NAN,
            scale: 1.0,
            rank: 0,
            reached: false,
            iterations: 0,
            seconds: 0.0,
            converged: false,
            pca_rank,
            pca_delta,
            numerical_rank: None,
            active_secants: None,
            rounds: None,
            probes: Vec::new(),
            max_iter: options.max_iter,
            tol: options.tol,
            final_tol: None,
            compilations: 0,
            threads: rayon_threads(),
            stopped_by_time_limit: false,
        }
    }

    pub(crate) fn finish(
        &mut self,
        rank: usize,
        iso: &Isometry,
        seconds: f64,
        compilations: usize,
    ) {
        let scale = iso.scale();
        let (lo, hi) = iso.deltas_at(scale);
        self.rank = rank;
        self.scale = scale;
        self.delta_min = lo;
        self.delta_max = hi;
        self.delta = lo.max(hi);
        self.reached = self.delta <= self.target_delta * (1.0 + 1e-9);
        self.seconds = seconds;
        self.compilations = compilations;
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("reports serialise") + "\n"
    }
}

fn rayon_threads() -> usize {
    kiln_runtime::cpu::Parallelism::Rayon.threads()
}

/// Φ (rank × dim, row-major) as CSV, one row of Φ a line, shortest round-trip floats.
pub fn phi_csv(phi: &[f64], rank: usize, dim: usize) -> String {
    let mut out = String::with_capacity(rank * dim * 12);
    for t in 0..rank {
        let row: Vec<String> = phi[t * dim..(t + 1) * dim]
            .iter()
            .map(|v| format!("{v}"))
            .collect();
        out.push_str(&row.join(","));
        out.push('\n');
    }
    out
}
