//! `kiln bench`: one file per suite, each timing generated kernels on the GPU with CUDA
//! events and returning rows that serialise to the JSON `bench/compare.py` sets beside the
//! PyTorch baseline of the same run (`bench/torch_baselines.py --suite SUITE`).
//!
//! - `gemm`: GEMV/GEMM at K = 4096, N = 14336 and 4096, M = 1..4096, f16 and bf16;
//! - `attention`: dense split-KV paged decode attention (batch 1 and 16, 32 query heads, 8
//!   and 32 KV heads, head_dim 128, contexts 4K..64K, f16) and causal paged prefill (batch 1,
//!   4K/8K/16K tokens, 8 KV heads, f16 and bf16), rows tagged by kind;
//! - `quest`: the Quest decode step (page estimate + top-K + sparse decode) against the
//!   dense decode of the same shape, budgets 1024/2048/4096 tokens;
//! - `moe`: one MoE layer (router linear, router, dispatch, expert FFN, combine) as a
//!   compiled plan run by the executor: Mixtral 8x7B at 1..4096 tokens, Qwen3-30B-A3B at 1
//!   and 64 tokens, bf16.
//!
//! `paged` holds what the paged suites share: the page pool (filled by the KV-append
//! kernel), rotated shuffled page sets, the decode launch pair and the rotating timer.
//! `plan_step` times the same decode (dense and Quest) as the attention step of a compiled
//! decode plan, run by the executor that runs model plans; the `attention` and `quest` rows
//! carry both figures, measured in the same run.
//!
//! Without a GPU every suite fails with the runtime's "no CUDA driver found" error. These
//! modules measure; they assert nothing about speed.

pub mod attention;
pub mod gemm;
pub mod moe;
pub mod paged;
pub mod plan_step;
pub mod quest;

pub use gemm::{bench_gemm, render, BenchRecord, BenchReport};

use kiln_ir::dtype::DType;
use kiln_ir::tensor::Tensor;
use kiln_runtime::cuda::CudaDevice;
use serde::Serialize;

/// A suite's rows with the device they were measured on (`{"device", "records"}`, the shape
/// `bench/compare.py` reads), and notes such as shapes skipped for lack of memory.
#[derive(Clone, Debug, Serialize)]
pub struct SuiteReport<R> {
    pub device: String,
    pub records: Vec<R>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl<R> SuiteReport<R> {
    /// An empty report for `device`.
    pub fn new(device: &CudaDevice) -> SuiteReport<R> {
        SuiteReport {
            device: device.info().name.clone(),
            records: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// The notes, one `note: …` line each.
    pub fn render_notes(&self) -> String {
        self.notes.iter().map(|n| format!("note: {n}\n")).collect()
    }
}

/// Hash-derived bench data (cheap for gigabytes of weights or caches): magnitude in
/// `[1/64, 1) · scale`, random sign, never zero, never NaN.
pub fn hash_values(dtype: DType, shape: &[usize], seed: u64, scale: f32) -> Tensor {
    use rayon::prelude::*;
    let count: usize = shape.iter().product();
    let seed = seed.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    let data = (0..count as u64)
        .into_par_iter()
        .map(|i| {
            let mut x = (i ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            x ^= x >> 29;
            x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x ^= x >> 32;
            let magnitude = ((1 + (x & 63)) as f32 / 64.0 - 1.0 / 128.0) * scale;
            if x & (1 << 40) == 0 {
                magnitude
            } else {
                -magnitude
            }
        })
        .collect();
    Tensor {
        dtype,
        shape: shape.to_vec(),
        data,
    }
}
