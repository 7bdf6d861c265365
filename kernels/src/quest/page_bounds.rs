//! Quest page bounds: recomputes the page metadata (`page_max` / `page_min`) of the pages that
//! the last `new_tokens` tokens of each sequence touched, from a K cache that is already
//! written (by a plan's `kv_append` launch on the contiguous cache, or by any other writer).
//!
//! For every sequence `b` (length `L = seq_lens[b]`), KV head `h` and logical page `j`
//! overlapping rows `[L − min(new_tokens, L), L)`, with `p = page_table[b, j]`:
//! `page_max[p, h, :]` / `page_min[p, h, :]` become the element-wise max / min of the keys
//! `k_pages` row (`p`, `h`, slot `t mod page_size`) over the page's *valid* tokens
//! `j·page_size ≤ t < min(L, (j+1)·page_size)` — what `kiln_ir::quest::PageMeta::from_keys`
//! computes. Max and min of values of the cache dtype are values of that dtype, so widening to
//! f32, comparing and narrowing back is exact. Metadata of every other page is not touched; an
//! empty sequence touches nothing. With `new_tokens ≥ capacity` this is a full rebuild.
//!
//! Owns [`PageBoundsSpec`] and its generator. It reads `k_pages` in either page order
//! ([`PagedKv::order`], addresses from [`PagedKv::emit_kv_offset`]); `page_max` / `page_min`
//! are `[num_pages, kv_heads, head_dim]` in both. It must not launch anything, and it does not
//! write keys (`kv_append` does).
//!
//! **Work split.** One warp per (page, KV head, sequence). Lane `i` owns the 16-byte chunk
//! `i mod (head_dim/8)` of the head's row and the token slots `i / (head_dim/8)`,
//! `+ 32/(head_dim/8)`, … below the page's valid count; it folds them into eight f32 maxima
//! and minima, the lanes of a chunk combine by butterfly shuffles, and the lanes of token
//! group 0 store. One writer per metadata chunk, no atomics.
//!
//! Parameters, in order:
//! - `k_pages` (read): `[num_pages, kv_heads, page_size, head_dim]` T head-major or
//!   `[num_pages, page_size, kv_heads, head_dim]` T token-major;
//! - `page_table [batch, max_pages]` i32 (read); `seq_lens [batch]` i32 (read, `≥ 0`);
//! - `page_max`, `page_min` `[num_pages, kv_heads, head_dim]` T (written);
//! - scalars `batch`, `max_pages`, `new_tokens` (u32).
//!
//! Launch: grid `(ceil(new_tokens / page_size), kv_heads, batch)`, block `(32, 1, 1)`, no
//! dynamic shared memory. Block `x` of sequence `b` serves the logical pages
//! `first + x`, `first + x + gridDim.x`, … below `min(ceil(L / page_size), max_pages)`, where
//! `first = (L − min(new_tokens, L)) / page_size` is the sequence's first touched page. The
//! touched pages number at most `ceil(new_tokens / page_size) + 1` (the range may start
//! mid-page), so a block serves at most two pages; pages past the sequence's last page or at
//! or past `max_pages` are skipped. (The `LaunchRule` extents are products of ceilings, which
//! cannot say `ceil(new_tokens / page_size) + 1`, hence the stride.) `new_tokens = 0` or
//! `batch = 0` is an empty grid: nothing to do, the caller skips the launch.
//!
//! This file generates PTX; it must not launch anything.

use crate::attention::PagedKv;
use crate::vector::{load_chunk, store_chunk, HALVES_PER_CHUNK};
use crate::SpecError;
use kiln_codegen::kernel::{Access, Extent, GpuKernel, LaunchRule};
use kiln_codegen::ptx::{Axis, KernelBuilder, Load, Reg, Special, Store, Target, F32, U32};
use serde::{Deserialize, Serialize};

const FAMILY: &str = "quest_page_bounds";

/// Threads per block: one warp.
pub const THREADS: u32 = 32;

/// The page-bounds kernel for one paged layout (`q_heads` only enters the entry name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PageBoundsSpec {
    pub layout: PagedKv,
}

impl PageBoundsSpec {
    /// The kernel entry name: `quest_page_bounds_f16_q32_kv8_d128_p16[_tm]`.
    pub fn entry(&self) -> String {
        format!("quest_page_bounds_{}", self.layout.tag())
    }
}

/// Generates the page-bounds kernel for `spec`.
pub fn generate(spec: &PageBoundsSpec) -> Result<GpuKernel, SpecError> {
    let layout = spec.layout;
    layout.validate(FAMILY)?;
    let dtype = layout.dtype;
    let head_dim = layout.head_dim as u32;
    let kv_heads = layout.kv_heads as u32;
    let page_size = layout.page_size as u32;
    let page_shift = page_size.trailing_zeros();
    let chunks_per_head = head_dim / HALVES_PER_CHUNK as u32;
    let tokens_per_pass = THREADS / chunks_per_head;
    let row_bytes = layout.row_bytes() as u32;
    let input = Load::GLOBAL.non_coherent();

    let mut k = KernelBuilder::new(&spec.entry(), Target::Sm80);
    let k_pages = k.param_pointer("k_pages", Access::Read);
    let page_table = k.param_pointer("page_table", Access::Read);
    let seq_lens = k.param_pointer("seq_lens", Access::Read);
    let page_max = k.param_pointer("page_max", Access::Write);
    let page_min = k.param_pointer("page_min", Access::Write);
    let _batch = k.param_u32("batch");
    let max_pages = k.param_u32("max_pages");
    let new_tokens = k.param_u32("new_tokens");

    k.comment("this block's sequence and KV head; this lane's chunk and first token slot");
    let block_x = k.ctaid_x();
    let stride = k.special(Special::Nctaid(Axis::X));
    let head = k.special(Special::Ctaid(Axis::Y));
    let sequence = k.special(Special::Ctaid(Axis::Z));
    let lane = k.tid_x();
    let chunk = k.and(lane, chunks_per_head - 1);
    let first_slot = k.shr(lane, chunks_per_head.trailing_zeros());

    k.comment("touched pages: first = (len - min(new_tokens, len)) / page_size up to the last");
    let length_offset = k.mul_wide(sequence, 4u32);
    let length_address = k.add(seq_lens, length_offset);
    let length = k.ld::<U32>(input, length_address);
    let taken = k.min(new_tokens, length);
    let untouched = k.sub(length, taken);
    let first_page = k.shr(untouched, page_shift);
    let rounded = k.add(length, page_size - 1);
    let pages = k.shr(rounded, page_shift);
    let limit = k.min(pages, max_pages);
    let start = k.add(first_page, block_x);
    let table_row = k.mul(sequence, max_pages);

    k.for_range(start, limit, stride, |k, logical| {
        k.comment("the page's physical index and valid tokens min(page_size, len - j * page_size)");
        let entry = k.add(table_row, logical);
        let entry_offset = k.mul_wide(entry, 4u32);
        let entry_address = k.add(page_table, entry_offset);
        let physical = k.ld::<U32>(input, entry_address);
        let page_start = k.shl(logical, page_shift);
        let remaining = k.sub(length, page_start);
        let valid = k.min(remaining, page_size);

        k.comment("this lane's slots: element-wise max / min in f32");
        let high: [Reg<F32>; 8] = std::array::from_fn(|_| k.mov::<F32>(f32::NEG_INFINITY));
        let low: [Reg<F32>; 8] = std::array::from_fn(|_| k.mov::<F32>(f32::INFINITY));
        k.for_range(first_slot, valid, tokens_per_pass, |k, slot| {
            let row = layout.emit_kv_offset(k, physical, head, slot);
            let offset = k.mad_wide(chunk, 16u32, row);
            let address = k.add(k_pages, offset);
            let key = load_chunk(k, input, dtype, address);
            for i in 0..8 {
                let h = k.max(high[i], key[i]);
                k.assign(high[i], h);
                let l = k.min(low[i], key[i]);
                k.assign(low[i], l);
            }
        });

        k.comment("combine the lanes of each chunk; token group 0 stores");
        let mut mask = chunks_per_head;
        while mask < THREADS {
            for i in 0..8 {
                let other = k.shfl_bfly(high[i], mask);
                let h = k.max(high[i], other);
                k.assign(high[i], h);
                let other = k.shfl_bfly(low[i], mask);
                let l = k.min(low[i], other);
                k.assign(low[i], l);
            }
            mask *= 2;
        }
        let storer = k.setp(kiln_codegen::ptx::Cmp::Lt, lane, chunks_per_head);
        k.if_then(storer, |k| {
            let meta_row = k.mul_add(physical, kv_heads, head);
            let meta_offset = k.mul_wide(meta_row, row_bytes);
            let meta_offset = k.mad_wide(chunk, 16u32, meta_offset);
            let max_address = k.add(page_max, meta_offset);
            store_chunk(k, Store::GLOBAL, dtype, max_address, &high);
            let min_address = k.add(page_min, meta_offset);
            store_chunk(k, Store::GLOBAL, dtype, min_address, &low);
        });
    });

    let launch = LaunchRule {
        grid: [
            Extent::ceil_div("new_tokens", page_size),
            Extent::fixed(kv_heads),
            Extent::ceil_div("batch", 1),
        ],
        block: [THREADS, 1, 1],
        shared_bytes: 0,
    };
    Ok(k.finish(launch))
}
