//! Quest page selection on the CPU: the reference for the Quest kernels and pass.
//!
//! Quest (arXiv 2406.10774) keeps, for every KV-cache page of `page_size` tokens and every KV
//! head, the element-wise maximum `M` and minimum `m` of the page's (post-RoPE) keys. At decode
//! time a query `q` scores each page with
//!
//! ```text
//! score(q, page) = Σᵢ max(qᵢ·Mᵢ, qᵢ·mᵢ)  =  q·(M+m)/2 + |q|·(M−m)/2
//! ```
//!
//! accumulated in f32. Because `mᵢ ≤ kᵢ ≤ Mᵢ` and `x ↦ qᵢ·x` is linear, every term is at least
//! `qᵢ·kᵢ`, so the score is an upper bound of `q·k` for every key `k` of the page. The bound
//! even holds exactly in floating point against an f32 dot product accumulated in the same
//! order, because rounding to nearest is monotone for products and sums. The second form
//! (midpoint plus half-range weighted by `|q|`) is the same number in exact arithmetic;
//! [`page_score_midpoint`] computes it and is what a kernel may prefer (two FMAs per element).
//!
//! **GQA.** One selection is made per KV head and shared by the query heads of its group; the
//! group's page score is the *sum* of the per-head scores. Summing keeps a valid bound for the
//! group's total: for every key `k` of the page, `Σ_h q_h·k ≤ Σ_h score(q_h, page)`, since each
//! term is bounded separately, so the summed score bounds the summed logit of the group (the
//! quantity whose large values mean "some head of the group attends here"). It costs the same
//! as scoring one head per query head and needs no extra state.
//!
//! **Selection.** With `P = ⌈length / page_size⌉` pages and a budget of
//! `B = budget_tokens / page_size` pages: when `P ≤ B` every page is selected (dense fallback);
//! otherwise the top `B − 1` pages by score among pages `0..P−1`, ties to the lower page index,
//! plus the last (current, possibly partial) page, which is always selected. The selection is
//! returned in ascending page order.
//!
//! [`sparse_decode`] then runs ordinary softmax attention over the tokens of the selected pages,
//! with the same arithmetic as [`crate::interp`]'s `AttentionDecode` (f64 dot products and
//! softmax), so selecting every page reproduces dense decode attention.
//!
//! Layouts here are those of the interpreter's `AttentionDecode` operands, not the paged device
//! layout: `q [B, 1, Hq, D]`, `k, v [B, C, Hkv, D]`, a length per sequence. The page of token
//! `j` is `j / page_size`.

use crate::tensor::{Tensor, TensorError};

/// Options of the Quest pass and kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QuestOptions {
    /// Tokens of KV cache attended per decode step (the current page included).
    pub budget_tokens: usize,
    /// Tokens per KV-cache page.
    pub page_size: usize,
    /// The first `skip_layers` layers keep dense attention.
    pub skip_layers: usize,
}

impl Default for QuestOptions {
    fn default() -> Self {
        QuestOptions {
            budget_tokens: 2048,
            page_size: 16,
            skip_layers: 2,
        }
    }
}

/// Why Quest options or operands were rejected.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum QuestError {
    /// An option is out of range; `field` names it.
    #[error("quest option `{field}` = {value}: {message}")]
    Option {
        field: &'static str,
        value: usize,
        message: String,
    },
    /// Operands of inconsistent shape or length.
    #[error("quest: {0}")]
    Shape(String),
    /// A result tensor that could not be made.
    #[error("quest: {0}")]
    Tensor(#[from] TensorError),
}

/// The largest page size accepted (a page's metadata must fit one block's shared memory).
pub const MAX_PAGE_SIZE: usize = 256;

impl QuestOptions {
    /// Checks the options; errors name the offending field.
    pub fn validate(&self) -> Result<(), QuestError> {
        let fail = |field, value, message: &str| {
            Err(QuestError::Option {
                field,
                value,
                message: message.to_string(),
            })
        };
        if self.page_size == 0 || self.page_size > MAX_PAGE_SIZE {
            return fail(
                "page_size",
                self.page_size,
                &format!("must be in 1..={MAX_PAGE_SIZE}"),
            );
        }
        if !self.page_size.is_power_of_two() {
            return fail("page_size", self.page_size, "must be a power of two");
        }
        if !self.budget_tokens.is_multiple_of(self.page_size) {
            return fail(
                "budget_tokens",
                self.budget_tokens,
                &format!("must be a multiple of page_size ({})", self.page_size),
            );
        }
        if self.budget_tokens < 2 * self.page_size {
            return fail(
                "budget_tokens",
                self.budget_tokens,
                &format!(
                    "must be at least two pages ({} tokens): one chosen by score and the current page",
                    2 * self.page_size
                ),
            );
        }
        Ok(())
    }

    /// The budget in pages, the current page included.
    pub fn budget_pages(&self) -> usize {
        self.budget_tokens / self.page_size
    }

    /// Whether layer `layer` (0-based) uses Quest rather than dense attention.
    pub fn applies_to_layer(&self, layer: usize) -> bool {
        layer >= self.skip_layers
    }
}

/// Number of pages holding `length` tokens.
pub fn page_count(length: usize, page_size: usize) -> usize {
    length.div_ceil(page_size)
}

/// Quest metadata of one sequence: element-wise max and min of the keys of each page, per KV
/// head, over the page's valid tokens only. `max` and `min` are `[pages, kv_heads, head_dim]`.
#[derive(Clone, Debug, PartialEq)]
pub struct PageMeta {
    pub page_size: usize,
    pub pages: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub max: Vec<f32>,
    pub min: Vec<f32>,
}

impl PageMeta {
    /// Metadata of the first `length` rows of `keys`, laid out `[rows, kv_heads, head_dim]`
    /// (rows at or beyond `length` are never read).
    pub fn from_keys(
        keys: &[f32],
        length: usize,
        kv_heads: usize,
        head_dim: usize,
        page_size: usize,
    ) -> Result<PageMeta, QuestError> {
        let row = kv_heads * head_dim;
        if page_size == 0 || row == 0 {
            return Err(QuestError::Shape(
                "page_size, kv_heads and head_dim must be positive".into(),
            ));
        }
        if keys.len() < length * row {
            return Err(QuestError::Shape(format!(
                "{} key values hold fewer than {length} rows of {row}",
                keys.len()
            )));
        }
        let pages = page_count(length, page_size);
        let mut max = vec![f32::NEG_INFINITY; pages * row];
        let mut min = vec![f32::INFINITY; pages * row];
        for j in 0..length {
            let page = j / page_size;
            let key = &keys[j * row..(j + 1) * row];
            let (hi, lo) = (
                &mut max[page * row..(page + 1) * row],
                &mut min[page * row..(page + 1) * row],
            );
            for ((h, l), &k) in hi.iter_mut().zip(lo.iter_mut()).zip(key) {
                *h = h.max(k);
                *l = l.min(k);
            }
        }
        Ok(PageMeta {
            page_size,
            pages,
            kv_heads,
            head_dim,
            max,
            min,
        })
    }

    /// `(max, min)` of page `page`, KV head `kv`.
    pub fn bounds(&self, page: usize, kv: usize) -> (&[f32], &[f32]) {
        let base = (page * self.kv_heads + kv) * self.head_dim;
        (
            &self.max[base..base + self.head_dim],
            &self.min[base..base + self.head_dim],
        )
    }
}

/// `Σᵢ max(qᵢ·Mᵢ, qᵢ·mᵢ)`, accumulated in f32 in index order: an upper bound of `q·k` for every
/// `k` with `min ≤ k ≤ max` element-wise.
pub fn page_score(q: &[f32], max: &[f32], min: &[f32]) -> f32 {
    let mut sum = 0.0f32;
    for ((&qi, &hi), &lo) in q.iter().zip(max).zip(min) {
        sum += (qi * hi).max(qi * lo);
    }
    sum
}

/// The same score in the form `q·(M+m)/2 + |q|·(M−m)/2` (equal in exact arithmetic; in f32 it
/// may differ from [`page_score`] by rounding).
pub fn page_score_midpoint(q: &[f32], max: &[f32], min: &[f32]) -> f32 {
    let mut sum = 0.0f32;
    for ((&qi, &hi), &lo) in q.iter().zip(max).zip(min) {
        sum += qi * ((hi + lo) * 0.5) + qi.abs() * ((hi - lo) * 0.5);
    }
    sum
}

/// Page scores of KV head `kv` for the query heads of its group: `queries` holds the group's
/// `group` query heads, `[group, head_dim]`; the score of a page is the sum of the per-head
/// scores (see the module doc for why this stays a bound).
pub fn group_scores(meta: &PageMeta, kv: usize, queries: &[f32]) -> Vec<f32> {
    let d = meta.head_dim;
    (0..meta.pages)
        .map(|page| {
            let (hi, lo) = meta.bounds(page, kv);
            queries.chunks_exact(d).map(|q| page_score(q, hi, lo)).sum()
        })
        .collect()
}

/// Pages to attend given the scores of all `scores.len()` pages (the last is the current page):
/// every page when they fit the budget, else the top `budget_pages − 1` of the earlier pages
/// (ties to the lower index) plus the last page. Ascending page order.
pub fn select_pages(scores: &[f32], budget_pages: usize) -> Vec<usize> {
    let pages = scores.len();
    if pages <= budget_pages {
        return (0..pages).collect();
    }
    let mut order: Vec<usize> = (0..pages - 1).collect();
    // Descending score, ties to the lower index; NaN scores sort last.
    order.sort_by(|&a, &b| {
        let (x, y) = (scores[a], scores[b]);
        match (x.is_nan(), y.is_nan()) {
            (true, true) => a.cmp(&b),
            (true, false) => std::cmp::Ordering::Greater,
            (false, true) => std::cmp::Ordering::Less,
            (false, false) => y.total_cmp(&x).then(a.cmp(&b)),
        }
    });
    let mut chosen: Vec<usize> = order[..budget_pages.saturating_sub(1)].to_vec();
    chosen.push(pages - 1);
    chosen.sort_unstable();
    chosen
}

/// Per sequence, per KV head: the selected pages (ascending).
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    pub page_size: usize,
    /// `pages[b][kv]`.
    pub pages: Vec<Vec<Vec<usize>>>,
}

impl Selection {
    /// Every page of every sequence (dense attention).
    pub fn all(lengths: &[usize], kv_heads: usize, page_size: usize) -> Selection {
        let pages = lengths
            .iter()
            .map(|&l| vec![(0..page_count(l, page_size)).collect(); kv_heads])
            .collect();
        Selection { page_size, pages }
    }
}

/// Checks decode operands: `q [B, 1, Hq, D]`, `k, v [B, C, Hkv, D]`, `lengths` of `B` in
/// `1..=C`, `Hq` a multiple of `Hkv`. Returns `(B, C, Hq, Hkv, D)`.
fn decode_dims(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lengths: &[usize],
) -> Result<(usize, usize, usize, usize, usize), QuestError> {
    let bad = |m: String| Err(QuestError::Shape(m));
    if q.shape.len() != 4 || k.shape.len() != 4 || k.shape != v.shape {
        return bad(format!(
            "expected q [B, 1, Hq, D] and k, v [B, C, Hkv, D], got q {:?}, k {:?}, v {:?}",
            q.shape, k.shape, v.shape
        ));
    }
    let (b, s, hq, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let (c, hkv) = (k.shape[1], k.shape[2]);
    if s != 1 {
        return bad(format!(
            "quest is decode only: one new token per sequence, got {s}"
        ));
    }
    if k.shape[0] != b || k.shape[3] != d || hkv == 0 || hq % hkv != 0 {
        return bad(format!(
            "q {:?} does not match k, v {:?} (batch, head_dim, Hq a multiple of Hkv)",
            q.shape, k.shape
        ));
    }
    if lengths.len() != b {
        return bad(format!("{} lengths for batch {b}", lengths.len()));
    }
    if let Some((i, &l)) = lengths.iter().enumerate().find(|(_, &l)| l == 0 || l > c) {
        return bad(format!("sequence {i} has length {l}, expected 1..={c}"));
    }
    Ok((b, c, hq, hkv, d))
}

/// Quest selection for a decode step: metadata of each sequence's first `lengths[b]` keys,
/// group scores of the new query, top-K pages per KV head (dense fallback when the sequence fits
/// the budget).
pub fn select(
    q: &Tensor,
    k: &Tensor,
    lengths: &[usize],
    options: &QuestOptions,
) -> Result<Selection, QuestError> {
    options.validate()?;
    let (b, c, hq, hkv, d) = decode_dims(q, k, k, lengths)?;
    let group = hq / hkv;
    let row = hkv * d;
    let mut pages = Vec::with_capacity(b);
    for (batch, &length) in lengths.iter().enumerate() {
        let keys = &k.data[batch * c * row..(batch + 1) * c * row];
        let meta = PageMeta::from_keys(keys, length, hkv, d, options.page_size)?;
        let per_kv = (0..hkv)
            .map(|kv| {
                let base = (batch * hq + kv * group) * d;
                let scores = group_scores(&meta, kv, &q.data[base..base + group * d]);
                select_pages(&scores, options.budget_pages())
            })
            .collect();
        pages.push(per_kv);
    }
    Ok(Selection {
        page_size: options.page_size,
        pages,
    })
}

/// Decode attention over the selected pages only: for query head `h` of sequence `b`, softmax
/// attention (with `scale`) over the valid tokens (`j < lengths[b]`) of the pages selected for
/// KV head `h / (Hq / Hkv)`. The arithmetic is that of the interpreter's attention (f64 dot
/// products and softmax, f32 output), so `Selection::all` reproduces `AttentionDecode`.
pub fn sparse_decode(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lengths: &[usize],
    scale: f32,
    selection: &Selection,
) -> Result<Tensor, QuestError> {
    let (b, c, hq, hkv, d) = decode_dims(q, k, v, lengths)?;
    if selection.pages.len() != b || selection.pages.iter().any(|s| s.len() != hkv) {
        return Err(QuestError::Shape(format!(
            "selection does not cover {b} sequences × {hkv} KV heads"
        )));
    }
    let group = hq / hkv;
    let page_size = selection.page_size;
    let mut out = vec![0.0f32; q.len()];
    for (batch, &length) in lengths.iter().enumerate() {
        for h in 0..hq {
            let kv = h / group;
            let tokens: Vec<usize> = selection.pages[batch][kv]
                .iter()
                .flat_map(|&p| p * page_size..((p + 1) * page_size).min(length))
                .collect();
            if tokens.is_empty() {
                return Err(QuestError::Shape(format!(
                    "sequence {batch}, KV head {kv}: no valid token selected"
                )));
            }
            let q_base = (batch * hq + h) * d;
            let query = &q.data[q_base..q_base + d];
            let row = |j: usize| ((batch * c + j) * hkv + kv) * d;
            let scores: Vec<f64> = tokens
                .iter()
                .map(|&j| scale as f64 * dot(query, &k.data[row(j)..row(j) + d]))
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for e in 0..d {
                let sum: f64 = tokens
                    .iter()
                    .zip(&weights)
                    .map(|(&j, w)| w * v.data[row(j) + e] as f64)
                    .sum();
                out[q_base + e] = (sum / total) as f32;
            }
        }
    }
    Tensor::new(q.dtype, &q.shape, out).map_err(QuestError::Tensor)
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quest_defaults_are_valid() {
        let o = QuestOptions::default();
        assert_eq!((o.budget_tokens, o.page_size, o.skip_layers), (2048, 16, 2));
        o.validate().unwrap();
        assert_eq!(o.budget_pages(), 128);
        assert!(!o.applies_to_layer(1) && o.applies_to_layer(2));
    }

    #[test]
    fn quest_score_hand_computed() {
        // q = (1, −2), M = (3, 1), m = (−1, −4): max(3, −1) + max(−2, 8) = 3 + 8 = 11.
        // Midpoint form: q·(1, −1.5) + |q|·(2, 2.5) = (1 + 3) + (2 + 5) = 11.
        let (q, hi, lo) = ([1.0, -2.0], [3.0, 1.0], [-1.0, -4.0]);
        assert_eq!(page_score(&q, &hi, &lo), 11.0);
        assert_eq!(page_score_midpoint(&q, &hi, &lo), 11.0);
    }

    #[test]
    fn quest_select_ties_and_current_page() {
        // 6 pages, budget 3: top 2 of pages 0..5 plus page 5. Pages 1, 2, 4 tie at 5.0.
        let scores = [1.0, 5.0, 5.0, 0.0, 5.0, -9.0];
        assert_eq!(select_pages(&scores, 3), vec![1, 2, 5]);
        assert_eq!(select_pages(&scores, 6), vec![0, 1, 2, 3, 4, 5]);
    }
}
