//! CPU steps: the Cranelift kernels a plan kernel placed on the host runs as.
//!
//! Owns [`CpuStep`] and [`cpu_step`], the choice of CPU kernels for a plan kernel's
//! [`Family`]: a linear is the Cranelift dot kernel (`x · Wᵀ`, both K-contiguous) followed by
//! its epilogue (a map kernel adding the bias or the residual, or `silu(gate) · up` over the
//! two halves of the product of the concatenated `[gate; up]` weights); an elementwise map
//! is one map kernel (broadcast operands are first expanded to the result's shape); RMSNorm
//! is the RMSNorm kernel (with the residual add fused in f32, or, in a half dtype, the sum
//! rounded to the dtype first and then the plain kernel, as the interpreter rounds it); RoPE
//! is the rotation kernel over cos/sin tables the runtime builds per call; attention (causal
//! prefill, decode) is the runtime's CPU attention over the Cranelift dot and softmax kernels;
//! the MoE experts (`MoeExpertFfn`) gather each expert's routed rows and run its SwiGLU FFN as
//! two dot kernels, a map and a dot kernel — the CPU expert Fiddler places; the MoE router is
//! the softmax kernel (in f64, as the interpreter computes it) followed by the top-k choice
//! (with its linear fused, the dot kernel's logits first, rounded to the dtype), and dispatch and combine are the runtime's routing bookkeeping (a counting sort, a
//! weighted sum of each token's expert rows). Steps
//! that only move data — the embedding gather, slices, KV append — are copies the runtime
//! does itself, with no arithmetic (whatever their family: a `Gather` or `Slice` family
//! placed on the host, in f32 or for a CPU target, is the same copy). Specs hold no sizes (they are run-time arguments), so a
//! step's spec serves every shape, and they are what a compiled artifact stores for its host
//! steps: the runtime compiles them with Cranelift at load. Quest decode attention is its page
//! selection (routing code) and the attention kernel over the selected tokens; a stand-alone
//! softmax is the softmax kernel, a matmul the dot kernel, and transposes, concatenations,
//! casts, top-k and causal masks are runtime copies. Atom's W4A4 linear (`AtomLinear`) is the
//! int4 grouped dot kernel over the ordinary channels (the activations permuted and quantized
//! per token by the runtime, with `kiln_ir::quant`, the interpreter's math) plus the small
//! INT8 outlier block; its group size must be a multiple of the kernel's block of 16
//! ([`unsupported`] says why not, for the compiler's error). An op with no entry here (the
//! stand-alone quantization ops) cannot run on the host: the compiler refuses to place it
//! there. This file must not compile or run code.
//!
//! ```
//! use kiln_ir::dtype::DType;
//! use kiln_ir::op::Op;
//! use kiln_ir::schedule::{Computation, Family, LinearEpilogue, SymExpr};
//! use kiln_kernels::cpu_step::{cpu_step, CpuStep};
//! let family = Family::Linear {
//!     rows: SymExpr::constant(1),
//!     n: 256,
//!     k: 512,
//!     dtype: DType::F32,
//!     epilogue: LinearEpilogue::SwiGlu,
//! };
//! let computes = Computation { op: Op::SwiGluLinear, inputs: vec![], outputs: vec![] };
//! let Some(CpuStep::Linear { epilogue: Some(map), .. }) = cpu_step(&family, &computes) else {
//!     panic!("a SwiGLU linear has a product and a map")
//! };
//! assert_eq!(map.inputs.len(), 2);
//! ```

use crate::lower::map_expr;
use kiln_codegen::cpu::int4_dot_spec::INT4_BLOCK;
use kiln_codegen::cpu::{
    DotSpec, ElemType, Int4DotSpec, MapSpec, RmsNormSpec, RopeSpec, SoftmaxSpec,
};
use kiln_codegen::expr::Expr;
use kiln_ir::dtype::DType;
use kiln_ir::op::Op;
use kiln_ir::schedule::{Computation, Family, LinearEpilogue};
use serde::{Deserialize, Serialize};

/// The Cranelift kernels of one host step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CpuStep {
    /// `product = x · Wᵀ` (`[rows, k] · [width, k]ᵀ`, `width = n`, or `2n` for SwiGLU),
    /// rounded to `dtype`, then `epilogue` row by row: `(product, bias)`,
    /// `(product, residual)` or `(gate half, up half)` → the output row; without an epilogue
    /// the product is the output.
    Linear {
        dot: DotSpec,
        epilogue_kind: LinearEpilogue,
        epilogue: Option<MapSpec>,
        n: usize,
        k: usize,
        dtype: DType,
    },
    /// One map kernel over operands of the output's length; with `broadcast`, smaller
    /// operands (single elements included) are expanded to the result's shape first
    /// (trailing dimensions aligned).
    Map {
        map: MapSpec,
        dtype: DType,
        broadcast: bool,
    },
    /// RMSNorm of rows of the weight's length; with a residual the outputs are
    /// `(x + residual, norm)`: `fused` computes both in f32 when `dtype` is f32, else the sum
    /// is rounded to `dtype` and normalised by `plain`.
    RmsNorm {
        plain: RmsNormSpec,
        fused: Option<RmsNormSpec>,
        eps: f32,
        dtype: DType,
    },
    /// Rotary embedding of `[tokens, heads, head_dim]` at the tokens' positions.
    Rope {
        rope: RopeSpec,
        heads: usize,
        head_dim: usize,
        theta: f32,
    },
    /// `Attention { causal }` over the new tokens (`decode: false`) or `AttentionDecode`
    /// over the cache up to each sequence's length (`decode: true`).
    Attention {
        decode: bool,
        causal: bool,
        scale: f32,
    },
    /// `MoeExpertFfn`: per expert, its routed rows gathered, then
    /// `down · (silu(gate · x) ⊙ (up · x))` with the products and the activation rounded to
    /// `dtype` (as a kernel that stores them would).
    MoeExperts {
        dot: DotSpec,
        activation: MapSpec,
        num_experts: usize,
        dtype: DType,
    },
    /// `MoeRouter`: each row's softmax (the softmax kernel in f64), its `top_k` experts
    /// (largest first, ties to the lower index) and their weights, renormalised when
    /// `normalize`. With `linear` (`MoeRouterLinear`), the rows are first computed from the
    /// operands `(x, w)`: the logits `x · wᵀ` on the dot kernel, rounded to the dtype.
    MoeRouter {
        softmax: SoftmaxSpec,
        top_k: usize,
        normalize: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        linear: Option<RouterLinear>,
    },
    /// `MoeDispatch`: the slots sorted by expert (stable) and each expert's offsets.
    MoeDispatch { num_experts: usize },
    /// `MoeCombine`: each token's expert rows summed with their router weights.
    MoeCombine,
    /// `Embedding`: the table's rows of the ids, copied.
    Gather,
    /// `Slice`: a range along one axis, copied.
    Slice {
        axis: usize,
        start: i64,
        end: Option<i64>,
    },
    /// `KvAppend`: the new rows copied into the cache at each sequence's start.
    KvAppend,
    /// `QuestAttentionDecode`: per sequence and KV head, the Quest page selection (page
    /// bounds of the cached keys, the query group's page scores, the top pages plus the
    /// current one — `kiln_ir::quest::select`, routing code like the MoE top-k), then the
    /// attention kernel over the selected tokens only.
    QuestAttention {
        scale: f32,
        budget_tokens: usize,
        page_size: usize,
    },
    /// `Softmax` over the last axis, on the softmax kernel in f64 (as the interpreter
    /// computes it).
    Softmax { softmax: SoftmaxSpec },
    /// `MatMul` `[.., m, k] · [.., k, n]`: per batch, the right operand transposed to
    /// `[n, k]`, then the dot kernel.
    MatMul { dot: DotSpec },
    /// `TopK { k }`: each row's `k` largest values and their indices (ties to the lower
    /// index).
    TopK { k: usize },
    /// `Transpose { perm }`: a copy in the permuted order.
    Transpose { perm: Vec<usize> },
    /// `Concat { axis }`: the operands copied one after another along `axis`.
    Concat { axis: usize },
    /// `Cast`: the values copied (the caller rounds every result to its dtype).
    Cast,
    /// `CausalMask`: `0` where a query sees a key, `−∞` elsewhere.
    CausalMask,
    /// `AtomLinear` (`x [rows, k]`, `permutation [k]`, `int4 [n, k − outliers]`,
    /// `int4_scales`, `int8 [n, outliers]`, `int8_scales`): per call, `x`'s channels permuted
    /// and each token quantized as the interpreter does (`kiln_ir::quant`: INT4 groups of
    /// `group_size` with `activation_clip`, INT8 for the last `outliers`); the ordinary
    /// channels' dequantized activations (`q · scale`, exact in f32) times the packed INT4
    /// weight on `dot` (the weight's f16 scales as f32), plus the INT8 outlier block (integer
    /// products in i64, scaled in f64), rounded to `dtype`.
    AtomLinear {
        dot: Int4DotSpec,
        n: usize,
        k: usize,
        group_size: usize,
        outliers: usize,
        activation_clip: f32,
        dtype: DType,
    },
}

/// The fused router's logits: `x · wᵀ` (`[rows, hidden] · [experts, hidden]ᵀ`) on `dot`,
/// rounded to `dtype` as the interpreter rounds the `Linear` they stand for.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouterLinear {
    pub dot: DotSpec,
    pub dtype: DType,
}

/// Whether a dtype's values are computed in f32 on the host (the interpreter's rule: floats
/// in f32, rounded to the dtype after each op).
fn float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// The CPU kernels of a plan kernel of `family` computing `computes`, or `None` when it has
/// none (quantization, and integer linears: such a step cannot be placed on the host).
pub fn cpu_step(family: &Family, computes: &Computation) -> Option<CpuStep> {
    match &computes.op {
        Op::Embedding => return Some(CpuStep::Gather),
        Op::Slice { axis, start, end } => {
            return Some(CpuStep::Slice {
                axis: *axis,
                start: *start,
                end: *end,
            })
        }
        Op::KvAppend => return Some(CpuStep::KvAppend),
        Op::MoeRouter { top_k, normalize } => {
            return Some(CpuStep::MoeRouter {
                softmax: SoftmaxSpec::new(ElemType::F64),
                top_k: *top_k,
                normalize: *normalize,
                linear: None,
            })
        }
        Op::MoeRouterLinear { top_k, normalize } => {
            let dtype = computes.inputs.first()?.dtype;
            return float(dtype).then(|| CpuStep::MoeRouter {
                softmax: SoftmaxSpec::new(ElemType::F64),
                top_k: *top_k,
                normalize: *normalize,
                linear: Some(RouterLinear {
                    dot: DotSpec::new(ElemType::F32),
                    dtype,
                }),
            });
        }
        Op::MoeDispatch { num_experts } => {
            return Some(CpuStep::MoeDispatch {
                num_experts: *num_experts,
            })
        }
        Op::MoeCombine => return Some(CpuStep::MoeCombine),
        Op::MoeExpertFfn { num_experts } => {
            let dtype = computes.outputs.first()?.dtype;
            return float(dtype).then(|| CpuStep::MoeExperts {
                dot: DotSpec::new(ElemType::F32),
                activation: MapSpec::new(Expr::input(0).silu() * Expr::input(1), 2, ElemType::F32),
                num_experts: *num_experts,
                dtype,
            });
        }
        Op::Attention { causal, scale } => {
            return Some(CpuStep::Attention {
                decode: false,
                causal: *causal,
                scale: *scale,
            })
        }
        Op::AttentionDecode { scale } => {
            return Some(CpuStep::Attention {
                decode: true,
                causal: true,
                scale: *scale,
            })
        }
        Op::QuestAttentionDecode {
            scale,
            budget_tokens,
            page_size,
        } => {
            return Some(CpuStep::QuestAttention {
                scale: *scale,
                budget_tokens: *budget_tokens,
                page_size: *page_size,
            })
        }
        Op::Softmax => {
            return Some(CpuStep::Softmax {
                softmax: SoftmaxSpec::new(ElemType::F64),
            })
        }
        Op::MatMul => {
            return Some(CpuStep::MatMul {
                dot: DotSpec::new(ElemType::F32),
            })
        }
        Op::TopK { k } => return Some(CpuStep::TopK { k: *k }),
        Op::Transpose { perm } => return Some(CpuStep::Transpose { perm: perm.clone() }),
        Op::Concat { axis } => return Some(CpuStep::Concat { axis: *axis }),
        Op::Cast { .. } => return Some(CpuStep::Cast),
        Op::CausalMask => return Some(CpuStep::CausalMask),
        _ => {}
    }
    match family {
        Family::Linear {
            n,
            k,
            dtype,
            epilogue,
            ..
        } if float(*dtype) => {
            let add = || MapSpec::new(Expr::input(0) + Expr::input(1), 2, ElemType::F32);
            let map = match epilogue {
                LinearEpilogue::None => None,
                LinearEpilogue::Bias | LinearEpilogue::Residual => Some(add()),
                LinearEpilogue::SwiGlu => Some(MapSpec::new(
                    Expr::input(0).silu() * Expr::input(1),
                    2,
                    ElemType::F32,
                )),
            };
            Some(CpuStep::Linear {
                dot: DotSpec::new(ElemType::F32),
                epilogue_kind: *epilogue,
                epilogue: map,
                n: *n,
                k: *k,
                dtype: *dtype,
            })
        }
        Family::RmsNorm {
            residual,
            eps,
            dtype,
            ..
        } if float(*dtype) => Some(CpuStep::RmsNorm {
            plain: RmsNormSpec::new(),
            fused: residual.then(|| RmsNormSpec::new().with_residual(true)),
            eps: *eps,
            dtype: *dtype,
        }),
        Family::AtomLinear {
            n,
            k,
            group_size,
            outliers,
            activation_clip,
            dtype,
            ..
        } if float(*dtype) && unsupported(family).is_none() => Some(CpuStep::AtomLinear {
            dot: Int4DotSpec::new(*group_size),
            n: *n,
            k: *k,
            group_size: *group_size,
            outliers: *outliers,
            activation_clip: *activation_clip,
            dtype: *dtype,
        }),
        Family::Rope {
            heads,
            head_dim,
            theta,
            dtype,
            ..
        } if float(*dtype) => Some(CpuStep::Rope {
            rope: RopeSpec::new(),
            heads: *heads,
            head_dim: *head_dim,
            theta: *theta,
        }),
        // Integer maps (sequence lengths) compute in f32 too, as the interpreter does: exact
        // below 2^24.
        Family::Map {
            inputs,
            steps,
            broadcast,
            scalar_operands,
            row_operands,
            dtype,
            ..
        } if float(*dtype) || *dtype == DType::I32 => Some(CpuStep::Map {
            map: MapSpec::new(map_expr(steps), *inputs, ElemType::F32),
            dtype: *dtype,
            // The host expands single-element and per-row operands to the result's shape.
            broadcast: *broadcast || !scalar_operands.is_empty() || !row_operands.is_empty(),
        }),
        _ => None,
    }
}

/// Why a kernel of `family` has no CPU step although its op has CPU kernels (parameters the
/// kernels do not take), for the compiler's error; `None` otherwise.
pub fn unsupported(family: &Family) -> Option<String> {
    match family {
        Family::AtomLinear { group_size, .. }
            if *group_size == 0 || !group_size.is_multiple_of(INT4_BLOCK) =>
        {
            Some(format!(
                "atom_linear: group size {group_size} is not a multiple of {INT4_BLOCK}, the \
                 block of the CPU int4 dot kernel (choose --atom-group-size 16, 32, …, 128)"
            ))
        }
        _ => None,
    }
}

impl CpuStep {
    /// The columns of the product (`2n` for SwiGLU).
    pub fn product_width(&self) -> Option<usize> {
        match self {
            CpuStep::Linear {
                epilogue_kind: LinearEpilogue::SwiGlu,
                n,
                ..
            } => Some(2 * n),
            CpuStep::Linear { n, .. } => Some(*n),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::op::MapStep;
    use kiln_ir::schedule::SymExpr;

    fn linear(epilogue: LinearEpilogue, dtype: DType) -> Family {
        Family::Linear {
            rows: SymExpr::constant(3),
            n: 8,
            k: 16,
            dtype,
            epilogue,
        }
    }

    /// A computation of `op` (types do not matter to the choice).
    fn of(op: Op) -> Computation {
        Computation {
            op,
            inputs: Vec::new(),
            outputs: Vec::new(),
        }
    }

    fn step(family: &Family) -> Option<CpuStep> {
        cpu_step(family, &of(Op::Linear))
    }

    #[test]
    fn linears_and_plain_maps_have_cpu_kernels() {
        for epilogue in [
            LinearEpilogue::None,
            LinearEpilogue::Bias,
            LinearEpilogue::Residual,
            LinearEpilogue::SwiGlu,
        ] {
            let step = step(&linear(epilogue, DType::F16)).unwrap();
            let width = if epilogue == LinearEpilogue::SwiGlu {
                16
            } else {
                8
            };
            assert_eq!(step.product_width(), Some(width));
            let CpuStep::Linear { epilogue: map, .. } = step else {
                panic!("a linear step")
            };
            assert_eq!(map.is_some(), epilogue != LinearEpilogue::None);
        }
        let map = Family::Map {
            elements: SymExpr::constant(10),
            inputs: 2,
            steps: vec![
                MapStep::Operand { index: 0 },
                MapStep::Operand { index: 1 },
                MapStep::Mul { a: 0, b: 1 },
            ],
            broadcast: false,
            scalar_operands: vec![],
            row_operands: vec![],
            row_width: 0,
            dtype: DType::F32,
        };
        assert!(matches!(step(&map), Some(CpuStep::Map { .. })));
    }

    #[test]
    fn the_fused_router_computes_its_logits_on_the_dot_kernel_first() {
        let family = Family::HostOnly { op: "any".into() };
        let router = |dtype| Computation {
            op: Op::MoeRouterLinear {
                top_k: 2,
                normalize: true,
            },
            inputs: vec![kiln_ir::graph::TensorType::new(
                dtype,
                kiln_ir::shape::Shape::of(&[3, 16]),
            )],
            outputs: Vec::new(),
        };
        let Some(CpuStep::MoeRouter {
            linear: Some(linear),
            top_k: 2,
            normalize: true,
            ..
        }) = cpu_step(&family, &router(DType::BF16))
        else {
            panic!("the fused router has a CPU step with its linear")
        };
        assert_eq!(linear.dtype, DType::BF16);
        let Some(CpuStep::MoeRouter { linear: None, .. }) = cpu_step(
            &family,
            &of(Op::MoeRouter {
                top_k: 2,
                normalize: true,
            }),
        ) else {
            panic!("the plain router reads stored logits")
        };
        assert_eq!(cpu_step(&family, &router(DType::I32)), None);
    }

    #[test]
    fn norms_and_rotations_have_steps() {
        let norm = |residual| Family::RmsNorm {
            rows: SymExpr::constant(1),
            hidden: 8,
            residual,
            eps: 1e-5,
            dtype: DType::BF16,
        };
        let Some(CpuStep::RmsNorm { fused, .. }) =
            cpu_step(&norm(true), &of(Op::AddRmsNorm { eps: 1e-5 }))
        else {
            panic!("RMSNorm has a CPU step")
        };
        assert!(fused.is_some_and(|f| f.residual));
        let Some(CpuStep::RmsNorm { fused, plain, .. }) =
            cpu_step(&norm(false), &of(Op::RmsNorm { eps: 1e-5 }))
        else {
            panic!("RMSNorm has a CPU step")
        };
        assert!(fused.is_none() && !plain.residual);
        let rope = Family::Rope {
            tokens: SymExpr::constant(2),
            heads: 4,
            head_dim: 16,
            theta: 1e4,
            dtype: DType::F32,
        };
        assert!(matches!(
            cpu_step(&rope, &of(Op::Rope { theta: 1e4 })),
            Some(CpuStep::Rope {
                heads: 4,
                head_dim: 16,
                ..
            })
        ));
    }

    #[test]
    fn atom_linears_run_on_the_int4_dot_kernel_with_groups_of_16() {
        let atom = |group_size| Family::AtomLinear {
            rows: SymExpr::constant(3),
            n: 8,
            k: 96,
            group_size,
            outliers: 32,
            activation_clip: 0.9,
            dtype: DType::F32,
        };
        let op = Op::AtomLinear {
            group_size: 32,
            outliers: 32,
            activation_clip: 0.9,
        };
        assert_eq!(
            cpu_step(&atom(32), &of(op.clone())),
            Some(CpuStep::AtomLinear {
                dot: Int4DotSpec::new(32),
                n: 8,
                k: 96,
                group_size: 32,
                outliers: 32,
                activation_clip: 0.9,
                dtype: DType::F32,
            })
        );
        assert!(unsupported(&atom(32)).is_none());
        assert_eq!(cpu_step(&atom(8), &of(op)), None);
        let reason = unsupported(&atom(8)).unwrap();
        assert!(
            reason.contains("group size 8") && reason.contains("16"),
            "{reason}"
        );
    }

    #[test]
    fn copies_softmax_quest_and_broadcast_maps_have_steps_but_quantization_has_none() {
        let broadcast = Family::Map {
            elements: SymExpr::constant(10),
            inputs: 2,
            steps: vec![
                MapStep::Operand { index: 0 },
                MapStep::Operand { index: 1 },
                MapStep::Add { a: 0, b: 1 },
            ],
            broadcast: true,
            scalar_operands: vec![],
            row_operands: vec![],
            row_width: 0,
            dtype: DType::F32,
        };
        assert!(matches!(
            step(&broadcast),
            Some(CpuStep::Map {
                broadcast: true,
                ..
            })
        ));
        // A single-element operand (decode's `cache_start + 1`) is expanded on the host too.
        let lengths = Family::Map {
            elements: SymExpr::constant(10),
            inputs: 2,
            steps: vec![
                MapStep::Operand { index: 0 },
                MapStep::Operand { index: 1 },
                MapStep::Add { a: 0, b: 1 },
            ],
            broadcast: false,
            scalar_operands: vec![1],
            row_operands: vec![],
            row_width: 0,
            dtype: DType::I32,
        };
        assert!(matches!(
            step(&lengths),
            Some(CpuStep::Map {
                broadcast: true,
                dtype: DType::I32,
                ..
            })
        ));
        // So is a per-row operand (Qwen2-MoE's `[.., 1]` shared-expert gate) on the host.
        let gated = Family::Map {
            elements: SymExpr::constant(12),
            inputs: 2,
            steps: vec![
                MapStep::Operand { index: 0 },
                MapStep::Operand { index: 1 },
                MapStep::Mul { a: 0, b: 1 },
            ],
            broadcast: false,
            scalar_operands: vec![],
            row_operands: vec![1],
            row_width: 4,
            dtype: DType::F32,
        };
        assert!(matches!(
            step(&gated),
            Some(CpuStep::Map {
                broadcast: true,
                dtype: DType::F32,
                ..
            })
        ));
        assert!(step(&linear(LinearEpilogue::None, DType::I32)).is_none());
        let host_only = Family::HostOnly {
            op: "embedding".into(),
        };
        assert_eq!(
            cpu_step(&host_only, &of(Op::Embedding)),
            Some(CpuStep::Gather)
        );
        // A typed gather or slice placed on the host is the same copy.
        let gather = Family::Gather {
            rows: SymExpr::constant(4),
            vocab: 10,
            hidden: 8,
            dtype: DType::F32,
        };
        assert_eq!(cpu_step(&gather, &of(Op::Embedding)), Some(CpuStep::Gather));
        let slice = Family::Slice {
            outer: SymExpr::constant(1),
            axis_len: SymExpr::constant(4),
            start: -1,
            end: None,
            inner: 8,
            dtype: DType::BF16,
        };
        let op = Op::Slice {
            axis: 1,
            start: -1,
            end: None,
        };
        assert_eq!(
            cpu_step(&slice, &of(op)),
            Some(CpuStep::Slice {
                axis: 1,
                start: -1,
                end: None
            })
        );
        let softmax = Family::HostOnly {
            op: "softmax".into(),
        };
        assert!(matches!(
            cpu_step(&softmax, &of(Op::Softmax)),
            Some(CpuStep::Softmax { softmax }) if softmax.compute == ElemType::F64
        ));
        let quest = Family::HostOnly {
            op: "quest_attention_decode".into(),
        };
        let op = Op::QuestAttentionDecode {
            scale: 0.125,
            budget_tokens: 64,
            page_size: 16,
        };
        assert_eq!(
            cpu_step(&quest, &of(op)),
            Some(CpuStep::QuestAttention {
                scale: 0.125,
                budget_tokens: 64,
                page_size: 16
            })
        );
        // Quantization has no CPU kernel yet: such a step cannot be placed on the host.
        let scheme = kiln_ir::op::QuantScheme {
            bits: 4,
            group_size: 32,
            symmetric: true,
            clip: 1.0,
        };
        let quantize = Family::HostOnly {
            op: "quantize".into(),
        };
        assert!(cpu_step(&quantize, &of(Op::Quantize { scheme })).is_none());
        let attention = Family::HostOnly {
            op: "attention".into(),
        };
        let op = Op::AttentionDecode { scale: 0.125 };
        assert!(matches!(
            cpu_step(&attention, &of(op)),
            Some(CpuStep::Attention { decode: true, .. })
        ));
    }
}
