//! JIT RMSNorm kernels (plain and with the fused residual add) against the reference
//! interpreter's `Op::RmsNorm` / `Op::AddRmsNorm` (`kiln_ir::interp::eval` on a one-node
//! graph), on fresh random rows of very different magnitudes, hidden sizes around the vector
//! width (4·k + 3 for the scalar tail), one row and many, every unroll, outputs poisoned with
//! NaN; Sequential and Rayon (several pool sizes) bit-identical; operand errors.
//!
//! Error measure: per element, `|out − ref| / |ref|` (an exact-zero reference needs an exact
//! zero). The kernel sums squares in f32, the interpreter in f64; nothing cancels (every
//! output is a product), so the per-element relative error is meaningful.

use kiln_codegen::cpu::RmsNormSpec;
use kiln_ir::dtype::DType;
use kiln_ir::graph::{Node, TensorType};
use kiln_ir::interp;
use kiln_ir::op::Op;
use kiln_ir::shape::{Bindings, Shape};
use kiln_ir::tensor::Tensor;
use kiln_runtime::cpu::{CpuJit, Parallelism, RmsNormKernel};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const TOL: f64 = 1e-5;
const EPS: f32 = 1e-6;
const HIDDEN: [usize; 12] = [1, 2, 3, 4, 5, 7, 8, 15, 35, 67, 1027, 4099];

fn jit() -> &'static CpuJit {
    CpuJit::global().expect("host JIT")
}

/// The interpreter's results of one node on f32 tensors.
fn interpret(op: Op, operands: &[Tensor], results: usize) -> Vec<Tensor> {
    let node = Node {
        op,
        inputs: Vec::new(),
        outputs: vec![TensorType::new(DType::F32, Shape::default()); results],
        label: "test".to_string(),
        layer: None,
    };
    let refs: Vec<&Tensor> = operands.iter().collect();
    interp::eval(&node, &refs, &Bindings::new()).expect("interpreter")
}

fn tensor(shape: &[usize], data: &[f32]) -> Tensor {
    Tensor::new(DType::F32, shape, data.to_vec()).unwrap()
}

/// `rows × hidden` values, each row with its own magnitude `10^u`, `u` uniform in
/// `[-4, 4]`; row 1 (if any) is all zeros and row 2 (if any) has one spike 10⁴ times its
/// other elements.
fn planted_rows(rng: &mut ChaCha8Rng, rows: usize, hidden: usize) -> Vec<f32> {
    let mut data = Vec::with_capacity(rows * hidden);
    for r in 0..rows {
        let scale = 10f64.powf(rng.random_range(-4.0..4.0));
        for i in 0..hidden {
            let v = match r {
                1 => 0.0,
                2 if i == hidden / 2 => scale * 1e4,
                _ => scale * rng.random_range(-1.0..1.0),
            };
            data.push(v as f32);
        }
    }
    data
}

fn relative_error(got: f32, want: f32) -> f64 {
    if got == want {
        0.0
    } else {
        (f64::from(got) - f64::from(want)).abs() / f64::from(want).abs().max(f64::MIN_POSITIVE)
    }
}

/// Asserts `got` is within `TOL` of `want` element by element; returns the largest error.
fn check(got: &[f32], want: &[f32], what: &str) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}");
    let mut worst = 0.0f64;
    for (e, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = relative_error(g, w);
        assert!(
            err <= TOL,
            "{what}: element {e}: {g} vs {w} (relative {err:e})"
        );
        worst = worst.max(err);
    }
    worst
}

/// Planted `x` and `residual` rows of `hidden` and a random weight, drawn in that order.
fn operands(rng: &mut ChaCha8Rng, rows: usize, hidden: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let x = planted_rows(rng, rows, hidden);
    let residual = planted_rows(rng, rows, hidden);
    let weight: Vec<f32> = (0..hidden).map(|_| rng.random_range(-2.0..2.0)).collect();
    (x, residual, weight)
}

/// `fused` (with the residual) on NaN-poisoned outputs: `(x + residual, norm)`.
fn run_fused(
    fused: &RmsNormKernel,
    [x, residual, weight]: [&[f32]; 3],
    rows: usize,
    parallelism: Parallelism,
) -> (Vec<f32>, Vec<f32>) {
    let mut sum = vec![f32::NAN; x.len()];
    let mut out = vec![f32::NAN; x.len()];
    fused
        .run_residual(
            x,
            residual,
            weight,
            &mut sum,
            &mut out,
            rows,
            EPS,
            parallelism,
        )
        .unwrap();
    (sum, out)
}

/// Runs one plain and one fused norm of `rows × hidden` with `kernel`s and checks both against
/// the interpreter; returns the largest relative error.
fn check_case(
    rng: &mut ChaCha8Rng,
    plain: &RmsNormKernel,
    fused: &RmsNormKernel,
    rows: usize,
    hidden: usize,
    parallelism: Parallelism,
) -> f64 {
    let what = format!("rows {rows} hidden {hidden} unroll {}", plain.spec().unroll);
    let (x, residual, weight) = operands(rng, rows, hidden);
    let (xt, rt, wt) = (
        tensor(&[rows, hidden], &x),
        tensor(&[rows, hidden], &residual),
        tensor(&[hidden], &weight),
    );

    let mut out = vec![f32::NAN; rows * hidden];
    plain
        .run(&x, &weight, &mut out, rows, EPS, parallelism)
        .unwrap();
    let want = interpret(Op::RmsNorm { eps: EPS }, &[xt.clone(), wt.clone()], 1);
    let mut worst = check(&out, &want[0].data, &format!("plain {what}"));

    let (sum, out) = run_fused(fused, [&x, &residual, &weight], rows, parallelism);
    let want = interpret(Op::AddRmsNorm { eps: EPS }, &[xt, rt, wt], 2);
    // the sum is one f32 addition on both sides: bit-identical
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&sum), bits(&want[0].data), "fused sum {what}");
    worst = worst.max(check(&out, &want[1].data, &format!("fused {what}")));
    worst
}

#[test]
fn matches_the_interpreter_for_every_unroll_and_size() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut worst = 0.0f64;
    for unroll in [1, 2, 3, 4, 8] {
        let plain = jit()
            .rms_norm(RmsNormSpec::new().with_unroll(unroll))
            .unwrap();
        let fused = jit()
            .rms_norm(RmsNormSpec::new().with_residual(true).with_unroll(unroll))
            .unwrap();
        for hidden in HIDDEN {
            for rows in [1, 3, 17] {
                let e = check_case(&mut rng, &plain, &fused, rows, hidden, Parallelism::Rayon);
                worst = worst.max(e);
            }
        }
    }
    eprintln!("rms_norm: largest relative error vs the interpreter {worst:e}");
}

#[test]
fn many_rows_split_into_tasks_match_the_interpreter() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let plain = jit().rms_norm(RmsNormSpec::new()).unwrap();
    let fused = jit()
        .rms_norm(RmsNormSpec::new().with_residual(true))
        .unwrap();
    // 1027 → 15 rows per task, 4099 → 3, 67 → 244: several tasks and a short last one
    for (rows, hidden) in [(100, 1027), (20, 4099), (600, 67)] {
        assert!(rows > RmsNormKernel::rows_per_task(hidden));
        let e = check_case(&mut rng, &plain, &fused, rows, hidden, Parallelism::Rayon);
        eprintln!("rms_norm {rows}×{hidden}: largest relative error {e:e}");
    }
}

#[test]
fn the_fmul_fadd_path_of_hosts_without_fma_matches_too() {
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    let jit = CpuJit::with_fma(false).unwrap();
    let plain = jit.rms_norm(RmsNormSpec::new()).unwrap();
    let fused = jit
        .rms_norm(RmsNormSpec::new().with_residual(true))
        .unwrap();
    for (rows, hidden) in [(1, 3), (9, 67), (30, 1027)] {
        check_case(&mut rng, &plain, &fused, rows, hidden, Parallelism::Rayon);
    }
}

#[test]
fn results_do_not_depend_on_the_parallelism() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let fused = jit()
        .rms_norm(RmsNormSpec::new().with_residual(true))
        .unwrap();
    let (rows, hidden) = (97, 1031);
    let (x, residual, weight) = operands(&mut rng, rows, hidden);
    let run = |parallelism| {
        let (sum, out) = run_fused(&fused, [&x, &residual, &weight], rows, parallelism);
        sum.iter()
            .chain(&out)
            .map(|v| v.to_bits())
            .collect::<Vec<u32>>()
    };
    let sequential = run(Parallelism::Sequential);
    for threads in [1, 2, 3, 8] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        assert_eq!(
            pool.install(|| run(Parallelism::Rayon)),
            sequential,
            "{threads} threads"
        );
    }
}

#[test]
fn empty_operands_are_a_no_op() {
    let plain = jit().rms_norm(RmsNormSpec::new()).unwrap();
    plain
        .run(&[], &[1.0; 8], &mut [], 0, EPS, Parallelism::Rayon)
        .unwrap();
    plain
        .run(&[], &[], &mut [], 5, EPS, Parallelism::Rayon)
        .unwrap();
}

#[test]
fn operand_mismatches_are_errors_naming_the_operand_and_write_nothing() {
    let plain = jit().rms_norm(RmsNormSpec::new()).unwrap();
    let fused = jit()
        .rms_norm(RmsNormSpec::new().with_residual(true))
        .unwrap();
    let (rows, hidden) = (3, 7);
    let x = vec![1.0f32; rows * hidden];
    let weight = vec![1.0f32; hidden];
    let mut out = vec![f32::NAN; rows * hidden];
    let mut sum = vec![f32::NAN; rows * hidden];
    let par = Parallelism::Rayon;
    let message = |r: Result<(), kiln_runtime::cpu::CpuError>| r.unwrap_err().to_string();

    let m = message(plain.run(&x[1..], &weight, &mut out, rows, EPS, par));
    assert!(m.contains("`x`") && m.contains("length 20"), "{m}");
    let m = message(plain.run(&x, &weight[1..], &mut out, rows, EPS, par));
    assert!(m.contains("`x`") && m.contains("hidden 6"), "{m}");
    let m = message(plain.run(&x, &weight, &mut out[1..], rows, EPS, par));
    assert!(m.contains("`out`"), "{m}");
    let m = message(plain.run(&x, &weight, &mut out, rows + 1, EPS, par));
    assert!(m.contains("`x`"), "{m}");
    for eps in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let m = message(plain.run(&x, &weight, &mut out, rows, eps, par));
        assert!(m.contains("`eps`"), "{m}");
    }
    let m = message(fused.run(&x, &weight, &mut out, rows, EPS, par));
    assert!(
        m.contains("`residual`") && m.contains("run_residual"),
        "{m}"
    );
    let m = message(plain.run_residual(&x, &x, &weight, &mut sum, &mut out, rows, EPS, par));
    assert!(m.contains("`residual`") && m.contains("without"), "{m}");
    let m = message(fused.run_residual(&x, &x[2..], &weight, &mut sum, &mut out, rows, EPS, par));
    assert!(m.contains("`residual`") && m.contains("length 19"), "{m}");
    let m = message(fused.run_residual(&x, &x, &weight, &mut sum[2..], &mut out, rows, EPS, par));
    assert!(m.contains("`residual_out`"), "{m}");
    let m = message(fused.run_residual(&x, &x, &weight, &mut sum, &mut out[..0], rows, EPS, par));
    assert!(m.contains("`out`"), "{m}");
    assert!(out.iter().chain(&sum).all(|v| v.is_nan()), "an error wrote");
}
