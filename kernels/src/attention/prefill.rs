//! Causal prefill attention over the paged KV cache, FlashAttention-2 style on
//! `mma.sync.m16n8k16` (f16 or bf16 operands, f32 accumulators and softmax).
//!
//! **Semantics** (the rule of `Op::AttentionDecode`, per sequence). `q` and `out` are
//! `[batch, max_q, q_heads, head_dim]`; sequence `b` has `q_lens[b]` new tokens (rows
//! `0..q_lens[b]` of `q`), the *last* `q_lens[b]` of its `seq_lens[b]` cached tokens. Query
//! `i` sees keys `j < seq_lens[b] − (q_lens[b] − 1 − i)`; its output row is
//! `softmax(scale · q_i · Kᵀ) · V` over those keys. Rows `i ≥ q_lens[b]` of `out` are not
//! written. Contract (not checked in the kernel): `q_lens[b] ≤ min(max_q, seq_lens[b])`,
//! `scale > 0`, and every logical page below `ceil(seq_lens[b] / page_size)` of sequence `b`
//! has a valid physical page in `page_table`.
//!
//! **Blocks.** One block per (query head `h`, sequence `b`, tile of `block_q` queries); the
//! grid is `(q_heads, batch, ceil(max_q / block_q))` and the tile index counts *down* along
//! z, so the tiles with the most keys (the last ones) start first. A tile at or past
//! `q_lens[b]` exits at once. Each of the `block_q / 16` warps owns 16 query rows, held as
//! `mma` A fragments in registers for the whole kernel.
//!
//! **Main loop** over KV tiles of `block_kv` tokens (only the tiles at or below the
//! diagonal): per tile, one `cp.async.wait_group 0` and one barrier, then the copies of the
//! next tile into the other of two shared-memory stages (so they overlap this tile's
//! math), then per warp `S = Q·Kᵀ` (`ldmatrix` of K), the causal mask on tiles that cross
//! the diagonal, the online softmax in base 2 (row max and sum across the four lanes of a
//! row by `shfl`), `P` rounded to the dtype straight from the S accumulators into A
//! fragments, and `O += P·V` (`ldmatrix.trans` of V). A warp whose rows see none of a tile's
//! keys skips its math. The end divides by the row sums and stores rows below `q_lens[b]`.
//!
//! **Paged reads.** Token `j` of a KV tile is read from physical page
//! `page_table[b, j / page_size]`, slot `j % page_size`, KV head `h / group` (the
//! [`PagedKv`] layout, head-major or token-major pages — the strides come from
//! [`PagedKv::head_stride_bytes`] / [`PagedKv::slot_stride_bytes`]; the entry name ends in
//! `_tm` for token-major); a tile may span several pages, each thread looks up the page of
//! each row it copies. Rows at or past `seq_lens[b]` are zero-filled (`cp.async` with a
//! source size of 0 from a clamped, valid address): garbage slots are never read, and a
//! masked key meets a zero V row, never a NaN.
//!
//! **Shared memory.** Stage `s` holds the K tile then the V tile, rows of
//! `head_dim · 2` bytes cut into 16-byte chunks; chunk `c` of row `r` is stored at chunk
//! `c ^ key(r)`, so the eight rows of one `ldmatrix` 8×8 matrix and the eight chunks eight
//! consecutive `cp.async` write fall in eight different bank groups (16-byte groups of a
//! 128-byte line). At head_dim 64 and 128 (rows of 8 or more chunks) `key(r) = r & 7`. At
//! head_dim 32 a row is 4 chunks, half a line: `key(r) = (r >> 1) & 3` keeps every chunk in
//! its row, and rows `2i`, `2i + 1` share a line at the two halves, so the eight
//! (row parity, key) pairs of eight consecutive rows are eight different bank groups. The
//! key depends only on `r mod 8`. The Q tile is staged once, with the same swizzle, in the
//! space of stage 1 before the loop first writes it.
//!
//! **Parameters** (bound by name): pointers `q`, `k_pages`, `v_pages`, `page_table`
//! (`[batch, max_pages]` i32), `seq_lens`, `q_lens` (`[batch]` i32), `out`; scalars `batch`,
//! `max_q`, `max_pages` (`u32`) and `scale` (`f32`). Launch: grid
//! `(q_heads, batch, ceil(max_q / block_q))`, `block_q / 16 · 32` threads, and
//! [`PrefillAttentionSpec::shared_bytes`] of dynamic shared memory.

use kiln_codegen::kernel::{Access, Extent, GpuKernel, LaunchRule};
use kiln_codegen::ptx::{
    Axis, Cmp, KernelBuilder, Load, Pred, Reg, Special, Store, Target, B32, F32, S32, U32, U64,
};
use serde::{Deserialize, Serialize};

use super::PagedKv;
use crate::error::SpecError;
use crate::gemm::{mma_m16n8k16, pack_from_f32, CHUNK_BYTES, ELEMENT_BYTES};

const FAMILY: &str = "prefill_attention";

/// Query rows per warp: one `mma` m tile.
const WARP_ROWS: u32 = 16;
/// The most dynamic shared memory a block may use on sm_80 / sm_90 (227 KiB).
const MAX_SHARED_BYTES: usize = 227 * 1024;
/// `log2(e)`: the softmax runs in base 2 (`ex2`), with the scale folded in.
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// Bytes of shared memory one access of 32 banks × 4 bytes spans: eight 16-byte chunks.
const BANK_LINE_BYTES: u32 = 128;

/// The blocking of the prefill kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PrefillTile {
    /// Queries per block: 64 or 128 (`block_q / 16` warps).
    pub block_q: usize,
    /// Keys per KV tile: 32, 64 or 128.
    pub block_kv: usize,
    /// Blocks per SM that ptxas must fit (`.minnctapersm`, caps registers); 1 leaves
    /// registers uncapped.
    pub min_blocks_per_sm: usize,
}

impl PrefillTile {
    /// The default for `head_dim`: 64 queries (4 warps), registers capped so that three
    /// blocks (12 warps) share an SM — independent blocks hide each other's barrier and
    /// softmax stalls, which one 8-warp block cannot. KV tiles of 64 keys at head_dim 64
    /// (32 KiB of shared memory per block) and 32 (16 KiB), and of 32 at head_dim 128
    /// (32 KiB; 64-key tiles need a few registers more than the 168 that three blocks leave,
    /// and spill).
    pub fn h100(head_dim: usize) -> PrefillTile {
        PrefillTile {
            block_q: 64,
            block_kv: if head_dim > 64 { 32 } else { 64 },
            min_blocks_per_sm: 3,
        }
    }

    /// 128 queries (8 warps) by 64-key tiles, one block per SM at head_dim 128 (about 180
    /// registers): half the K/V tile loads per query of [`PrefillTile::h100`], a third less
    /// occupancy.
    pub fn wide() -> PrefillTile {
        PrefillTile {
            block_q: 128,
            block_kv: 64,
            min_blocks_per_sm: 1,
        }
    }

    /// Warps per block.
    pub fn warps(&self) -> usize {
        self.block_q / WARP_ROWS as usize
    }

    /// Threads per block.
    pub fn threads(&self) -> usize {
        self.warps() * 32
    }
}

/// A causal prefill attention kernel over the paged KV cache `layout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PrefillAttentionSpec {
    pub layout: PagedKv,
    pub tile: PrefillTile,
}

impl PrefillAttentionSpec {
    /// A spec with the default tile [`PrefillTile::h100`] for the layout's head_dim.
    pub fn new(layout: PagedKv) -> PrefillAttentionSpec {
        PrefillAttentionSpec {
            layout,
            tile: PrefillTile::h100(layout.head_dim),
        }
    }

    /// The kernel's entry name, unique per spec.
    pub fn entry_name(&self) -> String {
        format!(
            "prefill_attention_{}_q{}_kv{}_b{}",
            self.layout.tag(),
            self.tile.block_q,
            self.tile.block_kv,
            self.tile.min_blocks_per_sm
        )
    }

    /// Bytes of one K or V row in shared memory.
    fn row_bytes(&self) -> usize {
        self.layout.head_dim * ELEMENT_BYTES as usize
    }

    /// Bytes of one stage: the K tile then the V tile.
    fn stage_bytes(&self) -> usize {
        2 * self.tile.block_kv * self.row_bytes()
    }

    /// Dynamic shared memory per block: stage 0, then stage 1 or the Q tile (which shares
    /// stage 1's space), whichever is larger.
    pub fn shared_bytes(&self) -> usize {
        let q_bytes = self.tile.block_q * self.row_bytes();
        self.stage_bytes() + self.stage_bytes().max(q_bytes)
    }

    /// Checks everything the generator relies on; the error says what to change.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.layout.validate(FAMILY)?;
        let err = |message: String| Err(SpecError::new(FAMILY, message));
        let t = &self.tile;
        if !matches!(t.block_q, 64 | 128) {
            return err(format!("block_q = {} must be 64 or 128", t.block_q));
        }
        if !matches!(t.block_kv, 32 | 64 | 128) {
            return err(format!("block_kv = {} must be 32, 64 or 128", t.block_kv));
        }
        // Per thread: O (head_dim / 8 n tiles) and S (block_kv / 8 n tiles), 4 f32 each.
        let accumulators = 4 * (self.layout.head_dim + t.block_kv) / 8;
        if accumulators > 128 {
            return err(format!(
                "head_dim {} with block_kv {} needs {accumulators} f32 accumulators per thread \
                 (at most 128): use a smaller block_kv",
                self.layout.head_dim, t.block_kv
            ));
        }
        if !(1..=4).contains(&t.min_blocks_per_sm) {
            return err(format!(
                "min_blocks_per_sm = {} must be in 1..=4",
                t.min_blocks_per_sm
            ));
        }
        if self.layout.q_heads > 65535 {
            return err(format!(
                "q_heads = {} exceeds the grid's 65535",
                self.layout.q_heads
            ));
        }
        let rows_per_pass = t.threads() * CHUNK_BYTES as usize / self.row_bytes();
        if !t.block_kv.is_multiple_of(rows_per_pass) {
            return err(format!(
                "block_kv = {} must be a multiple of the {rows_per_pass} rows one copy pass \
                 covers",
                t.block_kv
            ));
        }
        if self.shared_bytes() > MAX_SHARED_BYTES {
            return err(format!(
                "{} bytes of shared memory exceed the {MAX_SHARED_BYTES} a block may use",
                self.shared_bytes()
            ));
        }
        Ok(())
    }
}

/// Constants derived from a valid spec.
struct Geometry {
    threads: u32,
    block_q: u32,
    block_kv: u32,
    row_bytes: u32,
    /// 16-byte chunks per row.
    chunks_per_row: u32,
    /// Rows one pass of all threads' copies covers (a multiple of 8).
    rows_per_pass: u32,
    /// The swizzle key of row `r` is `(r >> swizzle_shift) & swizzle_mask`: `r & 7` for rows
    /// of a full 128-byte line or more (head_dim 64, 128), `(r >> 1) & 3` for rows of half a
    /// line (head_dim 32). Either depends on `r mod 8` only.
    swizzle_shift: u32,
    swizzle_mask: u32,
    stage_bytes: u32,
    /// Offset of the V tile in a stage.
    v_offset: u32,
    /// 16-wide steps along head_dim (the K dimension of `S = Q·Kᵀ`).
    d_steps: u32,
    /// 8-wide n tiles of S (keys) and of O (head_dim).
    s_tiles: u32,
    o_tiles: u32,
    /// 16-key steps of `O += P·V`.
    kv_steps: u32,
}

impl Geometry {
    fn of(spec: &PrefillAttentionSpec) -> Geometry {
        let c = |v: usize| v as u32;
        let threads = c(spec.tile.threads());
        let head_dim = c(spec.layout.head_dim);
        let block_kv = c(spec.tile.block_kv);
        let row_bytes = head_dim * ELEMENT_BYTES;
        let chunks_per_row = row_bytes / CHUNK_BYTES;
        // Rows per 128-byte line of shared memory (1 from 64 elements up, 2 at 32).
        let rows_per_line = (BANK_LINE_BYTES / row_bytes).max(1);
        Geometry {
            threads,
            block_q: c(spec.tile.block_q),
            block_kv,
            row_bytes,
            chunks_per_row,
            rows_per_pass: threads / chunks_per_row,
            swizzle_shift: rows_per_line.trailing_zeros(),
            swizzle_mask: chunks_per_row.min(BANK_LINE_BYTES / CHUNK_BYTES) - 1,
            stage_bytes: c(spec.stage_bytes()),
            v_offset: block_kv * row_bytes,
            d_steps: head_dim / 16,
            s_tiles: block_kv / 8,
            o_tiles: head_dim / 8,
            kv_steps: block_kv / 16,
        }
    }
}

/// Generates the prefill attention kernel of `spec` (target sm_80, runs on sm_80 and newer).
pub fn generate(spec: &PrefillAttentionSpec) -> Result<GpuKernel, SpecError> {
    spec.validate()?;
    let g = Geometry::of(spec);
    let layout = &spec.layout;
    let mut k = KernelBuilder::new(&spec.entry_name(), Target::Sm80);
    // Always stated, 1 included: without `.minnctapersm`, ptxas picks an occupancy target
    // of its own and spills a few registers to reach it.
    k.min_blocks_per_sm(spec.tile.min_blocks_per_sm as u32);
    let q = k.param_pointer("q", Access::Read);
    let k_pages = k.param_pointer("k_pages", Access::Read);
    let v_pages = k.param_pointer("v_pages", Access::Read);
    let page_table = k.param_pointer("page_table", Access::Read);
    let seq_lens = k.param_pointer("seq_lens", Access::Read);
    let q_lens = k.param_pointer("q_lens", Access::Read);
    let out = k.param_pointer("out", Access::Write);
    let _batch = k.param_u32("batch");
    let max_q = k.param_u32("max_q");
    let max_pages = k.param_u32("max_pages");
    let scale = k.param_f32("scale");
    let smem = k.dynamic_shared("smem", 128);

    k.comment(
        "block (h, b, z): query head h, sequence b, query tile nctaid.z - 1 - z (the longest \
         tiles start first)",
    );
    let head = k.special(Special::Ctaid(Axis::X));
    let batch_index = k.special(Special::Ctaid(Axis::Y));
    let z = k.special(Special::Ctaid(Axis::Z));
    let tiles = k.special(Special::Nctaid(Axis::Z));
    let last_tile = k.sub(tiles, 1u32);
    let q_tile = k.sub(last_tile, z);
    let q0 = k.mul(q_tile, g.block_q);
    let length_offset = k.mul_wide(batch_index, 4u32);
    let q_len_address = k.add(q_lens, length_offset);
    let q_len = k.ld::<U32>(Load::GLOBAL.non_coherent(), q_len_address);
    let seq_len_address = k.add(seq_lens, length_offset);
    let seq_len = k.ld::<U32>(Load::GLOBAL.non_coherent(), seq_len_address);
    let empty = k.setp(Cmp::Ge, q0, q_len);
    k.guard(empty, |k| k.ret());

    k.comment(
        "query i sits at position offset + i (offset = seq_len - q_len) and sees keys j <= \
         offset + i; the block needs keys below kv_end, tiles below n_full are unmasked",
    );
    let offset = k.sub(seq_len, q_len);
    let q_end = k.add(q0, g.block_q);
    let q_end = k.min(q_end, q_len);
    let kv_end = k.add(offset, q_end);
    let kv_rounded = k.add(kv_end, g.block_kv - 1);
    let n_tiles = k.shr(kv_rounded, g.block_kv.trailing_zeros());
    let first_position = k.add(offset, q0);
    let first_limit = k.add(first_position, 1u32);
    let n_full = k.shr(first_limit, g.block_kv.trailing_zeros());
    let kv_head = k.div(head, layout.group_size() as u32);

    let tid = k.tid_x();
    let lane = k.and(tid, 31u32);
    let warp = k.shr(tid, 5u32);
    let smem_base = k.shared_address(&smem);

    let copy = emit_copy_setup(&mut k, &g, tid, smem_base);
    // The KV head's first row within a page (in rows of `row_bytes`), then this thread's
    // chunk; pages and slots are added per row in `emit_kv_load`.
    let head_rows = k.mul(
        kv_head,
        (layout.head_stride_bytes() / layout.row_bytes()) as u32,
    );
    let head_offset = k.mad_wide(head_rows, g.row_bytes, copy.chunk_bytes);
    let kv = KvSource {
        k_source: k.add(k_pages, head_offset),
        v_source: k.add(v_pages, head_offset),
        page_table_row: {
            let row = k.mul(batch_index, max_pages);
            k.mad_wide(row, 4u32, page_table)
        },
        last_token: k.sub(seq_len, 1u32),
        slots_per_page: (layout.page_stride_bytes() / layout.slot_stride_bytes()) as u32,
        slot_bytes: layout.slot_stride_bytes() as u32,
        log_page_size: layout.page_size.trailing_zeros(),
    };

    k.comment("prologue: Q tile into stage 1's space, KV tile 0 into stage 0");
    emit_q_load(
        &mut k,
        &g,
        &copy,
        q,
        QRows {
            q0,
            q_len,
            batch_index,
            max_q,
            head,
            q_heads: layout.q_heads as u32,
        },
        g.stage_bytes,
    );
    k.cp_async_commit();
    let zero = k.mov::<U32>(0u32);
    emit_kv_load(&mut k, &g, &copy, &kv, zero, copy.shared, None);
    k.cp_async_commit();
    k.cp_async_wait(1);
    k.bar_sync(0);

    let frag = emit_fragment_setup(&mut k, &g, lane, warp);
    k.comment("Q fragments of the warp's 16 rows, kept for the whole kernel");
    let q_lane = k.add(frag.q, g.stage_bytes);
    let q_frags: Vec<[Reg<B32>; 4]> = (0..g.d_steps)
        .map(|s| {
            let address = step_address(&mut k, smem_base, q_lane, s);
            k.ldmatrix::<4>(address)
        })
        .collect();

    k.comment(
        "softmax state per thread: rows g and g + 8 of the warp (g = lane / 4); m is the raw \
         row max, l this thread's share of the row sum; O accumulators [n tile][4]",
    );
    let scale_log2 = k.mul(scale, LOG2_E);
    let row_max: [Reg<F32>; 2] = k.splat(f32::NEG_INFINITY);
    let row_sum: [Reg<F32>; 2] = k.splat(0.0);
    let o_acc: Vec<[Reg<F32>; 4]> = (0..g.o_tiles).map(|_| k.splat(0.0)).collect();

    k.comment(
        "mask: key j0 + c (c = 8 n + 2t + e) is visible to row r iff c < limit_r - j0 - 2t, \
         limit_r = offset + q0 + 16 warp + r + 1",
    );
    let group = k.shr(lane, 2u32);
    let quad = k.and(lane, 3u32);
    let warp_row = k.mul_add(warp, WARP_ROWS, group);
    let row_limit = k.add(first_limit, warp_row);
    let quad_columns = k.shl(quad, 1u32);
    let row_limit = k.sub(row_limit, quad_columns);
    let warp_first = k.mul_add(warp, WARP_ROWS, first_limit);
    let warp_limit = k.add(warp_first, WARP_ROWS - 1);

    k.comment(&format!(
        "main loop over KV tiles of {} keys: wait for tile kt, barrier, request tile kt + 1 \
         into the other stage, then S = Q K^T, mask, online softmax, O += P V",
        g.block_kv
    ));
    let dtype = layout.dtype;
    k.for_range(0u32, n_tiles, 1u32, |k, kt| {
        k.cp_async_wait(0);
        k.bar_sync(0);
        let parity = k.and(kt, 1u32);
        let read_offset = k.mul(parity, g.stage_bytes);
        let next = k.add(kt, 1u32);
        let has_next = k.setp(Cmp::Lt, next, n_tiles);
        let write_offset = k.sub(g.stage_bytes, read_offset);
        let shared = k.add(copy.shared, write_offset);
        emit_kv_load(k, &g, &copy, &kv, next, shared, Some(has_next));
        k.cp_async_commit();

        let j0 = k.mul(kt, g.block_kv);
        let active = k.setp(Cmp::Lt, j0, warp_limit);
        k.if_then(active, |k| {
            k.comment("S = Q K^T: per head_dim step, ldmatrix.x4 gives two 8-key n tiles");
            let s_acc: Vec<[Reg<F32>; 4]> = (0..g.s_tiles).map(|_| k.splat(0.0)).collect();
            let k_lane = k.add(read_offset, frag.k);
            for (step, a) in q_frags.iter().enumerate() {
                let address = step_address(k, smem_base, k_lane, step as u32);
                for pair in 0..g.s_tiles / 2 {
                    let rows = (pair * 16 * g.row_bytes) as i64;
                    let b = k.ldmatrix::<4>(address.at(rows));
                    let tiles = &s_acc[2 * pair as usize..];
                    mma_m16n8k16(k, dtype, tiles[0], *a, [b[0], b[1]]);
                    mma_m16n8k16(k, dtype, tiles[1], *a, [b[2], b[3]]);
                }
            }

            let masked = k.setp(Cmp::Ge, kt, n_full);
            k.if_then(masked, |k| {
                k.comment("causal mask: tile crosses the diagonal");
                let limits: [Reg<S32>; 2] = std::array::from_fn(|half| {
                    let limit = k.add(row_limit, 8 * half as u32);
                    let limit = k.sub(limit, j0);
                    k.bitcast::<S32>(limit)
                });
                for (n, tile) in s_acc.iter().enumerate() {
                    for (e, value) in tile.iter().enumerate() {
                        let column = (8 * n + (e % 2)) as i32;
                        let visible = k.setp(Cmp::Lt, column, limits[e / 2]);
                        let kept = k.select(visible, *value, f32::NEG_INFINITY);
                        k.assign(*value, kept);
                    }
                }
            });

            k.comment("online softmax in base 2: new row max, rescale O and l, P = 2^(s c - m c)");
            let mut p_bits: Vec<Reg<B32>> = Vec::new();
            let mut alphas = Vec::new();
            let mut scaled_max = Vec::new();
            for half in 0..2 {
                let mut tile_max = s_acc[0][2 * half];
                for tile in &s_acc {
                    for value in &tile[2 * half..2 * half + 2] {
                        if *value != tile_max {
                            tile_max = k.max(tile_max, *value);
                        }
                    }
                }
                for lane_mask in [1, 2] {
                    let other = k.shfl_bfly(tile_max, lane_mask);
                    tile_max = k.max(tile_max, other);
                }
                let new_max = k.max(row_max[half], tile_max);
                // A row with every key masked so far keeps m = -inf: subtract 0 instead.
                let none = k.setp(Cmp::Eq, new_max, f32::NEG_INFINITY);
                let usable = k.select(none, 0.0f32, new_max);
                let shift = k.sub(row_max[half], usable);
                let shift = k.mul(shift, scale_log2);
                alphas.push(k.ex2_approx(shift));
                k.assign(row_max[half], new_max);
                let m_scaled = k.mul(usable, scale_log2);
                scaled_max.push(k.neg(m_scaled));
            }
            let mut partial_sums = [None, None];
            let mut probabilities: Vec<[Reg<F32>; 4]> = Vec::new();
            for tile in &s_acc {
                let p: [Reg<F32>; 4] = std::array::from_fn(|e| {
                    let exponent = k.fma(tile[e], scale_log2, scaled_max[e / 2]);
                    k.ex2_approx(exponent)
                });
                for (e, value) in p.iter().enumerate() {
                    let sum = &mut partial_sums[e / 2];
                    *sum = Some(match *sum {
                        None => *value,
                        Some(s) => k.add(s, *value),
                    });
                }
                probabilities.push(p);
            }
            for half in 0..2 {
                let sum = partial_sums[half].expect("at least one S tile");
                let rescaled = k.fma(row_sum[half], alphas[half], sum);
                k.assign(row_sum[half], rescaled);
            }
            for tile in &o_acc {
                for (e, value) in tile.iter().enumerate() {
                    let rescaled = k.mul(*value, alphas[e / 2]);
                    k.assign(*value, rescaled);
                }
            }
            for p in &probabilities {
                p_bits.push(pack_from_f32(k, dtype, p[0], p[1]));
                p_bits.push(pack_from_f32(k, dtype, p[2], p[3]));
            }

            k.comment(
                "O += P V: P's A fragment of key step s is S tiles 2s, 2s + 1; ldmatrix.trans.x4 \
                 of V gives two 8-wide head_dim n tiles",
            );
            let v_stage = k.add(read_offset, g.v_offset);
            let v_lane = k.add(v_stage, frag.v);
            for pair in 0..g.o_tiles / 2 {
                let address = step_address(k, smem_base, v_lane, pair);
                for step in 0..g.kv_steps as usize {
                    let a = [
                        p_bits[4 * step],
                        p_bits[4 * step + 1],
                        p_bits[4 * step + 2],
                        p_bits[4 * step + 3],
                    ];
                    let rows = (step as u32 * 16 * g.row_bytes) as i64;
                    let b = k.ldmatrix_trans::<4>(address.at(rows));
                    let tiles = &o_acc[2 * pair as usize..];
                    mma_m16n8k16(k, dtype, tiles[0], a, [b[0], b[1]]);
                    mma_m16n8k16(k, dtype, tiles[1], a, [b[2], b[3]]);
                }
            }
        });
    });
    k.cp_async_wait(0);

    k.comment(
        "output: this thread's address in row g of the warp (row g + 8 is 8 tokens on) and how \
         many rows are left below q_len, from the block and thread indices read again (fewer \
         registers live across the loop)",
    );
    let head = k.special(Special::Ctaid(Axis::X));
    let batch_index = k.special(Special::Ctaid(Axis::Y));
    let z = k.special(Special::Ctaid(Axis::Z));
    let tiles = k.special(Special::Nctaid(Axis::Z));
    let q_tile = k.sub(tiles, z);
    let q_end = k.mul(q_tile, g.block_q);
    let q_len = k.ld::<U32>(Load::GLOBAL.non_coherent(), q_len_address);
    let tid = k.tid_x();
    let lane = k.and(tid, 31u32);
    let warp = k.shr(tid, 5u32);
    let group = k.shr(lane, 2u32);
    let quad = k.and(lane, 3u32);
    let warp_row = k.mul_add(warp, WARP_ROWS, group);
    let out_row = k.add(q_end, warp_row);
    let out_row = k.sub(out_row, g.block_q);
    let rows_left = k.sub(q_len, out_row);
    let token = k.mul_add(batch_index, max_q, out_row);
    let token_head = k.mul_add(token, layout.q_heads as u32, head);
    let quad_bytes = k.shl(quad, 2u32);
    let quad_bytes = k.cvt::<U64>(quad_bytes);
    let out_base = k.add(out, quad_bytes);
    let out_address = k.mad_wide(token_head, g.row_bytes, out_base);
    k.comment("epilogue: full row sums across the four lanes of a row, O / l, rows < q_len");
    for half in 0..2usize {
        let mut sum = row_sum[half];
        for lane_mask in [1, 2] {
            let other = k.shfl_bfly(sum, lane_mask);
            sum = k.add(sum, other);
        }
        let inverse = k.rcp_approx(sum);
        // rows_left = q_len - row g wraps past 2^31 when row g >= q_len: compare signed.
        let rows_left = k.bitcast::<S32>(rows_left);
        let inside = k.setp(Cmp::Gt, rows_left, 8 * half as i32);
        let half_offset = (half as u32 * 8 * layout.q_heads as u32 * g.row_bytes) as i64;
        for (n, tile) in o_acc.iter().enumerate() {
            let lo = k.mul(tile[2 * half], inverse);
            let hi = k.mul(tile[2 * half + 1], inverse);
            let packed = pack_from_f32(&mut k, dtype, lo, hi);
            let address = out_address.at(half_offset + 16 * n as i64);
            k.guard(inside, |k| k.st(Store::GLOBAL, address, packed));
        }
    }

    let launch = LaunchRule {
        grid: [
            Extent::fixed(layout.q_heads as u32),
            Extent::ceil_div("batch", 1),
            Extent::ceil_div("max_q", g.block_q),
        ],
        block: [g.threads, 1, 1],
        shared_bytes: spec.shared_bytes() as u32,
    };
    Ok(k.finish(launch))
}

/// Per-thread state of the global → shared copies: thread `t` copies chunk `t % cpr` of
/// row `t / cpr` (+ `rows_per_pass` rows per pass).
struct CopySetup {
    /// Row of this thread's first chunk within a tile.
    row: Reg<U32>,
    /// Byte offset of the chunk within a global row.
    chunk_bytes: Reg<U64>,
    /// Shared address of this thread's first (swizzled) chunk in stage 0.
    shared: Reg<U32>,
}

fn emit_copy_setup(
    k: &mut KernelBuilder,
    g: &Geometry,
    tid: Reg<U32>,
    smem_base: Reg<U32>,
) -> CopySetup {
    let key = match g.swizzle_shift {
        0 => format!("(row & {})", g.swizzle_mask),
        shift => format!("((row >> {shift}) & {})", g.swizzle_mask),
    };
    k.comment(&format!(
        "copies: thread t moves chunk t % {cpr} of row t / {cpr} (+{rpp} rows per pass) to \
         chunk (t % {cpr}) ^ {key}",
        cpr = g.chunks_per_row,
        rpp = g.rows_per_pass
    ));
    let row = k.shr(tid, g.chunks_per_row.trailing_zeros());
    let chunk = k.and(tid, g.chunks_per_row - 1);
    let chunk_bytes = k.shl(chunk, 4u32);
    let chunk_bytes = k.cvt::<U64>(chunk_bytes);
    let row_key = swizzle_key(k, g, row);
    let swizzled = k.xor(chunk, row_key);
    let swizzled = k.shl(swizzled, 4u32);
    let shared = k.mul_add(row, g.row_bytes, swizzled);
    let shared = k.add(smem_base, shared);
    CopySetup {
        row,
        chunk_bytes,
        shared,
    }
}

/// The swizzle key of shared-memory row `row` (see [`Geometry::swizzle_shift`]).
fn swizzle_key(k: &mut KernelBuilder, g: &Geometry, row: Reg<U32>) -> Reg<U32> {
    match g.swizzle_shift {
        0 => k.and(row, g.swizzle_mask),
        shift => {
            let line = k.shr(row, shift);
            k.and(line, g.swizzle_mask)
        }
    }
}

/// Where the Q rows of the block come from.
struct QRows {
    q0: Reg<U32>,
    q_len: Reg<U32>,
    batch_index: Reg<U32>,
    max_q: Reg<U32>,
    head: Reg<U32>,
    q_heads: u32,
}

/// Requests the block's `block_q` query rows into the shared region at `region` bytes;
/// rows at or past `q_len` are zero-filled from the (valid) row `q0`.
fn emit_q_load(
    k: &mut KernelBuilder,
    g: &Geometry,
    copy: &CopySetup,
    q: Reg<U64>,
    rows: QRows,
    region: u32,
) {
    let last = k.sub(rows.q_len, 1u32);
    let first = k.add(rows.q0, copy.row);
    let chunk_source = k.add(q, copy.chunk_bytes);
    let batch_rows = k.mul(rows.batch_index, rows.max_q);
    for pass in 0..g.block_q / g.rows_per_pass {
        let i = k.add(first, pass * g.rows_per_pass);
        let inside = k.setp(Cmp::Lt, i, rows.q_len);
        let clamped = k.min(i, last);
        let token = k.add(batch_rows, clamped);
        let row = k.mul_add(token, rows.q_heads, rows.head);
        let source = k.mad_wide(row, g.row_bytes, chunk_source);
        let bytes = k.select(inside, CHUNK_BYTES, 0u32);
        let shared = copy
            .shared
            .at((region + pass * g.rows_per_pass * g.row_bytes) as i64);
        k.cp_async_16_zero_fill(shared, source, bytes);
    }
}

/// The paged K/V source of the block's KV head.
struct KvSource {
    /// `k_pages` / `v_pages` plus the KV head's first row within a page and this thread's
    /// chunk offset.
    k_source: Reg<U64>,
    v_source: Reg<U64>,
    /// `&page_table[b, 0]`.
    page_table_row: Reg<U64>,
    /// `seq_len - 1`.
    last_token: Reg<U32>,
    /// `page_stride / slot_stride` ([`PagedKv`]): slot strides per page (`kv_heads ·
    /// page_size` head-major, `page_size` token-major).
    slots_per_page: u32,
    /// `slot_stride` in bytes (`row_bytes` head-major, `kv_heads · row_bytes` token-major).
    slot_bytes: u32,
    log_page_size: u32,
}

/// Requests KV tile `tile` (K and V) into the stage whose copy address for this thread is
/// `shared`; tokens at or past `seq_len` are zero-filled from a clamped, valid address. With
/// `when`, the page-table loads and the copies are predicated on it (no branch, so ptxas may
/// overlap them with the math that follows).
#[allow(clippy::too_many_arguments)]
fn emit_kv_load(
    k: &mut KernelBuilder,
    g: &Geometry,
    copy: &CopySetup,
    kv: &KvSource,
    tile: Reg<U32>,
    shared: Reg<U32>,
    when: Option<Reg<Pred>>,
) {
    let first = k.mul_add(tile, g.block_kv, copy.row);
    let page_size_mask = (1u32 << kv.log_page_size) - 1;
    for pass in 0..g.block_kv / g.rows_per_pass {
        let j = k.add(first, pass * g.rows_per_pass);
        let inside = k.setp(Cmp::Le, j, kv.last_token);
        let clamped = k.min(j, kv.last_token);
        let logical = k.shr(clamped, kv.log_page_size);
        let entry = k.mad_wide(logical, 4u32, kv.page_table_row);
        let load = |k: &mut KernelBuilder| k.ld::<U32>(Load::GLOBAL.non_coherent(), entry);
        let page = match when {
            Some(p) => k.guard(p, load),
            None => load(k),
        };
        let slot = k.and(clamped, page_size_mask);
        // page · page_stride + slot · slot_stride = (page · slots_per_page + slot) · slot_stride.
        let rows = k.mul_add(page, kv.slots_per_page, slot);
        let offset = k.mul_wide(rows, kv.slot_bytes);
        let bytes = k.select(inside, CHUNK_BYTES, 0u32);
        let row_offset = (pass * g.rows_per_pass * g.row_bytes) as i64;
        let k_address = k.add(kv.k_source, offset);
        let v_address = k.add(kv.v_source, offset);
        let copies = |k: &mut KernelBuilder| {
            k.cp_async_16_zero_fill(shared.at(row_offset), k_address, bytes);
            let v_shared = shared.at(row_offset + g.v_offset as i64);
            k.cp_async_16_zero_fill(v_shared, v_address, bytes);
        };
        match when {
            Some(p) => k.guard(p, copies),
            None => copies(k),
        }
    }
}

/// Per-lane `ldmatrix` offsets (from the start of a tile in shared memory) of chunk pair 0.
///
/// A lane whose row is `r` (with `r & 7 = lane & 7`, so `key(r) = key(lane)`) and whose
/// chunk in pair `s` is `2s + h` (`h` ∈ {0, 1}) reads the swizzled chunk `(2s + h) ^
/// key(lane) = 2s ^ (h ^ key(lane))`, so pair `s`'s offset is pair 0's XOR `32 s`: the row
/// offset (a multiple of the row's bytes: 64 at head_dim 32, 128 at 64, 256 at 128; above
/// every chunk index `2s ^ (h ^ key)` of a row, which stays below the row's chunk count) and
/// the bases added to it (stages, the V tile, the Q region, all multiples of 2048) leave the
/// bits `32 s` touches clear. One `xor` on a per-tile offset and one `add` of the shared
/// window's base per pair, and nothing loop-invariant for ptxas to keep in registers per
/// pair.
struct FragmentSetup {
    /// Q (A operand): lane row `16 warp + lane % 16`, `h = lane / 16`.
    q: Reg<U32>,
    /// K (B operand, not transposed): lane row `lane % 8 + 8 (lane / 16)`,
    /// `h = (lane / 8) % 2`.
    k: Reg<U32>,
    /// V (B operand, transposed): lane row `lane % 16`, `h = lane / 16`.
    v: Reg<U32>,
}

fn emit_fragment_setup(
    k: &mut KernelBuilder,
    g: &Geometry,
    lane: Reg<U32>,
    warp: Reg<U32>,
) -> FragmentSetup {
    k.comment(
        "ldmatrix lanes: Q (rows 0-7 | 8-15) x (d 0-7 | 8-15); K (d 0-7 | 8-15) x (keys 0-7 | \
         8-15); V.trans (keys 0-7 | 8-15) x (d 0-7 | 8-15)",
    );
    let low = k.and(lane, 7u32);
    let sixteenth = k.and(lane, 15u32);
    let upper = k.shr(lane, 4u32);
    let eighth = k.shr(lane, 3u32);
    let eighth = k.and(eighth, 1u32);
    // Every lane's row is `lane` mod 8, so its swizzle key is the lane's.
    let key = match g.swizzle_shift {
        0 => low,
        _ => swizzle_key(k, g, lane),
    };
    let offset = |k: &mut KernelBuilder, row: Reg<U32>, h: Reg<U32>| {
        let x = k.xor(h, key);
        let chunk = k.shl(x, 4u32);
        k.mul_add(row, g.row_bytes, chunk)
    };
    let q_row = k.mul_add(warp, WARP_ROWS, sixteenth);
    let k_row = k.mul_add(upper, 8u32, low);
    FragmentSetup {
        q: offset(k, q_row, upper),
        k: offset(k, k_row, eighth),
        v: offset(k, sixteenth, upper),
    }
}

/// `base + (offset ^ 32 pair)`: the lane's `ldmatrix` address for chunk pair `pair` (see
/// [`FragmentSetup`]).
fn step_address(k: &mut KernelBuilder, base: Reg<U32>, offset: Reg<U32>, pair: u32) -> Reg<U32> {
    let swizzled = match pair {
        0 => offset,
        _ => k.xor(offset, 32 * pair),
    };
    k.add(base, swizzled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::dtype::DType;

    fn layout() -> PagedKv {
        PagedKv {
            dtype: DType::F16,
            q_heads: 32,
            kv_heads: 8,
            head_dim: 128,
            page_size: 16,
            order: crate::attention::paged::PageOrder::HeadMajor,
        }
    }

    /// Host model of the shared-memory layout: chunk `c` of row `r` is stored at byte
    /// `r·row_bytes + 16·(c ^ key(r))`, `key(r) = (r >> swizzle_shift) & swizzle_mask`.
    fn stored_at(g: &Geometry, row: u32, chunk: u32) -> u32 {
        let key = (row >> g.swizzle_shift) & g.swizzle_mask;
        row * g.row_bytes + 16 * (chunk ^ key)
    }

    fn every_tile() -> Vec<PrefillTile> {
        let mut tiles = vec![PrefillTile::wide()];
        for block_q in [64, 128] {
            for block_kv in [32, 64, 128] {
                tiles.push(PrefillTile {
                    block_q,
                    block_kv,
                    min_blocks_per_sm: 1,
                });
            }
        }
        tiles
    }

    /// The swizzle at every head_dim: each row's chunks stay in the row (a permutation), the
    /// eight rows of an `ldmatrix` 8×8 matrix (same logical chunk, eight consecutive rows
    /// from a multiple of 8) and the eight chunks of eight consecutive copying threads fall
    /// in eight different 16-byte bank groups of a 128-byte line; and the lane addresses of
    /// `emit_fragment_setup` + `step_address` (replayed here in host arithmetic, with the
    /// stage, V and Q bases added before the XOR as the kernel does) read exactly the
    /// swizzled chunk each `ldmatrix` matrix wants, at every k-step, key pair and tile.
    #[test]
    fn the_swizzle_is_a_per_row_permutation_that_ldmatrix_reads_back() {
        for head_dim in [32, 64, 128] {
            for tile in every_tile() {
                let spec = PrefillAttentionSpec {
                    layout: PagedKv {
                        head_dim,
                        ..layout()
                    },
                    tile,
                };
                if spec.validate().is_err() {
                    continue;
                }
                let g = Geometry::of(&spec);
                let cpr = g.chunks_per_row;
                for row in 0..64 {
                    let mut chunks: Vec<u32> = (0..cpr).map(|c| stored_at(&g, row, c)).collect();
                    chunks.sort_unstable();
                    let want: Vec<u32> = (0..cpr).map(|c| row * g.row_bytes + 16 * c).collect();
                    assert_eq!(chunks, want, "d {head_dim} row {row}");
                }
                let bank_group = |byte: u32| (byte % BANK_LINE_BYTES) / 16;
                for first in (0..64).step_by(8) {
                    for chunk in 0..cpr {
                        let mut groups: Vec<u32> = (first..first + 8)
                            .map(|r| bank_group(stored_at(&g, r, chunk)))
                            .collect();
                        groups.sort_unstable();
                        groups.dedup();
                        assert_eq!(groups.len(), 8, "d {head_dim} rows {first}.. chunk {chunk}");
                    }
                }
                for first in (0..g.threads).step_by(8) {
                    let mut groups: Vec<u32> = (first..first + 8)
                        .map(|t| bank_group(stored_at(&g, t / cpr, t % cpr)))
                        .collect();
                    groups.sort_unstable();
                    groups.dedup();
                    assert_eq!(groups.len(), 8, "d {head_dim} threads {first}..");
                }

                let warps = g.block_q / WARP_ROWS;
                for lane in 0..32u32 {
                    let (low, sixteenth, upper) = (lane & 7, lane & 15, lane >> 4);
                    let eighth = (lane >> 3) & 1;
                    let key = (lane >> g.swizzle_shift) & g.swizzle_mask;
                    let offset = |row: u32, h: u32| row * g.row_bytes + 16 * (h ^ key);
                    for warp in 0..warps {
                        // Q (A operand): matrix lane / 8 = (rows 0-7 | 8-15) x (d 0-7 | 8-15).
                        let q_row = WARP_ROWS * warp + sixteenth;
                        let q_lane = g.stage_bytes + offset(q_row, upper);
                        for step in 0..g.d_steps {
                            assert_eq!(
                                q_lane ^ (32 * step),
                                g.stage_bytes + stored_at(&g, q_row, 2 * step + upper),
                                "Q d {head_dim} lane {lane} warp {warp} step {step}"
                            );
                        }
                    }
                    for read in [0, g.stage_bytes] {
                        // K (B operand): keys 16 pair + (lane % 8 + 8 (lane / 16)), d chunk
                        // 2 step + (lane / 8) % 2.
                        let k_row = 8 * upper + low;
                        let k_lane = read + offset(k_row, eighth);
                        for step in 0..g.d_steps {
                            for pair in 0..g.s_tiles / 2 {
                                let rows = 16 * pair;
                                assert_eq!(
                                    (k_lane ^ (32 * step)) + rows * g.row_bytes,
                                    read + stored_at(&g, k_row + rows, 2 * step + eighth),
                                    "K d {head_dim} lane {lane} step {step} pair {pair}"
                                );
                            }
                        }
                        // V (B operand, transposed): keys 16 step + lane % 16, d chunk
                        // 2 pair + lane / 16.
                        let v_base = read + g.v_offset;
                        let v_lane = v_base + offset(sixteenth, upper);
                        for pair in 0..g.o_tiles / 2 {
                            for step in 0..g.kv_steps {
                                let rows = 16 * step;
                                assert_eq!(
                                    (v_lane ^ (32 * pair)) + rows * g.row_bytes,
                                    v_base + stored_at(&g, sixteenth + rows, 2 * pair + upper),
                                    "V d {head_dim} lane {lane} pair {pair} step {step}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Head dim 32: 4 chunks per row, two k-steps of 16, four 8-wide O tiles, 16 KiB of
    /// shared memory with the default tile; a 128-query block with 32-key tiles is refused
    /// (one copy pass of 256 threads covers 64 rows), naming block_kv.
    #[test]
    fn head_dim_32_geometry() {
        let spec = PrefillAttentionSpec::new(PagedKv {
            head_dim: 32,
            ..layout()
        });
        assert_eq!(spec.tile, PrefillTile::h100(32));
        spec.validate().unwrap();
        let g = Geometry::of(&spec);
        assert_eq!(
            (g.row_bytes, g.chunks_per_row, g.rows_per_pass),
            (64, 4, 32)
        );
        assert_eq!((g.d_steps, g.o_tiles, g.s_tiles, g.kv_steps), (2, 4, 8, 4));
        assert_eq!((g.swizzle_shift, g.swizzle_mask), (1, 3));
        assert_eq!(spec.shared_bytes(), 2 * 64 * 64 + 2 * 64 * 64);
        let wide = PrefillAttentionSpec {
            tile: PrefillTile::wide(),
            ..spec
        };
        wide.validate().unwrap();
        assert_eq!(wide.shared_bytes(), 2 * (2 * 64 * 64));
        let narrow = PrefillAttentionSpec {
            tile: PrefillTile {
                block_q: 128,
                block_kv: 32,
                min_blocks_per_sm: 1,
            },
            ..spec
        };
        let error = narrow.validate().unwrap_err();
        assert!(error.message.contains("block_kv = 32"), "{error}");
        for head_dim in [64, 128] {
            let g = Geometry::of(&PrefillAttentionSpec::new(PagedKv {
                head_dim,
                ..layout()
            }));
            assert_eq!((g.swizzle_shift, g.swizzle_mask), (0, 7));
        }
    }

    #[test]
    fn shared_memory_is_two_stages_or_a_stage_and_the_q_tile() {
        let spec = PrefillAttentionSpec {
            tile: PrefillTile::wide(),
            ..PrefillAttentionSpec::new(layout())
        };
        assert_eq!(spec.shared_bytes(), 2 * 2 * 64 * 256);
        let narrow = PrefillAttentionSpec {
            tile: PrefillTile {
                block_q: 128,
                block_kv: 32,
                min_blocks_per_sm: 1,
            },
            ..spec
        };
        assert_eq!(narrow.shared_bytes(), 2 * 32 * 256 + 128 * 256);
    }
}
