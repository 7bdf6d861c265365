//! The JIT kernels of the embedding solvers against plain references: the Gram-trick
//! operators 𝒜 and 𝒜* (explicit secants), their adjointness, the CG vector operations, the
//! elementwise ADMM steps and the ℓ1-ball projection (sorting reference), in f64 (1e-12) and
//! f32 (1e-5), on sizes around the vector width.
//!
//! Error measure: `|got − want| / magnitude`, where the magnitude is the sum of the absolute
//! values of the terms the kernel adds (random signs make the results themselves cancel).

use kiln::embed::operators::{eigen, reference, LowRank, Operators, Real};
use kiln_codegen::cpu::ElemType;
use kiln_kernels::admm::{l1_ball, steps};
use kiln_runtime::cpu::{CpuJit, Float, Parallelism};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SIZES: [(usize, usize); 7] = [(2, 1), (3, 3), (5, 4), (7, 5), (9, 17), (13, 6), (131, 3)];

fn jit() -> &'static CpuJit {
    CpuJit::global().expect("host JIT")
}

fn tolerance<T: Float>() -> f64 {
    match T::TYPE {
        ElemType::F64 => 1e-12,
        ElemType::F32 => 1e-5,
    }
}

fn random(rng: &mut ChaCha8Rng, len: usize) -> Vec<f64> {
    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn symmetric(rng: &mut ChaCha8Rng, d: usize) -> Vec<f64> {
    let a = random(rng, d * d);
    (0..d * d)
        .map(|e| 0.5 * (a[e] + a[(e % d) * d + e / d]))
        .collect()
}

/// A random active set (about 70% of the pairs), symmetric, zero diagonal.
fn random_mask(rng: &mut ChaCha8Rng, n: usize) -> Vec<bool> {
    let mut active = vec![false; n * n];
    for i in 0..n {
        for j in i + 1..n {
            let on = rng.random_bool(0.7);
            active[i * n + j] = on;
            active[j * n + i] = on;
        }
    }
    active
}

fn to<T: Real>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&e| T::from_f64(e)).collect()
}

fn back<T: Real>(v: &[T]) -> Vec<f64> {
    v.iter().map(|e| e.to_f64()).collect()
}

fn check(got: &[f64], want: &[f64], magnitude: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (e, ((g, w), m)) in got.iter().zip(want).zip(magnitude).enumerate() {
        let err = if g == w {
            0.0
        } else {
            (g - w).abs() / m.max(f64::MIN_POSITIVE)
        };
        assert!(
            err <= tol,
            "{what}[{e}]: got {g}, want {w} (error {err:.2e} > {tol:.0e})"
        );
    }
}

/// `|x|ᵀ|Ψ||y|`.
fn abs_form(x: &[f64], psi: &[f64], y: &[f64]) -> f64 {
    let d = x.len();
    (0..d)
        .flat_map(|a| (0..d).map(move |b| (a, b)))
        .map(|(a, b)| (x[a] * psi[a * d + b] * y[b]).abs())
        .sum()
}

fn operators_match<T: Real>(seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (n, d) in SIZES {
        let x = random(&mut rng, n * d);
        // the kernels see the points rounded to T; so does the reference
        let x = back(&to::<T>(&x));
        let mut ops = Operators::<T>::new(jit(), &x, n, d).unwrap();
        let active = random_mask(&mut rng, n);
        ops.set_active(&active);
        let mask: Vec<f64> = back(ops.mask());
        let psi = back(&to::<T>(&symmetric(&mut rng, d)));
        let w = back(&to::<T>(&symmetric(&mut rng, n)));

        // 𝒜
        let mut got = vec![T::default(); n * n];
        ops.apply(&to(&psi), &mut got).unwrap();
        let want = reference::apply(&x, n, d, &mask, &psi);
        let mut magnitude = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                let (xi, xj) = (&x[i * d..(i + 1) * d], &x[j * d..(j + 1) * d]);
                let dist: f64 = xi.iter().zip(xj).map(|(a, b)| (a - b) * (a - b)).sum();
                if dist > 0.0 {
                    magnitude[i * n + j] = (abs_form(xi, &psi, xi)
                        + abs_form(xj, &psi, xj)
                        + 2.0 * abs_form(xi, &psi, xj))
                        / dist;
                }
            }
        }
        let what = format!("𝒜 {:?} n={n} d={d}", T::TYPE);
        check(&back(&got), &want, &magnitude, tolerance::<T>(), &what);

        // 𝒜*
        let mut got = vec![T::default(); d * d];
        ops.adjoint(&to(&w), &mut got).unwrap();
        let want = reference::adjoint(&x, n, d, &mask, &w);
        let mut magnitude = vec![0.0; d * d];
        for i in 0..n {
            for j in 0..n {
                if mask[i * n + j] == 0.0 {
                    continue;
                }
                let (xi, xj) = (&x[i * d..(i + 1) * d], &x[j * d..(j + 1) * d]);
                let dist: f64 = xi.iter().zip(xj).map(|(a, b)| (a - b) * (a - b)).sum();
                let c = (w[i * n + j] / dist).abs();
                for a in 0..d {
                    for b in 0..d {
                        magnitude[a * d + b] += 2.0 * c * (xi[a] * xi[b]).abs()
                            + c * (xi[a] * xj[b]).abs()
                            + c * (xj[a] * xi[b]).abs();
                    }
                }
            }
        }
        let what = format!("𝒜* {:?} n={n} d={d}", T::TYPE);
        check(&back(&got), &want, &magnitude, tolerance::<T>(), &what);
    }
}

#[test]
fn gram_trick_operators_match_explicit_secants_f64() {
    operators_match::<f64>(1);
}

#[test]
fn gram_trick_operators_match_explicit_secants_f32() {
    operators_match::<f32>(2);
}

/// The fused `c1·𝒜*𝒜 + c2·I` of the conjugate gradients against the explicit-secant references
/// composed, on sizes that span several row blocks (16 rows below 512 points, 32 above) and
/// that are not multiples of the vector width.
fn normal_matches<T: Real>(seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let sizes = SIZES.iter().copied().chain([(47, 9), (600, 3)]);
    for (n, d) in sizes {
        let x = back(&to::<T>(&random(&mut rng, n * d)));
        let mut ops = Operators::<T>::new(jit(), &x, n, d).unwrap();
        let active = random_mask(&mut rng, n);
        ops.set_active(&active);
        let mask: Vec<f64> = back(ops.mask());
        let psi = back(&to::<T>(&symmetric(&mut rng, d)));
        let (c1, c2) = (rng.random_range(0.5..2.0), rng.random_range(0.5..2.0));
        let mut got = vec![T::default(); d * d];
        ops.normal(&to(&psi), c1, c2, &mut got).unwrap();
        let a = reference::apply(&x, n, d, &mask, &psi);
        let mut want = reference::adjoint(&x, n, d, &mask, &a);
        let mut magnitude = vec![0.0; d * d];
        for (e, w) in want.iter_mut().enumerate() {
            *w = c1 * *w + c2 * psi[e];
            magnitude[e] = (c2 * psi[e]).abs();
        }
        for i in 0..n {
            for j in i + 1..n {
                if mask[i * n + j] == 0.0 {
                    continue;
                }
                let (xi, xj) = (&x[i * d..(i + 1) * d], &x[j * d..(j + 1) * d]);
                let dist: f64 = xi.iter().zip(xj).map(|(a, b)| (a - b) * (a - b)).sum();
                let form =
                    abs_form(xi, &psi, xi) + abs_form(xj, &psi, xj) + 2.0 * abs_form(xi, &psi, xj);
                let c = c1 * form / (dist * dist);
                for a in 0..d {
                    for b in 0..d {
                        magnitude[a * d + b] +=
                            c * (xi[a].abs() + xj[a].abs()) * (xi[b].abs() + xj[b].abs());
                    }
                }
            }
        }
        let what = format!("𝒜*𝒜 {:?} n={n} d={d}", T::TYPE);
        check(&back(&got), &want, &magnitude, tolerance::<T>(), &what);
        // and the unfused path agrees (the same operator through 𝒜 and 𝒜*)
        let (mut scratch, mut unfused) = (vec![T::default(); n * n], vec![T::default(); d * d]);
        ops.normal_unfused(&to(&psi), c1, c2, &mut scratch, &mut unfused)
            .unwrap();
        check(&back(&unfused), &want, &magnitude, tolerance::<T>(), &what);
    }
}

#[test]
fn fused_normal_operator_matches_the_composed_references() {
    normal_matches::<f64>(11);
    normal_matches::<f32>(12);
}

/// Conjugate gradients with the f32 operator (mixed precision) solve the same system as with
/// the f64 one, to f32 accuracy; and plain f64 CG solves it to near rounding.
#[test]
fn mixed_precision_conjugate_gradients_solve_the_normal_equations() {
    use kiln::embed::operators::CgWork;
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    for (n, d) in [(40, 6), (131, 3)] {
        let x = random(&mut rng, n * d);
        let active = random_mask(&mut rng, n);
        let want = symmetric(&mut rng, d);
        let mut ops = Operators::<f64>::new(jit(), &x, n, d).unwrap();
        ops.set_active(&active);
        let mut rhs = vec![0.0; d * d];
        ops.normal(&want, 1.0, 2.0, &mut rhs).unwrap();
        let norm = want.iter().map(|v| v * v).sum::<f64>().sqrt();
        let error = |got: &[f64]| {
            got.iter()
                .zip(&want)
                .map(|(g, w)| (g - w) * (g - w))
                .sum::<f64>()
                .sqrt()
                / norm
        };
        let mut work = CgWork::new(n, d);
        let mut psi = vec![0.0; d * d];
        ops.conjugate_gradient(&rhs, &mut psi, 1.0, 2.0, 200, &mut work)
            .unwrap();
        assert!(error(&psi) < 1e-10, "f64 n={n}: {}", error(&psi));
        ops.use_f32_normal(jit()).unwrap();
        // the active set reaches the f32 copy too
        ops.set_active(&active);
        let mut psi = vec![0.0; d * d];
        ops.conjugate_gradient(&rhs, &mut psi, 1.0, 2.0, 200, &mut work)
            .unwrap();
        let e = error(&psi);
        assert!(e < 1e-4 && e > 0.0, "mixed n={n}: {e}");
    }
}

#[test]
fn apply_all_ignores_the_active_set() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (n, d) = (6, 3);
    let x = random(&mut rng, n * d);
    let mut ops = Operators::<f64>::new(jit(), &x, n, d).unwrap();
    let psi = symmetric(&mut rng, d);
    let mut full = vec![0.0; n * n];
    ops.apply(&psi, &mut full).unwrap();
    ops.set_active(&random_mask(&mut rng, n));
    let mut all = vec![0.0; n * n];
    ops.apply_all(&psi, &mut all).unwrap();
    assert_eq!(full, all);
    assert!(ops.active_secants() < ops.secants());
}

#[test]
fn a_and_a_star_are_adjoint() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for (n, d) in SIZES {
        let x = random(&mut rng, n * d);
        let mut ops = Operators::<f64>::new(jit(), &x, n, d).unwrap();
        ops.set_active(&random_mask(&mut rng, n));
        let psi = symmetric(&mut rng, d);
        let w = symmetric(&mut rng, n);
        let (mut a, mut at) = (vec![0.0; n * n], vec![0.0; d * d]);
        ops.apply(&psi, &mut a).unwrap();
        ops.adjoint(&w, &mut at).unwrap();
        // pairs inner product: half the dense one
        let lhs: f64 = 0.5 * a.iter().zip(&w).map(|(p, q)| p * q).sum::<f64>();
        let rhs: f64 = psi.iter().zip(&at).map(|(p, q)| p * q).sum();
        let scale: f64 = 0.5 * a.iter().zip(&w).map(|(p, q)| (p * q).abs()).sum::<f64>()
            + psi.iter().zip(&at).map(|(p, q)| (p * q).abs()).sum::<f64>();
        assert!(
            (lhs - rhs).abs() <= 1e-13 * scale,
            "n={n} d={d}: ⟨𝒜Ψ, w⟩ = {lhs}, ⟨Ψ, 𝒜*w⟩ = {rhs}"
        );
    }
}

fn vector_ops_match<T: Real>(seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let ops = Operators::<T>::new(jit(), &[0.0, 1.0, 2.0, 3.0], 2, 2).unwrap();
    for len in [1, 2, 3, 5, 7, 17, 1000, 4099] {
        let a = back(&to::<T>(&random(&mut rng, len)));
        let b = back(&to::<T>(&random(&mut rng, len)));
        let got = ops.inner(&to::<T>(&a), &to::<T>(&b)).unwrap();
        let want: f64 = a.iter().zip(&b).map(|(p, q)| p * q).sum();
        let magnitude: f64 = a.iter().zip(&b).map(|(p, q)| (p * q).abs()).sum();
        check(&[got], &[want], &[magnitude], tolerance::<T>(), "inner");

        let (alpha, beta) = (rng.random_range(-2.0..2.0), rng.random_range(-2.0..2.0));
        let mut y = to::<T>(&b);
        ops.axpby(alpha, &to::<T>(&a), beta, &mut y).unwrap();
        let want: Vec<f64> = a
            .iter()
            .zip(&b)
            .map(|(p, q)| alpha * p + beta * q)
            .collect();
        let magnitude: Vec<f64> = a
            .iter()
            .zip(&b)
            .map(|(p, q)| (alpha * p).abs() + (beta * q).abs())
            .collect();
        check(&back(&y), &want, &magnitude, tolerance::<T>(), "axpby");

        // product kernel at the sizes the solvers use (d × d × r, n × d × d)
        let (m, n, k) = (len % 13 + 1, len % 7 + 1, len % 11 + 1);
        let a = back(&to::<T>(&random(&mut rng, m * k)));
        let b = back(&to::<T>(&random(&mut rng, n * k)));
        let mut c = vec![T::default(); m * n];
        ops.product(&to(&a), &to(&b), &mut c, m, n, k).unwrap();
        let want = reference::product(&a, &b, m, n, k);
        let abs_a: Vec<f64> = a.iter().map(|v| v.abs()).collect();
        let abs_b: Vec<f64> = b.iter().map(|v| v.abs()).collect();
        let magnitude = reference::product(&abs_a, &abs_b, m, n, k);
        check(&back(&c), &want, &magnitude, tolerance::<T>(), "product");
    }
}

#[test]
fn vector_operations_match_references() {
    vector_ops_match::<f64>(5);
    vector_ops_match::<f32>(6);
}

/// What an input of a step holds: any value, a 0/1 mask, or a non-negative threshold.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Any,
    Mask,
    NonNeg,
}

/// Each elementwise step against its formula written out in Rust.
fn steps_match<T: Real>(seed: u64) {
    use Kind::*;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let ty = T::TYPE;
    type Formula = fn(&[f64]) -> f64;
    let cases: Vec<(kiln_codegen::cpu::MapSpec, Formula, &[Kind])> = vec![
        (
            steps::clip_shift(ty, 0.3),
            |v| (v[0] + v[1]).clamp(0.7, 1.3) * v[2],
            &[Any, Any, Mask],
        ),
        (
            steps::soft_threshold_nonneg(ty, 0.25),
            |v| (v[0] - 0.25).max(0.0),
            &[Any],
        ),
        (
            steps::scale_nonneg(ty, 0.5),
            |v| v[0].max(0.0) * 0.5,
            &[Any],
        ),
        (
            steps::dual_update(ty, 1.618),
            |v| v[0] - 1.618 * (v[1] - v[2]),
            &[Any, Any, Any],
        ),
        (
            steps::residual_dual_update(ty),
            |v| (v[0] + v[1] - 1.0 - v[2]) * v[3],
            &[Any, Any, Any, Mask],
        ),
        (
            steps::shifted_defect(ty),
            |v| (v[0] + v[1] - 1.0) * v[2],
            &[Any, Any, Mask],
        ),
        (
            steps::weights(ty, 1.0),
            |v| (v[0] - v[1] + 1.0) * v[2],
            &[Any, Any, Mask],
        ),
        (
            l1_ball::shrink_map(ty),
            |v| v[0].signum() * (v[0].abs() - v[1]).max(0.0),
            &[Any, NonNeg],
        ),
        (
            l1_ball::clamp_map(ty),
            |v| v[0].clamp(-v[1], v[1]),
            &[Any, NonNeg],
        ),
    ];
    for (spec, formula, kinds) in cases {
        assert_eq!(kinds.len(), spec.inputs.len());
        let kernel = jit().map(spec.clone()).unwrap();
        for len in [1, 3, 4, 5, 7, 9, 33, 1001] {
            let inputs: Vec<Vec<f64>> = kinds
                .iter()
                .map(|&kind| {
                    let v: Vec<f64> = random(&mut rng, len)
                        .into_iter()
                        .map(|e| match kind {
                            Any => 2.0 * e,
                            Mask => (e > 0.0) as u8 as f64,
                            NonNeg => e.abs(),
                        })
                        .collect();
                    back(&to::<T>(&v))
                })
                .collect();
            let typed: Vec<Vec<T>> = inputs.iter().map(|v| to::<T>(v)).collect();
            let refs: Vec<&[T]> = typed.iter().map(|v| v.as_slice()).collect();
            let mut out = vec![T::default(); len];
            kernel.run(&refs, &mut out, Parallelism::Rayon).unwrap();
            let want: Vec<f64> = (0..len)
                .map(|i| formula(&inputs.iter().map(|v| v[i]).collect::<Vec<_>>()))
                .collect();
            // the terms: every input times its constant factor (at most 1.618), plus the 1s
            let magnitude: Vec<f64> = (0..len)
                .map(|i| 2.0 * inputs.iter().map(|v| v[i].abs()).sum::<f64>() + 1.3)
                .collect();
            check(
                &back(&out),
                &want,
                &magnitude,
                tolerance::<T>(),
                &format!("{:?}", spec.expr),
            );
        }
    }
}

#[test]
fn elementwise_steps_match_their_formulas() {
    steps_match::<f64>(7);
    steps_match::<f32>(8);
}

#[test]
fn l1_ball_projection_matches_the_sorting_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for n in [2, 3, 5, 8, 17, 40] {
        let mut ops = Operators::<f64>::new(jit(), &random(&mut rng, n * 2), n, 2).unwrap();
        for radius in [0.01, 0.5, 3.0, 1e3] {
            let v = symmetric(&mut rng, n);
            let mut v: Vec<f64> = v.iter().map(|e| e * 4.0).collect();
            for i in 0..n {
                v[i * n + i] = 0.0;
            }
            let pairs: Vec<f64> = (0..n)
                .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
                .map(|(i, j)| v[i * n + j])
                .collect();
            let (fast, sorted) = (
                l1_ball::threshold(&pairs, radius),
                l1_ball::threshold_by_sorting(&pairs, radius),
            );
            assert!(
                (fast - sorted).abs() <= 1e-12 * (1.0 + sorted),
                "{fast} vs {sorted}"
            );
            let want = l1_ball::project_reference(&pairs, radius);
            let mut got = vec![0.0; n * n];
            let theta = ops.project_l1_ball(&v, radius, &mut got).unwrap();
            assert!((theta - sorted).abs() <= 1e-12 * (1.0 + sorted));
            let mut k = 0;
            for i in 0..n {
                for j in i + 1..n {
                    assert!(
                        (got[i * n + j] - want[k]).abs() <= 1e-12,
                        "n={n} r={radius}"
                    );
                    assert_eq!(got[i * n + j], got[j * n + i]);
                    k += 1;
                }
            }
            let norm: f64 = want.iter().map(|e| e.abs()).sum();
            assert!(norm <= radius * (1.0 + 1e-12));
            // the ℓ∞ prox is y − Π(y)
            let mut z = vec![0.0; n * n];
            ops.linf_prox(&v, radius, &mut z).unwrap();
            for e in 0..n * n {
                assert!((z[e] - (v[e] - got[e])).abs() <= 1e-12);
            }
        }
    }
    // the fast threshold on a larger vector with ties
    let v: Vec<f64> = (0..5000).map(|i| ((i % 97) as f64 - 48.0) / 7.0).collect();
    for radius in [1.0, 100.0, 5000.0] {
        let (a, b) = (
            l1_ball::threshold(&v, radius),
            l1_ball::threshold_by_sorting(&v, radius),
        );
        assert!((a - b).abs() <= 1e-12 * (1.0 + b));
    }
}

#[test]
fn eigendecomposition_and_low_rank_reconstruct() {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    for d in [1, 2, 5, 9] {
        let a = symmetric(&mut rng, d);
        let e = eigen(&a, d).unwrap();
        assert!(e.values.windows(2).all(|w| w[0] >= w[1]), "descending");
        // with the negative eigenvalues shifted up, W·Wᵀ is A + c·I
        let shift = 1.0 - e.values[d - 1];
        let values: Vec<f64> = e.values.iter().map(|v| v + shift).collect();
        let low = LowRank::from_eigen(&e, &values);
        let ops = Operators::<f64>::new(jit(), &[0.0, 1.0], 2, 1).unwrap();
        let mut m = vec![0.0; d * d];
        low.matrix(&ops, &mut m).unwrap();
        for i in 0..d {
            for j in 0..d {
                let want = a[i * d + j] + if i == j { shift } else { 0.0 };
                assert!((m[i * d + j] - want).abs() < 1e-12, "d={d}");
            }
        }
    }
}
