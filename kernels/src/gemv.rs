//! Decode GEMV: `out[M, N] = epilogue(x[M, K] · weight[N, K]ᵀ)` for `M = 1..=16`, f16 or
//! bf16 storage, f32 accumulation, output in the input dtype.
//!
//! At decode sizes the product is bound by streaming `weight` from device memory once
//! (`N·K·2` bytes; `x` is `M·K·2` bytes and stays in L1), so the kernel is organised around
//! the weight stream:
//!
//! - **Rows per warp.** Warp `w` of the grid owns output columns
//!   `w·rows_per_warp .. (w+1)·rows_per_warp` (weight rows `n`, and `N + n` for SwiGLU's up
//!   half). Its 32 lanes split `K`: in chunk `c` (256 elements, 512 bytes of a row) lane `l`
//!   reads elements `c·256 + 8l .. c·256 + 8l + 8` with one 16-byte
//!   `ld.global.nc.L1::no_allocate.v4.u32`, so a warp's access to a row is 512 contiguous
//!   bytes and the weights never displace `x` from L1.
//! - **Loads in flight.** One iteration of the run-time K loop covers `unroll` chunks; every
//!   weight load of the iteration (`rows · accumulators · unroll` of 16 bytes per lane) is
//!   issued before the first is used. Chunks left over (`(K/256) mod unroll`) run once more,
//!   unrolled, after the loop.
//! - **x reuse.** Lane `l` reads the same 16 bytes of each `x` row for every weight row of
//!   its warp (`ld.global.nc.L1::evict_last.v4.u32`, L1 hits after the first warp of an SM),
//!   converts them to f32 once per chunk and uses them for all rows of the warp.
//! - **Arithmetic.** f16 pairs widen with `cvt.f32.f16`, bf16 pairs with a shift and a mask
//!   (bf16 is the top half of an f32); products accumulate in f32 `fma.rn`, in up to four
//!   partial sums per accumulator when few accumulators would otherwise form one long
//!   dependency chain. `M` and `K` are compile-time, so every accumulator is a register.
//! - **Reduction and epilogue.** A butterfly shuffle reduction leaves each sum in every
//!   lane; lane 0 applies the epilogue (`Epilogue::expr` through `lower_expr`), rounds to
//!   the dtype and stores. No atomics, no split-K: each output element is written by exactly
//!   one warp, so results are deterministic.
//!
//! A warp whose rows run past `n` reads its last valid row in their place and stores nothing
//! for them. Parameters: pointers `x` `[M, K]`, `weight` `[N, K]` (`[2N, K]` for SwiGLU),
//! `out` `[M, N]`, then `bias` `[N]` or `residual` `[M, N]` (which may be `out` itself) as
//! the epilogue asks, then the scalar `n`. `x` and `weight` must be 16-byte aligned (device allocations are), and
//! `M · N < 2³²`. Grid: `ceil(n / (rows_per_warp · warps_per_block))` blocks of
//! `32 · warps_per_block` threads.

use kiln_codegen::kernel::{Access, Extent, GpuKernel, LaunchRule};
use kiln_codegen::ptx::{
    lower_expr, Cmp, F16x2, KernelBuilder, L1Eviction, Load, Narrow, Pred, Reg, Store, Target,
    WarpReduce, BF16, F16, F32, U32, U64,
};
use kiln_ir::dtype::DType;
use serde::{Deserialize, Serialize};

use crate::{Epilogue, SpecError};

const FAMILY: &str = "gemv";

/// Elements one lane loads per 16-byte access.
pub const LANE_ELEMENTS: usize = 8;

/// Elements of `K` one warp covers per chunk (8 per lane × 32 lanes): `K` must be a multiple.
pub const K_CHUNK: usize = LANE_ELEMENTS * 32;

/// The largest `M` (tokens) the generator accepts.
pub const MAX_M: usize = 16;

/// The largest `K` the generator accepts (keeps every constant address offset small).
pub const MAX_K: usize = 1 << 20;

/// Bytes of one chunk of a 16-bit row.
const CHUNK_BYTES: usize = K_CHUNK * 2;

/// The spec of one decode GEMV kernel.
///
/// `dtype`, `m`, `k` and `epilogue` fix what the kernel computes; `rows_per_warp`,
/// `warps_per_block` and `unroll` only how ([`GemvSpec::new`] picks them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GemvSpec {
    /// Storage type of `x`, `weight`, `out` and the epilogue operand: f16 or bf16.
    pub dtype: DType,
    /// Rows of `x` (tokens), `1..=16`; compile-time so the accumulators stay in registers.
    pub m: usize,
    /// The reduction length; a positive multiple of 256 ([`K_CHUNK`]).
    pub k: usize,
    pub epilogue: Epilogue,
    /// Output columns each warp computes (`1..=8`); a SwiGLU column reads two weight rows.
    pub rows_per_warp: usize,
    /// Warps per block (`1..=32`).
    pub warps_per_block: usize,
    /// 256-element chunks of `K` per loop iteration (`1..=16`): with `rows_per_warp` and the
    /// epilogue's accumulators it sets the 16-byte weight loads in flight per lane.
    pub unroll: usize,
}

impl GemvSpec {
    /// A spec with the default tuning: two weight rows per warp (one SwiGLU column), eight
    /// 16-byte weight loads in flight per lane for `m ≤ 4` (four above, where the
    /// accumulators need the registers), four warps per block.
    pub fn new(dtype: DType, m: usize, k: usize, epilogue: Epilogue) -> GemvSpec {
        let weight_rows = 2;
        let rows_per_warp = (weight_rows / epilogue.accumulators()).max(1);
        let loads_in_flight = if m <= 4 { 8 } else { 4 };
        GemvSpec {
            dtype,
            m,
            k,
            epilogue,
            rows_per_warp,
            warps_per_block: 4,
            unroll: (loads_in_flight / (rows_per_warp * epilogue.accumulators())).max(1),
        }
    }

    /// The same spec with other tuning knobs.
    pub fn with_tuning(self, rows_per_warp: usize, warps_per_block: usize, unroll: usize) -> Self {
        GemvSpec {
            rows_per_warp,
            warps_per_block,
            unroll,
            ..self
        }
    }

    /// Weight rows each warp streams: `rows_per_warp` times the epilogue's accumulators.
    pub fn weight_rows_per_warp(&self) -> usize {
        self.rows_per_warp * self.epilogue.accumulators()
    }

    /// Output columns per block.
    pub fn rows_per_block(&self) -> usize {
        self.rows_per_warp * self.warps_per_block
    }

    /// Bytes of weight loads each warp has in flight after issuing one loop iteration.
    pub fn bytes_in_flight_per_warp(&self) -> usize {
        self.weight_rows_per_warp() * self.unroll * 16 * 32
    }

    /// The kernel entry name, unique per spec.
    pub fn entry_name(&self) -> String {
        format!(
            "gemv_{}_m{}_k{}_{}_r{}w{}u{}",
            self.dtype.name(),
            self.m,
            self.k,
            self.epilogue.name(),
            self.rows_per_warp,
            self.warps_per_block,
            self.unroll
        )
    }

    /// Checks the spec, naming the first field out of range.
    pub fn validate(&self) -> Result<(), SpecError> {
        let error = |message: String| Err(SpecError::new(FAMILY, message));
        if !matches!(self.dtype, DType::F16 | DType::BF16) {
            return error(format!("dtype {} is not f16 or bf16", self.dtype));
        }
        if !(1..=MAX_M).contains(&self.m) {
            return error(format!("m = {} is outside 1..={MAX_M}", self.m));
        }
        if self.k == 0 || !self.k.is_multiple_of(K_CHUNK) || self.k > MAX_K {
            return error(format!(
                "k = {} is not a positive multiple of {K_CHUNK} (8 elements × 32 lanes) up \
                 to {MAX_K}",
                self.k
            ));
        }
        if !(1..=8).contains(&self.rows_per_warp) {
            return error(format!(
                "rows_per_warp = {} is outside 1..=8",
                self.rows_per_warp
            ));
        }
        if !(1..=32).contains(&self.warps_per_block) {
            return error(format!(
                "warps_per_block = {} is outside 1..=32",
                self.warps_per_block
            ));
        }
        if !(1..=16).contains(&self.unroll) {
            return error(format!("unroll = {} is outside 1..=16", self.unroll));
        }
        let accumulators = self.weight_rows_per_warp() * self.m;
        if accumulators > 64 {
            return error(format!(
                "{accumulators} accumulators per lane (rows_per_warp {} × {} per column × \
                 m {}) exceed 64",
                self.rows_per_warp,
                self.epilogue.accumulators(),
                self.m
            ));
        }
        let loads = self.weight_rows_per_warp() * self.unroll;
        if loads > 32 {
            return error(format!(
                "{loads} weight loads in flight per lane (weight rows per warp {} × unroll \
                 {}) exceed 32",
                self.weight_rows_per_warp(),
                self.unroll
            ));
        }
        Ok(())
    }
}

/// Generates the kernel for `sm_80` (it uses nothing newer and runs on Hopper as is).
pub fn generate(spec: &GemvSpec) -> Result<GpuKernel, SpecError> {
    generate_for(spec, Target::Sm80)
}

/// Generates the kernel for `target`.
pub fn generate_for(spec: &GemvSpec, target: Target) -> Result<GpuKernel, SpecError> {
    spec.validate()?;
    let mut k = KernelBuilder::new(&spec.entry_name(), target);
    // At least 512 threads per SM (at most 128 registers a thread), 384 above m = 8 (at
    // most 168): enough warps to hide the latency of the x loads and the FMA chains when
    // many accumulators want registers.
    let warps_per_sm = if spec.m <= 8 { 16 } else { 12 };
    k.min_blocks_per_sm((warps_per_sm / spec.warps_per_block as u32).max(1));
    let kernel = Gemv::new(spec, &mut k);
    kernel.emit(&mut k);
    let launch = LaunchRule::linear(
        Extent::ceil_div("n", spec.rows_per_block() as u32),
        32 * spec.warps_per_block as u32,
    );
    Ok(k.finish(launch))
}

/// The registers and sizes shared by the stages of one kernel.
struct Gemv {
    spec: GemvSpec,
    /// Weight rows per output column (2 for SwiGLU).
    accumulators: usize,
    /// Partial sums per accumulator (1, 2 or 4), to break long FMA chains.
    partials: usize,
    out: Reg<U64>,
    extra: Option<Reg<U64>>,
    n: Reg<U32>,
    lane: Reg<U32>,
    /// Per output column of the warp: its (clamped) row, and whether it is `< n`.
    rows: Vec<(Reg<U32>, Reg<Pred>)>,
    /// Per weight row of the warp (`column · accumulators + a`): the address of this lane's
    /// first 16 bytes.
    weight_rows: Vec<Reg<U64>>,
    /// `x + 16 · lane`.
    x_lane: Reg<U64>,
}

impl Gemv {
    /// Declares the parameters and computes the warp's rows and this lane's base addresses.
    fn new(spec: &GemvSpec, k: &mut KernelBuilder) -> Gemv {
        let x = k.param_pointer("x", Access::Read);
        let weight = k.param_pointer("weight", Access::Read);
        let out = k.param_pointer("out", Access::Write);
        let extra = spec
            .epilogue
            .extra_param()
            .map(|name| k.param_pointer(name, Access::Read));
        let n = k.param_u32("n");
        let accumulators = spec.epilogue.accumulators();
        let chains = spec.weight_rows_per_warp() * spec.m;
        let partials = match chains {
            1 => 4,
            2 | 3 => 2,
            _ => 1,
        };

        k.comment(&format!(
            "warp w of the grid owns output columns {r}w .. {r}w + {r}; lane l reads 16 bytes \
             at element 8l of every 256-element chunk",
            r = spec.rows_per_warp
        ));
        let tid = k.tid_x();
        let lane = k.and(tid, 31u32);
        let warp = k.shr(tid, 5u32);
        let block = k.ctaid_x();
        let global_warp = k.mul_add(block, spec.warps_per_block as u32, warp);
        let first = k.mul(global_warp, spec.rows_per_warp as u32);
        let past_end = k.setp(Cmp::Ge, first, n);
        k.guard(past_end, |k| k.ret());

        k.comment("columns past n read row n - 1 instead and store nothing");
        let last = k.sub(n, 1u32);
        let mut rows = Vec::with_capacity(spec.rows_per_warp);
        for r in 0..spec.rows_per_warp {
            let row = if r == 0 {
                first
            } else {
                k.add(first, r as u32)
            };
            let valid = k.setp(Cmp::Lt, row, n);
            let clamped = if r == 0 { row } else { k.min(row, last) };
            rows.push((clamped, valid));
        }

        k.comment(match spec.epilogue {
            Epilogue::SwiGlu => "weight rows: gate row n, up row N + n; this lane's 16 bytes",
            _ => "weight rows: row n; this lane's 16 bytes",
        });
        let lane_bytes = k.mul_wide(lane, 16u32);
        let weight_lane = k.add(weight, lane_bytes);
        let row_bytes = (spec.k * 2) as u32;
        let mut weight_rows = Vec::with_capacity(spec.weight_rows_per_warp());
        for &(row, _) in &rows {
            for a in 0..accumulators {
                let index = if a == 0 {
                    row
                } else {
                    k.mul_add(n, a as u32, row)
                };
                weight_rows.push(k.mad_wide(index, row_bytes, weight_lane));
            }
        }
        let x_lane = k.add(x, lane_bytes);
        Gemv {
            spec: *spec,
            accumulators,
            partials,
            out,
            extra,
            n,
            lane,
            rows,
            weight_rows,
            x_lane,
        }
    }

    fn emit(&self, k: &mut KernelBuilder) {
        let spec = &self.spec;
        let chunks = spec.k / K_CHUNK;
        let iterations = chunks / spec.unroll;
        let tail = chunks % spec.unroll;

        k.comment(&format!(
            "{} f32 accumulators per lane ({} weight rows x m {} x {} partial sums)",
            spec.weight_rows_per_warp() * spec.m * self.partials,
            spec.weight_rows_per_warp(),
            spec.m,
            self.partials
        ));
        // acc[weight row][m][partial]
        let acc: Vec<Vec<Vec<Reg<F32>>>> = (0..spec.weight_rows_per_warp())
            .map(|_| {
                (0..spec.m)
                    .map(|_| (0..self.partials).map(|_| k.mov::<F32>(0.0)).collect())
                    .collect()
            })
            .collect();

        if iterations > 0 {
            let step = spec.unroll * CHUNK_BYTES;
            k.comment(&format!(
                "K loop: {iterations} iterations of {} chunks; all weight loads of an \
                 iteration are issued before the first is used",
                spec.unroll
            ));
            k.for_range(
                0u32,
                (iterations * step) as u32,
                step as u32,
                |k, offset| {
                    let offset = k.cvt::<U64>(offset);
                    self.chunks(k, &acc, Some(offset), 0, spec.unroll);
                },
            );
        }
        if tail > 0 {
            k.comment(&format!("the last {tail} chunks of K, unrolled"));
            let base = iterations * spec.unroll * CHUNK_BYTES;
            self.chunks(k, &acc, None, base as i64, tail);
        }

        k.comment("sum the partial sums, then across the warp (every lane gets every sum)");
        let sums: Vec<Vec<Reg<F32>>> = acc
            .iter()
            .map(|row| {
                row.iter()
                    .map(|partials| {
                        let mut total = partials[0];
                        for &p in &partials[1..] {
                            total = k.add(total, p);
                        }
                        k.warp_all_reduce(total, WarpReduce::Sum)
                    })
                    .collect()
            })
            .collect();

        self.epilogue(k, &sums);
    }

    /// `count` chunks starting at byte `base` (plus the run-time `offset`, inside the loop)
    /// of every weight row of the warp, accumulated into `acc`.
    #[allow(clippy::needless_range_loop)] // `m` is also an address offset
    fn chunks(
        &self,
        k: &mut KernelBuilder,
        acc: &[Vec<Vec<Reg<F32>>>],
        offset: Option<Reg<U64>>,
        base: i64,
        count: usize,
    ) {
        let spec = &self.spec;
        let weight_load = Load::GLOBAL.non_coherent().l1(L1Eviction::NoAllocate);
        let x_load = Load::GLOBAL.non_coherent().l1(L1Eviction::Last);
        let at = |k: &mut KernelBuilder, pointer: Reg<U64>| match offset {
            Some(offset) => k.add(pointer, offset),
            None => pointer,
        };
        let weight_rows: Vec<Reg<U64>> = self.weight_rows.iter().map(|&p| at(k, p)).collect();
        let x_lane = at(k, self.x_lane);

        k.comment(&format!(
            "{} weight loads of 16 bytes in flight",
            count * weight_rows.len()
        ));
        let raw: Vec<Vec<[Reg<U32>; 4]>> = (0..count)
            .map(|u| {
                let chunk = base + (u * CHUNK_BYTES) as i64;
                weight_rows
                    .iter()
                    .map(|&p| k.ld_vector::<U32, 4>(weight_load, p.at(chunk)))
                    .collect()
            })
            .collect();

        for (u, raw) in raw.iter().enumerate() {
            let chunk = base + (u * CHUNK_BYTES) as i64;
            k.comment(&format!("chunk {u}: widen the weights, then each row of x"));
            let weights: Vec<[Reg<F32>; 8]> = raw
                .iter()
                .map(|&words| widen(k, spec.dtype, words))
                .collect();
            for m in 0..spec.m {
                let x_offset = chunk + (m * spec.k * 2) as i64;
                let words = k.ld_vector::<U32, 4>(x_load, x_lane.at(x_offset));
                let xs = widen(k, spec.dtype, words);
                for (row, w) in weights.iter().enumerate() {
                    for e in 0..LANE_ELEMENTS {
                        let sum = acc[row][m][e % self.partials];
                        let next = k.fma(w[e], xs[e], sum);
                        k.assign(sum, next);
                    }
                }
            }
        }
    }

    /// Lane 0 applies the epilogue to each valid column and stores `out[m, row]`.
    #[allow(clippy::needless_range_loop)] // `m` also steps the addresses
    fn epilogue(&self, k: &mut KernelBuilder, sums: &[Vec<Reg<F32>>]) {
        let spec = &self.spec;
        let expr = spec.epilogue.expr();
        k.comment(&format!(
            "epilogue `{}` and stores, by lane 0",
            spec.epilogue.name()
        ));
        let lane0 = k.setp(Cmp::Eq, self.lane, 0u32);
        // Rows of `out` (and `residual`) are `2n` bytes apart.
        let stride = k.mul_wide(self.n, 2u32);
        for (column, &(row, valid)) in self.rows.iter().enumerate() {
            let store = k.and(lane0, valid);
            k.guard(store, |k| {
                let mut out = k.mad_wide(row, 2u32, self.out);
                let mut extra = self.extra.map(|extra| k.mad_wide(row, 2u32, extra));
                for m in 0..spec.m {
                    if m > 0 {
                        out = k.add(out, stride);
                        if spec.epilogue == Epilogue::Residual {
                            extra = extra.map(|extra| k.add(extra, stride));
                        }
                    }
                    let mut inputs: Vec<Reg<F32>> = (0..self.accumulators)
                        .map(|a| sums[column * self.accumulators + a][m])
                        .collect();
                    if let Some(extra) = extra {
                        inputs.push(load_scalar(k, spec.dtype, extra));
                    }
                    let value = lower_expr(k, &expr, &inputs);
                    store_scalar(k, spec.dtype, out, value);
                }
            });
        }
    }
}

/// Eight f32 values from four words of packed f16 or bf16 pairs, low half first.
fn widen(k: &mut KernelBuilder, dtype: DType, words: [Reg<U32>; 4]) -> [Reg<F32>; 8] {
    let mut out = Vec::with_capacity(LANE_ELEMENTS);
    for word in words {
        match dtype {
            DType::F16 => {
                let pair = k.bitcast::<F16x2>(word);
                let (lo, hi) = k.unpack(pair);
                out.push(k.cvt::<F32>(lo));
                out.push(k.cvt::<F32>(hi));
            }
            _ => {
                // bf16 is the upper half of an f32.
                let lo = k.shl(word, 16u32);
                let hi = k.and(word, 0xFFFF_0000u32);
                out.push(k.bitcast::<F32>(lo));
                out.push(k.bitcast::<F32>(hi));
            }
        }
    }
    out.try_into().expect("eight values")
}

/// One 16-bit value at `address`, widened to f32. A plain (coherent) load: `residual` may
/// be the same buffer as `out` (an in-place residual add), which is safe because the lane
/// that stores an element has read it first.
fn load_scalar(k: &mut KernelBuilder, dtype: DType, address: Reg<U64>) -> Reg<F32> {
    let load = Load::GLOBAL;
    match dtype {
        DType::F16 => {
            let half = k.ld::<F16>(load, address);
            k.cvt::<F32>(half)
        }
        _ => {
            let bits = k.ld_narrow::<U32>(load, Narrow::U16, address);
            let wide = k.shl(bits, 16u32);
            k.bitcast::<F32>(wide)
        }
    }
}

/// Rounds `value` to the dtype (to nearest even) and stores it at `address`.
fn store_scalar(k: &mut KernelBuilder, dtype: DType, address: Reg<U64>, value: Reg<F32>) {
    match dtype {
        DType::F16 => {
            let half = k.cvt_rn::<F16>(value);
            k.st(Store::GLOBAL, address, half);
        }
        _ => {
            let half = k.cvt_rn::<BF16>(value);
            k.st(Store::GLOBAL, address, half);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_tuning_is_valid_for_every_m_and_epilogue() {
        for epilogue in [
            Epilogue::None,
            Epilogue::Bias,
            Epilogue::Residual,
            Epilogue::SwiGlu,
        ] {
            for m in 1..=MAX_M {
                let spec = GemvSpec::new(DType::BF16, m, 4096, epilogue);
                spec.validate().unwrap();
                assert_eq!(spec.weight_rows_per_warp(), 2);
            }
        }
    }
}
