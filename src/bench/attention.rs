//! `kiln bench attention`: times attention over the paged KV cache on the GPU with CUDA
//! events, for `bench/torch_baselines.py --suite attention` to set beside PyTorch's SDPA.
//! Every row says its kind:
//!
//! - **decode** (`kiln.decode`): split-KV decode attention (`kiln_kernels::attention::decode`,
//!   dense, default tuning: partial + merge kernels). Batch 1 and 16, 32 query heads, 8 and
//!   32 KV heads, head_dim 128, f16, contexts 4K to 64K (every sequence of a batch at the full
//!   context). The split count is [`DecodeAttentionSpec::splits`] for the device's SM count.
//!   GB/s counts the K and V bytes of the attended tokens once (what must cross HBM). Page
//!   sets are rotated past the L2 (see `paged`). The partial kernel alone and the fused-merge
//!   mode (one launch, the last block of a group merges) are timed too, for comparison.
//! - **prefill** (`kiln.prefill`): causal prefill (`kiln_kernels::attention::prefill`, default
//!   tile [`PrefillTile::h100`]) of one sequence of 4K, 8K and 16K tokens (all new: `q_lens
//!   = seq_lens = tokens`), 32 query heads, 8 KV heads, head_dim 128, f16 and bf16. TFLOP/s
//!   counts the causal FLOPs `4 · S² · D · Hq / 2` (QKᵀ and PV over the lower triangle). One
//!   page set: the kernel is compute-bound and its 8–32 MB of K/V sit in L2 after the first
//!   tile wave whatever is rotated.
//!
//! Protocol (DESIGN.md, shared with `quest` through `paged`): warm-up, median of
//! [`paged::ITERATIONS`] launches timed with CUDA events, pages in a shuffled physical
//! order, random (never zero) data written by the KV-append kernel. Every output is checked
//! to be fully written and finite. This module measures; it asserts nothing about speed.
//!
//! [`DecodeAttentionSpec::splits`]: kiln_kernels::attention::decode::DecodeAttentionSpec::splits
//! [`PrefillTile::h100`]: kiln_kernels::attention::prefill::PrefillTile::h100

use super::paged::{self, Decode, PagePool, PageSets, RowShape};
use super::plan_step::{self, DecodeStep};
use super::SuiteReport;
use anyhow::{Context, Result};
use kiln_ir::dtype::DType;
use kiln_kernels::attention::decode::MergeMode;
use kiln_kernels::attention::prefill::{self, PrefillAttentionSpec};
use kiln_runtime::cuda::{Args, CudaDevice, DeviceTensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::sync::Arc;

/// Decode context lengths in tokens.
pub const ATTENTION_CONTEXTS: [usize; 5] = [4096, 8192, 16384, 32768, 65536];
pub const ATTENTION_BATCHES: [usize; 2] = [1, 16];
pub const ATTENTION_KV_HEADS: [usize; 2] = [8, 32];
pub const ATTENTION_Q_HEADS: usize = 32;
pub const ATTENTION_HEAD_DIM: usize = 128;
/// Prefill prompt lengths in tokens (batch 1, 8 KV heads).
pub const PREFILL_TOKENS: [usize; 3] = [4096, 8192, 16384];
pub const PREFILL_KV_HEADS: usize = 8;

/// One timed configuration, tagged `"kind": "decode"` or `"kind": "prefill"` in JSON.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Row {
    Decode(DecodeRow),
    Prefill(PrefillRow),
}

/// Dense split-KV decode of one query token per sequence.
#[derive(Clone, Debug, Serialize)]
pub struct DecodeRow {
    #[serde(flatten)]
    pub shape: RowShape,
    /// Cached tokens each sequence attends.
    pub context: usize,
    pub page_size: usize,
    pub splits: usize,
    /// Page sets the timed launches rotate through.
    pub rotations: usize,
    /// The default decode (partial + merge kernels), median and best of
    /// [`paged::ITERATIONS`] launches.
    pub median_us: f64,
    pub min_us: f64,
    /// The merge fused into the partial kernel (one launch), median.
    pub fused_median_us: f64,
    /// The partial kernel alone, median.
    pub partial_median_us: f64,
    /// K and V bytes of the attended tokens over the median time.
    pub gb_per_s: f64,
    /// The same decode as the attention step of a compiled decode plan
    /// (`bench::plan_step`, contiguous cache), median and best; `None` when skipped.
    pub plan_median_us: Option<f64>,
    pub plan_min_us: Option<f64>,
    pub plan_rotations: Option<usize>,
}

/// Causal prefill of one sequence.
#[derive(Clone, Debug, Serialize)]
pub struct PrefillRow {
    #[serde(flatten)]
    pub shape: RowShape,
    /// Prompt tokens (all new; the causal square).
    pub tokens: usize,
    pub page_size: usize,
    pub block_q: usize,
    pub block_kv: usize,
    /// Median and best of [`paged::ITERATIONS`] launches.
    pub median_us: f64,
    pub min_us: f64,
    /// `4 · S² · D · Hq / 2` over the median time.
    pub tflops: f64,
}

impl Row {
    /// One line for progress output.
    pub fn describe(&self) -> String {
        match self {
            Row::Decode(r) => format!(
                "decode {} batch {} kv {} context {}: {:.1} µs",
                r.shape.dtype, r.shape.batch, r.shape.kv_heads, r.context, r.median_us
            ),
            Row::Prefill(r) => format!(
                "prefill {} kv {} tokens {}: {:.1} µs",
                r.shape.dtype, r.shape.kv_heads, r.tokens, r.median_us
            ),
        }
    }
}

/// Causal FLOPs of prefill over `tokens` tokens: `4 · S² · D · Hq / 2`.
pub fn causal_flops(tokens: usize, head_dim: usize, q_heads: usize) -> f64 {
    4.0 * (tokens as f64).powi(2) * (head_dim * q_heads) as f64 / 2.0
}

/// Times dense decode, then causal prefill, calling `on_row` after each configuration.
pub fn bench_attention(
    device: &Arc<CudaDevice>,
    mut on_row: impl FnMut(&Row),
) -> Result<SuiteReport<Row>> {
    let mut rng = ChaCha8Rng::seed_from_u64(0x6b696c6e);
    let mut report = SuiteReport::new(device);
    let mut push = |report: &mut SuiteReport<Row>, row: Row| {
        on_row(&row);
        report.records.push(row);
    };
    for batch in ATTENTION_BATCHES {
        for kv_heads in ATTENTION_KV_HEADS {
            let layout = paged::layout(DType::F16, ATTENTION_Q_HEADS, kv_heads, ATTENTION_HEAD_DIM);
            let (pages, contexts) = paged::plan_pool(
                device,
                &layout,
                batch,
                &ATTENTION_CONTEXTS,
                paged::ROTATE_BYTES,
                &mut report.notes,
            );
            if contexts.is_empty() {
                continue;
            }
            let pool = PagePool::new(device, layout, pages, &mut rng)?;
            let q_elements = batch * layout.q_heads * layout.head_dim;
            let q = paged::random_buffer(device, layout.dtype, q_elements, &mut rng)?;
            for context in contexts {
                let mut row = time_decode(device, &pool, &q, batch, context, &mut rng)?;
                let step = DecodeStep::dense(&layout, batch, context);
                if let Some(figure) = plan_step::time_decode_step(device, &step, &mut report.notes)?
                {
                    row.plan_median_us = Some(figure.median_us);
                    row.plan_min_us = Some(figure.min_us);
                    row.plan_rotations = Some(figure.rotations);
                }
                push(&mut report, Row::Decode(row));
            }
        }
    }
    for dtype in [DType::F16, DType::BF16] {
        for tokens in PREFILL_TOKENS {
            let row = time_prefill(device, dtype, tokens, &mut rng)?;
            push(&mut report, Row::Prefill(row));
        }
    }
    Ok(report)
}

/// Dense decode of `batch` sequences of `context` tokens over `pool`.
fn time_decode(
    device: &CudaDevice,
    pool: &PagePool,
    q: &kiln_runtime::cuda::DeviceBuffer<i32>,
    batch: usize,
    context: usize,
    rng: &mut ChaCha8Rng,
) -> Result<DecodeRow> {
    let layout = pool.layout;
    let kv_bytes = paged::kv_bytes(&layout, batch, context);
    let sets = PageSets::new(device, pool, batch, context, kv_bytes, rng)?;
    let decode = Decode::new(device, layout, false, batch, context)?;
    let fused = Decode::with_merge(device, layout, false, batch, context, MergeMode::LastBlock)?;
    let what = format!(
        "decode attention {} batch {batch} context {context}",
        layout.tag()
    );
    let total = paged::time_rotating(device, sets.rotations(), &what, |set| {
        decode.launch(q, pool, &sets, set, None)
    })?;
    decode.check_output(&what)?;
    let fused_total = paged::time_rotating(device, sets.rotations(), &what, |set| {
        fused.launch(q, pool, &sets, set, None)
    })?;
    fused.check_output(&what)?;
    let partial = paged::time_rotating(device, sets.rotations(), &what, |set| {
        decode.launch_partial(q, pool, &sets, set, None)
    })?;
    Ok(DecodeRow {
        shape: RowShape::new("attention", "kiln.decode", &layout, batch),
        context,
        page_size: layout.page_size,
        splits: decode.splits,
        rotations: sets.rotations(),
        median_us: total.median_ms * 1e3,
        min_us: total.min_ms * 1e3,
        fused_median_us: fused_total.median_ms * 1e3,
        partial_median_us: partial.median_ms * 1e3,
        gb_per_s: kv_bytes as f64 / total.median_ms / 1e6,
        plan_median_us: None,
        plan_min_us: None,
        plan_rotations: None,
    })
}

/// Causal prefill of one sequence of `tokens` tokens, default tile.
fn time_prefill(
    device: &CudaDevice,
    dtype: DType,
    tokens: usize,
    rng: &mut ChaCha8Rng,
) -> Result<PrefillRow> {
    let layout = paged::layout(
        dtype,
        ATTENTION_Q_HEADS,
        PREFILL_KV_HEADS,
        ATTENTION_HEAD_DIM,
    );
    let spec = PrefillAttentionSpec::new(layout);
    let kernel = device.load(&prefill::generate(&spec)?)?;
    let pool = PagePool::new(device, layout, tokens.div_ceil(layout.page_size), rng)?;
    // One set: usize::MAX bytes per step asks for no rotation.
    let sets = PageSets::new(device, &pool, 1, tokens, usize::MAX, rng)?;
    let q_shape = [1, tokens, layout.q_heads, layout.head_dim];
    let q = paged::random_buffer(device, dtype, q_shape.iter().product(), rng)?;
    let q_lens = paged::upload_i32(device, &[tokens as i32])?;
    let out = DeviceTensor::poisoned(device, dtype, &q_shape)?;
    let args = Args::new()
        .buffer("q", &q)
        .buffer("k_pages", &pool.k_pages)
        .buffer("v_pages", &pool.v_pages)
        .buffer("page_table", sets.table(0))
        .buffer("seq_lens", &sets.seq_lens)
        .buffer("q_lens", &q_lens)
        .buffer("out", out.arg())
        .u32("batch", 1)
        .u32("max_q", tokens as u32)
        .u32("max_pages", sets.pages_per_sequence as u32)
        .f32("scale", 1.0 / (layout.head_dim as f32).sqrt());
    let what = format!("causal prefill {} tokens {tokens}", layout.tag());
    let timing = paged::time_rotating(device, 1, &what, |_| kernel.launch(&args).map(drop))?;
    let written = out
        .download()
        .with_context(|| format!("reading the output of {what}"))?;
    anyhow::ensure!(
        written.data.iter().all(|v| v.is_finite()),
        "{what}: the output has unwritten or non-finite elements"
    );
    Ok(PrefillRow {
        shape: RowShape::new("attention", "kiln.prefill", &layout, 1),
        tokens,
        page_size: layout.page_size,
        block_q: spec.tile.block_q,
        block_kv: spec.tile.block_kv,
        median_us: timing.median_ms * 1e3,
        min_us: timing.min_ms * 1e3,
        tflops: causal_flops(tokens, layout.head_dim, layout.q_heads) / timing.median_ms / 1e9,
    })
}

/// The report as text: a decode table, then a prefill table, then any notes.
pub fn render(report: &SuiteReport<Row>) -> String {
    let mut out = format!("device: {}\n", report.device);
    let decode: Vec<&DecodeRow> = report
        .records
        .iter()
        .filter_map(|r| match r {
            Row::Decode(d) => Some(d),
            Row::Prefill(_) => None,
        })
        .collect();
    let prefill: Vec<&PrefillRow> = report
        .records
        .iter()
        .filter_map(|r| match r {
            Row::Prefill(p) => Some(p),
            Row::Decode(_) => None,
        })
        .collect();
    if !decode.is_empty() {
        out.push_str(&format!(
            "{:<8} {:<5} {:>5} {:>4} {:>7} {:>6} {:>4} {:>10} {:>10} {:>10} {:>8} {:>10}\n",
            "decode",
            "dtype",
            "batch",
            "kv",
            "context",
            "splits",
            "sets",
            "median µs",
            "fused µs",
            "partial µs",
            "GB/s",
            "plan µs"
        ));
        for r in decode {
            out.push_str(&format!(
                "{:<8} {:<5} {:>5} {:>4} {:>7} {:>6} {:>4} {:>10.1} {:>10.1} {:>10.1} {:>8.0} {:>10}\n",
                "",
                r.shape.dtype,
                r.shape.batch,
                r.shape.kv_heads,
                r.context,
                r.splits,
                r.rotations,
                r.median_us,
                r.fused_median_us,
                r.partial_median_us,
                r.gb_per_s,
                r.plan_median_us
                    .map_or("-".to_string(), |us| format!("{us:.1}"))
            ));
        }
    }
    if !prefill.is_empty() {
        out.push_str(&format!(
            "{:<8} {:<5} {:>5} {:>4} {:>7} {:>9} {:>10} {:>8}\n",
            "prefill", "dtype", "batch", "kv", "tokens", "tile", "median µs", "TFLOP/s"
        ));
        for r in prefill {
            out.push_str(&format!(
                "{:<8} {:<5} {:>5} {:>4} {:>7} {:>9} {:>10.1} {:>8.1}\n",
                "",
                r.shape.dtype,
                r.shape.batch,
                r.shape.kv_heads,
                r.tokens,
                format!("{}x{}", r.block_q, r.block_kv),
                r.median_us,
                r.tflops
            ));
        }
    }
    out.push_str(&report.render_notes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON that `bench/compare.py` reads: the shared columns come first, under their
    /// old names (`impl`, not `implementation`), and the kind tag is kept.
    #[test]
    fn rows_serialize_the_shared_columns_flat() {
        let layout = paged::layout(DType::BF16, 32, 8, 128);
        let row = Row::Prefill(PrefillRow {
            shape: RowShape::new("attention", "kiln.prefill", &layout, 1),
            tokens: 4096,
            page_size: layout.page_size,
            block_q: 64,
            block_kv: 32,
            median_us: 100.0,
            min_us: 90.0,
            tflops: 1.0,
        });
        let json = serde_json::to_value(&row).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        for key in [
            "kind", "suite", "impl", "dtype", "batch", "q_heads", "kv_heads", "head_dim", "tokens",
        ] {
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
        assert!(!keys.contains(&"shape") && !keys.contains(&"implementation"));
        assert_eq!(json["impl"], "kiln.prefill");
        assert_eq!(json["dtype"], "bf16");
        assert_eq!(json["kv_heads"], 8);
    }
}
