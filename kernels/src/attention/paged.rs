//! The paged KV-cache layout every attention and Quest kernel reads, in one place.
//!
//! Owns [`PagedKv`], the shape parameters a paged kernel is generated for, [`PageOrder`], and
//! the layout contract below. Generators take a `PagedKv` instead of repeating the layout; the
//! runtime's `runtime::kv` allocates buffers in exactly this layout. The byte strides of a
//! K/V page, of a KV head within a page and of a token slot within a page are defined here
//! ([`PagedKv::page_stride_bytes`], [`PagedKv::head_stride_bytes`],
//! [`PagedKv::slot_stride_bytes`]) and every kernel computes K/V addresses from them; the one
//! PTX helper here, [`PagedKv::emit_kv_offset`], is that address computation.
//!
//! Device buffers (row-major, `T` = the cache dtype, f16 or bf16):
//!
//! | buffer | shape | meaning |
//! |---|---|---|
//! | `k_pages`, `v_pages` ([`PageOrder::HeadMajor`], the default) | `[num_pages, kv_heads, page_size, head_dim]` `T` | one page = `page_size` tokens; a (page, KV head) block is contiguous |
//! | `k_pages`, `v_pages` ([`PageOrder::TokenMajor`]) | `[num_pages, page_size, kv_heads, head_dim]` `T` | one page = `page_size` tokens; a token's row of every KV head is contiguous |
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
//!
//! **Token-major pages and the contiguous cache.** With [`PageOrder::TokenMajor`] and the
//! identity page table `page_table[b, j] = b·max_pages + j` (`max_pages = capacity /
//! page_size`), `k_pages` / `v_pages` are exactly the model graph's contiguous cache
//! `[batch, capacity, kv_heads, head_dim]`, so the paged kernels read it unchanged. Page
//! metadata (`page_max` / `page_min`) has the same layout in both orders.

use kiln_codegen::ptx::{KernelBuilder, Reg, U32, U64};
use kiln_ir::dtype::DType;
use serde::{Deserialize, Serialize};

/// Bytes of one cache element (f16 or bf16).
const ELEMENT_BYTES: usize = 2;

/// The head dimensions the paged generators take ([`PagedKv::validate`]).
pub const HEAD_DIMS: [usize; 3] = [32, 64, 128];

/// The order of a K/V page's dimensions (see the module doc's table).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PageOrder {
    /// `[num_pages, kv_heads, page_size, head_dim]`: a (page, KV head) block is contiguous.
    #[default]
    HeadMajor,
    /// `[num_pages, page_size, kv_heads, head_dim]`: with the identity page table, the
    /// contiguous cache `[batch, capacity, kv_heads, head_dim]`.
    TokenMajor,
}

/// The shape parameters of a paged KV cache that a kernel is generated for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PagedKv {
    /// f16 or bf16.
    pub dtype: DType,
    pub q_heads: usize,
    pub kv_heads: usize,
    /// 32, 64 or 128 (see [`PagedKv::validate`]).
    pub head_dim: usize,
    /// Tokens per page (16 by default).
    pub page_size: usize,
    /// The order of a K/V page's dimensions (head-major unless given).
    #[serde(default)]
    pub order: PageOrder,
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

    /// Bytes of one K/V row (one token of one KV head).
    pub fn row_bytes(&self) -> usize {
        self.head_dim * ELEMENT_BYTES
    }

    /// Byte stride between consecutive physical pages of `k_pages` / `v_pages` (both orders).
    pub fn page_stride_bytes(&self) -> usize {
        self.page_elements() * ELEMENT_BYTES
    }

    /// Byte stride between consecutive KV heads within a page: `page_size · head_dim · 2`
    /// head-major, `head_dim · 2` token-major.
    pub fn head_stride_bytes(&self) -> usize {
        match self.order {
            PageOrder::HeadMajor => self.page_size * self.row_bytes(),
            PageOrder::TokenMajor => self.row_bytes(),
        }
    }

    /// Byte stride between consecutive token slots within a page: `head_dim · 2` head-major,
    /// `kv_heads · head_dim · 2` token-major.
    pub fn slot_stride_bytes(&self) -> usize {
        match self.order {
            PageOrder::HeadMajor => self.row_bytes(),
            PageOrder::TokenMajor => self.kv_heads * self.row_bytes(),
        }
    }

    /// Byte offset in `k_pages` / `v_pages` of row (`physical` page, `kv_head`, `slot`):
    /// `physical·page_stride + kv_head·head_stride + slot·slot_stride`, emitted as
    /// `(physical·(page_stride / head_stride) + kv_head)·head_stride + slot·slot_stride`
    /// (a 64-bit result; the page stride is a multiple of the head stride in both orders).
    pub fn emit_kv_offset(
        &self,
        k: &mut KernelBuilder,
        physical: Reg<U32>,
        kv_head: Reg<U32>,
        slot: Reg<U32>,
    ) -> Reg<U64> {
        let heads_per_page = (self.page_stride_bytes() / self.head_stride_bytes()) as u32;
        let block = k.mul_add(physical, heads_per_page, kv_head);
        let block_offset = k.mul_wide(block, self.head_stride_bytes() as u32);
        k.mad_wide(slot, self.slot_stride_bytes() as u32, block_offset)
    }

    /// A short tag for entry names: `f16_q32_kv8_d128_p16`, with `_tm` appended for
    /// token-major pages.
    pub fn tag(&self) -> String {
        let order = match self.order {
            PageOrder::HeadMajor => "",
            PageOrder::TokenMajor => "_tm",
        };
        format!(
            "{}_q{}_kv{}_d{}_p{}{order}",
            self.dtype, self.q_heads, self.kv_heads, self.head_dim, self.page_size
        )
    }

    /// Checks the layout parameters; `family` names the generator in the error.
    ///
    /// `head_dim` is one of [`HEAD_DIMS`]: every paged generator (decode partial and merge,
    /// prefill, KV append, Quest estimate and page bounds) is written for rows of
    /// `head_dim / 8` 16-byte chunks with `head_dim / 8` a power of two dividing 32 (lane
    /// groups of a warp) and `head_dim / 16` whole `mma` k-steps; a generator that needs
    /// more checks it in its own spec.
    pub fn validate(&self, family: &'static str) -> Result<(), crate::SpecError> {
        let fail = |m: String| Err(crate::SpecError::new(family, m));
        if !matches!(self.dtype, DType::F16 | DType::BF16) {
            return fail(format!("dtype must be f16 or bf16, got {}", self.dtype));
        }
        if !HEAD_DIMS.contains(&self.head_dim) {
            return fail(format!(
                "head_dim must be 32, 64 or 128, got {}",
                self.head_dim
            ));
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
            order: PageOrder::HeadMajor,
        };
        assert!(good.validate("t").is_ok());
        assert_eq!(good.group_size(), 4);
        for head_dim in HEAD_DIMS {
            assert!(
                PagedKv { head_dim, ..good }.validate("t").is_ok(),
                "{head_dim}"
            );
        }
        for head_dim in [0, 8, 16, 48, 96, 256] {
            let message = PagedKv { head_dim, ..good }
                .validate("t")
                .unwrap_err()
                .to_string();
            assert!(
                message.contains(&format!("head_dim must be 32, 64 or 128, got {head_dim}")),
                "{message}"
            );
        }
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

    #[test]
    fn strides_and_tags_of_both_orders() {
        let head = PagedKv {
            dtype: DType::F16,
            q_heads: 32,
            kv_heads: 8,
            head_dim: 128,
            page_size: 16,
            order: PageOrder::HeadMajor,
        };
        let token = PagedKv {
            order: PageOrder::TokenMajor,
            ..head
        };
        assert_eq!(head.tag(), "f16_q32_kv8_d128_p16");
        assert_eq!(token.tag(), "f16_q32_kv8_d128_p16_tm");
        for l in [head, token] {
            assert_eq!(l.page_stride_bytes(), 8 * 16 * 128 * 2);
        }
        assert_eq!(
            (head.head_stride_bytes(), head.slot_stride_bytes()),
            (16 * 256, 256)
        );
        assert_eq!(
            (token.head_stride_bytes(), token.slot_stride_bytes()),
            (256, 8 * 256)
        );
        // Token-major with the identity table: row (b, t, h) of [batch, capacity, kv, d].
        let (capacity, b, t, h) = (64, 1, 37, 5);
        let physical = b * (capacity / 16) + t / 16;
        let offset = physical * token.page_stride_bytes()
            + h * token.head_stride_bytes()
            + (t % 16) * token.slot_stride_bytes();
        assert_eq!(offset, ((b * capacity + t) * 8 + h) * 256);
        let json = r#"{"dtype":"f16","q_heads":32,"kv_heads":8,"head_dim":128,"page_size":16}"#;
        assert_eq!(serde_json::from_str::<PagedKv>(json).unwrap(), head);
        assert_eq!(
            serde_json::to_value(PageOrder::TokenMajor).unwrap(),
            "token_major"
        );
    }
}
