//! The reference interpreter: the single oracle for every kernel kiln generates.
//!
//! Executes each op of [`crate::op::Op`] on the CPU, in f32 with f64 accumulation for sums
//! (dot products, norms, softmax), and rounds every result to its node's dtype, which models
//! reduced-precision storage. It is deliberately plain: loops over indices, no tiling, no
//! cleverness, so that it is obviously correct. It must stay that way; fast CPU code belongs
//! to the Cranelift backend, which is tested against this file.

use crate::dtype::DType;
use crate::graph::{Graph, Node, ValueId};
use crate::movement;
use crate::op::{InputKind, Op};
use crate::quest::QuestError;
use crate::shape::{Bindings, Shape, ShapeError};
use crate::tensor::{strides, Tensor};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};

/// Why a graph could not be executed, naming the input or node at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InterpError {
    #[error("graph `{graph}`: missing input `{name}` ({kind:?})")]
    MissingInput {
        graph: String,
        name: String,
        kind: InputKind,
    },
    #[error("graph `{graph}`: input `{name}`: {message}")]
    BadInput {
        graph: String,
        name: String,
        /// What is wrong with the tensor given.
        #[source]
        message: Box<InputError>,
    },
    #[error("graph `{graph}`: node %{node} `{label}` ({op}): {message}")]
    Node {
        graph: String,
        node: usize,
        label: String,
        op: &'static str,
        /// Why the node could not be evaluated.
        #[source]
        message: Box<EvalError>,
    },
}

/// What is wrong with a tensor given for a graph input: its dtype or its shape.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InputError {
    #[error("expected dtype {expected}, got {found}")]
    DType { expected: DType, found: DType },
    #[error("expected shape {expected}: {source}")]
    Shape {
        expected: Shape,
        #[source]
        source: ShapeError,
    },
}

/// Why one node could not be evaluated: an operand value the op cannot take (naming the
/// sequence, slot or position at fault), or a result that does not match its declared type.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    #[error("inputs are bound by `run`, not evaluated")]
    Input,
    #[error("operand {value} has not been computed")]
    NotComputed { value: ValueId },
    #[error("result {output} does not have its declared type: {source}")]
    ResultType {
        output: usize,
        #[source]
        source: ShapeError,
    },
    #[error("operand {index} does not exist")]
    MissingOperand { index: usize },
    #[error(transparent)]
    Shape(#[from] ShapeError),
    #[error(transparent)]
    Quest(#[from] QuestError),
    /// A gather, append, slice or MoE routing index out of range.
    #[error(transparent)]
    Movement(#[from] crate::movement::MovementError),
    #[error("causal attention needs at least as many keys ({keys}) as queries ({queries})")]
    CausalKeys { keys: usize, queries: usize },
    #[error(
        "sequence {batch} has length {length}, expected {queries}..={capacity} (at least the \
         {queries} new tokens, at most the cache capacity)"
    )]
    DecodeLength {
        batch: usize,
        length: f32,
        queries: usize,
        capacity: usize,
    },
    #[error("sequence {batch} has length {length}, expected at least 1 (the new token)")]
    QuestLength { batch: usize, length: f32 },
    #[error("k = {k} exceeds the last dimension {n}")]
    TopK { k: usize, n: usize },
    #[error("offsets must start at 0 and end at the slot count {slots}, got {offsets:?}")]
    OffsetEnds { slots: f32, offsets: Vec<f32> },
    #[error("offsets must not decrease, got {offsets:?}")]
    OffsetOrder { offsets: Vec<f32> },
    #[error("cannot reshape {dtype}{from:?} into {to:?}")]
    Reshape {
        dtype: DType,
        from: Vec<usize>,
        to: Vec<usize>,
    },
    #[error("a fused map needs at least one step")]
    NoSteps,
    #[error("shapes {a:?} and {b:?} do not broadcast")]
    Broadcast { a: Vec<usize>, b: Vec<usize> },
}

/// Runs `graph` on named inputs (activations, weights and state alike) and returns its named
/// outputs. Symbolic dimensions are bound from the input shapes.
pub fn run(
    graph: &Graph,
    inputs: &HashMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>, InterpError> {
    run_with(graph, |name| inputs.get(name))
}

/// Like [`run`], with inputs found by `lookup` (for example weights in one map and per-call
/// activations in another, without copying either).
pub fn run_with<'t>(
    graph: &Graph,
    lookup: impl Fn(&str) -> Option<&'t Tensor>,
) -> Result<BTreeMap<String, Tensor>, InterpError> {
    let mut bindings = Bindings::new();
    // Last node that reads each value; graph outputs are kept to the end.
    let mut last_use: HashMap<(usize, usize), usize> = HashMap::new();
    for (index, node) in graph.nodes.iter().enumerate() {
        for value in &node.inputs {
            last_use.insert((value.node, value.output), index);
        }
    }
    for (_, value) in &graph.outputs {
        last_use.insert((value.node, value.output), usize::MAX);
    }

    let mut owned: HashMap<(usize, usize), Tensor> = HashMap::new();
    let mut borrowed: HashMap<(usize, usize), &'t Tensor> = HashMap::new();
    for (index, node) in graph.nodes.iter().enumerate() {
        let node_error = |message: EvalError| InterpError::Node {
            graph: graph.name.clone(),
            node: index,
            label: node.label.clone(),
            op: node.op.name(),
            message: Box::new(message),
        };
        if let Op::Input { name, kind, .. } = &node.op {
            let tensor = lookup(name).ok_or_else(|| InterpError::MissingInput {
                graph: graph.name.clone(),
                name: name.clone(),
                kind: *kind,
            })?;
            let expected = &node.outputs[0];
            let bad = |message: InputError| InterpError::BadInput {
                graph: graph.name.clone(),
                name: name.clone(),
                message: Box::new(message),
            };
            if tensor.dtype != expected.dtype {
                return Err(bad(InputError::DType {
                    expected: expected.dtype,
                    found: tensor.dtype,
                }));
            }
            bindings
                .unify(&expected.shape, &tensor.shape)
                .map_err(|source| {
                    bad(InputError::Shape {
                        expected: expected.shape.clone(),
                        source,
                    })
                })?;
            borrowed.insert((index, 0), tensor);
            continue;
        }
        let operands: Vec<&Tensor> = node
            .inputs
            .iter()
            .map(|v| {
                let key = (v.node, v.output);
                owned
                    .get(&key)
                    .or_else(|| borrowed.get(&key).copied())
                    .ok_or_else(|| node_error(EvalError::NotComputed { value: *v }))
            })
            .collect::<Result<_, _>>()?;
        let mut results = eval(node, &operands, &bindings).map_err(node_error)?;
        for (output, (tensor, ty)) in results.iter_mut().zip(&node.outputs).enumerate() {
            // `eval` sets the node's dtype but leaves the values unrounded: round every
            // result that is not plain f32.
            if tensor.dtype != ty.dtype || ty.dtype != crate::dtype::DType::F32 {
                *tensor = tensor.cast(ty.dtype);
            }
            bindings
                .unify(&ty.shape, &tensor.shape)
                .map_err(|source| node_error(EvalError::ResultType { output, source }))?;
        }
        for value in &node.inputs {
            let key = (value.node, value.output);
            if last_use.get(&key) == Some(&index) {
                owned.remove(&key);
            }
        }
        for (output, tensor) in results.into_iter().enumerate() {
            if last_use.contains_key(&(index, output)) {
                owned.insert((index, output), tensor);
            }
        }
    }
    let mut outputs = BTreeMap::new();
    for (name, value) in &graph.outputs {
        let key = (value.node, value.output);
        let tensor = match owned.get(&key) {
            Some(t) => t.clone(),
            None => (*borrowed.get(&key).expect("inputs are kept")).clone(),
        };
        outputs.insert(name.clone(), tensor);
    }
    Ok(outputs)
}

/// Evaluates one node on its operand values. Results are in f32 with the node's dtype set;
/// `run` rounds them.
pub fn eval(
    node: &Node,
    operands: &[&Tensor],
    bindings: &Bindings,
) -> Result<Vec<Tensor>, EvalError> {
    let dtype = node.outputs[0].dtype;
    let one = |shape: Vec<usize>, data: Vec<f32>| Ok(vec![Tensor { dtype, shape, data }]);
    match &node.op {
        Op::Input { .. } => Err(EvalError::Input),
        Op::Constant { value, .. } => one(vec![], vec![*value]),
        Op::Embedding => {
            let (shape, data) = movement::gather(operands[0], operands[1])?;
            one(shape, data)
        }
        Op::RmsNorm { eps } => {
            let (x, weight) = (operands[0], operands[1]);
            let hidden = weight.len();
            let mut data = Vec::with_capacity(x.len());
            for row in x.data.chunks(hidden) {
                let mean_square =
                    row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / hidden as f64;
                let inverse = 1.0 / (mean_square + *eps as f64).sqrt();
                data.extend(
                    row.iter()
                        .zip(&weight.data)
                        .map(|(&v, &w)| (v as f64 * inverse * w as f64) as f32),
                );
            }
            one(x.shape.clone(), data)
        }
        Op::Linear => {
            let (x, weight) = (operands[0], operands[1]);
            let (n, k) = (weight.shape[0], weight.shape[1]);
            let data: Vec<f32> = x
                .data
                .par_chunks(k.max(1))
                .flat_map_iter(|row| {
                    (0..n).map(move |j| dot(row, &weight.data[j * k..(j + 1) * k]) as f32)
                })
                .collect();
            let mut shape = x.shape.clone();
            *shape.last_mut().expect("rank ≥ 1") = n;
            one(shape, data)
        }
        Op::MatMul => {
            let (a, b) = (operands[0], operands[1]);
            let r = a.shape.len();
            let (m, k, n) = (a.shape[r - 2], a.shape[r - 1], b.shape[r - 1]);
            let batches: usize = a.shape[..r - 2].iter().product();
            let mut data = vec![0.0f32; batches * m * n];
            for batch in 0..batches {
                let a_base = batch * m * k;
                let b_base = batch * k * n;
                for i in 0..m {
                    for j in 0..n {
                        let mut sum = 0.0f64;
                        for l in 0..k {
                            sum += a.data[a_base + i * k + l] as f64
                                * b.data[b_base + l * n + j] as f64;
                        }
                        data[batch * m * n + i * n + j] = sum as f32;
                    }
                }
            }
            let mut shape = a.shape.clone();
            shape[r - 1] = n;
            one(shape, data)
        }
        Op::Rope { theta } => {
            let (x, positions) = (operands[0], operands[1]);
            let (heads, head_dim) = (x.shape[2], x.shape[3]);
            let half = head_dim / 2;
            let mut data = x.data.clone();
            for (token, &position) in positions.data.iter().enumerate() {
                for head in 0..heads {
                    let base = (token * heads + head) * head_dim;
                    for i in 0..half {
                        let frequency = (*theta as f64).powf(-2.0 * i as f64 / head_dim as f64);
                        let (sin, cos) = (position as f64 * frequency).sin_cos();
                        let x1 = x.data[base + i] as f64;
                        let x2 = x.data[base + i + half] as f64;
                        data[base + i] = (x1 * cos - x2 * sin) as f32;
                        data[base + i + half] = (x2 * cos + x1 * sin) as f32;
                    }
                }
            }
            one(x.shape.clone(), data)
        }
        Op::Attention { causal, scale } => {
            let (q, k, v) = (operands[0], operands[1], operands[2]);
            let (s, t) = (q.shape[1], k.shape[1]);
            if *causal && t < s {
                return Err(EvalError::CausalKeys {
                    keys: t,
                    queries: s,
                });
            }
            let visible = |_batch: usize, i: usize| if *causal { i + t - s + 1 } else { t };
            Ok(vec![attention(q, k, v, *scale, visible, dtype)])
        }
        Op::AttentionDecode { scale } => {
            let (q, k, v, lengths) = (operands[0], operands[1], operands[2], operands[3]);
            let (s, capacity) = (q.shape[1], k.shape[1]);
            for (batch, &length) in lengths.data.iter().enumerate() {
                if length < s as f32 || length > capacity as f32 {
                    return Err(EvalError::DecodeLength {
                        batch,
                        length,
                        queries: s,
                        capacity,
                    });
                }
            }
            let visible = |batch: usize, i: usize| lengths.data[batch] as usize - (s - 1 - i);
            Ok(vec![attention(q, k, v, *scale, visible, dtype)])
        }
        Op::QuestAttentionDecode {
            scale,
            budget_tokens,
            page_size,
        } => {
            // Exactly `quest::select` then `quest::sparse_decode` (see the op's doc).
            let (q, k, v, lengths) = (operands[0], operands[1], operands[2], operands[3]);
            let lengths = lengths
                .data
                .iter()
                .enumerate()
                .map(|(batch, &length)| {
                    if length < 1.0 {
                        Err(EvalError::QuestLength { batch, length })
                    } else {
                        Ok(length as usize)
                    }
                })
                .collect::<Result<Vec<usize>, EvalError>>()?;
            let options = crate::quest::QuestOptions {
                budget_tokens: *budget_tokens,
                page_size: *page_size,
                skip_layers: 0,
            };
            let selection = crate::quest::select(q, k, &lengths, &options)?;
            let mut out = crate::quest::sparse_decode(q, k, v, &lengths, *scale, &selection)?;
            out.dtype = dtype;
            Ok(vec![out])
        }
        Op::KvAppend => {
            let data = movement::append(operands[0], operands[1], operands[2])?;
            one(operands[0].shape.clone(), data)
        }
        Op::Silu => one(
            operands[0].shape.clone(),
            operands[0]
                .data
                .iter()
                .map(|&x| x / (1.0 + (-x).exp()))
                .collect(),
        ),
        Op::Sigmoid => one(
            operands[0].shape.clone(),
            operands[0]
                .data
                .iter()
                .map(|&x| 1.0 / (1.0 + (-x).exp()))
                .collect(),
        ),
        Op::Add => broadcast_binary(operands[0], operands[1], dtype, |a, b| a + b).map(|t| vec![t]),
        Op::Mul => broadcast_binary(operands[0], operands[1], dtype, |a, b| a * b).map(|t| vec![t]),
        Op::Softmax => {
            let x = operands[0];
            let n = *x.shape.last().expect("rank ≥ 1");
            let data = x.data.chunks(n.max(1)).flat_map(softmax).collect();
            one(x.shape.clone(), data)
        }
        Op::TopK { k } => {
            let x = operands[0];
            let n = *x.shape.last().expect("rank ≥ 1");
            if *k > n {
                return Err(EvalError::TopK { k: *k, n });
            }
            let mut values = Vec::new();
            let mut indices = Vec::new();
            for row in x.data.chunks(n) {
                for index in movement::top_k(row, *k) {
                    values.push(row[index]);
                    indices.push(index as f32);
                }
            }
            let mut shape = x.shape.clone();
            *shape.last_mut().expect("rank ≥ 1") = *k;
            Ok(vec![
                Tensor {
                    dtype,
                    shape: shape.clone(),
                    data: values,
                },
                Tensor {
                    dtype: crate::dtype::DType::I32,
                    shape,
                    data: indices,
                },
            ])
        }
        Op::MoeRouter {
            top_k: k,
            normalize,
        } => {
            let logits = operands[0];
            let experts = *logits.shape.last().expect("rank ≥ 1");
            let probabilities: Vec<f32> = logits.data.chunks(experts).flat_map(softmax).collect();
            let (weights, chosen) = movement::route(&probabilities, experts, *k, *normalize);
            let mut shape = logits.shape.clone();
            *shape.last_mut().expect("rank ≥ 1") = *k;
            Ok(vec![
                Tensor {
                    dtype: crate::dtype::DType::F32,
                    shape: shape.clone(),
                    data: weights,
                },
                Tensor {
                    dtype: crate::dtype::DType::I32,
                    shape,
                    data: chosen,
                },
            ])
        }
        Op::MoeDispatch { num_experts } => {
            let experts = operands[0];
            let (order, offsets) = movement::dispatch(experts, *num_experts)?;
            Ok(vec![
                Tensor {
                    dtype: crate::dtype::DType::I32,
                    shape: experts.shape.clone(),
                    data: order,
                },
                Tensor {
                    dtype: crate::dtype::DType::I32,
                    shape: vec![num_experts + 1],
                    data: offsets,
                },
            ])
        }
        Op::MoeExpertFfn { num_experts } => {
            let (x, order, offsets) = (operands[0], operands[1], operands[2]);
            let hidden = *x.shape.last().expect("rank ≥ 1");
            let k = *order.shape.last().expect("rank ≥ 1");
            let slots = order.len();
            check_dispatch(order, offsets, *num_experts)?;
            let mut data = vec![0.0f32; slots * hidden];
            data.par_chunks_mut(hidden.max(1))
                .enumerate()
                .for_each(|(p, out)| {
                    let expert = (0..*num_experts)
                        .find(|&e| (p as f32) < offsets.data[e + 1])
                        .expect("offsets checked to cover every slot");
                    let token = order.data[p] as usize / k;
                    let (gate, up, down) = (
                        operands[3 + 3 * expert],
                        operands[4 + 3 * expert],
                        operands[5 + 3 * expert],
                    );
                    let row = &x.data[token * hidden..(token + 1) * hidden];
                    out.copy_from_slice(&swiglu_ffn(row, gate, up, down));
                });
            let mut shape = order.shape.clone();
            shape.push(hidden);
            one(shape, data)
        }
        Op::MoeCombine => {
            let (shape, data) = movement::combine(operands[0], operands[1], operands[2])?;
            one(shape, data)
        }
        Op::Reshape { shape } => {
            let x = operands[0];
            let shape = shape.resolve(bindings)?;
            if shape.iter().product::<usize>() != x.len() {
                return Err(EvalError::Reshape {
                    dtype: x.dtype,
                    from: x.shape.clone(),
                    to: shape,
                });
            }
            one(shape, x.data.clone())
        }
        Op::Transpose { perm } => {
            let (shape, data) = movement::transpose(operands[0], perm)?;
            one(shape, data)
        }
        Op::Slice { axis, start, end } => {
            let (shape, data) = movement::slice(operands[0], *axis, *start, *end)?;
            one(shape, data)
        }
        Op::Concat { axis } => {
            let (shape, data) = movement::concat(operands, *axis);
            one(shape, data)
        }
        Op::Cast { to } => Ok(vec![operands[0].cast(*to)]),
        Op::Quantize { scheme } => Ok(crate::quant::quantize(operands[0], scheme)),
        Op::Dequantize { scheme, .. } => {
            let mut out = crate::quant::dequantize(
                operands[0],
                operands[1],
                operands.get(2).copied(),
                scheme,
            );
            out.dtype = dtype;
            Ok(vec![out])
        }
        // Fused forms are evaluated as the plain ops they stand for (see `op`), through
        // `eval_plain`, so each keeps the plain ops' single implementation.
        Op::FusedMap { steps } => Ok(vec![fused_map(steps, operands, dtype)?]),
        Op::SwiGluLinear => {
            // One product against [gate; up], each half rounded, then silu(g) · u in f32.
            let both = eval_plain(Op::Linear, operands, dtype, bindings)?;
            let width = *both.shape.last().expect("rank ≥ 1") / 2;
            let data = both
                .data
                .chunks(2 * width.max(1))
                .flat_map(|row| {
                    (0..width).map(move |j| {
                        let (g, u) = (row[j], row[width + j]);
                        g / (1.0 + (-g).exp()) * u
                    })
                })
                .collect();
            let mut shape = both.shape.clone();
            *shape.last_mut().expect("rank ≥ 1") = width;
            one(shape, data)
        }
        Op::LinearAdd => {
            let product = eval_plain(Op::Linear, &operands[..2], dtype, bindings)?;
            Ok(vec![eval_plain(
                Op::Add,
                &[&product, operands[2]],
                dtype,
                bindings,
            )?])
        }
        Op::AddRmsNorm { eps } => {
            let sum = eval_plain(Op::Add, &operands[..2], dtype, bindings)?;
            let normed = eval_plain(
                Op::RmsNorm { eps: *eps },
                &[&sum, operands[2]],
                dtype,
                bindings,
            )?;
            Ok(vec![sum, normed])
        }
        Op::MoeRouterLinear { top_k, normalize } => {
            // The logits in the input's dtype, as a `Linear` node stores them.
            let logits = eval_plain(Op::Linear, operands, operands[0].dtype, bindings)?;
            let router = Node {
                op: Op::MoeRouter {
                    top_k: *top_k,
                    normalize: *normalize,
                },
                inputs: Vec::new(),
                outputs: node.outputs.clone(),
                label: String::new(),
                layer: None,
            };
            eval(&router, &[&logits], bindings)
        }
        Op::AtomLinear {
            group_size,
            outliers,
            activation_clip,
        } => {
            let options = crate::atom::AtomOptions {
                group_size: *group_size,
                outliers: *outliers,
                activation_clip: *activation_clip,
                ..crate::atom::AtomOptions::default()
            };
            let weight = crate::atom::AtomWeight {
                permutation: operands[1].clone(),
                int4: operands[2].clone(),
                int4_scales: operands[3].clone(),
                int8: operands[4].clone(),
                int8_scales: operands[5].clone(),
            };
            let x = operands[0];
            let n = weight.int4.shape[0];
            let mut shape = x.shape.clone();
            *shape.last_mut().expect("rank ≥ 1") = n;
            let values = crate::atom::linear(x, &weight, &options);
            Ok(vec![Tensor {
                dtype,
                shape,
                data: values.into_iter().map(|v| v as f32).collect(),
            }])
        }
        Op::QuantizedLinear { scheme } => {
            let weight = eval_plain(
                Op::Dequantize {
                    scheme: *scheme,
                    to: dtype,
                },
                &operands[1..],
                dtype,
                bindings,
            )?;
            Ok(vec![eval_plain(
                Op::Linear,
                &[operands[0], &weight],
                dtype,
                bindings,
            )?])
        }
        Op::CausalMask => {
            let (shape, data) =
                movement::causal_mask(&operands[0].shape, operands.get(1).copied())?;
            one(shape, data)
        }
    }
}

/// Evaluates plain `op` on `operands` as a node of `dtype` would, rounding its (single) result
/// to `dtype` as `run` rounds node results.
fn eval_plain(
    op: Op,
    operands: &[&Tensor],
    dtype: crate::dtype::DType,
    bindings: &Bindings,
) -> Result<Tensor, EvalError> {
    let node = Node {
        op,
        inputs: Vec::new(),
        outputs: vec![crate::graph::TensorType::new(
            dtype,
            crate::shape::Shape::default(),
        )],
        label: String::new(),
        layer: None,
    };
    let result = eval(&node, operands, bindings)?.remove(0);
    Ok(result.cast(dtype))
}

/// Runs a fused elementwise program step by step on whole tensors, in f32, with the plain
/// ops' broadcasting and formulas; only the result carries `dtype` (and is rounded by `run`).
fn fused_map(
    steps: &[crate::op::MapStep],
    operands: &[&Tensor],
    dtype: crate::dtype::DType,
) -> Result<Tensor, EvalError> {
    use crate::op::MapStep;
    let mut values: Vec<Tensor> = Vec::with_capacity(steps.len());
    for step in steps {
        let value = match *step {
            MapStep::Operand { index } => {
                let x = operands
                    .get(index)
                    .ok_or(EvalError::MissingOperand { index })?;
                Tensor {
                    dtype: DType::F32,
                    shape: x.shape.clone(),
                    data: x.data.clone(),
                }
            }
            MapStep::Constant { value } => Tensor::f32(&[], vec![value]),
            MapStep::Add { a, b } => {
                broadcast_binary(&values[a], &values[b], DType::F32, |a, b| a + b)?
            }
            MapStep::Mul { a, b } => {
                broadcast_binary(&values[a], &values[b], DType::F32, |a, b| a * b)?
            }
            MapStep::Silu { x } => {
                let v = &values[x];
                Tensor {
                    dtype: DType::F32,
                    shape: v.shape.clone(),
                    data: v.data.iter().map(|&x| x / (1.0 + (-x).exp())).collect(),
                }
            }
            MapStep::Sigmoid { x } => {
                let v = &values[x];
                Tensor {
                    dtype: DType::F32,
                    shape: v.shape.clone(),
                    data: v.data.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
                }
            }
        };
        values.push(value);
    }
    let mut result = values.pop().ok_or(EvalError::NoSteps)?;
    result.dtype = dtype;
    Ok(result)
}

/// Dot product accumulated in f64.
fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Softmax of one row, computed in f64 with the maximum subtracted.
fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let exps: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
    let total: f64 = exps.iter().sum();
    exps.iter().map(|&e| (e / total) as f32).collect()
}

/// `down · (silu(gate · x) ⊙ (up · x))` for one token.
fn swiglu_ffn(x: &[f32], gate: &Tensor, up: &Tensor, down: &Tensor) -> Vec<f32> {
    let (width, hidden) = (gate.shape[0], gate.shape[1]);
    let activated: Vec<f32> = (0..width)
        .map(|i| {
            let g = dot(x, &gate.data[i * hidden..(i + 1) * hidden]) as f32;
            let u = dot(x, &up.data[i * hidden..(i + 1) * hidden]) as f32;
            let g = gate.dtype.round(g);
            let u = gate.dtype.round(u);
            gate.dtype.round(g / (1.0 + (-g).exp()) * u)
        })
        .collect();
    (0..hidden)
        .map(|h| dot(&activated, &down.data[h * width..(h + 1) * width]) as f32)
        .collect()
}

/// Checks that `offsets` partitions the slots and `order` is a permutation of them.
fn check_dispatch(order: &Tensor, offsets: &Tensor, num_experts: usize) -> Result<(), EvalError> {
    let slots = order.len() as f32;
    if offsets.data[0] != 0.0 || offsets.data[num_experts] != slots {
        return Err(EvalError::OffsetEnds {
            slots,
            offsets: offsets.data.clone(),
        });
    }
    if offsets.data.windows(2).any(|w| w[0] > w[1]) {
        return Err(EvalError::OffsetOrder {
            offsets: offsets.data.clone(),
        });
    }
    let mut seen = vec![false; order.len()];
    for (p, &slot) in order.data.iter().enumerate() {
        if slot < 0.0 || slot >= slots || std::mem::replace(&mut seen[slot as usize], true) {
            return Err(crate::movement::MovementError::Order { position: p }.into());
        }
    }
    Ok(())
}

/// Softmax attention, grouped-query; `visible(b, i)` is how many leading keys query `i` of
/// sequence `b` sees.
fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    visible: impl Fn(usize, usize) -> usize,
    dtype: crate::dtype::DType,
) -> Tensor {
    let (batch, s, heads, head_dim) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let (t, kv_heads) = (k.shape[1], k.shape[2]);
    let group = heads / kv_heads;
    let mut data = vec![0.0f32; q.len()];
    for b in 0..batch {
        for i in 0..s {
            let seen = visible(b, i);
            for h in 0..heads {
                let kv = h / group;
                let q_base = ((b * s + i) * heads + h) * head_dim;
                let query = &q.data[q_base..q_base + head_dim];
                let key_row = |j: usize| ((b * t + j) * kv_heads + kv) * head_dim;
                let scores: Vec<f64> = (0..seen)
                    .map(|j| scale as f64 * dot(query, &k.data[key_row(j)..key_row(j) + head_dim]))
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for d in 0..head_dim {
                    let mut sum = 0.0f64;
                    for (j, w) in weights.iter().enumerate() {
                        sum += w * v.data[key_row(j) + d] as f64;
                    }
                    data[q_base + d] = (sum / total) as f32;
                }
            }
        }
    }
    Tensor {
        dtype,
        shape: q.shape.clone(),
        data,
    }
}

/// The multi-index of row-major position `flat` in `shape`.
fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for axis in (0..shape.len()).rev() {
        index[axis] = flat % shape[axis];
        flat /= shape[axis];
    }
    index
}

/// Applies `f` elementwise with numpy broadcasting.
fn broadcast_binary(
    a: &Tensor,
    b: &Tensor,
    dtype: crate::dtype::DType,
    f: impl Fn(f32, f32) -> f32,
) -> Result<Tensor, EvalError> {
    let rank = a.shape.len().max(b.shape.len());
    let padded = |shape: &[usize]| {
        let mut out = vec![1; rank - shape.len()];
        out.extend_from_slice(shape);
        out
    };
    let (sa, sb) = (padded(&a.shape), padded(&b.shape));
    let mut shape = Vec::with_capacity(rank);
    for (&x, &y) in sa.iter().zip(&sb) {
        if x != y && x != 1 && y != 1 {
            return Err(EvalError::Broadcast {
                a: a.shape.clone(),
                b: b.shape.clone(),
            });
        }
        shape.push(x.max(y));
    }
    let broadcast_strides = |padded_shape: &[usize]| -> Vec<usize> {
        strides(padded_shape)
            .into_iter()
            .zip(padded_shape)
            .map(|(stride, &dim)| if dim == 1 { 0 } else { stride })
            .collect()
    };
    let (ta, tb) = (broadcast_strides(&sa), broadcast_strides(&sb));
    let count: usize = shape.iter().product();
    let mut data = Vec::with_capacity(count);
    for flat in 0..count {
        let index = unravel(flat, &shape);
        let ia: usize = index.iter().zip(&ta).map(|(i, s)| i * s).sum();
        let ib: usize = index.iter().zip(&tb).map(|(i, s)| i * s).sum();
        data.push(f(a.data[ia], b.data[ib]));
    }
    Ok(Tensor { dtype, shape, data })
}
