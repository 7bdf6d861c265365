//! The grouped expert FFN of a mixture-of-experts layer over the dispatched slots, in two
//! kernels generated from one [`MoeExpertFfnSpec`] (its [`ExpertFfnStage`] picks which):
//!
//! - [`ExpertFfnStage::GateUp`]: `activated[p, i] = round(silu(g) · u)` with
//!   `g = round(gate_e[i] · x[t])`, `u = round(up_e[i] · x[t])`, `t = order[p] / top_k`.
//!   Parameters, in order: `x` `[tokens, H]`, `order` `[slots]` i32, `offsets` `[E + 1]`
//!   i32, `gate_0 … gate_{E−1}` `[I, H]`, `up_0 … up_{E−1}` `[I, H]` (all read),
//!   `activated` `[slots, I]` (written; the workspace of [`workspace_bytes`]); scalar
//!   `slots`.
//! - [`ExpertFfnStage::Down`]: `y[p, h] = round(down_e[h] · activated[p])`. Parameters:
//!   `activated`, `offsets`, `down_0 … down_{E−1}` `[H, I]` (read), `y` `[slots, H]`
//!   (written); scalar `slots`.
//!
//! Here `e` is the expert whose run `offsets[e] ≤ p < offsets[e + 1]` holds slot position
//! `p` (the layout `kiln_ir::movement::dispatch` produces), `round` rounds to the dtype, and
//! every product accumulates in f32. The semantics are `Op::MoeExpertFfn` in
//! `kiln_ir::interp` (its `swiglu_ffn`), split at the rounded activation.
//!
//! **Two kernels.** [`MoeExpertFfnSpec::kernel`] picks the generator of both stages:
//! [`ExpertFfnKernel::Gemv`] (the default, this file) is a warp-per-row grouped GEMV, right
//! for decode — each weight row is streamed once and reused across the few slots of an
//! expert. [`ExpertFfnKernel::GroupedGemm`] is the tensor-core GEMM of [`crate::gemm`] in
//! its grouped mode ([`MoeExpertFfnSpec::gemm_spec`]: `mma.sync` tiles of 64 slots of one
//! expert), for prefill and large batches, where the GEMV's per-slot dot products are far
//! too slow; it needs `H` and `I` to be multiples of 64. The plan lowering chooses (GEMV for
//! a few tokens — at most 8 — the grouped GEMM above). Both take the same parameters in the
//! same order with the same semantics, robustness rules included, and write the same
//! `activated` workspace; only the entry names (`moe_gate_up_…` / `moe_gate_up_mma_…`) and
//! launch geometry differ. The rest of this doc describes the GEMV.
//!
//! Launch geometry: blocks of [`WARPS_PER_BLOCK`] warps, one warp per output row (a weight
//! row: `I` rows for gate-up, `H` for down); `grid.x = ceil(rows / WARPS_PER_BLOCK)` and
//! `grid.y = E`, both fixed by the spec. Block `(x, e)` reads `offsets[e]` and
//! `offsets[e + 1]` (the end clamped to `slots`) and exits when expert `e` has no slot, so an
//! expert no token chose costs one block of two loads. Otherwise each warp loops over the
//! expert's slots (any number of them): its 32 lanes stride over the weight row and the
//! activation row together (16-byte `ld.global.nc.v4.u32` accesses of eight halves when the
//! row length is a multiple of eight, one half per access otherwise), a butterfly shuffle
//! sums the lanes, and lane 0 rounds and stores. The weight row is re-read for every slot
//! from L1/L2 (default caching), so each block streams its expert's rows from device memory
//! about once however many tokens chose it — the point of grouping. Warps of rows past the
//! end exit at once; no barrier is used, so they may.
//!
//! PTX cannot index the parameter list, so expert `e`'s weight pointers are chosen once per
//! thread by a chain of `setp.eq` / `selp` over the `E` per-expert parameters (one `setp`
//! per expert shared by gate and up). Taking a parameter's address and indexing past it
//! would rely on a parameter layout PTX does not promise. The chain, and the 4 KiB kernel
//! parameter space (gate-up has `2E + 4` pointers), bound `E` by [`MAX_EXPERTS`].
//!
//! Robustness: a slot position past `slots` is never read or written (the run end is
//! clamped; a negative offset reads as a huge unsigned value and empties the run); an
//! `order` entry outside `0..slots` (negative ones included) makes gate-up read the last
//! slot's token instead and write a row of NaN, so a bad dispatch shows rather than reading
//! out of bounds. Tokens are `slots / top_k`.
//!
//! This file generates PTX; it must not launch anything, allocate the workspace or choose
//! the dispatch (that is `super::dispatch`'s).

use crate::gemm::{self, GemmSpec, GemmTile, Grouping};
use crate::vector::{self, check_half, HALVES_PER_CHUNK};
use crate::{Epilogue, SpecError};
use kiln_codegen::kernel::{Access, Extent, GpuKernel, LaunchRule};
use kiln_codegen::ptx::{
    lower_expr, Axis, Cmp, KernelBuilder, Load, Reg, Special, Target, WarpReduce, F32, U32, U64,
};
use kiln_ir::dtype::DType;
use serde::{Deserialize, Serialize};

const FAMILY: &str = "moe_expert_ffn";

/// Warps (output rows) per block.
pub const WARPS_PER_BLOCK: usize = 8;

/// The most experts a kernel takes: each thread selects its expert's pointers through a
/// chain over all `E`, and gate-up's `2E + 4` pointers must fit the 4 KiB parameter space.
pub const MAX_EXPERTS: usize = 128;

/// The longest hidden or intermediate size: a row's byte length plus one warp stride
/// (512 bytes) must fit `u32` loop arithmetic, with room to spare.
pub const MAX_WIDTH: usize = 1 << 24;

/// Bytes of one element (f16 and bf16).
const ELEMENT_BYTES: usize = 2;

/// Which of the two kernels of the expert FFN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpertFfnStage {
    /// Gate and up products of each slot's token, SwiGLU, into `activated [slots, I]`.
    GateUp,
    /// The down product of each slot's activation, into `y [slots, H]`.
    Down,
}

impl ExpertFfnStage {
    /// The short name used in entry names: `gate_up` or `down`.
    pub fn name(self) -> &'static str {
        match self {
            ExpertFfnStage::GateUp => "gate_up",
            ExpertFfnStage::Down => "down",
        }
    }
}

/// Which generator builds a stage: the warp-per-row grouped GEMV of this file, or the
/// grouped tensor-core GEMM of [`crate::gemm`] (its [`Grouping`] mode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpertFfnKernel {
    /// One warp per output row looping over the expert's slots: for decode (a few tokens).
    #[default]
    Gemv,
    /// `mma.sync` tiles of 64 slots of one expert: for prefill and large batches.
    GroupedGemm,
}

impl ExpertFfnKernel {
    fn is_gemv(&self) -> bool {
        *self == ExpertFfnKernel::Gemv
    }
}

/// One stage of the grouped expert FFN.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MoeExpertFfnSpec {
    /// Storage dtype of `x`, the weights, `activated` and `y`: f16 or bf16.
    pub dtype: DType,
    /// `E`, the number of experts (`1..=MAX_EXPERTS`).
    pub experts: usize,
    /// `H`, the model width.
    pub hidden: usize,
    /// `I`, each expert's FFN width.
    pub intermediate: usize,
    /// `k`, the experts each token chose: slot `t·k + j` belongs to token `t`.
    pub top_k: usize,
    pub stage: ExpertFfnStage,
    /// The generator; left out of the serialized form and of `Debug` (the spec key) when
    /// [`ExpertFfnKernel::Gemv`], so GEMV specs keep their keys.
    #[serde(default, skip_serializing_if = "ExpertFfnKernel::is_gemv")]
    pub kernel: ExpertFfnKernel,
}

impl std::fmt::Debug for MoeExpertFfnSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("MoeExpertFfnSpec");
        d.field("dtype", &self.dtype)
            .field("experts", &self.experts)
            .field("hidden", &self.hidden)
            .field("intermediate", &self.intermediate)
            .field("top_k", &self.top_k)
            .field("stage", &self.stage);
        if !self.kernel.is_gemv() {
            d.field("kernel", &self.kernel);
        }
        d.finish()
    }
}

/// The per-expert parameter groups of `stage`, in parameter order: group `g` is the
/// parameters `{g}_0 … {g}_{E−1}` ([`expert_param`]). The plan lowering binds them by name.
pub fn expert_params(stage: ExpertFfnStage) -> &'static [&'static str] {
    match stage {
        ExpertFfnStage::GateUp => &["gate", "up"],
        ExpertFfnStage::Down => &["down"],
    }
}

/// The parameter name of expert `expert`'s weight of group `group`: `gate_3`.
pub fn expert_param(group: &str, expert: usize) -> String {
    format!("{group}_{expert}")
}

/// Bytes of the `activated` workspace (`[slots, I]` in the dtype) the two stages share.
pub fn workspace_bytes(spec: &MoeExpertFfnSpec, slots: usize) -> usize {
    slots * spec.intermediate * ELEMENT_BYTES
}

impl MoeExpertFfnSpec {
    /// Output rows of this stage, one warp each: `I` (gate-up) or `H` (down).
    pub fn rows(&self) -> usize {
        match self.stage {
            ExpertFfnStage::GateUp => self.intermediate,
            ExpertFfnStage::Down => self.hidden,
        }
    }

    /// The length of each dot product: `H` (gate-up) or `I` (down).
    pub fn dot_length(&self) -> usize {
        match self.stage {
            ExpertFfnStage::GateUp => self.hidden,
            ExpertFfnStage::Down => self.intermediate,
        }
    }

    /// Whether the dot products use 16-byte accesses (the row length is a multiple of 8).
    pub fn vectorized(&self) -> bool {
        self.dot_length().is_multiple_of(HALVES_PER_CHUNK)
    }

    /// Threads per block.
    pub fn threads(&self) -> u32 {
        match self.kernel {
            ExpertFfnKernel::Gemv => 32 * WARPS_PER_BLOCK as u32,
            ExpertFfnKernel::GroupedGemm => self.gemm_spec().tile.threads() as u32,
        }
    }

    /// The grouped GEMM spec of this stage ([`ExpertFfnKernel::GroupedGemm`]): gate and up
    /// gather `x` rows through `order` with the SwiGLU epilogue over the expert's `gate_e`
    /// and `up_e` (`K = H`, `N = I`); down reads `activated` rows in place (`K = I`,
    /// `N = H`). Both use [`GemmTile::small`] (64-row blocks waste less of each expert's
    /// run than 128-row ones).
    pub fn gemm_spec(&self) -> GemmSpec {
        let (epilogue, gather_rows) = match self.stage {
            ExpertFfnStage::GateUp => (Epilogue::SwiGlu, true),
            ExpertFfnStage::Down => (Epilogue::None, false),
        };
        GemmSpec {
            dtype: self.dtype,
            k: self.dot_length(),
            tile: GemmTile::small(epilogue),
            epilogue,
            grouping: Some(Grouping {
                experts: self.experts,
                top_k: self.top_k,
                gather_rows,
                n: self.rows(),
            }),
        }
    }

    /// The kernel entry name: `moe_gate_up_bf16_e8_h4096_i14336_k2` (GEMV), or
    /// `moe_gate_up_mma_bf16_e8_h4096_i14336_k2_64x64x64_w2x2_s4` (grouped GEMM, see
    /// [`GemmSpec::entry_name`]).
    pub fn entry(&self) -> String {
        if self.kernel == ExpertFfnKernel::GroupedGemm {
            return self.gemm_spec().entry_name();
        }
        format!(
            "moe_{}_{}_e{}_h{}_i{}_k{}",
            self.stage.name(),
            self.dtype,
            self.experts,
            self.hidden,
            self.intermediate,
            self.top_k
        )
    }

    /// Why the generator cannot build this spec, naming the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        let error = |message: String| Err(SpecError::new(FAMILY, message));
        check_half(FAMILY, self.dtype)?;
        if !(1..=MAX_EXPERTS).contains(&self.experts) {
            return error(format!(
                "experts = {} is outside 1..={MAX_EXPERTS}",
                self.experts
            ));
        }
        if !(1..=MAX_WIDTH).contains(&self.hidden) {
            return error(format!(
                "hidden = {} is outside 1..={MAX_WIDTH}",
                self.hidden
            ));
        }
        if !(1..=MAX_WIDTH).contains(&self.intermediate) {
            return error(format!(
                "intermediate = {} is outside 1..={MAX_WIDTH}",
                self.intermediate
            ));
        }
        if !(1..=self.experts).contains(&self.top_k) {
            return error(format!(
                "top_k = {} is outside 1..=experts ({})",
                self.top_k, self.experts
            ));
        }
        if self.kernel == ExpertFfnKernel::GroupedGemm {
            self.gemm_spec().validate().map_err(|e| {
                SpecError::new(
                    FAMILY,
                    format!("grouped GEMM (H and I must be multiples of 64): {e}"),
                )
            })?;
        }
        Ok(())
    }
}

/// Generates the stage's kernel for `sm_80` (it uses nothing newer and runs on Hopper).
pub fn generate(spec: &MoeExpertFfnSpec) -> Result<GpuKernel, SpecError> {
    generate_for(spec, Target::Sm80)
}

/// Generates the stage's kernel for `target`.
pub fn generate_for(spec: &MoeExpertFfnSpec, target: Target) -> Result<GpuKernel, SpecError> {
    spec.validate()?;
    if spec.kernel == ExpertFfnKernel::GroupedGemm {
        return gemm::generate_for(&spec.gemm_spec(), target);
    }
    let mut k = KernelBuilder::new(&spec.entry(), target);
    let params = Params::declare(spec, &mut k);
    emit(spec, &params, &mut k);
    let launch = LaunchRule {
        grid: [
            Extent::fixed(spec.rows().div_ceil(WARPS_PER_BLOCK) as u32),
            Extent::fixed(spec.experts as u32),
            Extent::fixed(1),
        ],
        block: [spec.threads(), 1, 1],
        shared_bytes: 0,
    };
    Ok(k.finish(launch))
}

/// The kernel's parameters.
struct Params {
    /// The rows the dot products read: `x` (gate-up) or `activated` (down).
    input: Reg<U64>,
    /// `order` (gate-up only).
    order: Option<Reg<U64>>,
    offsets: Reg<U64>,
    /// Per group of [`expert_params`], each expert's weight.
    weights: Vec<Vec<Reg<U64>>>,
    /// `activated` (gate-up) or `y` (down).
    out: Reg<U64>,
    slots: Reg<U32>,
}

impl Params {
    fn declare(spec: &MoeExpertFfnSpec, k: &mut KernelBuilder) -> Params {
        let (input, order) = match spec.stage {
            ExpertFfnStage::GateUp => {
                let x = k.param_pointer("x", Access::Read);
                (x, Some(k.param_pointer("order", Access::Read)))
            }
            ExpertFfnStage::Down => (k.param_pointer("activated", Access::Read), None),
        };
        let offsets = k.param_pointer("offsets", Access::Read);
        let weights = expert_params(spec.stage)
            .iter()
            .map(|group| {
                (0..spec.experts)
                    .map(|e| k.param_pointer(&expert_param(group, e), Access::Read))
                    .collect()
            })
            .collect();
        let out = match spec.stage {
            ExpertFfnStage::GateUp => k.param_pointer("activated", Access::Write),
            ExpertFfnStage::Down => k.param_pointer("y", Access::Write),
        };
        let slots = k.param_u32("slots");
        Params {
            input,
            order,
            offsets,
            weights,
            out,
            slots,
        }
    }
}

/// The kernel body shared by both stages.
fn emit(spec: &MoeExpertFfnSpec, params: &Params, k: &mut KernelBuilder) {
    let rows = spec.rows() as u32;
    let length = spec.dot_length();
    let out_row_bytes = (spec.rows() * ELEMENT_BYTES) as u32;
    let index_load = Load::GLOBAL.non_coherent();

    k.comment(&format!(
        "block (x, e): warp w computes output row {WARPS_PER_BLOCK}x + w for every slot of \
         expert e"
    ));
    let tid = k.tid_x();
    let lane = k.and(tid, 31u32);
    let warp = k.shr(tid, 5u32);
    let block = k.ctaid_x();
    let row = k.mul_add(block, WARPS_PER_BLOCK as u32, warp);
    let past_end = k.setp(Cmp::Ge, row, rows);
    k.guard(past_end, |k| k.ret());

    k.comment("expert e's slot positions offsets[e] .. min(offsets[e + 1], slots); none: exit");
    let expert = k.special(Special::Ctaid(Axis::Y));
    let offset_address = k.mad_wide(expert, 4u32, params.offsets);
    let begin = k.ld::<U32>(index_load, offset_address.at(0));
    let end = k.ld::<U32>(index_load, offset_address.at(4));
    let end = k.min(end, params.slots);
    let empty = k.setp(Cmp::Ge, begin, end);
    k.guard(empty, |k| k.ret());

    let weights = super::select_expert(k, &params.weights, expert);
    k.comment("this warp's weight row(s) of expert e");
    let row_bytes = (length * ELEMENT_BYTES) as u32;
    let weight_rows: Vec<Reg<U64>> = weights
        .iter()
        .map(|&w| k.mad_wide(row, row_bytes, w))
        .collect();
    let lane0 = k.setp(Cmp::Eq, lane, 0u32);
    let access_bytes = if spec.vectorized() {
        HALVES_PER_CHUNK
    } else {
        1
    } * ELEMENT_BYTES;
    let lane_offset = k.mul(lane, access_bytes as u32);
    let out_column = k.mad_wide(row, ELEMENT_BYTES as u32, params.out);

    k.comment("every slot position p of the expert's run");
    k.for_range(begin, end, 1u32, |k, p| {
        let out = k.mad_wide(p, out_row_bytes, out_column);
        match params.order {
            Some(order) => {
                k.comment("token t = order[p] / k; an order entry outside 0..slots writes NaN");
                let last_slot = k.sub(params.slots, 1u32);
                let order_address = k.mad_wide(p, 4u32, order);
                let slot = k.ld::<U32>(index_load, order_address);
                let valid = k.setp(Cmp::Lt, slot, params.slots);
                let slot = k.min(slot, last_slot);
                let token = k.div(slot, spec.top_k as u32);
                let x = k.mad_wide(token, row_bytes, params.input);
                let sums = warp_dots(k, spec.dtype, &weight_rows, x, lane_offset, length);
                k.guard(lane0, |k| {
                    let gate = vector::round_to_dtype(k, spec.dtype, sums[0]);
                    let up = vector::round_to_dtype(k, spec.dtype, sums[1]);
                    let activated = lower_expr(k, &Epilogue::SwiGlu.expr(), &[gate, up]);
                    let value = k.select::<F32>(valid, activated, f32::NAN);
                    vector::store_scalar(k, spec.dtype, out, value);
                });
            }
            None => {
                let activated = k.mad_wide(p, row_bytes, params.input);
                let sums = warp_dots(k, spec.dtype, &weight_rows, activated, lane_offset, length);
                k.guard(lane0, |k| vector::store_scalar(k, spec.dtype, out, sums[0]));
            }
        }
    });
}

/// The dot products of each row in `rows` with `x` (row and vector start addresses, `length`
/// halves each), summed over the warp: every lane gets every sum. Lane `l` reads elements
/// `8l + 256j .. 8l + 256j + 8` with 16-byte accesses when `length` is a multiple of 8, else
/// elements `l + 32j`; `x` is loaded once per step and used for every row. `lane_offset` is
/// this lane's first byte: `16l` or `2l`.
fn warp_dots(
    k: &mut KernelBuilder,
    dtype: DType,
    rows: &[Reg<U64>],
    x: Reg<U64>,
    lane_offset: Reg<U32>,
    length: usize,
) -> Vec<Reg<F32>> {
    let load = Load::GLOBAL.non_coherent();
    let vectorized = length.is_multiple_of(HALVES_PER_CHUNK);
    let access = if vectorized { HALVES_PER_CHUNK } else { 1 } * ELEMENT_BYTES;
    let acc: Vec<Reg<F32>> = rows.iter().map(|_| k.mov::<F32>(0.0)).collect();
    let end = (length * ELEMENT_BYTES) as u32;
    k.for_range(lane_offset, end, 32 * access as u32, |k, offset| {
        let offset = k.cvt::<U64>(offset);
        let x_at = k.add(x, offset);
        let row_at: Vec<Reg<U64>> = rows.iter().map(|&r| k.add(r, offset)).collect();
        if vectorized {
            let xs = vector::load_chunk(k, load, dtype, x_at);
            for (&r, &sum) in row_at.iter().zip(&acc) {
                let ws = vector::load_chunk(k, load, dtype, r);
                for (&w, &xv) in ws.iter().zip(&xs) {
                    let next = k.fma(w, xv, sum);
                    k.assign(sum, next);
                }
            }
        } else {
            let xv = vector::load_scalar(k, dtype, x_at);
            for (&r, &sum) in row_at.iter().zip(&acc) {
                let w = vector::load_scalar(k, dtype, r);
                let next = k.fma(w, xv, sum);
                k.assign(sum, next);
            }
        }
    });
    acc.into_iter()
        .map(|sum| k.warp_all_reduce(sum, WarpReduce::Sum))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(stage: ExpertFfnStage) -> MoeExpertFfnSpec {
        MoeExpertFfnSpec {
            dtype: DType::BF16,
            experts: 8,
            hidden: 4096,
            intermediate: 14336,
            top_k: 2,
            stage,
            kernel: ExpertFfnKernel::Gemv,
        }
    }

    #[test]
    fn entry_names_and_geometry_follow_the_stage() {
        let gate_up = spec(ExpertFfnStage::GateUp);
        assert_eq!(gate_up.entry(), "moe_gate_up_bf16_e8_h4096_i14336_k2");
        assert_eq!(gate_up.rows(), 14336);
        assert_eq!(gate_up.dot_length(), 4096);
        let down = spec(ExpertFfnStage::Down);
        assert_eq!(down.entry(), "moe_down_bf16_e8_h4096_i14336_k2");
        assert_eq!(down.rows(), 4096);
        assert_eq!(workspace_bytes(&down, 10), 10 * 14336 * 2);
        let odd = MoeExpertFfnSpec {
            hidden: 100,
            intermediate: 40,
            ..gate_up
        };
        assert!(!odd.vectorized());
        assert!(MoeExpertFfnSpec {
            stage: ExpertFfnStage::Down,
            ..odd
        }
        .vectorized());
    }
}
