//! The paged KV-cache layout every attention and Quest kernel reads, in one place.
//!
//! Owns [`PagedKv`], the shape parameters a paged kernel is generated for, and the layout
//! contract below. Generators take a `PagedKv` instead of repeating the layout; the runtime's
//! `runtime::kv` allocates buffers in exactly this layout. Nothing here emits PTX.
//!
//! Device buffers (row-major, `T` = the cache dtype, f16 or bf16):
//!
//! | buffer | shape | meaning |
//! |---|---|---|
//! | `k_pages`, `v_pages` | `[num_pages, kv_heads, page_size, head_dim]` `T` | one page = `page_size` tokens; a (page, KV head) block is contiguous |
//! | `page_max`, `page_min` | `[num_pages, kv_heads, head_dim]` `T` | Quest metadata: element-wise max / min of the page's valid (post-RoPE) keys |
//! | `page_table` | `[batch, max_pages]` i32 | physical page of logical page `j` of sequence `b` |
//! | `seq_lens` | `[batch]` i32 | valid tokens of sequence `b` (the current token included) |
//! | `selected_pages` | `[batch, kv_heads, max_selected]` i32 | Quest: logical page indices, ascending |
//! | `selected_counts` | `[batch, kv_heads]` i32 | Quest: how many entries of `selected_pages` are valid |
//! | `q`, `out` (decode) | `[batch, q_heads, head_dim]` `T` | one query token per sequence |
//!
//! Token `t` of sequence `b` lives in physical page `page_table[b, t / page_size]`, slot
//! `t % page_size`. Logical page `j` of a sequence of length `L` holds
//! `min(page_size, L − j·page_size)` valid tokens; slots past that are garbage and must never
//! be read as keys. Query head `h` reads KV head `h / (q_heads / kv_heads)` (grouped-query).

use kiln_ir::dtype::DType;
use serde::{Deserialize, Serialize};

/// The shape parameters of a paged KV cache that a kernel is generated for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PagedKv {
    /// f16 or bf16.
    pub dtype: DType,
    pub q_heads: usize,
    pub kv_heads: usize,
    /// 64 or 128.
    pub head_dim: usize,
    /// Tokens per page (16 by default).
    pub page_size: usize,
}

impl PagedKv {
    /// Query heads per KV head.
    pub fn group_size(&self) -> usize {
        self.q_heads / self.kv_heads.max(1)
    }

    /// Elements of one (page, KV head) block of `k_pages` / `v_pages`.
    pub fn block_elements(&self) -> usize {
        self.page_size * self.head_dim
    }

    /// Elements of one whole page across KV heads.
    pub fn page_elements(&self) -> usize {
        self.kv_heads * self.block_elements()
    }

    /// A short tag for entry names: `f16_q32_kv8_d128_p16`.
    pub fn tag(&self) -> String {
        format!(
            "{}_q{}_kv{}_d{}_p{}",
            self.dtype, self.q_heads, self.kv_heads, self.head_dim, self.page_size
        )
    }

    /// Checks the layout parameters; `family` names the generator in the error.
    pub fn validate(&self, family: &'static str) -> Result<(), crate::SpecError> {
        let fail = |m: String| Err(crate::SpecError::new(family, m));
        if !matches!(self.dtype, DType::F16 | DType::BF16) {
            return fail(format!("dtype must be f16 or bf16, got {}", self.dtype));
        }
        if !matches!(self.head_dim, 64 | 128) {
            return fail(format!("head_dim must be 64 or 128, got {}", self.head_dim));
        }
        if self.kv_heads == 0 || self.q_heads == 0 || !self.q_heads.is_multiple_of(self.kv_heads) {
            return fail(format!(
                "q_heads ({}) must be a positive multiple of kv_heads ({})",
                self.q_heads, self.kv_heads
            ));
        }
        if self.page_size == 0 || !self.page_size.is_power_of_two() || self.page_size > 256 {
            return fail(format!(
                "page_size must be a power of two in 1..=256, got {}",
                self.page_size
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_bad_parameter() {
        let good = PagedKv {
            dtype: DType::F16,
            q_heads: 32,
            kv_heads: 8,
            head_dim: 128,
            page_size: 16,
        };
        assert!(good.validate("t").is_ok());
        assert_eq!(good.group_size(), 4);
        let bad = PagedKv {
            head_dim: 96,
            ..good
        };
        assert!(bad
            .validate("t")
            .unwrap_err()
            .to_string()
            .contains("head_dim"));
        let bad = PagedKv {
            q_heads: 30,
            ..good
        };
        assert!(bad
            .validate("t")
            .unwrap_err()
            .to_string()
            .contains("q_heads"));
        let bad = PagedKv {
            dtype: DType::F32,
            ..good
        };
        assert!(bad.validate("t").unwrap_err().to_string().contains("dtype"));
    }
}
