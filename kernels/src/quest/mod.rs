//! Quest kernels over the paged KV cache (see `attention::paged` for the layout): page
//! scores from the page metadata, and top-K page selection per (sequence, KV head).
//!
//! - `estimate`: [`QuestEstimateSpec`] → scores `[batch, kv_heads, max_pages]` f32, bit-equal
//!   to `kiln_ir::quest::group_scores`;
//! - `top_k`: [`QuestTopKSpec`] → `selected_pages` / `selected_counts`, bit-equal to
//!   `kiln_ir::quest::select_pages`;
//! - `page_bounds`: [`PageBoundsSpec`] → `page_max` / `page_min` of the pages the last
//!   `new_tokens` tokens touched, recomputed from an already written K cache (either page
//!   order), equal to `kiln_ir::quest::PageMeta::from_keys`.
//!
//! The metadata they read is written by `kv_append` (the pool's kernel) or `page_bounds` (a
//! plan's contiguous cache, whose `kv_append` launch writes no metadata). This module generates PTX; it must not
//! launch anything.

pub mod estimate;
pub mod page_bounds;
pub mod top_k;

pub use estimate::QuestEstimateSpec;
pub use page_bounds::PageBoundsSpec;
pub use top_k::QuestTopKSpec;
