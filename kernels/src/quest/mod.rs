//! Quest kernels over the paged KV cache (see `attention::paged` for the layout): page
//! scores from the page metadata, and top-K page selection per (sequence, KV head).
//!
//! This module generates PTX; it must not launch anything.
