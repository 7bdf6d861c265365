//! Attention over the paged KV cache: decode (split-KV, dense or Quest-sparse) and causal
//! prefill.
//!
//! - `paged`: the layout every paged kernel reads ([`PagedKv`]);
//! - `decode`: split-KV decode attention and the merge of partial softmax states;
//! - `prefill`: causal FlashAttention-style prefill on `mma.sync`;
//! - `program`: the launches that compute a plan's attention and KV-append kernels over the
//!   model graph's contiguous KV cache.
//!
//! This module generates PTX; it must not launch anything.

pub mod decode;
pub mod paged;
pub mod prefill;
pub mod program;

pub use paged::PagedKv;
