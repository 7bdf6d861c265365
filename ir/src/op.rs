//! The operations of the tensor IR and their meaning.
//!
//! Owns the [`Op`] enum: one variant per operation, each documented with its operands, its
//! results and its semantics. These docs are the contract that the reference interpreter
//! (`interp`) implements and that every generated kernel must match. Type rules live in
//! `verify`, execution in `interp`; this file holds no logic beyond naming.
//!
//! Conventions: linear weights are `[out, in]` (Hugging Face layout, `in` contiguous);
//! attention tensors are `[batch, tokens, heads, head_dim]`; elementwise binary ops broadcast
//! numpy-style; integer operands (token ids, positions, indices) are `i32`.

use crate::dtype::DType;
use crate::shape::Shape;
use serde::{Deserialize, Serialize};

/// What a graph input is, so that later passes know what may be placed, quantised or cached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputKind {
    /// Per-call data: token ids, positions, sequence lengths, activations.
    Activation,
    /// A model parameter, named as in Hugging Face checkpoints.
    Weight,
    /// State carried between calls, such as a KV cache; the graph returns its new value.
    State,
}

/// How a tensor is quantised: integer width, group size along the last axis, symmetry.
///
/// Symmetric: per group, `scale = clip · max|x| / qmax` (`qmax` = 7 for 4 bits, 127 for
/// 8 bits), `q = clamp(round(x / scale), -qmax - 1, qmax)`, `x ≈ q · scale`.
///
/// Asymmetric: per group, `scale = (max − min) / (2^bits − 1)`,
/// `q = clamp(round((x − min) / scale), 0, 2^bits − 1) − 2^(bits−1)` (stored signed),
/// `x ≈ (q + 2^(bits−1)) · scale + min`; the group minimum is returned as the zero point.
///
/// A group whose scale would be zero (all equal values) uses scale 1.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantScheme {
    /// 4 or 8.
    pub bits: u8,
    /// Elements per scale along the last axis; must divide it.
    pub group_size: usize,
    pub symmetric: bool,
    /// Fraction of the absolute maximum mapped to `qmax` (1.0 = no clipping); symmetric only.
    pub clip: f32,
}

impl QuantScheme {
    /// The storage dtype of quantised values.
    pub fn value_dtype(&self) -> DType {
        if self.bits == 4 {
            DType::I4
        } else {
            DType::I8
        }
    }
}

/// One operation. Operands are listed in order as `(name shape dtype)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// A graph input of the declared type. No operands.
    Input {
        name: String,
        kind: InputKind,
        dtype: DType,
        shape: Shape,
    },
    /// A scalar constant (shape `[]`), broadcast by the elementwise ops.
    Constant { value: f32, dtype: DType },

    /// `(table [V, H] float, ids [..] i32) → [.., H]`: row `ids[i]` of the table.
    Embedding,
    /// `(x [.., H], weight [H]) → [.., H]`: `x / sqrt(mean(x²) + eps) · weight`.
    RmsNorm { eps: f32 },
    /// `(x [.., K], weight [N, K]) → [.., N]`: `x · weightᵀ`, accumulated in f64.
    Linear,
    /// `(a [.., M, K], b [.., K, N]) → [.., M, N]`: batched matrix product, equal batch dims.
    MatMul,
    /// `(x [B, S, heads, D], positions [B, S] i32) → [B, S, heads, D]`: rotary position
    /// embedding, Hugging Face "rotate half" pairing of element `i` with `i + D/2`, angle
    /// `position · theta^(−2i/D)`.
    Rope { theta: f32 },
    /// `(q [B, S, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, D]) → [B, S, Hq, D]`: softmax
    /// attention with `scale`, query head `h` reading KV head `h / (Hq / Hkv)` (grouped-query).
    /// When `causal`, query `i` sees keys `j ≤ i + T − S` (the queries are the last `S` of `T`).
    Attention { causal: bool, scale: f32 },
    /// `(q [B, S, Hq, D], k_cache [B, C, Hkv, D], v_cache [B, C, Hkv, D], lengths [B] i32)
    /// → [B, S, Hq, D]`: attention of new tokens against a KV cache that already holds them.
    /// Sequence `b` has `lengths[b]` valid cache rows; its query `i` sees keys
    /// `j < lengths[b] − (S − 1 − i)`. Grouped-query as in `Attention`.
    AttentionDecode { scale: f32 },
    /// `(q [B, 1, Hq, D], k_cache [B, C, Hkv, D], v_cache [B, C, Hkv, D], lengths [B] i32)
    /// → [B, 1, Hq, D]`: Quest decode attention (arXiv 2406.10774), one new token per
    /// sequence (`S` must be the constant 1; prefill stays dense). Sequence `b` has
    /// `L = lengths[b]` valid cache rows (`1 ≤ L ≤ C`) in pages of `page_size` tokens (token
    /// `j` is in page `j / page_size`; the last page may be partial). Per KV head: each page's
    /// element-wise max `M` and min `m` of its valid keys, the page score summed over the
    /// query heads of the KV group `Σ_h Σᵢ max(q_hᵢ·Mᵢ, q_hᵢ·mᵢ)` (f32), then the top
    /// `budget_tokens / page_size − 1` earlier pages by score (ties to the lower page) plus
    /// the last (current) page; every page when the sequence has no more pages than that
    /// budget. The result is `AttentionDecode { scale }` restricted to the valid keys of the
    /// selected pages: exactly `ir::quest::select` then `ir::quest::sparse_decode`, so a
    /// budget covering the whole sequence equals `AttentionDecode`. `page_size` is a power of
    /// two in `1..=256`; `budget_tokens` a multiple of it, at least two pages.
    QuestAttentionDecode {
        scale: f32,
        budget_tokens: usize,
        page_size: usize,
    },
    /// `(cache [B, C, Hkv, D], new [B, S, Hkv, D], start [B] i32) → [B, C, Hkv, D]`: the cache
    /// with rows `start[b] .. start[b] + S` of sequence `b` replaced by `new`. Writing past
    /// capacity `C` is an error.
    KvAppend,

    /// `x → x · sigmoid(x)`.
    Silu,
    /// `x → 1 / (1 + e^(−x))`.
    Sigmoid,
    /// `(a, b) → a + b`, broadcast.
    Add,
    /// `(a, b) → a · b`, broadcast.
    Mul,
    /// `x [.., N] → [.., N]`: softmax over the last axis.
    Softmax,
    /// `x [.., N] → (values [.., k], indices [.., k] i32)`: the `k` largest along the last
    /// axis in descending order; ties go to the lower index.
    TopK { k: usize },

    /// `logits [.., E] → (weights [.., k] f32, experts [.., k] i32)`: softmax over experts
    /// (f64), the top `k`, renormalised to sum 1 when `normalize`. The leading dimensions
    /// (`..`) index tokens; below, `t` is a token's row-major index over them and the slot of
    /// its `j`-th choice is `t·k + j`.
    MoeRouter { top_k: usize, normalize: bool },
    /// `experts [.., k] i32 → (order [.., k] i32, offsets [E + 1] i32)`: the slots sorted by
    /// expert (stable), read row-major, and where each expert's run of positions starts.
    MoeDispatch { num_experts: usize },
    /// `(x [.., H], order [.., k] i32, offsets [E + 1] i32, then for each expert e:
    /// gate_e [I, H], up_e [I, H], down_e [H, I]) → y [.., k, H]`: row `p` (row-major) of `y`
    /// is `down_e · (silu(gate_e · x_t) ⊙ (up_e · x_t))` where `order[p] = t·k + j` and
    /// `offsets[e] ≤ p < offsets[e + 1]`. Rows stay in dispatch order (a grouped GEMM); the
    /// gate and up products are rounded to the dtype before the activation, as a kernel that
    /// stores them would.
    MoeExpertFfn { num_experts: usize },
    /// `(y [.., k, H], order [.., k] i32, weights [.., k]) → [.., H]`:
    /// `out[t] = Σⱼ weights[t, j] · y[p]` where `order[p] = t·k + j`.
    MoeCombine,

    /// `x → x` with a new shape of the same element count.
    Reshape { shape: Shape },
    /// `x → x` with axes permuted: output axis `i` is input axis `perm[i]`.
    Transpose { perm: Vec<usize> },
    /// `x → x[.., start..end, ..]` along `axis`. Negative bounds count from the end; a missing
    /// end means the end of the axis.
    Slice {
        axis: usize,
        start: i64,
        end: Option<i64>,
    },
    /// `(x₀, x₁, …) → concatenation along `axis``.
    Concat { axis: usize },
    /// `x → x` converted to `to` (float → int rounds to nearest even and saturates).
    Cast { to: DType },
    /// `x [.., K] float → (q [.., K] i4|i8, scale [.., K/g] f16[, zero [.., K/g] f16])`
    /// per [`QuantScheme`]; `zero` only when asymmetric.
    Quantize { scheme: QuantScheme },
    /// `(q, scale[, zero]) → [.., K] float of dtype `to``, the inverse map of `Quantize`.
    Dequantize { scheme: QuantScheme, to: DType },

    // Fused forms. The rewriter (`rewrite`) produces them from the plain ops above; each is
    // defined as the plain computation it replaces, with intermediates kept in f32 (a kernel
    // keeps them in registers) and the result rounded once to its dtype.
    /// `(x₀, x₁, …) → y`: an elementwise program over operands of one float dtype, each
    /// broadcast numpy-style to `y`'s shape (the broadcast of all operand shapes). `steps` are
    /// evaluated in order per element in f32 exactly as the plain ops compute them (`Add`,
    /// `Mul`, `Silu` = `v / (1 + e^(−v))`, `Sigmoid`); a step reads operands or earlier steps,
    /// every operand and every step but the last is used, and the last step is the result,
    /// rounded to the dtype. Intermediates are not rounded.
    FusedMap { steps: Vec<MapStep> },
    /// `(x [.., H], w [2I, H]) → [.., I]`: a SwiGLU MLP's first half as one GEMM over the gate
    /// and up weights concatenated (`w = [gate; up]`): `g = x · w[..I]ᵀ`, `u = x · w[I..]ᵀ`
    /// (f64 accumulation, each rounded to the dtype), then `silu(g) · u` in f32.
    SwiGluLinear,
    /// `(x [.., K], w [N, K], addend) → [.., N]`: `x · wᵀ` (f64 accumulation, rounded to the
    /// dtype) `+ addend`, a linear with its epilogue fused: a bias `[N]` or a residual
    /// `[.., N]`. The addend broadcasts to the result's shape and must not enlarge it.
    LinearAdd,
    /// `(x [.., H], residual [.., H], weight [H]) → (sum [.., H], normed [.., H])`: a residual
    /// add and the RMSNorm that reads it: `sum = x + residual` (rounded to the dtype) and
    /// `normed = RmsNorm { eps }(sum, weight)`.
    AddRmsNorm { eps: f32 },
    /// `(x [.., H], w [E, H]) → (weights [.., k] f32, experts [.., k] i32)`: an MoE router
    /// with its logits' linear fused: `logits = x · wᵀ` (f64 accumulation, rounded to `x`'s
    /// dtype, exactly `Linear`), then `MoeRouter { top_k, normalize }` on them.
    MoeRouterLinear { top_k: usize, normalize: bool },
    /// `(x [.., K] float, q [N, K] i4|i8, scale [N, K/g] f16[, zero [N, K/g] f16]) → [.., N]`:
    /// `x · wᵀ` with `w = Dequantize { scheme, to: x's dtype }(q, scale[, zero])` (rounded to
    /// the dtype), accumulated in f64; a dequantize fused into its matmul.
    QuantizedLinear { scheme: QuantScheme },
    /// `(x [.., K] float, permutation [K] i32, int4 [N, K−o] i4, int4_scales [N, (K−o)/g] f16,
    /// int8 [N, o] i8, int8_scales [N, 1] f16) → [.., N]`: Atom's W4A4 linear with `o =
    /// outliers` INT8 channels (`crate::atom`): `x`'s channels reordered by `permutation`,
    /// quantized per token (INT4 groups of `group_size` with `activation_clip`, INT8 for the
    /// last `o`), integer products per group times both scales, summed in f64 and rounded to
    /// `x`'s dtype.
    AtomLinear {
        group_size: usize,
        outliers: usize,
        activation_clip: f32,
    },
    /// `(scores [B, H, S, T] float[, lengths [B] i32]) → [B, 1, S, T]`: the additive mask of
    /// causal attention, 0 where query `i` of sequence `b` sees key `j` and −∞ elsewhere. It
    /// sees `j < L − (S − 1 − i)` with `L = lengths[b]` (the rule of `AttentionDecode`; needs
    /// `S ≤ L ≤ T`), or `L = T` without lengths (the rule of causal `Attention`). Only the
    /// shape of `scores` is read.
    CausalMask,
}

/// One step of a [`Op::FusedMap`] program; steps refer to operands and earlier steps by index.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum MapStep {
    /// Operand `index` of the node, broadcast to the result shape.
    Operand { index: usize },
    /// A scalar constant (already rounded to the dtype).
    Constant { value: f32 },
    /// `a + b`.
    Add { a: usize, b: usize },
    /// `a · b`.
    Mul { a: usize, b: usize },
    /// `x · sigmoid(x)`.
    Silu { x: usize },
    /// `1 / (1 + e^(−x))`.
    Sigmoid { x: usize },
}

impl Op {
    /// The op's short name, as used in reports and error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Constant { .. } => "constant",
            Op::Embedding => "embedding",
            Op::RmsNorm { .. } => "rms_norm",
            Op::Linear => "linear",
            Op::MatMul => "matmul",
            Op::Rope { .. } => "rope",
            Op::Attention { .. } => "attention",
            Op::AttentionDecode { .. } => "attention_decode",
            Op::QuestAttentionDecode { .. } => "quest_attention_decode",
            Op::KvAppend => "kv_append",
            Op::Silu => "silu",
            Op::Sigmoid => "sigmoid",
            Op::Add => "add",
            Op::Mul => "mul",
            Op::Softmax => "softmax",
            Op::TopK { .. } => "top_k",
            Op::MoeRouter { .. } => "moe_router",
            Op::MoeDispatch { .. } => "moe_dispatch",
            Op::MoeExpertFfn { .. } => "moe_expert_ffn",
            Op::MoeCombine => "moe_combine",
            Op::Reshape { .. } => "reshape",
            Op::Transpose { .. } => "transpose",
            Op::Slice { .. } => "slice",
            Op::Concat { .. } => "concat",
            Op::Cast { .. } => "cast",
            Op::Quantize { .. } => "quantize",
            Op::Dequantize { .. } => "dequantize",
            Op::FusedMap { .. } => "fused_map",
            Op::SwiGluLinear => "swiglu_linear",
            Op::LinearAdd => "linear_add",
            Op::AddRmsNorm { .. } => "add_rms_norm",
            Op::MoeRouterLinear { .. } => "moe_router_linear",
            Op::AtomLinear { .. } => "atom_linear",
            Op::QuantizedLinear { .. } => "quantized_linear",
            Op::CausalMask => "causal_mask",
        }
    }

    /// Every op name, for documentation and coverage tests.
    pub const NAMES: [&'static str; 35] = [
        "input",
        "constant",
        "embedding",
        "rms_norm",
        "linear",
        "matmul",
        "rope",
        "attention",
        "attention_decode",
        "quest_attention_decode",
        "kv_append",
        "silu",
        "sigmoid",
        "add",
        "mul",
        "softmax",
        "top_k",
        "moe_router",
        "moe_dispatch",
        "moe_expert_ffn",
        "moe_combine",
        "reshape",
        "transpose",
        "slice",
        "concat",
        "cast",
        "quantize",
        "dequantize",
        "fused_map",
        "swiglu_linear",
        "linear_add",
        "add_rms_norm",
        "moe_router_linear",
        "quantized_linear",
        "causal_mask",
    ];
}
