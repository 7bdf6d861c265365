//! `kiln bench quest`: times the Quest decode step against the dense decode of the same shape,
//! in the same run, for `bench/torch_baselines.py --suite quest` (SDPA dense decode of the same
//! shapes) to set beside.
//!
//! Shapes: batch 1 and 16, 32 query heads, 8 and 32 KV heads, head_dim 128, f16, page size
//! 16, contexts 4K to 64K (every sequence at the full context), budgets 1024, 2048 and 4096
//! tokens. One decode step of one layer is, per sequence and KV head:
//!
//! 1. **estimate** (`kiln_kernels::quest::estimate`): page scores from the page metadata
//!    (`page_max` / `page_min`) and the query, `[batch, kv_heads, pages]` f32;
//! 2. **top-K** (`kiln_kernels::quest::top_k`): `budget / page_size` pages (the last page
//!    always included; every page when there are no more than that: the *dense fallback*);
//! 3. **sparse decode** (`kiln_kernels::attention::decode`, sparse, merge fused into the
//!    partial kernel: one launch) over the
//!    selected pages, split for the budget ([`DecodeAttentionSpec::splits`] with the budget
//!    as the attended length).
//!
//! Each row reports each part timed alone, the chained step (`total_us`: the three launches
//! back to back, timed as one), the dense decode (merge fused, split for the context) and
//! `speedup = dense_us / total_us`. The sum of the parts can differ from the chain by launch
//! gaps and overlap.
//!
//! Protocol (shared with `attention` through `paged`): warm-up, median of
//! [`paged::ITERATIONS`] CUDA-event samples, pages in a shuffled physical order, random
//! (never zero) keys and values. The Quest metadata is built **once per page pool, on the
//! device, by the KV-append kernel** that writes the pages (`kiln_kernels::kv_append`, every
//! page a full page appended from slot 0, so its metadata is exactly its keys' max / min
//! under any page table); it is not part of the timed step. Page sets rotate so the bytes
//! one Quest step reads (metadata of every page plus K/V of the budget) add up past the L2
//! (each set has its own scores and selection buffers, so the parts timed alone read
//! exactly what the chain would); the dense decode rotates over the same sets. A pool is at
//! least [`QUEST_POOL_BYTES`] of K/V so short contexts get enough sets. Shapes whose pool
//! does not fit device memory are skipped with a note. After timing, the sparse output must
//! be fully written and finite and every selection count must be `min(pages, budget
//! pages)`. This module measures; it asserts nothing about speed.
//!
//! [`DecodeAttentionSpec::splits`]: kiln_kernels::attention::decode::DecodeAttentionSpec::splits

use super::paged::{self, Decode, PagePool, PageSets, RowShape, Selection};
use super::plan_step::{self, DecodeStep};
use super::SuiteReport;
use anyhow::Result;
use kiln_ir::dtype::DType;
use kiln_kernels::attention::PagedKv;
use kiln_kernels::quest::{estimate, top_k, QuestEstimateSpec, QuestTopKSpec};
use kiln_runtime::cuda::{Args, CudaDevice, CudaError, DeviceBuffer, LoadedKernel};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::sync::Arc;

pub const QUEST_CONTEXTS: [usize; 5] = [4096, 8192, 16384, 32768, 65536];
pub const QUEST_BATCHES: [usize; 2] = [1, 16];
pub const QUEST_KV_HEADS: [usize; 2] = [8, 32];
pub const QUEST_Q_HEADS: usize = 32;
pub const QUEST_HEAD_DIM: usize = 128;
/// Token budgets.
pub const QUEST_BUDGETS: [usize; 3] = [1024, 2048, 4096];
/// The least K/V a pool holds, so that the short contexts get enough rotated page sets.
pub const QUEST_POOL_BYTES: usize = 1 << 30;

/// One (shape, budget): the Quest step's parts and total, and the dense decode.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    #[serde(flatten)]
    pub shape: RowShape,
    pub context: usize,
    pub page_size: usize,
    /// Token budget and its pages.
    pub budget: usize,
    pub budget_pages: usize,
    /// The sequence has no more pages than the budget: top-K selects every page.
    pub dense_fallback: bool,
    /// Page sets the timed launches rotate through.
    pub rotations: usize,
    pub sparse_splits: usize,
    pub dense_splits: usize,
    /// Medians of each part timed alone.
    pub estimate_us: f64,
    pub top_k_us: f64,
    /// Sparse decode (merge fused).
    pub sparse_us: f64,
    /// The chained step (estimate, top-K, fused decode), median and best.
    pub total_us: f64,
    pub total_min_us: f64,
    /// Dense decode (merge fused) of the same shape, median and best.
    pub dense_us: f64,
    pub dense_min_us: f64,
    /// `dense_us / total_us`.
    pub speedup: f64,
    /// The Quest attention step of a compiled decode plan (`bench::plan_step`: bounds
    /// refresh, estimate, top-K, sparse decode) and the dense decode step of the same plan
    /// shape, medians; `None` when skipped.
    pub plan_quest_us: Option<f64>,
    pub plan_dense_us: Option<f64>,
}

impl Row {
    /// One line for progress output.
    pub fn describe(&self) -> String {
        format!(
            "quest batch {} kv {} context {} budget {}: {:.1} µs (dense {:.1} µs)",
            self.shape.batch,
            self.shape.kv_heads,
            self.context,
            self.budget,
            self.total_us,
            self.dense_us
        )
    }
}

/// The loaded Quest kernels of one layout.
struct QuestKernels {
    estimate: LoadedKernel,
    top_k: LoadedKernel,
}

/// Per page set: its scores and its selection for the budget being timed.
struct SetBuffers {
    scores: DeviceBuffer<f32>,
    selection: Selection,
}

/// The inputs of one shape: pool, query, page sets.
struct Shape<'a> {
    layout: PagedKv,
    pool: &'a PagePool,
    q: &'a DeviceBuffer<i32>,
    sets: &'a PageSets,
}

impl Shape<'_> {
    fn launch_estimate(
        &self,
        kernels: &QuestKernels,
        set: usize,
        buffers: &SetBuffers,
    ) -> Result<(), CudaError> {
        let args = Args::new()
            .buffer("q", self.q)
            .buffer("page_max", &self.pool.page_max)
            .buffer("page_min", &self.pool.page_min)
            .buffer("page_table", self.sets.table(set))
            .buffer("seq_lens", &self.sets.seq_lens)
            .buffer("scores", &buffers.scores)
            .u32("batch", self.sets.batch as u32)
            .u32("max_pages", self.sets.pages_per_sequence as u32);
        kernels.estimate.launch(&args).map(drop)
    }

    fn launch_top_k(
        &self,
        kernels: &QuestKernels,
        budget_pages: usize,
        buffers: &SetBuffers,
    ) -> Result<(), CudaError> {
        let selection = &buffers.selection;
        let args = Args::new()
            .buffer("scores", &buffers.scores)
            .buffer("seq_lens", &self.sets.seq_lens)
            .buffer("selected_pages", &selection.pages)
            .buffer("selected_counts", &selection.counts)
            .u32("batch", self.sets.batch as u32)
            .u32("kv_heads", self.layout.kv_heads as u32)
            .u32("max_pages", self.sets.pages_per_sequence as u32)
            .u32("budget_pages", budget_pages as u32)
            .u32("max_selected", selection.max_selected as u32);
        kernels.top_k.launch(&args).map(drop)
    }

    /// The whole step on set `set`: estimate, top-K, sparse decode (merge fused).
    fn launch_step(
        &self,
        kernels: &QuestKernels,
        sparse: &Decode,
        budget_pages: usize,
        set: usize,
        buffers: &SetBuffers,
    ) -> Result<(), CudaError> {
        self.launch_estimate(kernels, set, buffers)?;
        self.launch_top_k(kernels, budget_pages, buffers)?;
        sparse.launch(self.q, self.pool, self.sets, set, Some(&buffers.selection))
    }
}

/// Times the Quest step and the dense decode over the sweep, calling `on_row` after each
/// (shape, budget).
pub fn bench_quest(
    device: &Arc<CudaDevice>,
    mut on_row: impl FnMut(&Row),
) -> Result<SuiteReport<Row>> {
    let mut rng = ChaCha8Rng::seed_from_u64(0x71756573);
    let mut report = SuiteReport::new(device);
    for batch in QUEST_BATCHES {
        for kv_heads in QUEST_KV_HEADS {
            let layout = paged::layout(DType::F16, QUEST_Q_HEADS, kv_heads, QUEST_HEAD_DIM);
            let (pages, contexts) = paged::plan_pool(
                device,
                &layout,
                batch,
                &QUEST_CONTEXTS,
                QUEST_POOL_BYTES,
                &mut report.notes,
            );
            if contexts.is_empty() {
                continue;
            }
            let pool = PagePool::new(device, layout, pages, &mut rng)?;
            let q_elements = batch * layout.q_heads * layout.head_dim;
            let q = paged::random_buffer(device, layout.dtype, q_elements, &mut rng)?;
            let kernels = QuestKernels {
                estimate: device.load(&estimate::generate(&QuestEstimateSpec::new(layout))?)?,
                top_k: device.load(&top_k::generate(&QuestTopKSpec::for_layout(&layout))?)?,
            };
            for context in contexts {
                let step = DecodeStep::dense(&layout, batch, context);
                let plan_dense = plan_step::time_decode_step(device, &step, &mut report.notes)?;
                for mut row in time_context(device, &kernels, &pool, &q, batch, context, &mut rng)?
                {
                    let quest = DecodeStep {
                        quest: Some((row.budget, layout.page_size)),
                        ..step
                    };
                    let plan_quest =
                        plan_step::time_decode_step(device, &quest, &mut report.notes)?;
                    row.plan_quest_us = plan_quest.map(|f| f.median_us);
                    row.plan_dense_us = plan_dense.as_ref().map(|f| f.median_us);
                    on_row(&row);
                    report.records.push(row);
                }
            }
        }
    }
    Ok(report)
}

/// Bytes one Quest step reads from one page set: the metadata of every page and the K/V of
/// the budget's tokens.
fn step_bytes(layout: &PagedKv, batch: usize, context: usize, budget: usize) -> usize {
    let pages = batch * context.div_ceil(layout.page_size);
    let metadata = 2 * pages * layout.kv_heads * layout.head_dim * 2;
    metadata + paged::kv_bytes(layout, batch, budget.min(context))
}

/// The dense decode and every budget of one (batch, context) over `pool`.
fn time_context(
    device: &CudaDevice,
    kernels: &QuestKernels,
    pool: &PagePool,
    q: &DeviceBuffer<i32>,
    batch: usize,
    context: usize,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Row>> {
    let layout = pool.layout;
    let smallest = *QUEST_BUDGETS.iter().min().expect("budgets");
    let sets = PageSets::new(
        device,
        pool,
        batch,
        context,
        step_bytes(&layout, batch, context, smallest),
        rng,
    )?;
    let shape = Shape {
        layout,
        pool,
        q,
        sets: &sets,
    };
    let tag = format!("{} batch {batch} context {context}", layout.tag());
    let dense = Decode::new(device, layout, false, batch, context)?;
    let dense_timing = paged::time_rotating(
        device,
        sets.rotations(),
        &format!("dense decode {tag}"),
        |set| dense.launch(q, pool, &sets, set, None),
    )?;
    dense.check_output(&format!("dense decode {tag}"))?;

    let pages = sets.pages_per_sequence;
    let mut rows = Vec::new();
    for budget in QUEST_BUDGETS {
        let budget_pages = budget / layout.page_size;
        let max_selected = budget_pages.min(pages);
        let buffers = (0..sets.rotations())
            .map(|_| {
                Ok(SetBuffers {
                    scores: DeviceBuffer::poisoned(device, batch * layout.kv_heads * pages)?,
                    selection: Selection::poisoned(device, &layout, batch, max_selected)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let sparse = Decode::new(device, layout, true, batch, budget.min(context))?;
        let what = |part: &str| format!("quest {part} {tag} budget {budget}");
        // Fill every set's scores and selection once, so each part timed alone reads what
        // the chain would have left it.
        for (set, b) in buffers.iter().enumerate() {
            shape.launch_estimate(kernels, set, b)?;
            shape.launch_top_k(kernels, budget_pages, b)?;
        }
        let rotations = sets.rotations();
        let estimate = paged::time_rotating(device, rotations, &what("estimate"), |set| {
            shape.launch_estimate(kernels, set, &buffers[set])
        })?;
        let top_k = paged::time_rotating(device, rotations, &what("top-K"), |set| {
            shape.launch_top_k(kernels, budget_pages, &buffers[set])
        })?;
        let sparse_timing =
            paged::time_rotating(device, rotations, &what("sparse decode"), |set| {
                sparse.launch(q, pool, &sets, set, Some(&buffers[set].selection))
            })?;
        let total = paged::time_rotating(device, rotations, &what("step"), |set| {
            shape.launch_step(kernels, &sparse, budget_pages, set, &buffers[set])
        })?;
        sparse.check_output(&what("sparse decode"))?;
        let counts = buffers[0].selection.counts.to_host()?;
        let expected = pages.min(budget_pages) as i32;
        anyhow::ensure!(
            counts.iter().all(|&c| c == expected),
            "{}: selection counts {:?}… instead of {expected}",
            what("top-K"),
            &counts[..counts.len().min(8)]
        );
        let row = Row {
            shape: RowShape::new("quest", "kiln.quest", &layout, batch),
            context,
            page_size: layout.page_size,
            budget,
            budget_pages,
            dense_fallback: pages <= budget_pages,
            rotations,
            sparse_splits: sparse.splits,
            dense_splits: dense.splits,
            estimate_us: estimate.median_ms * 1e3,
            top_k_us: top_k.median_ms * 1e3,
            sparse_us: sparse_timing.median_ms * 1e3,
            total_us: total.median_ms * 1e3,
            total_min_us: total.min_ms * 1e3,
            dense_us: dense_timing.median_ms * 1e3,
            dense_min_us: dense_timing.min_ms * 1e3,
            speedup: dense_timing.median_ms / total.median_ms,
            plan_quest_us: None,
            plan_dense_us: None,
        };
        rows.push(row);
    }
    Ok(rows)
}

/// A plan-step time in µs, or `-` where the shape was skipped.
fn plan_cell(us: Option<f64>) -> String {
    us.map_or("-".to_string(), |us| format!("{us:.1}"))
}

/// The report as a text table, then any notes.
pub fn render(report: &SuiteReport<Row>) -> String {
    let mut out = format!("device: {}\n", report.device);
    out.push_str(&format!(
        "{:<5} {:>5} {:>4} {:>7} {:>6} {:>4} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>11} {:>11}\n",
        "dtype",
        "batch",
        "kv",
        "context",
        "budget",
        "sets",
        "est µs",
        "top-K µs",
        "sparse µs",
        "quest µs",
        "dense µs",
        "speedup",
        "plan quest",
        "plan dense"
    ));
    for r in &report.records {
        out.push_str(&format!(
            "{:<5} {:>5} {:>4} {:>7} {:>6} {:>4} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>7.2}x {:>11} {:>11}{}\n",
            r.shape.dtype,
            r.shape.batch,
            r.shape.kv_heads,
            r.context,
            r.budget,
            r.rotations,
            r.estimate_us,
            r.top_k_us,
            r.sparse_us,
            r.total_us,
            r.dense_us,
            r.speedup,
            plan_cell(r.plan_quest_us),
            plan_cell(r.plan_dense_us),
            if r.dense_fallback { " (dense fallback)" } else { "" }
        ));
    }
    out.push_str(&report.render_notes());
    out
}
