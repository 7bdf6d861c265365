//! KV append: writes new (post-RoPE) keys and values into the paged KV cache and maintains
//! the Quest page metadata (element-wise max / min of each page's keys) in the same kernel.
//!
//! Layout: `attention::paged` ([`PagedKv`]). One block row per new token: block
//! `(t, y)` thread `i` owns the 16-byte chunk `c = y·threads + i` of token `t`, that is KV
//! head `c / (head_dim/8)` and dims `8·(c mod head_dim/8) ..+8`. It copies that chunk of
//! `new_k` and `new_v` into slot `position mod page_size` of physical page
//! `page_table[seq, position / page_size]`.
//!
//! **Metadata.** Exactly one token per touched (page, sequence) updates the page's metadata:
//! the *page leader*, the first new token of that page (token 0, or a token whose
//! predecessor in the arrays has another sequence or another page). Its thread starts from
//! its own key chunk, combines it with the page's existing `page_max` / `page_min` when its
//! slot is not 0 (the page already holds earlier tokens: a decode append into a partial
//! page) or starts fresh when it is 0 (stale metadata of a recycled page is ignored), then
//! folds in the key chunks of the following tokens of the same sequence and page (at most
//! `page_size − slot − 1` of them) and stores the result. Max and min of values of the
//! cache dtype are values of that dtype, so widening to f32, comparing and narrowing back is
//! exact. No atomics and no races: each metadata chunk has one writer.
//!
//! **Contract** (what `runtime::kv::PagedKvCache::append` produces): the new tokens of one
//! sequence are contiguous in the token arrays with consecutive, ascending positions; the
//! page table already maps every new position; the earlier slots of a page that receives
//! new tokens from slot `s > 0` on were written (with their metadata) by earlier appends.
//! Prefill (many tokens per sequence, spanning pages) and decode (one token per sequence)
//! are the same call.
//!
//! Parameters, in order:
//! - `new_k`, `new_v` `[tokens, kv_heads, head_dim]` T (read);
//! - `token_seqs [tokens]` i32: the batch row (into `page_table`) of each token (read);
//! - `token_positions [tokens]` i32: the position of each token in its sequence (read);
//! - `page_table [batch, max_pages]` i32 (read);
//! - `k_pages`, `v_pages` `[num_pages, kv_heads, page_size, head_dim]` T (written), or
//!   `[num_pages, page_size, kv_heads, head_dim]` for token-major pages (`PagedKv::order`;
//!   the entry name then ends in `_tm`);
//! - `page_max`, `page_min` `[num_pages, kv_heads, head_dim]` T (read and written);
//! - scalars `tokens` (u32) and `max_pages` (u32, the row width of `page_table`).
//!
//! Launch: grid `(tokens, ceil(kv_heads·head_dim/8 / threads), 1)`, block
//! `(threads, 1, 1)` with `threads = min(128, kv_heads·head_dim/8 rounded up to 32)`; no
//! dynamic shared memory. A token whose page index is `>= max_pages` writes nothing.
//!
//! This file generates PTX; it must not launch anything.

use crate::attention::PagedKv;
use crate::vector::{narrow_pair, widen_pair, HALVES_PER_CHUNK};
use crate::SpecError;
use kiln_codegen::kernel::{Access, Extent, GpuKernel, LaunchRule};
use kiln_codegen::ptx::{
    Axis, Cmp, KernelBuilder, Load, Reg, Special, Store, Target, B32, F32, U32, U64,
};
use kiln_ir::dtype::DType;
use serde::{Deserialize, Serialize};

const FAMILY: &str = "kv_append";

/// Most threads per block.
const MAX_THREADS: u32 = 128;

/// A KV-append kernel for one paged layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KvAppendSpec {
    pub layout: PagedKv,
}

impl KvAppendSpec {
    /// 16-byte chunks of one token (all KV heads).
    pub fn chunks_per_token(&self) -> u32 {
        (self.layout.kv_heads * self.layout.head_dim / HALVES_PER_CHUNK) as u32
    }

    /// Threads per block.
    pub fn threads(&self) -> u32 {
        (self.chunks_per_token().div_ceil(32) * 32).min(MAX_THREADS)
    }

    /// Blocks per token (the grid's y extent).
    pub fn blocks_per_token(&self) -> u32 {
        self.chunks_per_token().div_ceil(self.threads())
    }

    /// The kernel entry name.
    pub fn entry(&self) -> String {
        format!("kv_append_{}", self.layout.tag())
    }
}

/// Generates the KV-append kernel for `spec`.
pub fn generate(spec: &KvAppendSpec) -> Result<GpuKernel, SpecError> {
    let layout = spec.layout;
    layout.validate(FAMILY)?;
    let dtype = layout.dtype;
    let head_dim = layout.head_dim as u32;
    let kv_heads = layout.kv_heads as u32;
    let page_size = layout.page_size as u32;
    let page_shift = page_size.trailing_zeros();
    let chunks_per_head = head_dim / HALVES_PER_CHUNK as u32;
    let chunks_per_token = spec.chunks_per_token();
    let threads = spec.threads();
    let row_bytes = head_dim * 2;

    let mut k = KernelBuilder::new(&spec.entry(), Target::Sm80);
    let new_k = k.param_pointer("new_k", Access::Read);
    let new_v = k.param_pointer("new_v", Access::Read);
    let token_seqs = k.param_pointer("token_seqs", Access::Read);
    let token_positions = k.param_pointer("token_positions", Access::Read);
    let page_table = k.param_pointer("page_table", Access::Read);
    let k_pages = k.param_pointer("k_pages", Access::Write);
    let v_pages = k.param_pointer("v_pages", Access::Write);
    let page_max = k.param_pointer("page_max", Access::ReadWrite);
    let page_min = k.param_pointer("page_min", Access::ReadWrite);
    let tokens = k.param_u32("tokens");
    let max_pages = k.param_u32("max_pages");
    let input = Load::GLOBAL.non_coherent();

    k.comment("this thread's token and 16-byte chunk of it (KV head, eight dims)");
    let token = k.ctaid_x();
    let block_y = k.special(Special::Ctaid(Axis::Y));
    let tid = k.tid_x();
    let chunk = k.mul_add(block_y, threads, tid);
    let active = k.setp(Cmp::Lt, chunk, chunks_per_token);
    k.if_then(active, |k| {
        let head = k.shr(chunk, chunks_per_head.trailing_zeros());
        let part = k.and(chunk, chunks_per_head - 1);

        k.comment("the token's sequence row, page and slot");
        let (seq, position) = token_entry(k, token_seqs, token_positions, token);
        let logical = k.shr(position, page_shift);
        let slot = k.and(position, page_size - 1);
        let in_table = k.setp(Cmp::Lt, logical, max_pages);
        k.if_then(in_table, |k| {
            let entry = k.mul_add(seq, max_pages, logical);
            let entry_offset = k.mul_wide(entry, 4u32);
            let entry_address = k.add(page_table, entry_offset);
            let physical = k.ld::<U32>(input, entry_address);
            let page_head = k.mul_add(physical, kv_heads, head);

            k.comment("copy the key and value chunks into the page slot");
            let source = chunk_address(k, token, chunks_per_token, chunk);
            let key_address = k.add(new_k, source);
            let key_words = k.ld_vector::<U32, 4>(input, key_address);
            let value_address = k.add(new_v, source);
            let value_words = k.ld_vector::<U32, 4>(input, value_address);
            // physical·page_stride + head·head_stride + slot·slot_stride + part·16, with
            // page_stride = heads_per_page·head_stride (`PagedKv`'s strides).
            let heads_per_page = (layout.page_stride_bytes() / layout.head_stride_bytes()) as u32;
            let block = if heads_per_page == kv_heads {
                page_head
            } else {
                k.mul_add(physical, heads_per_page, head)
            };
            let block_offset = k.mul_wide(block, layout.head_stride_bytes() as u32);
            let part_bytes = k.shl(part, 4u32);
            let in_block = k.mul_add(slot, layout.slot_stride_bytes() as u32, part_bytes);
            let in_block = k.cvt::<U64>(in_block);
            let slot_offset = k.add(block_offset, in_block);
            let k_destination = k.add(k_pages, slot_offset);
            k.st_vector(Store::GLOBAL, k_destination, key_words);
            let v_destination = k.add(v_pages, slot_offset);
            k.st_vector(Store::GLOBAL, v_destination, value_words);

            k.comment("page leader: the first new token of its (sequence, page)");
            let first = k.setp(Cmp::Eq, token, 0u32);
            let previous = k.max(token, 1u32);
            let previous = k.sub(previous, 1u32);
            let (previous_seq, previous_position) =
                token_entry(k, token_seqs, token_positions, previous);
            let previous_page = k.shr(previous_position, page_shift);
            let other_seq = k.setp(Cmp::Ne, previous_seq, seq);
            let other_page = k.setp(Cmp::Ne, previous_page, logical);
            let leader = k.or(first, other_seq);
            let leader = k.or(leader, other_page);
            k.if_then(leader, |k| {
                let meta_row = k.mul_wide(page_head, row_bytes);
                let meta_offset = k.mad_wide(part, 16u32, meta_row);
                update_metadata(
                    k,
                    dtype,
                    &Metadata {
                        new_k,
                        token_seqs,
                        token_positions,
                        page_max,
                        page_min,
                    },
                    &LeaderState {
                        token,
                        tokens,
                        seq,
                        logical,
                        slot,
                        page_size,
                        page_shift,
                        chunks_per_token,
                        chunk,
                        meta_offset,
                    },
                    &key_words,
                );
            });
        });
    });

    let launch = LaunchRule {
        grid: [
            Extent::ceil_div("tokens", 1),
            Extent::fixed(spec.blocks_per_token()),
            Extent::fixed(1),
        ],
        block: [threads, 1, 1],
        shared_bytes: 0,
    };
    Ok(k.finish(launch))
}

/// The pointers the metadata update reads and writes.
struct Metadata {
    new_k: Reg<U64>,
    token_seqs: Reg<U64>,
    token_positions: Reg<U64>,
    page_max: Reg<U64>,
    page_min: Reg<U64>,
}

/// What the page leader knows about its page.
struct LeaderState {
    token: Reg<U32>,
    tokens: Reg<U32>,
    seq: Reg<U32>,
    logical: Reg<U32>,
    slot: Reg<U32>,
    page_size: u32,
    page_shift: u32,
    chunks_per_token: u32,
    chunk: Reg<U32>,
    /// Byte offset of this chunk in `page_max` / `page_min`.
    meta_offset: Reg<U64>,
}

/// The leader's metadata update: fresh or combined with the page's existing max / min, then
/// the following new tokens of the same sequence and page folded in, then stored.
fn update_metadata(
    k: &mut KernelBuilder,
    dtype: DType,
    pointers: &Metadata,
    state: &LeaderState,
    key_words: &[Reg<U32>; 4],
) {
    let input = Load::GLOBAL.non_coherent();
    let key = widen(k, dtype, key_words);
    let high: [Reg<F32>; 8] = std::array::from_fn(|i| k.mov::<F32>(key[i]));
    let low: [Reg<F32>; 8] = std::array::from_fn(|i| k.mov::<F32>(key[i]));
    let max_address = k.add(pointers.page_max, state.meta_offset);
    let min_address = k.add(pointers.page_min, state.meta_offset);

    k.comment("a page whose slot 0 is not ours already holds tokens: combine with its metadata");
    let partial = k.setp(Cmp::Ne, state.slot, 0u32);
    k.if_then(partial, |k| {
        let old_max = k.ld_vector::<U32, 4>(Load::GLOBAL, max_address);
        let old_min = k.ld_vector::<U32, 4>(Load::GLOBAL, min_address);
        let old_max = widen(k, dtype, &old_max);
        let old_min = widen(k, dtype, &old_min);
        combine(k, &high, &low, &old_max, &old_min);
    });

    k.comment("fold in the following new tokens of the same sequence and page");
    let remaining_slots = k.sub(state.page_size, state.slot);
    let end = k.add(state.token, remaining_slots);
    let end = k.min(end, state.tokens);
    let next = k.add(state.token, 1u32);
    let head = k.new_label("same_page");
    let done = k.new_label("same_page_done");
    k.place_label(&head);
    let past_end = k.setp(Cmp::Ge, next, end);
    k.branch_if(past_end, &done);
    let (next_seq, next_position) =
        token_entry(k, pointers.token_seqs, pointers.token_positions, next);
    let next_page = k.shr(next_position, state.page_shift);
    let same_seq = k.setp(Cmp::Eq, next_seq, state.seq);
    let same_page = k.setp(Cmp::Eq, next_page, state.logical);
    let same = k.and(same_seq, same_page);
    k.branch_if(!same, &done);
    let source = chunk_address(k, next, state.chunks_per_token, state.chunk);
    let address = k.add(pointers.new_k, source);
    let next_words = k.ld_vector::<U32, 4>(input, address);
    let next_key = widen(k, dtype, &next_words);
    combine(k, &high, &low, &next_key, &next_key);
    let following = k.add(next, 1u32);
    k.assign(next, following);
    k.branch(&head);
    k.place_label(&done);

    k.comment("store the page's metadata chunk");
    let high_words = narrow(k, dtype, &high);
    k.st_vector(Store::GLOBAL, max_address, high_words);
    let low_words = narrow(k, dtype, &low);
    k.st_vector(Store::GLOBAL, min_address, low_words);
}

/// `high = max(high, other_high)`, `low = min(low, other_low)`, element-wise, in place.
fn combine(
    k: &mut KernelBuilder,
    high: &[Reg<F32>; 8],
    low: &[Reg<F32>; 8],
    other_high: &[Reg<F32>; 8],
    other_low: &[Reg<F32>; 8],
) {
    for i in 0..8 {
        let h = k.max(high[i], other_high[i]);
        k.assign(high[i], h);
        let l = k.min(low[i], other_low[i]);
        k.assign(low[i], l);
    }
}

/// `(token_seqs[token], token_positions[token])`.
fn token_entry(
    k: &mut KernelBuilder,
    token_seqs: Reg<U64>,
    token_positions: Reg<U64>,
    token: Reg<U32>,
) -> (Reg<U32>, Reg<U32>) {
    let input = Load::GLOBAL.non_coherent();
    let offset = k.mul_wide(token, 4u32);
    let seq_address = k.add(token_seqs, offset);
    let seq = k.ld::<U32>(input, seq_address);
    let position_address = k.add(token_positions, offset);
    let position = k.ld::<U32>(input, position_address);
    (seq, position)
}

/// Byte offset of chunk `chunk` of token `token` in `new_k` / `new_v`.
fn chunk_address(
    k: &mut KernelBuilder,
    token: Reg<U32>,
    chunks_per_token: u32,
    chunk: Reg<U32>,
) -> Reg<U64> {
    let row = k.mul_wide(token, chunks_per_token * 16);
    k.mad_wide(chunk, 16u32, row)
}

fn widen(k: &mut KernelBuilder, dtype: DType, words: &[Reg<U32>; 4]) -> [Reg<F32>; 8] {
    let mut out = Vec::with_capacity(8);
    for &word in words {
        out.extend(widen_pair(k, dtype, word));
    }
    out.try_into().expect("four words hold eight halves")
}

fn narrow(k: &mut KernelBuilder, dtype: DType, values: &[Reg<F32>; 8]) -> [Reg<B32>; 4] {
    let words: Vec<Reg<B32>> = values
        .chunks(2)
        .map(|pair| narrow_pair(k, dtype, pair[0], pair[1]))
        .collect();
    words.try_into().expect("eight halves make four words")
}
