//! JIT dot-product kernels (`C = alpha·A·Bᵀ + beta·C`) against a naive triple loop in f64, for
//! odd M/N/K around the vector width, every register tile, alpha/beta, strides, Gram matrices,
//! bf16 operands, several cache blocks, threads, and operand errors.
//!
//! Error measure: `|C − C_ref| / (|alpha|·Σ_k |A[i,k]·B[j,k]| + |beta·C_old|)`, the relative
//! error with respect to the magnitude of the terms (random signs make C itself cancel).

use half::bf16;
use kiln_codegen::cpu::{DotSpec, ElemType, ElementFormat};
use kiln_runtime::cpu::{CpuJit, DotShape, Parallelism};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const TOL_F64: f64 = 1e-12;
const TOL_F32: f64 = 1e-5;

fn jit() -> &'static CpuJit {
    CpuJit::global().expect("host JIT")
}

fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// The reference product and the magnitude of its terms, in f64.
#[allow(clippy::too_many_arguments)]
fn reference(
    a: &[f64],
    b: &[f64],
    c_old: &[f64],
    s: DotShape,
    alpha: f64,
    beta: f64,
) -> (Vec<f64>, Vec<f64>) {
    let mut c = c_old.to_vec();
    let mut magnitude = vec![0.0; c.len()];
    for i in 0..s.m {
        for j in 0..s.n {
            let (mut sum, mut abs) = (0.0, 0.0);
            for k in 0..s.k {
                let p = a[i * s.lda + k] * b[j * s.ldb + k];
                sum += p;
                abs += p.abs();
            }
            let old = c_old[i * s.ldc + j];
            let scaled_old = if beta == 0.0 { 0.0 } else { beta * old };
            c[i * s.ldc + j] = alpha * sum + scaled_old;
            magnitude[i * s.ldc + j] = alpha.abs() * abs + scaled_old.abs();
        }
    }
    (c, magnitude)
}

fn check(got: &[f64], want: &[f64], magnitude: &[f64], tol: f64, what: &str) {
    for (e, ((g, w), m)) in got.iter().zip(want).zip(magnitude).enumerate() {
        let err = if g == w {
            0.0
        } else {
            (g - w).abs() / m.max(f64::MIN_POSITIVE)
        };
        assert!(
            err <= tol,
            "{what}: element {e}: {g} vs {w} (relative {err:e})"
        );
    }
}

/// Runs one product in f64 and f32 with `spec`'s tile and checks both.
#[allow(clippy::too_many_arguments)]
fn check_product(
    rng: &mut ChaCha8Rng,
    tile: (u32, u32),
    shape: DotShape,
    alpha: f64,
    beta: f64,
    gram: bool,
) {
    let a = random(
        rng,
        if shape.m == 0 {
            0
        } else {
            (shape.m - 1) * shape.lda + shape.k
        },
    );
    let b = if gram {
        a.clone()
    } else {
        random(
            rng,
            if shape.n == 0 {
                0
            } else {
                (shape.n - 1) * shape.ldb + shape.k
            },
        )
    };
    let c_len = if shape.m == 0 {
        0
    } else {
        (shape.m - 1) * shape.ldc + shape.n
    };
    // NaN where C is not read: `beta = 0` must not read it
    let c_old: Vec<f64> = if beta == 0.0 {
        vec![f64::NAN; c_len]
    } else {
        random(rng, c_len)
    };
    let what = format!("{shape:?} tile {tile:?} alpha {alpha} beta {beta}");
    let spec = |elem| {
        DotSpec::new(elem)
            .with_tile(tile.0, tile.1)
            .with_scale(alpha != 1.0)
            .with_accumulate(beta != 0.0)
    };
    let c_ref_old: Vec<f64> = c_old
        .iter()
        .map(|&v| if v.is_nan() { 0.0 } else { v })
        .collect();

    // f64
    let (want, magnitude) = reference(&a, &b, &c_ref_old, shape, alpha, beta);
    let mut c = c_old.clone();
    let kernel = jit().dot(spec(ElemType::F64)).unwrap();
    if gram {
        kernel
            .run(&a, &a, &mut c, shape, alpha, beta, Parallelism::Rayon)
            .unwrap();
    } else {
        kernel
            .run(&a, &b, &mut c, shape, alpha, beta, Parallelism::Rayon)
            .unwrap();
    }
    let padding_ok = |c: &[f64]| {
        (0..c.len()).all(|e| e % shape.ldc.max(1) < shape.n || c[e].to_bits() == c_old[e].to_bits())
    };
    assert!(padding_ok(&c), "{what}: padding written");
    let mask = |v: &[f64]| -> Vec<f64> {
        v.iter()
            .enumerate()
            .map(|(e, &x)| {
                if e % shape.ldc.max(1) < shape.n {
                    x
                } else {
                    0.0
                }
            })
            .collect()
    };
    check(
        &mask(&c),
        &mask(&want),
        &mask(&magnitude),
        TOL_F64,
        &format!("f64 {what}"),
    );

    // f32: operands rounded to f32, reference in f64 on the rounded operands
    let a32: Vec<f32> = a.iter().map(|&v| v as f32).collect();
    let b32: Vec<f32> = b.iter().map(|&v| v as f32).collect();
    let c32_old: Vec<f32> = c_old.iter().map(|&v| v as f32).collect();
    let widen = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
    let c32_ref_old: Vec<f64> = widen(&c32_old)
        .iter()
        .map(|&v| if v.is_nan() { 0.0 } else { v })
        .collect();
    let (want, magnitude) = reference(&widen(&a32), &widen(&b32), &c32_ref_old, shape, alpha, beta);
    let mut c32 = c32_old.clone();
    jit()
        .dot(spec(ElemType::F32))
        .unwrap()
        .run(&a32, &b32, &mut c32, shape, alpha, beta, Parallelism::Rayon)
        .unwrap();
    check(
        &mask(&widen(&c32)),
        &mask(&want),
        &mask(&magnitude),
        TOL_F32,
        &format!("f32 {what}"),
    );
}

const DIMS: [usize; 9] = [0, 1, 2, 3, 4, 5, 7, 9, 17];

#[test]
fn odd_shapes_match_the_triple_loop() {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    for &m in &DIMS {
        for &n in &DIMS {
            for &k in &[0, 1, 3, 4, 5, 7, 8, 17, 33] {
                check_product(&mut rng, (4, 2), DotShape::new(m, n, k), 1.0, 0.0, false);
            }
        }
    }
    for (m, n, k) in [(13, 11, 1000), (5, 9, 4099), (31, 29, 129)] {
        check_product(&mut rng, (4, 2), DotShape::new(m, n, k), 1.0, 0.0, false);
    }
}

#[test]
fn alpha_and_beta() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for (alpha, beta) in [
        (1.0, 0.0),
        (-0.5, 0.0),
        (1.0, 1.0),
        (2.0, -0.75),
        (0.0, 3.0),
        (1.0, 1.0e-3),
    ] {
        for (m, n, k) in [(1, 1, 1), (3, 5, 7), (7, 9, 33), (17, 5, 130)] {
            check_product(&mut rng, (4, 2), DotShape::new(m, n, k), alpha, beta, false);
        }
    }
}

#[test]
fn every_register_tile() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for rows in 1..=4 {
        for cols in 1..=4 {
            if rows * cols > 12 {
                continue;
            }
            for (m, n, k) in [(1, 1, 5), (7, 9, 17), (9, 7, 66)] {
                check_product(
                    &mut rng,
                    (rows, cols),
                    DotShape::new(m, n, k),
                    1.5,
                    0.5,
                    false,
                );
            }
        }
    }
}

#[test]
fn strided_operands_and_gram_matrices() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let shape = DotShape::new(7, 5, 9).with_strides(12, 11, 8);
    check_product(&mut rng, (4, 2), shape, 1.0, 0.0, false);
    check_product(&mut rng, (4, 2), shape, 2.0, 1.0, false);
    // X·Xᵀ: A and B are the same slice
    for (n, k) in [(1, 1), (6, 17), (23, 101)] {
        check_product(&mut rng, (4, 2), DotShape::new(n, n, k), 1.0, 0.0, true);
    }
}

#[test]
fn several_cache_blocks_and_threads_equal_one_thread() {
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    // k = 1000 f64: 32 rows of B per column block, so 70 columns are 3 blocks; 150 rows are 3.
    let shape = DotShape::new(150, 70, 1000);
    let kernel = jit().dot(DotSpec::new(ElemType::F64)).unwrap();
    assert_eq!(kernel.blocks(&shape), (64, 32));
    check_product(&mut rng, (4, 2), shape, 1.0, 0.0, false);
    let a = random(&mut rng, 150 * 1000);
    let b = random(&mut rng, 70 * 1000);
    let (mut one, mut many) = (vec![0.0f64; 150 * 70], vec![0.0f64; 150 * 70]);
    kernel
        .run(&a, &b, &mut one, shape, 1.0, 0.0, Parallelism::Sequential)
        .unwrap();
    kernel
        .run(&a, &b, &mut many, shape, 1.0, 0.0, Parallelism::Rayon)
        .unwrap();
    assert!(one
        .iter()
        .zip(&many)
        .all(|(x, y)| x.to_bits() == y.to_bits()));
}

#[test]
fn bf16_operands_unpack_to_f32() {
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    for (m, n, k) in [(1, 7, 9), (3, 5, 4099), (9, 4, 17)] {
        let a: Vec<f32> = random(&mut rng, m * k)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        let b: Vec<bf16> = random(&mut rng, n * k)
            .into_iter()
            .map(bf16::from_f64)
            .collect();
        let b_wide: Vec<f64> = b.iter().map(|v| v.to_f64()).collect();
        let a_wide: Vec<f64> = a.iter().map(|&v| f64::from(v)).collect();
        let shape = DotShape::new(m, n, k);
        let (want, magnitude) = reference(&a_wide, &b_wide, &vec![0.0; m * n], shape, 1.0, 0.0);
        let kernel = jit()
            .dot(DotSpec::new(ElemType::F32).with_formats(ElementFormat::F32, ElementFormat::Bf16))
            .unwrap();
        let mut c = vec![0.0f32; m * n];
        kernel
            .run(&a, &b, &mut c, shape, 1.0, 0.0, Parallelism::Rayon)
            .unwrap();
        let got: Vec<f64> = c.iter().map(|&v| f64::from(v)).collect();
        check(&got, &want, &magnitude, TOL_F32, "f32 × bf16");
    }
}

#[test]
fn random_shapes_on_fresh_seeds() {
    for _ in 0..3 {
        let seed: u64 = rand::rng().random();
        eprintln!("fresh seed {seed}");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for _ in 0..8 {
            let shape = DotShape::new(
                rng.random_range(0..40),
                rng.random_range(0..40),
                rng.random_range(0..300),
            );
            let alpha = if rng.random_bool(0.5) {
                1.0
            } else {
                rng.random_range(-2.0..2.0)
            };
            let beta = if rng.random_bool(0.5) {
                0.0
            } else {
                rng.random_range(-2.0..2.0)
            };
            let tile = (rng.random_range(1..=3), rng.random_range(1..=4));
            check_product(&mut rng, tile, shape, alpha, beta, false);
        }
    }
}

#[test]
fn operand_mismatches_are_errors_naming_the_operand() {
    let kernel = jit().dot(DotSpec::new(ElemType::F64)).unwrap();
    let shape = DotShape::new(3, 4, 5);
    let (a, b) = (vec![1.0; 15], vec![1.0; 20]);
    let mut c = vec![0.0; 12];
    let run = |a: &[f64], b: &[f64], c: &mut [f64], shape, alpha, beta| {
        kernel
            .run(a, b, c, shape, alpha, beta, Parallelism::Rayon)
            .unwrap_err()
            .to_string()
    };
    assert!(run(&a[..14], &b, &mut c, shape, 1.0, 0.0).contains("`a`"));
    assert!(run(&a, &b[..19], &mut c, shape, 1.0, 0.0).contains("`b`"));
    assert!(run(&a, &b, &mut c[..11], shape, 1.0, 0.0).contains("`c`"));
    assert!(run(&a, &b, &mut c, shape, 2.0, 0.0).contains("`alpha`"));
    assert!(run(&a, &b, &mut c, shape, 1.0, 1.0).contains("`beta`"));
    assert!(run(&a, &b, &mut c, shape.with_strides(4, 5, 4), 1.0, 0.0).contains("`a`"));
    assert!(run(&a, &b, &mut c, shape.with_strides(5, 5, 3), 1.0, 0.0).contains("`c`"));
    let mut c32 = vec![0.0f32; 12];
    let err = kernel
        .run(&a, &b, &mut c32, shape, 1.0, 0.0, Parallelism::Rayon)
        .unwrap_err();
    assert!(err.to_string().contains("`c`"), "{err}");
    let a32 = vec![1.0f32; 15];
    let err = kernel
        .run(&a32, &b, &mut c, shape, 1.0, 0.0, Parallelism::Rayon)
        .unwrap_err();
    assert!(err.to_string().contains("`a`"), "{err}");
    assert!(c.iter().all(|&v| v == 0.0), "a failed call wrote C");
    kernel
        .run(&a, &b, &mut c, shape, 1.0, 0.0, Parallelism::Rayon)
        .unwrap();
    assert!(c.iter().all(|&v| v == 5.0));
}
