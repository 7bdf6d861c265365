//! Host steps on Cranelift kernels: the executor's side of `kiln_kernels::cpu_step`.
//!
//! Owns [`HostKernels`] (a plan's CPU step specs compiled once, at load, through the
//! process's [`CpuJit`]) and the running of one step: the linear's product on the dot kernel,
//! rounded to the step's dtype as the interpreter rounds it, then its epilogue map row by
//! row; a map over whole operands (broadcast operands expanded to the result's shape first);
//! and the copies and MoE routing bookkeeping (embedding gather, slice, KV append, concat,
//! dispatch, combine, the router's top-k, after its logits on the dot kernel when the
//! router's linear is fused), which are `kiln_ir::movement`'s, shared with the interpreter;
//! Atom's W4A4 linear: the activations permuted and quantized per token with
//! `kiln_ir::quant` (the interpreter's math, not the interpreter), the ordinary channels on
//! the int4 dot kernel against the weight packed two nibbles to a byte once, at load (per
//! call only when the weight is not a resident buffer), and the INT8 outliers in a plain
//! loop. Results are cast to the result dtype by the caller, as for every host step.
//! It must not build kernel IR (that is `kiln_codegen::cpu`) or decide which steps have
//! kernels (that is `kiln_kernels::cpu_step`).

use super::ExecError;
use crate::cpu::{
    AttentionShape, CpuAttention, CpuJit, DotKernel, DotShape, Int4DotKernel, MapKernel,
    Parallelism, RmsNormKernel, RopeKernel, SoftmaxKernel, SoftmaxShape,
};
use kiln_ir::dtype::DType;
use kiln_ir::movement;
use kiln_ir::quest::{self, QuestOptions};
use kiln_ir::schedule::{Device, LinearEpilogue, Schedule};
use kiln_ir::tensor::Tensor;
use kiln_kernels::cpu_step::CpuStep;
use std::sync::Arc;

/// One step's compiled kernels.
pub(super) enum HostKernel {
    Linear {
        dot: DotKernel,
        epilogue: Option<MapKernel>,
        kind: LinearEpilogue,
        width: usize,
        n: usize,
        k: usize,
        dtype: DType,
    },
    Map {
        map: MapKernel,
        broadcast: bool,
    },
    RmsNorm {
        plain: RmsNormKernel,
        fused: Option<RmsNormKernel>,
        eps: f32,
        dtype: DType,
    },
    Rope {
        rope: RopeKernel,
        heads: usize,
        head_dim: usize,
        theta: f32,
    },
    Attention {
        attention: CpuAttention,
        decode: bool,
        causal: bool,
        scale: f32,
    },
    MoeExperts {
        dot: DotKernel,
        activation: MapKernel,
        num_experts: usize,
        dtype: DType,
    },
    MoeRouter {
        softmax: SoftmaxKernel,
        top_k: usize,
        normalize: bool,
        /// With the router's linear fused: the logits' dot kernel and their dtype.
        linear: Option<(DotKernel, DType)>,
    },
    MoeDispatch {
        num_experts: usize,
    },
    MoeCombine,
    Gather,
    Slice {
        axis: usize,
        start: i64,
        end: Option<i64>,
    },
    KvAppend,
    QuestAttention {
        attention: CpuAttention,
        scale: f32,
        options: QuestOptions,
    },
    Softmax {
        softmax: SoftmaxKernel,
    },
    MatMul {
        dot: DotKernel,
    },
    TopK {
        k: usize,
    },
    Transpose {
        perm: Vec<usize>,
    },
    Concat {
        axis: usize,
    },
    Cast,
    CausalMask,
    AtomLinear {
        dot: Int4DotKernel,
        n: usize,
        k: usize,
        group_size: usize,
        outliers: usize,
        activation_clip: f32,
        /// The INT4 weight packed at load, when it is a resident buffer.
        packed: Option<PackedInt4>,
    },
}

/// An Atom INT4 weight as the int4 dot kernel reads it: `[n, k']` values `q` stored as
/// `q + 8`, two to a byte (low nibble first), and its `[n, k' / g]` f16 scales as f32.
pub(super) struct PackedInt4 {
    bytes: Vec<u8>,
    scales: Vec<f32>,
}

impl PackedInt4 {
    /// Packs `int4 [n, k']` (integers in [−8, 7], `k'` even) with `scales`.
    fn new(int4: &Tensor, scales: &Tensor) -> Result<PackedInt4, String> {
        if !int4.data.len().is_multiple_of(2) {
            return Err(format!(
                "an INT4 weight of {} values does not pack two to a byte",
                int4.data.len()
            ));
        }
        let nibble = |v: f32| -> Result<u8, String> {
            if (-8.0..=7.0).contains(&v) && v.fract() == 0.0 {
                Ok((v as i32 + 8) as u8)
            } else {
                Err(format!("INT4 weight value {v} outside [−8, 7]"))
            }
        };
        let bytes = int4
            .data
            .chunks_exact(2)
            .map(|pair| Ok(nibble(pair[0])? | (nibble(pair[1])? << 4)))
            .collect::<Result<_, String>>()?;
        Ok(PackedInt4 {
            bytes,
            scales: scales.data.clone(),
        })
    }
}

/// `AtomLinear` (see `CpuStep::AtomLinear`) on `operands` `(x, permutation, int4,
/// int4_scales, int8, int8_scales)`: `[rows, n]` in f32, before rounding to the dtype.
#[allow(clippy::too_many_arguments)]
fn atom_linear(
    dot: &Int4DotKernel,
    (n, k, group_size, outliers): (usize, usize, usize, usize),
    activation_clip: f32,
    packed: Option<&PackedInt4>,
    operands: &[&Tensor],
) -> Result<Vec<f32>, String> {
    let [x, permutation, int4, int4_scales, int8, int8_scales] = operands else {
        return Err(format!(
            "atom_linear takes 6 operands, got {}",
            operands.len()
        ));
    };
    if k == 0 || outliers >= k || !x.data.len().is_multiple_of(k) || permutation.data.len() != k {
        return Err(format!(
            "x of {} values and a permutation of {} for k {k}, {outliers} outliers",
            x.data.len(),
            permutation.data.len()
        ));
    }
    let rows = x.data.len() / k;
    let ordinary = k - outliers;
    if int8.data.len() != n * outliers || int8_scales.data.len() != n {
        return Err(format!(
            "INT8 block of {} values and {} scales for n {n}, {outliers} outliers",
            int8.data.len(),
            int8_scales.data.len()
        ));
    }
    let order: Vec<usize> = permutation
        .data
        .iter()
        .map(|&c| {
            (c >= 0.0 && (c as usize) < k)
                .then_some(c as usize)
                .ok_or_else(|| format!("permutation entry {c} outside 0..{k}"))
        })
        .collect::<Result<_, _>>()?;
    let mut low = Vec::with_capacity(rows * ordinary);
    let mut high = Vec::with_capacity(rows * outliers);
    for row in x.data.chunks_exact(k) {
        low.extend(order[..ordinary].iter().map(|&c| row[c]));
        high.extend(order[ordinary..].iter().map(|&c| row[c]));
    }
    let options = kiln_ir::atom::AtomOptions {
        group_size,
        outliers,
        activation_clip,
        ..kiln_ir::atom::AtomOptions::default()
    };
    // The ordinary channels: INT4 per token and group, handed to the kernel dequantized
    // (`q · scale`, an integer in [−8, 7] times an f16 value: exact in f32).
    let quantized = kiln_ir::quant::quantize(
        &Tensor::f32(&[rows, ordinary], low),
        &options.int4_scheme(activation_clip),
    );
    let (values, scales) = (&quantized[0].data, &quantized[1].data);
    let activations: Vec<f32> = values
        .iter()
        .enumerate()
        .map(|(i, &q)| q * scales[i / group_size])
        .collect();
    let per_call;
    let packed = match packed {
        Some(packed) => packed,
        None => {
            per_call = PackedInt4::new(int4, int4_scales)?;
            &per_call
        }
    };
    // NaN until the kernel writes it: an element it misses shows.
    let mut out = vec![f32::NAN; rows * n];
    dot.run(
        &activations,
        &packed.bytes,
        &packed.scales,
        &mut out,
        (rows, n, ordinary),
        Parallelism::Rayon,
    )
    .map_err(|e| format!("Cranelift kernel: {e}"))?;
    // The outlier channels: INT8 per token, integer products, scaled in f64 as the
    // interpreter scales them.
    if outliers > 0 {
        use rayon::prelude::*;
        let quantized = kiln_ir::quant::quantize(
            &Tensor::f32(&[rows, outliers], high),
            &options.int8_scheme(),
        );
        let (a8, s8) = (&quantized[0].data, &quantized[1].data);
        out.par_chunks_mut(n).enumerate().for_each(|(t, row)| {
            let a = &a8[t * outliers..(t + 1) * outliers];
            for (j, value) in row.iter_mut().enumerate() {
                let w = &int8.data[j * outliers..(j + 1) * outliers];
                let dot: i64 = a.iter().zip(w).map(|(&a, &w)| a as i64 * w as i64).sum();
                *value =
                    (*value as f64 + dot as f64 * s8[t] as f64 * int8_scales.data[j] as f64) as f32;
            }
        });
    }
    Ok(out)
}

/// The compiled kernels of a plan's host steps, by kernel index.
#[derive(Default)]
pub(super) struct HostKernels {
    pub(super) steps: Vec<Option<HostKernel>>,
}

/// `Concat { axis }` of `operands` (of equal rank, equal but for `axis`), copied; `None` for
/// any other op or operands that do not fit.
pub(super) fn concat(op: &kiln_ir::op::Op, operands: &[&Tensor]) -> Option<Tensor> {
    let kiln_ir::op::Op::Concat { axis } = op else {
        return None;
    };
    let first = operands.first()?;
    let fits = operands.iter().all(|x| {
        x.shape.len() == first.shape.len()
            && *axis < x.shape.len()
            && x.shape
                .iter()
                .zip(&first.shape)
                .enumerate()
                .all(|(i, (a, b))| i == *axis || a == b)
    });
    if !fits {
        return None;
    }
    let (shape, data) = movement::concat(operands, *axis);
    Some(Tensor {
        dtype: first.dtype,
        shape,
        data,
    })
}

/// A load-time op (over weights and constants): a concatenation, transpose or cast, copied;
/// `None` for any other op.
pub(super) fn load_time(
    op: &kiln_ir::op::Op,
    operands: &[&Tensor],
) -> Option<Result<Tensor, ExecError>> {
    use kiln_ir::op::Op;
    let first = operands.first()?;
    match op {
        Op::Concat { .. } => Some(concat(op, operands).ok_or_else(|| {
            ExecError::Internal(format!("load-time concat of {} operands", operands.len()))
        })),
        Op::Transpose { perm } => Some(
            movement::transpose(first, perm)
                .map(|(shape, data)| Tensor {
                    dtype: first.dtype,
                    shape,
                    data,
                })
                .map_err(|e| ExecError::Internal(format!("load-time transpose: {e}"))),
        ),
        Op::Cast { .. } => Some(Ok((*first).clone())),
        _ => None,
    }
}

/// Why the MoE experts step could not run: routing tables that do not describe the slots.
#[derive(Debug, thiserror::Error)]
enum MoeError {
    #[error(
        "the MoE experts step takes x, order, offsets and 3 weights per expert; got {0} operands"
    )]
    Operands(usize),
    #[error("offsets {offsets:?} do not partition the {slots} slots")]
    Offsets { offsets: Vec<f32>, slots: usize },
    #[error("slot {slot} routes token {token}, beyond the {tokens} tokens")]
    Token {
        slot: usize,
        token: usize,
        tokens: usize,
    },
    #[error(transparent)]
    Kernel(#[from] crate::cpu::CpuError),
}

/// `MoeExpertFfn` on the dot and map kernels (see `CpuStep::MoeExperts`): `out` row `p` is
/// the FFN of the expert whose offsets range holds `p`, applied to token `order[p] / k`.
fn moe_experts(
    dot: &DotKernel,
    activation: &MapKernel,
    num_experts: usize,
    dtype: DType,
    operands: &[&Tensor],
    elements: usize,
) -> Result<Vec<f32>, MoeError> {
    if operands.len() != 3 + 3 * num_experts {
        return Err(MoeError::Operands(operands.len()));
    }
    let (x, order, offsets) = (operands[0], operands[1], operands[2]);
    let hidden = x.shape.last().copied().unwrap_or(1).max(1);
    let tokens = x.data.len() / hidden;
    let k = order.shape.last().copied().unwrap_or(1).max(1);
    let slots = order.data.len();
    let bounds: Vec<usize> = offsets.data.iter().map(|&o| o as usize).collect();
    let partitions = bounds.len() == num_experts + 1
        && bounds.first() == Some(&0)
        && bounds.last() == Some(&slots)
        && bounds.windows(2).all(|w| w[0] <= w[1])
        && slots * hidden == elements;
    if !partitions {
        return Err(MoeError::Offsets {
            offsets: offsets.data.clone(),
            slots,
        });
    }
    let round = |values: &mut [f32]| {
        if dtype != DType::F32 {
            for value in values {
                *value = dtype.round(*value);
            }
        }
    };
    let parallel = Parallelism::Rayon;
    let mut out = vec![0.0f32; elements];
    for expert in 0..num_experts {
        let (first, last) = (bounds[expert], bounds[expert + 1]);
        let rows = last - first;
        if rows == 0 {
            continue;
        }
        let (gate, up, down) = (
            operands[3 + 3 * expert],
            operands[4 + 3 * expert],
            operands[5 + 3 * expert],
        );
        let width = gate.data.len() / hidden;
        let mut gathered = Vec::with_capacity(rows * hidden);
        for slot in first..last {
            let token = order.data[slot] as usize / k;
            if token >= tokens {
                return Err(MoeError::Token {
                    slot,
                    token,
                    tokens,
                });
            }
            gathered.extend_from_slice(&x.data[token * hidden..(token + 1) * hidden]);
        }
        let product = |weight: &Tensor| -> Result<Vec<f32>, MoeError> {
            let mut result = vec![0.0f32; rows * width];
            let shape = DotShape::new(rows, width, hidden);
            dot.run(
                &gathered,
                &weight.data,
                &mut result,
                shape,
                1.0,
                0.0,
                parallel,
            )?;
            round(&mut result);
            Ok(result)
        };
        let (g, u) = (product(gate)?, product(up)?);
        let mut activated = vec![0.0f32; rows * width];
        activation.run(&[&g, &u], &mut activated, parallel)?;
        round(&mut activated);
        let shape = DotShape::new(rows, hidden, width);
        let rows_out = &mut out[first * hidden..last * hidden];
        dot.run(&activated, &down.data, rows_out, shape, 1.0, 0.0, parallel)?;
    }
    Ok(out)
}

/// An operand that does not broadcast to the result's shape.
#[derive(Debug, thiserror::Error)]
#[error("an operand of shape {operand:?} does not broadcast to {result:?}")]
struct BroadcastError {
    operand: Vec<usize>,
    result: Vec<usize>,
}

/// `tensor` broadcast to `shape` (trailing dimensions aligned; a dimension of 1 repeats).
fn expand(tensor: &Tensor, shape: &[usize]) -> Result<Vec<f32>, BroadcastError> {
    let error = || BroadcastError {
        operand: tensor.shape.clone(),
        result: shape.to_vec(),
    };
    let rank = shape.len();
    if tensor.shape.len() > rank {
        return Err(error());
    }
    let mut padded = vec![1; rank - tensor.shape.len()];
    padded.extend_from_slice(&tensor.shape);
    let mut strides = vec![0; rank];
    let mut stride = 1;
    for axis in (0..rank).rev() {
        if padded[axis] != 1 && padded[axis] != shape[axis] {
            return Err(error());
        }
        strides[axis] = if padded[axis] == 1 { 0 } else { stride };
        stride *= padded[axis];
    }
    let count: usize = shape.iter().product();
    let mut out = Vec::with_capacity(count);
    let mut index = vec![0usize; rank];
    for _ in 0..count {
        let offset: usize = index.iter().zip(&strides).map(|(i, s)| i * s).sum();
        out.push(tensor.data[offset]);
        for axis in (0..rank).rev() {
            index[axis] += 1;
            if index[axis] < shape[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    Ok(out)
}

/// Why Quest attention could not run.
#[derive(Debug, thiserror::Error)]
enum QuestStepError {
    #[error("sequence {batch} has length {length}, expected an integer in 1..={capacity}")]
    Length {
        batch: usize,
        length: f32,
        capacity: usize,
    },
    #[error(transparent)]
    Selection(#[from] kiln_ir::quest::QuestError),
    #[error(transparent)]
    Kernel(#[from] crate::cpu::CpuError),
}

/// `QuestAttentionDecode` (see `CpuStep::QuestAttention`): `q [B, 1, Hq, D]` against the
/// cache `k, v [B, C, Hkv, D]` with `lengths [B]`. Each (sequence, KV head) runs the attention
/// kernel over the rows of its selected pages (gathered, in token order) for the query heads
/// of its group; the tasks run in parallel.
fn quest_attention(
    attention: &CpuAttention,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lengths: &Tensor,
    scale: f32,
    options: &QuestOptions,
) -> Result<Vec<f32>, QuestStepError> {
    use rayon::prelude::*;
    let capacity = k.shape[1];
    let lengths: Vec<usize> = lengths
        .data
        .iter()
        .enumerate()
        .map(|(batch, &length)| {
            if length >= 1.0 && length <= capacity as f32 && length.fract() == 0.0 {
                Ok(length as usize)
            } else {
                Err(QuestStepError::Length {
                    batch,
                    length,
                    capacity,
                })
            }
        })
        .collect::<Result<_, _>>()?;
    let selection = quest::select(q, k, &lengths, options)?;
    let (q_heads, kv_heads, d) = (q.shape[2], k.shape[2], q.shape[3]);
    let group = q_heads / kv_heads;
    let tasks: Vec<(usize, usize)> = (0..lengths.len())
        .flat_map(|b| (0..kv_heads).map(move |kv| (b, kv)))
        .collect();
    let outputs = tasks
        .par_iter()
        .map(|&(b, kv)| -> Result<Vec<f32>, QuestStepError> {
            let tokens: Vec<usize> = selection.pages[b][kv]
                .iter()
                .flat_map(|&p| p * options.page_size..((p + 1) * options.page_size).min(lengths[b]))
                .collect();
            let row = |j: usize| ((b * capacity + j) * kv_heads + kv) * d;
            let keys: Vec<f32> = tokens
                .iter()
                .flat_map(|&j| k.data[row(j)..row(j) + d].iter().copied())
                .collect();
            let values: Vec<f32> = tokens
                .iter()
                .flat_map(|&j| v.data[row(j)..row(j) + d].iter().copied())
                .collect();
            let first = (b * q_heads + kv * group) * d;
            let queries = &q.data[first..first + group * d];
            let mut out = vec![0.0f32; group * d];
            let shape = AttentionShape::new(1, 1, tokens.len(), group, 1, d);
            attention.run_decode(
                queries,
                &keys,
                &values,
                &[tokens.len() as f32],
                shape,
                scale,
                &mut out,
                Parallelism::Sequential,
            )?;
            Ok(out)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = vec![0.0f32; q.data.len()];
    for (&(b, kv), rows) in tasks.iter().zip(outputs) {
        let first = (b * q_heads + kv * group) * d;
        out[first..first + group * d].copy_from_slice(&rows);
    }
    Ok(out)
}

fn cpu_error(kernel: &str) -> impl FnOnce(crate::cpu::CpuError) -> ExecError + '_ {
    move |e| ExecError::Kernel {
        kernel: kernel.to_string(),
        message: format!("Cranelift kernel: {e}"),
    }
}

impl HostKernels {
    /// Compiles `steps` (one per kernel of `plan`); a host kernel of the plan without a step
    /// is an error. `resident` holds the host values of the plan's resident buffers (weights
    /// read on the host), by buffer id: steps prepare what they need of them once (Atom's
    /// packed INT4 weights).
    pub(super) fn compile(
        plan: &Schedule,
        steps: &[Option<CpuStep>],
        resident: &[Option<Arc<Tensor>>],
    ) -> Result<HostKernels, ExecError> {
        if let Some(kernel) = plan
            .kernels
            .iter()
            .zip(steps)
            .find(|(k, s)| k.device == Device::Cpu && s.is_none())
        {
            return Err(ExecError::NoCpuKernel {
                kernel: kernel.0.name.clone(),
                op: kernel.0.computes.op.name().to_string(),
            });
        }
        let jit = CpuJit::global().map_err(cpu_error("the CPU JIT"))?;
        let mut compiled = Vec::with_capacity(steps.len());
        for (step, kernel) in steps.iter().zip(&plan.kernels) {
            let name = kernel.name.as_str();
            let error = cpu_error(name);
            compiled.push(match step {
                None => None,
                Some(
                    step @ CpuStep::Linear {
                        dot,
                        epilogue_kind,
                        epilogue,
                        n,
                        k,
                        dtype,
                    },
                ) => {
                    let width = step.product_width().unwrap_or(*n);
                    let epilogue = match epilogue {
                        Some(spec) => Some(jit.map(spec.clone()).map_err(cpu_error(name))?),
                        None => None,
                    };
                    Some(HostKernel::Linear {
                        dot: jit.dot(*dot).map_err(error)?,
                        epilogue,
                        kind: *epilogue_kind,
                        width,
                        n: *n,
                        k: *k,
                        dtype: *dtype,
                    })
                }
                Some(CpuStep::Map { map, broadcast, .. }) => Some(HostKernel::Map {
                    map: jit.map(map.clone()).map_err(error)?,
                    broadcast: *broadcast,
                }),
                Some(CpuStep::RmsNorm {
                    plain,
                    fused,
                    eps,
                    dtype,
                }) => Some(HostKernel::RmsNorm {
                    plain: jit.rms_norm(*plain).map_err(cpu_error(name))?,
                    fused: match fused {
                        Some(spec) => Some(jit.rms_norm(*spec).map_err(cpu_error(name))?),
                        None => None,
                    },
                    eps: *eps,
                    dtype: *dtype,
                }),
                Some(CpuStep::Rope {
                    rope,
                    heads,
                    head_dim,
                    theta,
                }) => Some(HostKernel::Rope {
                    rope: jit.rope(*rope).map_err(error)?,
                    heads: *heads,
                    head_dim: *head_dim,
                    theta: *theta,
                }),
                Some(CpuStep::Attention {
                    decode,
                    causal,
                    scale,
                }) => Some(HostKernel::Attention {
                    attention: CpuAttention::new(jit).map_err(error)?,
                    decode: *decode,
                    causal: *causal,
                    scale: *scale,
                }),
                Some(CpuStep::MoeExperts {
                    dot,
                    activation,
                    num_experts,
                    dtype,
                }) => Some(HostKernel::MoeExperts {
                    dot: jit.dot(*dot).map_err(cpu_error(name))?,
                    activation: jit.map(activation.clone()).map_err(error)?,
                    num_experts: *num_experts,
                    dtype: *dtype,
                }),
                Some(CpuStep::MoeRouter {
                    softmax,
                    top_k,
                    normalize,
                    linear,
                }) => Some(HostKernel::MoeRouter {
                    softmax: jit.softmax(*softmax).map_err(cpu_error(name))?,
                    top_k: *top_k,
                    normalize: *normalize,
                    linear: match linear {
                        Some(linear) => {
                            Some((jit.dot(linear.dot).map_err(cpu_error(name))?, linear.dtype))
                        }
                        None => None,
                    },
                }),
                Some(CpuStep::MoeDispatch { num_experts }) => Some(HostKernel::MoeDispatch {
                    num_experts: *num_experts,
                }),
                Some(CpuStep::MoeCombine) => Some(HostKernel::MoeCombine),
                Some(CpuStep::Gather) => Some(HostKernel::Gather),
                Some(CpuStep::Slice { axis, start, end }) => Some(HostKernel::Slice {
                    axis: *axis,
                    start: *start,
                    end: *end,
                }),
                Some(CpuStep::KvAppend) => Some(HostKernel::KvAppend),
                Some(CpuStep::QuestAttention {
                    scale,
                    budget_tokens,
                    page_size,
                }) => {
                    let options = QuestOptions {
                        budget_tokens: *budget_tokens,
                        page_size: *page_size,
                        skip_layers: 0,
                    };
                    options.validate().map_err(|e| ExecError::Kernel {
                        kernel: name.to_string(),
                        message: e.to_string(),
                    })?;
                    Some(HostKernel::QuestAttention {
                        attention: CpuAttention::new(jit).map_err(error)?,
                        scale: *scale,
                        options,
                    })
                }
                Some(CpuStep::Softmax { softmax }) => Some(HostKernel::Softmax {
                    softmax: jit.softmax(*softmax).map_err(error)?,
                }),
                Some(CpuStep::MatMul { dot }) => Some(HostKernel::MatMul {
                    dot: jit.dot(*dot).map_err(error)?,
                }),
                Some(CpuStep::TopK { k }) => Some(HostKernel::TopK { k: *k }),
                Some(CpuStep::Transpose { perm }) => {
                    Some(HostKernel::Transpose { perm: perm.clone() })
                }
                Some(CpuStep::Concat { axis }) => Some(HostKernel::Concat { axis: *axis }),
                Some(CpuStep::Cast) => Some(HostKernel::Cast),
                Some(CpuStep::CausalMask) => Some(HostKernel::CausalMask),
                Some(CpuStep::AtomLinear {
                    dot,
                    n,
                    k,
                    group_size,
                    outliers,
                    activation_clip,
                    ..
                }) => {
                    let value = |operand: usize| {
                        kernel
                            .inputs
                            .get(operand)
                            .and_then(|&id| resident.get(id).cloned().flatten())
                    };
                    let packed = match (value(2), value(3)) {
                        (Some(int4), Some(scales)) => {
                            Some(PackedInt4::new(&int4, &scales).map_err(|message| {
                                ExecError::Kernel {
                                    kernel: name.to_string(),
                                    message,
                                }
                            })?)
                        }
                        _ => None,
                    };
                    Some(HostKernel::AtomLinear {
                        dot: jit.int4_dot(*dot).map_err(error)?,
                        n: *n,
                        k: *k,
                        group_size: *group_size,
                        outliers: *outliers,
                        activation_clip: *activation_clip,
                        packed,
                    })
                }
            });
        }
        Ok(HostKernels { steps: compiled })
    }
}

impl HostKernel {
    /// Runs the step on `operands` (in the shapes the op reads them) for results of
    /// `shapes`, in f32, one vector per result.
    pub(super) fn run(
        &self,
        kernel: &str,
        operands: &[&Tensor],
        shapes: &[Vec<usize>],
    ) -> Result<Vec<Vec<f32>>, ExecError> {
        let bad = |message: String| ExecError::Kernel {
            kernel: kernel.to_string(),
            message,
        };
        let shape = shapes
            .first()
            .ok_or_else(|| bad("a step without results".into()))?;
        let elements: usize = shape.iter().product();
        match self {
            HostKernel::RmsNorm {
                plain,
                fused,
                eps,
                dtype,
            } => {
                let weight = operands.last().ok_or_else(|| bad("no weight".into()))?;
                let hidden = weight.data.len().max(1);
                let rows = operands[0].data.len() / hidden;
                let mut out = vec![0.0f32; elements];
                let parallel = Parallelism::Rayon;
                match (fused, operands) {
                    (None, [x, weight]) => {
                        plain
                            .run(&x.data, &weight.data, &mut out, rows, *eps, parallel)
                            .map_err(cpu_error(kernel))?;
                        Ok(vec![out])
                    }
                    (Some(fused), [x, residual, weight]) => {
                        let mut sum = vec![0.0f32; elements];
                        fused
                            .run_residual(
                                &x.data,
                                &residual.data,
                                &weight.data,
                                &mut sum,
                                &mut out,
                                rows,
                                *eps,
                                parallel,
                            )
                            .map_err(cpu_error(kernel))?;
                        if *dtype != DType::F32 {
                            // The interpreter normalises the sum rounded to the dtype.
                            for value in &mut sum {
                                *value = dtype.round(*value);
                            }
                            plain
                                .run(&sum, &weight.data, &mut out, rows, *eps, parallel)
                                .map_err(cpu_error(kernel))?;
                        }
                        Ok(vec![sum, out])
                    }
                    _ => Err(bad(format!(
                        "{} operands for an RMSNorm {} a residual",
                        operands.len(),
                        if fused.is_some() { "with" } else { "without" }
                    ))),
                }
            }
            HostKernel::Rope {
                rope,
                heads,
                head_dim,
                theta,
            } => {
                let (x, positions) = match operands {
                    [x, positions] => (x, positions),
                    _ => return Err(bad("RoPE takes x and positions".into())),
                };
                let positions: Vec<i32> = positions.data.iter().map(|&p| p as i32).collect();
                let mut out = vec![0.0f32; elements];
                rope.run(
                    &x.data,
                    &positions,
                    &mut out,
                    *heads,
                    *head_dim,
                    *theta as f64,
                    Parallelism::Rayon,
                )
                .map_err(cpu_error(kernel))?;
                Ok(vec![out])
            }
            HostKernel::MoeRouter {
                softmax,
                top_k,
                normalize,
                linear,
            } => {
                let (logits, experts): (std::borrow::Cow<[f32]>, usize) = match (linear, operands) {
                    (None, [logits]) => (
                        std::borrow::Cow::Borrowed(logits.data.as_slice()),
                        logits.shape.last().copied().unwrap_or(0),
                    ),
                    (Some((dot, dtype)), [x, w]) if w.shape.len() == 2 => {
                        let (experts, hidden) = (w.shape[0], w.shape[1]);
                        if hidden == 0 || x.data.len() % hidden != 0 {
                            return Err(bad(format!(
                                "input of {} values is not rows of {hidden}",
                                x.data.len()
                            )));
                        }
                        let rows = x.data.len() / hidden;
                        let mut product = vec![0.0f32; rows * experts];
                        dot.run(
                            &x.data,
                            &w.data,
                            &mut product,
                            DotShape::new(rows, experts, hidden),
                            1.0,
                            0.0,
                            Parallelism::Rayon,
                        )
                        .map_err(cpu_error(kernel))?;
                        if *dtype != DType::F32 {
                            for value in &mut product {
                                *value = dtype.round(*value);
                            }
                        }
                        (std::borrow::Cow::Owned(product), experts)
                    }
                    (None, _) => return Err(bad("the router takes logits".into())),
                    (Some(_), _) => {
                        return Err(bad(
                            "the fused router takes x and a [experts, hidden] weight".into(),
                        ))
                    }
                };
                if experts == 0 || *top_k > experts {
                    return Err(bad(format!("top {top_k} of {experts} experts")));
                }
                let rows = logits.len() / experts;
                let mut probabilities: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
                softmax
                    .run(
                        &mut probabilities,
                        SoftmaxShape::new(rows, experts),
                        1.0,
                        Parallelism::Sequential,
                    )
                    .map_err(cpu_error(kernel))?;
                let probabilities: Vec<f32> = probabilities.iter().map(|&p| p as f32).collect();
                let (weights, chosen) =
                    movement::route(&probabilities, experts, *top_k, *normalize);
                Ok(vec![weights, chosen])
            }
            HostKernel::MoeDispatch { num_experts } => {
                let experts = operands
                    .first()
                    .ok_or_else(|| bad("dispatch takes the chosen experts".into()))?;
                let (order, offsets) =
                    movement::dispatch(experts, *num_experts).map_err(|e| bad(e.to_string()))?;
                Ok(vec![order, offsets])
            }
            HostKernel::TopK { k } => {
                let x = operands
                    .first()
                    .ok_or_else(|| bad("top-k takes one operand".into()))?;
                let n = x.shape.last().copied().unwrap_or(0);
                if *k > n || n == 0 {
                    return Err(bad(format!("top {k} of rows of {n}")));
                }
                let mut values = Vec::with_capacity(x.data.len() / n * k);
                let mut indices = Vec::with_capacity(values.capacity());
                for row in x.data.chunks(n) {
                    for index in movement::top_k(row, *k) {
                        values.push(row[index]);
                        indices.push(index as f32);
                    }
                }
                Ok(vec![values, indices])
            }
            _ => Ok(vec![self.run_one(kernel, operands, shape)?]),
        }
    }

    /// A step of one result.
    fn run_one(
        &self,
        kernel: &str,
        operands: &[&Tensor],
        shape: &[usize],
    ) -> Result<Vec<f32>, ExecError> {
        let elements: usize = shape.iter().product();
        let bad = |message: String| ExecError::Kernel {
            kernel: kernel.to_string(),
            message,
        };
        let parallel = Parallelism::Rayon;
        match self {
            HostKernel::Map { map, broadcast } => {
                let expanded: Vec<std::borrow::Cow<[f32]>> = operands
                    .iter()
                    .map(|t| {
                        if *broadcast && t.data.len() != elements {
                            expand(t, shape)
                                .map(std::borrow::Cow::Owned)
                                .map_err(|e| bad(e.to_string()))
                        } else {
                            Ok(std::borrow::Cow::Borrowed(t.data.as_slice()))
                        }
                    })
                    .collect::<Result<_, _>>()?;
                let inputs: Vec<&[f32]> = expanded.iter().map(|d| d.as_ref()).collect();
                let mut out = vec![0.0f32; elements];
                map.run(&inputs, &mut out, parallel)
                    .map_err(cpu_error(kernel))?;
                Ok(out)
            }
            HostKernel::Attention {
                attention,
                decode,
                causal,
                scale,
            } => {
                let (q, k, v) = match operands {
                    [q, k, v, ..] if q.shape.len() == 4 && k.shape.len() == 4 => (q, k, v),
                    _ => return Err(bad("attention takes q, k and v of rank 4".into())),
                };
                let shape = AttentionShape::new(
                    q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3],
                );
                let mut out = vec![0.0f32; elements];
                let result = if *decode {
                    let lengths = operands.get(3).ok_or_else(|| bad("no lengths".into()))?;
                    attention.run_decode(
                        &q.data,
                        &k.data,
                        &v.data,
                        &lengths.data,
                        shape,
                        *scale,
                        &mut out,
                        parallel,
                    )
                } else {
                    attention.run_prefill(
                        &q.data, &k.data, &v.data, shape, *scale, *causal, &mut out, parallel,
                    )
                };
                result.map_err(cpu_error(kernel))?;
                Ok(out)
            }
            HostKernel::MoeExperts {
                dot,
                activation,
                num_experts,
                dtype,
            } => moe_experts(dot, activation, *num_experts, *dtype, operands, elements)
                .map_err(|message| bad(message.to_string())),
            HostKernel::MoeCombine => match operands {
                [y, order, weights] => Ok(movement::combine(y, order, weights)
                    .map_err(|e| bad(e.to_string()))?
                    .1),
                _ => Err(bad("combine takes rows, order and weights".into())),
            },
            HostKernel::Gather => match operands {
                [table, ids] if table.shape.len() == 2 => Ok(movement::gather(table, ids)
                    .map_err(|e| bad(e.to_string()))?
                    .1),
                _ => Err(bad("a gather takes a [vocab, hidden] table and ids".into())),
            },
            HostKernel::Slice { axis, start, end } => {
                let x = operands
                    .first()
                    .ok_or_else(|| bad("a slice takes one operand".into()))?;
                if *axis >= x.shape.len() {
                    return Err(bad(format!(
                        "axis {axis} of a rank-{} operand",
                        x.shape.len()
                    )));
                }
                Ok(movement::slice(x, *axis, *start, *end)
                    .map_err(|e| bad(e.to_string()))?
                    .1)
            }
            HostKernel::QuestAttention {
                attention,
                scale,
                options,
            } => match operands {
                [q, k, v, lengths] if q.shape.len() == 4 && k.shape.len() == 4 => {
                    quest_attention(attention, q, k, v, lengths, *scale, options)
                        .map_err(|e| bad(e.to_string()))
                }
                _ => Err(bad(
                    "Quest attention takes q, k and v of rank 4 and lengths".into(),
                )),
            },
            HostKernel::Softmax { softmax } => {
                let x = operands
                    .first()
                    .ok_or_else(|| bad("softmax takes one operand".into()))?;
                let n = x.shape.last().copied().unwrap_or(1).max(1);
                let mut values: Vec<f64> = x.data.iter().map(|&v| v as f64).collect();
                let rows = values.len() / n;
                softmax
                    .run(&mut values, SoftmaxShape::new(rows, n), 1.0, parallel)
                    .map_err(cpu_error(kernel))?;
                Ok(values.into_iter().map(|v| v as f32).collect())
            }
            HostKernel::MatMul { dot } => match operands {
                [a, b] if a.shape.len() >= 2 && a.shape.len() == b.shape.len() => {
                    let r = a.shape.len();
                    let (m, k, n) = (a.shape[r - 2], a.shape[r - 1], b.shape[r - 1]);
                    if b.shape[r - 2] != k || a.shape[..r - 2] != b.shape[..r - 2] {
                        return Err(bad(format!(
                            "matmul of shapes {:?} and {:?}",
                            a.shape, b.shape
                        )));
                    }
                    // The dot kernel takes the right operand K-contiguous: [.., n, k].
                    let mut perm: Vec<usize> = (0..r).collect();
                    perm.swap(r - 2, r - 1);
                    let (_, b_t) = movement::transpose(b, &perm).map_err(|e| bad(e.to_string()))?;
                    let mut out = vec![0.0f32; elements];
                    let shape = DotShape::new(m, n, k);
                    for ((a, b), c) in a
                        .data
                        .chunks(m * k)
                        .zip(b_t.chunks(n * k))
                        .zip(out.chunks_mut(m * n))
                    {
                        dot.run(a, b, c, shape, 1.0, 0.0, parallel)
                            .map_err(cpu_error(kernel))?;
                    }
                    Ok(out)
                }
                _ => Err(bad("matmul takes two operands of equal rank ≥ 2".into())),
            },
            HostKernel::Transpose { perm } => {
                let x = operands
                    .first()
                    .ok_or_else(|| bad("a transpose takes one operand".into()))?;
                Ok(movement::transpose(x, perm)
                    .map_err(|e| bad(e.to_string()))?
                    .1)
            }
            HostKernel::Concat { axis } => {
                concat(&kiln_ir::op::Op::Concat { axis: *axis }, operands)
                    .map(|t| t.data)
                    .ok_or_else(|| {
                        bad(format!(
                            "operands of shapes {:?} do not concatenate along axis {axis}",
                            operands.iter().map(|t| &t.shape).collect::<Vec<_>>()
                        ))
                    })
            }
            HostKernel::AtomLinear {
                dot,
                n,
                k,
                group_size,
                outliers,
                activation_clip,
                packed,
            } => atom_linear(
                dot,
                (*n, *k, *group_size, *outliers),
                *activation_clip,
                packed.as_ref(),
                operands,
            )
            .map_err(bad),
            HostKernel::Cast => operands
                .first()
                .map(|x| x.data.clone())
                .ok_or_else(|| bad("a cast takes one operand".into())),
            HostKernel::CausalMask => {
                let scores = operands
                    .first()
                    .ok_or_else(|| bad("a causal mask takes the scores".into()))?;
                Ok(
                    movement::causal_mask(&scores.shape, operands.get(1).copied())
                        .map_err(|e| bad(e.to_string()))?
                        .1,
                )
            }
            HostKernel::KvAppend => match operands {
                [cache, new, start] if cache.shape.len() == 4 && new.shape.len() == 4 => {
                    movement::append(cache, new, start).map_err(|e| bad(e.to_string()))
                }
                _ => Err(bad("KV append takes a cache, new rows and starts".into())),
            },
            HostKernel::Linear {
                dot,
                epilogue,
                kind,
                width,
                n,
                k,
                dtype,
            } => {
                let (x, weight) = match operands {
                    [x, weight, ..] => (x, weight),
                    _ => {
                        return Err(bad(format!(
                            "{} operands, a linear takes 2 or 3",
                            operands.len()
                        )))
                    }
                };
                if x.data.len() % k.max(&1) != 0 {
                    return Err(bad(format!(
                        "input of {} values is not rows of {k}",
                        x.data.len()
                    )));
                }
                let rows = x.data.len() / k.max(&1);
                if rows * n != elements {
                    return Err(bad(format!(
                        "{rows} rows of {n} make {} values, the result has {elements}",
                        rows * n
                    )));
                }
                let mut product = vec![0.0f32; rows * width];
                dot.run(
                    &x.data,
                    &weight.data,
                    &mut product,
                    DotShape::new(rows, *width, *k),
                    1.0,
                    0.0,
                    parallel,
                )
                .map_err(cpu_error(kernel))?;
                if *dtype != DType::F32 {
                    for value in &mut product {
                        *value = dtype.round(*value);
                    }
                }
                let Some(map) = epilogue else {
                    return Ok(product);
                };
                let mut out = vec![0.0f32; elements];
                match kind {
                    LinearEpilogue::None => return Ok(product),
                    LinearEpilogue::Residual => {
                        let residual = operands.get(2).ok_or_else(|| bad("no residual".into()))?;
                        map.run(&[&product, &residual.data], &mut out, parallel)
                            .map_err(cpu_error(kernel))?;
                    }
                    LinearEpilogue::Bias => {
                        let bias = operands.get(2).ok_or_else(|| bad("no bias".into()))?;
                        for (row, out) in product.chunks(*n).zip(out.chunks_mut(*n)) {
                            map.run(&[row, &bias.data], out, Parallelism::Sequential)
                                .map_err(cpu_error(kernel))?;
                        }
                    }
                    LinearEpilogue::SwiGlu => {
                        for (row, out) in product.chunks(*width).zip(out.chunks_mut(*n)) {
                            let (gate, up) = row.split_at(*n);
                            map.run(&[gate, up], out, Parallelism::Sequential)
                                .map_err(cpu_error(kernel))?;
                        }
                    }
                }
                Ok(out)
            }
            HostKernel::RmsNorm { .. }
            | HostKernel::Rope { .. }
            | HostKernel::MoeRouter { .. }
            | HostKernel::MoeDispatch { .. }
            | HostKernel::TopK { .. } => Err(bad("a step of several results run as one".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concat_copies_along_the_axis() {
        use kiln_ir::op::Op;
        let a = Tensor::f32(&[2, 1], vec![1.0, 2.0]);
        let b = Tensor::f32(&[2, 2], vec![3.0, 4.0, 5.0, 6.0]);
        let joined = concat(&Op::Concat { axis: 1 }, &[&a, &b]).unwrap();
        assert_eq!(joined.shape, vec![2, 3]);
        assert_eq!(joined.data, vec![1.0, 3.0, 4.0, 2.0, 5.0, 6.0]);
        let rows = concat(&Op::Concat { axis: 0 }, &[&b, &b]).unwrap();
        assert_eq!(rows.shape, vec![4, 2]);
        assert!(concat(&Op::Concat { axis: 0 }, &[&a, &b]).is_none());
        assert!(concat(&Op::Add, &[&a, &a]).is_none());
    }

    #[test]
    fn expand_repeats_dimensions_of_one_with_trailing_alignment() {
        let row = Tensor::f32(&[3], vec![1.0, 2.0, 3.0]);
        assert_eq!(
            expand(&row, &[2, 3]).unwrap(),
            vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0]
        );
        let column = Tensor::f32(&[2, 1], vec![5.0, 7.0]);
        assert_eq!(
            expand(&column, &[2, 3]).unwrap(),
            vec![5.0, 5.0, 5.0, 7.0, 7.0, 7.0]
        );
        let scalar = Tensor::f32(&[], vec![4.0]);
        assert_eq!(expand(&scalar, &[2]).unwrap(), vec![4.0, 4.0]);
        let wrong = Tensor::f32(&[2], vec![1.0, 2.0]);
        let err = expand(&wrong, &[2, 3]).unwrap_err().to_string();
        assert!(err.contains("[2]") && err.contains("[2, 3]"), "{err}");
    }
}
