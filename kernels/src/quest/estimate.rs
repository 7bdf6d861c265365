//! Quest page-score estimate: for every (sequence `b`, KV head `h`, logical page `j`) the
//! score `Σ_{query heads g of h's group} Σᵢ max(q_{g,i}·Mᵢ, q_{g,i}·mᵢ)` in f32, where `M`, `m`
//! are the page's `page_max` / `page_min` rows for head `h` — exactly
//! `kiln_ir::quest::group_scores`, bit for bit.
//!
//! **Work split.** Block `(x, y)` serves row `y = b·kv_heads + h` and pages
//! `x·threads .. (x+1)·threads`, one page per thread, so batch 1 at 32K context (2048 pages,
//! 8 KV heads) is 8 × 32 = 256 blocks of 64 threads: every one of an H100's 132 SMs gets
//! work. The block first widens its group's `group × head_dim` query values into shared
//! memory (read back as broadcasts: every thread of the block uses the same query).
//!
//! **Bit-exact order.** Each thread computes its page's score alone, in the reference's order:
//! per query head an f32 running sum over dims `0..head_dim` of
//! `max(q·M, q·m)` (`mul.f32`, `max.f32`, `add.f32`; no product feeds an add directly, so
//! ptxas cannot contract into an FMA), and then the heads' sums added in head order. The
//! heads' sums are independent chains, interleaved so the adds overlap. Splitting a page's
//! dims across lanes would be faster per page but would change the rounding, and the top-K
//! selection downstream is then no longer bit-identical to the host reference.
//!
//! Metadata rows are read with 16-byte `ld.global.nc` loads; a warp's 32 pages are 32
//! different rows, whose other halves of each 32-byte sector hit in L1 on the next chunk.
//!
//! Parameters, in order:
//! - `q [batch, q_heads, head_dim]` T (read);
//! - `page_max`, `page_min` `[num_pages, kv_heads, head_dim]` T (read);
//! - `page_table [batch, max_pages]` i32 (read); `seq_lens [batch]` i32 (read);
//! - `scores [batch, kv_heads, max_pages]` f32 (written): pages `j >= ceil(len/page_size)`
//!   (and every page of an empty sequence) get `-inf`;
//! - scalars `batch`, `max_pages` (u32).
//!
//! Launch: grid `(ceil(max_pages / threads), batch · kv_heads, 1)`, block `(threads, 1, 1)`,
//! no dynamic shared memory (the query lives in a static array of `group·head_dim·4` bytes).
//!
//! This file generates PTX; it must not launch anything.

use crate::attention::PagedKv;
use crate::vector::{load_chunk, HALVES_PER_CHUNK};
use crate::SpecError;
use kiln_codegen::kernel::{Access, Extent, GpuKernel, LaunchRule};
use kiln_codegen::ptx::{Axis, Cmp, KernelBuilder, Load, Reg, Special, Store, Target, F32, U32};
use serde::{Deserialize, Serialize};

const FAMILY: &str = "quest_estimate";

/// Pages (threads) per block unless tuned.
pub const DEFAULT_PAGES_PER_BLOCK: usize = 64;

/// The page-score estimate kernel for one paged layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QuestEstimateSpec {
    pub layout: PagedKv,
    /// Pages per block, one per thread: a multiple of 32 in `32..=1024`.
    pub pages_per_block: usize,
}

impl QuestEstimateSpec {
    /// The default tuning for `layout`.
    pub fn new(layout: PagedKv) -> QuestEstimateSpec {
        QuestEstimateSpec {
            layout,
            pages_per_block: DEFAULT_PAGES_PER_BLOCK,
        }
    }

    /// The kernel entry name.
    pub fn entry(&self) -> String {
        format!(
            "quest_estimate_{}_t{}",
            self.layout.tag(),
            self.pages_per_block
        )
    }

    /// Bytes of the shared query array.
    pub fn query_bytes(&self) -> usize {
        self.layout.group_size() * self.layout.head_dim * 4
    }

    /// Checks the spec; errors name the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.layout.validate(FAMILY)?;
        let t = self.pages_per_block;
        if t == 0 || !t.is_multiple_of(32) || t > 1024 {
            return Err(SpecError::new(
                FAMILY,
                format!("pages_per_block must be a multiple of 32 in 32..=1024, got {t}"),
            ));
        }
        if self.query_bytes() > 32 * 1024 {
            return Err(SpecError::new(
                FAMILY,
                format!(
                    "q_heads / kv_heads = {} query heads of head_dim {} need {} bytes of shared \
                     memory, more than 32 KiB",
                    self.layout.group_size(),
                    self.layout.head_dim,
                    self.query_bytes()
                ),
            ));
        }
        Ok(())
    }
}

/// Generates the estimate kernel for `spec`.
pub fn generate(spec: &QuestEstimateSpec) -> Result<GpuKernel, SpecError> {
    spec.validate()?;
    let layout = spec.layout;
    let dtype = layout.dtype;
    let head_dim = layout.head_dim as u32;
    let kv_heads = layout.kv_heads as u32;
    let group = layout.group_size() as u32;
    let page_size = layout.page_size as u32;
    let threads = spec.pages_per_block as u32;
    let chunks_per_row = head_dim / HALVES_PER_CHUNK as u32;
    let query_chunks = group * chunks_per_row;
    let input = Load::GLOBAL.non_coherent();

    let mut k = KernelBuilder::new(&spec.entry(), Target::Sm80);
    let q = k.param_pointer("q", Access::Read);
    let page_max = k.param_pointer("page_max", Access::Read);
    let page_min = k.param_pointer("page_min", Access::Read);
    let page_table = k.param_pointer("page_table", Access::Read);
    let seq_lens = k.param_pointer("seq_lens", Access::Read);
    let scores = k.param_pointer("scores", Access::Write);
    let _batch = k.param_u32("batch");
    let max_pages = k.param_u32("max_pages");
    let query = k.shared_array("group_query", spec.query_bytes() as u32, 16);

    k.comment("this block's (sequence, KV head) row and this thread's page");
    let row = k.special(Special::Ctaid(Axis::Y));
    let sequence = k.div(row, kv_heads);
    let head = k.rem(row, kv_heads);
    let tid = k.tid_x();
    let block_x = k.ctaid_x();
    let page = k.mul_add(block_x, threads, tid);
    let query_base = k.shared_address(&query);

    k.comment("stage 1: the group's query heads, widened to f32, into shared memory");
    // Query heads h*group .. (h+1)*group of sequence b start at row (b*kv_heads + h)*group.
    let query_row = k.mul_wide(row, query_chunks * 16);
    let query_source = k.add(q, query_row);
    for pass in 0..query_chunks.div_ceil(threads) {
        let chunk = k.add(tid, pass * threads);
        let in_query = k.setp(Cmp::Lt, chunk, query_chunks);
        k.if_then(in_query, |k| {
            let offset = k.mul_wide(chunk, 16u32);
            let address = k.add(query_source, offset);
            let values = load_chunk(k, input, dtype, address);
            let slot = k.mul_add(chunk, 32u32, query_base);
            k.st_vector(
                Store::SHARED,
                slot,
                [values[0], values[1], values[2], values[3]],
            );
            k.st_vector(
                Store::SHARED,
                slot.at(16),
                [values[4], values[5], values[6], values[7]],
            );
        });
    }
    k.bar_sync(0);

    k.comment("stage 2: one page per thread, in the reference's order");
    let in_table = k.setp(Cmp::Lt, page, max_pages);
    k.if_then(in_table, |k| {
        let length_offset = k.mul_wide(sequence, 4u32);
        let length_address = k.add(seq_lens, length_offset);
        let length = k.ld::<U32>(input, length_address);
        let rounded = k.add(length, page_size - 1);
        let pages = k.shr(rounded, page_size.trailing_zeros());
        let score_index = k.mul_add(row, max_pages, page);
        let score_offset = k.mul_wide(score_index, 4u32);
        let score_address = k.add(scores, score_offset);
        let valid = k.setp(Cmp::Lt, page, pages);
        k.if_else(
            valid,
            |k| {
                let entry = k.mul_add(sequence, max_pages, page);
                let entry_offset = k.mul_wide(entry, 4u32);
                let entry_address = k.add(page_table, entry_offset);
                let physical = k.ld::<U32>(input, entry_address);
                let meta_row = k.mul_add(physical, kv_heads, head);
                let meta_offset = k.mul_wide(meta_row, head_dim * 2);
                let max_row = k.add(page_max, meta_offset);
                let min_row = k.add(page_min, meta_offset);
                let mut sums: Vec<Reg<F32>> = (0..group).map(|_| k.mov::<F32>(0.0)).collect();
                for c in 0..chunks_per_row {
                    let high = load_chunk(k, input, dtype, max_row.at(c as i64 * 16));
                    let low = load_chunk(k, input, dtype, min_row.at(c as i64 * 16));
                    for (g, sum) in sums.iter_mut().enumerate() {
                        let at = ((g as u32 * head_dim + c * 8) * 4) as i64;
                        let q_lo = k.ld_vector::<F32, 4>(Load::SHARED, query_base.at(at));
                        let q_hi = k.ld_vector::<F32, 4>(Load::SHARED, query_base.at(at + 16));
                        let values = [q_lo, q_hi].concat();
                        for i in 0..8 {
                            let upper = k.mul(values[i], high[i]);
                            let lower = k.mul(values[i], low[i]);
                            let term = k.max(upper, lower);
                            *sum = k.add(*sum, term);
                        }
                    }
                }
                let mut total = sums[0];
                for &sum in &sums[1..] {
                    total = k.add(total, sum);
                }
                k.st_global(score_address, total);
            },
            |k| {
                let minus_infinity = k.mov::<F32>(f32::NEG_INFINITY);
                k.st_global(score_address, minus_infinity);
            },
        );
    });

    let launch = LaunchRule {
        grid: [
            Extent::ceil_div("max_pages", threads),
            Extent::fixed(kv_heads).times("batch", 1),
            Extent::fixed(1),
        ],
        block: [threads, 1, 1],
        shared_bytes: 0,
    };
    Ok(k.finish(launch))
}
