//! Quest top-K page selection, one block per (sequence `b`, KV head `h`), bit-identical to
//! `kiln_ir::quest::select_pages`.
//!
//! With `P = ceil(len / page_size)` pages (clamped to `max_pages`) and `B = budget_pages`:
//! `P ≤ B` selects every page; otherwise the top `K = B − 1` of the candidate pages
//! `0..P−1` by score (descending, ties to the lower page index, NaN below everything), plus
//! the last page `P − 1`. Pages are written ascending.
//!
//! **Order key.** Each f32 score maps to a u32 key whose unsigned order is the order of
//! `f32::total_cmp` (flip all bits of a negative number, set the sign bit of a positive
//! one, so `-0 < +0`), with every NaN mapped to 0, below every number (`-inf` maps to
//! `0x007fffff`). The selection is then "the K largest keys, ties to the lower index".
//!
//! **Radix select.** Four passes over the candidates, one 8-bit digit each, most significant
//! first: a 256-bin shared histogram (`atom.shared.add`) of the digit over the candidates
//! whose higher digits equal the prefix found so far; warp 0 then scans the bins from the
//! top (8 bins per lane, a shuffle prefix sum over lanes) for the digit where the count
//! still wanted falls, and narrows the prefix. After the fourth pass the prefix is the
//! threshold key `T` and `r ≥ 1` is how many candidates with key `T` are still wanted:
//! every key `> T` is selected, and the `r` lowest-index candidates with key `T`.
//!
//! **Ordered compaction.** The candidates are walked in tiles of `THREADS` consecutive
//! pages. One block-wide exclusive scan per tile (shuffles within a warp, then one warp over
//! the warp totals) counts, packed in one u32, the candidates before each page with key
//! `> T` (high half) and with key `== T` (low half); a page is selected when its key is
//! `> T`, or `== T` with fewer than `r` equal keys before it, and its output slot is
//! `#(> T before) + min(#(== T before), r)`. The last page goes to slot `K`.
//!
//! Parameters, in order:
//! - `scores [batch, kv_heads, max_pages]` f32 (read; entries at or past `P` are not read);
//! - `seq_lens [batch]` i32 (read);
//! - `selected_pages [batch, kv_heads, max_selected]` i32 (written): the selection, then
//!   `-1` up to `max_selected`; entries that would land at or past `max_selected` are
//!   dropped, so pass `max_selected >= min(budget_pages, max_pages)`;
//! - `selected_counts [batch, kv_heads]` i32 (written): `min(P, B)` (`1` when `B = 0` and
//!   `P ≥ 1`);
//! - scalars `batch`, `kv_heads`, `max_pages`, `budget_pages`, `max_selected` (u32).
//!
//! Launch: grid `(batch · kv_heads, 1, 1)`, block `(512, 1, 1)`, no dynamic shared memory.
//!
//! This file generates PTX; it must not launch anything.

use crate::SpecError;
use kiln_codegen::kernel::{Access, Extent, GpuKernel, LaunchRule};
use kiln_codegen::ptx::{
    Cmp, KernelBuilder, Load, Reg, SharedArray, Shuffle, Space, Target, U32, U64,
};
use serde::{Deserialize, Serialize};

const FAMILY: &str = "quest_top_k";

/// Threads per block.
pub const THREADS: u32 = 512;

const WARPS: u32 = THREADS / 32;

/// Bins of one radix digit.
const BINS: u32 = 256;

/// The top-K selection kernel; only the page size is compiled in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QuestTopKSpec {
    /// Tokens per page, a power of two in `1..=256`.
    pub page_size: usize,
}

impl QuestTopKSpec {
    /// The spec for a paged layout.
    pub fn for_layout(layout: &crate::attention::PagedKv) -> QuestTopKSpec {
        QuestTopKSpec {
            page_size: layout.page_size,
        }
    }

    /// The kernel entry name.
    pub fn entry(&self) -> String {
        format!("quest_top_k_p{}", self.page_size)
    }
}

/// Generates the top-K kernel for `spec`.
pub fn generate(spec: &QuestTopKSpec) -> Result<GpuKernel, SpecError> {
    let page_size = spec.page_size;
    if page_size == 0 || !page_size.is_power_of_two() || page_size > 256 {
        return Err(SpecError::new(
            FAMILY,
            format!("page_size must be a power of two in 1..=256, got {page_size}"),
        ));
    }
    let page_size = page_size as u32;

    let mut k = KernelBuilder::new(&spec.entry(), Target::Sm80);
    let scores = k.param_pointer("scores", Access::Read);
    let seq_lens = k.param_pointer("seq_lens", Access::Read);
    let selected_pages = k.param_pointer("selected_pages", Access::Write);
    let selected_counts = k.param_pointer("selected_counts", Access::Write);
    let _batch = k.param_u32("batch");
    let kv_heads = k.param_u32("kv_heads");
    let max_pages = k.param_u32("max_pages");
    let budget = k.param_u32("budget_pages");
    let max_selected = k.param_u32("max_selected");
    let histogram = k.shared_array("histogram", BINS * 4, 16);
    let warp_sums = k.shared_array("warp_sums", (32 + 1) * 4, 16);
    let found = k.shared_array("found_digit", 2 * 4, 8);

    k.comment("this block's (sequence, KV head) row, its page count and output rows");
    let row = k.ctaid_x();
    let sequence = k.div(row, kv_heads);
    let tid = k.tid_x();
    let lane = k.and(tid, 31u32);
    let warp = k.shr(tid, 5u32);
    let length_offset = k.mul_wide(sequence, 4u32);
    let length_address = k.add(seq_lens, length_offset);
    let length = k.ld::<U32>(Load::GLOBAL.non_coherent(), length_address);
    let rounded = k.add(length, page_size - 1);
    let pages = k.shr(rounded, page_size.trailing_zeros());
    let pages = k.min(pages, max_pages);
    let score_row = k.mul(row, max_pages);
    let score_row = k.mul_wide(score_row, 4u32);
    let score_row = k.add(scores, score_row);
    let output_row = k.mul(row, max_selected);
    let output_row = k.mul_wide(output_row, 4u32);
    let output_row = k.add(selected_pages, output_row);
    let count = k.mov::<U32>(0u32);

    let dense = k.setp(Cmp::Le, pages, budget);
    k.if_else(
        dense,
        |k| {
            k.comment("dense fallback: every page");
            let end = k.min(pages, max_selected);
            k.for_range(tid, end, THREADS, |k, slot| {
                store_slot(k, output_row, slot, slot);
            });
            k.assign(count, pages);
        },
        |k| {
            let kept = k.max(budget, 1u32);
            let kept = k.sub(kept, 1u32);
            let candidates = k.sub(pages, 1u32);
            let shared = Shared {
                histogram: &histogram,
                warp_sums: &warp_sums,
                found: &found,
            };
            let ids = Ids { tid, lane, warp };
            k.comment("radix select of the threshold key among pages 0..P-1");
            let threshold = k.mov::<U32>(u32::MAX);
            let wanted_equal = k.mov::<U32>(0u32);
            let any = k.setp(Cmp::Gt, kept, 0u32);
            k.if_then(any, |k| {
                let (key, remaining) = radix_select(k, &shared, ids, score_row, candidates, kept);
                k.assign(threshold, key);
                k.assign(wanted_equal, remaining);
            });
            k.comment("ordered compaction of the selected candidates");
            compact(
                k,
                &shared,
                ids,
                Compaction {
                    score_row,
                    output_row,
                    candidates,
                    threshold,
                    wanted_equal,
                    max_selected,
                },
            );
            k.comment("the last (current) page always, after the K chosen");
            let first_thread = k.setp(Cmp::Eq, tid, 0u32);
            k.if_then(first_thread, |k| {
                let fits = k.setp(Cmp::Lt, kept, max_selected);
                k.if_then(fits, |k| store_slot(k, output_row, kept, candidates));
            });
            let selected = k.add(kept, 1u32);
            k.assign(count, selected);
        },
    );

    k.comment("pad the row with -1 and record the count");
    let start = k.add(count, tid);
    k.for_range(start, max_selected, THREADS, |k, slot| {
        let address = k.mad_wide(slot, 4u32, output_row);
        let pad = k.mov::<U32>(u32::MAX);
        k.st_global(address, pad);
    });
    let first_thread = k.setp(Cmp::Eq, tid, 0u32);
    k.if_then(first_thread, |k| {
        let address = k.mad_wide(row, 4u32, selected_counts);
        k.st_global(address, count);
    });

    let launch = LaunchRule::linear(Extent::ceil_div("kv_heads", 1).times("batch", 1), THREADS);
    Ok(k.finish(launch))
}

/// The shared arrays of the kernel.
struct Shared<'a> {
    /// `BINS` u32 counts.
    histogram: &'a SharedArray,
    /// One u32 per warp, then the block total.
    warp_sums: &'a SharedArray,
    /// The digit found by a radix pass and the count still wanted.
    found: &'a SharedArray,
}

/// The thread's index, lane and warp.
#[derive(Clone, Copy)]
struct Ids {
    tid: Reg<U32>,
    lane: Reg<U32>,
    warp: Reg<U32>,
}

/// `selected_pages[row, slot] = page`.
fn store_slot(k: &mut KernelBuilder, output_row: Reg<U64>, slot: Reg<U32>, page: Reg<U32>) {
    let address = k.mad_wide(slot, 4u32, output_row);
    k.st_global(address, page);
}

/// The order key of candidate `page`'s score: unsigned order = `f32::total_cmp` order, NaN 0.
fn order_key(k: &mut KernelBuilder, score_row: Reg<U64>, page: Reg<U32>) -> Reg<U32> {
    let address = k.mad_wide(page, 4u32, score_row);
    let bits = k.ld::<U32>(Load::GLOBAL.non_coherent(), address);
    let negative = k.setp(Cmp::Ge, bits, 0x8000_0000u32);
    let flip = k.select(negative, u32::MAX, 0x8000_0000u32);
    let key = k.xor(bits, flip);
    let magnitude = k.and(bits, 0x7fff_ffffu32);
    let nan = k.setp(Cmp::Gt, magnitude, 0x7f80_0000u32);
    k.select(nan, 0u32, key)
}

/// Four 8-bit radix passes over candidates `0..candidates` for the `kept`-th largest key.
/// Returns the threshold key and how many candidates holding it are still wanted (≥ 1).
/// Needs `1 <= kept <= candidates`; every thread of the block must call it.
fn radix_select(
    k: &mut KernelBuilder,
    shared: &Shared<'_>,
    ids: Ids,
    score_row: Reg<U64>,
    candidates: Reg<U32>,
    kept: Reg<U32>,
) -> (Reg<U32>, Reg<U32>) {
    let histogram = k.shared_address(shared.histogram);
    let prefix = k.mov::<U32>(0u32);
    let remaining = k.mov::<U32>(kept);
    for shift in [24u32, 16, 8, 0] {
        k.comment(&format!("radix pass: key bits {}..{}", shift, shift + 8));
        let in_bins = k.setp(Cmp::Lt, ids.tid, BINS);
        k.if_then(in_bins, |k| {
            let bin = k.mul_add(ids.tid, 4u32, histogram);
            let zero = k.mov::<U32>(0u32);
            k.st_shared(bin, zero);
        });
        k.bar_sync(0);
        k.for_range(ids.tid, candidates, THREADS, |k, page| {
            let key = order_key(k, score_row, page);
            let digit = k.shr(key, shift);
            let digit = k.and(digit, BINS - 1);
            let bin = k.mul_add(digit, 4u32, histogram);
            if shift == 24 {
                k.red_add::<U32>(Space::Shared, bin, 1u32);
            } else {
                let high = k.shr(key, shift + 8);
                let matches = k.setp(Cmp::Eq, high, prefix);
                k.if_then(matches, |k| k.red_add::<U32>(Space::Shared, bin, 1u32));
            }
        });
        k.bar_sync(0);
        let first_warp = k.setp(Cmp::Eq, ids.warp, 0u32);
        k.if_then(first_warp, |k| {
            find_digit(k, shared, ids.lane, histogram, remaining);
        });
        k.bar_sync(0);
        let digit = k.ld_shared::<U32>(shared.found.at(0));
        let still = k.ld_shared::<U32>(shared.found.at(4));
        let shifted = k.shl(prefix, 8u32);
        let narrowed = k.or(shifted, digit);
        k.assign(prefix, narrowed);
        k.assign(remaining, still);
    }
    (prefix, remaining)
}

/// Warp 0: the digit whose bin holds the `remaining`-th largest key (bins scanned from 255
/// down, 8 per lane), and the count still wanted inside it, stored to `found`.
fn find_digit(
    k: &mut KernelBuilder,
    shared: &Shared<'_>,
    lane: Reg<U32>,
    histogram: Reg<U32>,
    remaining: Reg<U32>,
) {
    // Lane l holds bins 255 - 8l down to 248 - 8l, i.e. bytes (31 - l)*32 .. +32.
    let flipped = k.sub(31u32, lane);
    let base = k.mul_add(flipped, 32u32, histogram);
    let low = k.ld_vector::<U32, 4>(Load::SHARED, base);
    let high = k.ld_vector::<U32, 4>(Load::SHARED, base.at(16));
    // Descending bin order: high[3], high[2], high[1], high[0], low[3], ..., low[0].
    let counts = [
        high[3], high[2], high[1], high[0], low[3], low[2], low[1], low[0],
    ];
    let mut lane_total = counts[0];
    for &c in &counts[1..] {
        lane_total = k.add(lane_total, c);
    }
    let inclusive = warp_inclusive_scan(k, lane, lane_total);
    let before = k.sub(inclusive, lane_total);
    let digit = k.mov::<U32>(0u32);
    let still = k.mov::<U32>(0u32);
    let mut seen = before;
    for (i, &c) in counts.iter().enumerate() {
        let after = k.add(seen, c);
        let not_yet = k.setp(Cmp::Lt, seen, remaining);
        let reached = k.setp(Cmp::Ge, after, remaining);
        let here = k.and(not_yet, reached);
        // bin = 255 - 8*lane - i
        let lane_bins = k.mul(lane, 8u32);
        let bin = k.sub(BINS - 1 - i as u32, lane_bins);
        let left = k.sub(remaining, seen);
        let chosen = k.select(here, bin, digit);
        k.assign(digit, chosen);
        let kept = k.select(here, left, still);
        k.assign(still, kept);
        seen = after;
    }
    let owner_before = k.setp(Cmp::Lt, before, remaining);
    let owner_after = k.setp(Cmp::Ge, inclusive, remaining);
    let owner = k.and(owner_before, owner_after);
    k.guard(owner, |k| {
        k.st_shared(shared.found.at(0), digit);
        k.st_shared(shared.found.at(4), still);
    });
}

/// Inclusive prefix sum of `value` over the lanes of a warp (shuffles up by 1, 2, 4, 8, 16).
fn warp_inclusive_scan(k: &mut KernelBuilder, lane: Reg<U32>, value: Reg<U32>) -> Reg<U32> {
    let mut sum = value;
    for offset in [1u32, 2, 4, 8, 16] {
        let other = k.shfl(Shuffle::Up, sum, offset);
        let has_source = k.setp(Cmp::Ge, lane, offset);
        let other = k.select(has_source, other, 0u32);
        sum = k.add(sum, other);
    }
    sum
}

/// Exclusive prefix sum of `value` over the block's threads in `tid` order, and the block
/// total, in every thread. Every thread must call it; it ends with a barrier, so the shared
/// array may be reused right after.
fn block_exclusive_scan(
    k: &mut KernelBuilder,
    shared: &Shared<'_>,
    ids: Ids,
    value: Reg<U32>,
) -> (Reg<U32>, Reg<U32>) {
    let sums = k.shared_address(shared.warp_sums);
    let inclusive = warp_inclusive_scan(k, ids.lane, value);
    let last_lane = k.setp(Cmp::Eq, ids.lane, 31u32);
    let own_slot = k.mul_add(ids.warp, 4u32, sums);
    k.guard(last_lane, |k| k.st_shared(own_slot, inclusive));
    k.bar_sync(0);
    let first_warp = k.setp(Cmp::Eq, ids.warp, 0u32);
    k.if_then(first_warp, |k| {
        let has_warp = k.setp(Cmp::Lt, ids.lane, WARPS);
        let lane_slot = k.mul_add(ids.lane, 4u32, sums);
        let total = k.mov::<U32>(0u32);
        k.guard(has_warp, |k| {
            let loaded = k.ld_shared::<U32>(lane_slot);
            k.assign(total, loaded);
        });
        let running = warp_inclusive_scan(k, ids.lane, total);
        let exclusive = k.sub(running, total);
        k.guard(has_warp, |k| k.st_shared(lane_slot, exclusive));
        k.guard(last_lane, |k| {
            k.st_shared(shared.warp_sums.at(32 * 4), running)
        });
    });
    k.bar_sync(0);
    let warp_base = k.ld_shared::<U32>(own_slot);
    let total = k.ld_shared::<U32>(shared.warp_sums.at(32 * 4));
    let exclusive = k.sub(inclusive, value);
    let exclusive = k.add(exclusive, warp_base);
    k.bar_sync(0);
    (exclusive, total)
}

/// Inputs of the ordered compaction.
struct Compaction {
    score_row: Reg<U64>,
    output_row: Reg<U64>,
    candidates: Reg<U32>,
    threshold: Reg<U32>,
    wanted_equal: Reg<U32>,
    max_selected: Reg<U32>,
}

/// Writes, in ascending page order, every candidate with key `> threshold` and the first
/// `wanted_equal` candidates with key `== threshold`.
fn compact(k: &mut KernelBuilder, shared: &Shared<'_>, ids: Ids, c: Compaction) {
    let above_base = k.mov::<U32>(0u32);
    let equal_base = k.mov::<U32>(0u32);
    k.for_range(0u32, c.candidates, THREADS, |k, tile| {
        let page = k.add(tile, ids.tid);
        let valid = k.setp(Cmp::Lt, page, c.candidates);
        let last = k.sub(c.candidates, 1u32);
        let clamped = k.min(page, last);
        let key = order_key(k, c.score_row, clamped);
        let above = k.setp(Cmp::Gt, key, c.threshold);
        let above = k.and(above, valid);
        let equal = k.setp(Cmp::Eq, key, c.threshold);
        let equal = k.and(equal, valid);
        let above_bit = k.select(above, 0x1_0000u32, 0u32);
        let equal_bit = k.select(equal, 1u32, 0u32);
        let packed = k.or(above_bit, equal_bit);
        let (before, tile_total) = block_exclusive_scan(k, shared, ids, packed);
        let above_before = k.shr(before, 16u32);
        let above_before = k.add(above_before, above_base);
        let equal_before = k.and(before, 0xffffu32);
        let equal_before = k.add(equal_before, equal_base);
        let equal_taken = k.setp(Cmp::Lt, equal_before, c.wanted_equal);
        let equal_taken = k.and(equal_taken, equal);
        let taken = k.or(above, equal_taken);
        let equal_slots = k.min(equal_before, c.wanted_equal);
        let slot = k.add(above_before, equal_slots);
        let fits = k.setp(Cmp::Lt, slot, c.max_selected);
        let write = k.and(taken, fits);
        k.if_then(write, |k| store_slot(k, c.output_row, slot, page));
        let tile_above = k.shr(tile_total, 16u32);
        let next_above = k.add(above_base, tile_above);
        k.assign(above_base, next_above);
        let tile_equal = k.and(tile_total, 0xffffu32);
        let next_equal = k.add(equal_base, tile_equal);
        k.assign(equal_base, next_equal);
    });
}
