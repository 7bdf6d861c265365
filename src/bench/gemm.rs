//! `kiln bench gemm`: times generated GEMV/GEMM kernels on the GPU with CUDA events and writes JSON that
//! `bench/compare.py` sets beside the PyTorch baseline of the same run.
//!
//! Protocol (DESIGN.md): warm-up, median of many launches, inputs rotated through more
//! memory than the L2 cache holds, fresh random (never zero) data. Without a GPU every suite
//! fails with the runtime's "no CUDA driver found" error. This module measures; it asserts
//! nothing about speed.

use anyhow::{Context, Result};
use kiln_codegen::kernel::GpuKernel;
use kiln_ir::dtype::DType;
use kiln_ir::tensor::Tensor;
use kiln_kernels::gemm::{self, GemmSpec};
use kiln_kernels::gemv::{self, GemvSpec};
use kiln_kernels::Epilogue;
use kiln_runtime::cuda::{Args, CudaDevice, DeviceTensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// Bytes the rotated weights of one shape must cover, so repeated launches miss the L2
/// cache (50 MB on H100).
const ROTATE_BYTES: usize = 256 << 20;
const WARMUP: usize = 10;
const ITERATIONS: usize = 100;

/// One timed configuration.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRecord {
    pub suite: String,
    #[serde(rename = "impl")]
    pub implementation: String,
    pub dtype: String,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub tflops: f64,
    pub gb_per_s: f64,
}

/// A suite's results with the device they were measured on.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub device: String,
    pub records: Vec<BenchRecord>,
}

/// The shapes of the GEMM suite: K = 4096, N ∈ {14336, 4096}, M ∈ {1, 4, 16, 64, 256, 4096}.
pub const GEMM_SHAPES: [(usize, usize); 2] = [(4096, 14336), (4096, 4096)];
pub const GEMM_ROWS: [usize; 6] = [1, 4, 16, 64, 256, 4096];

/// The kernel used for `m` rows: GEMV up to 16 rows, tensor-core GEMM from 16 on (both at 16).
fn gemm_kernels(dtype: DType, m: usize, k: usize) -> Result<Vec<(String, GpuKernel)>> {
    let mut kernels = Vec::new();
    if m <= 16 {
        let spec = GemvSpec::new(dtype, m, k, Epilogue::None);
        kernels.push(("kiln.gemv".to_string(), gemv::generate(&spec)?));
    }
    if m >= 16 {
        let spec = GemmSpec::for_rows(dtype, m, k, Epilogue::None);
        kernels.push(("kiln.gemm".to_string(), gemm::generate(&spec)?));
    }
    Ok(kernels)
}

/// Times the GEMV/GEMM kernels over [`GEMM_SHAPES`] × [`GEMM_ROWS`] in f16 and bf16,
/// calling `progress` after each configuration.
pub fn bench_gemm(
    device: &CudaDevice,
    mut progress: impl FnMut(&BenchRecord),
) -> Result<BenchReport> {
    let mut rng = ChaCha8Rng::seed_from_u64(0x6b696c6e);
    let mut records = Vec::new();
    for dtype in [DType::F16, DType::BF16] {
        for (k, n) in GEMM_SHAPES {
            let weight_bytes = n * k * 2;
            let copies = ROTATE_BYTES.div_ceil(weight_bytes).max(2);
            let weights: Vec<DeviceTensor> = (0..copies)
                .map(|_| {
                    let w = Tensor::uniform(dtype, &[n, k], 1.0 / (k as f32).sqrt(), &mut rng);
                    DeviceTensor::upload(device, &w)
                })
                .collect::<Result<_, _>>()?;
            for m in GEMM_ROWS {
                let x =
                    DeviceTensor::upload(device, &Tensor::uniform(dtype, &[m, k], 1.0, &mut rng))?;
                let out = DeviceTensor::poisoned(device, dtype, &[m, n])?;
                for (name, kernel) in gemm_kernels(dtype, m, k)? {
                    let loaded = device.load(&kernel)?;
                    let mut launch = 0usize;
                    let timing = device
                        .time(
                            || {
                                let w = &weights[launch % copies];
                                launch += 1;
                                let mut args = Args::new()
                                    .buffer("x", x.arg())
                                    .buffer("weight", w.arg())
                                    .buffer("out", out.arg())
                                    .u32("n", n as u32);
                                if kernel.param("m").is_some() {
                                    args = args.u32("m", m as u32);
                                }
                                loaded.launch(&args).map(drop)
                            },
                            WARMUP,
                            ITERATIONS,
                        )
                        .with_context(|| format!("timing {name} {dtype} M={m} N={n} K={k}"))?;
                    let bytes = (weight_bytes + (m * k + m * n) * 2) as f64;
                    let record = BenchRecord {
                        suite: "gemm".into(),
                        implementation: name,
                        dtype: dtype.name().into(),
                        m,
                        n,
                        k,
                        median_ms: timing.median_ms,
                        min_ms: timing.min_ms,
                        tflops: 2.0 * (m * n * k) as f64 / timing.median_ms / 1e9,
                        gb_per_s: bytes / timing.median_ms / 1e6,
                    };
                    progress(&record);
                    records.push(record);
                }
            }
        }
    }
    Ok(BenchReport {
        device: device.info().name.clone(),
        records,
    })
}

/// The report as a text table.
pub fn render(report: &BenchReport) -> String {
    let mut out = format!("device: {}\n", report.device);
    out.push_str(&format!(
        "{:<10} {:<5} {:>5} {:>6} {:>5} {:>10} {:>9} {:>8}\n",
        "kernel", "dtype", "M", "N", "K", "median µs", "TFLOP/s", "GB/s"
    ));
    for r in &report.records {
        out.push_str(&format!(
            "{:<10} {:<5} {:>5} {:>6} {:>5} {:>10.1} {:>9.1} {:>8.0}\n",
            r.implementation,
            r.dtype,
            r.m,
            r.n,
            r.k,
            r.median_ms * 1e3,
            r.tflops,
            r.gb_per_s
        ));
    }
    out
}
