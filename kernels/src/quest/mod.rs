//! Quest kernels over the paged KV cache (see `attention::paged` for the layout): page
//! scores from the page metadata, and top-K page selection per (sequence, KV head).
//!
//! - `estimate`: [`QuestEstimateSpec`] → scores `[batch, kv_heads, max_pages]` f32, bit-equal
//!   to `kiln_ir::quest::group_scores`;
//! - `top_k`: [`QuestTopKSpec`] → `selected_pages` / `selected_counts`, bit-equal to
//!   `kiln_ir::quest::select_pages`.
//!
//! The metadata they read is written by `kv_append`. This module generates PTX; it must not
//! launch anything.

pub mod estimate;
pub mod top_k;

pub use estimate::QuestEstimateSpec;
pub use top_k::QuestTopKSpec;
