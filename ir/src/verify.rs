//! Type inference and graph verification.
//!
//! Owns the type rule of every op ([`infer`]: operand types in, result types out, or a
//! [`TypeError`] saying what was expected) and [`verify_graph`], which re-checks a whole graph
//! and reports the node, its label and its op ([`VerifyError`]). It must not execute anything.

use crate::dtype::DType;
use crate::graph::{Graph, TensorType, ValueId, ValueRefError};
use crate::op::Op;
use crate::quest::QuestError;
use crate::shape::{Dim, Shape};
use std::collections::HashSet;

/// A graph that is not well formed: which node, which op, what was expected.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("node %{node} `{label}` ({op}): {message}")]
pub struct VerifyError {
    pub node: usize,
    pub label: String,
    pub op: &'static str,
    /// What is wrong with the node (boxed: graph building returns this error everywhere).
    #[source]
    pub message: Box<VerifyProblem>,
}

/// What is wrong with one node of a graph (or one named output), for [`VerifyError`].
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum VerifyProblem {
    /// An operand that names no value.
    #[error(transparent)]
    Operand(#[from] ValueRefError),
    /// The op's type rule rejects the operand types.
    #[error(transparent)]
    Type(#[from] TypeError),
    /// An operand that is not an earlier node's value.
    #[error("operand {value} does not come before this node")]
    LaterOperand { value: ValueId },
    /// Two graph inputs of one name.
    #[error("input name `{name}` is used twice")]
    DuplicateInput { name: String },
    /// Two graph outputs of one name.
    #[error("output name `{name}` is used twice")]
    DuplicateOutput { name: String },
    /// Recorded result types that the type rule does not give.
    #[error(
        "records result types ({}) but its operands give ({})",
        show_types(recorded),
        show_types(inferred)
    )]
    ResultTypes {
        recorded: Vec<TensorType>,
        inferred: Vec<TensorType>,
    },
}

fn show_types(types: &[TensorType]) -> String {
    types
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn show_end(end: &Option<i64>) -> String {
    end.map_or("end".to_string(), |e| e.to_string())
}

/// Why an op does not apply to operands of the given types (or with the given attributes):
/// the type rules' errors, each naming the operand, dimension or attribute at fault.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum TypeError {
    #[error("expected {expected} operands, got {found}")]
    OperandCount { expected: usize, found: usize },
    #[error("expected at least one operand")]
    NoOperands,
    #[error("expected 1 or 2 operands (scores[, lengths]), got {found}")]
    MaskOperandCount { found: usize },
    #[error("{what} must be a float tensor, got {ty}")]
    NotFloat { what: String, ty: TensorType },
    #[error("{what} must be {expected}, got {ty}")]
    WrongDType {
        what: String,
        ty: TensorType,
        expected: DType,
    },
    #[error("{what} must have rank {rank}, got {ty}")]
    WrongRank {
        what: String,
        ty: TensorType,
        rank: usize,
    },
    #[error("{what} must have rank at least {rank}, got {ty}")]
    RankTooLow {
        what: String,
        ty: TensorType,
        rank: usize,
    },
    #[error("{a_name} ({a}) and {b_name} ({b}) must have the same dtype")]
    DTypeMismatch {
        a_name: String,
        a: TensorType,
        b_name: String,
        b: TensorType,
    },
    #[error("{what} is {found}, expected {expected}")]
    WrongDim {
        what: String,
        found: Dim,
        expected: Dim,
    },
    #[error("shapes {a} and {b} do not broadcast: dimension {x} against {y}")]
    Broadcast { a: Shape, b: Shape, x: Dim, y: Dim },
    #[error(
        "slice {start}..{} is out of range for a dimension of {size}",
        show_end(end)
    )]
    SliceOutOfRange {
        start: i64,
        end: Option<i64>,
        size: usize,
    },
    #[error("slice {start}..{end:?} of symbolic dimension `{name}` has no fixed length")]
    SliceOfSymbolic {
        start: i64,
        end: Option<i64>,
        name: String,
    },
    #[error("axis {axis} is out of range for {ty}")]
    AxisOutOfRange { axis: usize, ty: TensorType },
    #[error("eps must be positive and finite, got {eps}")]
    Eps { eps: f32 },
    #[error("batch dimensions of a ({a}) and b ({b}) differ")]
    BatchDims { a: TensorType, b: TensorType },
    #[error("positions {positions} must match the input's [B, S] = [{batch}, {seq}]")]
    Positions {
        positions: Shape,
        batch: Dim,
        seq: Dim,
    },
    #[error("head_dim must be a known even size, got {head_dim}")]
    HeadDim { head_dim: Dim },
    #[error("theta must be finite and > 1, got {theta}")]
    Theta { theta: f32 },
    #[error("k ({k}) and v ({v}) must have the same shape")]
    KvShapes { k: TensorType, v: TensorType },
    #[error("query heads ({q_heads}) must be a known multiple of KV heads ({kv_heads})")]
    HeadGroups { q_heads: Dim, kv_heads: Dim },
    #[error("scale must be positive and finite, got {scale}")]
    Scale { scale: f32 },
    #[error(
        "quest decode attention takes one new token per sequence: q's tokens must be 1, got \
         {tokens}"
    )]
    QuestTokens { tokens: Dim },
    /// Quest options out of range.
    #[error(transparent)]
    Quest(#[from] QuestError),
    #[error("k = {k} must be in 1..={n} (the last dimension)")]
    TopK { k: usize, n: usize },
    #[error("top_k = {top_k} must be in 1..={experts} (the number of experts)")]
    RouterTopK { top_k: usize, experts: usize },
    #[error("num_experts must be at least 1")]
    NoExperts,
    #[error("order ({order}) must have x's leading dimensions ({x}) and a last dimension k")]
    ExpertOrder { order: TensorType, x: TensorType },
    #[error("offsets must be i32[{expected}], got {offsets}")]
    ExpertOffsets {
        expected: usize,
        offsets: TensorType,
    },
    #[error("expert {expert} {name} weight must be {expected}, got {ty}")]
    ExpertWeight {
        expert: usize,
        name: &'static str,
        expected: Shape,
        ty: TensorType,
    },
    #[error("y ({y}) must be order's shape ({order}) plus H")]
    CombineValues { y: TensorType, order: TensorType },
    #[error("weights ({weights}) must have order's shape ({order})")]
    CombineWeights {
        weights: TensorType,
        order: TensorType,
    },
    #[error("cannot reshape {from} into {to}: element counts differ")]
    Reshape { from: Shape, to: Shape },
    #[error(
        "perm {perm:?} is not a permutation of the {} axes of {ty}",
        ty.shape.rank()
    )]
    Permutation { perm: Vec<usize>, ty: TensorType },
    #[error("operand {index} ({ty}) differs from operand 0 ({first}) off the concat axis")]
    ConcatShapes {
        index: usize,
        ty: TensorType,
        first: TensorType,
    },
    #[error("operand {index} ({ty}) has a symbolic size on the concat axis")]
    ConcatSymbolic { index: usize, ty: TensorType },
    #[error("{name} must be {expected}, got {ty}")]
    QuantParams {
        name: &'static str,
        expected: TensorType,
        ty: TensorType,
    },
    #[error("dequantize must produce a float dtype, not {to}")]
    DequantizeTo { to: DType },
    #[error("weight rows must be a known even size (gate and up stacked), got {weight}")]
    SwiGluRows { weight: TensorType },
    #[error("addend {addend} must broadcast to the product {product} without enlarging it")]
    Addend {
        addend: TensorType,
        product: TensorType,
    },
    #[error("input ({x}) and residual ({residual}) must have the same type")]
    Residual { x: TensorType, residual: TensorType },
    #[error("a fused map needs at least one step")]
    NoSteps,
    #[error("step {step} reads operand {index}, but there are {operands}")]
    StepOperand {
        step: usize,
        index: usize,
        operands: usize,
    },
    #[error("step {step} reads step {read}, which does not come before it")]
    StepOrder { step: usize, read: usize },
    #[error("operand {index} is not read by any step")]
    UnusedOperand { index: usize },
    #[error("step {step} is computed but never used")]
    UnusedStep { step: usize },
    #[error("bits must be 4 or 8, got {bits}")]
    QuantBits { bits: u8 },
    #[error("clip must be in (0, 1], got {clip}")]
    QuantClip { clip: f32 },
    #[error("the quantized axis must be the known last dimension, got {shape}")]
    QuantAxis { shape: Shape },
    #[error("group size {group_size} must divide the last dimension {last}")]
    QuantGroup { group_size: usize, last: usize },
}

type Rule = Result<Vec<TensorType>, TypeError>;

fn expect_count(operands: &[TensorType], count: usize) -> Result<(), TypeError> {
    if operands.len() != count {
        return Err(TypeError::OperandCount {
            expected: count,
            found: operands.len(),
        });
    }
    Ok(())
}

fn expect_float(what: &str, ty: &TensorType) -> Result<(), TypeError> {
    if !ty.dtype.is_float() {
        return Err(TypeError::NotFloat {
            what: what.to_string(),
            ty: ty.clone(),
        });
    }
    Ok(())
}

fn expect_dtype(what: &str, ty: &TensorType, dtype: DType) -> Result<(), TypeError> {
    if ty.dtype != dtype {
        return Err(TypeError::WrongDType {
            what: what.to_string(),
            ty: ty.clone(),
            expected: dtype,
        });
    }
    Ok(())
}

fn expect_rank(what: &str, ty: &TensorType, rank: usize) -> Result<(), TypeError> {
    if ty.shape.rank() != rank {
        return Err(TypeError::WrongRank {
            what: what.to_string(),
            ty: ty.clone(),
            rank,
        });
    }
    Ok(())
}

fn expect_min_rank(what: &str, ty: &TensorType, rank: usize) -> Result<(), TypeError> {
    if ty.shape.rank() < rank {
        return Err(TypeError::RankTooLow {
            what: what.to_string(),
            ty: ty.clone(),
            rank,
        });
    }
    Ok(())
}

fn expect_same_dtype(
    a_name: &str,
    a: &TensorType,
    b_name: &str,
    b: &TensorType,
) -> Result<(), TypeError> {
    if a.dtype != b.dtype {
        return Err(TypeError::DTypeMismatch {
            a_name: a_name.to_string(),
            a: a.clone(),
            b_name: b_name.to_string(),
            b: b.clone(),
        });
    }
    Ok(())
}

fn expect_dim(what: &str, found: &Dim, expected: &Dim) -> Result<(), TypeError> {
    if found != expected {
        return Err(TypeError::WrongDim {
            what: what.to_string(),
            found: found.clone(),
            expected: expected.clone(),
        });
    }
    Ok(())
}

fn dims(ty: &TensorType) -> &[Dim] {
    ty.shape.dims()
}

fn with_last(shape: &Shape, last: Dim) -> Shape {
    let mut dims = shape.0.clone();
    *dims.last_mut().expect("rank checked") = last;
    Shape(dims)
}

fn append(shape: &Shape, extra: &[Dim]) -> Shape {
    let mut dims = shape.0.clone();
    dims.extend_from_slice(extra);
    Shape(dims)
}

fn leading(shape: &Shape) -> Shape {
    Shape(shape.0[..shape.rank() - 1].to_vec())
}

/// Broadcasts two shapes numpy-style: dimensions align from the right; equal or `1` match.
pub fn broadcast(a: &Shape, b: &Shape) -> Result<Shape, TypeError> {
    let rank = a.rank().max(b.rank());
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let da = (i + a.rank()).checked_sub(rank).map(|j| &a.0[j]);
        let db = (i + b.rank()).checked_sub(rank).map(|j| &b.0[j]);
        let dim = match (da, db) {
            (Some(x), None) | (None, Some(x)) => x.clone(),
            (Some(x), Some(y)) if x == y => x.clone(),
            (Some(Dim::Const(1)), Some(y)) => y.clone(),
            (Some(x), Some(Dim::Const(1))) => x.clone(),
            (Some(x), Some(y)) => {
                return Err(TypeError::Broadcast {
                    a: a.clone(),
                    b: b.clone(),
                    x: x.clone(),
                    y: y.clone(),
                })
            }
            (None, None) => unreachable!("i < rank of one of them"),
        };
        out.push(dim);
    }
    Ok(Shape(out))
}

fn resolve_slice(dim: &Dim, start: i64, end: Option<i64>) -> Result<Dim, TypeError> {
    match dim {
        Dim::Const(n) => {
            let size = *n;
            let n = size as i64;
            let fix = |v: i64| if v < 0 { v + n } else { v };
            let (s, e) = (fix(start), fix(end.unwrap_or(n)));
            if s < 0 || e > n || s > e {
                return Err(TypeError::SliceOutOfRange { start, end, size });
            }
            Ok(Dim::Const((e - s) as usize))
        }
        Dim::Sym(name) => match (start, end) {
            (0, None) => Ok(dim.clone()),
            (s, None) if s < 0 => Ok(Dim::Const((-s) as usize)),
            (s, Some(e)) if s >= 0 && e >= s => Ok(Dim::Const((e - s) as usize)),
            (s, Some(e)) if s < 0 && e < 0 && e >= s => Ok(Dim::Const((e - s) as usize)),
            _ => Err(TypeError::SliceOfSymbolic {
                start,
                end,
                name: name.clone(),
            }),
        },
    }
}

/// The result types of `op` applied to operands of types `operands`, or what was expected.
pub fn infer(op: &Op, operands: &[TensorType]) -> Rule {
    match op {
        Op::Input { dtype, shape, .. } => {
            expect_count(operands, 0)?;
            Ok(vec![TensorType::new(*dtype, shape.clone())])
        }
        Op::Constant { dtype, .. } => {
            expect_count(operands, 0)?;
            Ok(vec![TensorType::new(*dtype, Shape::default())])
        }
        Op::Embedding => {
            expect_count(operands, 2)?;
            let (table, ids) = (&operands[0], &operands[1]);
            expect_float("embedding table", table)?;
            expect_rank("embedding table", table, 2)?;
            expect_dtype("token ids", ids, DType::I32)?;
            Ok(vec![TensorType::new(
                table.dtype,
                append(&ids.shape, &dims(table)[1..]),
            )])
        }
        Op::RmsNorm { eps } => {
            expect_count(operands, 2)?;
            let (x, weight) = (&operands[0], &operands[1]);
            expect_float("input", x)?;
            expect_min_rank("input", x, 1)?;
            expect_same_dtype("input", x, "weight", weight)?;
            expect_rank("weight", weight, 1)?;
            expect_dim(
                "weight length",
                &dims(weight)[0],
                x.shape.last().expect("rank ≥ 1"),
            )?;
            if !(*eps > 0.0 && eps.is_finite()) {
                return Err(TypeError::Eps { eps: *eps });
            }
            Ok(vec![x.clone()])
        }
        Op::Linear => {
            expect_count(operands, 2)?;
            let (x, weight) = (&operands[0], &operands[1]);
            expect_float("input", x)?;
            expect_min_rank("input", x, 1)?;
            expect_rank("weight", weight, 2)?;
            expect_same_dtype("input", x, "weight", weight)?;
            expect_dim(
                "weight [N, K]: K",
                &dims(weight)[1],
                x.shape.last().expect("rank ≥ 1"),
            )?;
            Ok(vec![TensorType::new(
                x.dtype,
                with_last(&x.shape, dims(weight)[0].clone()),
            )])
        }
        Op::MatMul => {
            expect_count(operands, 2)?;
            let (a, b) = (&operands[0], &operands[1]);
            expect_float("a", a)?;
            expect_same_dtype("a", a, "b", b)?;
            expect_min_rank("a", a, 2)?;
            expect_rank("b", b, a.shape.rank())?;
            let r = a.shape.rank();
            if dims(a)[..r - 2] != dims(b)[..r - 2] {
                return Err(TypeError::BatchDims {
                    a: a.clone(),
                    b: b.clone(),
                });
            }
            expect_dim("b's rows (K)", &dims(b)[r - 2], &dims(a)[r - 1])?;
            let mut out = dims(a)[..r - 1].to_vec();
            out.push(dims(b)[r - 1].clone());
            Ok(vec![TensorType::new(a.dtype, Shape(out))])
        }
        Op::Rope { theta } => {
            expect_count(operands, 2)?;
            let (x, positions) = (&operands[0], &operands[1]);
            expect_float("input", x)?;
            expect_rank("input [B, S, heads, D]", x, 4)?;
            expect_dtype("positions", positions, DType::I32)?;
            expect_rank("positions [B, S]", positions, 2)?;
            if dims(positions) != &dims(x)[..2] {
                return Err(TypeError::Positions {
                    positions: positions.shape.clone(),
                    batch: dims(x)[0].clone(),
                    seq: dims(x)[1].clone(),
                });
            }
            if dims(x)[3].as_const().is_none_or(|d| d % 2 != 0) {
                return Err(TypeError::HeadDim {
                    head_dim: dims(x)[3].clone(),
                });
            }
            if !(*theta > 1.0 && theta.is_finite()) {
                return Err(TypeError::Theta { theta: *theta });
            }
            Ok(vec![x.clone()])
        }
        Op::Attention { scale, .. } | Op::AttentionDecode { scale } => {
            let decode = matches!(op, Op::AttentionDecode { .. });
            expect_count(operands, if decode { 4 } else { 3 })?;
            let (q, k, v) = (&operands[0], &operands[1], &operands[2]);
            expect_float("q", q)?;
            for (name, ty) in [("q", q), ("k", k), ("v", v)] {
                expect_rank(&format!("{name} [B, tokens, heads, D]"), ty, 4)?;
                expect_same_dtype("q", q, name, ty)?;
            }
            if k.shape != v.shape {
                return Err(TypeError::KvShapes {
                    k: k.clone(),
                    v: v.clone(),
                });
            }
            expect_dim("k's batch", &dims(k)[0], &dims(q)[0])?;
            expect_dim("k's head_dim", &dims(k)[3], &dims(q)[3])?;
            match (dims(q)[2].as_const(), dims(k)[2].as_const()) {
                (Some(hq), Some(hkv)) if hkv > 0 && hq % hkv == 0 => {}
                _ => {
                    return Err(TypeError::HeadGroups {
                        q_heads: dims(q)[2].clone(),
                        kv_heads: dims(k)[2].clone(),
                    })
                }
            }
            if decode {
                let lengths = &operands[3];
                expect_dtype("lengths", lengths, DType::I32)?;
                expect_rank("lengths [B]", lengths, 1)?;
                expect_dim("lengths' batch", &dims(lengths)[0], &dims(q)[0])?;
            }
            if !(*scale > 0.0 && scale.is_finite()) {
                return Err(TypeError::Scale { scale: *scale });
            }
            Ok(vec![q.clone()])
        }
        Op::QuestAttentionDecode {
            scale,
            budget_tokens,
            page_size,
        } => {
            // The operands of `AttentionDecode`, one new token per sequence, valid options.
            let result = infer(&Op::AttentionDecode { scale: *scale }, operands)?;
            if dims(&operands[0])[1] != Dim::Const(1) {
                return Err(TypeError::QuestTokens {
                    tokens: dims(&operands[0])[1].clone(),
                });
            }
            let options = crate::quest::QuestOptions {
                budget_tokens: *budget_tokens,
                page_size: *page_size,
                skip_layers: 0,
            };
            options.validate()?;
            Ok(result)
        }
        Op::KvAppend => {
            expect_count(operands, 3)?;
            let (cache, new, start) = (&operands[0], &operands[1], &operands[2]);
            expect_rank("cache [B, C, Hkv, D]", cache, 4)?;
            expect_rank("new [B, S, Hkv, D]", new, 4)?;
            expect_same_dtype("cache", cache, "new", new)?;
            expect_dim("new's batch", &dims(new)[0], &dims(cache)[0])?;
            expect_dim("new's KV heads", &dims(new)[2], &dims(cache)[2])?;
            expect_dim("new's head_dim", &dims(new)[3], &dims(cache)[3])?;
            expect_dtype("start", start, DType::I32)?;
            expect_rank("start [B]", start, 1)?;
            expect_dim("start's batch", &dims(start)[0], &dims(cache)[0])?;
            Ok(vec![cache.clone()])
        }
        Op::Silu | Op::Sigmoid | Op::Softmax => {
            expect_count(operands, 1)?;
            expect_float("input", &operands[0])?;
            if matches!(op, Op::Softmax) {
                expect_min_rank("input", &operands[0], 1)?;
            }
            Ok(vec![operands[0].clone()])
        }
        Op::Add | Op::Mul => {
            expect_count(operands, 2)?;
            let (a, b) = (&operands[0], &operands[1]);
            expect_same_dtype("a", a, "b", b)?;
            Ok(vec![TensorType::new(
                a.dtype,
                broadcast(&a.shape, &b.shape)?,
            )])
        }
        Op::TopK { k } => {
            expect_count(operands, 1)?;
            let x = &operands[0];
            expect_min_rank("input", x, 1)?;
            if let Some(n) = x.shape.last().and_then(Dim::as_const) {
                if *k == 0 || *k > n {
                    return Err(TypeError::TopK { k: *k, n });
                }
            }
            let shape = with_last(&x.shape, Dim::Const(*k));
            Ok(vec![
                TensorType::new(x.dtype, shape.clone()),
                TensorType::new(DType::I32, shape),
            ])
        }
        Op::MoeRouter { top_k, .. } => {
            expect_count(operands, 1)?;
            let logits = &operands[0];
            expect_float("router logits", logits)?;
            expect_min_rank("router logits [.., E]", logits, 1)?;
            let experts = logits.shape.last().and_then(Dim::as_const).unwrap_or(0);
            if *top_k == 0 || *top_k > experts {
                return Err(TypeError::RouterTopK {
                    top_k: *top_k,
                    experts,
                });
            }
            let shape = with_last(&logits.shape, Dim::Const(*top_k));
            Ok(vec![
                TensorType::new(DType::F32, shape.clone()),
                TensorType::new(DType::I32, shape),
            ])
        }
        Op::MoeDispatch { num_experts } => {
            expect_count(operands, 1)?;
            let experts = &operands[0];
            expect_dtype("experts", experts, DType::I32)?;
            expect_min_rank("experts [.., k]", experts, 1)?;
            if *num_experts == 0 {
                return Err(TypeError::NoExperts);
            }
            Ok(vec![
                TensorType::new(DType::I32, experts.shape.clone()),
                TensorType::new(DType::I32, Shape::of(&[num_experts + 1])),
            ])
        }
        Op::MoeExpertFfn { num_experts } => {
            if *num_experts == 0 {
                return Err(TypeError::NoExperts);
            }
            expect_count(operands, 3 + 3 * num_experts)?;
            let (x, order, offsets) = (&operands[0], &operands[1], &operands[2]);
            expect_float("x", x)?;
            expect_min_rank("x [.., H]", x, 1)?;
            expect_dtype("order", order, DType::I32)?;
            if leading(&order.shape) != leading(&x.shape) {
                return Err(TypeError::ExpertOrder {
                    order: order.clone(),
                    x: x.clone(),
                });
            }
            expect_dtype("offsets", offsets, DType::I32)?;
            if offsets.shape != Shape::of(&[num_experts + 1]) {
                return Err(TypeError::ExpertOffsets {
                    expected: num_experts + 1,
                    offsets: offsets.clone(),
                });
            }
            let hidden = x.shape.last().expect("rank ≥ 1").clone();
            let width = dims(&operands[3]).first().cloned().unwrap_or(Dim::Const(0));
            for expert in 0..*num_experts {
                let base = 3 + 3 * expert;
                let expected = [
                    ("gate", Shape(vec![width.clone(), hidden.clone()])),
                    ("up", Shape(vec![width.clone(), hidden.clone()])),
                    ("down", Shape(vec![hidden.clone(), width.clone()])),
                ];
                for (offset, (name, shape)) in expected.iter().enumerate() {
                    let ty = &operands[base + offset];
                    expect_same_dtype("x", x, &format!("expert {expert} {name}"), ty)?;
                    if &ty.shape != shape {
                        return Err(TypeError::ExpertWeight {
                            expert,
                            name,
                            expected: shape.clone(),
                            ty: ty.clone(),
                        });
                    }
                }
            }
            Ok(vec![TensorType::new(
                x.dtype,
                append(&order.shape, std::slice::from_ref(&hidden)),
            )])
        }
        Op::MoeCombine => {
            expect_count(operands, 3)?;
            let (y, order, weights) = (&operands[0], &operands[1], &operands[2]);
            expect_float("y", y)?;
            expect_min_rank("y [.., k, H]", y, 2)?;
            expect_dtype("order", order, DType::I32)?;
            if leading(&y.shape) != order.shape {
                return Err(TypeError::CombineValues {
                    y: y.clone(),
                    order: order.clone(),
                });
            }
            expect_float("weights", weights)?;
            if weights.shape != order.shape {
                return Err(TypeError::CombineWeights {
                    weights: weights.clone(),
                    order: order.clone(),
                });
            }
            let mut out = leading(&order.shape);
            out.0.push(y.shape.last().expect("rank ≥ 2").clone());
            Ok(vec![TensorType::new(y.dtype, out)])
        }
        Op::Reshape { shape } => {
            expect_count(operands, 1)?;
            let x = &operands[0];
            if x.shape.symbolic_product() != shape.symbolic_product() {
                return Err(TypeError::Reshape {
                    from: x.shape.clone(),
                    to: shape.clone(),
                });
            }
            Ok(vec![TensorType::new(x.dtype, shape.clone())])
        }
        Op::Transpose { perm } => {
            expect_count(operands, 1)?;
            let x = &operands[0];
            let mut seen = vec![false; x.shape.rank()];
            if perm.len() != x.shape.rank()
                || perm
                    .iter()
                    .any(|&p| p >= seen.len() || std::mem::replace(&mut seen[p], true))
            {
                return Err(TypeError::Permutation {
                    perm: perm.clone(),
                    ty: x.clone(),
                });
            }
            let out = perm.iter().map(|&p| dims(x)[p].clone()).collect();
            Ok(vec![TensorType::new(x.dtype, Shape(out))])
        }
        Op::Slice { axis, start, end } => {
            expect_count(operands, 1)?;
            let x = &operands[0];
            if *axis >= x.shape.rank() {
                return Err(TypeError::AxisOutOfRange {
                    axis: *axis,
                    ty: x.clone(),
                });
            }
            let mut out = x.shape.clone();
            out.0[*axis] = resolve_slice(&dims(x)[*axis], *start, *end)?;
            Ok(vec![TensorType::new(x.dtype, out)])
        }
        Op::Concat { axis } => {
            if operands.is_empty() {
                return Err(TypeError::NoOperands);
            }
            let first = &operands[0];
            if *axis >= first.shape.rank() {
                return Err(TypeError::AxisOutOfRange {
                    axis: *axis,
                    ty: first.clone(),
                });
            }
            let mut total = 0usize;
            for (i, ty) in operands.iter().enumerate() {
                expect_same_dtype("operand 0", first, &format!("operand {i}"), ty)?;
                expect_rank(&format!("operand {i}"), ty, first.shape.rank())?;
                for d in 0..first.shape.rank() {
                    if d != *axis && dims(ty)[d] != dims(first)[d] {
                        return Err(TypeError::ConcatShapes {
                            index: i,
                            ty: ty.clone(),
                            first: first.clone(),
                        });
                    }
                }
                match dims(ty)[*axis].as_const() {
                    Some(n) => total += n,
                    None if operands.len() == 1 => {}
                    None => {
                        return Err(TypeError::ConcatSymbolic {
                            index: i,
                            ty: ty.clone(),
                        })
                    }
                }
            }
            let mut out = first.shape.clone();
            if operands.len() > 1 {
                out.0[*axis] = Dim::Const(total);
            }
            Ok(vec![TensorType::new(first.dtype, out)])
        }
        Op::Cast { to } => {
            expect_count(operands, 1)?;
            Ok(vec![TensorType::new(*to, operands[0].shape.clone())])
        }
        Op::Quantize { scheme } => {
            expect_count(operands, 1)?;
            let x = &operands[0];
            expect_float("input", x)?;
            let groups = check_scheme(scheme, &x.shape)?;
            let scale = TensorType::new(DType::F16, with_last(&x.shape, Dim::Const(groups)));
            let mut out = vec![
                TensorType::new(scheme.value_dtype(), x.shape.clone()),
                scale.clone(),
            ];
            if !scheme.symmetric {
                out.push(scale);
            }
            Ok(out)
        }
        Op::Dequantize { scheme, to } => {
            expect_count(operands, if scheme.symmetric { 2 } else { 3 })?;
            let q = &operands[0];
            expect_dtype("quantized values", q, scheme.value_dtype())?;
            let groups = check_scheme(scheme, &q.shape)?;
            let expected = TensorType::new(DType::F16, with_last(&q.shape, Dim::Const(groups)));
            for (name, ty) in ["scale", "zero"].iter().zip(&operands[1..]) {
                if *ty != expected {
                    return Err(TypeError::QuantParams {
                        name,
                        expected: expected.clone(),
                        ty: ty.clone(),
                    });
                }
            }
            if !to.is_float() {
                return Err(TypeError::DequantizeTo { to: *to });
            }
            Ok(vec![TensorType::new(*to, q.shape.clone())])
        }
        Op::FusedMap { steps } => {
            let first = operands.first().ok_or(TypeError::NoOperands)?;
            expect_float("operand 0", first)?;
            let mut shape = first.shape.clone();
            for (i, ty) in operands.iter().enumerate() {
                expect_same_dtype("operand 0", first, &format!("operand {i}"), ty)?;
                shape = broadcast(&shape, &ty.shape)?;
            }
            check_map_steps(steps, operands.len())?;
            Ok(vec![TensorType::new(first.dtype, shape)])
        }
        Op::SwiGluLinear => {
            expect_count(operands, 2)?;
            let (x, weight) = (&operands[0], &operands[1]);
            expect_float("input", x)?;
            expect_min_rank("input", x, 1)?;
            expect_rank("weight [2I, H]", weight, 2)?;
            expect_same_dtype("input", x, "weight", weight)?;
            expect_dim(
                "weight [2I, H]: H",
                &dims(weight)[1],
                x.shape.last().expect("rank ≥ 1"),
            )?;
            let width = match dims(weight)[0].as_const() {
                Some(rows) if rows % 2 == 0 && rows > 0 => rows / 2,
                _ => {
                    return Err(TypeError::SwiGluRows {
                        weight: weight.clone(),
                    })
                }
            };
            Ok(vec![TensorType::new(
                x.dtype,
                with_last(&x.shape, Dim::Const(width)),
            )])
        }
        Op::LinearAdd => {
            expect_count(operands, 3)?;
            let out = infer(&Op::Linear, &operands[..2])?.remove(0);
            let addend = &operands[2];
            expect_same_dtype("input", &operands[0], "addend", addend)?;
            if broadcast(&out.shape, &addend.shape)? != out.shape {
                return Err(TypeError::Addend {
                    addend: addend.clone(),
                    product: out,
                });
            }
            Ok(vec![out])
        }
        Op::AddRmsNorm { eps } => {
            expect_count(operands, 3)?;
            let (x, residual) = (&operands[0], &operands[1]);
            if x != residual {
                return Err(TypeError::Residual {
                    x: x.clone(),
                    residual: residual.clone(),
                });
            }
            let normed = infer(
                &Op::RmsNorm { eps: *eps },
                &[x.clone(), operands[2].clone()],
            )?
            .remove(0);
            Ok(vec![normed.clone(), normed])
        }
        Op::MoeRouterLinear { top_k, normalize } => {
            expect_count(operands, 2)?;
            let logits = infer(&Op::Linear, operands)?;
            infer(
                &Op::MoeRouter {
                    top_k: *top_k,
                    normalize: *normalize,
                },
                &logits,
            )
        }
        Op::AtomLinear {
            group_size,
            outliers,
            activation_clip,
        } => {
            expect_count(operands, 6)?;
            let x = &operands[0];
            expect_float("input", x)?;
            expect_min_rank("input", x, 1)?;
            let k = x
                .shape
                .last()
                .and_then(Dim::as_const)
                .ok_or_else(|| TypeError::QuantAxis {
                    shape: x.shape.clone(),
                })?;
            let ordinary = k.saturating_sub(*outliers);
            let scheme = crate::op::QuantScheme {
                bits: 4,
                group_size: *group_size,
                symmetric: true,
                clip: *activation_clip,
            };
            let groups = check_scheme(&scheme, &Shape::of(&[ordinary]))?;
            let [permutation, int4, int4_scales, int8, int8_scales] =
                [1, 2, 3, 4, 5].map(|i| &operands[i]);
            expect_dtype("permutation", permutation, DType::I32)?;
            expect_rank("permutation [K]", permutation, 1)?;
            expect_dim("permutation [K]: K", &dims(permutation)[0], &Dim::Const(k))?;
            expect_dtype("int4 weight", int4, DType::I4)?;
            expect_rank("int4 weight [N, K − outliers]", int4, 2)?;
            let n = dims(int4)[0].clone();
            for (what, ty, dtype, cols) in [
                ("int4 weight [N, K − outliers]", int4, DType::I4, ordinary),
                (
                    "int4 scales [N, (K − outliers) / group_size]",
                    int4_scales,
                    DType::F16,
                    groups,
                ),
                ("int8 weight [N, outliers]", int8, DType::I8, *outliers),
                ("int8 scales [N, 1]", int8_scales, DType::F16, 1),
            ] {
                expect_dtype(what, ty, dtype)?;
                expect_rank(what, ty, 2)?;
                expect_dim(what, &dims(ty)[0], &n)?;
                expect_dim(what, &dims(ty)[1], &Dim::Const(cols))?;
            }
            Ok(vec![TensorType::new(x.dtype, with_last(&x.shape, n))])
        }
        Op::QuantizedLinear { scheme } => {
            expect_count(operands, if scheme.symmetric { 3 } else { 4 })?;
            let x = &operands[0];
            expect_float("input", x)?;
            expect_rank("quantized weight [N, K]", &operands[1], 2)?;
            let weight = infer(
                &Op::Dequantize {
                    scheme: *scheme,
                    to: x.dtype,
                },
                &operands[1..],
            )?
            .remove(0);
            infer(&Op::Linear, &[x.clone(), weight])
        }
        Op::CausalMask => {
            if operands.is_empty() || operands.len() > 2 {
                return Err(TypeError::MaskOperandCount {
                    found: operands.len(),
                });
            }
            let scores = &operands[0];
            expect_float("scores", scores)?;
            expect_rank("scores [B, H, S, T]", scores, 4)?;
            if let Some(lengths) = operands.get(1) {
                expect_dtype("lengths", lengths, DType::I32)?;
                expect_rank("lengths [B]", lengths, 1)?;
                expect_dim("lengths' batch", &dims(lengths)[0], &dims(scores)[0])?;
            }
            let d = dims(scores);
            Ok(vec![TensorType::new(
                scores.dtype,
                Shape(vec![
                    d[0].clone(),
                    Dim::Const(1),
                    d[2].clone(),
                    d[3].clone(),
                ]),
            )])
        }
    }
}

/// Checks a [`crate::op::MapStep`] program over `operands` operands: indices in range, steps
/// reading only earlier steps, every operand and every step but the last used.
fn check_map_steps(steps: &[crate::op::MapStep], operands: usize) -> Result<(), TypeError> {
    use crate::op::MapStep;
    if steps.is_empty() {
        return Err(TypeError::NoSteps);
    }
    let mut operand_used = vec![false; operands];
    let mut step_used = vec![false; steps.len()];
    for (k, step) in steps.iter().enumerate() {
        let reads: &[usize] = match step {
            MapStep::Operand { index } => {
                if *index >= operands {
                    return Err(TypeError::StepOperand {
                        step: k,
                        index: *index,
                        operands,
                    });
                }
                operand_used[*index] = true;
                &[]
            }
            MapStep::Constant { .. } => &[],
            MapStep::Add { a, b } | MapStep::Mul { a, b } => &[*a, *b],
            MapStep::Silu { x } | MapStep::Sigmoid { x } => std::slice::from_ref(x),
        };
        for &r in reads {
            if r >= k {
                return Err(TypeError::StepOrder { step: k, read: r });
            }
            step_used[r] = true;
        }
    }
    if let Some(i) = operand_used.iter().position(|used| !used) {
        return Err(TypeError::UnusedOperand { index: i });
    }
    if let Some(k) = step_used[..steps.len() - 1].iter().position(|used| !used) {
        return Err(TypeError::UnusedStep { step: k });
    }
    Ok(())
}

/// Checks a quantisation scheme against the shape it applies to; returns the group count.
fn check_scheme(scheme: &crate::op::QuantScheme, shape: &Shape) -> Result<usize, TypeError> {
    if scheme.bits != 4 && scheme.bits != 8 {
        return Err(TypeError::QuantBits { bits: scheme.bits });
    }
    if !(scheme.clip > 0.0 && scheme.clip <= 1.0) {
        return Err(TypeError::QuantClip { clip: scheme.clip });
    }
    let last = shape
        .last()
        .and_then(Dim::as_const)
        .ok_or_else(|| TypeError::QuantAxis {
            shape: shape.clone(),
        })?;
    if scheme.group_size == 0 || last % scheme.group_size != 0 {
        return Err(TypeError::QuantGroup {
            group_size: scheme.group_size,
            last,
        });
    }
    Ok(last / scheme.group_size)
}

/// Re-checks every node of `graph`: operands refer to earlier values, recorded types match
/// the type rules, input names and output names are unique.
pub fn verify_graph(graph: &Graph) -> Result<(), VerifyError> {
    let mut input_names = HashSet::new();
    for (index, node) in graph.nodes.iter().enumerate() {
        let error = |problem: VerifyProblem| VerifyError {
            node: index,
            label: node.label.clone(),
            op: node.op.name(),
            message: Box::new(problem),
        };
        let mut operand_types = Vec::with_capacity(node.inputs.len());
        for value in &node.inputs {
            if value.node >= index {
                return Err(error(VerifyProblem::LaterOperand { value: *value }));
            }
            operand_types.push(
                graph
                    .value_type(*value)
                    .map_err(|e| error(e.into()))?
                    .clone(),
            );
        }
        if let Op::Input { name, .. } = &node.op {
            if !input_names.insert(name.clone()) {
                return Err(error(VerifyProblem::DuplicateInput { name: name.clone() }));
            }
        }
        let inferred = infer(&node.op, &operand_types).map_err(|e| error(e.into()))?;
        if inferred != node.outputs {
            return Err(error(VerifyProblem::ResultTypes {
                recorded: node.outputs.clone(),
                inferred,
            }));
        }
    }
    let mut output_names = HashSet::new();
    for (name, value) in &graph.outputs {
        let error = |problem: VerifyProblem| VerifyError {
            node: value.node,
            label: format!("output {name}"),
            op: "output",
            message: Box::new(problem),
        };
        graph.value_type(*value).map_err(|e| error(e.into()))?;
        if !output_names.insert(name.clone()) {
            return Err(error(VerifyProblem::DuplicateOutput { name: name.clone() }));
        }
    }
    Ok(())
}
