//! KV append: writes new (post-RoPE) keys and values into the paged KV cache and maintains
//! the Quest page metadata (max / min of each page's keys) in the same pass.
//!
//! This file generates PTX; it must not launch anything.
