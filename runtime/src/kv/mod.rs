//! # runtime::kv — the paged KV cache
//!
//! - `pool`: host bookkeeping, pure Rust and unit-tested without a GPU: a pool of pages with a
//!   free list ([`PagedKvCache`]), per-sequence page lists, and the `page_table` / `seq_lens`
//!   ([`BatchTables`]) and `token_seqs` / `token_positions` ([`AppendBatch`]) host arrays
//!   the paged kernels read;
//! - `device`: the device buffers of that layout ([`DeviceKvCache`]): per layer `k_pages`,
//!   `v_pages` and the Quest metadata `page_max` / `page_min`, and the uploaded tables;
//! - `error`: [`KvError`].
//!
//! The layout is `kiln_kernels::attention::paged`'s; this module never builds PTX and never
//! launches a kernel (the KV-append kernel writes keys, values and metadata).

mod device;
mod error;
mod pool;

pub use device::{DeviceKvCache, DeviceKvLayer, DevicePageTables};
pub use error::KvError;
pub use pool::{
    AppendBatch, BatchTables, PagedKvCache, SeqId, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, PAD_PAGE,
};
