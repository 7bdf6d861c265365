//! # ir::schedule — from a (rewritten) graph to a plan of kernels
//!
//! [`schedule`] partitions a verified graph into [`ScheduledKernel`]s, one per kernel-like
//! node (reshapes are views: their values alias the buffer they reshape), each with its
//! [`Family`] (`family`), its [`Device`] (`placement`: a family without a GPU generator
//! runs on the CPU as its host step, with explicit [`Transfer`]s), its buffers and a
//! symbolic launch extent. Subgraphs that read only weights and constants (such as the
//! concatenated SwiGLU weights) are hoisted to load time (`load_time`), not kernels. Buffers
//! carry symbolic sizes and lifetimes; the [`memory::PlanMemory`] pass assigns arena offsets
//! that reuse dead buffers. Every later change is a [`Pass`] and is recorded in
//! `passes_run`.
//!
//! The plan serialises to JSON deterministically ([`Schedule::to_json`]): only `Vec`s and
//! `BTreeMap`s, no timings. This module must not generate code or touch a device.
//!
//! ```
//! use kiln_ir::schedule::{schedule, ScheduleOptions};
//! use kiln_ir::{dtype::DType, graph::Graph, op::{InputKind, Op}, shape};
//! let mut g = Graph::new("proj");
//! let x = g.input("x", InputKind::Activation, DType::F16, shape!["tokens", 64]).unwrap();
//! let w = g.input("w", InputKind::Weight, DType::F16, shape![128, 64]).unwrap();
//! let y = g.add1("proj", Op::Linear, &[x, w]).unwrap();
//! g.output("y", y);
//! let plan = schedule(&g, &ScheduleOptions::default()).unwrap();
//! assert!(!plan.kernels.is_empty());
//! ```

pub mod computation;
pub mod family;
pub mod memory;
pub mod partition;
pub mod pass;
pub mod placement;
pub mod size;

pub use computation::Computation;
pub use family::{
    classify, slice_range, AttentionKind, Family, FamilyKind, LinearEpilogue, MoeStage,
};
pub use memory::{MemoryPlan, PlanMemory};
pub use pass::{Pass, PassRecord, PassReport};
pub use placement::{recompute_transfers, ForceCpu, GpuCapabilities};
pub use size::SymExpr;

use crate::dtype::DType;
use crate::graph::Graph;
use crate::shape::{Bindings, Shape};
use crate::verify::VerifyError;
use serde::{Deserialize, Serialize};

/// Where a kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Gpu,
    Cpu,
}

/// An index into `Schedule::buffers`.
pub type BufferId = usize;

/// What a buffer holds, which decides who owns its memory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BufferKind {
    /// A per-call graph input (token ids, positions, …).
    Input,
    /// A state input such as a KV cache.
    State,
    /// A model weight.
    Weight,
    /// A scalar constant.
    Constant { value: f32 },
    /// The result of a load-time computation over weights.
    LoadTime,
    /// A kernel result read only by later kernels: planned in the arena.
    Intermediate,
    /// A kernel result that is a graph output.
    Output,
}

/// One buffer: a graph value that is not a view.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Buffer {
    pub id: BufferId,
    /// The label of the node that defines it (with `.N` for output `N > 0`).
    pub name: String,
    pub kind: BufferKind,
    pub dtype: DType,
    pub shape: Shape,
    /// Storage size in bytes.
    pub bytes: SymExpr,
    /// First and last kernel index that touch it (`None` when no kernel does).
    pub lifetime: Option<(usize, usize)>,
}

/// A reshape: a view of `buffer` with another shape, no copy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Alias {
    pub node: usize,
    pub name: String,
    pub buffer: BufferId,
    pub shape: Shape,
}

/// A copy of `buffer` to `to` before kernel `before_kernel` (`kernels.len()` = at the end).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    pub before_kernel: usize,
    pub buffer: BufferId,
    pub to: Device,
}

/// A computation over weights and constants only, run once when the weights are loaded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadTimeOp {
    pub node: usize,
    pub name: String,
    pub op: String,
    pub inputs: Vec<BufferId>,
    pub outputs: Vec<BufferId>,
    /// What it computes (op and operand types), for running it without the graph.
    pub computes: Computation,
}

/// A symbolic launch extent: the grid in units of work the family's generator tiles, for
/// reports and the runtime's sanity checks (the generator's own launch rule is exact).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    pub grid: [SymExpr; 3],
    pub block: [u32; 3],
}

/// One kernel of the plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduledKernel {
    /// Unique in the plan: `k{index}.{label}`.
    pub name: String,
    pub family: Family,
    pub device: Device,
    /// The graph nodes it computes (one today; fusing passes may merge more).
    pub graph_nodes: Vec<usize>,
    pub inputs: Vec<BufferId>,
    pub outputs: Vec<BufferId>,
    pub launch: Launch,
    /// The generated entry point, filled in by the lowering (`None` for CPU kernels).
    pub entry: Option<String>,
    /// What it computes (op and operand types), for running it on the host without the
    /// graph.
    pub computes: Computation,
    /// The decoder layer of the graph node it computes (`None` outside the layers, and in
    /// plans written before kernels recorded it).
    #[serde(default)]
    pub layer: Option<usize>,
}

/// A named graph output and the buffer that holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NamedBuffer {
    pub name: String,
    pub buffer: BufferId,
    /// The output's shape (a view may give the buffer another shape).
    pub shape: Shape,
}

/// The plan of one graph.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub graph: String,
    pub kernels: Vec<ScheduledKernel>,
    pub load_time: Vec<LoadTimeOp>,
    pub buffers: Vec<Buffer>,
    pub aliases: Vec<Alias>,
    pub transfers: Vec<Transfer>,
    pub outputs: Vec<NamedBuffer>,
    pub memory: Option<MemoryPlan>,
    pub passes_run: Vec<PassRecord>,
}

/// How to schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleOptions {
    /// Concrete sizes for the memory plan; unbound symbols of the graph count as 1.
    pub bindings: Bindings,
    /// What may run on the GPU.
    pub gpu: GpuCapabilities,
    /// Arena offset alignment in bytes.
    pub alignment: u64,
}

impl Default for ScheduleOptions {
    /// Batch 1, 128 prompt tokens, a 4096-token context; today's GPU generators; 256-byte
    /// alignment.
    fn default() -> ScheduleOptions {
        ScheduleOptions {
            bindings: Bindings::from_pairs(&[("batch", 1), ("seq", 128), ("ctx", 4096)]),
            gpu: GpuCapabilities::default(),
            alignment: 256,
        }
    }
}

/// Why a graph could not be scheduled.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    #[error("the graph to schedule does not verify: {0}")]
    InvalidGraph(VerifyError),
}

/// Schedules `graph`: partition, placement, transfers, then the [`PlanMemory`] pass.
pub fn schedule(graph: &Graph, options: &ScheduleOptions) -> Result<Schedule, ScheduleError> {
    graph.verify().map_err(ScheduleError::InvalidGraph)?;
    let mut plan = partition::partition(graph, &options.gpu);
    placement::place_integer_maps_with_their_readers(&mut plan);
    recompute_transfers(&mut plan);
    let mut bindings = options.bindings.clone();
    for buffer in &plan.buffers {
        for name in &buffer.bytes.symbols {
            if bindings.get(name).is_none() {
                bindings.set(name, 1);
            }
        }
    }
    plan.apply(&PlanMemory {
        bindings,
        alignment: options.alignment,
    });
    Ok(plan)
}

impl Schedule {
    /// The plan as pretty JSON with a final newline; the same plan gives the same bytes.
    pub fn to_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).expect("plans serialise");
        text.push('\n');
        text
    }

    /// Kernels per device.
    pub fn count_on(&self, device: Device) -> usize {
        self.kernels.iter().filter(|k| k.device == device).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::ValueId;
    use crate::op::{InputKind, MapStep, Op};
    use crate::shape::Dim;

    #[test]
    fn kernels_record_the_layer_and_older_plans_still_read() {
        let mut g = Graph::new("proj");
        let x = g
            .input(
                "x",
                InputKind::Activation,
                DType::F16,
                crate::shape!["tokens", 64],
            )
            .unwrap();
        let w = g
            .input("w", InputKind::Weight, DType::F16, crate::shape![128, 64])
            .unwrap();
        let y = g.add1("proj", Op::Linear, &[x, w]).unwrap();
        let z = g.add1("act", Op::Silu, &[y]).unwrap();
        g.output("z", z);
        g.nodes[y.node].layer = Some(4);
        let plan = schedule(&g, &ScheduleOptions::default()).unwrap();
        let layers: Vec<_> = plan.kernels.iter().map(|k| k.layer).collect();
        assert_eq!(layers, vec![Some(4), None]);

        // A plan (or graph) serialised before kernels and nodes had a layer still reads, with
        // no layer.
        let mut json: serde_json::Value = serde_json::from_str(&plan.to_json()).unwrap();
        for kernel in json["kernels"].as_array_mut().unwrap() {
            let kernel = kernel.as_object_mut().unwrap();
            assert!(kernel.remove("layer").is_some());
        }
        let old: Schedule = serde_json::from_value(json).unwrap();
        assert!(old.kernels.iter().all(|k| k.layer.is_none()));
        let mut json = serde_json::to_value(&g).unwrap();
        for node in json["nodes"].as_array_mut().unwrap() {
            node.as_object_mut().unwrap().remove("layer");
        }
        let old: Graph = serde_json::from_value(json).unwrap();
        assert!(old.nodes.iter().all(|n| n.layer.is_none()));
    }

    /// The embedding, the last-token slice and an i32 map with a scalar operand: typed
    /// families, on the GPU in bf16 (the map in i32), on the CPU in f32 or without GPU
    /// capabilities.
    fn movement_graph(dtype: DType) -> Graph {
        let mut g = Graph::new("movement");
        let table = g
            .input("table", InputKind::Weight, dtype, crate::shape![100, 24])
            .unwrap();
        let ids = g
            .input(
                "ids",
                InputKind::Activation,
                DType::I32,
                crate::shape!["batch", "seq"],
            )
            .unwrap();
        let start = g
            .input(
                "start",
                InputKind::Activation,
                DType::I32,
                crate::shape!["batch"],
            )
            .unwrap();
        let x = g.add1("embed", Op::Embedding, &[table, ids]).unwrap();
        let last = g
            .add1(
                "last_token",
                Op::Slice {
                    axis: 1,
                    start: -1,
                    end: None,
                },
                &[x],
            )
            .unwrap();
        let one = g
            .add1(
                "one",
                Op::Constant {
                    value: 1.0,
                    dtype: DType::I32,
                },
                &[],
            )
            .unwrap();
        let lengths = g.add1("lengths", Op::Add, &[start, one]).unwrap();
        g.output("last", last);
        g.output("lengths", lengths);
        g
    }

    #[test]
    fn gather_slice_and_scalar_maps_have_typed_families_and_go_to_the_gpu() {
        let plan = schedule(&movement_graph(DType::BF16), &ScheduleOptions::default()).unwrap();
        let by_name = |name: &str| {
            plan.kernels
                .iter()
                .find(|k| k.name.ends_with(&format!(".{name}")))
                .unwrap_or_else(|| panic!("no kernel {name}"))
        };
        let embed = by_name("embed");
        assert_eq!(
            embed.family,
            Family::Gather {
                rows: SymExpr::product(&[Dim::sym("batch"), Dim::sym("seq")]),
                vocab: 100,
                hidden: 24,
                dtype: DType::BF16,
            }
        );
        let slice = by_name("last_token");
        assert_eq!(
            slice.family,
            Family::Slice {
                outer: SymExpr::product(&[Dim::sym("batch")]),
                axis_len: SymExpr::product(&[Dim::sym("seq")]),
                start: -1,
                end: None,
                inner: 24,
                dtype: DType::BF16,
            }
        );
        let lengths = by_name("lengths");
        assert!(
            matches!(
                &lengths.family,
                Family::Map { scalar_operands, broadcast: false, dtype: DType::I32, .. }
                    if scalar_operands == &vec![1]
            ),
            "{:?}",
            lengths.family
        );
        assert_eq!(
            lengths.family.describe(),
            "map i32 inputs=2 steps=3 scalar_operands=[1]"
        );
        for kernel in [embed, slice] {
            assert_eq!(kernel.device, Device::Gpu, "{}", kernel.name);
        }
        // Nothing on the GPU reads the lengths (a graph output here): it stays on the host.
        assert_eq!(lengths.device, Device::Cpu);
        let json = serde_json::to_value(&embed.family).unwrap();
        assert_eq!(json["family"], "gather");
        assert_eq!(
            serde_json::to_value(&slice.family).unwrap()["family"],
            "slice"
        );

        // f32 has no GPU generator; without capabilities nothing goes to the GPU.
        let f32_plan = schedule(&movement_graph(DType::F32), &ScheduleOptions::default()).unwrap();
        assert_eq!(f32_plan.count_on(Device::Gpu), 0);
        let cpu_only = ScheduleOptions {
            gpu: GpuCapabilities {
                families: Default::default(),
                dtypes: Default::default(),
                family_dtypes: Default::default(),
            },
            ..ScheduleOptions::default()
        };
        let cpu_plan = schedule(&movement_graph(DType::BF16), &cpu_only).unwrap();
        assert_eq!(cpu_plan.count_on(Device::Gpu), 0);
    }

    #[test]
    fn an_integer_map_read_on_the_gpu_runs_there() {
        // `doubled = (start + one) + (start + one)` as the ids of an embedding: an f16 gather on the GPU
        // keeps both integer maps on the GPU; with the gather on the host (f32), they follow.
        for (dtype, device) in [(DType::F16, Device::Gpu), (DType::F32, Device::Cpu)] {
            let mut g = Graph::new("lengths");
            let start = g
                .input("start", InputKind::Activation, DType::I32, crate::shape![4])
                .unwrap();
            let one = g.constant("one", 1.0, DType::I32).unwrap();
            let lengths = g.add1("lengths", Op::Add, &[start, one]).unwrap();
            let doubled = g.add1("doubled", Op::Add, &[lengths, lengths]).unwrap();
            let table = g
                .input("table", InputKind::Weight, dtype, crate::shape![16, 4])
                .unwrap();
            let rows = g.add1("rows", Op::Embedding, &[table, doubled]).unwrap();
            g.output("rows", rows);
            let plan = schedule(&g, &ScheduleOptions::default()).unwrap();
            for kernel in &plan.kernels {
                assert_eq!(kernel.device, device, "{dtype}: {}", kernel.name);
            }
        }
    }

    /// One MoE layer: router, dispatch, expert FFN and combine over `experts` experts.
    fn moe_graph(dtype: DType, experts: usize) -> Graph {
        let (hidden, width, top_k) = (16, 8, 2);
        let mut g = Graph::new("moe");
        let x = g
            .input(
                "x",
                InputKind::Activation,
                dtype,
                crate::shape!["tokens", hidden],
            )
            .unwrap();
        let logits = g
            .input(
                "logits",
                InputKind::Activation,
                dtype,
                crate::shape!["tokens", experts],
            )
            .unwrap();
        let weights: Vec<[ValueId; 3]> = (0..experts)
            .map(|e| {
                let mut weight = |name: &str, shape| {
                    g.input(&format!("{name}_{e}"), InputKind::Weight, dtype, shape)
                        .unwrap()
                };
                [
                    weight("gate", crate::shape![width, hidden]),
                    weight("up", crate::shape![width, hidden]),
                    weight("down", crate::shape![hidden, width]),
                ]
            })
            .collect();
        let out = g
            .add_moe("moe", x, logits, &weights, top_k, true)
            .unwrap()
            .out;
        g.output("out", out);
        g
    }

    #[test]
    fn moe_stages_are_typed_families_on_the_gpu_in_half_precision() {
        let plan = schedule(&moe_graph(DType::BF16, 4), &ScheduleOptions::default()).unwrap();
        let stages: Vec<MoeStage> = plan
            .kernels
            .iter()
            .map(|k| {
                assert_eq!(k.device, Device::Gpu, "{}", k.family.describe());
                match &k.family {
                    Family::Moe {
                        stage, top_k: 2, ..
                    } => *stage,
                    other => panic!("not an MoE family: {}", other.describe()),
                }
            })
            .collect();
        assert_eq!(
            stages,
            [
                MoeStage::Router {
                    experts: 4,
                    normalize: true,
                    hidden: None,
                },
                MoeStage::Dispatch { experts: 4 },
                MoeStage::ExpertFfn {
                    experts: 4,
                    hidden: 16,
                    intermediate: 8
                },
                MoeStage::Combine { hidden: 16 },
            ]
        );
        // The dispatch is i32 and its readers are on the GPU, so it is too.
        assert!(matches!(
            plan.kernels[1].family,
            Family::Moe {
                dtype: DType::I32,
                ..
            }
        ));
    }

    #[test]
    fn an_f32_moe_layer_stays_on_the_host_dispatch_included() {
        let plan = schedule(&moe_graph(DType::F32, 3), &ScheduleOptions::default()).unwrap();
        assert_eq!(plan.count_on(Device::Gpu), 0, "{}", plan.to_json());
        assert_eq!(plan.kernels.len(), 4);
    }

    #[test]
    fn general_broadcast_maps_stay_on_the_cpu() {
        let mut g = Graph::new("bias");
        let x = g
            .input(
                "x",
                InputKind::Activation,
                DType::F16,
                crate::shape!["t", 8],
            )
            .unwrap();
        let b = g
            .input("b", InputKind::Activation, DType::F16, crate::shape![8])
            .unwrap();
        let y = g.add1("bias", Op::Add, &[x, b]).unwrap();
        g.output("y", y);
        let plan = schedule(&g, &ScheduleOptions::default()).unwrap();
        let kernel = &plan.kernels[0];
        assert!(
            matches!(&kernel.family, Family::Map { broadcast: true, scalar_operands, .. } if scalar_operands.is_empty())
        );
        assert_eq!(kernel.device, Device::Cpu);
    }

    /// Qwen2-MoE's gated shared expert: `out + sigmoid(gate) · shared`, the gate `[t, 1]`.
    fn gated_graph(dtype: DType) -> Graph {
        let mut g = Graph::new("gated");
        let out = g
            .input("out", InputKind::Activation, dtype, crate::shape!["t", 16])
            .unwrap();
        let gate = g
            .input("gate", InputKind::Activation, dtype, crate::shape!["t", 1])
            .unwrap();
        let shared = g
            .input(
                "shared",
                InputKind::Activation,
                dtype,
                crate::shape!["t", 16],
            )
            .unwrap();
        let steps = vec![
            MapStep::Operand { index: 0 },
            MapStep::Operand { index: 1 },
            MapStep::Operand { index: 2 },
            MapStep::Sigmoid { x: 1 },
            MapStep::Mul { a: 3, b: 2 },
            MapStep::Add { a: 0, b: 4 },
        ];
        let y = g
            .add1("gated", Op::FusedMap { steps }, &[out, gate, shared])
            .unwrap();
        g.output("y", y);
        g
    }

    #[test]
    fn row_gated_maps_have_row_operands_and_go_to_the_gpu_in_half_precision() {
        let plan = schedule(&gated_graph(DType::BF16), &ScheduleOptions::default()).unwrap();
        let kernel = &plan.kernels[0];
        assert!(
            matches!(
                &kernel.family,
                Family::Map { broadcast: false, scalar_operands, row_operands, row_width: 16, .. }
                    if scalar_operands.is_empty() && row_operands == &vec![1]
            ),
            "{:?}",
            kernel.family
        );
        assert_eq!(kernel.device, Device::Gpu);
        assert_eq!(
            kernel.family.describe(),
            "map bf16 inputs=3 steps=6 row_operands=[1] row_width=16"
        );
        // The fields round-trip, and a map without row operands serialises as before.
        let json = serde_json::to_value(&kernel.family).unwrap();
        assert_eq!(json["row_operands"], serde_json::json!([1]));
        assert_eq!(json["row_width"], 16);
        let back: Family = serde_json::from_value(json).unwrap();
        assert_eq!(back, kernel.family);

        let plan = schedule(&gated_graph(DType::F32), &ScheduleOptions::default()).unwrap();
        let kernel = &plan.kernels[0];
        assert!(
            matches!(&kernel.family, Family::Map { row_operands, .. } if row_operands == &vec![1])
        );
        assert_eq!(kernel.device, Device::Cpu, "f32 has no GPU generator");
    }

    #[test]
    fn a_last_dimension_of_one_in_another_position_is_general_broadcasting() {
        // `[t, 1]` against `[t, 16]` is a row operand; `[1, 16]` and `[t]` are not.
        for shape in [crate::shape![1, 16], crate::shape!["t"]] {
            let mut g = Graph::new("bias");
            let x = g
                .input(
                    "x",
                    InputKind::Activation,
                    DType::F16,
                    crate::shape!["t", 16],
                )
                .unwrap();
            let b = g
                .input("b", InputKind::Activation, DType::F16, shape)
                .unwrap();
            let Ok(y) = g.add1("bias", Op::Add, &[x, b]) else {
                continue;
            };
            g.output("y", y);
            let plan = schedule(&g, &ScheduleOptions::default()).unwrap();
            let kernel = &plan.kernels[0];
            assert!(
                matches!(&kernel.family, Family::Map { broadcast: true, row_operands, row_width: 0, .. } if row_operands.is_empty()),
                "{:?}",
                kernel.family
            );
            assert_eq!(kernel.device, Device::Cpu);
        }
    }

    #[test]
    fn slice_ranges_follow_the_movement_rule() {
        assert_eq!(slice_range(-1, None, 7), Some((6, 7)));
        assert_eq!(slice_range(2, Some(-1), 7), Some((2, 6)));
        assert_eq!(slice_range(0, Some(0), 7), Some((0, 0)));
        assert_eq!(slice_range(-8, None, 7), None);
        assert_eq!(slice_range(3, Some(2), 7), None);
        assert_eq!(slice_range(0, Some(8), 7), None);
    }
}
