//! JIT elementwise maps against `Expr::evaluate` (the reference), on lengths around the vector
//! width, for every operation, both precisions, bf16 inputs, every unroll, threads, and errors.

use half::bf16;
use kiln_codegen::cpu::{ElemType, ElementFormat, MapSpec};
use kiln_codegen::expr::{BinaryOp, Expr, UnaryOp};
use kiln_runtime::cpu::{CpuJit, Parallelism};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const LENGTHS: [usize; 11] = [0, 1, 2, 3, 4, 5, 7, 17, 33, 1000, 4099];
const TOL_F64: f64 = 1e-12;
const TOL_F32: f64 = 1e-5;

fn jit() -> &'static CpuJit {
    CpuJit::global().expect("host JIT")
}

/// Relative error, with an exact-zero reference requiring an exact zero.
fn relative_error(got: f64, want: f64) -> f64 {
    if got == want || (got.is_nan() && want.is_nan()) {
        0.0
    } else {
        (got - want).abs() / want.abs().max(f64::MIN_POSITIVE)
    }
}

/// Input domain of an operand: magnitudes in `[lo, hi]`, negative too if `signed`.
#[derive(Clone, Copy)]
struct Domain {
    lo: f64,
    hi: f64,
    signed: bool,
}

const ANY: Domain = Domain {
    lo: 0.0,
    hi: 4.0,
    signed: true,
};
const POSITIVE: Domain = Domain {
    lo: 1e-3,
    hi: 1e3,
    signed: false,
};
const NONZERO: Domain = Domain {
    lo: 0.25,
    hi: 4.0,
    signed: true,
};
const EXP_RANGE: Domain = Domain {
    lo: 0.0,
    hi: 80.0,
    signed: true,
};

fn sample(rng: &mut ChaCha8Rng, d: Domain, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let m = rng.random_range(d.lo..=d.hi);
            if d.signed && rng.random_bool(0.5) {
                -m
            } else {
                m
            }
        })
        .collect()
}

/// Runs `expr` as an f64 and an f32 map at every length and checks it against the reference.
fn check_expr(rng: &mut ChaCha8Rng, expr: &Expr, domains: &[Domain], unroll: u32) {
    let arity = domains.len();
    for &len in &LENGTHS {
        let inputs: Vec<Vec<f64>> = domains.iter().map(|&d| sample(rng, d, len)).collect();

        // f64
        let kernel = jit()
            .map(MapSpec::new(expr.clone(), arity, ElemType::F64).with_unroll(unroll))
            .unwrap();
        let slices: Vec<&[f64]> = inputs.iter().map(Vec::as_slice).collect();
        let mut out = vec![f64::NAN; len];
        kernel.run(&slices, &mut out, Parallelism::Rayon).unwrap();
        for (i, &got) in out.iter().enumerate() {
            let args: Vec<f64> = inputs.iter().map(|x| x[i]).collect();
            let want = expr.evaluate(&args);
            let err = relative_error(got, want);
            assert!(
                err <= TOL_F64,
                "f64 {expr:?} at {args:?}: {got} vs {want} (rel {err:e}), len {len}"
            );
        }

        // f32: inputs rounded to f32, reference evaluated in f64 on the rounded inputs
        let inputs32: Vec<Vec<f32>> = inputs
            .iter()
            .map(|x| x.iter().map(|&v| v as f32).collect())
            .collect();
        let kernel = jit()
            .map(MapSpec::new(expr.clone(), arity, ElemType::F32).with_unroll(unroll))
            .unwrap();
        let slices: Vec<&[f32]> = inputs32.iter().map(Vec::as_slice).collect();
        let mut out = vec![f32::NAN; len];
        kernel.run(&slices, &mut out, Parallelism::Rayon).unwrap();
        for (i, &got) in out.iter().enumerate() {
            let args: Vec<f64> = inputs32.iter().map(|x| f64::from(x[i])).collect();
            let want = expr.evaluate(&args);
            let err = relative_error(f64::from(got), want);
            assert!(
                err <= TOL_F32,
                "f32 {expr:?} at {args:?}: {got} vs {want} (rel {err:e}), len {len}"
            );
        }
    }
}

#[test]
fn every_unary_op_matches_the_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let cases = [
        (UnaryOp::Neg, ANY),
        (UnaryOp::Abs, ANY),
        (UnaryOp::Exp, EXP_RANGE),
        (UnaryOp::Sqrt, POSITIVE),
        (UnaryOp::Rsqrt, POSITIVE),
        (UnaryOp::Recip, NONZERO),
        (UnaryOp::Sigmoid, EXP_RANGE),
        (UnaryOp::Silu, EXP_RANGE),
    ];
    for (op, domain) in cases {
        check_expr(&mut rng, &Expr::input(0).unary(op), &[domain], 4);
    }
}

#[test]
fn every_binary_op_matches_the_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let cases = [
        (BinaryOp::Add, [ANY, ANY]),
        (BinaryOp::Sub, [ANY, ANY]),
        (BinaryOp::Mul, [ANY, ANY]),
        (BinaryOp::Div, [ANY, NONZERO]),
        (BinaryOp::Max, [ANY, ANY]),
        (BinaryOp::Min, [ANY, ANY]),
    ];
    for (op, domains) in cases {
        check_expr(
            &mut rng,
            &Expr::input(0).binary(op, Expr::input(1)),
            &domains,
            4,
        );
    }
}

/// Well-conditioned compositions (no cancellation), so relative error stays meaningful.
fn composite_expressions() -> Vec<(Expr, Vec<Domain>)> {
    let abs = |e: Expr| e.unary(UnaryOp::Abs);
    let x = || Expr::input(0);
    let y = || Expr::input(1);
    let z = || Expr::input(2);
    vec![
        // SwiGLU
        (x().silu() * y(), vec![EXP_RANGE, ANY]),
        // scaled sigmoid gate with a constant
        (
            x().sigmoid() * Expr::constant(2.5) * y().exp(),
            vec![EXP_RANGE, NONZERO],
        ),
        // clamp and reuse of one input, constants, a third input
        (
            (abs(x()) + Expr::constant(0.5)).clamp(0.75, 3.0) * z().unary(UnaryOp::Rsqrt),
            vec![ANY, ANY, POSITIVE],
        ),
        // softplus-like: ln-free positive chain
        (
            x().exp() / (Expr::constant(1.0) + abs(y())).unary(UnaryOp::Sqrt),
            vec![NONZERO, ANY],
        ),
        // negation and min of positives
        (
            -(abs(x()).min(abs(y())) + abs(z().unary(UnaryOp::Recip))),
            vec![ANY, ANY, NONZERO],
        ),
        // a constant-only expression
        (Expr::constant(-0.125).exp(), vec![ANY]),
    ]
}

#[test]
fn composite_expressions_match_the_reference_for_every_unroll() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for (expr, domains) in composite_expressions() {
        for unroll in [1, 2, 3, 4, 8] {
            check_expr(&mut rng, &expr, &domains, unroll);
        }
    }
}

#[test]
fn composite_expressions_on_fresh_seeds() {
    for _ in 0..3 {
        let seed: u64 = rand::rng().random();
        eprintln!("fresh seed {seed}");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for (expr, domains) in composite_expressions() {
            check_expr(&mut rng, &expr, &domains, 4);
        }
    }
}

#[test]
fn exp_is_accurate_over_minus_80_to_80() {
    let n = 200_001;
    let xs: Vec<f64> = (0..n)
        .map(|i| -80.0 + 160.0 * i as f64 / (n - 1) as f64)
        .collect();
    let exp64 = jit()
        .map(MapSpec::new(Expr::input(0).exp(), 1, ElemType::F64))
        .unwrap();
    let mut out = vec![0.0; n];
    exp64.run(&[&xs], &mut out, Parallelism::Rayon).unwrap();
    let worst64 = xs
        .iter()
        .zip(&out)
        .map(|(x, y)| relative_error(*y, x.exp()))
        .fold(0.0, f64::max);
    assert!(worst64 <= 1e-12, "f64 exp worst relative error {worst64:e}");

    let xs32: Vec<f32> = xs.iter().map(|&x| x as f32).collect();
    let exp32 = jit()
        .map(MapSpec::new(Expr::input(0).exp(), 1, ElemType::F32))
        .unwrap();
    let mut out32 = vec![0.0f32; n];
    exp32.run(&[&xs32], &mut out32, Parallelism::Rayon).unwrap();
    let (mut worst32, mut worst_ulp) = (0.0f64, 0.0f64);
    for (&x, &y) in xs32.iter().zip(&out32) {
        let want = f64::from(x).exp();
        worst32 = worst32.max(relative_error(f64::from(y), want));
        let ulp = f64::from(f32::EPSILON) * 2f64.powi(want.log2().floor() as i32);
        worst_ulp = worst_ulp.max((f64::from(y) - want).abs() / ulp);
    }
    eprintln!("exp worst relative error: f64 {worst64:e}, f32 {worst32:e} ({worst_ulp:.2} ulp)");
    assert!(worst32 <= 1e-6, "f32 exp worst relative error {worst32:e}");
    assert!(worst_ulp <= 2.5, "f32 exp worst error {worst_ulp} ulp");
}

#[test]
fn exp_special_values() {
    let exp64 = jit()
        .map(MapSpec::new(Expr::input(0).exp(), 1, ElemType::F64))
        .unwrap();
    let xs = [
        0.0,
        -0.0,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
        710.0,
        1000.0,
        -1000.0,
        709.7,
        -708.0,
        -740.0,
        -745.2,
    ];
    let mut out = vec![0.0; xs.len()];
    exp64
        .run(&[&xs], &mut out, Parallelism::Sequential)
        .unwrap();
    assert_eq!(out[0], 1.0);
    assert_eq!(out[1], 1.0);
    assert_eq!(out[2], f64::INFINITY);
    assert_eq!(out[3], 0.0);
    assert!(out[4].is_nan());
    assert_eq!(out[5], f64::INFINITY);
    assert_eq!(out[6], f64::INFINITY);
    assert_eq!(out[7], 0.0);
    assert!(relative_error(out[8], 709.7f64.exp()) < 1e-12);
    assert!(relative_error(out[9], (-708.0f64).exp()) < 1e-12);
    // subnormal results: accurate to the subnormal spacing
    assert!(
        (out[10] - (-740.0f64).exp()).abs() <= 2.0 * 5e-324,
        "{} vs {}",
        out[10],
        (-740f64).exp()
    );
    assert_eq!(out[11], 0.0);

    let exp32 = jit()
        .map(MapSpec::new(Expr::input(0).exp(), 1, ElemType::F32))
        .unwrap();
    let xs = [
        0.0f32,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        89.0,
        -104.0,
        88.5,
        -87.0,
    ];
    let mut out = vec![0.0f32; xs.len()];
    exp32
        .run(&[&xs], &mut out, Parallelism::Sequential)
        .unwrap();
    assert_eq!(out[0], 1.0);
    assert_eq!(out[1], f32::INFINITY);
    assert_eq!(out[2], 0.0);
    assert!(out[3].is_nan());
    assert_eq!(out[4], f32::INFINITY);
    assert_eq!(out[5], 0.0);
    assert!(relative_error(f64::from(out[6]), 88.5f64.exp()) < 1e-6);
    assert!(relative_error(f64::from(out[7]), (-87f64).exp()) < 1e-6);
}

#[test]
fn bf16_inputs_unpack_to_f32() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let expr = Expr::input(0) * Expr::input(1) + Expr::constant(1.0);
    let spec = MapSpec::new(expr.clone(), 2, ElemType::F32)
        .with_input_formats(vec![ElementFormat::Bf16; 2]);
    let kernel = jit().map(spec).unwrap();
    for &len in &LENGTHS {
        let x: Vec<bf16> = sample(&mut rng, ANY, len)
            .into_iter()
            .map(bf16::from_f64)
            .collect();
        let y: Vec<bf16> = sample(&mut rng, ANY, len)
            .into_iter()
            .map(bf16::from_f64)
            .collect();
        let mut out = vec![0.0f32; len];
        kernel.run(&[&x, &y], &mut out, Parallelism::Rayon).unwrap();
        for i in 0..len {
            let want = expr.evaluate(&[x[i].to_f64(), y[i].to_f64()]);
            let err = relative_error(f64::from(out[i]), want);
            assert!(
                err <= TOL_F32,
                "bf16 {} · {} + 1: {} vs {want}",
                x[i],
                y[i],
                out[i]
            );
        }
    }
}

#[test]
fn threads_give_the_same_result_as_one_thread() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let expr = Expr::input(0).silu() * Expr::input(1) - Expr::input(1).exp();
    for elem in [ElemType::F32, ElemType::F64] {
        let kernel = jit().map(MapSpec::new(expr.clone(), 2, elem)).unwrap();
        for len in [100_003, 3 * 16 * 1024 + 5] {
            let x = sample(&mut rng, EXP_RANGE, len);
            let y = sample(&mut rng, NONZERO, len);
            match elem {
                ElemType::F64 => {
                    let (mut one, mut many) = (vec![0.0f64; len], vec![0.0f64; len]);
                    kernel
                        .run(&[&x, &y], &mut one, Parallelism::Sequential)
                        .unwrap();
                    kernel
                        .run(&[&x, &y], &mut many, Parallelism::Rayon)
                        .unwrap();
                    assert!(one
                        .iter()
                        .zip(&many)
                        .all(|(a, b)| a.to_bits() == b.to_bits()));
                }
                ElemType::F32 => {
                    let x: Vec<f32> = x.iter().map(|&v| v as f32).collect();
                    let y: Vec<f32> = y.iter().map(|&v| v as f32).collect();
                    let (mut one, mut many) = (vec![0.0f32; len], vec![0.0f32; len]);
                    kernel
                        .run(&[&x, &y], &mut one, Parallelism::Sequential)
                        .unwrap();
                    kernel
                        .run(&[&x, &y], &mut many, Parallelism::Rayon)
                        .unwrap();
                    assert!(one
                        .iter()
                        .zip(&many)
                        .all(|(a, b)| a.to_bits() == b.to_bits()));
                }
            }
        }
    }
}

#[test]
fn operand_mismatches_are_errors_naming_the_operand() {
    let kernel = jit()
        .map(MapSpec::new(
            Expr::input(0) + Expr::input(1),
            2,
            ElemType::F64,
        ))
        .unwrap();
    let (x, y) = (vec![1.0; 8], vec![2.0; 8]);
    let mut out = vec![0.0; 8];

    let err = kernel
        .run(&[&x, &y[..7]], &mut out, Parallelism::Rayon)
        .unwrap_err();
    assert!(err.to_string().contains("`input 1`"), "{err}");
    let err = kernel
        .run(&[&x[..7], &y], &mut out, Parallelism::Rayon)
        .unwrap_err();
    assert!(err.to_string().contains("`input 0`"), "{err}");
    let err = kernel.run(&[&x], &mut out, Parallelism::Rayon).unwrap_err();
    assert!(err.to_string().contains("`inputs`"), "{err}");
    let mut out32 = vec![0.0f32; 8];
    let err = kernel
        .run(&[&x, &y], &mut out32, Parallelism::Rayon)
        .unwrap_err();
    assert!(err.to_string().contains("`out`"), "{err}");
    let x32 = vec![1.0f32; 8];
    let err = kernel
        .run(&[&x32, &x32], &mut out, Parallelism::Rayon)
        .unwrap_err();
    assert!(err.to_string().contains("`input 0`"), "{err}");
    // nothing was written by the failed calls
    assert!(out.iter().all(|&v| v == 0.0));
    kernel.run(&[&x, &y], &mut out, Parallelism::Rayon).unwrap();
    assert!(out.iter().all(|&v| v == 3.0));
}
