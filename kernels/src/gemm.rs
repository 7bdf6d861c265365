//! Tensor-core GEMM for M ≥ 16 (prefill, batched decode):
//! `out[M, N] = epilogue(x[M, K] · weight[N, K]ᵀ)` in f16 or bf16 with f32 accumulation,
//! the output in the input dtype.
//!
//! One block computes a `block_m × block_n` output tile with `mma.sync.m16n8k16`; each of
//! its `warps_m × warps_n` warps owns a `(block_m / warps_m) × (block_n / warps_n)` sub-tile.
//! The K loop streams `block_k`-wide slices of `x` and `weight` into a ring of `stages`
//! shared-memory buffers with `cp.async` (a slice is requested `stages − 1` iterations
//! before it is used), and one barrier per slice guards the ring. Fragments come from
//! shared memory through `ldmatrix`; both operands are K-contiguous, so neither needs
//! `.trans`.
//!
//! **Shared-memory layout.** A stage holds the `x` slice (`block_m` rows) then the weight
//! slice (`block_n · accumulators` rows), each row `block_k · 2` bytes, cut into 16-byte
//! chunks. Chunk `i` (row-major over the slice) is stored at chunk `i ^ ((i >> 3) & 7)`: the
//! XOR permutes the eight chunks of every 128-byte line, so the eight row addresses of one
//! `ldmatrix` 8×8 matrix (eight consecutive rows, one chunk column) and the eight chunks a
//! group of eight `cp.async`s writes land in eight different bank groups — no conflicts for
//! `block_k` = 32 (two rows per line) or 64 (one row per line).
//!
//! **Main loop.** [`Pipeline::Fragments`] (the default) keeps the `ldmatrix` fragments one
//! K step ahead of the `mma`, across slice boundaries too: the barrier for slice `kt + 1`
//! sits before the last step's `mma` of slice `kt`, so the tensor cores have work while the
//! next slice's first fragments load; the refill is predicated (no branch) and issued at
//! the start of a slice. [`Pipeline::Basic`] is the first version's loop, kept for
//! comparison.
//!
//! **Bounds.** `m` is any value ≥ 1: rows of `x` past `m` are zeroed in shared memory (once
//! per stage by the prologue, their copies predicated off; [`Pipeline::Basic`]: `cp.async`
//! with a source size of 0), nothing is read from them and their outputs are not stored. `n` is a
//! run-time value that must be a multiple of 8 (the runtime caller's contract; not checked
//! in the kernel): weight rows past `n` are zero-filled the same way and output columns past
//! `n` are not stored, so `n` need not be a multiple of `block_n`. `k` is part of the spec
//! and must be a multiple of `block_k` ([`SpecError`] otherwise).
//!
//! **SwiGLU.** `weight` is `[2N, K]`, gate rows `0..N` then up rows `N..2N`. A block loads
//! `block_n` gate rows and the matching `block_n` up rows into one weight slice, each warp
//! keeps a gate and an up accumulator per output element, and the epilogue computes
//! `silu(gate) · up`; the output is `[M, N]`.
//!
//! **Tiles.** [`GemmTile::h100`] (128×256, 8 warps of 64×64, 3 stages of 64-wide K slices)
//! for large M; [`GemmTile::small`] (64×128, 4 warps of 32×64, 4 stages, two blocks per SM)
//! below 1024 rows; [`GemmSpec::for_rows`] picks between them.
//!
//! **Parameters** (bound by name): pointers `x` `[M, K]`, `weight` `[N, K]` (`[2N, K]` for
//! SwiGLU), the epilogue's extra pointer (`bias` `[N]` or `residual` `[M, N]`, see
//! [`Epilogue::extra_param`]), `out` `[M, N]`; scalars `m`, `n` (`u32`). Launch: grid
//! `(ceil(m / block_m), ceil(n / block_n))` — blocks along M vary fastest, so the blocks
//! running together share weight tiles and the (smaller) activations stay in L2 — with
//! `warps_m · warps_n · 32` threads and `stages · stage_bytes` of dynamic shared memory.
//!
//! **Grouped mode** ([`GemmSpec::grouping`], the mixture-of-experts expert FFN for prefill
//! and large batches; `kiln_kernels::moe::expert_ffn` picks it with
//! `ExpertFfnKernel::GroupedGemm`). One launch runs one GEMM per expert over that expert's
//! run of dispatched rows `offsets[e] ≤ p < offsets[e + 1]` (the end clamped to `slots`).
//! The grid gains `z = E`: block `(bm, bn, e)` reads `offsets[e]`, `offsets[e + 1]` and
//! computes rows `offsets[e] + bm · block_m …` of the run; a block past its run's end (or of
//! an empty run, or a negative offset, which reads as a huge unsigned value) exits at once,
//! before any barrier and uniformly for the whole block. `grid.x = ceil(slots / block_m)`
//! bounds any run. Rows past the run play the part of rows past `m`: zero-filled in shared
//! memory, never stored. Expert `e`'s weight pointers come from a `setp` / `selp` chain over
//! the per-expert parameters (`crate::moe::select_expert`, shared with the GEMV expert FFN).
//! The output width `N` is [`Grouping::n`], fixed by the spec (no `n` scalar). Two shapes:
//!
//! - gate and up (`gather_rows`, [`Epilogue::SwiGlu`]): row `p` of A is `x` row
//!   `order[p] / top_k`; the weight slice loads its gate rows from `gate_e` and its up rows
//!   from `up_e` (each `[N, K]`, instead of one `[2N, K]` tensor); the epilogue rounds gate
//!   and up to the dtype before `silu(gate) · up` (as `kiln_ir::interp`'s `swiglu_ffn`) and
//!   writes row `p` of `activated` `[slots, N]`. An `order` entry outside `0..slots`
//!   (negative included) is clamped to the last slot for the load and its output row is
//!   NaN — the GEMV kernel's rule. Parameters: `x`, `order`, `offsets`,
//!   `gate_0 … gate_{E−1}`, `up_0 … up_{E−1}`, `activated`; scalar `slots`.
//! - down (no gather, [`Epilogue::None`]): row `p` of A is `activated` row `p`; the weight
//!   is `down_e`; output row `p` of `y` `[slots, N]`. Parameters: `activated`, `offsets`,
//!   `down_0 … down_{E−1}`, `y`; scalar `slots`.
//!
//! The names and order are those of the GEMV expert FFN's stages, so a plan binds either
//! kernel by the same names. Entry names start `moe_gate_up_mma_` / `moe_down_mma_`.
//!
//! **Short K.** With at most eight K slices the main loop carries `.pragma "nounroll"`:
//! ptxas otherwise unrolls it completely and the hoisted fragment loads spill (K = 256 on
//! the small tile).

use kiln_codegen::kernel::{Access, Extent, GpuKernel, LaunchRule};
use kiln_codegen::ptx::{
    lower_expr, Axis, BF16x2, Cmp, F16x2, KernelBuilder, Pred, Reg, Special, Store, Target, B32,
    F32, U32, U64,
};
use kiln_ir::dtype::DType;
use serde::{Deserialize, Serialize};

use crate::epilogue::Epilogue;
use crate::error::SpecError;
use crate::vector;

const FAMILY: &str = "gemm";

/// Bytes of one f16/bf16 element.
pub(crate) const ELEMENT_BYTES: u32 = 2;
/// Bytes of one `cp.async` / one `ldmatrix` row.
pub(crate) const CHUNK_BYTES: u32 = 16;
/// The most dynamic shared memory a block may use on sm_80 / sm_90 (227 KiB).
const MAX_SHARED_BYTES: u32 = 227 * 1024;
/// The most f32 accumulators per thread before register spills become likely.
const MAX_ACCUMULATORS_PER_THREAD: u32 = 128;

/// How the main loop overlaps shared-memory fragment loads, `cp.async` refills and `mma`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Pipeline {
    /// The first version: per slice, wait and barrier, refill the freed stage (behind a
    /// branch, zero-filling rows past `m` / `n` with a source size of 0), then per 16-wide K
    /// step its `ldmatrix` fragments followed by its `mma`. Every slice starts with the
    /// tensor cores idle until the barrier and the first fragments are through.
    Basic,
    /// Fragments software-pipelined across K steps *and* slices: two fragment buffers; the
    /// `ldmatrix` of step `s + 1` is issued before the `mma` of step `s`, and the wait and
    /// barrier for slice `kt + 1` sit before the `mma` of slice `kt`'s last step, whose
    /// fragments are already in registers — so the first fragments of the next slice load
    /// while the last `mma` of this one run. The refill is issued right after the step-0
    /// fragments of a slice and predicated (no branch, so ptxas interleaves it with the
    /// `mma`); chunks of rows past `m` / `n` are zeroed once in every stage by the prologue
    /// and never copied, so no out-of-range address is ever formed.
    #[default]
    Fragments,
}

/// The blocking of a GEMM: block tile, warp grid, K slice and pipeline depth.
///
/// `block_n` counts *output* columns; under SwiGLU a block reads `2 · block_n` weight rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GemmTile {
    /// Output rows per block.
    pub block_m: usize,
    /// Output columns per block.
    pub block_n: usize,
    /// K elements per shared-memory stage: 32 or 64.
    pub block_k: usize,
    /// Warps along M; each owns `block_m / warps_m` rows (a multiple of 16).
    pub warps_m: usize,
    /// Warps along N; each owns `block_n / warps_n` columns (a multiple of 16).
    pub warps_n: usize,
    /// Shared-memory stages of the `cp.async` ring (2..=8).
    pub stages: usize,
    /// Blocks per SM that ptxas must fit (`.minnctapersm`, caps registers); 1 leaves
    /// registers uncapped.
    pub min_blocks_per_sm: usize,
    /// The main-loop schedule.
    pub pipeline: Pipeline,
}

impl GemmTile {
    /// The large-M tile for H100/A100: 128×256 outputs (128×128 under SwiGLU, which reads
    /// 256 weight rows), 8 warps of 64×64 (mma) each, 64-wide K slices, 3 stages (144 KiB of
    /// shared memory, one block per SM). 64×64 warp tiles keep `ldmatrix` traffic under the
    /// tensor cores' rate; smaller warp tiles make shared-memory bandwidth the limit.
    pub fn h100(epilogue: Epilogue) -> GemmTile {
        let block_n = match epilogue {
            Epilogue::SwiGlu => 128,
            _ => 256,
        };
        GemmTile {
            block_m: 128,
            block_n,
            block_k: 64,
            warps_m: 2,
            warps_n: 4,
            stages: 3,
            min_blocks_per_sm: 1,
            pipeline: Pipeline::Fragments,
        }
    }

    /// A smaller tile for M of a few hundred rows or less (more blocks to fill the SMs):
    /// 64×128 outputs (64×64 under SwiGLU), 4 warps of 32×64 (mma), 64-wide K slices,
    /// 4 stages (96 KiB), two blocks per SM.
    pub fn small(epilogue: Epilogue) -> GemmTile {
        let block_n = match epilogue {
            Epilogue::SwiGlu => 64,
            _ => 128,
        };
        GemmTile {
            block_m: 64,
            block_n,
            block_k: 64,
            warps_m: 2,
            warps_n: 2,
            stages: 4,
            min_blocks_per_sm: 2,
            pipeline: Pipeline::Fragments,
        }
    }

    /// From this many rows on, GEMM uses the large (H100) tile.
    pub const LARGE_ROWS: usize = 1024;

    /// The tile for `m` rows: [`GemmTile::h100`] from 1024 rows on, where it gives enough
    /// blocks to fill an H100; [`GemmTile::small`] below (and down to 16 rows, where the
    /// weights' bandwidth rules and the extra blocks matter more than the wasted rows).
    pub fn for_rows(m: usize, epilogue: Epilogue) -> GemmTile {
        if m >= GemmTile::LARGE_ROWS {
            GemmTile::h100(epilogue)
        } else {
            GemmTile::small(epilogue)
        }
    }

    /// Threads per block.
    pub fn threads(&self) -> usize {
        self.warps_m * self.warps_n * 32
    }
}

/// [`GemmTile`] in `u32`, for generation (after validation bounded every field).
#[derive(Clone, Copy)]
struct Tile {
    block_m: u32,
    block_n: u32,
    block_k: u32,
    warps_m: u32,
    warps_n: u32,
    stages: u32,
    min_blocks_per_sm: u32,
}

impl Tile {
    fn of(t: &GemmTile) -> Tile {
        let c = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        Tile {
            block_m: c(t.block_m),
            block_n: c(t.block_n),
            block_k: c(t.block_k),
            warps_m: c(t.warps_m),
            warps_n: c(t.warps_n),
            stages: c(t.stages),
            min_blocks_per_sm: c(t.min_blocks_per_sm),
        }
    }

    fn threads(&self) -> u32 {
        self.warps_m * self.warps_n * 32
    }
}

/// The grouped (mixture-of-experts) mode of a GEMM: one GEMM per expert over that expert's
/// run of dispatched rows, in one launch (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Grouping {
    /// `E`, the number of experts (`1..=`[`MAX_EXPERTS`]): the grid's z extent and the
    /// per-expert weight parameters.
    pub experts: usize,
    /// `k`, the experts each token chose: slot `t·k + j` belongs to token `t`.
    pub top_k: usize,
    /// Whether row `p` of the A operand is `x` row `order[p] / top_k` (gate and up) rather
    /// than row `p` of `activated` (down).
    pub gather_rows: bool,
    /// The output width `N` (`I` for gate and up, `H` for down), fixed by the spec: a
    /// multiple of 8. The grouped kernel takes no `n` scalar.
    pub n: usize,
}

/// The most experts a grouped GEMM takes (the per-expert pointer chain and the 4 KiB
/// parameter space), as for the GEMV expert FFN.
pub const MAX_EXPERTS: usize = 128;

/// A GEMM kernel: dtype, the (fixed) reduction length `k`, the tiling and the epilogue.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GemmSpec {
    /// `F16` or `BF16`: inputs, weights, extra operand and output.
    pub dtype: DType,
    /// The reduction length K, a multiple of `tile.block_k`.
    pub k: usize,
    pub tile: GemmTile,
    pub epilogue: Epilogue,
    /// The grouped MoE mode, or `None` for a plain GEMM. Left out of the serialized form
    /// and of `Debug` (the spec key) when `None`, so plain specs keep their keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grouping: Option<Grouping>,
}

impl std::fmt::Debug for GemmSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("GemmSpec");
        d.field("dtype", &self.dtype)
            .field("k", &self.k)
            .field("tile", &self.tile)
            .field("epilogue", &self.epilogue);
        if let Some(grouping) = &self.grouping {
            d.field("grouping", grouping);
        }
        d.finish()
    }
}

impl GemmSpec {
    /// A spec with the default large-M tile [`GemmTile::h100`].
    pub fn new(dtype: DType, k: usize, epilogue: Epilogue) -> GemmSpec {
        GemmSpec {
            dtype,
            k,
            tile: GemmTile::h100(epilogue),
            epilogue,
            grouping: None,
        }
    }

    /// A spec with the tile [`GemmTile::for_rows`] picks for `m` rows (the kernel still
    /// takes any `m` at run time).
    pub fn for_rows(dtype: DType, m: usize, k: usize, epilogue: Epilogue) -> GemmSpec {
        GemmSpec {
            tile: GemmTile::for_rows(m, epilogue),
            ..GemmSpec::new(dtype, k, epilogue)
        }
    }

    /// The kernel's entry name, unique per spec: `gemm_bf16_swiglu_k4096_128x128x64_w2x4_s3`;
    /// grouped, `moe_gate_up_mma_bf16_e8_h4096_i14336_k2_64x64x64_w2x2_s4` (gate and up) or
    /// `moe_down_mma_…` (down), named like the GEMV expert FFN's kernels.
    pub fn entry_name(&self) -> String {
        let t = &self.tile;
        let head = match &self.grouping {
            None => format!(
                "gemm_{}_{}_k{}",
                self.dtype.name(),
                self.epilogue.name(),
                self.k
            ),
            Some(g) => {
                let (stage, hidden, intermediate) = match g.gather_rows {
                    true => ("gate_up", self.k, g.n),
                    false => ("down", g.n, self.k),
                };
                format!(
                    "moe_{stage}_mma_{}_e{}_h{hidden}_i{intermediate}_k{}",
                    self.dtype.name(),
                    g.experts,
                    g.top_k
                )
            }
        };
        format!(
            "{head}_{}x{}x{}_w{}x{}_s{}",
            t.block_m, t.block_n, t.block_k, t.warps_m, t.warps_n, t.stages
        ) + match t.pipeline {
            Pipeline::Basic => "_basic",
            Pipeline::Fragments => "",
        }
    }

    /// Dynamic shared memory per block, in bytes.
    pub fn shared_bytes(&self) -> usize {
        self.tile.stages * self.stage_bytes()
    }

    fn stage_bytes(&self) -> usize {
        let t = &self.tile;
        let rows = t.block_m + t.block_n * self.epilogue.accumulators();
        rows * t.block_k * ELEMENT_BYTES as usize
    }

    fn accumulators(&self) -> u32 {
        self.epilogue.accumulators() as u32
    }

    /// Checks everything the generator relies on; the error says what to change.
    pub fn validate(&self) -> Result<(), SpecError> {
        let err = |message: String| Err(SpecError::new(FAMILY, message));
        let t = &self.tile;
        let fields = [
            t.block_m,
            t.block_n,
            t.block_k,
            t.warps_m,
            t.warps_n,
            t.stages,
            t.min_blocks_per_sm,
        ];
        if fields.iter().any(|&v| v > 1024) || self.k > 1 << 24 {
            return err(format!("tile {t:?} or k = {} out of range", self.k));
        }
        if !matches!(self.dtype, DType::F16 | DType::BF16) {
            return err(format!(
                "dtype {} is not supported (f16 or bf16)",
                self.dtype
            ));
        }
        if !matches!(t.block_k, 32 | 64) {
            return err(format!("block_k {} must be 32 or 64", t.block_k));
        }
        if self.k == 0 || !self.k.is_multiple_of(t.block_k) {
            return err(format!(
                "k = {} must be a positive multiple of block_k = {}",
                self.k, t.block_k
            ));
        }
        let warps = t.warps_m * t.warps_n;
        if warps == 0 || !warps.is_multiple_of(2) || warps > 16 {
            return err(format!(
                "{} × {} warps: the block needs an even number of warps, at most 16",
                t.warps_m, t.warps_n
            ));
        }
        if t.block_m == 0 || !t.block_m.is_multiple_of(16 * t.warps_m) {
            return err(format!(
                "block_m = {} must be a positive multiple of 16 · warps_m = {}",
                t.block_m,
                16 * t.warps_m
            ));
        }
        if t.block_n == 0 || !t.block_n.is_multiple_of(16 * t.warps_n) {
            return err(format!(
                "block_n = {} must be a positive multiple of 16 · warps_n = {}",
                t.block_n,
                16 * t.warps_n
            ));
        }
        if !(2..=8).contains(&t.stages) {
            return err(format!("stages = {} must be in 2..=8", t.stages));
        }
        if !(1..=8).contains(&t.min_blocks_per_sm) {
            return err(format!(
                "min_blocks_per_sm = {} must be in 1..=8",
                t.min_blocks_per_sm
            ));
        }
        let g = Geometry::of(self);
        if !(g.a_chunks).is_multiple_of(g.threads) || !(g.b_chunks).is_multiple_of(g.threads) {
            return err(format!(
                "the {} threads cannot split the stage evenly: {} x chunks and {} weight chunks \
                 of 16 bytes",
                g.threads, g.a_chunks, g.b_chunks
            ));
        }
        if self.epilogue == Epilogue::SwiGlu && !t.block_n.is_multiple_of(g.rows_per_pass as usize)
        {
            return err(format!(
                "SwiGLU: block_n = {} must be a multiple of the {} rows one copy pass covers",
                t.block_n, g.rows_per_pass
            ));
        }
        let accumulators = g.m_tiles * g.n_tiles * 4 * self.accumulators();
        if accumulators > MAX_ACCUMULATORS_PER_THREAD {
            return err(format!(
                "a warp tile of {}×{} outputs needs {accumulators} f32 accumulators per thread \
                 (at most {MAX_ACCUMULATORS_PER_THREAD})",
                16 * g.m_tiles,
                8 * g.n_tiles
            ));
        }
        if let Some(grouping) = &self.grouping {
            self.validate_grouping(grouping)?;
        }
        if self.shared_bytes() > MAX_SHARED_BYTES as usize {
            return err(format!(
                "{} stages of {} bytes exceed the {MAX_SHARED_BYTES} bytes of shared memory a \
                 block may use",
                t.stages,
                self.stage_bytes()
            ));
        }
        Ok(())
    }
}

impl GemmSpec {
    fn validate_grouping(&self, g: &Grouping) -> Result<(), SpecError> {
        let err = |message: String| Err(SpecError::new(FAMILY, message));
        if !(1..=MAX_EXPERTS).contains(&g.experts) {
            return err(format!(
                "grouping: experts = {} is outside 1..={MAX_EXPERTS}",
                g.experts
            ));
        }
        if !(1..=g.experts).contains(&g.top_k) {
            return err(format!(
                "grouping: top_k = {} is outside 1..=experts ({})",
                g.top_k, g.experts
            ));
        }
        if g.n == 0 || g.n > 1 << 24 || !g.n.is_multiple_of(8) {
            return err(format!(
                "grouping: n = {} must be a positive multiple of 8, at most 2^24",
                g.n
            ));
        }
        let wanted = match g.gather_rows {
            true => Epilogue::SwiGlu,
            false => Epilogue::None,
        };
        if self.epilogue != wanted {
            return err(format!(
                "grouping: the {} stage needs epilogue {}, not {}",
                if g.gather_rows { "gate-up" } else { "down" },
                wanted.name(),
                self.epilogue.name()
            ));
        }
        Ok(())
    }
}

/// Constants derived from a valid spec.
struct Geometry {
    threads: u32,
    /// 16-byte chunks per stage row.
    chunks_per_row: u32,
    /// Rows one pass of all threads' `cp.async` covers.
    rows_per_pass: u32,
    a_chunks: u32,
    b_chunks: u32,
    /// Rows of `x` / of the weight per stage.
    a_rows: u32,
    b_rows: u32,
    a_bytes: u32,
    stage_bytes: u32,
    /// The warp tile in 16-row m tiles and 8-column n tiles (per accumulator set).
    m_tiles: u32,
    n_tiles: u32,
    warp_rows: u32,
    warp_cols: u32,
    k_tiles: u32,
    k_steps: u32,
    row_bytes: u32,
}

impl Geometry {
    fn of(spec: &GemmSpec) -> Geometry {
        let t = Tile::of(&spec.tile);
        let k = spec.k as u32;
        let threads = t.threads();
        let chunks_per_row = t.block_k * ELEMENT_BYTES / CHUNK_BYTES;
        let a_rows = t.block_m;
        let b_rows = t.block_n * spec.accumulators();
        let a_bytes = a_rows * t.block_k * ELEMENT_BYTES;
        let warp_rows = t.block_m / t.warps_m.max(1);
        let warp_cols = t.block_n / t.warps_n.max(1);
        Geometry {
            threads,
            chunks_per_row,
            rows_per_pass: (threads / chunks_per_row).max(1),
            a_chunks: a_rows * chunks_per_row,
            b_chunks: b_rows * chunks_per_row,
            a_rows,
            b_rows,
            a_bytes,
            stage_bytes: (a_rows + b_rows) * t.block_k * ELEMENT_BYTES,
            m_tiles: warp_rows / 16,
            n_tiles: warp_cols / 8,
            warp_rows,
            warp_cols,
            k_tiles: k / t.block_k.max(1),
            k_steps: t.block_k / 16,
            row_bytes: k * ELEMENT_BYTES,
        }
    }
}

/// Generates the GEMM kernel of `spec` (target sm_80, runs on sm_80 and newer).
pub fn generate(spec: &GemmSpec) -> Result<GpuKernel, SpecError> {
    generate_for(spec, Target::Sm80)
}

/// The grouped mode's per-kernel registers: the gather of A rows (gate and up only).
#[derive(Clone, Copy)]
struct Gather {
    order: Reg<U64>,
    slots: Reg<U32>,
    top_k: u32,
}

/// Generates the GEMM kernel of `spec` for `target`.
pub fn generate_for(spec: &GemmSpec, target: Target) -> Result<GpuKernel, SpecError> {
    spec.validate()?;
    let g = Geometry::of(spec);
    let t = Tile::of(&spec.tile);
    let mut k = KernelBuilder::new(&spec.entry_name(), target);
    if t.min_blocks_per_sm > 1 {
        k.min_blocks_per_sm(t.min_blocks_per_sm);
    }
    let Some(grouping) = spec.grouping else {
        let x = k.param_pointer("x", Access::Read);
        let weight = k.param_pointer("weight", Access::Read);
        let extra = spec
            .epilogue
            .extra_param()
            .map(|name| k.param_pointer(name, Access::Read));
        let out = k.param_pointer("out", Access::Write);
        let m = k.param_u32("m");
        let n = k.param_u32("n");
        let smem = k.dynamic_shared("smem", 128);

        k.comment("block (bm, bn) computes out[bm*BM .., bn*BN ..]; warp (wm, wn) a sub-tile");
        let tid = k.tid_x();
        let lane = k.and(tid, 31u32);
        let warp = k.shr(tid, 5u32);
        let warp_n = k.rem(warp, t.warps_n);
        let warp_m = k.div(warp, t.warps_n);
        let block_m = k.special(Special::Ctaid(Axis::X));
        let block_n = k.special(Special::Ctaid(Axis::Y));
        let row0 = k.mul(block_m, t.block_m);
        let col0 = k.mul(block_n, t.block_n);
        let smem_base = k.shared_address(&smem);
        let body = Body {
            x,
            weights: vec![weight],
            gather: None,
            extra,
            out,
            tid,
            lane,
            warp_m,
            warp_n,
            row0,
            col0,
            m,
            n,
            smem_base,
        };
        emit_body(&mut k, spec, &g, &body);
        let launch = LaunchRule {
            grid: [
                Extent::ceil_div("m", t.block_m),
                Extent::ceil_div("n", t.block_n),
                Extent::fixed(1),
            ],
            block: [g.threads, 1, 1],
            shared_bytes: t.stages * g.stage_bytes,
        };
        return Ok(k.finish(launch));
    };

    // Grouped: parameters named and ordered as the GEMV expert FFN's stages.
    let (x, order) = match grouping.gather_rows {
        true => {
            let x = k.param_pointer("x", Access::Read);
            (x, Some(k.param_pointer("order", Access::Read)))
        }
        false => (k.param_pointer("activated", Access::Read), None),
    };
    let offsets = k.param_pointer("offsets", Access::Read);
    let groups: &[&str] = match grouping.gather_rows {
        true => &["gate", "up"],
        false => &["down"],
    };
    let weight_params: Vec<Vec<Reg<U64>>> = groups
        .iter()
        .map(|group| {
            (0..grouping.experts)
                .map(|e| k.param_pointer(&format!("{group}_{e}"), Access::Read))
                .collect()
        })
        .collect();
    let out = match grouping.gather_rows {
        true => k.param_pointer("activated", Access::Write),
        false => k.param_pointer("y", Access::Write),
    };
    let slots = k.param_u32("slots");
    let smem = k.dynamic_shared("smem", 128);

    k.comment(
        "grouped: block (bm, bn, e) computes rows offsets[e] + bm*BM .. of expert e's run, \
         columns bn*BN ..; warp (wm, wn) a sub-tile",
    );
    let tid = k.tid_x();
    let lane = k.and(tid, 31u32);
    let warp = k.shr(tid, 5u32);
    let warp_n = k.rem(warp, t.warps_n);
    let warp_m = k.div(warp, t.warps_n);
    let block_m = k.special(Special::Ctaid(Axis::X));
    let block_n = k.special(Special::Ctaid(Axis::Y));
    let expert = k.special(Special::Ctaid(Axis::Z));
    k.comment(
        "expert e's run offsets[e] .. min(offsets[e + 1], slots); a block past its end exits \
         (whole block, before any barrier)",
    );
    let offset_address = k.mad_wide(expert, 4u32, offsets);
    let begin = k.ld_global::<U32>(offset_address.at(0));
    let end = k.ld_global::<U32>(offset_address.at(4));
    let end = k.min(end, slots);
    let block_row = k.mul(block_m, t.block_m);
    let row0 = k.add(begin, block_row);
    let empty = k.setp(Cmp::Ge, begin, end);
    let past = k.setp(Cmp::Ge, row0, end);
    let done = k.or(empty, past);
    k.guard(done, |k| k.ret());
    let col0 = k.mul(block_n, t.block_n);
    let n = k.mov::<U32>(grouping.n as u32);
    let weights = crate::moe::select_expert(&mut k, &weight_params, expert);
    let smem_base = k.shared_address(&smem);
    let body = Body {
        x,
        weights,
        gather: order.map(|order| Gather {
            order,
            slots,
            top_k: grouping.top_k as u32,
        }),
        extra: None,
        out,
        tid,
        lane,
        warp_m,
        warp_n,
        row0,
        col0,
        m: end,
        n,
        smem_base,
    };
    emit_body(&mut k, spec, &g, &body);
    let launch = LaunchRule {
        grid: [
            Extent::ceil_div("slots", t.block_m),
            Extent::fixed(grouping.n.div_ceil(spec.tile.block_n) as u32),
            Extent::fixed(grouping.experts as u32),
        ],
        block: [g.threads, 1, 1],
        shared_bytes: t.stages * g.stage_bytes,
    };
    Ok(k.finish(launch))
}

/// The registers the body of either mode works from.
struct Body {
    /// The A operand: `x` (plain, grouped gate and up) or `activated` (grouped down).
    x: Reg<U64>,
    /// The weight: `[weight]` (plain; SwiGLU up rows `n` rows after the gate rows) or the
    /// expert's `[gate, up]` / `[down]` (grouped).
    weights: Vec<Reg<U64>>,
    gather: Option<Gather>,
    extra: Option<Reg<U64>>,
    out: Reg<U64>,
    tid: Reg<U32>,
    lane: Reg<U32>,
    warp_m: Reg<U32>,
    warp_n: Reg<U32>,
    /// The block's first output row and column.
    row0: Reg<U32>,
    col0: Reg<U32>,
    /// Rows at or past `m` (grouped: the run's end) and columns at or past `n` are outside.
    m: Reg<U32>,
    n: Reg<U32>,
    smem_base: Reg<U32>,
}

/// Copies, main loop and epilogue, shared by the plain and grouped modes.
fn emit_body(k: &mut KernelBuilder, spec: &GemmSpec, g: &Geometry, b: &Body) {
    let zero_fill = spec.tile.pipeline == Pipeline::Basic;
    let copy = emit_copy_setup(k, spec, g, b, zero_fill);
    let frag = emit_fragment_setup(k, g, b.lane, b.warp_m, b.warp_n, b.smem_base);

    k.comment("f32 accumulators: [set][m tile][n tile][4] (set 1 = SwiGLU up)");
    let sets = spec.accumulators() as usize;
    let mut acc: Vec<Vec<Vec<[Reg<F32>; 4]>>> = Vec::with_capacity(sets);
    for _ in 0..sets {
        let mut per_set = Vec::new();
        for _ in 0..g.m_tiles {
            let row: Vec<[Reg<F32>; 4]> = (0..g.n_tiles).map(|_| k.splat::<F32, 4>(0.0)).collect();
            per_set.push(row);
        }
        acc.push(per_set);
    }

    match spec.tile.pipeline {
        Pipeline::Basic => emit_basic_loop(k, spec, g, &copy, &frag, &acc),
        Pipeline::Fragments => emit_pipelined_loop(k, spec, g, &copy, &frag, &acc),
    }

    emit_epilogue(k, spec, g, &acc, b);
}

/// K-slice counts up to this keep the main loop rolled (`.pragma "nounroll"`): ptxas
/// unrolls such short constant loops completely and the hoisted fragment loads spill (at
/// K = 256 on the small tile). Longer loops are left to ptxas (and print as before).
const NO_UNROLL_MAX_K_TILES: u32 = 8;

/// The main loop `for kt in 0..k_tiles`.
fn main_loop(k: &mut KernelBuilder, g: &Geometry, body: impl FnOnce(&mut KernelBuilder, Reg<U32>)) {
    if g.k_tiles <= NO_UNROLL_MAX_K_TILES {
        k.for_range_no_unroll(0u32, g.k_tiles, 1u32, body);
    } else {
        k.for_range(0u32, g.k_tiles, 1u32, body);
    }
}

/// The [`Pipeline::Basic`] prologue and main loop.
fn emit_basic_loop(
    k: &mut KernelBuilder,
    spec: &GemmSpec,
    g: &Geometry,
    copy: &CopySetup,
    frag: &FragmentSetup,
    acc: &[Vec<Vec<[Reg<F32>; 4]>>],
) {
    let t = Tile::of(&spec.tile);
    k.comment(&format!(
        "prologue: request K slices 0 to {} into stages 0 to {} (one commit group each)",
        t.stages - 2,
        t.stages - 2
    ));
    for stage in 0..t.stages - 1 {
        if stage < g.k_tiles {
            copy.emit_load(k, g, None, stage * g.stage_bytes);
        }
        k.cp_async_commit();
    }
    let read_offset = k.mov::<U32>(0u32);
    let write_offset = k.mov::<U32>((t.stages - 1) * g.stage_bytes);

    k.comment(&format!(
        "main loop over {} K slices: wait for slice kt, refill the stage freed by slice kt - 1 \
         with slice kt + {}, multiply slice kt",
        g.k_tiles,
        t.stages - 1
    ));
    main_loop(k, g, |k, kt| {
        k.cp_async_wait(t.stages - 2);
        k.bar_sync(0);
        if g.k_tiles >= t.stages {
            let refill = k.setp(Cmp::Lt, kt, g.k_tiles - (t.stages - 1));
            k.if_then(refill, |k| {
                copy.emit_load(k, g, Some(write_offset), 0);
            });
        }
        k.cp_async_commit();
        advance_stage(k, write_offset, g, t.stages);
        emit_slice_product(k, spec, g, frag, read_offset, acc);
        advance_stage(k, read_offset, g, t.stages);
    });
    k.cp_async_wait(0);
}

/// The [`Pipeline::Fragments`] prologue and main loop. Per slice `kt` with K steps
/// `0..steps`, in program order:
///
/// ```text
/// step 0:        ldmatrix step 1 | refill slice kt + S − 1 (predicated), commit | mma step 0
/// step s:        ldmatrix step s + 1                                           | mma step s
/// step steps−1:  wait slice kt + 1, barrier | ldmatrix step 0 of slice kt + 1  | mma step steps−1
/// ```
///
/// The refill at step 0 of slice `kt` writes the stage of slice `kt − 1`, whose last
/// fragments every warp loaded before the barrier that ends slice `kt − 1`. The barrier at
/// the last step of slice `kt` waits for slice `kt + 1` (`S − 2` younger groups may stay
/// pending: one group is committed per slice, empty once nothing is left to request). The
/// fragments loaded after the last barrier (a slice past K) are never used.
fn emit_pipelined_loop(
    k: &mut KernelBuilder,
    spec: &GemmSpec,
    g: &Geometry,
    copy: &CopySetup,
    frag: &FragmentSetup,
    acc: &[Vec<Vec<[Reg<F32>; 4]>>],
) {
    let t = Tile::of(&spec.tile);
    k.comment(&format!(
        "prologue: zero the chunks of rows past m / n in all {} stages (they are never \
         copied), request K slices 0 to {} into stages 0 to {} (one commit group each)",
        t.stages,
        t.stages - 2,
        t.stages - 2
    ));
    copy.emit_zero_outside(k, g, t.stages);
    for stage in 0..t.stages - 1 {
        if stage < g.k_tiles {
            copy.emit_load_predicated(k, g, None, stage * g.stage_bytes, None);
        }
        k.cp_async_commit();
    }
    let read_offset = k.mov::<U32>(0u32);
    let write_offset = k.mov::<U32>((t.stages - 1) * g.stage_bytes);
    k.comment("wait for slice 0, load its step-0 fragments (carried across the loop)");
    k.cp_async_wait(t.stages - 2);
    k.bar_sync(0);
    let carried = load_fragments(k, spec, g, frag, read_offset, 0);

    k.comment(&format!(
        "main loop over {} K slices of {} K steps: fragments one step ahead, refill of slice \
         kt + {} at step 0, barrier for slice kt + 1 before the last step's mma",
        g.k_tiles,
        g.k_steps,
        t.stages - 1
    ));
    main_loop(k, g, |k, kt| {
        let refill =
            (g.k_tiles >= t.stages).then(|| k.setp(Cmp::Lt, kt, g.k_tiles - (t.stages - 1)));
        let mut current = carried.clone();
        for step in 0..g.k_steps {
            let last = step + 1 == g.k_steps;
            if last {
                k.comment("slice kt + 1 is needed next: wait for it and free slice kt's stage");
                k.cp_async_wait(t.stages - 2);
                k.bar_sync(0);
                advance_stage(k, read_offset, g, t.stages);
            }
            let next_step = if last { 0 } else { step + 1 };
            k.comment(&format!(
                "K step {step}: fragments of step {next_step}{}, then step {step}'s mma",
                if last { " of slice kt + 1" } else { "" }
            ));
            let next = load_fragments(k, spec, g, frag, read_offset, next_step);
            if step == 0 {
                if let Some(refill) = refill {
                    copy.emit_load_predicated(k, g, Some(write_offset), 0, Some(refill));
                }
                k.cp_async_commit();
                advance_stage(k, write_offset, g, t.stages);
            }
            mma_step(k, spec, acc, &current);
            current = next;
        }
        k.comment("carry slice kt + 1's step-0 fragments to the next iteration");
        carried.assign_from(k, &current);
    });
    k.cp_async_wait(0);
}

/// The `ldmatrix` fragments of one 16-wide K step of a warp tile.
#[derive(Clone)]
struct Fragments {
    /// `x`, per m tile: four registers.
    a: Vec<[Reg<B32>; 4]>,
    /// Weight, per accumulator set and n tile: two registers.
    b: Vec<Vec<[Reg<B32>; 2]>>,
}

impl Fragments {
    /// `self = other`, register by register.
    fn assign_from(&self, k: &mut KernelBuilder, other: &Fragments) {
        for (d, s) in self.a.iter().zip(&other.a) {
            for (d, s) in d.iter().zip(s) {
                k.assign(*d, *s);
            }
        }
        for (d, s) in self.b.iter().zip(&other.b) {
            for (d, s) in d.iter().zip(s) {
                for (d, s) in d.iter().zip(s) {
                    k.assign(*d, *s);
                }
            }
        }
    }
}

/// Loads K step `step` of the slice in the stage at `read_offset`.
fn load_fragments(
    k: &mut KernelBuilder,
    spec: &GemmSpec,
    g: &Geometry,
    frag: &FragmentSetup,
    read_offset: Reg<U32>,
    step: u32,
) -> Fragments {
    let row_bytes_in_slice = (g.chunks_per_row * CHUNK_BYTES) as i64;
    let (a_address, b_address) = {
        let a = k.add(frag.a, read_offset);
        let b = k.add(frag.b, read_offset);
        match step {
            0 => (a, b),
            _ => (k.xor(a, 32 * step), k.xor(b, 32 * step)),
        }
    };
    let a: Vec<[Reg<B32>; 4]> = (0..g.m_tiles as i64)
        .map(|i| k.ldmatrix::<4>(a_address.at(i * 16 * row_bytes_in_slice)))
        .collect();
    // b[set][n tile] = two registers; one ldmatrix.x4 gives two n tiles.
    let mut b: Vec<Vec<[Reg<B32>; 2]>> = Vec::new();
    for set in 0..spec.accumulators() as i64 {
        let set_rows = set * spec.tile.block_n as i64;
        let mut tiles = Vec::new();
        for pair in 0..(g.n_tiles / 2) as i64 {
            let row = set_rows + pair * 16;
            let r = k.ldmatrix::<4>(b_address.at(row * row_bytes_in_slice));
            tiles.push([r[0], r[1]]);
            tiles.push([r[2], r[3]]);
        }
        b.push(tiles);
    }
    Fragments { a, b }
}

/// The warp tile's `mma` for one K step.
fn mma_step(
    k: &mut KernelBuilder,
    spec: &GemmSpec,
    acc: &[Vec<Vec<[Reg<F32>; 4]>>],
    f: &Fragments,
) {
    for (set, per_set) in acc.iter().enumerate() {
        for (i, row) in per_set.iter().enumerate() {
            for step_j in 0..row.len() {
                // Serpentine order over n tiles: consecutive mma share an operand.
                let j = if i % 2 == 0 {
                    step_j
                } else {
                    row.len() - 1 - step_j
                };
                mma_m16n8k16(k, spec.dtype, row[j], f.a[i], f.b[set][j]);
            }
        }
    }
}

/// `accumulators += a · b` on `mma.sync.m16n8k16` for `dtype` (bf16, else f16), f32
/// accumulators; the fragment layout of [`KernelBuilder::mma_m16n8k16_f16`].
pub(crate) fn mma_m16n8k16(
    k: &mut KernelBuilder,
    dtype: DType,
    accumulators: [Reg<F32>; 4],
    a: [Reg<B32>; 4],
    b: [Reg<B32>; 2],
) {
    match dtype {
        DType::BF16 => k.mma_m16n8k16_bf16(accumulators, a, b),
        _ => k.mma_m16n8k16_f16(accumulators, a, b),
    }
}

/// `offset = (offset + stage_bytes) mod (stages · stage_bytes)`.
fn advance_stage(k: &mut KernelBuilder, offset: Reg<U32>, g: &Geometry, stages: u32) {
    let next = k.add(offset, g.stage_bytes);
    let wrapped = k.setp(Cmp::Eq, next, stages * g.stage_bytes);
    let value = k.select(wrapped, 0u32, next);
    k.assign(offset, value);
}

/// The swizzled byte offset of 16-byte chunk `chunk` of a stage slice:
/// `(chunk ^ ((chunk >> 3) & 7)) · 16`.
fn swizzled_chunk_bytes(k: &mut KernelBuilder, chunk: Reg<U32>) -> Reg<U32> {
    let line = k.shr(chunk, 3u32);
    let line = k.and(line, 7u32);
    let physical = k.xor(chunk, line);
    k.shl(physical, 4u32)
}

/// One weight copy pass: which pointer it reads through and at what offset.
struct WeightPass {
    /// Index into [`CopySetup::weight_sources`].
    source: usize,
    global_offset: i64,
    /// Whether the pass's weight row is below `n` (its output column exists).
    inside: Reg<Pred>,
    /// Source bytes (16 or 0; [`Pipeline::Basic`] only).
    bytes: Option<Reg<U32>>,
}

/// Per-thread state of the global → shared copies.
struct CopySetup {
    /// Shared address of this thread's first chunk in stage 0.
    shared: Reg<U32>,
    /// Global addresses of this thread's `x` chunks of the next slice: one for all passes
    /// (rows `rows_per_pass` apart), or one per pass when grouped gate and up gather rows.
    x_sources: Vec<Reg<U64>>,
    /// Per `x` pass: index into `x_sources` and the byte offset from it.
    x_passes: Vec<(usize, i64)>,
    /// Whether each `x` pass's row is below `m`.
    x_inside: Vec<Reg<Pred>>,
    /// Source bytes (16 or 0) of each `x` pass ([`Pipeline::Basic`] only).
    x_bytes: Vec<Reg<U32>>,
    /// Global addresses of the weight chunks (gate, and up under SwiGLU) of the next slice.
    weight_sources: Vec<Reg<U64>>,
    weight_passes: Vec<WeightPass>,
}

impl CopySetup {
    /// Requests the next K slice into the stage at `offset + constant` bytes, then moves the
    /// global addresses one slice on.
    fn emit_load(
        &self,
        k: &mut KernelBuilder,
        g: &Geometry,
        offset: Option<Reg<U32>>,
        constant: u32,
    ) {
        let base = match offset {
            Some(offset) => k.add(self.shared, offset),
            None => self.shared,
        };
        let pass_shared = g.threads * CHUNK_BYTES;
        for (j, bytes) in self.x_bytes.iter().enumerate() {
            let shared = base.at((constant + j as u32 * pass_shared) as i64);
            let (source, offset) = self.x_passes[j];
            let global = self.x_sources[source].at(offset);
            k.cp_async_16_zero_fill(shared, global, *bytes);
        }
        for (j, pass) in self.weight_passes.iter().enumerate() {
            let shared = base.at((constant + g.a_bytes + j as u32 * pass_shared) as i64);
            let global = self.weight_sources[pass.source].at(pass.global_offset);
            let bytes = pass.bytes.expect("Basic pipeline source bytes");
            k.cp_async_16_zero_fill(shared, global, bytes);
        }
        self.advance_sources(k, g);
    }

    /// Moves the global addresses one slice on.
    fn advance_sources(&self, k: &mut KernelBuilder, g: &Geometry) {
        let step = (g.chunks_per_row * CHUNK_BYTES) as u64;
        for source in self.x_sources.iter().chain(&self.weight_sources) {
            let next = k.add(*source, step);
            k.assign(*source, next);
        }
    }

    /// Like [`emit_load`](CopySetup::emit_load), but each copy is predicated on its row
    /// being inside (and on `refill` where given) instead of zero-filled: a row past `m` /
    /// `n` forms no address at all. Its chunk keeps the zeros of
    /// [`emit_zero_outside`](CopySetup::emit_zero_outside).
    fn emit_load_predicated(
        &self,
        k: &mut KernelBuilder,
        g: &Geometry,
        offset: Option<Reg<U32>>,
        constant: u32,
        refill: Option<Reg<Pred>>,
    ) {
        let base = match offset {
            Some(offset) => k.add(self.shared, offset),
            None => self.shared,
        };
        let pass_shared = g.threads * CHUNK_BYTES;
        let when = |k: &mut KernelBuilder, inside: Reg<Pred>| match refill {
            Some(refill) => k.and(refill, inside),
            None => inside,
        };
        for (j, inside) in self.x_inside.iter().enumerate() {
            let shared = base.at((constant + j as u32 * pass_shared) as i64);
            let (source, offset) = self.x_passes[j];
            let global = self.x_sources[source].at(offset);
            let p = when(k, *inside);
            k.guard(p, |k| k.cp_async_16(shared, global));
        }
        for (j, pass) in self.weight_passes.iter().enumerate() {
            let shared = base.at((constant + g.a_bytes + j as u32 * pass_shared) as i64);
            let global = self.weight_sources[pass.source].at(pass.global_offset);
            let p = when(k, pass.inside);
            k.guard(p, |k| k.cp_async_16(shared, global));
        }
        self.advance_sources(k, g);
    }

    /// Zeroes this thread's chunks of rows past `m` / `n` in every one of `stages` stages
    /// (plain shared stores, ordered before the first `ldmatrix` by the prologue's barrier).
    fn emit_zero_outside(&self, k: &mut KernelBuilder, g: &Geometry, stages: u32) {
        let zero = k.mov::<U32>(0u32);
        let pass_shared = g.threads * CHUNK_BYTES;
        for stage in 0..stages {
            let stage_base = stage * g.stage_bytes;
            let x = self
                .x_inside
                .iter()
                .enumerate()
                .map(|(j, inside)| (stage_base + j as u32 * pass_shared, *inside));
            let w =
                self.weight_passes.iter().enumerate().map(|(j, pass)| {
                    (stage_base + g.a_bytes + j as u32 * pass_shared, pass.inside)
                });
            for (offset, inside) in x.chain(w).collect::<Vec<_>>() {
                let address = self.shared.at(offset as i64);
                k.guard(!inside, |k| {
                    k.st_vector(Store::SHARED, address, [zero; 4]);
                });
            }
        }
    }
}

fn emit_copy_setup(
    k: &mut KernelBuilder,
    spec: &GemmSpec,
    g: &Geometry,
    b: &Body,
    zero_fill: bool,
) -> CopySetup {
    let (tid, row0, col0, m, n) = (b.tid, b.row0, b.col0, b.m, b.n);
    k.comment(&format!(
        "copies: thread t moves chunk (t % {cpr}) of row t / {cpr} (+{rpp} rows per pass) of \
         each slice; rows past m / n are zero-filled",
        cpr = g.chunks_per_row,
        rpp = g.rows_per_pass
    ));
    let log_cpr = g.chunks_per_row.trailing_zeros();
    let row_in_slice = k.shr(tid, log_cpr);
    let chunk_in_row = k.and(tid, g.chunks_per_row - 1);
    let chunk_bytes = k.shl(chunk_in_row, 4u32);
    let chunk_bytes = k.cvt::<U64>(chunk_bytes);
    let swizzled = swizzled_chunk_bytes(k, tid);
    let shared = k.add(b.smem_base, swizzled);

    let x_row = k.add(row0, row_in_slice);
    let passes = g.a_rows / g.rows_per_pass;
    let (x_sources, x_passes, x_inside) = match b.gather {
        None => {
            let x_offset = k.mad_wide(x_row, g.row_bytes, chunk_bytes);
            let x_source = k.add(b.x, x_offset);
            let x_inside: Vec<Reg<Pred>> = (0..passes)
                .map(|j| {
                    let row = k.add(x_row, j * g.rows_per_pass);
                    k.setp(Cmp::Lt, row, m)
                })
                .collect();
            let pass_global = (g.rows_per_pass * g.row_bytes) as i64;
            let x_passes = (0..passes as i64).map(|j| (0, j * pass_global)).collect();
            (vec![x_source], x_passes, x_inside)
        }
        Some(gather) => {
            k.comment(&format!(
                "gathered rows: pass j's row p reads x row min(order[p], slots - 1) / {} (row \
                 0 for rows past the run); a bad order entry is caught by the epilogue",
                gather.top_k
            ));
            let last_slot = k.sub(gather.slots, 1u32);
            let mut sources = Vec::new();
            let mut inside = Vec::new();
            for j in 0..passes {
                let row = k.add(x_row, j * g.rows_per_pass);
                let row_inside = k.setp(Cmp::Lt, row, m);
                let order_address = k.mad_wide(row, 4u32, gather.order);
                let slot = k.guard(row_inside, |k| k.ld_global::<U32>(order_address));
                let slot = k.min(slot, last_slot);
                let token = k.div(slot, gather.top_k);
                let token = k.select(row_inside, token, 0u32);
                let offset = k.mad_wide(token, g.row_bytes, chunk_bytes);
                sources.push(k.add(b.x, offset));
                inside.push(row_inside);
            }
            let x_passes = (0..passes as usize).map(|j| (j, 0)).collect();
            (sources, x_passes, inside)
        }
    };
    let x_bytes = match zero_fill {
        true => x_inside
            .iter()
            .map(|inside| k.select(*inside, CHUNK_BYTES, 0u32))
            .collect(),
        false => Vec::new(),
    };

    let column = k.add(col0, row_in_slice);
    let gate_offset = k.mad_wide(column, g.row_bytes, chunk_bytes);
    let gate_source = k.add(b.weights[0], gate_offset);
    let mut weight_sources = vec![gate_source];
    if spec.epilogue == Epilogue::SwiGlu {
        match b.weights.get(1) {
            None => {
                k.comment("SwiGLU: up rows start n rows after the gate rows");
                let up_source = k.mad_wide(n, g.row_bytes, gate_source);
                weight_sources.push(up_source);
            }
            Some(&up) => {
                k.comment("SwiGLU: up rows from the expert's up weight");
                weight_sources.push(k.add(up, gate_offset));
            }
        }
    }
    let block_n = Tile::of(&spec.tile).block_n;
    let weight_passes = (0..g.b_rows / g.rows_per_pass)
        .map(|j| {
            let slice_row = j * g.rows_per_pass;
            let (source, row) = if slice_row < block_n {
                (0, slice_row)
            } else {
                (1, slice_row - block_n)
            };
            let output_column = k.add(column, row);
            let inside = k.setp(Cmp::Lt, output_column, n);
            let bytes = zero_fill.then(|| k.select(inside, CHUNK_BYTES, 0u32));
            WeightPass {
                source,
                global_offset: (row * g.row_bytes) as i64,
                inside,
                bytes,
            }
        })
        .collect();
    CopySetup {
        shared,
        x_sources,
        x_passes,
        x_inside,
        x_bytes,
        weight_sources,
        weight_passes,
    }
}

/// Per-lane `ldmatrix` addresses (stage 0) of the first 16-wide K step of a slice.
///
/// K step `s` of a slice is chunk `2s` further along the row, and its swizzled address is
/// that of step 0 XOR `32·s` bytes: the chunk is `row · cpr + h + 2s` with `h` ∈ {0, 1}
/// and `h + 2s < cpr`, so `h + 2s = h | 2s`, and the swizzle's XOR term
/// `(chunk >> 3) & 7` does not depend on `s` (it is `row & 7` for `cpr` = 8 and
/// `(row >> 1) & 7` for `cpr` = 4). Every base added to these offsets (shared window,
/// warp rows, the weight's start, stages, m-tile rows) is a multiple of 128 bytes, so the
/// XOR commutes with those additions: one `xor` per step replaces a register per step.
struct FragmentSetup {
    /// `x` fragments of the warp's first m tile; m tile `i` is `+i·16` rows.
    a: Reg<U32>,
    /// Weight fragments of the warp's first 16 weight rows.
    b: Reg<U32>,
}

fn emit_fragment_setup(
    k: &mut KernelBuilder,
    g: &Geometry,
    lane: Reg<U32>,
    warp_m: Reg<U32>,
    warp_n: Reg<U32>,
    smem_base: Reg<U32>,
) -> FragmentSetup {
    k.comment(
        "ldmatrix addresses: x matrices (rows 0-7 | 8-15) x (k 0-7 | 8-15); weight matrices \
         (k 0-7 | 8-15) x (rows 0-7 | 8-15)",
    );
    let cpr = g.chunks_per_row;
    let row_bytes_in_slice = cpr * CHUNK_BYTES;
    // x: lane l points at row l % 16, chunk l / 16.
    let a_row = k.and(lane, 15u32);
    let a_half = k.shr(lane, 4u32);
    // weight: lane l points at row (l % 8) + 8·(l / 16), chunk (l / 8) % 2.
    let b_low = k.and(lane, 7u32);
    let b_high = k.shr(lane, 4u32);
    let b_row = k.mul_add(b_high, 8u32, b_low);
    let b_eighth = k.shr(lane, 3u32);
    let b_half = k.and(b_eighth, 1u32);

    let a_warp = k.mul(warp_m, g.warp_rows * row_bytes_in_slice);
    let a_base = k.add(smem_base, a_warp);
    let b_warp = k.mul(warp_n, g.warp_cols * row_bytes_in_slice);
    let b_warp = k.add(b_warp, g.a_bytes);
    let b_base = k.add(smem_base, b_warp);

    let a_first = k.mul(a_row, cpr);
    let a_first = k.add(a_first, a_half);
    let b_first = k.mul(b_row, cpr);
    let b_first = k.add(b_first, b_half);
    let a_bytes = swizzled_chunk_bytes(k, a_first);
    let b_bytes = swizzled_chunk_bytes(k, b_first);
    FragmentSetup {
        a: k.add(a_base, a_bytes),
        b: k.add(b_base, b_bytes),
    }
}

/// Multiplies the slice in the stage at `read_offset` into the accumulators
/// ([`Pipeline::Basic`]: per K step, its fragments then its `mma`).
fn emit_slice_product(
    k: &mut KernelBuilder,
    spec: &GemmSpec,
    g: &Geometry,
    frag: &FragmentSetup,
    read_offset: Reg<U32>,
    acc: &[Vec<Vec<[Reg<F32>; 4]>>],
) {
    for step in 0..g.k_steps {
        k.comment(&format!(
            "K step {step}: fragments, then the warp tile's mma"
        ));
        let f = load_fragments(k, spec, g, frag, read_offset, step);
        mma_step(k, spec, acc, &f);
    }
}

/// Two packed 16-bit values of `dtype` as f32, low half first.
fn unpack_to_f32(k: &mut KernelBuilder, dtype: DType, bits: Reg<B32>) -> [Reg<F32>; 2] {
    match dtype {
        DType::BF16 => {
            let pair = k.bitcast::<BF16x2>(bits);
            let (lo, hi) = k.unpack(pair);
            [k.cvt::<F32>(lo), k.cvt::<F32>(hi)]
        }
        _ => {
            let pair = k.bitcast::<F16x2>(bits);
            let (lo, hi) = k.unpack(pair);
            [k.cvt::<F32>(lo), k.cvt::<F32>(hi)]
        }
    }
}

/// Two f32 rounded to `dtype` and packed, `lo` in the low half.
pub(crate) fn pack_from_f32(
    k: &mut KernelBuilder,
    dtype: DType,
    lo: Reg<F32>,
    hi: Reg<F32>,
) -> Reg<B32> {
    match dtype {
        DType::BF16 => {
            let pair = k.cvt_pack_bf16x2(lo, hi);
            k.bitcast::<B32>(pair)
        }
        _ => {
            let pair = k.cvt_pack_f16x2(lo, hi);
            k.bitcast::<B32>(pair)
        }
    }
}

#[allow(clippy::needless_range_loop)]
fn emit_epilogue(
    k: &mut KernelBuilder,
    spec: &GemmSpec,
    g: &Geometry,
    acc: &[Vec<Vec<[Reg<F32>; 4]>>],
    b: &Body,
) {
    let (lane, warp_m, warp_n, row0, col0, m, n, out, extra) = (
        b.lane, b.warp_m, b.warp_n, b.row0, b.col0, b.m, b.n, b.out, b.extra,
    );
    // Grouped SwiGLU rounds gate and up to the dtype before the activation, as the
    // reference (`kiln_ir::interp`'s `swiglu_ffn`) does.
    let round_inputs = spec.grouping.is_some() && spec.epilogue == Epilogue::SwiGlu;
    k.comment(&format!(
        "epilogue ({}): lane (g, t) = (lane / 4, lane % 4) owns rows g, g + 8 and columns \
         2t, 2t + 1 of each 16x8 tile; rows >= m and columns >= n are not stored",
        spec.epilogue.name()
    ));
    let expr = spec.epilogue.expr();
    let group = k.shr(lane, 2u32);
    let quad = k.and(lane, 3u32);
    let warp_row = k.mul_add(warp_m, g.warp_rows, row0);
    let row_first = k.add(warp_row, group);
    let warp_col = k.mul_add(warp_n, g.warp_cols, col0);
    let quad_col = k.shl(quad, 1u32);
    let col_first = k.add(warp_col, quad_col);
    let col_bytes = k.mul_wide(col_first, ELEMENT_BYTES);
    let out_base = k.add(out, col_bytes);
    let extra_base = extra.map(|p| k.add(p, col_bytes));
    let out_row_bytes = k.shl(n, 1u32);
    let column_inside: Vec<Reg<Pred>> = (0..g.n_tiles)
        .map(|j| {
            let col = k.add(col_first, 8 * j);
            k.setp(Cmp::Lt, col, n)
        })
        .collect();

    let bias: Vec<[Reg<F32>; 2]> = match (spec.epilogue, extra_base) {
        (Epilogue::Bias, Some(base)) => {
            k.comment("bias[col], bias[col + 1] per n tile");
            (0..g.n_tiles as usize)
                .map(|j| {
                    let bits = k.guard(column_inside[j], |k| {
                        k.ld_global::<B32>(base.at(16 * j as i64))
                    });
                    unpack_to_f32(k, spec.dtype, bits)
                })
                .collect()
        }
        _ => Vec::new(),
    };

    for i in 0..g.m_tiles as usize {
        for half in 0..2usize {
            let row = k.add(row_first, (16 * i + 8 * half) as u32);
            let row_inside = k.setp(Cmp::Lt, row, m);
            let valid = b.gather.map(|gather| {
                k.comment("an order entry outside 0..slots makes the row NaN");
                let order_address = k.mad_wide(row, 4u32, gather.order);
                let slot = k.guard(row_inside, |k| k.ld_global::<U32>(order_address));
                k.setp(Cmp::Lt, slot, gather.slots)
            });
            let out_row = k.mad_wide(row, out_row_bytes, out_base);
            let residual_row = match (spec.epilogue, extra_base) {
                (Epilogue::Residual, Some(base)) => Some(k.mad_wide(row, out_row_bytes, base)),
                _ => None,
            };
            for j in 0..g.n_tiles as usize {
                let inside = k.and(row_inside, column_inside[j]);
                let offset = 16 * j as i64;
                // The epilogue's second input per element: up, bias or residual.
                let second: Option<[Reg<F32>; 2]> = match spec.epilogue {
                    Epilogue::None => None,
                    Epilogue::SwiGlu => Some([acc[1][i][j][2 * half], acc[1][i][j][2 * half + 1]]),
                    Epilogue::Bias => Some(bias[j]),
                    Epilogue::Residual => residual_row.map(|base| {
                        let bits = k.guard(inside, |k| k.ld_global::<B32>(base.at(offset)));
                        unpack_to_f32(k, spec.dtype, bits)
                    }),
                };
                let first = [acc[0][i][j][2 * half], acc[0][i][j][2 * half + 1]];
                let (first, second) = match (round_inputs, second) {
                    (true, Some(second)) => (
                        vector::round_pair_to_dtype(k, spec.dtype, first[0], first[1]),
                        Some(vector::round_pair_to_dtype(
                            k, spec.dtype, second[0], second[1],
                        )),
                    ),
                    _ => (first, second),
                };
                let mut results: [Reg<F32>; 2] = std::array::from_fn(|e| {
                    let mut inputs = vec![first[e]];
                    inputs.extend(second.map(|s| s[e]));
                    lower_expr(k, &expr, &inputs)
                });
                if let Some(valid) = valid {
                    for result in &mut results {
                        *result = k.select::<F32>(valid, *result, f32::NAN);
                    }
                }
                let packed = pack_from_f32(k, spec.dtype, results[0], results[1]);
                k.guard(inside, |k| k.st(Store::GLOBAL, out_row.at(offset), packed));
            }
        }
    }
}
