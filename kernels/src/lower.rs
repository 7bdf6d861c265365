//! Lowering: from a scheduled kernel's [`Family`] (an IR-level description) to the generator
//! spec that builds it, and from the kernel's operands to the generated kernel's parameters.
//!
//! Owns [`KernelSpec`] (which generator, with which spec), [`KernelSpec::for_family`] (the
//! choice: GEMV for at most [`GEMV_MAX_ROWS`] rows when it takes the K, GEMM otherwise;
//! RMSNorm; RoPE; elementwise
//! maps, with single-element operands broadcast to every element and `[.., 1]` operands to
//! every element of their row; the embedding gather and slices, both a
//! [`RowCopySpec`]), the parameter names a plan kernel's inputs and outputs bind to
//! ([`KernelSpec::operand_params`]) and its scalar arguments ([`KernelSpec::scalars`]).
//! Both `kiln compile` and the runtime's plan executor lower through here, so the PTX a plan
//! lists is the PTX that runs; why a family does not lower is a [`LowerError`]. This file
//! must not touch a device.
//!
//! ```
//! use kiln_ir::dtype::DType;
//! use kiln_ir::schedule::{Family, LinearEpilogue, SymExpr};
//! use kiln_ir::shape::Bindings;
//! use kiln_kernels::lower::KernelSpec;
//! let family = Family::Linear {
//!     rows: SymExpr::constant(1),
//!     n: 256,
//!     k: 512,
//!     dtype: DType::F16,
//!     epilogue: LinearEpilogue::Residual,
//! };
//! let spec = KernelSpec::for_family(&family, &Bindings::new()).unwrap();
//! assert_eq!(spec.operand_params(), (vec!["x", "weight", "residual"], vec!["out"]));
//! let kernel = spec.generate().unwrap();
//! assert!(kernel.ptx.contains(&kernel.entry));
//! ```

use crate::attention::program::ProgramError;
use crate::elementwise::{self, ElementwiseSpec};
use crate::gemm::{self, GemmSpec};
use crate::gemv::{self, GemvSpec};
use crate::moe::combine::{self, MoeCombineSpec};
use crate::moe::dispatch::{self, MoeDispatchSpec};
use crate::moe::expert_ffn::{self, MoeExpertFfnSpec};
use crate::moe::router::{self, MoeRouterSpec};
use crate::rms_norm::{self, RmsNormSpec};
use crate::rope::{self, RopeSpec};
use crate::row_copy::{self, RowCopySpec, RowIndex};
use crate::{Epilogue, SpecError};
use kiln_codegen::expr::Expr;
use kiln_codegen::kernel::GpuKernel;
use kiln_ir::op::MapStep;
use kiln_ir::schedule::{slice_range, Family, LinearEpilogue, MoeStage};
use kiln_ir::shape::{Bindings, ShapeError};
use std::collections::BTreeMap;

/// Why a family could not be lowered to a kernel: a size that cannot be resolved or does not
/// fit a kernel scalar (naming it), a family without a single-kernel generator, or a
/// generator that rejected its spec.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LowerError {
    /// A symbolic size without a value.
    #[error(transparent)]
    Size(#[from] ShapeError),
    /// A size too large for a `u32` kernel scalar.
    #[error("{name} = {value} does not fit a u32 kernel scalar")]
    Scalar { name: &'static str, value: u64 },
    #[error(
        "elementwise maps with broadcast operands (other than single elements or one value per row) have no GPU generator"
    )]
    BroadcastMap,
    /// A slice whose bounds fall outside its axis once the axis length is known.
    #[error("slice {start}..{end:?} is outside an axis of {axis_len}")]
    SliceBounds {
        start: i64,
        end: Option<i64>,
        axis_len: u64,
    },
    /// An attention, KV-append or MoE expert FFN family, which runs as several launches
    /// ([`crate::step_launches`]).
    #[error("{family} runs as a program of several launches (`step_launches`), not one kernel")]
    Program { family: String },
    #[error("no GPU generator for `{op}`")]
    NoGenerator { op: String },
    /// Scalars asked of a spec for a family it does not lower.
    #[error("spec {spec} does not lower family {family}")]
    Mismatch { spec: String, family: String },
    /// The generator rejected the spec.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The family's attention program could not be built.
    #[error(transparent)]
    AttentionProgram(#[from] ProgramError),
}

/// Linear kernels with at most this many rows use the GEMV generator (the rows are a spec
/// constant there); more rows use GEMM.
pub const GEMV_MAX_ROWS: usize = 8;

/// A generator and its spec.
#[derive(Clone, Debug, PartialEq)]
pub enum KernelSpec {
    Gemv(GemvSpec),
    Gemm(GemmSpec),
    RmsNorm(RmsNormSpec),
    Rope(RopeSpec),
    Elementwise(ElementwiseSpec),
    RowCopy(RowCopySpec),
    MoeRouter(MoeRouterSpec),
    MoeDispatch(MoeDispatchSpec),
    /// One stage of the expert FFN (a step of two launches: [`crate::step_launches`]).
    MoeExpertFfn(MoeExpertFfnSpec),
    MoeCombine(MoeCombineSpec),
}

/// A scalar kernel argument (in JSON: `{"u32": 7}` or `{"f32": 1e-6}`).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scalar {
    U32(u32),
    F32(f32),
}

fn epilogue_of(epilogue: LinearEpilogue) -> Epilogue {
    match epilogue {
        LinearEpilogue::None => Epilogue::None,
        LinearEpilogue::Bias => Epilogue::Bias,
        LinearEpilogue::Residual => Epilogue::Residual,
        LinearEpilogue::SwiGlu => Epilogue::SwiGlu,
    }
}

/// The expression of a map program (its last step is the result).
pub fn map_expr(steps: &[MapStep]) -> Expr {
    let mut values: Vec<Expr> = Vec::with_capacity(steps.len());
    for step in steps {
        let value = match step {
            MapStep::Operand { index } => Expr::input(*index),
            MapStep::Constant { value } => Expr::constant(*value as f64),
            MapStep::Add { a, b } => values[*a].clone() + values[*b].clone(),
            MapStep::Mul { a, b } => values[*a].clone() * values[*b].clone(),
            MapStep::Silu { x } => values[*x].clone().silu(),
            MapStep::Sigmoid { x } => values[*x].clone().sigmoid(),
        };
        values.push(value);
    }
    values.pop().unwrap_or_else(|| Expr::constant(0.0))
}

fn u32_of(name: &'static str, value: u64) -> Result<u32, LowerError> {
    u32::try_from(value).map_err(|_| LowerError::Scalar { name, value })
}

impl KernelSpec {
    /// The spec that computes `family` under `bindings` (which resolve its symbolic row
    /// counts), or why no generator can.
    pub fn for_family(family: &Family, bindings: &Bindings) -> Result<KernelSpec, LowerError> {
        Ok(match family {
            Family::Linear {
                rows,
                k,
                dtype,
                epilogue,
                ..
            } => {
                let m = rows.resolve(bindings)? as usize;
                let epilogue = epilogue_of(*epilogue);
                let gemv = GemvSpec::new(*dtype, m.max(1), *k, epilogue);
                // GEMV takes K in whole chunks of its warp's loads; a narrower K goes to GEMM,
                // which takes any row count.
                if m <= GEMV_MAX_ROWS && gemv.validate().is_ok() {
                    KernelSpec::Gemv(gemv)
                } else {
                    KernelSpec::Gemm(GemmSpec::for_rows(*dtype, m, *k, epilogue))
                }
            }
            Family::RmsNorm {
                hidden,
                residual,
                dtype,
                ..
            } => KernelSpec::RmsNorm(RmsNormSpec {
                dtype: *dtype,
                hidden: *hidden,
                residual: *residual,
            }),
            Family::Rope {
                heads,
                head_dim,
                theta,
                dtype,
                ..
            } => KernelSpec::Rope(RopeSpec {
                dtype: *dtype,
                heads: *heads,
                head_dim: *head_dim,
                theta: *theta,
            }),
            Family::Map {
                inputs,
                steps,
                broadcast: false,
                scalar_operands,
                row_operands,
                row_width,
                dtype,
                ..
            } => KernelSpec::Elementwise(ElementwiseSpec {
                dtype: *dtype,
                inputs: *inputs,
                expr: map_expr(steps),
                scalar_inputs: scalar_operands.clone(),
                row_inputs: row_operands.clone(),
                row_width: *row_width,
            }),
            Family::Map { .. } => return Err(LowerError::BroadcastMap),
            Family::Attention { .. } | Family::KvAppend { .. } => {
                return Err(LowerError::Program {
                    family: family.describe(),
                })
            }
            Family::Gather { hidden, dtype, .. } => KernelSpec::RowCopy(RowCopySpec {
                dtype: *dtype,
                row_elements: *hidden,
                index: RowIndex::Gather,
            }),
            Family::Slice { inner, dtype, .. } => KernelSpec::RowCopy(RowCopySpec {
                dtype: *dtype,
                row_elements: *inner,
                index: RowIndex::Slice,
            }),
            Family::Moe {
                stage,
                top_k,
                dtype,
                ..
            } => match *stage {
                MoeStage::Router {
                    experts,
                    normalize,
                    hidden,
                } => KernelSpec::MoeRouter(MoeRouterSpec {
                    dtype: *dtype,
                    experts,
                    top_k: *top_k,
                    normalize,
                    hidden,
                }),
                MoeStage::Dispatch { experts } => {
                    KernelSpec::MoeDispatch(MoeDispatchSpec { experts })
                }
                MoeStage::Combine { hidden } => KernelSpec::MoeCombine(MoeCombineSpec {
                    dtype: *dtype,
                    hidden,
                    top_k: *top_k,
                }),
                MoeStage::ExpertFfn { .. } => {
                    return Err(LowerError::Program {
                        family: family.describe(),
                    })
                }
            },
            Family::HostOnly { op } => return Err(LowerError::NoGenerator { op: op.clone() }),
            // Atom's W4A4 linear has CPU kernels only so far (`crate::cpu_step`).
            Family::AtomLinear { .. } => {
                return Err(LowerError::NoGenerator {
                    op: "atom_linear".into(),
                })
            }
        })
    }

    /// A key that identifies the spec (equal keys generate identical kernels).
    pub fn key(&self) -> String {
        format!("{self:?}")
    }

    /// Runs the generator.
    pub fn generate(&self) -> Result<GpuKernel, SpecError> {
        match self {
            KernelSpec::Gemv(spec) => gemv::generate(spec),
            KernelSpec::Gemm(spec) => gemm::generate(spec),
            KernelSpec::RmsNorm(spec) => rms_norm::generate(spec),
            KernelSpec::Rope(spec) => rope::generate(spec),
            KernelSpec::Elementwise(spec) => elementwise::generate(spec),
            KernelSpec::RowCopy(spec) => row_copy::generate(spec),
            KernelSpec::MoeRouter(spec) => router::generate(spec),
            KernelSpec::MoeDispatch(spec) => dispatch::generate(spec),
            KernelSpec::MoeExpertFfn(spec) => expert_ffn::generate(spec),
            KernelSpec::MoeCombine(spec) => combine::generate(spec),
        }
    }

    /// The pointer parameters that a plan kernel's inputs and outputs bind to, in the order
    /// of the graph node's operands and results.
    ///
    /// Linear: `(x, weight[, bias | residual]) → out`. RMSNorm: `(x, weight) → out`, or with
    /// the residual fused (`add_rms_norm`): `(x, residual, weight) → (residual_out, out)`.
    /// RoPE: `(x, positions) → out`. Maps: `(in0, in1, …) → out`. Gather (embedding):
    /// `(table, ids) → out`. Slice: `x → out`. MoE router: `logits → (weights, experts)`, or
    /// with its linear fused `(x, w) → (weights, experts)`;
    /// dispatch: `experts → (order, offsets)`; combine: `(y, order, weights) → out`. The
    /// expert FFN's stages bind per-expert weights by name (`gate_0`, …): see
    /// [`crate::step_launches`]; here they list only their fixed parameters.
    pub fn operand_params(&self) -> (Vec<&'static str>, Vec<&'static str>) {
        let linear = |epilogue: Epilogue| {
            let mut inputs = vec!["x", "weight"];
            inputs.extend(epilogue.extra_param());
            (inputs, vec!["out"])
        };
        match self {
            KernelSpec::Gemv(spec) => linear(spec.epilogue),
            KernelSpec::Gemm(spec) => linear(spec.epilogue),
            KernelSpec::RmsNorm(spec) if spec.residual => {
                (vec!["x", "residual", "weight"], vec!["residual_out", "out"])
            }
            KernelSpec::RmsNorm(_) => (vec!["x", "weight"], vec!["out"]),
            KernelSpec::Rope(_) => (vec!["x", "positions"], vec!["out"]),
            KernelSpec::Elementwise(spec) => {
                const INPUTS: [&str; 8] = ["in0", "in1", "in2", "in3", "in4", "in5", "in6", "in7"];
                (
                    INPUTS[..spec.inputs.min(INPUTS.len())].to_vec(),
                    vec!["out"],
                )
            }
            KernelSpec::RowCopy(RowCopySpec {
                index: RowIndex::Gather,
                ..
            }) => (vec!["table", "ids"], vec!["out"]),
            KernelSpec::RowCopy(RowCopySpec {
                index: RowIndex::Slice,
                ..
            }) => (vec!["x"], vec!["out"]),
            KernelSpec::MoeRouter(MoeRouterSpec { hidden: None, .. }) => {
                (vec!["logits"], vec!["weights", "experts"])
            }
            KernelSpec::MoeRouter(MoeRouterSpec {
                hidden: Some(_), ..
            }) => (vec!["x", "w"], vec!["weights", "experts"]),
            KernelSpec::MoeDispatch(_) => (vec!["experts"], vec!["order", "offsets"]),
            KernelSpec::MoeCombine(_) => (vec!["y", "order", "weights"], vec!["out"]),
            KernelSpec::MoeExpertFfn(_) => (vec!["x", "order", "offsets"], vec!["y"]),
        }
    }

    /// The scalar arguments of a launch of `family` under `bindings`.
    pub fn scalars(
        &self,
        family: &Family,
        bindings: &Bindings,
    ) -> Result<BTreeMap<&'static str, Scalar>, LowerError> {
        let mut scalars = BTreeMap::new();
        match (self, family) {
            (KernelSpec::Gemv(_), Family::Linear { n, .. }) => {
                scalars.insert("n", Scalar::U32(u32_of("n", *n as u64)?));
            }
            (KernelSpec::Gemm(_), Family::Linear { rows, n, .. }) => {
                scalars.insert("m", Scalar::U32(u32_of("m", rows.resolve(bindings)?)?));
                scalars.insert("n", Scalar::U32(u32_of("n", *n as u64)?));
            }
            (KernelSpec::RmsNorm(_), Family::RmsNorm { rows, eps, .. }) => {
                scalars.insert(
                    "rows",
                    Scalar::U32(u32_of("rows", rows.resolve(bindings)?)?),
                );
                scalars.insert("eps", Scalar::F32(*eps));
            }
            (KernelSpec::Rope(_), Family::Rope { tokens, .. }) => {
                let tokens = tokens.resolve(bindings)?;
                scalars.insert("tokens", Scalar::U32(u32_of("tokens", tokens)?));
            }
            (KernelSpec::Elementwise(_), Family::Map { elements, .. }) => {
                let n = elements.resolve(bindings)?;
                scalars.insert("n", Scalar::U32(u32_of("n", n)?));
            }
            (KernelSpec::RowCopy(_), Family::Gather { rows, vocab, .. }) => {
                let rows = rows.resolve(bindings)?;
                scalars.insert("rows", Scalar::U32(u32_of("rows", rows)?));
                scalars.insert("vocab", Scalar::U32(u32_of("vocab", *vocab as u64)?));
            }
            (
                KernelSpec::RowCopy(_),
                Family::Slice {
                    outer,
                    axis_len,
                    start,
                    end,
                    ..
                },
            ) => {
                let axis = axis_len.resolve(bindings)?;
                let (first, last) =
                    slice_range(*start, *end, axis).ok_or(LowerError::SliceBounds {
                        start: *start,
                        end: *end,
                        axis_len: axis,
                    })?;
                let taken = last - first;
                let outer = outer.resolve(bindings)?;
                // Source rows are indexed in u32 too.
                u32_of("outer * axis_len", outer.saturating_mul(axis))?;
                let rows = outer.saturating_mul(taken);
                scalars.insert("rows", Scalar::U32(u32_of("rows", rows)?));
                scalars.insert("taken", Scalar::U32(u32_of("taken", taken)?));
                scalars.insert("axis_len", Scalar::U32(u32_of("axis_len", axis)?));
                scalars.insert("start", Scalar::U32(u32_of("start", first)?));
            }
            (KernelSpec::MoeRouter(_) | KernelSpec::MoeCombine(_), Family::Moe { tokens, .. }) => {
                let tokens = tokens.resolve(bindings)?;
                scalars.insert("tokens", Scalar::U32(u32_of("tokens", tokens)?));
            }
            (
                KernelSpec::MoeDispatch(_) | KernelSpec::MoeExpertFfn(_),
                Family::Moe { tokens, top_k, .. },
            ) => {
                let slots = tokens.resolve(bindings)?.saturating_mul(*top_k as u64);
                scalars.insert("slots", Scalar::U32(u32_of("slots", slots)?));
            }
            (spec, family) => {
                return Err(LowerError::Mismatch {
                    spec: spec.key(),
                    family: family.describe(),
                })
            }
        }
        Ok(scalars)
    }
}

/// What this crate's generators take, for placement: the families and dtypes a plan may put
/// on the GPU (the compiler schedules with this). It is the schedule's default capability
/// set, stated once in `kiln_ir::schedule::placement`; the tests here lower one example of
/// every kind it lists in every dtype, so the list cannot claim a generator this crate lacks.
pub fn gpu_capabilities() -> kiln_ir::schedule::GpuCapabilities {
    kiln_ir::schedule::GpuCapabilities::default()
}

/// Generates kernels for families, each distinct spec once.
#[derive(Debug, Default)]
pub struct Lowering {
    generated: BTreeMap<String, Result<GpuKernel, SpecError>>,
}

impl Lowering {
    /// The spec and kernel of `family` under `bindings`, or why it has none.
    pub fn lower(
        &mut self,
        family: &Family,
        bindings: &Bindings,
    ) -> Result<(KernelSpec, GpuKernel), LowerError> {
        let spec = KernelSpec::for_family(family, bindings)?;
        let kernel = self
            .generated
            .entry(spec.key())
            .or_insert_with(|| spec.generate())
            .clone()?;
        Ok((spec, kernel))
    }

    /// Every kernel that computes `family` under `bindings`, with its spec key (the key the
    /// runtime looks a prebuilt kernel up by): the kernel of each launch of the family's
    /// step ([`crate::step_launches`]: one for a single-launch family; an attention or
    /// KV-append program sized for a device of `sm_count` SMs; the expert FFN's two stages),
    /// or why it has none.
    pub fn lower_all(
        &mut self,
        family: &Family,
        bindings: &Bindings,
        sm_count: usize,
    ) -> Result<Vec<(String, GpuKernel)>, LowerError> {
        let derived = crate::step_launches::step_launches(family, bindings, sm_count)?;
        derived
            .kernels
            .iter()
            .map(|kernel| {
                let key = kernel.key();
                let generated = self
                    .generated
                    .entry(key.clone())
                    .or_insert_with(|| kernel.generate())
                    .clone()?;
                Ok((key, generated))
            })
            .collect()
    }

    /// The row counts at which [`KernelSpec::for_family`] picks a different linear spec: each
    /// GEMV row count, the first GEMM row count and the first large-tile GEMM row count.
    /// Lowering a plan at each of these covers every row count a run can have.
    pub fn linear_row_classes() -> Vec<usize> {
        let mut rows: Vec<usize> = (1..=GEMV_MAX_ROWS).collect();
        rows.push(GEMV_MAX_ROWS + 1);
        rows.push(gemm::GemmTile::LARGE_ROWS);
        rows
    }

    /// Distinct specs generated so far (successful or not).
    pub fn len(&self) -> usize {
        self.generated.len()
    }

    /// Whether nothing was generated yet.
    pub fn is_empty(&self) -> bool {
        self.generated.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::dtype::DType;
    use kiln_ir::schedule::SymExpr;
    use kiln_ir::shape::Dim;

    fn seq() -> SymExpr {
        SymExpr::product(&[Dim::sym("seq")])
    }

    fn linear(rows: SymExpr, epilogue: LinearEpilogue) -> Family {
        Family::Linear {
            rows,
            n: 64,
            k: 256,
            dtype: DType::BF16,
            epilogue,
        }
    }

    #[test]
    fn few_rows_lower_to_gemv_and_many_to_gemm() {
        let bindings = Bindings::from_pairs(&[("seq", 100)]);
        let few = KernelSpec::for_family(
            &linear(SymExpr::constant(3), LinearEpilogue::None),
            &bindings,
        );
        assert!(matches!(few, Ok(KernelSpec::Gemv(s)) if s.m == 3));
        let many = linear(seq(), LinearEpilogue::Bias);
        let spec = KernelSpec::for_family(&many, &bindings).unwrap();
        assert!(matches!(spec, KernelSpec::Gemm(_)));
        let scalars = spec.scalars(&many, &bindings).unwrap();
        assert_eq!(scalars["m"], Scalar::U32(100));
        assert_eq!(spec.operand_params().0, vec!["x", "weight", "bias"]);
    }

    #[test]
    fn few_rows_of_a_k_gemv_cannot_take_go_to_gemm() {
        let family = Family::Linear {
            rows: SymExpr::constant(1),
            n: 64,
            k: 128,
            dtype: DType::BF16,
            epilogue: LinearEpilogue::None,
        };
        let spec = KernelSpec::for_family(&family, &Bindings::new()).unwrap();
        assert!(matches!(spec, KernelSpec::Gemm(_)), "{spec:?}");
        spec.generate().unwrap();
    }

    #[test]
    fn every_operand_param_exists_in_the_generated_kernel() {
        let bindings = Bindings::from_pairs(&[("seq", 4)]);
        let families = [
            linear(seq(), LinearEpilogue::SwiGlu),
            linear(SymExpr::constant(64), LinearEpilogue::Residual),
            Family::RmsNorm {
                rows: seq(),
                hidden: 256,
                residual: true,
                eps: 1e-5,
                dtype: DType::F16,
            },
            Family::Rope {
                tokens: seq(),
                heads: 4,
                head_dim: 64,
                theta: 10000.0,
                dtype: DType::F16,
            },
            Family::Map {
                elements: seq().times(256),
                inputs: 2,
                steps: vec![
                    MapStep::Operand { index: 0 },
                    MapStep::Operand { index: 1 },
                    MapStep::Add { a: 0, b: 1 },
                ],
                broadcast: false,
                scalar_operands: vec![],
                row_operands: vec![],
                row_width: 0,
                dtype: DType::F16,
            },
            gated_map(DType::F16, 256),
            gated_map(DType::BF16, 100),
            gather(DType::F16),
            last_token(DType::BF16),
            lengths_map(DType::I32),
        ];
        let mut lowering = Lowering::default();
        for family in &families {
            let (spec, kernel) = lowering.lower(family, &bindings).unwrap();
            let (inputs, outputs) = spec.operand_params();
            for name in inputs.iter().chain(&outputs) {
                assert!(
                    kernel.param(name).is_some(),
                    "{}: no param {name}",
                    kernel.entry
                );
            }
            for name in spec.scalars(family, &bindings).unwrap().keys() {
                assert!(
                    kernel.param(name).is_some(),
                    "{}: no scalar {name}",
                    kernel.entry
                );
            }
            let pointers = kernel
                .params
                .iter()
                .filter(|p| matches!(p.kind, kiln_codegen::kernel::ParamKind::Pointer(_)))
                .count();
            assert_eq!(pointers, inputs.len() + outputs.len(), "{}", kernel.entry);
        }
        assert_eq!(lowering.len(), families.len());
        lowering.lower(&families[0], &bindings).unwrap();
        assert_eq!(lowering.len(), families.len(), "a spec is generated once");
    }

    #[test]
    fn every_capability_lowers() {
        use kiln_ir::schedule::{AttentionKind, FamilyKind};
        let bindings = Bindings::from_pairs(&[("seq", 4)]);
        let capabilities = gpu_capabilities();
        let mut lowering = Lowering::default();
        let examples = |dtype: DType| {
            [
                Family::Linear {
                    rows: seq(),
                    n: 64,
                    k: 256,
                    dtype,
                    epilogue: LinearEpilogue::None,
                },
                Family::RmsNorm {
                    rows: seq(),
                    hidden: 256,
                    residual: false,
                    eps: 1e-5,
                    dtype,
                },
                Family::Rope {
                    tokens: seq(),
                    heads: 4,
                    head_dim: 64,
                    theta: 1e4,
                    dtype,
                },
                Family::Map {
                    elements: seq().times(256),
                    inputs: 1,
                    steps: vec![MapStep::Operand { index: 0 }, MapStep::Silu { x: 0 }],
                    broadcast: false,
                    scalar_operands: vec![],
                    row_operands: vec![],
                    row_width: 0,
                    dtype,
                },
                // Qwen2-MoE's per-token shared-expert gate: a row operand.
                gated_map(dtype, 256),
                Family::Attention {
                    kind: AttentionKind::Decode,
                    batch: SymExpr::constant(1),
                    queries: SymExpr::constant(1),
                    keys: SymExpr::constant(256),
                    q_heads: 8,
                    kv_heads: 2,
                    head_dim: 128,
                    scale: 0.1,
                    dtype,
                },
                Family::KvAppend {
                    batch: SymExpr::constant(1),
                    new_tokens: SymExpr::constant(1),
                    capacity: SymExpr::constant(256),
                    kv_heads: 2,
                    head_dim: 128,
                    dtype,
                },
                gather(dtype),
                last_token(dtype),
                moe(
                    MoeStage::Router {
                        experts: 8,
                        normalize: true,
                        hidden: None,
                    },
                    dtype,
                ),
                moe(
                    MoeStage::Router {
                        experts: 8,
                        normalize: true,
                        hidden: Some(256),
                    },
                    dtype,
                ),
                moe(
                    MoeStage::ExpertFfn {
                        experts: 8,
                        hidden: 256,
                        intermediate: 96,
                    },
                    dtype,
                ),
                moe(MoeStage::Combine { hidden: 256 }, dtype),
            ]
        };
        let kinds: std::collections::BTreeSet<FamilyKind> =
            examples(DType::BF16).iter().map(|f| f.kind()).collect();
        assert_eq!(kinds, capabilities.families, "one example per capability");
        for &dtype in &capabilities.dtypes {
            for family in &examples(dtype) {
                assert!(capabilities.accepts(family.kind(), dtype));
                let launches = lowering.lower_all(family, &bindings, 132).unwrap();
                assert!(!launches.is_empty(), "{}", family.describe());
            }
        }
        // The family-specific dtypes: i32 maps (with a scalar operand, as decode's lengths)
        // and the MoE dispatch, which sorts i32 expert ids.
        for (&kind, dtypes) in &capabilities.family_dtypes {
            for &dtype in dtypes {
                assert_eq!(dtype, DType::I32);
                let (spec, kernel) = match kind {
                    FamilyKind::Map => lowering.lower(&lengths_map(dtype), &bindings).unwrap(),
                    FamilyKind::Moe => lowering
                        .lower(&moe(MoeStage::Dispatch { experts: 8 }, dtype), &bindings)
                        .unwrap(),
                    other => panic!("no i32 example of {other:?}"),
                };
                match kind {
                    FamilyKind::Map => {
                        assert!(matches!(spec, KernelSpec::Elementwise(_)), "{spec:?}");
                        assert!(kernel.entry.contains("i32"), "{}", kernel.entry);
                    }
                    _ => assert!(matches!(spec, KernelSpec::MoeDispatch(_)), "{spec:?}"),
                }
            }
        }
    }

    fn moe(stage: MoeStage, dtype: DType) -> Family {
        Family::Moe {
            stage,
            tokens: seq(),
            top_k: 2,
            dtype,
        }
    }

    fn gather(dtype: DType) -> Family {
        Family::Gather {
            rows: seq(),
            vocab: 1000,
            hidden: 256,
            dtype,
        }
    }

    fn last_token(dtype: DType) -> Family {
        Family::Slice {
            outer: SymExpr::constant(2),
            axis_len: seq(),
            start: -1,
            end: None,
            inner: 256,
            dtype,
        }
    }

    /// `out + sigmoid(gate) · shared`, the gate one value per row of `width`.
    fn gated_map(dtype: DType, width: usize) -> Family {
        Family::Map {
            elements: seq().times(width as u64),
            inputs: 3,
            steps: vec![
                MapStep::Operand { index: 0 },
                MapStep::Operand { index: 1 },
                MapStep::Operand { index: 2 },
                MapStep::Sigmoid { x: 1 },
                MapStep::Mul { a: 3, b: 2 },
                MapStep::Add { a: 0, b: 4 },
            ],
            broadcast: false,
            scalar_operands: vec![],
            row_operands: vec![1],
            row_width: width,
            dtype,
        }
    }

    #[test]
    fn row_operands_lower_to_row_inputs_and_general_broadcast_does_not() {
        let bindings = Bindings::from_pairs(&[("seq", 3)]);
        let KernelSpec::Elementwise(spec) =
            KernelSpec::for_family(&gated_map(DType::BF16, 100), &bindings).unwrap()
        else {
            panic!("a map lowers to the elementwise generator")
        };
        assert_eq!((spec.row_inputs.clone(), spec.row_width), (vec![1], 100));
        assert!(spec.entry().contains("_3in_r1_w100_"), "{}", spec.entry());
        let Family::Map { steps, .. } = gated_map(DType::BF16, 100) else {
            unreachable!()
        };
        let general = Family::Map {
            elements: seq().times(100),
            inputs: 3,
            steps,
            broadcast: true,
            scalar_operands: vec![],
            row_operands: vec![],
            row_width: 0,
            dtype: DType::BF16,
        };
        assert_eq!(
            KernelSpec::for_family(&general, &bindings).unwrap_err(),
            LowerError::BroadcastMap
        );
    }

    fn lengths_map(dtype: DType) -> Family {
        Family::Map {
            elements: SymExpr::constant(3),
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
            dtype,
        }
    }

    #[test]
    fn row_copies_bind_their_operands_and_resolve_the_slice() {
        let bindings = Bindings::from_pairs(&[("seq", 7)]);
        let spec = KernelSpec::for_family(&gather(DType::BF16), &bindings).unwrap();
        assert_eq!(spec.operand_params(), (vec!["table", "ids"], vec!["out"]));
        let scalars = spec.scalars(&gather(DType::BF16), &bindings).unwrap();
        assert_eq!(scalars["rows"], Scalar::U32(7));
        assert_eq!(scalars["vocab"], Scalar::U32(1000));

        let slice = last_token(DType::F16);
        let spec = KernelSpec::for_family(&slice, &bindings).unwrap();
        assert_eq!(spec.operand_params(), (vec!["x"], vec!["out"]));
        let scalars = spec.scalars(&slice, &bindings).unwrap();
        assert_eq!(scalars["rows"], Scalar::U32(2));
        assert_eq!(scalars["taken"], Scalar::U32(1));
        assert_eq!(scalars["axis_len"], Scalar::U32(7));
        assert_eq!(scalars["start"], Scalar::U32(6));

        let middle_slice = |start: i64| Family::Slice {
            outer: SymExpr::constant(3),
            axis_len: SymExpr::constant(10),
            start,
            end: Some(-3),
            inner: 5,
            dtype: DType::F16,
        };
        let middle = middle_slice(2);
        let spec = KernelSpec::for_family(&middle, &bindings).unwrap();
        let scalars = spec.scalars(&middle, &bindings).unwrap();
        assert_eq!(scalars["rows"], Scalar::U32(15));
        assert_eq!(scalars["taken"], Scalar::U32(5));
        assert_eq!(scalars["start"], Scalar::U32(2));

        let outside = middle_slice(-11);
        let err = spec.scalars(&outside, &bindings).unwrap_err();
        assert!(
            matches!(err, LowerError::SliceBounds { axis_len: 10, .. }),
            "{err}"
        );
        // The gather's spec does not compute a slice.
        let gather_spec = KernelSpec::for_family(&gather(DType::F16), &bindings).unwrap();
        assert!(gather_spec
            .scalars(&lengths_map(DType::I32), &bindings)
            .is_err());
    }

    #[test]
    fn an_i32_map_with_a_float_only_step_is_refused_by_name() {
        let family = Family::Map {
            elements: SymExpr::constant(4),
            inputs: 1,
            steps: vec![MapStep::Operand { index: 0 }, MapStep::Silu { x: 0 }],
            broadcast: false,
            scalar_operands: vec![],
            row_operands: vec![],
            row_width: 0,
            dtype: DType::I32,
        };
        let err = Lowering::default()
            .lower(&family, &Bindings::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("silu is float-only"), "{err}");
    }

    #[test]
    fn host_only_families_have_no_generator() {
        let family = Family::HostOnly {
            op: "attention".into(),
        };
        let err = KernelSpec::for_family(&family, &Bindings::new()).unwrap_err();
        assert!(err.to_string().contains("attention"), "{err}");
    }
}
