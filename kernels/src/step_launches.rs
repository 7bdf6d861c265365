//! The launches of one GPU step of a plan, as data: the form a compiled artifact records in
//! `plan.json` and the runtime runs.
//!
//! Every GPU step of a plan is a list of launches ([`StepLaunches`]): for each, the kernel by
//! spec key, which buffer each pointer parameter binds to ([`StepBuffer`]: an operand or a
//! result of the step, a workspace, a derived table, Quest page bounds kept between calls)
//! and the scalar arguments. A single-kernel family (linear, RMSNorm, RoPE, map) is one
//! launch whose parameters bind to the step's operands and results; attention and KV append
//! are the programs of [`crate::attention::program`]; the MoE expert FFN is its two stages
//! (gate and up with SwiGLU into a workspace, then down), each expert's weights bound by
//! name (`gate_e`, `up_e`, `down_e` to operands `3 + 3e`, `4 + 3e`, `5 + 3e`), on the grouped
//! GEMV for at most [`crate::lower::GEMV_MAX_ROWS`] tokens and on the grouped tensor-core
//! GEMM above, where its sizes allow. [`step_launches`] derives them from a
//! step's family for one set of sizes (and the device's SM count, which sizes the decode
//! splits) and returns the specs beside them ([`DerivedStep`]), so that a caller that
//! generates code can; a recorded [`StepLaunches`] names kernels by key only.
//!
//! ```
//! use kiln_ir::dtype::DType;
//! use kiln_ir::schedule::{Family, SymExpr};
//! use kiln_ir::shape::Bindings;
//! use kiln_kernels::step_launches::{step_launches, StepBuffer};
//! let family = Family::RmsNorm {
//!     rows: SymExpr::product(&[kiln_ir::shape::Dim::Sym("seq".into())]),
//!     hidden: 256,
//!     residual: false,
//!     eps: 1e-5,
//!     dtype: DType::BF16,
//! };
//! let derived = step_launches(&family, &Bindings::from_pairs(&[("seq", 7)]), 132).unwrap();
//! let launch = &derived.launches.launches[0];
//! assert_eq!(derived.launches.buffers["x"], StepBuffer::Operand { index: 0 });
//! assert_eq!(launch.buffer_of("out"), Some("out"));
//! assert_eq!(launch.scalars["rows"], kiln_kernels::lower::Scalar::U32(7));
//! ```
//!
//! This module derives and describes; it must not generate PTX beyond handing out specs, and
//! must not launch anything.

use crate::attention::program::{program, AttentionProgram, ProgramBuffer, ProgramKernel};
use crate::lower::{KernelSpec, LowerError, Scalar};
use crate::moe::expert_ffn::{self, ExpertFfnKernel, ExpertFfnStage, MoeExpertFfnSpec};
use crate::SpecError;
use kiln_codegen::kernel::GpuKernel;
use kiln_ir::schedule::{Family, MoeStage};
use kiln_ir::shape::Bindings;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a launch's pointer parameter binds to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum StepBuffer {
    /// Operand `index` of the step (its plan kernel's `inputs[index]`).
    Operand { index: usize },
    /// Result `index` of the step (`outputs[index]`). A KV append's result is the memory of
    /// its cache operand (operand 0): the runtime writes the cache in place.
    Result { index: usize },
    /// Scratch of `bytes` bytes, written before it is read within the step.
    Workspace { bytes: usize },
    /// i32 `[batch, max_pages]`: `b · max_pages + j` (the contiguous cache as pages).
    IdentityPageTable { batch: usize, max_pages: usize },
    /// i32 `[batch]`, every entry `value`.
    Lengths { batch: usize, value: usize },
    /// Quest page bounds of the step's K cache, `elements` values of the cache dtype, kept
    /// by the runtime from call to call (the minima when `min`, else the maxima).
    QuestBounds { elements: usize, min: bool },
}

/// One pointer parameter and the step buffer it binds to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamBinding {
    pub param: String,
    pub buffer: String,
}

/// One launch: the kernel (by spec key, the key of the artifact's kernel list), its pointer
/// bindings in parameter order and its scalars.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LaunchRecord {
    pub kernel: String,
    pub buffers: Vec<ParamBinding>,
    pub scalars: BTreeMap<String, Scalar>,
}

impl LaunchRecord {
    /// The step buffer that `param` binds to.
    pub fn buffer_of(&self, param: &str) -> Option<&str> {
        self.buffers
            .iter()
            .find(|b| b.param == param)
            .map(|b| b.buffer.as_str())
    }
}

/// Quest: which launch refreshes the page bounds, and the `new_tokens` scalar that makes it
/// rebuild every page. As recorded, that launch refreshes only the pages of the new tokens,
/// which is right when the runtime knows the bounds matched the cache before the step;
/// otherwise it substitutes this value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundsRefresh {
    pub launch: usize,
    pub rebuild_new_tokens: u32,
}

/// The launches of one GPU step, in order, with the buffers they name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepLaunches {
    pub buffers: BTreeMap<String, StepBuffer>,
    pub launches: Vec<LaunchRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bounds_refresh: Option<BoundsRefresh>,
}

/// The spec of one launch's kernel.
#[derive(Clone, Debug, PartialEq)]
pub enum LaunchKernel {
    /// The one kernel of a single-launch family.
    Single(KernelSpec),
    /// A launch of an attention or KV-append program.
    Program(ProgramKernel),
}

impl LaunchKernel {
    /// Its spec key.
    pub fn key(&self) -> String {
        match self {
            LaunchKernel::Single(spec) => spec.key(),
            LaunchKernel::Program(kernel) => kernel.key(),
        }
    }

    /// Runs its generator.
    pub fn generate(&self) -> Result<GpuKernel, SpecError> {
        match self {
            LaunchKernel::Single(spec) => spec.generate(),
            LaunchKernel::Program(kernel) => kernel.generate(),
        }
    }
}

/// A step's launches with the spec of each (`kernels[i]` is the kernel of `launches[i]`).
#[derive(Clone, Debug, PartialEq)]
pub struct DerivedStep {
    pub launches: StepLaunches,
    pub kernels: Vec<LaunchKernel>,
}

/// The launches of a GPU step of `family` under `bindings`, on a device of `sm_count` SMs,
/// or why it has none.
pub fn step_launches(
    family: &Family,
    bindings: &Bindings,
    sm_count: usize,
) -> Result<DerivedStep, LowerError> {
    if matches!(family, Family::Attention { .. } | Family::KvAppend { .. }) {
        return Ok(from_program(program(family, bindings, sm_count)?));
    }
    if let Family::Moe {
        stage:
            MoeStage::ExpertFfn {
                experts,
                hidden,
                intermediate,
            },
        top_k,
        dtype,
        ..
    } = *family
    {
        let tokens = match family {
            Family::Moe { tokens, .. } => tokens.resolve(bindings)?,
            _ => unreachable!("matched above"),
        };
        let spec = |stage, kernel| MoeExpertFfnSpec {
            dtype,
            experts,
            hidden,
            intermediate,
            top_k,
            stage,
            kernel,
        };
        // Decode-sized calls read each chosen expert's weights once with the GEMV; more
        // tokens than a GEMV linear takes go to the tensor cores, where both stages' sizes fit
        // the grouped GEMM.
        let grouped = tokens > crate::lower::GEMV_MAX_ROWS as u64
            && [ExpertFfnStage::GateUp, ExpertFfnStage::Down]
                .into_iter()
                .all(|stage| spec(stage, ExpertFfnKernel::GroupedGemm).validate().is_ok());
        let kernel = if grouped {
            ExpertFfnKernel::GroupedGemm
        } else {
            ExpertFfnKernel::Gemv
        };
        let spec = |stage| spec(stage, kernel);
        return expert_ffn_launches(
            family,
            bindings,
            spec(ExpertFfnStage::GateUp),
            spec(ExpertFfnStage::Down),
        );
    }
    let spec = KernelSpec::for_family(family, bindings)?;
    let (inputs, outputs) = spec.operand_params();
    let mut buffers = BTreeMap::new();
    let mut bound = Vec::with_capacity(inputs.len() + outputs.len());
    for (index, param) in inputs.iter().enumerate() {
        buffers.insert(param.to_string(), StepBuffer::Operand { index });
        bound.push(binding(param, param));
    }
    for (index, param) in outputs.iter().enumerate() {
        buffers.insert(param.to_string(), StepBuffer::Result { index });
        bound.push(binding(param, param));
    }
    let scalars = spec
        .scalars(family, bindings)?
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect();
    Ok(DerivedStep {
        launches: StepLaunches {
            buffers,
            launches: vec![LaunchRecord {
                kernel: spec.key(),
                buffers: bound,
                scalars,
            }],
            bounds_refresh: None,
        },
        kernels: vec![LaunchKernel::Single(spec)],
    })
}

/// The expert FFN's two launches: gate and up (with SwiGLU) into the `activated` workspace,
/// then down into the result, each expert's weights bound to its operands.
fn expert_ffn_launches(
    family: &Family,
    bindings: &Bindings,
    gate_up: MoeExpertFfnSpec,
    down: MoeExpertFfnSpec,
) -> Result<DerivedStep, LowerError> {
    let scalars: BTreeMap<String, Scalar> = KernelSpec::MoeExpertFfn(gate_up)
        .scalars(family, bindings)?
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect();
    let slots = match scalars.get("slots") {
        Some(Scalar::U32(slots)) => *slots as usize,
        _ => 0,
    };
    let mut buffers = BTreeMap::from([
        ("x".to_string(), StepBuffer::Operand { index: 0 }),
        ("order".to_string(), StepBuffer::Operand { index: 1 }),
        ("offsets".to_string(), StepBuffer::Operand { index: 2 }),
        (
            "activated".to_string(),
            StepBuffer::Workspace {
                bytes: expert_ffn::workspace_bytes(&gate_up, slots),
            },
        ),
        ("y".to_string(), StepBuffer::Result { index: 0 }),
    ]);
    for e in 0..gate_up.experts {
        for (offset, weight) in ["gate", "up", "down"].into_iter().enumerate() {
            buffers.insert(
                expert_ffn::expert_param(weight, e),
                StepBuffer::Operand {
                    index: 3 + 3 * e + offset,
                },
            );
        }
    }
    let mut launches = Vec::with_capacity(2);
    let mut kernels = Vec::with_capacity(2);
    for spec in [gate_up, down] {
        let kernel = KernelSpec::MoeExpertFfn(spec);
        let bound = expert_ffn_pointer_params(&spec)
            .iter()
            .map(|param| binding(param, param))
            .collect();
        launches.push(LaunchRecord {
            kernel: kernel.key(),
            buffers: bound,
            scalars: scalars.clone(),
        });
        kernels.push(LaunchKernel::Single(kernel));
    }
    Ok(DerivedStep {
        launches: StepLaunches {
            buffers,
            launches,
            bounds_refresh: None,
        },
        kernels,
    })
}

/// The pointer parameters of an expert FFN stage, in order (`kiln_kernels::moe::expert_ffn`
/// declares them so): gate and up read `x`, `order`, `offsets`, every `gate_e`, every `up_e`
/// and write `activated`; down reads `activated`, `offsets`, every `down_e` and writes `y`.
fn expert_ffn_pointer_params(spec: &MoeExpertFfnSpec) -> Vec<String> {
    let (before, after): (&[&str], &[&str]) = match spec.stage {
        ExpertFfnStage::GateUp => (&["x", "order", "offsets"], &["activated"]),
        ExpertFfnStage::Down => (&["activated", "offsets"], &["y"]),
    };
    let per_expert = expert_ffn::expert_params(spec.stage)
        .iter()
        .flat_map(|group| (0..spec.experts).map(|e| expert_ffn::expert_param(group, e)));
    before
        .iter()
        .map(|name| name.to_string())
        .chain(per_expert)
        .chain(after.iter().map(|name| name.to_string()))
        .collect()
}

fn binding(param: &str, buffer: &str) -> ParamBinding {
    ParamBinding {
        param: param.to_string(),
        buffer: buffer.to_string(),
    }
}

fn from_program(program: AttentionProgram) -> DerivedStep {
    let buffers = program
        .buffers
        .iter()
        .map(|(name, buffer)| {
            let source = match *buffer {
                ProgramBuffer::Operand(index) => StepBuffer::Operand { index },
                ProgramBuffer::Output => StepBuffer::Result { index: 0 },
                ProgramBuffer::Workspace { bytes } => StepBuffer::Workspace { bytes },
                ProgramBuffer::IdentityPageTable { batch, max_pages } => {
                    StepBuffer::IdentityPageTable { batch, max_pages }
                }
                ProgramBuffer::Lengths { batch, value } => StepBuffer::Lengths { batch, value },
                ProgramBuffer::QuestBounds { elements, min } => {
                    StepBuffer::QuestBounds { elements, min }
                }
            };
            (name.to_string(), source)
        })
        .collect();
    let mut kernels = Vec::with_capacity(program.launches.len());
    let launches = program
        .launches
        .into_iter()
        .map(|launch| {
            let record = LaunchRecord {
                kernel: launch.kernel.key(),
                buffers: launch
                    .buffers
                    .iter()
                    .map(|(param, buffer)| binding(param, buffer))
                    .collect(),
                scalars: launch
                    .scalars
                    .iter()
                    .map(|(name, value)| (name.to_string(), *value))
                    .collect(),
            };
            kernels.push(LaunchKernel::Program(launch.kernel));
            record
        })
        .collect();
    DerivedStep {
        launches: StepLaunches {
            buffers,
            launches,
            bounds_refresh: program.bounds_refresh.map(|(launch, rebuild_new_tokens)| {
                BoundsRefresh {
                    launch,
                    rebuild_new_tokens,
                }
            }),
        },
        kernels,
    }
}

/// The recorded launches of every GPU step of one plan for one set of sizes: what an
/// artifact stores per phase, and what the runtime runs when a call has those sizes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LaunchTable {
    /// The sizes the launches are for.
    pub bindings: Bindings,
    /// By plan kernel index: the launches of each GPU step, `None` for host steps.
    pub steps: Vec<Option<StepLaunches>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::moe::expert_ffn::ExpertFfnKernel;
    use kiln_ir::dtype::DType;
    use kiln_ir::schedule::{AttentionKind, LinearEpilogue, SymExpr};
    use kiln_ir::shape::Dim;

    fn sym(name: &str) -> SymExpr {
        SymExpr::product(&[Dim::Sym(name.into())])
    }

    #[test]
    fn a_linear_step_binds_its_operands_and_result_by_parameter() {
        let family = Family::Linear {
            rows: sym("seq"),
            n: 512,
            k: 256,
            dtype: DType::BF16,
            epilogue: LinearEpilogue::Residual,
        };
        for (seq, gemv) in [(1, true), (40, false)] {
            let derived = step_launches(&family, &Bindings::from_pairs(&[("seq", seq)]), 132)
                .expect("a linear step lowers");
            assert_eq!(derived.launches.launches.len(), 1);
            let launch = &derived.launches.launches[0];
            assert_eq!(launch.kernel, derived.kernels[0].key());
            assert_eq!(launch.kernel.starts_with("Gemv"), gemv, "{}", launch.kernel);
            let params: Vec<&str> = launch.buffers.iter().map(|b| b.param.as_str()).collect();
            assert_eq!(params, ["x", "weight", "residual", "out"]);
            assert_eq!(
                derived.launches.buffers["residual"],
                StepBuffer::Operand { index: 2 }
            );
            assert_eq!(
                derived.launches.buffers["out"],
                StepBuffer::Result { index: 0 }
            );
            assert_eq!(launch.scalars["n"], Scalar::U32(512));
            assert_eq!(launch.scalars.contains_key("m"), !gemv);
        }
    }

    #[test]
    fn decode_attention_is_its_program_with_the_splits_of_the_device() {
        let family = Family::Attention {
            kind: AttentionKind::Decode,
            batch: sym("batch"),
            queries: SymExpr::constant(1),
            keys: sym("ctx"),
            q_heads: 8,
            kv_heads: 2,
            head_dim: 64,
            scale: 0.125,
            dtype: DType::F16,
        };
        let bindings = Bindings::from_pairs(&[("batch", 1), ("ctx", 4096)]);
        let derived = step_launches(&family, &bindings, 132).expect("decode lowers");
        let program = program(&family, &bindings, 132).expect("decode has a program");
        assert_eq!(derived.launches.launches.len(), program.launches.len());
        assert_eq!(derived.kernels.len(), program.launches.len());
        for (record, launch) in derived.launches.launches.iter().zip(&program.launches) {
            assert_eq!(record.kernel, launch.kernel.key());
            assert_eq!(record.buffers.len(), launch.buffers.len());
        }
        assert_eq!(
            derived.launches.buffers["q"],
            StepBuffer::Operand { index: 0 }
        );
        // Fewer SMs, fewer splits: the record says what the device asked for.
        let small = step_launches(&family, &bindings, 8).expect("decode lowers");
        assert_ne!(small.launches, derived.launches);
    }

    #[test]
    fn a_record_survives_json_exactly() {
        let family = Family::RmsNorm {
            rows: sym("seq"),
            hidden: 256,
            residual: true,
            eps: 1e-6,
            dtype: DType::F16,
        };
        let derived =
            step_launches(&family, &Bindings::from_pairs(&[("seq", 3)]), 132).expect("lowers");
        let json = serde_json::to_string(&derived.launches).expect("serializes");
        let back: StepLaunches = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, derived.launches);
        assert_eq!(back.launches[0].scalars["eps"], Scalar::F32(1e-6));
    }

    #[test]
    fn the_expert_ffn_runs_on_the_gemv_for_few_tokens_and_the_grouped_gemm_above() {
        let family = |hidden, intermediate| Family::Moe {
            stage: MoeStage::ExpertFfn {
                experts: 8,
                hidden,
                intermediate,
            },
            tokens: sym("seq"),
            top_k: 2,
            dtype: DType::BF16,
        };
        let kernels = |family: &Family, seq| {
            let derived = step_launches(family, &Bindings::from_pairs(&[("seq", seq)]), 132)
                .expect("the expert FFN lowers");
            assert_eq!(derived.launches.launches.len(), 2);
            derived
                .kernels
                .iter()
                .map(|k| match k {
                    LaunchKernel::Single(KernelSpec::MoeExpertFfn(spec)) => spec.kernel,
                    other => panic!("not an expert FFN stage: {other:?}"),
                })
                .collect::<Vec<_>>()
        };
        let tensor_core = family(4096, 14336);
        for (seq, kernel) in [
            (1, ExpertFfnKernel::Gemv),
            (8, ExpertFfnKernel::Gemv),
            (9, ExpertFfnKernel::GroupedGemm),
            (4096, ExpertFfnKernel::GroupedGemm),
        ] {
            assert_eq!(kernels(&tensor_core, seq), [kernel, kernel], "seq {seq}");
        }
        // Sizes the grouped GEMM cannot tile stay on the GEMV at any token count.
        let odd = family(100, 37);
        assert_eq!(kernels(&odd, 512), [ExpertFfnKernel::Gemv; 2]);
    }

    #[test]
    fn a_host_only_step_has_no_launches() {
        let family = Family::HostOnly {
            op: "embedding".into(),
        };
        let error = step_launches(&family, &Bindings::new(), 132).expect_err("no generator");
        assert!(error.to_string().contains("embedding"), "{error}");
    }
}
