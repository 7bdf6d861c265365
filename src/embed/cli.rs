//! `kiln embed`: arguments, a progress bar, and the atomic writes of Φ and the report. No
//! solver logic (that is [`embed`](super::embed)).

use super::{
    embed, load_csv, report::phi_csv, translating_squares, EmbedOptions, Method, Progress,
};
use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_runtime::cpu::CpuJit;
use std::path::PathBuf;

/// Learn a near-isometric linear embedding Φ of a point set (NuMax, FroMax or NILE-Pro on
/// JIT-compiled CPU kernels).
#[derive(clap::Args, Debug)]
pub struct EmbedArgs {
    /// Points: a CSV file (one point a row; a header line and a `label` column are skipped)
    /// or `translating-squares` (81 16×16 images of an 8×8 square, d = 256).
    #[arg(long)]
    pub data: String,
    /// Use only the first N points.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Solver.
    #[arg(long, value_enum, default_value = "numax")]
    pub method: Method,
    /// Target isometry constant δ: |‖Φv‖² − 1| ≤ δ for every secant v.
    #[arg(long, default_value_t = 0.1)]
    pub delta: f64,
    /// Fixed rank (FroMax, NILE-Pro: skip the rank search; NuMax: truncate Φ).
    #[arg(long)]
    pub rank: Option<usize>,
    /// Iteration cap (NuMax: the whole run; FroMax, NILE-Pro: each rank probe).
    #[arg(long, default_value_t = 1000)]
    pub max_iter: usize,
    /// Relative-residual tolerance (NuMax divides it by 10, at most three times, while the
    /// converged Φ still misses δ; the report's `final_tol` says where it ended).
    #[arg(long, default_value_t = 1e-4)]
    pub tol: f64,
    /// NuMax: use every secant from the start instead of column generation.
    #[arg(long)]
    pub no_column_generation: bool,
    /// NuMax / FroMax: conjugate-gradient operator in f32 (mixed precision, faster).
    #[arg(long)]
    pub cg_f32: bool,
    /// Seed of the column-generation subset.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop after this many seconds and report the best result so far (the report says
    /// `stopped_by_time_limit`; FroMax / NILE-Pro: the smallest rank that reached δ so far,
    /// else the last probe).
    #[arg(long, value_name = "SECONDS")]
    pub time_limit: Option<f64>,
    /// Write Φ (rank × d) as CSV here.
    #[arg(short = 'o', long)]
    pub output: Option<PathBuf>,
    /// Write the JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Runs `kiln embed`: prints a one-line summary, writes Φ and the report atomically.
pub fn embed_command(args: EmbedArgs) -> Result<()> {
    if !(args.delta > 0.0 && args.delta < 1.0) {
        bail!("--delta {} must lie in (0, 1)", args.delta);
    }
    if args.time_limit.is_some_and(|s| !(s > 0.0 && s.is_finite())) {
        bail!("--time-limit must be a positive number of seconds");
    }
    if args.max_iter == 0 {
        bail!("--max-iter must be positive");
    }
    let mut data = if args.data == "translating-squares" {
        translating_squares()
    } else {
        load_csv(std::path::Path::new(&args.data))?
    };
    if let Some(limit) = args.limit {
        if limit < 2 {
            bail!("--limit {limit}: at least 2 points are needed");
        }
        data = data.first(limit);
    }
    let mut options = EmbedOptions::new(args.method, args.delta);
    options.rank = args.rank;
    options.max_iter = args.max_iter;
    options.time_limit = args.time_limit;
    options.tol = args.tol;
    options.column_generation = !args.no_column_generation;
    options.seed = args.seed;
    options.cg_f32 = args.cg_f32;

    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(args.max_iter as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut on_progress = |p: &Progress| {
        if p.iteration == 1 {
            bar.set_length(p.max_iter as u64);
        }
        bar.set_position(p.iteration.min(p.max_iter) as u64);
        let delta = p.delta.map_or("-".to_string(), |d| format!("{d:.4}"));
        bar.set_message(format!(
            "{} · res {:.1e}/{:.1e} · δ {delta} · rank {}",
            p.stage, p.residuals.0, p.residuals.1, p.rank
        ));
    };
    let jit = CpuJit::global()?;
    let result = embed(&data, &options, jit, &mut on_progress)?;
    bar.finish_and_clear();
    let r = &result.report;
    println!(
        "{} on {} ({} points, d = {}): rank {} at δ = {:.4} (target {}, {}), PCA rank {}; {} iterations, {:.2} s{}",
        r.method,
        r.data,
        r.points,
        r.dim,
        r.rank,
        r.delta,
        r.target_delta,
        if r.reached { "reached" } else { "not reached" },
        r.pca_rank,
        r.iterations,
        r.seconds,
        if r.stopped_by_time_limit {
            " (stopped by --time-limit: best so far)"
        } else {
            ""
        }
    );
    if let Some(path) = &args.output {
        crate::write_atomically(
            path,
            phi_csv(&result.phi, result.rank, result.dim).as_bytes(),
        )?;
    }
    if let Some(path) = &args.report {
        crate::write_atomically(path, r.to_json().as_bytes())?;
    }
    Ok(())
}
