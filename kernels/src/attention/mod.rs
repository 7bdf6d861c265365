//! Attention over the paged KV cache: decode (split-KV, dense or Quest-sparse) and causal
//! prefill.
//!
//! - `paged`: the layout every paged kernel reads ([`PagedKv`]);
//! - `decode`: split-KV decode attention and the merge of partial softmax states;
//! - `prefill`: causal FlashAttention-style prefill on `mma.sync`.
//!
//! This module generates PTX; it must not launch anything.

pub mod decode;
pub mod paged;
pub mod prefill;

pub use paged::PagedKv;
