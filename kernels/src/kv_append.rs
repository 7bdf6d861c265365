//! KV append: writes new (post-RoPE) keys and values into a paged KV cache and, for the
//! pool of `runtime::kv`, maintains the Quest page metadata (element-wise max / min of each
//! page's keys) in the same kernel. It is the one kernel that writes every KV cache: the
//! pool's pages and, through [`KvAppendSpec::plan`], a compiled plan's contiguous cache
//! `[batch, capacity, kv_heads, head_dim]`, which is a token-major page pool under the
//! identity page table (`attention::program`; the plan's attention kernels read the same
//! view).
//!
//! Layout: `attention::paged` ([`PagedKv`]). One block row per new token: block
//! `(t, y, ·)` thread `i` owns the 16-byte chunk `c = y·threads + i` of token `t`, that is KV
//! head `c / (head_dim/8)` and dims `8·(c mod head_dim/8) ..+8`. It copies that chunk of the
//! new rows into slot `position mod page_size` of physical page
//! `page_table[seq, position / page_size]`.
//!
//! The spec chooses three things ([`KvAppendSpec`]):
//! - **Addressing** ([`TokenAddressing`]): where each new token goes.
//!   - `TokenArrays` (the pool): `tokens` new rows `[tokens, kv_heads, head_dim]`; token
//!     `t` belongs to batch row `token_seqs[t]` at position `token_positions[t]`. Grid
//!     `(tokens, ·, 1)`.
//!   - `StartPerSequence` (the plans' `KvAppend`): new rows `[batch, new_tokens, kv_heads,
//!     head_dim]`; token `t` of sequence `b` goes to position `start[b] + t`. Grid
//!     `(new_tokens, ·, batch)`. A sequence with `start[b] < 0` writes nothing (the
//!     reference, `kiln_ir::interp`, rejects such an append; the kernel drops the rows
//!     instead of writing out of bounds).
//! - **Caches** ([`AppendedCaches`]): keys and values (`new_k → k_pages`, `new_v →
//!   v_pages`, the pool) or one cache (`new → pages`: a plan's K or V cache, which the
//!   graph appends to in separate nodes).
//! - **Metadata**: whether the kernel updates `page_max` / `page_min` (the pool). Only the
//!   token-array, keys-and-values kernel has it; a plan keeps its Quest bounds in the
//!   attention program's own `quest_page_bounds` launch, recomputed from the written cache.
//!
//! In every variant a token whose page index is `>= max_pages` (for a plan's cache:
//! position `>= capacity`) writes nothing.
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
//! **Contract** of the metadata kernel (what `runtime::kv::PagedKvCache::append` produces):
//! the new tokens of one sequence are contiguous in the token arrays with consecutive,
//! ascending positions; the page table already maps every new position; the earlier slots
//! of a page that receives new tokens from slot `s > 0` on were written (with their
//! metadata) by earlier appends. Prefill (many tokens per sequence, spanning pages) and
//! decode (one token per sequence) are the same call.
//!
//! Parameters, in order (those of the variant):
//! - `new_k`, `new_v` (keys and values) or `new` (one cache): `[tokens, kv_heads,
//!   head_dim]` (token arrays) or `[batch, new_tokens, kv_heads, head_dim]` (start per
//!   sequence) T (read);
//! - token arrays: `token_seqs [tokens]` i32, the batch row (into `page_table`) of each
//!   token, and `token_positions [tokens]` i32, its position in its sequence (read);
//!   start per sequence: `start [batch]` i32 (read);
//! - `page_table [batch, max_pages]` i32 (read);
//! - `k_pages`, `v_pages` (keys and values) or `pages` (one cache) `[num_pages, kv_heads,
//!   page_size, head_dim]` T (written), or `[num_pages, page_size, kv_heads, head_dim]` for
//!   token-major pages (`PagedKv::order`);
//! - metadata: `page_max`, `page_min` `[num_pages, kv_heads, head_dim]` T (read and written);
//! - scalars: token arrays `tokens` (u32); start per sequence `batch`, `new_tokens` (u32);
//!   then `max_pages` (u32, the row width of `page_table`).
//!
//! Entry names: `kv_append_{layout tag}` for the pool's kernel (token arrays, keys and
//! values, metadata); otherwise `kv_append` then `_start` (start per sequence), `_single`
//! (one cache), `_nometa` (token arrays and keys and values without metadata), then the tag
//! (`kv_append_start_single_bf16_q2_kv2_d32_p16_tm`; the tag ends in `_tm` for token-major
//! pages).
//!
//! Launch: grid `(tokens or new_tokens, ceil(kv_heads·head_dim/8 / threads), 1 or batch)`,
//! block `(threads, 1, 1)` with `threads = min(128, kv_heads·head_dim/8 rounded up to 32)`;
//! no dynamic shared memory. An empty grid (no tokens, no sequences) is the caller's to
//! skip (the runtime refuses empty grids). All buffers 16-byte aligned (device allocations
//! are).
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

/// Where each new token goes (see the module documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenAddressing {
    /// `token_seqs[t]`, `token_positions[t]` per new token (the pool of `runtime::kv`).
    #[default]
    TokenArrays,
    /// Token `t` of sequence `b` at position `start[b] + t` (a compiled plan's `KvAppend`).
    StartPerSequence,
}

/// Which caches one launch appends to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppendedCaches {
    /// `new_k → k_pages` and `new_v → v_pages` (the pool).
    #[default]
    KeysAndValues,
    /// `new → pages`: one cache, K or V (a plan's `KvAppend` node).
    Single,
}

fn metadata_by_default() -> bool {
    true
}

/// A KV-append kernel for one paged layout, addressing, set of caches and metadata choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KvAppendSpec {
    pub layout: PagedKv,
    #[serde(default)]
    pub addressing: TokenAddressing,
    #[serde(default)]
    pub caches: AppendedCaches,
    /// Whether the kernel updates the Quest page metadata (`page_max` / `page_min`); only
    /// with token arrays and keys and values.
    #[serde(default = "metadata_by_default")]
    pub metadata: bool,
}

impl KvAppendSpec {
    /// The pool's kernel (`runtime::kv`): token arrays, keys and values, Quest metadata.
    pub fn pool(layout: PagedKv) -> KvAppendSpec {
        KvAppendSpec {
            layout,
            addressing: TokenAddressing::TokenArrays,
            caches: AppendedCaches::KeysAndValues,
            metadata: true,
        }
    }

    /// A compiled plan's `KvAppend` node: start per sequence, one cache, no metadata.
    pub fn plan(layout: PagedKv) -> KvAppendSpec {
        KvAppendSpec {
            layout,
            addressing: TokenAddressing::StartPerSequence,
            caches: AppendedCaches::Single,
            metadata: false,
        }
    }

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

    /// The kernel entry name (see the module documentation).
    pub fn entry(&self) -> String {
        let start = match self.addressing {
            TokenAddressing::TokenArrays => "",
            TokenAddressing::StartPerSequence => "_start",
        };
        let single = match self.caches {
            AppendedCaches::KeysAndValues => "",
            AppendedCaches::Single => "_single",
        };
        let metadata_possible = self.addressing == TokenAddressing::TokenArrays
            && self.caches == AppendedCaches::KeysAndValues;
        let no_metadata = if metadata_possible && !self.metadata {
            "_nometa"
        } else {
            ""
        };
        format!(
            "kv_append{start}{single}{no_metadata}_{}",
            self.layout.tag()
        )
    }

    /// Checks the spec; errors name the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.layout.validate(FAMILY)?;
        if self.metadata && self.addressing != TokenAddressing::TokenArrays {
            return Err(SpecError::new(
                FAMILY,
                "metadata needs token arrays addressing (a plan keeps its Quest bounds in \
                 the attention program's page-bounds launch)",
            ));
        }
        if self.metadata && self.caches != AppendedCaches::KeysAndValues {
            return Err(SpecError::new(
                FAMILY,
                "metadata needs caches = keys and values (the page bounds are of the keys)",
            ));
        }
        Ok(())
    }
}

/// The pointers and sizes every variant's copy needs.
struct Caches {
    layout: PagedKv,
    page_table: Reg<U64>,
    max_pages: Reg<U32>,
    /// `(new rows, pages)`: the keys' first, then the values' (keys and values).
    pairs: Vec<(Reg<U64>, Reg<U64>)>,
    chunks_per_token: u32,
}

/// Generates the KV-append kernel for `spec`.
pub fn generate(spec: &KvAppendSpec) -> Result<GpuKernel, SpecError> {
    spec.validate()?;
    let layout = spec.layout;
    let dtype = layout.dtype;
    let head_dim = layout.head_dim as u32;
    let page_size = layout.page_size as u32;
    let page_shift = page_size.trailing_zeros();
    let chunks_per_head = head_dim / HALVES_PER_CHUNK as u32;
    let chunks_per_token = spec.chunks_per_token();
    let threads = spec.threads();
    let row_bytes = head_dim * 2;
    let token_arrays = spec.addressing == TokenAddressing::TokenArrays;

    let mut k = KernelBuilder::new(&spec.entry(), Target::Sm80);
    let new_rows: Vec<Reg<U64>> = match spec.caches {
        AppendedCaches::KeysAndValues => vec![
            k.param_pointer("new_k", Access::Read),
            k.param_pointer("new_v", Access::Read),
        ],
        AppendedCaches::Single => vec![k.param_pointer("new", Access::Read)],
    };
    let lookup = if token_arrays {
        Lookup::TokenArrays(
            k.param_pointer("token_seqs", Access::Read),
            k.param_pointer("token_positions", Access::Read),
        )
    } else {
        Lookup::Start(k.param_pointer("start", Access::Read))
    };
    let page_table = k.param_pointer("page_table", Access::Read);
    let pages: Vec<Reg<U64>> = match spec.caches {
        AppendedCaches::KeysAndValues => vec![
            k.param_pointer("k_pages", Access::Write),
            k.param_pointer("v_pages", Access::Write),
        ],
        AppendedCaches::Single => vec![k.param_pointer("pages", Access::Write)],
    };
    let metadata = spec.metadata.then(|| {
        (
            k.param_pointer("page_max", Access::ReadWrite),
            k.param_pointer("page_min", Access::ReadWrite),
        )
    });
    let addressing = match lookup {
        Lookup::TokenArrays(token_seqs, token_positions) => Addressing::TokenArrays {
            token_seqs,
            token_positions,
            tokens: k.param_u32("tokens"),
        },
        Lookup::Start(start) => {
            // `batch` sizes the grid (its z extent); the kernel reads it from `%ctaid.z`.
            let _batch = k.param_u32("batch");
            Addressing::Start {
                start,
                new_tokens: k.param_u32("new_tokens"),
            }
        }
    };
    let max_pages = k.param_u32("max_pages");
    let caches = Caches {
        layout,
        page_table,
        max_pages,
        pairs: new_rows
            .iter()
            .copied()
            .zip(pages.iter().copied())
            .collect(),
        chunks_per_token,
    };

    k.comment("this thread's token and 16-byte chunk of it (KV head, eight dims)");
    let token = k.ctaid_x();
    let block_y = k.special(Special::Ctaid(Axis::Y));
    let tid = k.tid_x();
    let chunk = k.mul_add(block_y, threads, tid);
    let active = k.setp(Cmp::Lt, chunk, chunks_per_token);
    k.if_then(active, |k| {
        let head = k.shr(chunk, chunks_per_head.trailing_zeros());
        let part = k.and(chunk, chunks_per_head - 1);
        match addressing {
            Addressing::TokenArrays {
                token_seqs,
                token_positions,
                tokens,
            } => {
                k.comment("the token's sequence row, page and slot");
                let (seq, position) = token_entry(k, token_seqs, token_positions, token);
                let placed = Placed {
                    seq,
                    position,
                    source_row: token,
                    head,
                    part,
                    chunk,
                };
                let Some((page_max, page_min)) = metadata else {
                    copy_chunk(k, &caches, &placed, false, |_, _| {});
                    return;
                };
                copy_chunk(k, &caches, &placed, true, |k, written| {
                    let Written {
                        key_words,
                        page_head,
                        logical,
                        slot,
                    } = written;
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
                                new_k: new_rows[0],
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
            }
            Addressing::Start { start, new_tokens } => {
                k.comment("the token's sequence (grid z), position start + token, source row");
                let seq = k.special(Special::Ctaid(Axis::Z));
                let start_offset = k.mul_wide(seq, 4u32);
                let start_address = k.add(start, start_offset);
                let first = k.ld::<U32>(Load::GLOBAL.non_coherent(), start_address);
                // As u32, a negative start is at least 2^31; a start below that plus a token
                // index (below 2^31, a grid extent) does not wrap.
                let non_negative = k.setp(Cmp::Lt, first, 0x8000_0000u32);
                k.if_then(non_negative, |k| {
                    let position = k.add(first, token);
                    let source_row = k.mul_add(seq, new_tokens, token);
                    let placed = Placed {
                        seq,
                        position,
                        source_row,
                        head,
                        part,
                        chunk,
                    };
                    copy_chunk(k, &caches, &placed, false, |_, _| {});
                });
            }
        }
    });

    let (tokens_extent, batch_extent) = if token_arrays {
        (Extent::ceil_div("tokens", 1), Extent::fixed(1))
    } else {
        (
            Extent::ceil_div("new_tokens", 1),
            Extent::ceil_div("batch", 1),
        )
    };
    let launch = LaunchRule {
        grid: [
            tokens_extent,
            Extent::fixed(spec.blocks_per_token()),
            batch_extent,
        ],
        block: [threads, 1, 1],
        shared_bytes: 0,
    };
    Ok(k.finish(launch))
}

/// The pointer parameters of an addressing, declared before the pages.
enum Lookup {
    TokenArrays(Reg<U64>, Reg<U64>),
    Start(Reg<U64>),
}

/// How the kernel finds each token's sequence and position: its parameters.
#[derive(Clone, Copy)]
enum Addressing {
    TokenArrays {
        token_seqs: Reg<U64>,
        token_positions: Reg<U64>,
        tokens: Reg<U32>,
    },
    Start {
        start: Reg<U64>,
        new_tokens: Reg<U32>,
    },
}

/// Where this thread's chunk comes from and goes.
struct Placed {
    seq: Reg<U32>,
    position: Reg<U32>,
    /// The token's row in the new rows.
    source_row: Reg<U32>,
    head: Reg<U32>,
    part: Reg<U32>,
    chunk: Reg<U32>,
}

/// What the metadata update needs from the copy.
struct Written {
    /// The key chunk (the first cache's).
    key_words: [Reg<U32>; 4],
    /// `physical · kv_heads + head`: this chunk's row of `page_max` / `page_min`.
    page_head: Reg<U32>,
    logical: Reg<U32>,
    slot: Reg<U32>,
}

/// Copies this thread's chunk of every cache into its page slot when the token's page is
/// in the table (`page < max_pages`). With `metadata`, then emits `then` (the metadata
/// update) inside the same guard, given what it needs ([`Written`]); without, `then` is not
/// called.
fn copy_chunk(
    k: &mut KernelBuilder,
    caches: &Caches,
    placed: &Placed,
    metadata: bool,
    then: impl FnOnce(&mut KernelBuilder, Written),
) {
    let layout = caches.layout;
    let kv_heads = layout.kv_heads as u32;
    let page_size = layout.page_size as u32;
    let logical = k.shr(placed.position, page_size.trailing_zeros());
    let slot = k.and(placed.position, page_size - 1);
    let in_table = k.setp(Cmp::Lt, logical, caches.max_pages);
    k.if_then(in_table, |k| {
        let entry = k.mul_add(placed.seq, caches.max_pages, logical);
        let entry_offset = k.mul_wide(entry, 4u32);
        let entry_address = k.add(caches.page_table, entry_offset);
        let input = Load::GLOBAL.non_coherent();
        let physical = k.ld::<U32>(input, entry_address);
        // physical·page_stride + head·head_stride + slot·slot_stride + part·16, with
        // page_stride = heads_per_page·head_stride (`PagedKv`'s strides).
        let heads_per_page = (layout.page_stride_bytes() / layout.head_stride_bytes()) as u32;
        let page_head = (metadata || heads_per_page == kv_heads)
            .then(|| k.mul_add(physical, kv_heads, placed.head));

        k.comment(if caches.pairs.len() == 2 {
            "copy the key and value chunks into the page slot"
        } else {
            "copy the chunk into the page slot"
        });
        let source = chunk_address(k, placed.source_row, caches.chunks_per_token, placed.chunk);
        let words: Vec<[Reg<U32>; 4]> = caches
            .pairs
            .iter()
            .map(|&(new_rows, _)| {
                let address = k.add(new_rows, source);
                k.ld_vector::<U32, 4>(input, address)
            })
            .collect();
        let block = match page_head {
            Some(page_head) if heads_per_page == kv_heads => page_head,
            _ => k.mul_add(physical, heads_per_page, placed.head),
        };
        let block_offset = k.mul_wide(block, layout.head_stride_bytes() as u32);
        let part_bytes = k.shl(placed.part, 4u32);
        let in_block = k.mul_add(slot, layout.slot_stride_bytes() as u32, part_bytes);
        let in_block = k.cvt::<U64>(in_block);
        let slot_offset = k.add(block_offset, in_block);
        for (&(_, pages), &chunk_words) in caches.pairs.iter().zip(&words) {
            let destination = k.add(pages, slot_offset);
            k.st_vector(Store::GLOBAL, destination, chunk_words);
        }
        if let Some(page_head) = page_head.filter(|_| metadata) {
            then(
                k,
                Written {
                    key_words: words[0],
                    page_head,
                    logical,
                    slot,
                },
            );
        }
    });
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
