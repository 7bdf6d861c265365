//! GPU tests of the tensor-core GEMM generator (`kiln_kernels::gemm`) against
//! `kiln_ir::interp`: every dtype and epilogue, both stock tiles and the first version's
//! main loop (`Pipeline::Basic`), M not a multiple of the
//! block tile, N not a multiple of it, K shorter than the pipeline; fresh random inputs with
//! planted large rows and columns (a mis-indexed tile shows in the per-row and per-column
//! errors), outputs poisoned before each launch, relative error ≤ 1e-2. One test times the
//! Llama/Mixtral FFN shape M = 4096, K = 4096, N = 14336 and prints TFLOP/s.
//! Run on a GPU machine with `cargo test --test gpu_gemm -- --ignored --nocapture`.

mod common;

use common::{assert_close, device, fresh_seed, random, rng, tolerance};
use kiln::ir::dtype::DType;
use kiln::ir::graph::{Graph, ValueId};
use kiln::ir::interp;
use kiln::ir::op::{InputKind, Op};
use kiln::ir::shape::Shape;
use kiln::ir::tensor::Tensor;
use kiln_kernels::gemm::{generate, GemmSpec, GemmTile, Pipeline};
use kiln_kernels::Epilogue;
use kiln_runtime::cuda::{Args, CudaDevice, DeviceTensor, LoadedKernel};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

/// The inputs of one GEMM problem on the host.
struct Problem {
    dtype: DType,
    epilogue: Epilogue,
    m: usize,
    n: usize,
    k: usize,
    x: Tensor,
    /// `[N, K]`, or `[2N, K]` (gate rows, then up rows) for SwiGLU.
    weight: Tensor,
    /// `bias` `[N]` or `residual` `[M, N]`.
    extra: Option<Tensor>,
}

impl Problem {
    /// Fresh random inputs. Planted structure: every fifth row of `x` is 16× larger and every
    /// seventh weight row 4× larger, so rows and columns of very different magnitudes sit next
    /// to each other.
    fn random(
        dtype: DType,
        epilogue: Epilogue,
        (m, n, k): (usize, usize, usize),
        rng: &mut ChaCha8Rng,
    ) -> Problem {
        let mut x = random(dtype, &[m, k], 1.0, rng);
        for (r, row) in x.data.chunks_mut(k).enumerate() {
            if r % 5 == 3 {
                row.iter_mut().for_each(|v| *v = dtype.round(*v * 16.0));
            }
        }
        let rows = n * epilogue.weight_rows_per_output();
        let mut weight = random(dtype, &[rows, k], 1.0 / (k as f32).sqrt(), rng);
        for (r, row) in weight.data.chunks_mut(k).enumerate() {
            if r % 7 == 2 {
                row.iter_mut().for_each(|v| *v = dtype.round(*v * 4.0));
            }
        }
        let extra = match epilogue {
            Epilogue::Bias => Some(random(dtype, &[n], 1.0, rng)),
            Epilogue::Residual => Some(random(dtype, &[m, n], 1.0, rng)),
            Epilogue::None | Epilogue::SwiGlu => None,
        };
        Problem {
            dtype,
            epilogue,
            m,
            n,
            k,
            x,
            weight,
            extra,
        }
    }

    /// The reference output through the interpreter: `Linear` (+ `Add` for bias and
    /// residual; two `Linear`s over the weight's halves, `Silu` and `Mul` for SwiGLU).
    ///
    /// The graph runs in f32 on the (already rounded) inputs and only the result is rounded
    /// to the dtype: that is the fused kernel's contract (f32 accumulators, epilogue in f32,
    /// one rounding at the store). A graph in bf16 would also round the gate and up products
    /// before the activation, an error of its own that per-column checks would charge to the
    /// kernel.
    fn reference(&self) -> Tensor {
        let (n, k) = (self.n, self.k);
        let mut g = Graph::new("gemm");
        let mut inputs: HashMap<String, Tensor> = HashMap::new();
        let mut input = |g: &mut Graph, name: &str, kind: InputKind, t: Tensor| -> ValueId {
            let t = t.cast(DType::F32);
            let v = g.input(name, kind, t.dtype, Shape::of(&t.shape)).unwrap();
            inputs.insert(name.to_string(), t);
            v
        };
        let x = input(&mut g, "x", InputKind::Activation, self.x.clone());
        let out = match self.epilogue {
            Epilogue::SwiGlu => {
                let half = |h: usize| {
                    let data = self.weight.data[h * n * k..(h + 1) * n * k].to_vec();
                    Tensor::new(self.dtype, &[n, k], data).unwrap()
                };
                let gate_w = input(&mut g, "gate_proj", InputKind::Weight, half(0));
                let up_w = input(&mut g, "up_proj", InputKind::Weight, half(1));
                let gate = g.add1("gate", Op::Linear, &[x, gate_w]).unwrap();
                let up = g.add1("up", Op::Linear, &[x, up_w]).unwrap();
                let act = g.add1("silu", Op::Silu, &[gate]).unwrap();
                g.add1("mul", Op::Mul, &[act, up]).unwrap()
            }
            _ => {
                let w = input(&mut g, "weight", InputKind::Weight, self.weight.clone());
                let y = g.add1("linear", Op::Linear, &[x, w]).unwrap();
                match &self.extra {
                    Some(extra) => {
                        let e = input(&mut g, "extra", InputKind::Activation, extra.clone());
                        g.add1("add", Op::Add, &[y, e]).unwrap()
                    }
                    None => y,
                }
            }
        };
        g.output("out", out);
        let exact = interp::run(&g, &inputs).unwrap().remove("out").unwrap();
        exact.cast(self.dtype)
    }

    /// Uploads the inputs, launches `kernel` on a poisoned output and downloads it.
    fn run(&self, device: &CudaDevice, kernel: &LoadedKernel) -> Tensor {
        let x = DeviceTensor::upload(device, &self.x).unwrap();
        let weight = DeviceTensor::upload(device, &self.weight).unwrap();
        let extra = self
            .extra
            .as_ref()
            .map(|e| DeviceTensor::upload(device, e).unwrap());
        let out = DeviceTensor::poisoned(device, self.dtype, &[self.m, self.n]).unwrap();
        let mut args = Args::new()
            .buffer("x", x.arg())
            .buffer("weight", weight.arg())
            .buffer("out", out.arg())
            .u32("m", self.m as u32)
            .u32("n", self.n as u32);
        if let (Some(name), Some(extra)) = (self.epilogue.extra_param(), &extra) {
            args = args.buffer(name, extra.arg());
        }
        kernel.launch(&args).unwrap();
        device.synchronize().unwrap();
        out.download().unwrap()
    }
}

/// ‖a − b‖ / ‖b‖ over the elements `indices`.
fn relative_error(got: &Tensor, want: &Tensor, indices: impl Iterator<Item = usize>) -> f64 {
    let (mut error, mut norm) = (0f64, 0f64);
    for i in indices {
        let (g, w) = (got.data[i] as f64, want.data[i] as f64);
        error += (g - w) * (g - w);
        norm += w * w;
    }
    if norm == 0.0 {
        error.sqrt()
    } else {
        (error / norm).sqrt()
    }
}

/// The whole-tensor check, then every row and every column on its own: a tile written to
/// the wrong place stands out in its rows and columns even where larger ones dominate the
/// overall norm.
fn assert_gemm_close(what: &str, got: &Tensor, want: &Tensor, dtype: DType) {
    let tol = tolerance(dtype);
    assert_close(what, got, want, tol);
    let (m, n) = (want.shape[0], want.shape[1]);
    for r in 0..m {
        let e = relative_error(got, want, (0..n).map(|c| r * n + c));
        assert!(e <= tol, "{what}: row {r}: relative error {e:.3e}");
    }
    if m >= 16 {
        for c in 0..n {
            let e = relative_error(got, want, (0..m).map(|r| r * n + c));
            assert!(e <= tol, "{what}: column {c}: relative error {e:.3e}");
        }
    }
}

/// (M, N, K): M of 16, 100, 256 and 300 (tails of both tiles), N a multiple of neither
/// block_n (520, 384), K of one slice (shorter than the pipeline) and of several.
const SHAPES: [(usize, usize, usize); 6] = [
    (16, 512, 256),
    (100, 384, 512),
    (256, 1024, 1024),
    (300, 520, 320),
    (48, 256, 64),
    (129, 264, 192),
];

fn check(dtype: DType, epilogue: Epilogue, test: &str) {
    let device = device();
    let mut rng = rng(fresh_seed(test));
    let basic = GemmTile {
        pipeline: Pipeline::Basic,
        ..GemmTile::h100(epilogue)
    };
    for tile in [GemmTile::h100(epilogue), GemmTile::small(epilogue), basic] {
        for (m, n, k) in SHAPES {
            let spec = GemmSpec {
                dtype,
                k,
                tile,
                epilogue,
                grouping: None,
            };
            let kernel = device.load(&generate(&spec).unwrap()).unwrap();
            let problem = Problem::random(dtype, epilogue, (m, n, k), &mut rng);
            let got = problem.run(&device, &kernel);
            let want = problem.reference();
            let what = format!("{} m={m} n={n}", spec.entry_name());
            assert_gemm_close(&what, &got, &want, dtype);
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gemm_f16_plain_matches_the_interpreter() {
    check(DType::F16, Epilogue::None, "gemm_f16_plain");
}

#[test]
#[ignore = "needs a CUDA device"]
fn gemm_f16_bias_matches_the_interpreter() {
    check(DType::F16, Epilogue::Bias, "gemm_f16_bias");
}

#[test]
#[ignore = "needs a CUDA device"]
fn gemm_f16_residual_matches_the_interpreter() {
    check(DType::F16, Epilogue::Residual, "gemm_f16_residual");
}

#[test]
#[ignore = "needs a CUDA device"]
fn gemm_f16_swiglu_matches_the_interpreter() {
    check(DType::F16, Epilogue::SwiGlu, "gemm_f16_swiglu");
}

#[test]
#[ignore = "needs a CUDA device"]
fn gemm_bf16_plain_matches_the_interpreter() {
    check(DType::BF16, Epilogue::None, "gemm_bf16_plain");
}

#[test]
#[ignore = "needs a CUDA device"]
fn gemm_bf16_bias_matches_the_interpreter() {
    check(DType::BF16, Epilogue::Bias, "gemm_bf16_bias");
}

#[test]
#[ignore = "needs a CUDA device"]
fn gemm_bf16_residual_matches_the_interpreter() {
    check(DType::BF16, Epilogue::Residual, "gemm_bf16_residual");
}

#[test]
#[ignore = "needs a CUDA device"]
fn gemm_bf16_swiglu_matches_the_interpreter() {
    check(DType::BF16, Epilogue::SwiGlu, "gemm_bf16_swiglu");
}

/// The FFN shapes at K = 4096, N = 14336 (Llama-3-8B up/gate, Mixtral expert) with an M
/// tail, checked in full against the interpreter.
#[test]
#[ignore = "needs a CUDA device"]
fn gemm_at_the_llama_ffn_shape_matches_the_interpreter() {
    let device = device();
    let mut rng = rng(fresh_seed("gemm_llama_ffn"));
    for (dtype, epilogue) in [
        (DType::F16, Epilogue::None),
        (DType::BF16, Epilogue::SwiGlu),
        (DType::F16, Epilogue::Residual),
    ] {
        let spec = GemmSpec::new(dtype, 4096, epilogue);
        let kernel = device.load(&generate(&spec).unwrap()).unwrap();
        let problem = Problem::random(dtype, epilogue, (100, 14336, 4096), &mut rng);
        let got = problem.run(&device, &kernel);
        let want = problem.reference();
        assert_gemm_close(&spec.entry_name(), &got, &want, dtype);
    }
}

/// Times M = 4096, K = 4096, N = 14336 (f16, plain and SwiGLU) for a few tiles and both
/// main-loop pipelines and prints TFLOP/s, then the fastest per epilogue (cuBLAS: ~736 on
/// the lent H100, ~710 on the H200); checks a band of rows of each result against the
/// interpreter.
#[test]
#[ignore = "needs a CUDA device"]
fn gemm_throughput_at_m4096_k4096_n14336() {
    let device = device();
    let mut rng = rng(fresh_seed("gemm_throughput"));
    let (m, n, k) = (4096usize, 14336usize, 4096usize);
    // The first version's schedule (the default before the pipelined main loop), for a
    // side-by-side comparison in the same run.
    let basic = |epilogue| GemmTile {
        pipeline: Pipeline::Basic,
        ..GemmTile::h100(epilogue)
    };
    let big = |epilogue| GemmTile {
        block_k: 32,
        stages: 4,
        ..GemmTile::h100(epilogue)
    };
    // 256×128 (plain only), 8 warps of 64×64, 64-wide K slices, 3 stages (144 KiB).
    let tall = GemmTile {
        block_m: 256,
        block_n: 128,
        warps_m: 4,
        warps_n: 2,
        ..GemmTile::h100(Epilogue::None)
    };
    // Two blocks per SM: 128×128, 4 warps of 64×64.
    let square = GemmTile {
        block_m: 128,
        block_n: 128,
        block_k: 32,
        warps_m: 2,
        warps_n: 2,
        stages: 4,
        min_blocks_per_sm: 2,
        pipeline: Pipeline::Fragments,
    };
    let square_k64 = GemmTile {
        block_k: 64,
        stages: 3,
        ..square
    };
    let mut table = Vec::new();
    for epilogue in [Epilogue::None, Epilogue::SwiGlu] {
        let problem = Problem::random(DType::F16, epilogue, (m, n, k), &mut rng);
        let x = DeviceTensor::upload(&device, &problem.x).unwrap();
        let weight = DeviceTensor::upload(&device, &problem.weight).unwrap();
        let mut tiles = vec![
            basic(epilogue),
            GemmTile::h100(epilogue),
            big(epilogue),
            GemmTile::small(epilogue),
        ];
        if epilogue == Epilogue::None {
            tiles.extend([tall, square, square_k64]);
        }
        for tile in tiles {
            let spec = GemmSpec {
                tile,
                ..GemmSpec::new(DType::F16, k, epilogue)
            };
            let kernel = device.load(&generate(&spec).unwrap()).unwrap();
            let out = DeviceTensor::poisoned(&device, DType::F16, &[m, n]).unwrap();
            let args = Args::new()
                .buffer("x", x.arg())
                .buffer("weight", weight.arg())
                .buffer("out", out.arg())
                .u32("m", m as u32)
                .u32("n", n as u32);
            let timing = device
                .time(|| kernel.launch(&args).map(drop), 5, 30)
                .unwrap();
            let flops = 2.0 * (m * n * k * epilogue.accumulators()) as f64;
            let tflops = flops / (timing.median_ms * 1e-3) / 1e12;
            table.push((
                epilogue,
                format!(
                    "{:<58} {:>8.3} ms {:>7.1} TFLOP/s",
                    spec.entry_name(),
                    timing.median_ms,
                    tflops
                ),
                tflops,
                spec.entry_name(),
            ));

            // Rows 2000..2016 of the result against the interpreter on those rows of x.
            let got = out.download().unwrap();
            let rows = 2000..2016;
            let band = Problem {
                m: rows.len(),
                x: Tensor::new(
                    DType::F16,
                    &[rows.len(), k],
                    problem.x.data[rows.start * k..rows.end * k].to_vec(),
                )
                .unwrap(),
                weight: problem.weight.clone(),
                extra: None,
                ..problem
            };
            let want = band.reference();
            let got_band = Tensor::new(
                DType::F16,
                &[rows.len(), n],
                got.data[rows.start * n..rows.end * n].to_vec(),
            )
            .unwrap();
            assert_gemm_close(&spec.entry_name(), &got_band, &want, DType::F16);
        }
    }
    eprintln!("gemm M={m} K={k} N={n} on {}", device.info());
    for (_, line, _, _) in &table {
        eprintln!("{line}");
    }
    for epilogue in [Epilogue::None, Epilogue::SwiGlu] {
        let rows = table.iter().filter(|row| row.0 == epilogue);
        if let Some(best) = rows.max_by(|a, b| a.2.total_cmp(&b.2)) {
            eprintln!(
                "fastest ({}): {} at {:.1} TFLOP/s",
                epilogue.name(),
                best.3,
                best.2
            );
        }
    }
}
