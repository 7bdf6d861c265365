//! Placement: which device runs each kernel, and the host↔device transfers that follow.
//!
//! Owns [`GpuCapabilities`] (the families and dtypes that have a GPU generator), the initial
//! placement rule, [`recompute_transfers`] and the [`ForceCpu`] pass that moves named kernels
//! to the CPU (used by the lowering when a generator rejects a spec; later by Fiddler).
//! A kernel without a GPU generator runs on the CPU as its host step (Cranelift kernels, or
//! the runtime's copies for data movement: `kiln_kernels::cpu_step`); every buffer it reads
//! that is only valid on the GPU is copied to the host first, and vice versa.
//! Integer kernels follow their readers ([`place_integer_maps_with_their_readers`]): an i32
//! map or an MoE dispatch stays on the GPU only where a GPU kernel reads it. Graph inputs start on the host; graph
//! outputs end on the host.

use super::family::{Family, FamilyKind};
use super::pass::{Pass, PassReport};
use super::{BufferKind, Device, Schedule, Transfer};
use crate::dtype::DType;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// What the GPU backend can generate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuCapabilities {
    /// Families with a GPU generator.
    pub families: BTreeSet<FamilyKind>,
    /// Dtypes every listed family's generator accepts.
    pub dtypes: BTreeSet<DType>,
    /// Further dtypes that one family's generator accepts beyond `dtypes` (elementwise maps
    /// in i32: sequence-length arithmetic).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub family_dtypes: BTreeMap<FamilyKind, BTreeSet<DType>>,
}

impl Default for GpuCapabilities {
    /// The generators of `kiln-kernels` today: linear (GEMV/GEMM), RMSNorm, RoPE,
    /// elementwise maps (operands of the result's shape, single elements broadcast to it, or
    /// one value per row of its last dimension, as Qwen2-MoE's `[.., 1]` shared-expert gate;
    /// also in i32), attention (causal prefill, decode and Quest decode over the contiguous
    /// KV cache), KV append, the embedding gather and slices, the MoE router, dispatch (i32),
    /// grouped expert FFN and combine, in f16 and bf16.
    fn default() -> GpuCapabilities {
        GpuCapabilities {
            families: [
                FamilyKind::Linear,
                FamilyKind::RmsNorm,
                FamilyKind::Rope,
                FamilyKind::Map,
                FamilyKind::Attention,
                FamilyKind::KvAppend,
                FamilyKind::Gather,
                FamilyKind::Slice,
                FamilyKind::Moe,
            ]
            .into_iter()
            .collect(),
            dtypes: [DType::F16, DType::BF16].into_iter().collect(),
            family_dtypes: [FamilyKind::Map, FamilyKind::Moe]
                .into_iter()
                .map(|kind| (kind, [DType::I32].into_iter().collect()))
                .collect(),
        }
    }
}

impl GpuCapabilities {
    /// Whether the generator of `kind` accepts `dtype`.
    pub fn accepts(&self, kind: FamilyKind, dtype: DType) -> bool {
        self.families.contains(&kind)
            && (self.dtypes.contains(&dtype)
                || self
                    .family_dtypes
                    .get(&kind)
                    .is_some_and(|dtypes| dtypes.contains(&dtype)))
    }

    /// Where a kernel of `family` runs. A map runs on the GPU unless it broadcasts some
    /// operand other than a single element or a per-row value (`Family::Map::broadcast`).
    pub fn place(&self, family: &Family) -> Device {
        let supported = family
            .dtype()
            .is_some_and(|d| self.accepts(family.kind(), d))
            && !matches!(
                family,
                Family::Map {
                    broadcast: true,
                    ..
                }
            );
        if supported {
            Device::Gpu
        } else {
            Device::Cpu
        }
    }
}

/// Integer kernels (sequence-length bookkeeping such as decode's `cache_start + 1`, and the
/// MoE dispatch, which sorts expert ids) run where they are read: one placed on the GPU whose
/// results no GPU kernel reads goes back to the CPU, so a plan whose readers are all on the
/// host (an f32 plan, say) needs no device and no round trip for them. Kernels are visited last to first, so a chain of integer
/// maps follows its last reader. Returns how many kernels moved.
pub fn place_integer_maps_with_their_readers(schedule: &mut Schedule) -> usize {
    let mut moved = 0;
    for index in (0..schedule.kernels.len()).rev() {
        let kernel = &schedule.kernels[index];
        let integer_map = matches!(
            kernel.family,
            Family::Map {
                dtype: DType::I32,
                ..
            } | Family::Moe {
                dtype: DType::I32,
                ..
            }
        );
        if !integer_map || kernel.device != Device::Gpu {
            continue;
        }
        let outputs = kernel.outputs.clone();
        let read_on_gpu = schedule.kernels[index + 1..].iter().any(|reader| {
            reader.device == Device::Gpu && reader.inputs.iter().any(|i| outputs.contains(i))
        });
        if !read_on_gpu {
            schedule.kernels[index].device = Device::Cpu;
            moved += 1;
        }
    }
    moved
}

/// Recomputes `schedule.transfers` from the kernels' devices, in kernel order.
pub fn recompute_transfers(schedule: &mut Schedule) {
    // Where each buffer holds a valid copy. Weights, constants and load-time results are
    // resident wherever they are read (copied at load time), so they never move per call.
    let mut valid: BTreeMap<usize, BTreeSet<Device>> = BTreeMap::new();
    let resident = |kind: &BufferKind| {
        matches!(
            kind,
            BufferKind::Weight | BufferKind::Constant { .. } | BufferKind::LoadTime
        )
    };
    for buffer in &schedule.buffers {
        if matches!(buffer.kind, BufferKind::Input | BufferKind::State) {
            valid.insert(buffer.id, [Device::Cpu].into_iter().collect());
        }
    }
    let mut transfers = Vec::new();
    for (index, kernel) in schedule.kernels.iter().enumerate() {
        for &input in &kernel.inputs {
            if resident(&schedule.buffers[input].kind) {
                continue;
            }
            let places = valid.entry(input).or_default();
            if !places.contains(&kernel.device) {
                transfers.push(Transfer {
                    before_kernel: index,
                    buffer: input,
                    to: kernel.device,
                });
                places.insert(kernel.device);
            }
        }
        for &output in &kernel.outputs {
            valid.insert(output, [kernel.device].into_iter().collect());
        }
    }
    let end = schedule.kernels.len();
    for output in &schedule.outputs {
        let places = valid.entry(output.buffer).or_default();
        if !places.contains(&Device::Cpu) && !resident(&schedule.buffers[output.buffer].kind) {
            transfers.push(Transfer {
                before_kernel: end,
                buffer: output.buffer,
                to: Device::Cpu,
            });
            places.insert(Device::Cpu);
        }
    }
    schedule.transfers = transfers;
}

/// Moves the named kernels to the CPU (their CPU steps), each with a reason, and recomputes the
/// transfers. Options: the kernel names and reasons.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ForceCpu {
    /// Kernel name → why it cannot run on the GPU.
    pub kernels: BTreeMap<String, String>,
}

impl Pass for ForceCpu {
    fn name(&self) -> &str {
        "force_cpu"
    }

    fn options(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("string maps serialise")
    }

    fn run(&self, schedule: &mut Schedule) -> PassReport {
        let mut report = PassReport::default();
        for kernel in &mut schedule.kernels {
            if let Some(reason) = self.kernels.get(&kernel.name) {
                if kernel.device != Device::Cpu {
                    kernel.device = Device::Cpu;
                    report.changed += 1;
                    report.notes.push(format!("{}: {reason}", kernel.name));
                }
            }
        }
        recompute_transfers(schedule);
        report
    }
}
