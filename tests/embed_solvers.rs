//! The embedding solvers end to end: NuMax reaches δ = 0.2 on translating squares at a rank
//! well below PCA's (measured over all secants, PCA optimally rescaled); FroMax and NILE-Pro
//! produce embeddings whose reported δ is the measured one; kernels are compiled once per
//! problem, however many iterations run; `kiln embed` writes Φ and the report.
//!
//! The full δ sweep on squares and digits is the ignored `embedding_sweep` (run it with
//! `cargo test --release --test embed_solvers -- --ignored --nocapture`); its numbers are in
//! `bench/RESULTS.md`, as are those of the ignored `numax_time_per_iteration` (f64 and the
//! f32 CG variant) and `numax_rank_diagnosis_on_squares` (NuMax's convex optimum vs PCA).

use kiln::embed::cli::{embed_command, EmbedArgs};
use kiln::embed::{embed, translating_squares, Dataset, EmbedOptions, Method, Problem};
use kiln_runtime::cpu::CpuJit;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random_points(n: usize, d: usize, seed: u64) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Dataset {
        name: "random".into(),
        n,
        d,
        x: (0..n * d).map(|_| rng.random_range(-1.0..1.0)).collect(),
    }
}

/// Independent check of a Φ: `‖Φv‖²` over every secant, by explicit secants.
fn measured_delta(data: &Dataset, phi: &[f64], rank: usize) -> f64 {
    let d = data.d;
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for i in 0..data.n {
        for j in i + 1..data.n {
            let v: Vec<f64> = (0..d)
                .map(|k| data.x[i * d + k] - data.x[j * d + k])
                .collect();
            let norm2: f64 = v.iter().map(|e| e * e).sum();
            let image: f64 = (0..rank)
                .map(|t| (0..d).map(|k| phi[t * d + k] * v[k]).sum::<f64>().powi(2))
                .sum();
            lo = lo.min(image / norm2);
            hi = hi.max(image / norm2);
        }
    }
    (1.0 - lo).max(hi - 1.0)
}

#[test]
fn kernels_are_compiled_once_per_problem() {
    let jit = CpuJit::new().unwrap();
    let data = random_points(12, 5, 1);
    for method in [Method::Numax, Method::Fromax, Method::NilePro] {
        let mut options = EmbedOptions::new(method, 0.3);
        options.rank = Some(3);
        options.max_iter = 5;
        options.tol = 0.0;
        embed(&data, &options, &jit, &mut |_| {}).unwrap();
        let after_short = jit.compilations();
        options.max_iter = 40;
        let long = embed(&data, &options, &jit, &mut |_| {}).unwrap();
        assert!(long.report.iterations > 5);
        assert_eq!(
            jit.compilations(),
            after_short,
            "{method:?}: more iterations compiled more"
        );
        // a different problem size reuses every kernel too: specs carry no sizes
        embed(&random_points(9, 7, 2), &options, &jit, &mut |_| {}).unwrap();
        assert_eq!(
            jit.compilations(),
            after_short,
            "{method:?}: a new size compiled more"
        );
    }
    assert!(jit.compilations() <= 20, "{} kernels", jit.compilations());
}

#[test]
fn numax_beats_pca_on_translating_squares() {
    let data = translating_squares();
    let jit = CpuJit::global().unwrap();
    let problem = Problem::new(&data, jit).unwrap();
    assert_eq!(
        problem.d, 80,
        "81 squares span 80 dimensions after centring"
    );
    // δ = 0.2: at δ = 0.4 NuMax's rank (16) is *not* below optimally rescaled PCA's (15) —
    // the convex optimum itself has rank 16 there (`numax_rank_diagnosis_on_squares`,
    // bench/RESULTS.md); from δ = 0.3 down it is well below
    let options = EmbedOptions::new(Method::Numax, 0.2);
    let result = embed(&data, &options, jit, &mut |_| {}).unwrap();
    let r = &result.report;
    eprintln!(
        "NuMax δ=0.2: rank {} (P rank {:?}), PCA rank {}, δ {:.4}, {} iterations, {} rounds, {:.1} s",
        r.rank, r.numerical_rank, r.pca_rank, r.delta, r.iterations, r.rounds.unwrap_or(0), r.seconds
    );
    // the clip's 1% margin covers the ADMM tolerance, and column generation adds every
    // inactive secant beyond δ, so the reported embedding meets δ itself
    assert!(r.reached && r.delta <= 0.2, "δ {} above 0.2", r.delta);
    let measured = measured_delta(&data, &result.phi, result.rank);
    assert!(
        (measured - r.delta).abs() < 1e-9,
        "report {} vs measured {measured}",
        r.delta
    );
    assert!(
        r.rank * 4 <= r.pca_rank * 3,
        "rank {} vs PCA {}",
        r.rank,
        r.pca_rank
    );
}

#[test]
fn fromax_and_nile_pro_report_the_measured_delta() {
    let data = random_points(20, 6, 3);
    let jit = CpuJit::global().unwrap();
    for method in [Method::Fromax, Method::NilePro] {
        let mut options = EmbedOptions::new(method, 0.5);
        options.max_iter = 200;
        let result = embed(&data, &options, jit, &mut |_| {}).unwrap();
        let r = &result.report;
        let measured = measured_delta(&data, &result.phi, result.rank);
        assert!(
            (measured - r.delta).abs() < 1e-9,
            "{method:?}: {} vs {measured}",
            r.delta
        );
        assert!(r.reached, "{method:?}: {r:?}");
        if method == Method::NilePro {
            // its PCA warm start is among the iterates it may return
            assert!(r.rank <= r.pca_rank, "{r:?}");
        }
        assert!(!r.probes.is_empty());
    }
}

/// A spent time limit stops every solver at once: the report says so, and the Φ it writes
/// is the measured best so far (its δ is the δ over all secants). A run without the limit
/// on the same problem iterates more and does not say it was stopped.
#[test]
fn a_spent_time_limit_stops_and_reports_the_best_so_far() {
    let data = random_points(30, 8, 5);
    let jit = CpuJit::global().unwrap();
    for method in [Method::Numax, Method::Fromax, Method::NilePro] {
        let mut options = EmbedOptions::new(method, 0.05);
        options.max_iter = 300;
        let free = embed(&data, &options, jit, &mut |_| {}).unwrap().report;
        assert!(!free.stopped_by_time_limit, "{method:?}");
        options.time_limit = Some(1e-9);
        let stopped = embed(&data, &options, jit, &mut |_| {}).unwrap();
        let r = &stopped.report;
        assert!(r.stopped_by_time_limit, "{method:?}: {r:?}");
        assert!(
            r.iterations < free.iterations.max(1),
            "{method:?}: {} iterations with the limit, {} without",
            r.iterations,
            free.iterations
        );
        if stopped.rank > 0 {
            let measured = measured_delta(&data, &stopped.phi, stopped.rank);
            assert!(
                (measured - r.delta).abs() < 1e-9,
                "{method:?}: {measured} vs {}",
                r.delta
            );
        }
    }
}

#[test]
fn embed_command_writes_phi_and_report() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("points.csv");
    let data = random_points(10, 4, 4);
    let text: String = (0..data.n)
        .map(|i| {
            let row: Vec<String> = data.x[i * 4..(i + 1) * 4]
                .iter()
                .map(|v| v.to_string())
                .collect();
            row.join(",") + "\n"
        })
        .collect();
    std::fs::write(&csv, text).unwrap();
    let (phi, report) = (dir.path().join("phi.csv"), dir.path().join("report.json"));
    embed_command(EmbedArgs {
        data: csv.display().to_string(),
        limit: None,
        method: Method::NilePro,
        delta: 0.3,
        rank: Some(2),
        max_iter: 20,
        tol: 1e-4,
        no_column_generation: false,
        cg_f32: false,
        seed: 0,
        time_limit: None,
        output: Some(phi.clone()),
        report: Some(report.clone()),
        quiet: true,
    })
    .unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["rank"], 2);
    assert_eq!(json["method"], "nile-pro");
    for key in ["delta_min", "delta_max", "iterations", "seconds"] {
        assert!(json[key].is_number(), "{key}");
    }
    let phi_text = std::fs::read_to_string(&phi).unwrap();
    assert_eq!(phi_text.lines().count(), 2);
    assert!(phi_text.lines().all(|l| l.split(',').count() == 4));
}

/// The δ sweep of bench/RESULTS.md (slow: release build).
#[test]
#[ignore]
fn embedding_sweep() {
    let jit = CpuJit::global().unwrap();
    let digits = kiln::embed::load_csv(std::path::Path::new("tests/data/digits.csv")).unwrap();
    for data in [translating_squares(), digits.first(500)] {
        for delta in [0.4, 0.3, 0.2, 0.1] {
            for method in [Method::Numax, Method::Fromax, Method::NilePro] {
                let mut options = EmbedOptions::new(method, delta);
                if method != Method::Numax {
                    // per rank probe; the bisection runs several
                    options.max_iter = 300;
                }
                let r = embed(&data, &options, jit, &mut |_| {}).unwrap().report;
                println!(
                    "| {} | {delta} | {} | {} | {} | {:.4} | {} | {:.2} | {} |",
                    data.name,
                    method.name(),
                    r.rank,
                    r.pca_rank,
                    r.delta,
                    r.iterations,
                    r.seconds,
                    r.reached
                );
            }
        }
    }
}

/// Time per NuMax iteration (every secant active, as `bench/numax_numpy.py`), in release.
#[test]
#[ignore]
fn numax_time_per_iteration() {
    use kiln::embed::numax::{ConvexAdmm, PStep};
    let jit = CpuJit::global().unwrap();
    let digits = kiln::embed::load_csv(std::path::Path::new("tests/data/digits.csv")).unwrap();
    for data in [translating_squares(), digits.first(500), digits.clone()] {
        let problem = Problem::new(&data, jit).unwrap();
        for cg_f32 in [false, true] {
            let mut options = EmbedOptions::new(Method::Numax, 0.2);
            options.cg_f32 = cg_f32;
            let mut admm =
                ConvexAdmm::new(&problem, &options, PStep::SoftThreshold(1.0), None, jit).unwrap();
            for _ in 0..3 {
                admm.step().unwrap();
            }
            let iters = if data.n > 1000 { 10 } else { 30 };
            let mut times = Vec::new();
            for _ in 0..iters {
                let t = std::time::Instant::now();
                admm.step().unwrap();
                times.push(t.elapsed().as_secs_f64());
            }
            times.sort_by(f64::total_cmp);
            println!(
                "{}{}: n={} d={} median {:.3} ms/iter, min {:.3} ms",
                data.name,
                if cg_f32 { " (f32 CG operator)" } else { "" },
                problem.n,
                problem.d,
                times[iters / 2] * 1e3,
                times[0] * 1e3
            );
        }
    }
}

/// Diagnosis of NuMax's rank on translating squares (bench/RESULTS.md): every secant active,
/// tight tolerance, no margin; prints P's spectrum, the smallest optimally rescaled truncation
/// that reaches δ, and PCA's rank with and without the optimal rescale.
#[test]
#[ignore]
fn numax_rank_diagnosis_on_squares() {
    use kiln::embed::numax::{ConvexAdmm, PStep};
    use kiln::embed::problem::smallest_rank;
    let jit = CpuJit::global().unwrap();
    let data = translating_squares();
    let problem = Problem::new(&data, jit).unwrap();
    let pca = problem.pca_curve(problem.d);
    for delta in [0.4, 0.3, 0.2, 0.1] {
        for (tol, margin) in [(1e-4, 0.01), (1e-6, 0.0), (1e-7, 0.0)] {
            let mut options = EmbedOptions::new(Method::Numax, delta);
            options.tol = tol;
            options.margin = margin;
            let mut admm =
                ConvexAdmm::new(&problem, &options, PStep::SoftThreshold(1.0), None, jit).unwrap();
            let mut iterations = 0;
            while iterations < 20000 {
                let r = admm.step().unwrap();
                iterations += 1;
                if r.0 < tol && r.1 < tol {
                    break;
                }
            }
            let p = admm.lowrank.clone();
            let curve = problem.truncation_curve(&p);
            let trace: f64 = p.values.iter().sum();
            let iso = admm.measure().unwrap();
            println!(
                "δ {delta} tol {tol:e} margin {margin}: {iterations} it, tr P {trace:.4}, \
                 P rank {}, P δ(unscaled) {:.4}, truncated rank {:?}, eigenvalues {:?}",
                p.rank,
                (1.0 - iso.min).max(iso.max - 1.0),
                smallest_rank(&curve, delta),
                p.values
                    .iter()
                    .map(|v| (v * 1e4).round() / 1e4)
                    .collect::<Vec<_>>()
            );
        }
        // PCA: optimal rescale vs the plain projection (‖Pv‖² ≤ 1, δ = 1 − min)
        let plain = pca.iter().position(|i| 1.0 - i.min <= delta).map(|p| p + 1);
        println!(
            "δ {delta}: PCA rank {:?} (optimal rescale), {plain:?} (plain projection)",
            smallest_rank(&pca, delta)
        );
    }
}

/// With a clip margin smaller than the slack of the ℓ2 stopping rule, P misses δ on a few
/// secants after converging; polishing tightens the tolerance until it meets δ.
#[test]
fn numax_polishes_until_delta_is_met() {
    let data = translating_squares();
    let jit = CpuJit::global().unwrap();
    let mut options = EmbedOptions::new(Method::Numax, 0.2);
    options.margin = 0.002;
    options.max_iter = 3000;
    let result = embed(&data, &options, jit, &mut |_| {}).unwrap();
    let r = &result.report;
    eprintln!(
        "margin 0.002: δ {:.5}, final tol {:?}, {} iterations, {} rounds",
        r.delta,
        r.final_tol,
        r.iterations,
        r.rounds.unwrap_or(0)
    );
    assert!(r.converged);
    // polishing runs only when the converged P missed δ
    assert!(r.final_tol.unwrap() < options.tol, "no polishing happened");
    assert!(r.reached && r.delta <= 0.2, "δ {} above 0.2", r.delta);
}
