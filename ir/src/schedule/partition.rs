//! Partitioning: one kernel per kernel-like node, buffers per value, views as aliases, and
//! weight-only subgraphs hoisted to load time.
//!
//! Owns [`partition`], which walks the graph in node order (an execution order), so kernel
//! indices, buffer ids and everything derived from them are deterministic. Inputs become
//! input, state or weight buffers; constants constant buffers; a reshape maps its value to
//! the buffer it reshapes (an [`Alias`]); a node whose operands are all weights, constants or
//! load-time results becomes a [`LoadTimeOp`]; every other node becomes a kernel placed by
//! [`GpuCapabilities::place`], named after the node's label and recording its decoder layer.
//! Lifetimes are set last, from the kernels' operands.

use super::family::{classify, AttentionKind, Family, LinearEpilogue, MoeStage};
use super::placement::GpuCapabilities;
use super::size::SymExpr;
use super::{
    Alias, Buffer, BufferId, BufferKind, Computation, Launch, LoadTimeOp, NamedBuffer, Schedule,
    ScheduledKernel,
};
use crate::graph::{Graph, TensorType};
use crate::op::{InputKind, Op};

fn new_buffer(buffers: &mut Vec<Buffer>, name: String, kind: BufferKind, ty: &TensorType) -> usize {
    let id = buffers.len();
    let bytes = SymExpr::elements(&ty.shape)
        .times(ty.dtype.bits() as u64)
        .ceil_div(8);
    buffers.push(Buffer {
        id,
        name,
        kind,
        dtype: ty.dtype,
        shape: ty.shape.clone(),
        bytes,
        lifetime: None,
    });
    id
}

/// Partitions `graph` (verified) into a schedule without transfers or memory plan.
pub fn partition(graph: &Graph, gpu: &GpuCapabilities) -> Schedule {
    let mut buffers: Vec<Buffer> = Vec::new();
    let mut value_buffer: Vec<Vec<BufferId>> = Vec::with_capacity(graph.nodes.len());
    let mut at_load: Vec<bool> = Vec::with_capacity(graph.nodes.len());
    let mut kernels = Vec::new();
    let mut load_time = Vec::new();
    let mut aliases = Vec::new();
    for (index, node) in graph.nodes.iter().enumerate() {
        let inputs: Vec<BufferId> = node
            .inputs
            .iter()
            .map(|v| value_buffer[v.node][v.output])
            .collect();
        let output_name = |i: usize| {
            if i == 0 {
                node.label.clone()
            } else {
                format!("{}.{i}", node.label)
            }
        };
        let fresh = |kind: BufferKind, buffers: &mut Vec<Buffer>| -> Vec<BufferId> {
            node.outputs
                .iter()
                .enumerate()
                .map(|(i, ty)| new_buffer(buffers, output_name(i), kind.clone(), ty))
                .collect()
        };
        match &node.op {
            Op::Input { kind, .. } => {
                let kind = match kind {
                    InputKind::Activation => BufferKind::Input,
                    InputKind::State => BufferKind::State,
                    InputKind::Weight => BufferKind::Weight,
                };
                at_load.push(matches!(kind, BufferKind::Weight));
                value_buffer.push(fresh(kind, &mut buffers));
            }
            Op::Constant { value, .. } => {
                at_load.push(true);
                value_buffer.push(fresh(BufferKind::Constant { value: *value }, &mut buffers));
            }
            Op::Reshape { shape } => {
                let source = node.inputs[0];
                at_load.push(at_load[source.node]);
                aliases.push(Alias {
                    node: index,
                    name: node.label.clone(),
                    buffer: inputs[0],
                    shape: shape.clone(),
                });
                value_buffer.push(vec![inputs[0]]);
            }
            _ if !node.inputs.is_empty() && node.inputs.iter().all(|v| at_load[v.node]) => {
                at_load.push(true);
                let outputs = fresh(BufferKind::LoadTime, &mut buffers);
                load_time.push(LoadTimeOp {
                    node: index,
                    name: node.label.clone(),
                    op: node.op.name().to_string(),
                    inputs,
                    outputs: outputs.clone(),
                    computes: Computation::of(graph, node),
                });
                value_buffer.push(outputs);
            }
            _ => {
                at_load.push(false);
                let outputs = fresh(BufferKind::Intermediate, &mut buffers);
                let family = classify(graph, node);
                let device = gpu.place(&family);
                kernels.push(ScheduledKernel {
                    name: format!("k{:04}.{}", kernels.len(), node.label),
                    launch: launch_of(&family),
                    family,
                    device,
                    graph_nodes: vec![index],
                    inputs,
                    outputs: outputs.clone(),
                    entry: None,
                    computes: Computation::of(graph, node),
                    layer: node.layer,
                });
                value_buffer.push(outputs);
            }
        }
    }
    let outputs: Vec<NamedBuffer> = graph
        .outputs
        .iter()
        .map(|(name, v)| NamedBuffer {
            name: name.clone(),
            buffer: value_buffer[v.node][v.output],
            shape: graph
                .value_type(*v)
                .map(|t| t.shape.clone())
                .expect("a verified graph's outputs exist"),
        })
        .collect();
    for output in &outputs {
        let buffer = &mut buffers[output.buffer];
        if buffer.kind == BufferKind::Intermediate {
            buffer.kind = BufferKind::Output;
        }
    }
    for (index, kernel) in kernels.iter().enumerate() {
        for &id in kernel.inputs.iter().chain(&kernel.outputs) {
            let lifetime = &mut buffers[id].lifetime;
            *lifetime = Some(match *lifetime {
                None => (index, index),
                Some((first, _)) => (first, index),
            });
        }
    }
    Schedule {
        graph: graph.name.clone(),
        kernels,
        load_time,
        buffers,
        aliases,
        transfers: Vec::new(),
        outputs,
        memory: None,
        passes_run: Vec::new(),
    }
}

/// Threads of a row-copy block for rows of `elements` halves: one per 16-byte chunk,
/// whole warps, at most 256.
fn row_threads(elements: usize) -> u32 {
    ((elements as u32).div_ceil(8).div_ceil(32).clamp(1, 8)) * 32
}

/// The nominal launch of a family, mirroring the default tiling of its generator.
fn launch_of(family: &Family) -> Launch {
    let one = || SymExpr::constant(1);
    let (grid, block) = match family {
        // One warp per two weight rows, four warps per block (GEMV); 128×128 tiles (GEMM).
        Family::Linear {
            rows, n, epilogue, ..
        } => {
            let cols_per_block = if *epilogue == LinearEpilogue::SwiGlu {
                4
            } else {
                8
            };
            (
                [
                    SymExpr::constant(*n as u64).ceil_div(cols_per_block),
                    rows.clone().ceil_div(16),
                    one(),
                ],
                128,
            )
        }
        // One block per row, one thread per 8 elements (whole warps, at most 1024).
        Family::RmsNorm { rows, hidden, .. } => (
            [rows.clone(), one(), one()],
            ((*hidden as u32 / 8).div_ceil(32).clamp(1, 32)) * 32,
        ),
        // x: heads × pair-chunks of 8 in blocks of 128; y: tokens.
        Family::Rope {
            tokens,
            heads,
            head_dim,
            ..
        } => (
            [
                SymExpr::constant((heads * head_dim / 16) as u64).ceil_div(128),
                tokens.clone(),
                one(),
            ],
            128,
        ),
        // 8 elements per chunk, 4 chunks per thread, 256 threads.
        Family::Map { elements, .. } => {
            ([elements.clone().ceil_div(8 * 4 * 256), one(), one()], 256)
        }
        // Decode: the split-KV partial kernel, about two blocks per SM for one sequence;
        // prefill: one block per (query head, sequence, 64 queries).
        Family::Attention {
            kind,
            batch,
            queries,
            q_heads,
            kv_heads,
            ..
        } => match kind {
            AttentionKind::CausalPrefill => (
                [
                    SymExpr::constant(*q_heads as u64),
                    batch.clone(),
                    queries.clone().ceil_div(64),
                ],
                128,
            ),
            _ => (
                [
                    SymExpr::constant(264).ceil_div(*kv_heads as u64),
                    SymExpr::constant(*kv_heads as u64),
                    batch.clone(),
                ],
                128,
            ),
        },
        // One block row per new token, 16 bytes per thread.
        Family::KvAppend {
            batch,
            new_tokens,
            kv_heads,
            head_dim,
            ..
        } => (
            [
                new_tokens.clone(),
                batch.clone(),
                SymExpr::constant((kv_heads * head_dim / 8) as u64).ceil_div(128),
            ],
            128,
        ),
        // One block per copied row (`row_copy`), a warp-multiple of 16-byte chunks.
        Family::Gather { rows, hidden, .. } => ([rows.clone(), one(), one()], row_threads(*hidden)),
        Family::Slice {
            outer,
            start,
            end,
            inner,
            ..
        } => {
            // The taken length is known only for constant bounds of the same sign; otherwise
            // count one row per outer index (the common last-token slice).
            let taken = match (start, end) {
                (s, Some(e)) if (*s >= 0) == (*e >= 0) => (e - s).max(0) as u64,
                (s, None) if *s < 0 => s.unsigned_abs(),
                _ => 1,
            };
            (
                [outer.clone().times(taken), one(), one()],
                row_threads(*inner),
            )
        }
        // Router: a warp per token, or a block per token with the linear fused; dispatch: one
        // block; expert FFN: a block per four intermediate rows and expert; combine: a block
        // per token.
        Family::Moe { stage, tokens, .. } => match stage {
            MoeStage::Router { hidden: None, .. } => ([tokens.clone(), one(), one()], 32),
            MoeStage::Router {
                hidden: Some(_), ..
            } => ([tokens.clone(), one(), one()], 256),
            MoeStage::Dispatch { .. } => ([one(), one(), one()], 256),
            MoeStage::ExpertFfn {
                experts,
                intermediate,
                ..
            } => (
                [
                    SymExpr::constant(*intermediate as u64).ceil_div(4),
                    SymExpr::constant(*experts as u64),
                    one(),
                ],
                128,
            ),
            MoeStage::Combine { .. } => ([tokens.clone(), one(), one()], 128),
        },
        Family::AtomLinear { .. } | Family::HostOnly { .. } => ([one(), one(), one()], 1),
    };
    Launch {
        grid,
        block: [block, 1, 1],
    }
}
