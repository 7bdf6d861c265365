//! The 4-bit grouped dot kernel against the interpreter's `QuantizedLinear` (4-bit symmetric
//! groups, f16 scales): random nibbles with the extremes −8 and 7 planted in every group,
//! random activations, row counts that exercise the 4-row tiles and the 1-row tail, and
//! column counts across task blocks; results identical with and without threads; operand
//! errors name the operand.

use kiln_codegen::cpu::Int4DotSpec;
use kiln_ir::dtype::DType;
use kiln_ir::graph::Graph;
use kiln_ir::interp;
use kiln_ir::op::{InputKind, Op, QuantScheme};
use kiln_ir::shape::Shape;
use kiln_ir::tensor::Tensor;
use kiln_runtime::cpu::{CpuJit, Parallelism};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `x [m, k] · dequantize(q [n, k], scales [n, k / group])ᵀ` by the interpreter.
fn interpreter(x: &Tensor, q: &Tensor, scales: &Tensor, group: usize) -> Tensor {
    let (m, k, n) = (x.shape[0], x.shape[1], q.shape[0]);
    let mut g = Graph::new("int4");
    let xi = g
        .input("x", InputKind::Activation, DType::F32, Shape::of(&[m, k]))
        .unwrap();
    let qi = g
        .input("q", InputKind::Weight, DType::I4, Shape::of(&[n, k]))
        .unwrap();
    let si = g
        .input(
            "s",
            InputKind::Weight,
            DType::F16,
            Shape::of(&[n, k / group]),
        )
        .unwrap();
    let scheme = QuantScheme {
        bits: 4,
        group_size: group,
        symmetric: true,
        clip: 1.0,
    };
    let y = g
        .add1("y", Op::QuantizedLinear { scheme }, &[xi, qi, si])
        .unwrap();
    g.output("y", y);
    let out = interp::run_with(&g, |name| match name {
        "x" => Some(x),
        "q" => Some(q),
        "s" => Some(scales),
        _ => None,
    })
    .unwrap();
    out["y"].clone()
}

/// Random signed 4-bit values with −8 and 7 in every group, packed as the kernel reads them.
fn weights(rng: &mut ChaCha8Rng, n: usize, k: usize, group: usize) -> (Tensor, Vec<u8>) {
    let mut q: Vec<f32> = (0..n * k)
        .map(|_| rng.random_range(-8..=7) as f32)
        .collect();
    for j in 0..n {
        for g in 0..k / group {
            let base = j * k + g * group;
            q[base + rng.random_range(0..group)] = -8.0;
            q[base + rng.random_range(0..group)] = 7.0;
        }
    }
    let packed = q
        .chunks_exact(2)
        .map(|p| ((p[0] as i32 + 8) as u8) | (((p[1] as i32 + 8) as u8) << 4))
        .collect();
    (Tensor::new(DType::I4, &[n, k], q).unwrap(), packed)
}

#[test]
fn matches_the_interpreter_on_random_weights() {
    let jit = CpuJit::new().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(0x1a7);
    for (group, tile_rows) in [(16, 1), (64, 4), (128, 3)] {
        let kernel = jit
            .int4_dot(Int4DotSpec {
                group_size: group,
                tile_rows,
            })
            .unwrap();
        for (m, n, k) in [(1, 3, group), (5, 70, 2 * group), (9, 130, 4 * group)] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
            let (q, packed) = weights(&mut rng, n, k, group);
            let scales: Vec<f32> = (0..n * k / group)
                .map(|_| half::f16::from_f32(rng.random_range(0.001..0.1)).to_f32())
                .collect();
            let want = interpreter(
                &Tensor::f32(&[m, k], x.clone()),
                &q,
                &Tensor::new(DType::F16, &[n, k / group], scales.clone()).unwrap(),
                group,
            );
            let mut got = vec![f32::NAN; m * n];
            kernel
                .run(
                    &x,
                    &packed,
                    &scales,
                    &mut got,
                    (m, n, k),
                    Parallelism::Rayon,
                )
                .unwrap();
            let got = Tensor::f32(&[m, n], got.clone());
            assert!(got.data.iter().all(|v| v.is_finite()), "NaN left in C");
            let error = got.relative_error(&want);
            assert!(
                error < 1e-5,
                "group {group}, {m}×{n}×{k}: relative error {error}"
            );
            let mut sequential = vec![f32::NAN; m * n];
            kernel
                .run(
                    &x,
                    &packed,
                    &scales,
                    &mut sequential,
                    (m, n, k),
                    Parallelism::Sequential,
                )
                .unwrap();
            assert_eq!(sequential, got.data, "threads change the result");
        }
    }
}

#[test]
fn operand_errors_name_the_operand() {
    let jit = CpuJit::new().unwrap();
    let kernel = jit.int4_dot(Int4DotSpec::new(32)).unwrap();
    let (a, b, s) = (vec![0.0; 64], vec![0u8; 32], vec![1.0; 2]);
    let mut c = vec![0.0; 1];
    let error = kernel
        .run(&a, &b, &s, &mut c, (1, 1, 48), Parallelism::Sequential)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("`k`") && error.contains("group size 32"),
        "{error}"
    );
    let error = kernel
        .run(
            &a,
            &b[..31],
            &s,
            &mut c,
            (1, 1, 64),
            Parallelism::Sequential,
        )
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("`b`") && error.contains("length 31"),
        "{error}"
    );
    assert!(jit.int4_dot(Int4DotSpec::new(24)).is_err());
}
