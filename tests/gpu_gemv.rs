//! GPU numerics of the decode GEMV (`kiln_kernels::gemv`) against `kiln::ir::interp`, and a
//! bandwidth report. Every test needs a CUDA device: run with `cargo test --test gpu_gemv
//! -- --ignored` on the GPU machine.
//!
//! Each case draws fresh random inputs (seed printed; `KILN_TEST_SEED` reproduces it),
//! poisons the output, plants a few large weight rows (so a mis-indexed row or a swapped
//! gate/up half shows in the error) and compares with the interpreter on an IR graph built
//! from `Op::Linear` (+ `Op::Add`; SwiGLU: two Linears on the weight halves, `Op::Silu`,
//! `Op::Mul`).

mod common;

use std::collections::HashMap;

use kiln::ir::dtype::DType;
use kiln::ir::graph::Graph;
use kiln::ir::interp;
use kiln::ir::op::{InputKind, Op};
use kiln::ir::shape::Shape;
use kiln::ir::tensor::Tensor;
use kiln_kernels::gemv::{self, GemvSpec};
use kiln_kernels::Epilogue;
use kiln_runtime::cuda::{Args, CudaDevice, DeviceTensor};
use rand_chacha::ChaCha8Rng;

const MS: [usize; 4] = [1, 3, 4, 16];
/// 64 (fewer columns than one block), 4096 + 8 (a partial last block), 4096 + 1 (a partial
/// last warp: an odd column count with two columns per warp), 14336 (Llama-3-8B's FFN).
const NS: [usize; 4] = [64, 4096 + 8, 4096 + 1, 14336];
const KS: [usize; 2] = [256, 4096];

/// Weight rows (of each half, for SwiGLU) scaled up by [`PLANT_SCALE`].
fn planted_rows(n: usize) -> Vec<usize> {
    let mut rows = vec![1, n / 2 + 1, n - 1];
    rows.dedup();
    rows
}

const PLANT_SCALE: f32 = 8.0;

/// A `[rows, k]` weight with standard deviation `1/sqrt(k)` (outputs of order 1) and the
/// planted rows of every `n`-row half scaled up.
fn weight(dtype: DType, halves: usize, n: usize, k: usize, rng: &mut ChaCha8Rng) -> Tensor {
    let std = 1.0 / (k as f32).sqrt();
    let mut w = common::random(dtype, &[halves * n, k], std, rng);
    for half in 0..halves {
        for (i, row) in planted_rows(n).into_iter().enumerate() {
            // Different factors per row and per half, so swapping two planted rows shows.
            let factor = PLANT_SCALE + (i + 3 * half) as f32;
            let start = (half * n + row) * k;
            for v in &mut w.data[start..start + k] {
                *v = dtype.round(*v * factor);
            }
        }
    }
    w
}

/// Rows `first..first + rows` of a `[_, k]` tensor.
fn row_block(t: &Tensor, first: usize, rows: usize) -> Tensor {
    let k = t.shape[1];
    Tensor {
        dtype: t.dtype,
        shape: vec![rows, k],
        data: t.data[first * k..(first + rows) * k].to_vec(),
    }
}

/// The interpreter's result for `spec` on `x` `[m, k]`, `weight` `[n or 2n, k]` and the
/// epilogue's extra operand.
fn reference(spec: &GemvSpec, n: usize, x: &Tensor, w: &Tensor, extra: Option<&Tensor>) -> Tensor {
    let (dtype, m, k) = (spec.dtype, spec.m, spec.k);
    let mut g = Graph::new("gemv_reference");
    let mut inputs: HashMap<String, Tensor> = HashMap::new();
    let xv = g
        .input("x", InputKind::Activation, dtype, Shape::of(&[m, k]))
        .unwrap();
    inputs.insert("x".into(), x.clone());
    let mut linear = |g: &mut Graph, name: &str, w: Tensor| {
        let wv = g
            .input(name, InputKind::Weight, dtype, Shape::of(&[n, k]))
            .unwrap();
        inputs.insert(name.to_string(), w);
        g.add1(&format!("{name}_linear"), Op::Linear, &[xv, wv])
            .unwrap()
    };
    let y = match spec.epilogue {
        Epilogue::SwiGlu => {
            let gate = linear(&mut g, "gate", row_block(w, 0, n));
            let up = linear(&mut g, "up", row_block(w, n, n));
            let act = g.add1("silu", Op::Silu, &[gate]).unwrap();
            g.add1("mul", Op::Mul, &[act, up]).unwrap()
        }
        _ => linear(&mut g, "weight", w.clone()),
    };
    let y = match (spec.epilogue, extra) {
        (Epilogue::Bias, Some(bias)) => {
            let b = g
                .input("bias", InputKind::Weight, dtype, Shape::of(&[n]))
                .unwrap();
            inputs.insert("bias".into(), bias.clone());
            g.add1("add_bias", Op::Add, &[y, b]).unwrap()
        }
        (Epilogue::Residual, Some(residual)) => {
            let r = g
                .input("residual", InputKind::Activation, dtype, Shape::of(&[m, n]))
                .unwrap();
            inputs.insert("residual".into(), residual.clone());
            g.add1("add_residual", Op::Add, &[y, r]).unwrap()
        }
        _ => y,
    };
    g.output("out", y);
    interp::run(&g, &inputs)
        .unwrap_or_else(|e| panic!("reference: {e}"))
        .remove("out")
        .expect("output `out`")
}

/// Runs the kernel of `spec` on the device and returns `out`.
fn run_kernel(
    device: &CudaDevice,
    spec: &GemvSpec,
    n: usize,
    x: &Tensor,
    w: &Tensor,
    extra: Option<&Tensor>,
) -> Tensor {
    let kernel = gemv::generate(spec).unwrap();
    let x_dev = DeviceTensor::upload(device, x).unwrap();
    let w_dev = DeviceTensor::upload(device, w).unwrap();
    let extra_dev = extra.map(|t| DeviceTensor::upload(device, t).unwrap());
    let out = DeviceTensor::poisoned(device, spec.dtype, &[spec.m, n]).unwrap();
    let mut args = Args::new()
        .buffer("x", x_dev.arg())
        .buffer("weight", w_dev.arg())
        .buffer("out", out.arg())
        .u32("n", n as u32);
    if let (Some(name), Some(t)) = (spec.epilogue.extra_param(), &extra_dev) {
        args = args.buffer(name, t.arg());
    }
    device
        .load(&kernel)
        .and_then(|loaded| loaded.launch(&args))
        .unwrap_or_else(|e| panic!("{}: {e}", kernel.entry));
    device.synchronize().unwrap();
    out.download().unwrap()
}

/// The epilogue's extra operand for `spec`, if any.
fn extra_operand(spec: &GemvSpec, n: usize, rng: &mut ChaCha8Rng) -> Option<Tensor> {
    match spec.epilogue {
        Epilogue::Bias => Some(common::random(spec.dtype, &[n], 1.0, rng)),
        Epilogue::Residual => Some(common::random(spec.dtype, &[spec.m, n], 1.0, rng)),
        Epilogue::None | Epilogue::SwiGlu => None,
    }
}

/// Checks one spec at one `n` against the interpreter on fresh inputs.
fn check(device: &CudaDevice, spec: &GemvSpec, n: usize, w: &Tensor, rng: &mut ChaCha8Rng) {
    let x = common::random(spec.dtype, &[spec.m, spec.k], 1.0, rng);
    let extra = extra_operand(spec, n, rng);
    let got = run_kernel(device, spec, n, &x, w, extra.as_ref());
    let want = reference(spec, n, &x, w, extra.as_ref());
    let what = format!("{} n={n}", spec.entry_name());
    common::assert_close(&what, &got, &want, common::tolerance(spec.dtype));
}

/// Every M, N and K of the sweep for one dtype and epilogue; the weight is drawn once per
/// (N, K) and shared by the M values, `x` and the epilogue operand once per case.
fn sweep(dtype: DType, epilogue: Epilogue, test: &str) {
    let device = common::device();
    let mut rng = common::rng(common::fresh_seed(test));
    for k in KS {
        for n in NS {
            let w = weight(dtype, epilogue.weight_rows_per_output(), n, k, &mut rng);
            for m in MS {
                check(
                    &device,
                    &GemvSpec::new(dtype, m, k, epilogue),
                    n,
                    &w,
                    &mut rng,
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gemv_f16_plain_matches_interp() {
    sweep(DType::F16, Epilogue::None, "gemv_f16_plain");
}

#[test]
#[ignore = "needs a CUDA device"]
fn gemv_f16_bias_matches_interp() {
    sweep(DType::F16, Epilogue::Bias, "gemv_f16_bias");
}

#[test]
#[ignore = "needs a CUDA device"]
fn gemv_f16_residual_matches_interp() {
    sweep(DType::F16, Epilogue::Residual, "gemv_f16_residual");
}

#[test]
#[ignore = "needs a CUDA device"]
fn gemv_f16_swiglu_matches_interp() {
    sweep(DType::F16, Epilogue::SwiGlu, "gemv_f16_swiglu");
}

#[test]
#[ignore = "needs a CUDA device"]
fn gemv_bf16_plain_matches_interp() {
    sweep(DType::BF16, Epilogue::None, "gemv_bf16_plain");
}

#[test]
#[ignore = "needs a CUDA device"]
fn gemv_bf16_bias_matches_interp() {
    sweep(DType::BF16, Epilogue::Bias, "gemv_bf16_bias");
}

#[test]
#[ignore = "needs a CUDA device"]
fn gemv_bf16_residual_matches_interp() {
    sweep(DType::BF16, Epilogue::Residual, "gemv_bf16_residual");
}

#[test]
#[ignore = "needs a CUDA device"]
fn gemv_bf16_swiglu_matches_interp() {
    sweep(DType::BF16, Epilogue::SwiGlu, "gemv_bf16_swiglu");
}

/// Tuning knobs off the default path: rows per warp that do not divide N, a K loop with a
/// tail (11008 = 43 chunks), one column per warp, every M up to 16 for some of them.
#[test]
#[ignore = "needs a CUDA device"]
fn gemv_tuning_variants_match_interp() {
    let device = common::device();
    let mut rng = common::rng(common::fresh_seed("gemv_tuning_variants"));
    let cases = [
        (DType::BF16, 2, 11008, Epilogue::Bias, (3, 3, 3), 4099),
        (DType::F16, 1, 4096, Epilogue::None, (1, 8, 8), 4096),
        (DType::F16, 5, 1280, Epilogue::SwiGlu, (2, 2, 3), 777),
        (DType::BF16, 16, 768, Epilogue::Residual, (1, 1, 1), 33),
        (DType::F16, 7, 512, Epilogue::None, (8, 4, 2), 5),
    ];
    for (dtype, m, k, epilogue, (rows, warps, unroll), n) in cases {
        let spec = GemvSpec::new(dtype, m, k, epilogue).with_tuning(rows, warps, unroll);
        let w = weight(dtype, epilogue.weight_rows_per_output(), n, k, &mut rng);
        check(&device, &spec, n, &w, &mut rng);
    }
}

/// The same inputs give bit-identical outputs (no atomics, no split-K).
#[test]
#[ignore = "needs a CUDA device"]
fn gemv_is_deterministic() {
    let device = common::device();
    let mut rng = common::rng(common::fresh_seed("gemv_is_deterministic"));
    let (n, k) = (4104, 4096);
    for epilogue in [Epilogue::None, Epilogue::SwiGlu] {
        let spec = GemvSpec::new(DType::BF16, 4, k, epilogue);
        let w = weight(
            DType::BF16,
            epilogue.weight_rows_per_output(),
            n,
            k,
            &mut rng,
        );
        let x = common::random(DType::BF16, &[spec.m, k], 1.0, &mut rng);
        let first = run_kernel(&device, &spec, n, &x, &w, None);
        let second = run_kernel(&device, &spec, n, &x, &w, None);
        let bits = |t: &Tensor| t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&first), bits(&second), "{}", spec.entry_name());
    }
}

/// Weight bandwidth at decode shapes (reported, not asserted): median of 50 launches after
/// 10 warm-ups, rotating among weight copies that together exceed the 50 MB L2.
#[test]
#[ignore = "needs a CUDA device"]
fn gemv_bandwidth_report() {
    let device = common::device();
    let mut rng = common::rng(common::fresh_seed("gemv_bandwidth_report"));
    eprintln!("{}", device.info());
    let shapes = [
        (DType::F16, 1, 4096, 14336, Epilogue::None),
        (DType::F16, 1, 4096, 4096, Epilogue::None),
        (DType::F16, 1, 14336, 4096, Epilogue::None),
        (DType::BF16, 1, 4096, 14336, Epilogue::SwiGlu),
        (DType::BF16, 4, 4096, 14336, Epilogue::SwiGlu),
        (DType::F16, 16, 4096, 4096, Epilogue::Residual),
    ];
    eprintln!(
        "{:<40} {:>6} {:>6} {:>10} {:>10}",
        "kernel", "N", "K", "median us", "GB/s"
    );
    for (dtype, m, k, n, epilogue) in shapes {
        let spec = GemvSpec::new(dtype, m, k, epilogue);
        let kernel = gemv::generate(&spec).unwrap();
        let loaded = device.load(&kernel).unwrap();
        let rows = n * epilogue.weight_rows_per_output();
        let weight_bytes = rows * k * 2;
        let copies = (200_000_000 / weight_bytes).clamp(1, 8);
        let weights: Vec<DeviceTensor> = (0..copies)
            .map(|_| {
                let w = Tensor::uniform(dtype, &[rows, k], 0.05, &mut rng);
                DeviceTensor::upload(&device, &w).unwrap()
            })
            .collect();
        let x =
            DeviceTensor::upload(&device, &common::random(dtype, &[m, k], 1.0, &mut rng)).unwrap();
        let out = DeviceTensor::poisoned(&device, dtype, &[m, n]).unwrap();
        let extra =
            extra_operand(&spec, n, &mut rng).map(|t| DeviceTensor::upload(&device, &t).unwrap());
        let mut turn = 0usize;
        let timing = device
            .time(
                || {
                    let mut args = Args::new()
                        .buffer("x", x.arg())
                        .buffer("weight", weights[turn % copies].arg())
                        .buffer("out", out.arg())
                        .u32("n", n as u32);
                    if let (Some(name), Some(t)) = (epilogue.extra_param(), &extra) {
                        args = args.buffer(name, t.arg());
                    }
                    turn += 1;
                    loaded.launch(&args).map(drop)
                },
                10,
                50,
            )
            .unwrap();
        let seconds = timing.median_ms * 1e-3;
        let bytes = weight_bytes + (m * k + m * n) * 2;
        eprintln!(
            "{:<40} {:>6} {:>6} {:>10.1} {:>10.0}",
            kernel.entry,
            n,
            k,
            seconds * 1e6,
            bytes as f64 / seconds / 1e9
        );
    }
}
