//! JIT row softmax kernels against the reference interpreter's formula (softmax in f64 with
//! the maximum subtracted, `kiln_ir::interp`), for row lengths around the vector width and
//! long rows, per-row valid counts (the attention key mask), padded rows, threads, and
//! operand errors. The masked tail is poisoned with NaN before each call: it must be written
//! as 0 and never read; padding between rows must stay untouched.
//!
//! Error measure: `|p − p_ref| / p_ref` per element (every reference value here is a normal
//! f32 number).

use kiln_codegen::cpu::{ElemType, SoftmaxSpec};
use kiln_runtime::cpu::{CpuError, CpuJit, Parallelism, SoftmaxKernel, SoftmaxShape};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const TOL_F32: f64 = 1e-5;
const TOL_F64: f64 = 1e-12;

fn jit() -> &'static CpuJit {
    CpuJit::global().expect("host JIT")
}

/// The interpreter's formula on the leading `valid` elements of `row`, in f64.
fn reference(row: &[f64], valid: usize, scale: f64) -> Vec<f64> {
    let scores: Vec<f64> = row[..valid].iter().map(|&x| scale * x).collect();
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = exps.iter().sum();
    exps.iter().map(|e| e / total).collect()
}

/// Random rows (one planted peak in odd rows), the masked tail and padding poisoned.
fn random_rows(rng: &mut ChaCha8Rng, shape: SoftmaxShape) -> Vec<f64> {
    let len = if shape.rows == 0 {
        0
    } else {
        (shape.rows - 1) * shape.ld + shape.n
    };
    let mut x = vec![f64::NAN; len];
    for r in 0..shape.rows {
        let valid = shape.valid_of(r).unwrap();
        for j in 0..valid {
            x[r * shape.ld + j] = rng.random_range(-8.0..8.0);
        }
        if r % 2 == 1 && valid > 0 {
            let j = rng.random_range(0..valid);
            x[r * shape.ld + j] = 40.0;
        }
        for j in valid..shape.n {
            x[r * shape.ld + j] = f64::NAN;
        }
        if r + 1 < shape.rows {
            for j in shape.n..shape.ld {
                x[r * shape.ld + j] = -1234.5; // padding: must survive
            }
        }
    }
    x
}

/// Runs `kernel` on `x` (converted to the compute type) and returns the worst relative error
/// against [`reference`], checking the masked tail and padding.
fn check<T: kiln_runtime::cpu::Float + Into<f64>>(
    kernel: &SoftmaxKernel,
    x: &[f64],
    convert: impl Fn(f64) -> T,
    shape: SoftmaxShape,
    scale: f64,
) -> f64 {
    let mut data: Vec<T> = x.iter().map(|&v| convert(v)).collect();
    let mut threaded = data.clone();
    kernel
        .run(&mut data, shape, scale, Parallelism::Sequential)
        .unwrap();
    kernel
        .run(&mut threaded, shape, scale, Parallelism::Rayon)
        .unwrap();
    let bits = |v: &[T]| {
        v.iter()
            .map(|&x| Into::<f64>::into(x).to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        bits(&data),
        bits(&threaded),
        "threads changed the result {shape:?}"
    );
    let mut worst = 0.0f64;
    for r in 0..shape.rows {
        let valid = shape.valid_of(r).unwrap();
        // the reference sees the same rounded inputs as the kernel
        let row: Vec<f64> = (0..shape.n)
            .map(|j| Into::<f64>::into(convert(x[r * shape.ld + j])))
            .collect();
        let want = reference(&row, valid, scale);
        for j in 0..shape.n {
            let got: f64 = data[r * shape.ld + j].into();
            if j < valid {
                let error = (got - want[j]).abs() / want[j];
                assert!(
                    error.is_finite(),
                    "row {r} element {j}: {got} vs {}",
                    want[j]
                );
                worst = worst.max(error);
            } else {
                assert_eq!(got, 0.0, "masked element {j} of row {r} {shape:?}");
            }
        }
        if r + 1 < shape.rows {
            for j in shape.n..shape.ld {
                assert_eq!(
                    Into::<f64>::into(data[r * shape.ld + j]),
                    -1234.5,
                    "padding"
                );
            }
        }
    }
    worst
}

fn shapes() -> Vec<SoftmaxShape> {
    let mut shapes = Vec::new();
    for n in (1..=19).chain([31, 64, 257, 1000, 4099]) {
        shapes.push(SoftmaxShape::new(5, n));
        shapes.push(SoftmaxShape::new(3, n).with_ld(n + 3));
        if n >= 4 {
            // the causal / decode mask: row r takes part with n − 3 + r elements
            shapes.push(SoftmaxShape::new(4, n).with_valid(n - 3, 1));
        }
        shapes.push(SoftmaxShape::new(2, n).with_valid(n / 2, 0));
    }
    shapes.push(SoftmaxShape::new(40, 33).with_valid(1, 0)); // several row blocks
    shapes.push(SoftmaxShape::new(0, 7));
    shapes
}

#[test]
fn f32_softmax_matches_the_interpreter_formula() {
    let kernel = jit().softmax(SoftmaxSpec::new(ElemType::F32)).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut worst = 0.0f64;
    for shape in shapes() {
        for scale in [1.0, 0.125, -0.75] {
            let x = random_rows(&mut rng, shape);
            let error = check(&kernel, &x, |v| v as f32, shape, scale);
            assert!(error <= TOL_F32, "{shape:?} scale {scale}: {error:e}");
            worst = worst.max(error);
        }
    }
    println!("f32 softmax: worst relative error {worst:e}");
}

#[test]
fn f64_softmax_matches_the_interpreter_formula() {
    let kernel = jit().softmax(SoftmaxSpec::new(ElemType::F64)).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let mut worst = 0.0f64;
    for shape in shapes() {
        let x = random_rows(&mut rng, shape);
        let error = check(&kernel, &x, |v| v, shape, 0.3);
        assert!(error <= TOL_F64, "{shape:?}: {error:e}");
        worst = worst.max(error);
    }
    println!("f64 softmax: worst relative error {worst:e}");
}

#[test]
fn a_row_with_no_valid_element_becomes_zeros() {
    let kernel = jit().softmax(SoftmaxSpec::new(ElemType::F32)).unwrap();
    let mut x = vec![f32::NAN; 6];
    x[3] = 1.0;
    kernel
        .run(
            &mut x,
            SoftmaxShape::new(2, 3).with_valid(0, 1),
            1.0,
            Parallelism::Sequential,
        )
        .unwrap();
    assert_eq!(x, [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
}

#[test]
fn operand_errors_name_the_operand() {
    let kernel = jit().softmax(SoftmaxSpec::new(ElemType::F32)).unwrap();
    let operand = |e: CpuError| match e {
        CpuError::Operand { operand, .. } => operand,
        other => panic!("{other:?}"),
    };
    let mut x = vec![0.0f32; 12];
    let run = |x: &mut [f32], shape| kernel.run(x, shape, 1.0, Parallelism::Sequential);
    // the last row would take part with 2 + 3 · 1 = 5 > 4 elements
    let e = run(&mut x, SoftmaxShape::new(3, 4).with_valid(3, 1)).unwrap_err();
    assert_eq!(operand(e), "valid");
    let e = run(&mut x, SoftmaxShape::new(4, 4)).unwrap_err();
    assert_eq!(operand(e), "x");
    let e = run(&mut x, SoftmaxShape::new(2, 4).with_ld(3)).unwrap_err();
    assert_eq!(operand(e), "x");
    let e = run(&mut x, SoftmaxShape::new(1, 4).with_valid(usize::MAX, 1)).unwrap_err();
    assert_eq!(operand(e), "valid");
    let mut wide = vec![0.0f64; 4];
    let e = kernel
        .run(
            &mut wide,
            SoftmaxShape::new(1, 4),
            1.0,
            Parallelism::Sequential,
        )
        .unwrap_err();
    assert_eq!(operand(e), "x");
}
