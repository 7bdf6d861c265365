//! Split-KV decode attention over the paged KV cache (FlashDecoding), dense or Quest-sparse,
//! and the merge of the splits' partial softmax states.
//!
//! Owns [`DecodeAttentionSpec`], the kernels it generates ([`DecodeKernels`]: `partial`
//! and, in [`MergeMode::Separate`], `merge`), their parameters and launch rules, and [`split_count`], the rule that picks
//! the run-time number of splits. The cache layout is [`PagedKv`]'s (see `paged.rs`); nothing
//! here launches anything.
//!
//! # The partial kernel
//!
//! One block per (split `s`, KV head `kv` and chunk of its query heads, sequence `b`):
//! `grid = (splits, kv_heads · G/heads_per_block, batch)`, `32 · warps` threads. The block
//! reads each K/V byte of its share of the sequence once and uses it for `heads_per_block`
//! query heads of the GQA group (all of them by default, up to 8), so K/V cross HBM once per
//! group.
//!
//! - **Iteration list.** Dense: logical pages `0..ceil(len/page_size)`; sparse: the entries
//!   `selected_pages[b, kv, 0..selected_counts[b, kv]]` (logical page indices). Split `s` of
//!   `S` takes entries `floor(s·n/S) .. floor((s+1)·n/S)` (possibly none). The block copies
//!   the physical page and the valid token count `clamp(len − j·page_size, 0, page_size)` of
//!   up to `threads` entries into shared memory at a time (an *entry batch*). The K/V
//!   address of (page, KV head, slot) comes from [`PagedKv::emit_kv_offset`], so both page
//!   orders ([`PageOrder`](super::paged::PageOrder): head-major pages, or token-major ones
//!   such as a contiguous `[batch, capacity, kv_heads, d]` cache under the identity page
//!   table) are read by the same kernel; the entry name ends in `_tm` for token-major.
//! - **Pipeline.** The tokens of an entry batch stream through `stages` shared-memory buffers
//!   of `stage_tokens` K rows and V rows each, filled by 16-byte `cp.async.cg` (L2 only)
//!   `stages − 1` stages ahead of use. Token slots that are past the split, past the
//!   sequence or garbage slots of a partial page are zero-filled without any global read,
//!   and their scores are masked to −inf, so a garbage key is never read.
//! - **Thread-private stages.** Lane group `g` of `d/8` lanes of warp `w` copies *and* later
//!   reads the same rows of every stage: row `w·(32·8/d) + g + i·rows_per_pass`, lane `c` of
//!   the group the 16 bytes at element `8c`. So a stage needs no barrier: each thread waits
//!   for its own copies (`cp.async.wait_group`) and refills a buffer only after it has read
//!   it. Barriers only bracket the entry batches and the final merge.
//! - **Head dims** (32, 64 or 128, [`PagedKv::validate`]). A K/V row is `d/8` = 4, 8 or 16
//!   lanes of 16 bytes and a warp covers `32·8/d` = 8, 4 or 2 rows per step, so a stage holds
//!   `steps · warps · 256/d` tokens: the same bytes at every head_dim (16 KiB at the default
//!   4 steps × 4 warps). A lane group is an aligned run of `d/8` lanes, so the score
//!   butterflies (lane masks `d/16, …, 1`) stay inside it and the merge of a warp's groups
//!   (masks `d/8, …, 16`) pairs lanes that hold the same 8 elements.
//! - **Arithmetic (f32).** `q` is pre-multiplied by `scale · log2 e`, so scores are in log2
//!   units and every exponential is one `ex2.approx.ftz`. Per stage and query head: the `steps`
//!   scores of a lane group (dot products of 8 elements per lane, butterfly-summed over the
//!   group), one running-max update and one rescale of the accumulator, then `p·v`.
//! - **Partial state.** The lane groups of a warp merge by shuffles, the warps through
//!   shared memory, and the block writes, per query head `h` and split `s`
//!   (`r = (b·q_heads + h)·splits + s`): `partial_max[r]` (running max, log2 units),
//!   `partial_sum[r]` (Σ 2^(score − max)) and `partial_acc[r·d .. r·d + d]` (Σ 2^(score −
//!   max)·v, unnormalised), all f32. An empty split writes max −1e30, sum 0 and zeros.
//!
//! Parameters, in order: pointers `q [batch, q_heads, d]`, `k_pages`, `v_pages`,
//! `page_table [batch, max_pages] i32`, `seq_lens [batch] i32`, sparse only
//! `selected_pages [batch, kv_heads, max_selected] i32` and `selected_counts [batch,
//! kv_heads] i32`, then `partial_acc`, `partial_max`, `partial_sum`; scalars `batch`,
//! `max_pages`, sparse only `max_selected`, `splits` (u32) and `scale` (f32). Requirements:
//! `1 ≤ seq_lens[b]`, sparse `1 ≤ selected_counts[b, kv]` with valid, ascending logical pages,
//! `splits ≥ 1`, all buffers 16-byte aligned (device allocations are).
//!
//! # The fused merge ([`MergeMode::LastBlock`])
//!
//! The partial kernel takes two more pointers after `partial_sum`: `out [batch, q_heads,
//! d]` and `merge_counters [batch · blocks_per_split] u32`, one counter per (sequence, block
//! of a split: KV head and chunk of its query heads), index `b · blocks_per_split +
//! ctaid.y`. Same grid, scalars and requirements; its entry name ends in `_merged`.
//!
//! - `splits == 1`: each block writes `out` for its heads directly (`acc / sum`); neither the
//!   workspace nor the counters are touched.
//! - `splits > 1`: each block writes its partial state as above, then `bar.sync`; thread 0
//!   executes `fence.acq_rel.gpu`, `atom.global.add.u32` on its counter, `fence.acq_rel.gpu`.
//!   The block that saw `splits − 1` (the last of its group to finish) stores 0 to the
//!   counter and, for each of its heads in turn, runs the merge kernel's code (the same
//!   generator, `MergeRow`, with the block's threads and its own scratch per head) reading
//!   the states with `ld.global.cg` (L2: other blocks of this launch wrote them), and writes
//!   `out`. The other blocks exit.
//!
//! **Launch rule:** allocate `merge_counters` zeroed once (`counter_elements` of
//! [`DecodeAttentionSpec::workspace`]); every launch leaves them zero, so launches on the same
//! stream may reuse them without a memset. Launches that may overlap (other streams) need
//! their own counters and workspace. No merge kernel is launched.
//!
//! # The merge kernel ([`MergeMode::Separate`])
//!
//! One block of 128 threads per output row `(b, h)`: `grid = q_heads · batch`. Groups of
//! `d/4` threads (16 groups of 8 at d 32, 8 of 16 at d 64, 4 of 32 at d 128) take splits
//! `g, g + groups, …` eight at a time (loads first), each keeping a running (max, sum,
//! acc[4]); the groups merge through shared memory and the first writes
//! `out[b, h, :] = acc / sum` in the dtype. Parameters: `partial_acc`, `partial_max`,
//! `partial_sum`, `out [batch, q_heads, d]`; scalars `batch`, `splits`.
//!
//! # Splits
//!
//! [`split_count`]: as many splits as fit the SMs with [`TARGET_BLOCKS_PER_SM`] blocks each
//! (`floor(sm_count · 2 / (batch · kv_heads))`, at least 1, so one wave fills the chip
//! without a ragged second wave), but no more than one split per [`MIN_SPLIT_TOKENS`] tokens
//! of the longest sequence (short sequences gain nothing from splitting and pay for the
//! merge) and at most [`MAX_SPLITS`]. On an H100 (132 SMs): batch 1, 8 KV heads, 32K → 33
//! splits, 264 blocks (two per SM); batch 16, 8 KV heads → 2 splits, 256 blocks.

use kiln_codegen::kernel::{Access, Extent, GpuKernel, LaunchRule};
use kiln_codegen::ptx::{
    Axis, Cmp, KernelBuilder, Load, LoadCache, Operand, Pred, Reg, Space, Special, Store, Target,
    B32, F32, U32, U64,
};
use kiln_ir::dtype::DType;
use serde::{Deserialize, Serialize};

use super::PagedKv;
use crate::vector::{load_chunk, narrow_pair, HALVES_PER_CHUNK};
use crate::SpecError;

const FAMILY: &str = "attention_decode";

/// Streaming multiprocessors of an H100 SXM, the default for [`split_count`].
pub const H100_SM_COUNT: usize = 132;

/// Blocks per SM the split rule plans for (the partial kernel asks ptxas for at least two).
pub const TARGET_BLOCKS_PER_SM: usize = 2;

/// The fewest tokens of the longest sequence per split.
pub const MIN_SPLIT_TOKENS: usize = 128;

/// The most splits [`split_count`] picks.
pub const MAX_SPLITS: usize = 128;

/// Threads of a merge block.
pub const MERGE_THREADS: usize = 128;

/// Splits one merge thread loads before combining them.
const MERGE_UNROLL: usize = 8;

/// Shared memory a block may use on sm_80 and sm_90 after opting in (227 KiB).
const MAX_SHARED_BYTES: usize = 227 << 10;

/// The running max of a split that has seen no token: finite, so `max − max` never makes a
/// NaN, and far below any real score.
const EMPTY_MAX: f32 = -1e30;

/// `log2(e)`: scores are kept in log2 units.
const LOG2_E: f32 = std::f32::consts::LOG2_E;

/// The number of splits for a decode step: `floor(sm_count · TARGET_BLOCKS_PER_SM / (batch ·
/// kv_heads))` (at least 1), capped by `ceil(longest / MIN_SPLIT_TOKENS)` and [`MAX_SPLITS`].
///
/// `longest` is the longest sequence in tokens (sparse: the most tokens any KV head
/// attends, the Quest budget). `kv_heads` counts blocks per sequence and split, so pass
/// [`DecodeAttentionSpec::blocks_per_split`] where a spec splits a group's heads.
///
/// ```
/// use kiln_kernels::attention::decode::{split_count, H100_SM_COUNT};
/// assert_eq!(split_count(1, 8, 32768, H100_SM_COUNT), 33); // 264 blocks: 2 per SM
/// assert_eq!(split_count(16, 8, 32768, H100_SM_COUNT), 2); // 256 blocks
/// assert_eq!(split_count(1, 8, 100, H100_SM_COUNT), 1);
/// ```
pub fn split_count(batch: usize, kv_heads: usize, longest: usize, sm_count: usize) -> u32 {
    let blocks_per_split = (batch * kv_heads).max(1);
    let slots = sm_count.max(1) * TARGET_BLOCKS_PER_SM;
    let by_occupancy = (slots / blocks_per_split).max(1);
    let by_length = longest.div_ceil(MIN_SPLIT_TOKENS).max(1);
    by_occupancy.min(by_length).min(MAX_SPLITS) as u32
}

/// The spec of one split-KV decode attention (partial kernel + merge kernel).
///
/// `layout` and `sparse` fix what is computed; `heads_per_block`, `warps`, `steps` and
/// `stages` only how ([`DecodeAttentionSpec::new`] picks them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DecodeAttentionSpec {
    pub layout: PagedKv,
    /// Quest-sparse: iterate the selected pages instead of every page.
    pub sparse: bool,
    /// Query heads per block, a divisor of the group size (`1..=16`); the group's other
    /// heads go to other blocks, which read the same K/V again.
    pub heads_per_block: usize,
    /// Warps per block: 1, 2, 4, 8 or 16.
    pub warps: usize,
    /// K/V rows each lane group handles per stage: 1, 2, 4 or 8. A stage holds
    /// `steps · warps · 256 / head_dim` tokens.
    pub steps: usize,
    /// Shared-memory buffers of the copy pipeline (`2..=8`); `stages − 1` are in flight.
    pub stages: usize,
    /// How the splits are combined: a separate merge launch or the last block of each group.
    #[serde(default)]
    pub merge: MergeMode,
}

/// How the splits' partial states become `out`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeMode {
    /// The partial kernel writes the workspace; the merge kernel (a second launch) writes
    /// `out`.
    #[default]
    Separate,
    /// The partial kernel also writes `out`: the last block of each (sequence, head group)
    /// to finish merges the group's splits (see the module docs). No merge kernel.
    LastBlock,
}

/// The kernels of a decode attention. [`MergeMode::Separate`]: `partial` writes each split's
/// softmax state, `merge` combines the splits into `out`; launch them in that order with the
/// same `splits`. [`MergeMode::LastBlock`]: `partial` alone writes `out` and `merge` is
/// `None`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DecodeKernels {
    pub partial: GpuKernel,
    pub merge: Option<GpuKernel>,
}

/// Element counts of the f32 workspace for a given batch and split count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeWorkspace {
    /// `partial_acc`: `batch · q_heads · splits · head_dim`.
    pub acc_elements: usize,
    /// `partial_max` and `partial_sum`, each: `batch · q_heads · splits`.
    pub stat_elements: usize,
    /// [`MergeMode::LastBlock`] only: the u32 `merge_counters`, `batch · blocks_per_split`
    /// (0 in [`MergeMode::Separate`]). Allocate them zeroed once; every launch leaves them
    /// zero.
    pub counter_elements: usize,
}

impl DecodeAttentionSpec {
    /// A spec with the default tuning: the whole group per block up to 8 heads, 4 warps,
    /// 16 KiB stages (8 KiB with more than 4 heads per block, to leave registers for the
    /// scores) and 4 stages (3 in flight: 48 KiB per block, 96 KiB per SM at 2 blocks).
    pub fn new(layout: PagedKv, sparse: bool) -> DecodeAttentionSpec {
        let group = layout.group_size().max(1);
        let heads_per_block = (1..=group.min(8))
            .rev()
            .find(|h| group.is_multiple_of(*h))
            .unwrap_or(1);
        let steps = if heads_per_block > 4 { 2 } else { 4 };
        DecodeAttentionSpec {
            layout,
            sparse,
            heads_per_block,
            warps: 4,
            steps,
            stages: 4,
            merge: MergeMode::Separate,
        }
    }

    /// The same spec with merge mode `merge`.
    pub fn with_merge(self, merge: MergeMode) -> DecodeAttentionSpec {
        DecodeAttentionSpec { merge, ..self }
    }

    /// Whether the partial kernel merges the splits itself ([`MergeMode::LastBlock`]).
    pub fn fused(&self) -> bool {
        self.merge == MergeMode::LastBlock
    }

    /// The same spec with other tuning knobs.
    pub fn with_tuning(
        self,
        heads_per_block: usize,
        warps: usize,
        steps: usize,
        stages: usize,
    ) -> DecodeAttentionSpec {
        DecodeAttentionSpec {
            heads_per_block,
            warps,
            steps,
            stages,
            ..self
        }
    }

    /// Blocks per sequence and split: `kv_heads · group / heads_per_block`.
    pub fn blocks_per_split(&self) -> usize {
        self.layout.kv_heads * (self.layout.group_size() / self.heads_per_block.max(1))
    }

    /// [`split_count`] for this spec on a device with `sm_count` SMs.
    pub fn splits(&self, batch: usize, longest: usize, sm_count: usize) -> u32 {
        split_count(batch, self.blocks_per_split(), longest, sm_count)
    }

    /// Tokens per pipeline stage.
    pub fn stage_tokens(&self) -> usize {
        self.steps * self.warps * (32 * HALVES_PER_CHUNK / self.layout.head_dim)
    }

    /// Dynamic shared memory of the partial kernel, in bytes.
    pub fn shared_bytes(&self) -> usize {
        Geometry::of(self).shared_bytes
    }

    /// The f32 workspace the kernels need for `batch` sequences and `splits` splits.
    pub fn workspace(&self, batch: usize, splits: usize) -> DecodeWorkspace {
        let stat_elements = batch * self.layout.q_heads * splits;
        DecodeWorkspace {
            acc_elements: stat_elements * self.layout.head_dim,
            stat_elements,
            counter_elements: if self.fused() {
                batch * self.blocks_per_split()
            } else {
                0
            },
        }
    }

    /// The partial kernel's entry name, unique per spec (`_merged` for
    /// [`MergeMode::LastBlock`]).
    pub fn entry_name(&self) -> String {
        format!(
            "attention_decode_{}_{}_h{}w{}s{}p{}{}",
            if self.sparse { "sparse" } else { "dense" },
            self.layout.tag(),
            self.heads_per_block,
            self.warps,
            self.steps,
            self.stages,
            if self.fused() { "_merged" } else { "" }
        )
    }

    /// The merge kernel's entry name (it depends on dtype, query heads and head_dim only).
    pub fn merge_entry_name(&self) -> String {
        let l = &self.layout;
        format!(
            "attention_decode_merge_{}_q{}_d{}",
            l.dtype.name(),
            l.q_heads,
            l.head_dim
        )
    }

    /// Checks the spec, naming the first field out of range.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.layout.validate(FAMILY)?;
        let error = |message: String| Err(SpecError::new(FAMILY, message));
        let group = self.layout.group_size();
        if !(1..=16).contains(&self.heads_per_block) || !group.is_multiple_of(self.heads_per_block)
        {
            return error(format!(
                "heads_per_block = {} must be in 1..=16 and divide the group size {group}",
                self.heads_per_block
            ));
        }
        if !matches!(self.warps, 1 | 2 | 4 | 8 | 16) {
            return error(format!("warps = {} must be 1, 2, 4, 8 or 16", self.warps));
        }
        if !matches!(self.steps, 1 | 2 | 4 | 8) {
            return error(format!("steps = {} must be 1, 2, 4 or 8", self.steps));
        }
        if !(2..=8).contains(&self.stages) {
            return error(format!("stages = {} must be in 2..=8", self.stages));
        }
        let scores = self.steps * self.heads_per_block;
        if scores > 32 {
            return error(format!(
                "{scores} scores per lane per stage (steps {} x heads_per_block {}) exceed 32",
                self.steps, self.heads_per_block
            ));
        }
        let shared = self.shared_bytes();
        if shared > MAX_SHARED_BYTES {
            return error(format!(
                "{shared} bytes of shared memory (stages {} x {} tokens) exceed {MAX_SHARED_BYTES}",
                self.stages,
                self.stage_tokens()
            ));
        }
        Ok(())
    }
}

/// Generates the kernels for `sm_80` (they use nothing newer and run on Hopper as is).
pub fn generate(spec: &DecodeAttentionSpec) -> Result<DecodeKernels, SpecError> {
    generate_for(spec, Target::Sm80)
}

/// Generates the kernels for `target`: the partial kernel, and the merge kernel in
/// [`MergeMode::Separate`].
pub fn generate_for(
    spec: &DecodeAttentionSpec,
    target: Target,
) -> Result<DecodeKernels, SpecError> {
    let merge = match spec.merge {
        MergeMode::Separate => Some(generate_merge(spec, target)?),
        MergeMode::LastBlock => None,
    };
    Ok(DecodeKernels {
        partial: generate_partial(spec, target)?,
        merge,
    })
}

/// Sizes derived from a spec, shared by the stages of the partial kernel.
struct Geometry {
    /// The cache layout (K/V addresses come from its strides).
    layout: PagedKv,
    dtype: DType,
    head_dim: usize,
    page_size: usize,
    kv_heads: usize,
    q_heads: usize,
    group: usize,
    heads: usize,
    /// Blocks per sequence and split (the merge counters of a sequence).
    blocks_per_split: usize,
    warps: usize,
    threads: usize,
    /// Lanes per K/V row: `head_dim / 8` (16 bytes each).
    lanes_per_row: usize,
    /// Rows between one step and the next of a lane group: `warps · rows_per_warp`.
    rows_per_pass: usize,
    steps: usize,
    stages: usize,
    stage_tokens: usize,
    row_bytes: usize,
    /// K rows then V rows.
    stage_bytes: usize,
    /// Entries (pages) per batch: one per thread.
    batch_entries: usize,
    /// Where the entry list starts in shared memory (after the stages / merge scratch).
    entries_offset: usize,
    shared_bytes: usize,
}

impl Geometry {
    fn of(spec: &DecodeAttentionSpec) -> Geometry {
        let l = &spec.layout;
        let head_dim = l.head_dim.max(HALVES_PER_CHUNK);
        let lanes_per_row = (head_dim / HALVES_PER_CHUNK).clamp(1, 32);
        let rows_per_warp = 32 / lanes_per_row;
        let threads = 32 * spec.warps;
        let stage_tokens = spec.steps * spec.warps * rows_per_warp;
        let row_bytes = head_dim * 2;
        let stage_bytes = 2 * stage_tokens * row_bytes;
        // Merge scratch: acc [warps][heads][d] f32, then max and sum [warps][heads] f32.
        let scratch = spec.warps * spec.heads_per_block * (head_dim + 2) * 4;
        // The fused merge tail: one merge scratch per head of the block.
        let tail_scratch = if spec.fused() {
            spec.heads_per_block * merge_scratch_bytes(threads, head_dim)
        } else {
            0
        };
        let entries_offset = (spec.stages * stage_bytes)
            .max(scratch)
            .max(tail_scratch)
            .next_multiple_of(16);
        Geometry {
            layout: *l,
            dtype: l.dtype,
            head_dim,
            page_size: l.page_size,
            kv_heads: l.kv_heads,
            q_heads: l.q_heads,
            group: l.group_size(),
            heads: spec.heads_per_block,
            blocks_per_split: spec.blocks_per_split(),
            warps: spec.warps,
            threads,
            lanes_per_row,
            rows_per_pass: spec.warps * rows_per_warp,
            steps: spec.steps,
            stages: spec.stages,
            stage_tokens,
            row_bytes,
            stage_bytes,
            batch_entries: threads,
            entries_offset,
            shared_bytes: entries_offset + threads * 8,
        }
    }
}

fn log2(x: usize) -> u32 {
    debug_assert!(x.is_power_of_two());
    x.trailing_zeros()
}

/// Generates the partial kernel (one split's softmax state per block).
pub fn generate_partial(
    spec: &DecodeAttentionSpec,
    target: Target,
) -> Result<GpuKernel, SpecError> {
    spec.validate()?;
    let g = Geometry::of(spec);
    let mut k = KernelBuilder::new(&spec.entry_name(), target);
    // Two blocks per SM for the split rule; wider blocks need the registers of one.
    if spec.warps <= 4 {
        k.min_blocks_per_sm(TARGET_BLOCKS_PER_SM as u32);
    }
    let partial = Partial::new(spec, &g, &mut k);
    partial.emit(&mut k);
    let launch = LaunchRule {
        grid: [
            Extent::ceil_div("splits", 1),
            Extent::fixed(spec.blocks_per_split() as u32),
            Extent::ceil_div("batch", 1),
        ],
        block: [g.threads as u32, 1, 1],
        shared_bytes: g.shared_bytes as u32,
    };
    Ok(k.finish(launch))
}

/// The parameters and per-thread registers of the partial kernel.
struct Partial<'g> {
    g: &'g Geometry,
    page_table: Reg<U64>,
    /// Sparse only: `selected_pages` and `selected_counts`.
    selection: Option<(Reg<U64>, Reg<U64>)>,
    partial_acc: Reg<U64>,
    partial_max: Reg<U64>,
    partial_sum: Reg<U64>,
    /// [`MergeMode::LastBlock`] only: `out` and `merge_counters`.
    fused: Option<(Reg<U64>, Reg<U64>)>,
    max_pages: Reg<U32>,
    max_selected: Option<Reg<U32>>,
    splits: Reg<U32>,
    scale: Reg<F32>,
    tid: Reg<U32>,
    lane: Reg<U32>,
    warp: Reg<U32>,
    split: Reg<U32>,
    sequence: Reg<U32>,
    /// `ctaid.y`: the KV head and chunk of its query heads.
    block_y: Reg<U32>,
    kv: Reg<U32>,
    /// `b · q_heads + the block's first query head`.
    q_row: Reg<U32>,
    /// `b · kv_heads + kv`: the row of `selected_pages` / `selected_counts`.
    kv_row: Reg<U32>,
    len: Reg<U32>,
    /// This lane's first byte within a K/V row: `16 · (tid mod lanes_per_row)`.
    lane_bytes: Reg<U32>,
    /// The first row of every stage this thread copies and reads: `tid / lanes_per_row`.
    first_row: Reg<U32>,
    /// Shared address of this thread's 16 bytes of its first K row of stage 0.
    row_address: Reg<U32>,
    smem: Reg<U32>,
    /// Shared address of the entry list: `(physical page, valid tokens)` u32 pairs.
    entries: Reg<U32>,
    /// `k_pages + lane_bytes`, `v_pages + lane_bytes`, `q` at this lane's bytes of the
    /// block's first head.
    k_lane: Reg<U64>,
    v_lane: Reg<U64>,
    q_lane: Reg<U64>,
}

/// The online-softmax state of this thread's lane group, per query head of the block: the
/// running max (log2 units), the running sum, and this lane's 8 accumulator elements.
struct SoftmaxState {
    max: Vec<Reg<F32>>,
    sum: Vec<Reg<F32>>,
    acc: Vec<[Reg<F32>; 8]>,
}

impl<'g> Partial<'g> {
    /// Declares the parameters and computes the block's indices and this thread's bases.
    fn new(spec: &DecodeAttentionSpec, g: &'g Geometry, k: &mut KernelBuilder) -> Partial<'g> {
        let read = Access::Read;
        let q = k.param_pointer("q", read);
        let k_pages = k.param_pointer("k_pages", read);
        let v_pages = k.param_pointer("v_pages", read);
        let page_table = k.param_pointer("page_table", read);
        let seq_lens = k.param_pointer("seq_lens", read);
        let selection = spec.sparse.then(|| {
            (
                k.param_pointer("selected_pages", read),
                k.param_pointer("selected_counts", read),
            )
        });
        let partial_acc = k.param_pointer("partial_acc", Access::Write);
        let partial_max = k.param_pointer("partial_max", Access::Write);
        let partial_sum = k.param_pointer("partial_sum", Access::Write);
        let fused = spec.fused().then(|| {
            (
                k.param_pointer("out", Access::Write),
                k.param_pointer("merge_counters", Access::ReadWrite),
            )
        });
        // `batch` only sizes the grid.
        let _batch = k.param_u32("batch");
        let max_pages = k.param_u32("max_pages");
        let max_selected = spec.sparse.then(|| k.param_u32("max_selected"));
        let splits = k.param_u32("splits");
        let scale = k.param_f32("scale");
        let shared = k.dynamic_shared("smem", 16);

        k.comment(&format!(
            "block (split, kv head x head chunk, sequence) with {} query heads; {} lanes per \
             K/V row; thread t copies and reads rows t / {} + i * {} of every stage",
            g.heads, g.lanes_per_row, g.lanes_per_row, g.rows_per_pass
        ));
        let tid = k.tid_x();
        let lane = k.and(tid, 31u32);
        let warp = k.shr(tid, 5u32);
        let split = k.special(Special::Ctaid(Axis::X));
        let block_y = k.special(Special::Ctaid(Axis::Y));
        let sequence = k.special(Special::Ctaid(Axis::Z));
        let chunks = g.group / g.heads;
        let (kv, first_head) = if chunks == 1 {
            (block_y, k.mul(block_y, g.group as u32))
        } else {
            let kv = k.div(block_y, chunks as u32);
            let chunk = k.rem(block_y, chunks as u32);
            let group_head = k.mul(kv, g.group as u32);
            (kv, k.mul_add(chunk, g.heads as u32, group_head))
        };
        let q_row = k.mul_add(sequence, g.q_heads as u32, first_head);
        let kv_row = k.mul_add(sequence, g.kv_heads as u32, kv);
        let len_address = k.mad_wide(sequence, 4u32, seq_lens);
        let len = k.ld::<U32>(Load::GLOBAL.non_coherent(), len_address);

        let column = k.and(tid, (g.lanes_per_row - 1) as u32);
        let lane_bytes = k.shl(column, 4u32);
        let first_row = k.shr(tid, log2(g.lanes_per_row));
        let smem = k.shared_address(&shared);
        let row_start = k.mul_add(first_row, g.row_bytes as u32, smem);
        let row_address = k.add(row_start, lane_bytes);
        let entries = k.add(smem, g.entries_offset as u32);
        let lane_bytes_wide = k.cvt::<U64>(lane_bytes);
        let k_lane = k.add(k_pages, lane_bytes_wide);
        let v_lane = k.add(v_pages, lane_bytes_wide);
        let q_head = k.mad_wide(q_row, g.row_bytes as u32, q);
        let q_lane = k.add(q_head, lane_bytes_wide);
        Partial {
            g,
            page_table,
            selection,
            partial_acc,
            partial_max,
            partial_sum,
            fused,
            max_pages,
            max_selected,
            splits,
            scale,
            tid,
            lane,
            warp,
            split,
            sequence,
            block_y,
            kv,
            q_row,
            kv_row,
            len,
            lane_bytes,
            first_row,
            row_address,
            smem,
            entries,
            k_lane,
            v_lane,
            q_lane,
        }
    }

    fn emit(&self, k: &mut KernelBuilder) {
        let g = self.g;
        let nc = Load::GLOBAL.non_coherent();
        k.comment(match self.selection {
            Some(_) => "iteration list: the selected pages of (sequence, kv head)",
            None => "iteration list: every page of the sequence, ceil(len / page_size)",
        });
        let entries = match self.selection {
            Some((_, counts)) => {
                let address = k.mad_wide(self.kv_row, 4u32, counts);
                k.ld::<U32>(nc, address)
            }
            None => {
                let padded = k.add(self.len, (g.page_size - 1) as u32);
                k.shr(padded, log2(g.page_size))
            }
        };
        k.comment("this split's entries: floor(s * n / splits) .. floor((s + 1) * n / splits)");
        let begin_scaled = k.mul(self.split, entries);
        let begin = k.div(begin_scaled, self.splits);
        let next_split = k.add(self.split, 1u32);
        let end_scaled = k.mul(next_split, entries);
        let end = k.div(end_scaled, self.splits);

        k.comment("q of the block's heads (this lane's 8 elements) times scale * log2(e)");
        let q_scale = k.mul(self.scale, LOG2_E);
        let mut q = Vec::with_capacity(g.heads);
        for h in 0..g.heads {
            let raw = load_chunk(k, nc, g.dtype, self.q_lane.at((h * g.row_bytes) as i64));
            let scaled: Vec<Reg<F32>> = raw.iter().map(|&x| k.mul(x, q_scale)).collect();
            q.push(<[Reg<F32>; 8]>::try_from(scaled).expect("eight elements"));
        }
        let state = SoftmaxState {
            max: (0..g.heads).map(|_| k.mov::<F32>(EMPTY_MAX)).collect(),
            sum: (0..g.heads).map(|_| k.mov::<F32>(0.0)).collect(),
            acc: (0..g.heads).map(|_| k.splat::<F32, 8>(0.0)).collect(),
        };

        k.comment(&format!(
            "entry batches of up to {} pages: list in shared memory, then the pipeline",
            g.batch_entries
        ));
        k.for_range(begin, end, g.batch_entries as u32, |k, batch_start| {
            self.entry_batch(k, batch_start, end, &q, &state);
        });
        self.store_state(k, &state);
        if let Some((out, counters)) = self.fused {
            self.merge_tail(k, out, counters);
        }
    }

    /// [`MergeMode::LastBlock`], `splits > 1`: publishes the block's states, counts the
    /// split in, and if it is the group's last, merges every split of the block's heads
    /// into `out` and resets the counter.
    fn merge_tail(&self, k: &mut KernelBuilder, out: Reg<U64>, counters: Reg<U64>) {
        let g = self.g;
        let several = k.setp(Cmp::Ne, self.splits, 1u32);
        k.if_then(several, |k| {
            k.comment(
                "every state of the block is stored; thread 0 fences (release), counts the \
                 split in, fences (acquire) and tells the block whether it was the last",
            );
            k.bar_sync(0);
            let first_thread = k.setp(Cmp::Eq, self.tid, 0u32);
            k.if_then(first_thread, |k| {
                let counter = k.mul_add(self.sequence, g.blocks_per_split as u32, self.block_y);
                let address = k.mad_wide(counter, 4u32, counters);
                k.fence_acq_rel_gpu();
                let before = k.atom_add::<U32>(Space::Global, address, 1u32);
                k.fence_acq_rel_gpu();
                let last_split = k.sub(self.splits, 1u32);
                let last = k.setp(Cmp::Eq, before, last_split);
                k.comment("the last block resets the counter for the next launch");
                let zero = k.mov::<U32>(0u32);
                k.guard(last, |k| k.st_global(address, zero));
                let flag = k.select(last, 1u32, 0u32);
                k.st_shared(self.entries, flag);
            });
            k.bar_sync(0);
            let flag = k.ld_shared::<U32>(self.entries);
            let last = k.setp(Cmp::Ne, flag, 0u32);
            k.if_then(last, |k| {
                let merge = MergeRow {
                    dtype: g.dtype,
                    head_dim: g.head_dim,
                    threads: g.threads,
                    load: Load::GLOBAL.cache(LoadCache::Global),
                    partial_acc: self.partial_acc,
                    partial_max: self.partial_max,
                    partial_sum: self.partial_sum,
                    out,
                    splits: self.splits,
                };
                let scratch_bytes = merge_scratch_bytes(g.threads, g.head_dim);
                k.comment(&format!(
                    "last block: merge the splits of each of the {} heads (L2 loads: other \
                     blocks wrote them), head h with its own {scratch_bytes}-byte scratch",
                    g.heads
                ));
                k.for_range(0u32, g.heads as u32, 1u32, |k, head| {
                    let row = k.add(self.q_row, head);
                    merge.emit(k, self.tid, row, |k| {
                        k.mul_add(head, scratch_bytes as u32, self.smem)
                    });
                });
            });
        });
    }

    /// One entry batch: the list of up to `batch_entries` pages, then its tokens through
    /// the copy pipeline.
    fn entry_batch(
        &self,
        k: &mut KernelBuilder,
        batch_start: Reg<U32>,
        end: Reg<U32>,
        q: &[[Reg<F32>; 8]],
        state: &SoftmaxState,
    ) {
        let g = self.g;
        let nc = Load::GLOBAL.non_coherent();
        k.comment("every thread is done with the previous list; thread t loads entry t");
        k.bar_sync(0);
        let entry = k.add(batch_start, self.tid);
        let physical = k.mov::<U32>(0u32);
        let valid_tokens = k.mov::<U32>(0u32);
        let listed = k.setp(Cmp::Lt, entry, end);
        k.if_then(listed, |k| {
            let logical = match (self.selection, self.max_selected) {
                (Some((selected_pages, _)), Some(stride)) => {
                    let index = k.mul_add(self.kv_row, stride, entry);
                    let address = k.mad_wide(index, 4u32, selected_pages);
                    k.ld::<U32>(nc, address)
                }
                _ => entry,
            };
            let first_token = k.shl(logical, log2(g.page_size));
            let live = k.setp(Cmp::Lt, first_token, self.len);
            k.comment("valid tokens min(page_size, len - j * page_size); pages past len: 0");
            k.if_then(live, |k| {
                let remaining = k.sub(self.len, first_token);
                let tokens = k.min(remaining, g.page_size as u32);
                k.assign(valid_tokens, tokens);
                let index = k.mul_add(self.sequence, self.max_pages, logical);
                let address = k.mad_wide(index, 4u32, self.page_table);
                let page = k.ld::<U32>(nc, address);
                k.assign(physical, page);
            });
        });
        let slot = k.mul_add(self.tid, 8u32, self.entries);
        k.st_vector::<U32, 2>(Store::SHARED, slot, [physical, valid_tokens]);
        k.bar_sync(0);

        let left = k.sub(end, batch_start);
        let listed_entries = k.min(left, g.batch_entries as u32);
        let tokens = k.shl(listed_entries, log2(g.page_size));
        let padded = k.add(tokens, (g.stage_tokens - 1) as u32);
        let stage_count = k.shr(padded, log2(g.stage_tokens));

        k.comment(&format!(
            "prologue: request stages 0 to {} (one commit group each, empty past the list)",
            g.stages - 2
        ));
        for stage in 0..g.stages - 1 {
            let due = k.setp(Cmp::Gt, stage_count, stage as u32);
            k.if_then(due, |k| {
                self.copy_stage(
                    k,
                    (stage as u32).into(),
                    ((stage * g.stage_bytes) as u32).into(),
                )
            });
            k.cp_async_commit();
        }
        let read_offset = k.mov::<U32>(0u32);
        let write_offset = k.mov::<U32>(((g.stages - 1) * g.stage_bytes) as u32);
        k.comment(&format!(
            "stage loop: request stage i + {} into the buffer read at i - 1 (by this same \
             thread), wait for stage i, attend to it",
            g.stages - 1
        ));
        k.for_range(0u32, stage_count, 1u32, |k, stage| {
            let ahead = k.add(stage, (g.stages - 1) as u32);
            let due = k.setp(Cmp::Lt, ahead, stage_count);
            k.if_then(due, |k| {
                self.copy_stage(k, ahead.into(), write_offset.into())
            });
            k.cp_async_commit();
            self.advance(k, write_offset);
            k.cp_async_wait((g.stages - 1) as u32);
            self.attend_stage(k, stage, read_offset, q, state);
            self.advance(k, read_offset);
        });
        k.cp_async_wait(0);
    }

    /// `offset = (offset + stage_bytes) mod (stages · stage_bytes)`.
    fn advance(&self, k: &mut KernelBuilder, offset: Reg<U32>) {
        let g = self.g;
        let next = k.add(offset, g.stage_bytes as u32);
        let wrapped = k.setp(Cmp::Eq, next, (g.stages * g.stage_bytes) as u32);
        let next = k.select(wrapped, 0u32, next);
        k.assign(offset, next);
    }

    /// Row `row` of the batch's token list (`entry = row / page_size`): whether it holds a
    /// valid token, its physical page and its slot in the page.
    fn lookup(&self, k: &mut KernelBuilder, row: Reg<U32>) -> (Reg<Pred>, Reg<U32>, Reg<U32>) {
        let g = self.g;
        let entry = k.shr(row, log2(g.page_size));
        let slot = k.and(row, (g.page_size - 1) as u32);
        let clamped = k.min(entry, (g.batch_entries - 1) as u32);
        let address = k.mul_add(clamped, 8u32, self.entries);
        let [physical, valid_tokens] = k.ld_vector::<U32, 2>(Load::SHARED, address);
        let listed = k.setp(Cmp::Lt, entry, g.batch_entries as u32);
        let in_page = k.setp(Cmp::Lt, slot, valid_tokens);
        let inside = k.and(listed, in_page);
        (inside, physical, slot)
    }

    /// Requests this thread's K and V pieces of stage `stage` into the buffer at `buffer`;
    /// rows without a valid token are zero-filled from no global bytes.
    fn copy_stage(&self, k: &mut KernelBuilder, stage: Operand<U32>, buffer: Operand<U32>) {
        let g = self.g;
        let first = k.mul_add(stage, g.stage_tokens as u32, self.first_row);
        let destination = k.add(self.row_address, buffer);
        for step in 0..g.steps {
            let row = if step == 0 {
                first
            } else {
                k.add(first, (step * g.rows_per_pass) as u32)
            };
            let (inside, physical, slot) = self.lookup(k, row);
            let offset = g.layout.emit_kv_offset(k, physical, self.kv, slot);
            let offset = k.select(inside, offset, 0u64);
            let bytes = k.select(inside, 16u32, 0u32);
            let key = k.add(self.k_lane, offset);
            let value = k.add(self.v_lane, offset);
            let row_offset = (step * g.rows_per_pass * g.row_bytes) as i64;
            let values_offset = (g.stage_tokens * g.row_bytes) as i64;
            k.cp_async_16_zero_fill(destination.at(row_offset), key, bytes);
            k.cp_async_16_zero_fill(destination.at(row_offset + values_offset), value, bytes);
        }
    }

    /// Attends the block's query heads to this thread's rows of stage `stage` (buffer at
    /// `buffer`), updating the online softmax.
    fn attend_stage(
        &self,
        k: &mut KernelBuilder,
        stage: Reg<U32>,
        buffer: Reg<U32>,
        q: &[[Reg<F32>; 8]],
        state: &SoftmaxState,
    ) {
        let g = self.g;
        let first = k.mul_add(stage, g.stage_tokens as u32, self.first_row);
        let base = k.add(self.row_address, buffer);
        k.comment(&format!(
            "scores of {} rows x {} heads: 8 products per lane, summed over the lane group",
            g.steps, g.heads
        ));
        let mut scores: Vec<Vec<Reg<F32>>> = Vec::with_capacity(g.steps);
        for step in 0..g.steps {
            let row_offset = (step * g.rows_per_pass * g.row_bytes) as i64;
            let keys = load_chunk(k, Load::SHARED, g.dtype, base.at(row_offset));
            let row = if step == 0 {
                first
            } else {
                k.add(first, (step * g.rows_per_pass) as u32)
            };
            let (inside, _, _) = self.lookup(k, row);
            let mut row_scores = Vec::with_capacity(g.heads);
            for q_head in q {
                let mut dot = k.mul(q_head[0], keys[0]);
                for e in 1..HALVES_PER_CHUNK {
                    dot = k.fma(q_head[e], keys[e], dot);
                }
                let mut mask = g.lanes_per_row / 2;
                while mask > 0 {
                    let other = k.shfl_bfly(dot, mask as u32);
                    dot = k.add(dot, other);
                    mask /= 2;
                }
                row_scores.push(k.select(inside, dot, f32::NEG_INFINITY));
            }
            scores.push(row_scores);
        }

        k.comment("online softmax: one max update and one rescale per head and stage");
        let mut weights: Vec<Vec<Reg<F32>>> = vec![Vec::with_capacity(g.heads); g.steps];
        for h in 0..g.heads {
            let mut max = state.max[h];
            for row_scores in &scores {
                max = k.max(max, row_scores[h]);
            }
            let shift = k.sub(state.max[h], max);
            let rescale = k.ex2_approx_ftz(shift);
            let mut sum = k.mul(state.sum[h], rescale);
            for (step, row_scores) in scores.iter().enumerate() {
                let centred = k.sub(row_scores[h], max);
                let weight = k.ex2_approx_ftz(centred);
                sum = k.add(sum, weight);
                weights[step].push(weight);
            }
            k.assign(state.sum[h], sum);
            k.assign(state.max[h], max);
            for &a in &state.acc[h] {
                let scaled = k.mul(a, rescale);
                k.assign(a, scaled);
            }
        }

        k.comment("accumulate p * v");
        for (step, step_weights) in weights.iter().enumerate() {
            let row_offset = (step * g.rows_per_pass * g.row_bytes) as i64;
            let values_offset = (g.stage_tokens * g.row_bytes) as i64;
            let values = load_chunk(
                k,
                Load::SHARED,
                g.dtype,
                base.at(row_offset + values_offset),
            );
            for (h, &weight) in step_weights.iter().enumerate() {
                for (e, &a) in state.acc[h].iter().enumerate() {
                    let next = k.fma(weight, values[e], a);
                    k.assign(a, next);
                }
            }
        }
    }

    /// Merges the lane groups and warps of the block and writes the split's state.
    fn store_state(&self, k: &mut KernelBuilder, state: &SoftmaxState) {
        let g = self.g;
        k.comment("merge the lane groups of each warp (butterfly shuffles)");
        let mut mask = g.lanes_per_row;
        while mask < 32 {
            for h in 0..g.heads {
                let other_max = k.shfl_bfly(state.max[h], mask as u32);
                let other_sum = k.shfl_bfly(state.sum[h], mask as u32);
                let max = k.max(state.max[h], other_max);
                let shift = k.sub(state.max[h], max);
                let own_weight = k.ex2_approx_ftz(shift);
                let other_shift = k.sub(other_max, max);
                let other_weight = k.ex2_approx_ftz(other_shift);
                let other_scaled = k.mul(other_sum, other_weight);
                let sum = k.fma(state.sum[h], own_weight, other_scaled);
                k.assign(state.sum[h], sum);
                for &a in &state.acc[h] {
                    let other = k.shfl_bfly(a, mask as u32);
                    let other_scaled = k.mul(other, other_weight);
                    let merged = k.fma(a, own_weight, other_scaled);
                    k.assign(a, merged);
                }
                k.assign(state.max[h], max);
            }
            mask *= 2;
        }

        let acc_bytes = g.warps * g.heads * g.head_dim * 4;
        let stat_bytes = g.warps * g.heads * 4;
        k.comment(&format!(
            "merge the warps through shared memory: acc [{}][{}][{}] f32, then max and sum \
             [{}][{}] (over the stage buffers, free after the barrier)",
            g.warps, g.heads, g.head_dim, g.warps, g.heads
        ));
        k.bar_sync(0);
        let first_group = k.setp(Cmp::Lt, self.lane, g.lanes_per_row as u32);
        k.if_then(first_group, |k| {
            let warp_acc = k.mul_add(self.warp, (g.heads * g.head_dim * 4) as u32, self.smem);
            let lane_acc = k.mul_add(self.lane_bytes, 2u32, warp_acc);
            for h in 0..g.heads {
                let offset = (h * g.head_dim * 4) as i64;
                let [a0, a1, a2, a3, a4, a5, a6, a7] = state.acc[h];
                k.st_vector::<F32, 4>(Store::SHARED, lane_acc.at(offset), [a0, a1, a2, a3]);
                k.st_vector::<F32, 4>(Store::SHARED, lane_acc.at(offset + 16), [a4, a5, a6, a7]);
            }
            let lane0 = k.setp(Cmp::Eq, self.lane, 0u32);
            let warp_stats = k.mul_add(self.warp, (g.heads * 4) as u32, self.smem);
            for h in 0..g.heads {
                let offset = (acc_bytes + h * 4) as i64;
                k.guard(lane0, |k| {
                    k.st_shared(warp_stats.at(offset), state.max[h]);
                    k.st_shared(warp_stats.at(offset + stat_bytes as i64), state.sum[h]);
                });
            }
        });
        k.bar_sync(0);

        let quads = g.head_dim / 4;
        let units = g.heads * quads;
        k.comment(&format!(
            "{units} (head, 4 elements) units over {} threads: combine the warps, store",
            g.threads
        ));
        for round in 0..units.div_ceil(g.threads) {
            let unit = if round == 0 {
                self.tid
            } else {
                k.add(self.tid, (round * g.threads) as u32)
            };
            let body = |k: &mut KernelBuilder| self.store_unit(k, unit, acc_bytes, stat_bytes);
            if (round + 1) * g.threads > units {
                let inside = k.setp(Cmp::Lt, unit, units as u32);
                k.if_then(inside, body);
            } else {
                body(k);
            }
        }
    }

    /// Combines the warps' states for one (head, 4 elements) unit and stores it (and, for
    /// the head's first unit, its max and sum).
    fn store_unit(
        &self,
        k: &mut KernelBuilder,
        unit: Reg<U32>,
        acc_bytes: usize,
        stat_bytes: usize,
    ) {
        let g = self.g;
        let quads = g.head_dim / 4;
        let head = k.shr(unit, log2(quads));
        let quad = k.and(unit, (quads - 1) as u32);
        let head_stats = k.mul_add(head, 4u32, self.smem);
        let maxima: Vec<Reg<F32>> = (0..g.warps)
            .map(|w| {
                let offset = (acc_bytes + w * g.heads * 4) as i64;
                k.ld_shared::<F32>(head_stats.at(offset))
            })
            .collect();
        let mut max = maxima[0];
        for &m in &maxima[1..] {
            max = k.max(max, m);
        }
        let unit_acc = k.mul_add(unit, 16u32, self.smem);
        let mut sum = k.mov::<F32>(0.0);
        let mut acc = k.splat::<F32, 4>(0.0);
        for (w, &warp_max) in maxima.iter().enumerate() {
            let shift = k.sub(warp_max, max);
            let weight = k.ex2_approx_ftz(shift);
            let offset = (acc_bytes + stat_bytes + w * g.heads * 4) as i64;
            let warp_sum = k.ld_shared::<F32>(head_stats.at(offset));
            sum = k.fma(warp_sum, weight, sum);
            let warp_offset = (w * g.heads * g.head_dim * 4) as i64;
            let values = k.ld_vector::<F32, 4>(Load::SHARED, unit_acc.at(warp_offset));
            for (a, &v) in acc.iter_mut().zip(&values) {
                *a = k.fma(v, weight, *a);
            }
        }
        let row = k.add(self.q_row, head);
        let store_state = |k: &mut KernelBuilder| {
            let state_index = k.mul_add(row, self.splits, self.split);
            let acc_row = k.mad_wide(state_index, (g.head_dim * 4) as u32, self.partial_acc);
            let acc_address = k.mad_wide(quad, 16u32, acc_row);
            k.st_vector::<F32, 4>(Store::GLOBAL, acc_address, acc);
            let first_quad = k.setp(Cmp::Eq, quad, 0u32);
            let max_address = k.mad_wide(state_index, 4u32, self.partial_max);
            let sum_address = k.mad_wide(state_index, 4u32, self.partial_sum);
            k.guard(first_quad, |k| {
                k.st_global(max_address, max);
                k.st_global(sum_address, sum);
            });
        };
        match self.fused {
            None => store_state(k),
            Some((out, _)) => {
                let single = k.setp(Cmp::Eq, self.splits, 1u32);
                k.comment("one split: the state is the answer, write out (no workspace)");
                k.if_else(
                    single,
                    |k| store_normalised(k, g.dtype, g.head_dim, out, row, quad, acc, sum),
                    store_state,
                );
            }
        }
    }
}

/// One split's state as the merge loads it: max, sum and this thread's 4 accumulator
/// elements.
struct SplitState {
    max: Reg<F32>,
    sum: Reg<F32>,
    acc: [Reg<F32>; 4],
}

/// Shared memory of one row merge by `threads` threads: acc `[groups][d]` f32, then max and
/// sum `[groups]` f32, `groups = threads / (d / 4)`.
fn merge_scratch_bytes(threads: usize, head_dim: usize) -> usize {
    let groups = threads / (head_dim / 4);
    groups * (head_dim + 2) * 4
}

/// The merge of one output row's split states into `out`, emitted by the merge kernel (one
/// row per block) and by the fused tail of the partial kernel (each head of the block in
/// turn): the same code, so the same arithmetic.
struct MergeRow {
    dtype: DType,
    head_dim: usize,
    /// Threads that combine the row, a multiple of `head_dim / 4`: all of the block's.
    threads: usize,
    /// How the states are loaded: non-coherent in the merge kernel (an earlier launch wrote
    /// them), `.cg` in the fused tail (other blocks of the same launch wrote them).
    load: Load,
    partial_acc: Reg<U64>,
    partial_max: Reg<U64>,
    partial_sum: Reg<U64>,
    out: Reg<U64>,
    splits: Reg<U32>,
}

impl MergeRow {
    /// Groups of `head_dim / 4` threads, each taking every `groups`-th split.
    fn groups(&self) -> usize {
        self.threads / (self.head_dim / 4)
    }

    /// `out[row, :] = Σ_s 2^(max_s − M) acc_s / Σ_s 2^(max_s − M) sum_s` with thread `tid`
    /// of `threads` and [`merge_scratch_bytes`] of shared memory at the address `scratch`
    /// computes (after the split loop). Ends after a barrier and the first group's stores:
    /// the caller owns the scratch again only after another barrier.
    fn emit(
        &self,
        k: &mut KernelBuilder,
        tid: Reg<U32>,
        row: Reg<U32>,
        scratch: impl FnOnce(&mut KernelBuilder) -> Reg<U32>,
    ) {
        let head_dim = self.head_dim;
        let quads = head_dim / 4;
        let groups = self.groups();
        let (splits, load) = (self.splits, self.load);
        let group = k.shr(tid, log2(quads));
        let quad = k.and(tid, (quads - 1) as u32);
        let quad_bytes = k.shl(quad, 4u32);
        let quad_bytes_wide = k.cvt::<U64>(quad_bytes);
        let first_state = k.mul(row, splits);
        let last_split = k.sub(splits, 1u32);
        let max = k.mov::<F32>(EMPTY_MAX);
        let sum = k.mov::<F32>(0.0);
        let acc = k.splat::<F32, 4>(0.0);
        k.for_range(
            group,
            splits,
            (groups * MERGE_UNROLL) as u32,
            |k, first_split| {
                k.comment(&format!(
                    "load the states of {MERGE_UNROLL} splits (past the end: weight 0), then \
                     combine"
                ));
                let loaded: Vec<SplitState> = (0..MERGE_UNROLL)
                    .map(|u| {
                        let split = if u == 0 {
                            first_split
                        } else {
                            k.add(first_split, (u * groups) as u32)
                        };
                        let inside = k.setp(Cmp::Lt, split, splits);
                        let clamped = k.min(split, last_split);
                        let state = k.add(first_state, clamped);
                        let max_address = k.mad_wide(state, 4u32, self.partial_max);
                        let split_max = k.ld::<F32>(load, max_address);
                        let split_max = k.select(inside, split_max, f32::NEG_INFINITY);
                        let sum_address = k.mad_wide(state, 4u32, self.partial_sum);
                        let split_sum = k.ld::<F32>(load, sum_address);
                        let acc_row = k.mad_wide(state, (head_dim * 4) as u32, self.partial_acc);
                        let acc_address = k.add(acc_row, quad_bytes_wide);
                        let split_acc = k.ld_vector::<F32, 4>(load, acc_address);
                        SplitState {
                            max: split_max,
                            sum: split_sum,
                            acc: split_acc,
                        }
                    })
                    .collect();
                let mut new_max = max;
                for split in &loaded {
                    new_max = k.max(new_max, split.max);
                }
                let shift = k.sub(max, new_max);
                let rescale = k.ex2_approx_ftz(shift);
                let mut new_sum = k.mul(sum, rescale);
                let mut new_acc: Vec<Reg<F32>> = acc.iter().map(|&a| k.mul(a, rescale)).collect();
                for split in &loaded {
                    let split_shift = k.sub(split.max, new_max);
                    let weight = k.ex2_approx_ftz(split_shift);
                    new_sum = k.fma(split.sum, weight, new_sum);
                    for (a, &v) in new_acc.iter_mut().zip(&split.acc) {
                        *a = k.fma(v, weight, *a);
                    }
                }
                k.assign(max, new_max);
                k.assign(sum, new_sum);
                for (&a, &n) in acc.iter().zip(&new_acc) {
                    k.assign(a, n);
                }
            },
        );

        let acc_bytes = groups * head_dim * 4;
        k.comment(&format!(
            "combine the groups through shared memory: acc [{groups}][{head_dim}] f32, then max \
             and sum [{groups}]"
        ));
        let base = scratch(k);
        let group_acc = k.mul_add(group, (head_dim * 4) as u32, base);
        let thread_acc = k.add(group_acc, quad_bytes);
        k.st_vector::<F32, 4>(Store::SHARED, thread_acc, acc);
        let first_quad = k.setp(Cmp::Eq, quad, 0u32);
        let group_stats = k.mul_add(group, 4u32, base);
        k.guard(first_quad, |k| {
            k.st_shared(group_stats.at(acc_bytes as i64), max);
            k.st_shared(group_stats.at((acc_bytes + groups * 4) as i64), sum);
        });
        k.bar_sync(0);
        let writer = k.setp(Cmp::Lt, tid, quads as u32);
        k.if_then(writer, |k| {
            k.comment("group 0: combine, normalise, round to the dtype, store 4 elements");
            let maxima: Vec<Reg<F32>> = (0..groups)
                .map(|gi| k.ld_shared::<F32>(base.at((acc_bytes + gi * 4) as i64)))
                .collect();
            let mut total_max = maxima[0];
            for &m in &maxima[1..] {
                total_max = k.max(total_max, m);
            }
            let quad_acc = k.add(base, quad_bytes);
            let mut total = k.mov::<F32>(0.0);
            let mut values = k.splat::<F32, 4>(0.0);
            for (gi, &group_max) in maxima.iter().enumerate() {
                let shift = k.sub(group_max, total_max);
                let weight = k.ex2_approx_ftz(shift);
                let offset = (acc_bytes + groups * 4 + gi * 4) as i64;
                let group_sum = k.ld_shared::<F32>(base.at(offset));
                total = k.fma(group_sum, weight, total);
                let group_values =
                    k.ld_vector::<F32, 4>(Load::SHARED, quad_acc.at((gi * head_dim * 4) as i64));
                for (a, &v) in values.iter_mut().zip(&group_values) {
                    *a = k.fma(v, weight, *a);
                }
            }
            store_normalised(k, self.dtype, head_dim, self.out, row, quad, values, total);
        });
    }
}

/// `out[row, 4·quad .. 4·quad + 4] = values / total`, rounded to `dtype`.
#[allow(clippy::too_many_arguments)]
fn store_normalised(
    k: &mut KernelBuilder,
    dtype: DType,
    head_dim: usize,
    out: Reg<U64>,
    row: Reg<U32>,
    quad: Reg<U32>,
    values: [Reg<F32>; 4],
    total: Reg<F32>,
) {
    let inverse = k.rcp_rn(total);
    let normalised: Vec<Reg<F32>> = values.iter().map(|&v| k.mul(v, inverse)).collect();
    let low = narrow_pair(k, dtype, normalised[0], normalised[1]);
    let high = narrow_pair(k, dtype, normalised[2], normalised[3]);
    let out_row = k.mad_wide(row, (head_dim * 2) as u32, out);
    let out_address = k.mad_wide(quad, 8u32, out_row);
    k.st_vector::<B32, 2>(Store::GLOBAL, out_address, [low, high]);
}

/// Generates the merge kernel ([`MergeMode::Separate`]): `out[b, h, :] = Σ_s 2^(max_s − M)
/// acc_s / Σ_s 2^(max_s − M) sum_s` over the `splits` partial states of row `(b, h)`.
pub fn generate_merge(spec: &DecodeAttentionSpec, target: Target) -> Result<GpuKernel, SpecError> {
    spec.validate()?;
    let layout = &spec.layout;
    let head_dim = layout.head_dim;
    let quads = head_dim / 4;
    let groups = MERGE_THREADS / quads;
    let mut k = KernelBuilder::new(&spec.merge_entry_name(), target);
    let partial_acc = k.param_pointer("partial_acc", Access::Read);
    let partial_max = k.param_pointer("partial_max", Access::Read);
    let partial_sum = k.param_pointer("partial_sum", Access::Read);
    let out = k.param_pointer("out", Access::Write);
    let _batch = k.param_u32("batch");
    let splits = k.param_u32("splits");
    let scratch = k.shared_array(
        "merge_scratch",
        merge_scratch_bytes(MERGE_THREADS, head_dim) as u32,
        16,
    );

    k.comment(&format!(
        "block = output row (b, h); {groups} groups of {quads} threads, group g takes splits \
         g, g + {groups}, ..., {MERGE_UNROLL} per iteration, thread 4 elements"
    ));
    let tid = k.tid_x();
    let row = k.ctaid_x();
    let merge = MergeRow {
        dtype: layout.dtype,
        head_dim,
        threads: MERGE_THREADS,
        load: Load::GLOBAL.non_coherent(),
        partial_acc,
        partial_max,
        partial_sum,
        out,
        splits,
    };
    merge.emit(&mut k, tid, row, |k| k.shared_address(&scratch));

    let launch = LaunchRule::linear(
        Extent::fixed(layout.q_heads as u32).times("batch", 1),
        MERGE_THREADS as u32,
    );
    Ok(k.finish(launch))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::paged::PageOrder;

    fn layout(dtype: DType, q_heads: usize, kv_heads: usize, head_dim: usize) -> PagedKv {
        PagedKv {
            dtype,
            q_heads,
            kv_heads,
            head_dim,
            page_size: 16,
            order: PageOrder::HeadMajor,
        }
    }

    #[test]
    fn default_tuning_is_valid() {
        for dtype in [DType::F16, DType::BF16] {
            for head_dim in [32, 64, 128] {
                for (q, kv) in [(32, 32), (32, 8), (32, 4), (64, 4), (12, 4), (8, 2)] {
                    for sparse in [false, true] {
                        let spec = DecodeAttentionSpec::new(layout(dtype, q, kv, head_dim), sparse);
                        spec.validate().unwrap();
                        assert!(spec.heads_per_block <= 8);
                    }
                }
            }
        }
    }

    /// Head dim 32: 4 lanes per row, 8 rows per warp and step, the same stage bytes as at 64
    /// and 128; every tuning the spec accepts has power-of-two stages (the stage count is a
    /// shift) and shared memory within the limit that holds the stages, the warps' merge
    /// scratch, the fused tail's scratch and the entry list without overlap.
    #[test]
    fn head_dim_32_geometry() {
        let spec = DecodeAttentionSpec::new(layout(DType::F16, 8, 2, 32), false);
        assert_eq!((spec.heads_per_block, spec.warps, spec.steps), (4, 4, 4));
        let g = Geometry::of(&spec);
        assert_eq!(
            (
                g.lanes_per_row,
                g.rows_per_pass,
                g.stage_tokens,
                g.row_bytes
            ),
            (4, 32, 128, 64)
        );
        for head_dim in [32, 64, 128] {
            let other = Geometry::of(&DecodeAttentionSpec::new(
                layout(DType::F16, 8, 2, head_dim),
                false,
            ));
            assert_eq!(other.stage_bytes, 16 << 10, "head_dim {head_dim}");
            assert_eq!(other.lanes_per_row, head_dim / 8);
        }
        // Merge: 16 groups of 8 threads, acc [16][32] then max and sum [16].
        assert_eq!(
            merge_scratch_bytes(MERGE_THREADS, 32),
            (16 * 32 + 2 * 16) * 4
        );
        assert_eq!(merge_scratch_bytes(32, 32), (4 * 32 + 2 * 4) * 4);

        let mut accepted = 0;
        for sparse in [false, true] {
            for merge in [MergeMode::Separate, MergeMode::LastBlock] {
                for heads in [1, 2, 4] {
                    for warps in [1, 2, 4, 8, 16] {
                        for steps in [1, 2, 4, 8] {
                            for stages in 2..=8 {
                                let spec =
                                    DecodeAttentionSpec::new(layout(DType::BF16, 8, 2, 32), sparse)
                                        .with_merge(merge)
                                        .with_tuning(heads, warps, steps, stages);
                                if spec.validate().is_err() {
                                    continue;
                                }
                                accepted += 1;
                                let g = Geometry::of(&spec);
                                assert!(g.stage_tokens.is_power_of_two());
                                assert_eq!(g.stage_tokens, steps * warps * 8);
                                assert_eq!(g.rows_per_pass * g.lanes_per_row, g.threads);
                                assert!(g.shared_bytes <= MAX_SHARED_BYTES);
                                assert!(g.entries_offset >= stages * g.stage_bytes);
                                assert!(g.entries_offset >= warps * heads * (32 + 2) * 4);
                                if spec.fused() {
                                    let tail = heads * merge_scratch_bytes(g.threads, 32);
                                    assert!(g.entries_offset >= tail);
                                }
                                assert_eq!(g.shared_bytes, g.entries_offset + g.threads * 8);
                            }
                        }
                    }
                }
            }
        }
        assert!(accepted > 400, "{accepted} tunings accepted");
    }

    #[test]
    fn split_rule_fills_the_sms() {
        let sms = H100_SM_COUNT;
        assert_eq!(split_count(1, 8, 32768, sms), 33);
        assert_eq!(split_count(16, 8, 32768, sms), 2);
        assert_eq!(split_count(16, 32, 32768, sms), 1);
        assert_eq!(split_count(1, 32, 32768, sms), 8);
        assert_eq!(split_count(1, 8, 4096, sms), 32);
        assert_eq!(split_count(1, 8, 1, sms), 1);
        for (batch, kv) in [(1, 8), (16, 8), (1, 32), (4, 8)] {
            let blocks = batch * kv * split_count(batch, kv, 1 << 15, sms) as usize;
            assert!(blocks <= sms * TARGET_BLOCKS_PER_SM || blocks == batch * kv);
            assert!(
                blocks * 2 > sms * TARGET_BLOCKS_PER_SM,
                "{batch} x {kv}: {blocks}"
            );
        }
    }
}
