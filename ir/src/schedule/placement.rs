//! Placement: which device runs each kernel, and the host↔device transfers that follow.
//!
//! Owns [`GpuCapabilities`] (the families and dtypes that have a GPU generator), the initial
//! placement rule, [`recompute_transfers`] and the [`ForceCpu`] pass that moves named kernels
//! to the CPU (used by the lowering when a generator rejects a spec; later by Fiddler).
//! A kernel without a GPU generator runs on the CPU through `ir::interp`; every buffer it
//! reads that is only valid on the GPU is copied to the host first, and vice versa.
//! Graph inputs start on the host; graph outputs end on the host.

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
    /// Dtypes those generators accept.
    pub dtypes: BTreeSet<DType>,
}

impl Default for GpuCapabilities {
    /// The generators of `kiln-kernels` today: linear (GEMV/GEMM), RMSNorm, RoPE,
    /// elementwise maps without broadcasting, attention (causal prefill, decode and Quest
    /// decode over the contiguous KV cache) and KV append, in f16 and bf16.
    fn default() -> GpuCapabilities {
        GpuCapabilities {
            families: [
                FamilyKind::Linear,
                FamilyKind::RmsNorm,
                FamilyKind::Rope,
                FamilyKind::Map,
                FamilyKind::Attention,
                FamilyKind::KvAppend,
            ]
            .into_iter()
            .collect(),
            dtypes: [DType::F16, DType::BF16].into_iter().collect(),
        }
    }
}

impl GpuCapabilities {
    /// Where a kernel of `family` runs.
    pub fn place(&self, family: &Family) -> Device {
        let supported = self.families.contains(&family.kind())
            && family.dtype().is_some_and(|d| self.dtypes.contains(&d))
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
