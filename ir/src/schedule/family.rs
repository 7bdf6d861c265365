//! Kernel families: what one scheduled kernel computes, described at the IR level.
//!
//! Owns [`Family`] and [`classify`], which maps one kernel-like graph node to its family and
//! parameters (sizes, dtype, epilogue). A family is what a generator needs to pick a spec;
//! which generator (GEMV or GEMM, tile shapes) is the lowering's choice, not this file's.
//! Data movement with a GPU copy kernel has its own family too ([`Family::Gather`] for the
//! embedding, [`Family::Slice`] for a range along one axis); where such a kernel is placed
//! on the CPU, it runs as the same host copy as before (`kiln_kernels::cpu_step`). Every op
//! without a dedicated family is [`Family::HostOnly`]: it runs on its CPU step (a Cranelift
//! kernel or a runtime copy), never through `ir::interp`. Atom's W4A4 linear has a typed
//! family ([`Family::AtomLinear`]) with no GPU generator yet, so placement keeps it on the
//! host. This file must not know about PTX or devices.

use super::size::SymExpr;
use crate::dtype::DType;
use crate::graph::{Graph, Node};
use crate::op::{MapStep, Op};
use crate::shape::Dim;
use serde::{Deserialize, Serialize};

/// What a fused linear does after the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinearEpilogue {
    /// `x · wᵀ`.
    None,
    /// `x · wᵀ + bias[N]` (a `linear_add` whose addend is one row).
    Bias,
    /// `x · wᵀ + residual[.., N]` (a `linear_add` whose addend has the result's shape).
    Residual,
    /// `silu(x · gateᵀ) · (x · upᵀ)` over concatenated `[gate; up]` weights (`swiglu_linear`).
    SwiGlu,
}

/// The family of a scheduled kernel and its parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "family", rename_all = "snake_case")]
pub enum Family {
    /// `[rows, k] · [n, k]ᵀ` with an epilogue; `n` counts output columns (for SwiGLU the
    /// weight has `2n` rows).
    Linear {
        rows: SymExpr,
        n: usize,
        k: usize,
        dtype: DType,
        epilogue: LinearEpilogue,
    },
    /// RMSNorm over rows of `hidden`, with the residual add fused when `residual`.
    RmsNorm {
        rows: SymExpr,
        hidden: usize,
        residual: bool,
        eps: f32,
        dtype: DType,
    },
    /// Rotary embedding of `tokens` rows of `heads × head_dim`.
    Rope {
        tokens: SymExpr,
        heads: usize,
        head_dim: usize,
        theta: f32,
        dtype: DType,
    },
    /// An elementwise program (`fused_map` or a plain `add`/`mul`/`silu`/`sigmoid`).
    /// `scalar_operands` lists the operands that hold a single element (rank 0, or every
    /// dimension 1) and are broadcast to every element of the result; `row_operands` lists the
    /// operands of the result's shape with the last dimension 1 (one value per row of
    /// `row_width` elements, the result's last dimension, broadcast along it: a per-token
    /// gate). `broadcast` is set when some other operand is smaller than the result (general
    /// broadcasting, with no GPU generator).
    Map {
        elements: SymExpr,
        inputs: usize,
        steps: Vec<MapStep>,
        broadcast: bool,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        scalar_operands: Vec<usize>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        row_operands: Vec<usize>,
        /// The result's last dimension when there are row operands; 0 otherwise.
        #[serde(default, skip_serializing_if = "is_zero")]
        row_width: usize,
        dtype: DType,
    },
    /// `Embedding`: `rows` ids (i32) each select one row of `hidden` elements of a
    /// `[vocab, hidden]` table; `dtype` is the table's.
    Gather {
        rows: SymExpr,
        vocab: usize,
        hidden: usize,
        dtype: DType,
    },
    /// `Slice` of a row-major tensor viewed as `[outer, axis_len, inner]`: the range
    /// `start..end` of the middle axis (negative bounds count from its end, a missing end is
    /// the end of the axis, as in [`Op::Slice`]) is copied for every `outer` index; `inner`
    /// (the elements after the axis) is a known constant.
    Slice {
        outer: SymExpr,
        axis_len: SymExpr,
        start: i64,
        end: Option<i64>,
        inner: usize,
        dtype: DType,
    },
    /// Attention of `queries` new tokens per sequence over `keys` cached (or, for prefill,
    /// new) tokens: `q [batch, queries, q_heads, head_dim]`, K and V
    /// `[batch, keys, kv_heads, head_dim]` (grouped-query). See [`AttentionKind`].
    Attention {
        kind: AttentionKind,
        batch: SymExpr,
        queries: SymExpr,
        keys: SymExpr,
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
        scale: f32,
        dtype: DType,
    },
    /// `KvAppend`: `new [batch, new_tokens, kv_heads, head_dim]` written into rows
    /// `start[b] ..` of a `[batch, capacity, kv_heads, head_dim]` cache.
    KvAppend {
        batch: SymExpr,
        new_tokens: SymExpr,
        capacity: SymExpr,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
    },
    /// One stage of a mixture-of-experts layer (see [`MoeStage`]) over `tokens` tokens, each
    /// routed to `top_k` experts. `dtype` is the activations' (the router's logits, or its
    /// `x` and weight with the linear fused; the expert FFN's `x` and weights; the combine's
    /// rows); the dispatch, which reads and writes only expert ids, is i32.
    Moe {
        stage: MoeStage,
        tokens: SymExpr,
        top_k: usize,
        dtype: DType,
    },
    /// `AtomLinear` (`crate::atom`): `[rows, k] · [n, k]ᵀ` with the activations' channels
    /// permuted and quantized per token (INT4 groups of `group_size` with
    /// `activation_clip`, INT8 for the last `outliers`) against a weight in Atom's format;
    /// `dtype` is the activations' and the result's. No GPU generator yet: it runs on the
    /// host.
    AtomLinear {
        rows: SymExpr,
        n: usize,
        k: usize,
        group_size: usize,
        outliers: usize,
        activation_clip: f32,
        dtype: DType,
    },
    /// Any other op: no GPU generator takes it, so it runs on the host, on its CPU step
    /// (`kiln_kernels::cpu_step`).
    HostOnly { op: String },
}

/// Which op of a mixture-of-experts layer a [`Family::Moe`] kernel computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum MoeStage {
    /// `MoeRouter`: softmax over the `experts` logits, the top `k`, renormalised when
    /// `normalize`. With `hidden`, `MoeRouterLinear`: the logits are first computed from
    /// `x [.., hidden]` and the router weight `[experts, hidden]` in the same kernel (absent
    /// in plans from before the fusion, which read stored logits).
    Router {
        experts: usize,
        normalize: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hidden: Option<usize>,
    },
    /// `MoeDispatch`: the slots sorted by expert (of `experts`) and each expert's offsets.
    Dispatch { experts: usize },
    /// `MoeExpertFfn`: each slot's SwiGLU FFN with its expert's `[intermediate, hidden]`
    /// gate and up and `[hidden, intermediate]` down weights.
    ExpertFfn {
        experts: usize,
        hidden: usize,
        intermediate: usize,
    },
    /// `MoeCombine`: each token's `top_k` expert rows of `hidden`, weighted and summed.
    Combine { hidden: usize },
}

/// Which attention op an [`Family::Attention`] kernel computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AttentionKind {
    /// `Attention { causal: true }` over the new tokens themselves (prefill, `keys ==
    /// queries`).
    CausalPrefill,
    /// `AttentionDecode`: the new tokens against the cache, per-sequence `lengths`.
    Decode,
    /// `QuestAttentionDecode`: one new token per sequence against the Quest-selected pages.
    Quest {
        budget_tokens: usize,
        page_size: usize,
    },
}

/// Which family a [`Family`] is, without its parameters: what placement capabilities list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FamilyKind {
    Linear,
    RmsNorm,
    Rope,
    Map,
    Attention,
    KvAppend,
    Gather,
    Slice,
    Moe,
    AtomLinear,
    HostOnly,
}

impl FamilyKind {
    /// The short name used in reports (`linear`, `rms_norm`, …), as serialised.
    pub fn name(self) -> &'static str {
        match self {
            FamilyKind::Linear => "linear",
            FamilyKind::RmsNorm => "rms_norm",
            FamilyKind::Rope => "rope",
            FamilyKind::Map => "map",
            FamilyKind::Attention => "attention",
            FamilyKind::KvAppend => "kv_append",
            FamilyKind::Gather => "gather",
            FamilyKind::Slice => "slice",
            FamilyKind::Moe => "moe",
            FamilyKind::AtomLinear => "atom_linear",
            FamilyKind::HostOnly => "host_only",
        }
    }
}

impl Family {
    /// Which family this is.
    pub fn kind(&self) -> FamilyKind {
        match self {
            Family::Linear { .. } => FamilyKind::Linear,
            Family::RmsNorm { .. } => FamilyKind::RmsNorm,
            Family::Rope { .. } => FamilyKind::Rope,
            Family::Map { .. } => FamilyKind::Map,
            Family::Attention { .. } => FamilyKind::Attention,
            Family::KvAppend { .. } => FamilyKind::KvAppend,
            Family::Gather { .. } => FamilyKind::Gather,
            Family::Slice { .. } => FamilyKind::Slice,
            Family::Moe { .. } => FamilyKind::Moe,
            Family::AtomLinear { .. } => FamilyKind::AtomLinear,
            Family::HostOnly { .. } => FamilyKind::HostOnly,
        }
    }

    /// The family's short name, as used in reports.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// The dtype the family computes in, if it has one.
    pub fn dtype(&self) -> Option<DType> {
        match self {
            Family::Linear { dtype, .. }
            | Family::RmsNorm { dtype, .. }
            | Family::Rope { dtype, .. }
            | Family::Map { dtype, .. }
            | Family::Attention { dtype, .. }
            | Family::KvAppend { dtype, .. }
            | Family::Gather { dtype, .. }
            | Family::Slice { dtype, .. }
            | Family::Moe { dtype, .. }
            | Family::AtomLinear { dtype, .. } => Some(*dtype),
            Family::HostOnly { .. } => None,
        }
    }

    /// A short description for reports: `linear swiglu bf16 n=14336 k=4096`.
    pub fn describe(&self) -> String {
        match self {
            Family::Linear {
                rows,
                n,
                k,
                dtype,
                epilogue,
            } => format!("linear {epilogue:?} {dtype} rows={rows} n={n} k={k}").to_lowercase(),
            Family::RmsNorm {
                hidden,
                residual,
                dtype,
                ..
            } => format!(
                "rms_norm{} {dtype} hidden={hidden}",
                if *residual { "+residual" } else { "" }
            ),
            Family::Rope {
                heads,
                head_dim,
                dtype,
                ..
            } => format!("rope {dtype} heads={heads} head_dim={head_dim}"),
            Family::Map {
                inputs,
                steps,
                broadcast,
                scalar_operands,
                row_operands,
                row_width,
                dtype,
                ..
            } => format!(
                "map {dtype} inputs={inputs} steps={}{}{}{}",
                steps.len(),
                if scalar_operands.is_empty() {
                    String::new()
                } else {
                    format!(" scalar_operands={scalar_operands:?}")
                },
                if row_operands.is_empty() {
                    String::new()
                } else {
                    format!(" row_operands={row_operands:?} row_width={row_width}")
                },
                if *broadcast { " broadcast" } else { "" }
            ),
            Family::Attention {
                kind,
                q_heads,
                kv_heads,
                head_dim,
                dtype,
                ..
            } => {
                let kind = match kind {
                    AttentionKind::CausalPrefill => "causal prefill".to_string(),
                    AttentionKind::Decode => "decode".to_string(),
                    AttentionKind::Quest {
                        budget_tokens,
                        page_size,
                    } => format!("quest budget={budget_tokens} page={page_size}"),
                };
                format!("attention {kind} {dtype} q_heads={q_heads} kv_heads={kv_heads} head_dim={head_dim}")
            }
            Family::KvAppend {
                kv_heads,
                head_dim,
                dtype,
                ..
            } => format!("kv_append {dtype} kv_heads={kv_heads} head_dim={head_dim}"),
            Family::Gather {
                vocab,
                hidden,
                dtype,
                ..
            } => format!("gather {dtype} vocab={vocab} hidden={hidden}"),
            Family::Slice {
                start,
                end,
                inner,
                dtype,
                ..
            } => {
                let end = end.map_or(String::new(), |e| e.to_string());
                format!("slice {dtype} {start}..{end} inner={inner}")
            }
            Family::Moe {
                stage,
                top_k,
                dtype,
                ..
            } => {
                let stage = match stage {
                    MoeStage::Router {
                        experts,
                        normalize,
                        hidden,
                    } => format!(
                        "router{}{} experts={experts}",
                        hidden.map_or(String::new(), |h| format!(" linear hidden={h}")),
                        if *normalize { " normalized" } else { "" }
                    ),
                    MoeStage::Dispatch { experts } => format!("dispatch experts={experts}"),
                    MoeStage::ExpertFfn {
                        experts,
                        hidden,
                        intermediate,
                    } => format!(
                        "expert_ffn experts={experts} hidden={hidden} intermediate={intermediate}"
                    ),
                    MoeStage::Combine { hidden } => format!("combine hidden={hidden}"),
                };
                format!("moe {stage} {dtype} top_k={top_k}")
            }
            Family::AtomLinear {
                rows,
                n,
                k,
                group_size,
                outliers,
                activation_clip,
                dtype,
            } => format!(
                "atom_linear {dtype} rows={rows} n={n} k={k} group={group_size} \
                 outliers={outliers} activation_clip={activation_clip}"
            ),
            Family::HostOnly { op } => format!("host_only {op}"),
        }
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn const_dim(dim: Option<&Dim>) -> Option<usize> {
    dim.and_then(Dim::as_const)
}

/// The family of kernel-like node `node` of `graph`.
pub fn classify(graph: &Graph, node: &Node) -> Family {
    classify_known(graph, node).unwrap_or_else(|| Family::HostOnly {
        op: node.op.name().to_string(),
    })
}

fn classify_known(graph: &Graph, node: &Node) -> Option<Family> {
    let operand = |i: usize| graph.value_type(*node.inputs.get(i)?).ok();
    let out = node.outputs.first()?;
    let dtype = out.dtype;
    let leading = |dims: &[Dim]| SymExpr::product(&dims[..dims.len().saturating_sub(1)]);
    match &node.op {
        Op::Linear | Op::LinearAdd | Op::SwiGluLinear => {
            let x = operand(0)?;
            let w = operand(1)?;
            let k = const_dim(x.shape.last())?;
            let n = const_dim(out.shape.last())?;
            let epilogue = match &node.op {
                Op::Linear => LinearEpilogue::None,
                Op::SwiGluLinear => LinearEpilogue::SwiGlu,
                _ if operand(2)?.shape.rank() <= 1 => LinearEpilogue::Bias,
                _ if operand(2)?.shape == out.shape => LinearEpilogue::Residual,
                _ => return None,
            };
            if w.dtype != dtype || x.dtype != dtype {
                return None;
            }
            Some(Family::Linear {
                rows: leading(x.shape.dims()),
                n,
                k,
                dtype,
                epilogue,
            })
        }
        Op::RmsNorm { eps } | Op::AddRmsNorm { eps } => Some(Family::RmsNorm {
            rows: leading(out.shape.dims()),
            hidden: const_dim(out.shape.last())?,
            residual: matches!(node.op, Op::AddRmsNorm { .. }),
            eps: *eps,
            dtype,
        }),
        Op::Rope { theta } => {
            let dims = out.shape.dims();
            if dims.len() != 4 {
                return None;
            }
            Some(Family::Rope {
                tokens: SymExpr::product(&dims[..2]),
                heads: dims[2].as_const()?,
                head_dim: dims[3].as_const()?,
                theta: *theta,
                dtype,
            })
        }
        Op::FusedMap { .. } | Op::Add | Op::Mul | Op::Silu | Op::Sigmoid => {
            let steps = match &node.op {
                Op::FusedMap { steps } => steps.clone(),
                Op::Add => binary_steps(true),
                Op::Mul => binary_steps(false),
                Op::Silu => vec![MapStep::Operand { index: 0 }, MapStep::Silu { x: 0 }],
                _ => vec![MapStep::Operand { index: 0 }, MapStep::Sigmoid { x: 0 }],
            };
            let mut broadcast = false;
            let mut scalar_operands = Vec::new();
            let mut row_operands = Vec::new();
            // One value per row of the result's (constant) last dimension.
            let out_dims = out.shape.dims();
            let row_width = out_dims.last().and_then(Dim::as_const).unwrap_or(0);
            let is_row = |dims: &[Dim]| {
                row_width > 1
                    && dims.len() == out_dims.len()
                    && dims.last().and_then(Dim::as_const) == Some(1)
                    && dims[..dims.len() - 1] == out_dims[..out_dims.len() - 1]
            };
            for (index, v) in node.inputs.iter().enumerate() {
                let ty = graph.value_type(*v).ok()?;
                if ty.dtype != dtype {
                    return None;
                }
                if ty.shape == out.shape {
                    continue;
                }
                if SymExpr::elements(&ty.shape).as_const() == Some(1) {
                    scalar_operands.push(index);
                } else if is_row(ty.shape.dims()) {
                    row_operands.push(index);
                } else {
                    broadcast = true;
                }
            }
            Some(Family::Map {
                elements: SymExpr::elements(&out.shape),
                inputs: node.inputs.len(),
                steps,
                broadcast,
                row_width: if row_operands.is_empty() {
                    0
                } else {
                    row_width
                },
                scalar_operands,
                row_operands,
                dtype,
            })
        }
        Op::Attention {
            causal: true,
            scale,
        }
        | Op::AttentionDecode { scale }
        | Op::QuestAttentionDecode { scale, .. } => {
            let q = operand(0)?;
            let k = operand(1)?;
            let v = operand(2)?;
            let (qd, kd) = (q.shape.dims(), k.shape.dims());
            if qd.len() != 4 || kd.len() != 4 || k.shape != v.shape {
                return None;
            }
            if q.dtype != dtype || k.dtype != dtype || v.dtype != dtype {
                return None;
            }
            let kind = match &node.op {
                Op::Attention { .. } => {
                    // The prefill kernel reads the new tokens as their own cache.
                    if qd[1] != kd[1] {
                        return None;
                    }
                    AttentionKind::CausalPrefill
                }
                Op::AttentionDecode { .. } => AttentionKind::Decode,
                Op::QuestAttentionDecode {
                    budget_tokens,
                    page_size,
                    ..
                } => AttentionKind::Quest {
                    budget_tokens: *budget_tokens,
                    page_size: *page_size,
                },
                _ => return None,
            };
            Some(Family::Attention {
                kind,
                batch: SymExpr::product(&qd[..1]),
                queries: SymExpr::product(&qd[1..2]),
                keys: SymExpr::product(&kd[1..2]),
                q_heads: qd[2].as_const()?,
                kv_heads: kd[2].as_const()?,
                head_dim: qd[3].as_const()?,
                scale: *scale,
                dtype,
            })
        }
        Op::KvAppend => {
            let cache = operand(0)?;
            let new = operand(1)?;
            let (cd, nd) = (cache.shape.dims(), new.shape.dims());
            if cd.len() != 4 || nd.len() != 4 || new.dtype != dtype || cache.dtype != dtype {
                return None;
            }
            Some(Family::KvAppend {
                batch: SymExpr::product(&cd[..1]),
                new_tokens: SymExpr::product(&nd[1..2]),
                capacity: SymExpr::product(&cd[1..2]),
                kv_heads: cd[2].as_const()?,
                head_dim: cd[3].as_const()?,
                dtype,
            })
        }
        Op::Embedding => {
            let table = operand(0)?;
            let ids = operand(1)?;
            let td = table.shape.dims();
            if td.len() != 2 || table.dtype != dtype || ids.dtype != DType::I32 {
                return None;
            }
            Some(Family::Gather {
                rows: SymExpr::elements(&ids.shape),
                vocab: td[0].as_const()?,
                hidden: td[1].as_const()?,
                dtype,
            })
        }
        Op::Slice { axis, start, end } => {
            let x = operand(0)?;
            let dims = x.shape.dims();
            if *axis >= dims.len() || x.dtype != dtype {
                return None;
            }
            Some(Family::Slice {
                outer: SymExpr::product(&dims[..*axis]),
                axis_len: SymExpr::product(&dims[*axis..*axis + 1]),
                start: *start,
                end: *end,
                inner: SymExpr::product(&dims[*axis + 1..]).as_const()? as usize,
                dtype,
            })
        }
        Op::MoeRouter { top_k, normalize } => {
            let logits = operand(0)?;
            let dims = logits.shape.dims();
            Some(Family::Moe {
                stage: MoeStage::Router {
                    experts: const_dim(logits.shape.last())?,
                    normalize: *normalize,
                    hidden: None,
                },
                tokens: leading(dims),
                top_k: *top_k,
                dtype: logits.dtype,
            })
        }
        Op::MoeRouterLinear { top_k, normalize } => {
            let x = operand(0)?;
            let w = operand(1)?;
            let hidden = const_dim(x.shape.last())?;
            let wd = w.shape.dims();
            let experts = const_dim(wd.first())?;
            if w.dtype != x.dtype || wd.len() != 2 || wd[1].as_const() != Some(hidden) {
                return None;
            }
            Some(Family::Moe {
                stage: MoeStage::Router {
                    experts,
                    normalize: *normalize,
                    hidden: Some(hidden),
                },
                tokens: leading(x.shape.dims()),
                top_k: *top_k,
                dtype: x.dtype,
            })
        }
        Op::MoeDispatch { num_experts } => {
            let chosen = operand(0)?;
            Some(Family::Moe {
                stage: MoeStage::Dispatch {
                    experts: *num_experts,
                },
                tokens: leading(chosen.shape.dims()),
                top_k: const_dim(chosen.shape.last())?,
                dtype: DType::I32,
            })
        }
        Op::MoeExpertFfn { num_experts } => {
            let x = operand(0)?;
            let order = operand(1)?;
            let gate = operand(3)?;
            let hidden = const_dim(x.shape.last())?;
            let intermediate = const_dim(gate.shape.dims().first())?;
            // Every expert's weights in the activations' dtype and shapes.
            for e in 0..*num_experts {
                let (g, u, d) = (
                    operand(3 + 3 * e)?,
                    operand(4 + 3 * e)?,
                    operand(5 + 3 * e)?,
                );
                let shapes = [
                    (&g, intermediate, hidden),
                    (&u, intermediate, hidden),
                    (&d, hidden, intermediate),
                ];
                for (w, rows, columns) in shapes {
                    let wd = w.shape.dims();
                    if w.dtype != dtype
                        || wd.len() != 2
                        || wd[0].as_const() != Some(rows)
                        || wd[1].as_const() != Some(columns)
                    {
                        return None;
                    }
                }
            }
            if x.dtype != dtype {
                return None;
            }
            Some(Family::Moe {
                stage: MoeStage::ExpertFfn {
                    experts: *num_experts,
                    hidden,
                    intermediate,
                },
                tokens: leading(order.shape.dims()),
                top_k: const_dim(order.shape.last())?,
                dtype,
            })
        }
        Op::AtomLinear {
            group_size,
            outliers,
            activation_clip,
        } => {
            let x = operand(0)?;
            let int4 = operand(2)?;
            let k = const_dim(x.shape.last())?;
            let n = const_dim(out.shape.last())?;
            let wd = int4.shape.dims();
            if x.dtype != dtype
                || !dtype.is_float()
                || wd.len() != 2
                || wd[0].as_const() != Some(n)
                || wd[1].as_const() != k.checked_sub(*outliers)
            {
                return None;
            }
            Some(Family::AtomLinear {
                rows: leading(x.shape.dims()),
                n,
                k,
                group_size: *group_size,
                outliers: *outliers,
                activation_clip: *activation_clip,
                dtype,
            })
        }
        Op::MoeCombine => {
            let y = operand(0)?;
            let order = operand(1)?;
            // The kernel reads the routing weights as f32 (the router's output dtype).
            if y.dtype != dtype || operand(2)?.dtype != DType::F32 {
                return None;
            }
            Some(Family::Moe {
                stage: MoeStage::Combine {
                    hidden: const_dim(out.shape.last())?,
                },
                tokens: leading(order.shape.dims()),
                top_k: const_dim(order.shape.last())?,
                dtype,
            })
        }
        _ => None,
    }
}

/// The first and one-past-last index that `Slice { start, end }` takes of an axis of
/// `size` (negative bounds count from the end, a missing end is the end), or `None` when
/// the range is empty-reversed or outside the axis. The rule of `kiln_ir::movement::slice`.
pub fn slice_range(start: i64, end: Option<i64>, size: u64) -> Option<(u64, u64)> {
    let size = i64::try_from(size).ok()?;
    let fix = |v: i64| if v < 0 { v + size } else { v };
    let (first, last) = (fix(start), fix(end.unwrap_or(size)));
    (first >= 0 && last <= size && first <= last).then_some((first as u64, last as u64))
}

fn binary_steps(add: bool) -> Vec<MapStep> {
    let combine = if add {
        MapStep::Add { a: 0, b: 1 }
    } else {
        MapStep::Mul { a: 0, b: 1 }
    };
    vec![
        MapStep::Operand { index: 0 },
        MapStep::Operand { index: 1 },
        combine,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::InputKind;
    use crate::shape;

    #[test]
    fn an_atom_linear_is_its_own_family_with_its_format() {
        let mut g = Graph::new("atom");
        let x = g
            .input("x", InputKind::Activation, DType::F32, shape!["seq", 96])
            .unwrap();
        let mut operands = vec![x];
        for (name, dtype, dims) in [
            ("permutation", DType::I32, shape![96]),
            ("int4", DType::I4, shape![40, 64]),
            ("int4_scales", DType::F16, shape![40, 2]),
            ("int8", DType::I8, shape![40, 32]),
            ("int8_scales", DType::F16, shape![40, 1]),
        ] {
            operands.push(g.input(name, InputKind::Weight, dtype, dims).unwrap());
        }
        let op = Op::AtomLinear {
            group_size: 32,
            outliers: 32,
            activation_clip: 0.9,
        };
        let y = g.add1("atom", op, &operands).unwrap();
        let family = classify(&g, &g.nodes[y.node]);
        assert_eq!(family.kind(), FamilyKind::AtomLinear);
        assert_eq!(family.dtype(), Some(DType::F32));
        assert_eq!(
            family.describe(),
            "atom_linear f32 rows=seq n=40 k=96 group=32 outliers=32 activation_clip=0.9"
        );
        // No GPU generator: the default capabilities place it on the host.
        let gpu = super::super::placement::GpuCapabilities::default();
        assert_eq!(gpu.place(&family), super::super::Device::Cpu);
    }

    #[test]
    fn a_fused_router_is_the_router_stage_with_its_hidden_width() {
        let mut g = Graph::new("router");
        let x = g
            .input(
                "x",
                InputKind::Activation,
                DType::BF16,
                shape!["batch", 1, 64],
            )
            .unwrap();
        let w = g
            .input("w", InputKind::Weight, DType::BF16, shape![8, 64])
            .unwrap();
        let op = Op::MoeRouterLinear {
            top_k: 2,
            normalize: true,
        };
        let routed = g.add("router", op, &[x, w]).unwrap();
        let family = classify(&g, &g.nodes[routed[0].node]);
        let Family::Moe {
            stage,
            tokens,
            top_k: 2,
            dtype: DType::BF16,
        } = &family
        else {
            panic!("{family:?}")
        };
        assert_eq!(
            *stage,
            MoeStage::Router {
                experts: 8,
                normalize: true,
                hidden: Some(64),
            }
        );
        assert_eq!(tokens.to_string(), "batch");
        assert_eq!(
            family.describe(),
            "moe router linear hidden=64 normalized experts=8 bf16 top_k=2"
        );
    }

    /// The combine kernel reads the routing weights as f32: weights in the model's dtype (as
    /// a graph that casts them, like Hugging Face's Mixtral) keep the combine off the GPU.
    #[test]
    fn a_combine_with_half_routing_weights_is_host_only() {
        for (weights_dtype, on_gpu) in [(DType::F32, true), (DType::BF16, false)] {
            let mut g = Graph::new("combine");
            let act = InputKind::Activation;
            let y = g.input("y", act, DType::BF16, shape![4, 2, 64]).unwrap();
            let order = g.input("order", act, DType::I32, shape![4, 2]).unwrap();
            let w = g.input("w", act, weights_dtype, shape![4, 2]).unwrap();
            let out = g.add1("combine", Op::MoeCombine, &[y, order, w]).unwrap();
            let family = classify(&g, &g.nodes[out.node]);
            assert_eq!(
                matches!(family, Family::Moe { .. }),
                on_gpu,
                "{weights_dtype}: {family:?}"
            );
        }
    }

    #[test]
    fn a_router_stage_without_hidden_reads_stored_logits_in_json() {
        // Plans written before the fusion have no `hidden`; plain routers still write none.
        let old = r#"{"stage": "router", "experts": 8, "normalize": true}"#;
        let stage: MoeStage = serde_json::from_str(old).unwrap();
        let plain = MoeStage::Router {
            experts: 8,
            normalize: true,
            hidden: None,
        };
        assert_eq!(stage, plain);
        assert!(!serde_json::to_string(&plain).unwrap().contains("hidden"));
    }
}
