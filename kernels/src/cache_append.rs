//! Cache append: the GPU form of the IR op `KvAppend` on the model graph's contiguous KV cache,
//! **in place**.
//!
//! `(cache [batch, capacity, kv_heads, head_dim], new [batch, new_tokens, kv_heads, head_dim],
//! start [batch] i32)`: rows `start[b] .. start[b] + new_tokens` of sequence `b` of `cache`
//! are replaced by `new`; every other row of `cache` is left untouched (the kernel writes only
//! the new rows, so the cache buffer is both the operand and the result). Owns
//! [`CacheAppendSpec`] and its generator; it neither allocates nor launches anything, and it
//! maintains no Quest metadata (`quest::page_bounds` recomputes it from the written cache).
//!
//! **Work split.** One block row per (new token `s`, sequence `b`): block `(s, y, b)` thread
//! `i` owns the 16-byte chunk `c = y·threads + i` of the token's `kv_heads·head_dim` values
//! (`kv_heads·head_dim/8` chunks), reads it from `new[b, s]` with one `ld.global.nc.v4` and
//! writes it to `cache[b, start[b] + s]` with one `st.global.v4`.
//!
//! **Out of range.** A row with `start[b] < 0` or `start[b] + s >= capacity` is not written
//! (the reference, `kiln_ir::interp`, rejects such an append; the kernel drops the rows
//! instead of writing out of bounds).
//!
//! Parameters, in order:
//! - `new [batch, new_tokens, kv_heads, head_dim]` T (read);
//! - `start [batch]` i32 (read);
//! - `cache [batch, capacity, kv_heads, head_dim]` T (read and written: only the new rows);
//! - scalars `batch`, `new_tokens`, `capacity` (u32).
//!
//! Launch: grid `(new_tokens, blocks_per_row, batch)`, block `(threads, 1, 1)` with
//! `threads = min(128, kv_heads·head_dim/8 rounded up to 32)` and
//! `blocks_per_row = ceil(kv_heads·head_dim/8 / threads)`; no dynamic shared memory. A launch
//! with `new_tokens = 0` or `batch = 0` has an empty grid (nothing to do; the runtime refuses
//! empty grids, so the caller skips it). All buffers 16-byte aligned (device allocations are).
//!
//! This file generates PTX; it must not launch anything.

use crate::vector::HALVES_PER_CHUNK;
use crate::SpecError;
use kiln_codegen::kernel::{Access, Extent, GpuKernel, LaunchRule};
use kiln_codegen::ptx::{Axis, Cmp, KernelBuilder, Load, Special, Store, Target, U32};
use kiln_ir::dtype::DType;
use serde::{Deserialize, Serialize};

const FAMILY: &str = "cache_append";

/// Most threads per block.
const MAX_THREADS: u32 = 128;

/// An in-place cache-append kernel for one cache row shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CacheAppendSpec {
    /// f16 or bf16.
    pub dtype: DType,
    pub kv_heads: usize,
    /// A positive multiple of 8 (32, 64 and 128 in practice: the paged layouts').
    pub head_dim: usize,
}

impl CacheAppendSpec {
    /// 16-byte chunks of one token (all KV heads).
    pub fn chunks_per_row(&self) -> u32 {
        (self.kv_heads * self.head_dim / HALVES_PER_CHUNK) as u32
    }

    /// Threads per block.
    pub fn threads(&self) -> u32 {
        (self.chunks_per_row().div_ceil(32) * 32).min(MAX_THREADS)
    }

    /// Blocks per (token, sequence): the grid's y extent.
    pub fn blocks_per_row(&self) -> u32 {
        self.chunks_per_row().div_ceil(self.threads())
    }

    /// The kernel entry name: `cache_append_f16_kv8_d128`.
    pub fn entry(&self) -> String {
        format!(
            "cache_append_{}_kv{}_d{}",
            self.dtype, self.kv_heads, self.head_dim
        )
    }

    /// Checks the spec; errors name the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        let fail = |m: String| Err(SpecError::new(FAMILY, m));
        if !matches!(self.dtype, DType::F16 | DType::BF16) {
            return fail(format!("dtype must be f16 or bf16, got {}", self.dtype));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(HALVES_PER_CHUNK) {
            return fail(format!(
                "head_dim must be a positive multiple of 8, got {}",
                self.head_dim
            ));
        }
        if self.kv_heads == 0 || self.kv_heads * self.head_dim > 1 << 20 {
            return fail(format!(
                "kv_heads must be positive with kv_heads·head_dim at most 2^20, got {}",
                self.kv_heads
            ));
        }
        Ok(())
    }
}

/// Generates the cache-append kernel for `spec`.
pub fn generate(spec: &CacheAppendSpec) -> Result<GpuKernel, SpecError> {
    spec.validate()?;
    let chunks_per_row = spec.chunks_per_row();
    let threads = spec.threads();
    let row_bytes = chunks_per_row * 16;

    let mut k = KernelBuilder::new(&spec.entry(), Target::Sm80);
    let new = k.param_pointer("new", Access::Read);
    let start = k.param_pointer("start", Access::Read);
    let cache = k.param_pointer("cache", Access::ReadWrite);
    let _batch = k.param_u32("batch");
    let new_tokens = k.param_u32("new_tokens");
    let capacity = k.param_u32("capacity");
    let input = Load::GLOBAL.non_coherent();

    k.comment("this thread's token, sequence and 16-byte chunk of the token's row");
    let token = k.ctaid_x();
    let block_y = k.special(Special::Ctaid(Axis::Y));
    let sequence = k.special(Special::Ctaid(Axis::Z));
    let tid = k.tid_x();
    let chunk = k.mul_add(block_y, threads, tid);
    let active = k.setp(Cmp::Lt, chunk, chunks_per_row);
    k.if_then(active, |k| {
        k.comment("destination row start + token; negative or past-capacity rows are dropped");
        let start_offset = k.mul_wide(sequence, 4u32);
        let start_address = k.add(start, start_offset);
        // As u32, a negative start is at least 2^31 > capacity.
        let first = k.ld::<U32>(input, start_address);
        let fits = k.setp(Cmp::Lt, first, capacity);
        k.if_then(fits, |k| {
            let room = k.sub(capacity, first);
            let inside = k.setp(Cmp::Lt, token, room);
            k.if_then(inside, |k| {
                let source_row = k.mul_add(sequence, new_tokens, token);
                let source_offset = k.mul_wide(source_row, row_bytes);
                let source_offset = k.mad_wide(chunk, 16u32, source_offset);
                let source = k.add(new, source_offset);
                let words = k.ld_vector::<U32, 4>(input, source);
                let position = k.add(first, token);
                let row = k.mul_add(sequence, capacity, position);
                let offset = k.mul_wide(row, row_bytes);
                let offset = k.mad_wide(chunk, 16u32, offset);
                let destination = k.add(cache, offset);
                k.st_vector(Store::GLOBAL, destination, words);
            });
        });
    });

    let launch = LaunchRule {
        grid: [
            Extent::ceil_div("new_tokens", 1),
            Extent::fixed(spec.blocks_per_row()),
            Extent::ceil_div("batch", 1),
        ],
        block: [threads, 1, 1],
        shared_bytes: 0,
    };
    Ok(k.finish(launch))
}
