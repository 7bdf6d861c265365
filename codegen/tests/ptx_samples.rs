//! Small but real kernels written with the PTX builder: their printed PTX is snapshot-tested,
//! and each is assembled by ptxas for sm_80 and sm_90 with no register spills.
//!
//! ptxas must be installed (`bash scripts/test.sh`); these tests fail, never skip, without it.
//! Numerics need a GPU and are not checked here.

use kiln_codegen::expr::Expr;
use kiln_codegen::kernel::{Access, Extent, GpuKernel, LaunchRule, ParamKind};
use kiln_codegen::ptx::{
    lower_expr, Cmp, F16x2, KernelBuilder, Load, Narrow, Space, Store, StoreCache, Target,
    WarpReduce, B32, BF16, F16, F32, S32, U32, U64,
};
use kiln_codegen::ptxas::{self, PtxasReport};

/// out[i] = a[i] + b[i]: four elements per thread with 16-byte vector loads, and a scalar
/// loop for the last `n % 4` elements.
fn vec_add_f32(target: Target) -> GpuKernel {
    let mut k = KernelBuilder::new("vec_add_f32", target);
    let a = k.param_pointer("a", Access::Read);
    let b = k.param_pointer("b", Access::Read);
    let out = k.param_pointer("out", Access::Write);
    let n = k.param_u32("n");

    k.comment("each thread owns 4 consecutive elements starting at `first`");
    let thread = k.global_index_x();
    let first = k.shl(thread, 2u32);
    let end = k.add(first, 4u32);
    let whole = k.setp(Cmp::Le, end, n);
    k.if_else(
        whole,
        |k| {
            k.comment("whole vector: one 16-byte load per input, one 16-byte store");
            let offset = k.mul_wide(first, 4u32);
            let pa = k.add(a, offset);
            let pb = k.add(b, offset);
            let po = k.add(out, offset);
            let x = k.ld_vector::<F32, 4>(Load::GLOBAL.non_coherent(), pa);
            let y = k.ld_vector::<F32, 4>(Load::GLOBAL.non_coherent(), pb);
            let sum = [0, 1, 2, 3].map(|i| k.add(x[i], y[i]));
            k.st_vector(Store::GLOBAL.cache(StoreCache::Streaming), po, sum);
        },
        |k| {
            k.comment("scalar tail: elements first..n, fewer than 4");
            k.for_range(first, n, 1u32, |k, i| {
                let offset = k.mul_wide(i, 4u32);
                let pa = k.add(a, offset);
                let pb = k.add(b, offset);
                let po = k.add(out, offset);
                let x = k.ld_global::<F32>(pa);
                let y = k.ld_global::<F32>(pb);
                let sum = k.add(x, y);
                k.st_global(po, sum);
            });
        },
    );
    k.finish(LaunchRule::linear(Extent::ceil_div("n", 4 * 256), 256))
}

/// out[row] = Σ x[row, :]: one warp per row, a strided loop per lane, then a butterfly
/// shuffle reduction.
fn warp_row_sum(target: Target) -> GpuKernel {
    let mut k = KernelBuilder::new("warp_row_sum", target);
    let x = k.param_pointer("x", Access::Read);
    let out = k.param_pointer("out", Access::Write);
    let rows = k.param_u32("rows");
    let cols = k.param_u32("cols");

    k.comment("one warp per row; the block's only warp");
    let row = k.ctaid_x();
    let lane = k.tid_x();
    let past_end = k.setp(Cmp::Ge, row, rows);
    k.guard(past_end, |k| k.ret());
    let row_elements = k.mul_wide(row, cols);
    let row_bytes = k.shl(row_elements, 2u32);
    let row_start = k.add(x, row_bytes);

    k.comment("stage 1: each lane sums columns lane, lane + 32, ...");
    let acc = k.mov::<F32>(0.0);
    k.for_range(lane, cols, 32u32, |k, col| {
        let offset = k.mul_wide(col, 4u32);
        let p = k.add(row_start, offset);
        let value = k.ld::<F32>(Load::GLOBAL.non_coherent(), p);
        let sum = k.add(acc, value);
        k.assign(acc, sum);
    });

    k.comment("stage 2: reduce across the warp");
    let total = k.warp_all_reduce(acc, WarpReduce::Sum);

    k.comment("stage 3: lane 0 writes the row's sum");
    let is_first_lane = k.setp(Cmp::Eq, lane, 0u32);
    let out_offset = k.mul_wide(row, 4u32);
    let p = k.add(out, out_offset);
    k.guard(is_first_lane, |k| k.st_global(p, total));
    k.finish(LaunchRule::linear(Extent::ceil_div("rows", 1), 32))
}

/// The byte offset of the row lane `lane` points `ldmatrix .x4` at in an A tile of 16
/// rows × 32 bytes: matrix `lane / 8` is (rows 0-7, bytes 0-15), (rows 8-15, bytes 0-15),
/// (rows 0-7, bytes 16-31) or (rows 8-15, bytes 16-31), in the order of the A fragment.
fn a_lane_offset(k: &mut KernelBuilder, lane: Reg32) -> Reg32 {
    let row_in_matrix = k.and(lane, 7u32);
    let matrix = k.shr(lane, 3u32);
    let second_row_block = k.and(matrix, 1u32);
    let row_block_start = k.shl(second_row_block, 3u32);
    let row = k.add(row_in_matrix, row_block_start);
    let column_half = k.shr(matrix, 1u32);
    let column_bytes = k.shl(column_half, 4u32);
    k.mul_add(row, 32u32, column_bytes)
}

/// The byte offset of the row lane `lane` points `ldmatrix .x2` at in a B tile stored
/// `[n][k]` as 8 rows × 32 bytes: matrix 0 is bytes 0-15 of each row, matrix 1 bytes
/// 16-31 (lanes 16-31 repeat lanes 0-15; `.x2` ignores them).
fn b_lane_offset(k: &mut KernelBuilder, lane: Reg32) -> Reg32 {
    let row = k.and(lane, 7u32);
    let matrix = k.shr(lane, 3u32);
    let column_half = k.and(matrix, 1u32);
    let column_bytes = k.shl(column_half, 4u32);
    k.mul_add(row, 32u32, column_bytes)
}

type Reg32 = kiln_codegen::ptx::Reg<U32>;

/// One warp computes C = A·B for a 16×16 f16 A and a 16×8 f16 B (stored `[n][k]`) into
/// f32, and C8 = A8·B8 for a 16×32 s8 A8 and a 32×8 s8 B8 (stored `[n][k]`) into s32:
/// tiles copied with cp.async, fragments loaded with ldmatrix, one mma.sync each.
fn mma_tile(target: Target) -> GpuKernel {
    let mut k = KernelBuilder::new("mma_tile", target);
    let a = k.param_pointer("a", Access::Read);
    let b = k.param_pointer("b", Access::Read);
    let a8 = k.param_pointer("a8", Access::Read);
    let b8 = k.param_pointer("b8", Access::Read);
    let c = k.param_pointer("c", Access::Write);
    let c8 = k.param_pointer("c8", Access::Write);
    let tile_a = k.shared_array("tile_a", 16 * 32, 128);
    let tile_b = k.shared_array("tile_b", 8 * 32, 128);
    let tile_a8 = k.shared_array("tile_a8", 16 * 32, 128);
    let tile_b8 = k.shared_array("tile_b8", 8 * 32, 128);

    k.comment("stage 1: copy the four tiles to shared memory, 16 bytes per lane and copy");
    let lane = k.lane_id();
    let tiles = [&tile_a, &tile_b, &tile_a8, &tile_b8].map(|tile| k.shared_address(tile));
    let chunk = k.shl(lane, 4u32);
    let global_chunk = k.cvt::<U64>(chunk);
    let [to_a, to_b, to_a8, to_b8] = tiles.map(|tile| k.add(tile, chunk));
    let [from_a, from_b, from_a8, from_b8] = [a, b, a8, b8].map(|p| k.add(p, global_chunk));
    k.cp_async_16(to_a, from_a);
    k.cp_async_16(to_a8, from_a8);
    k.comment("the B tiles are 256 bytes: lanes 0-15 copy them");
    let low_half = k.setp(Cmp::Lt, lane, 16u32);
    k.guard(low_half, |k| {
        k.cp_async_16(to_b, from_b);
        k.cp_async_16(to_b8, from_b8);
    });
    k.cp_async_commit();
    k.cp_async_wait(0);
    k.bar_sync(0);

    k.comment("stage 2: fragments from shared memory");
    let a_offset = a_lane_offset(&mut k, lane);
    let b_offset = b_lane_offset(&mut k, lane);
    let [tile_a, tile_b, tile_a8, tile_b8] = tiles;
    let address_a = k.add(tile_a, a_offset);
    let address_b = k.add(tile_b, b_offset);
    let address_a8 = k.add(tile_a8, a_offset);
    let address_b8 = k.add(tile_b8, b_offset);
    let fragment_a = k.ldmatrix::<4>(address_a);
    let fragment_b = k.ldmatrix::<2>(address_b);
    let fragment_a8 = k.ldmatrix::<4>(address_a8);
    let fragment_b8 = k.ldmatrix::<2>(address_b8);

    k.comment("stage 3: one f16 and one s8 tensor-core product");
    let acc = k.splat::<F32, 4>(0.0);
    k.mma_m16n8k16_f16(acc, fragment_a, fragment_b);
    let acc8 = k.splat::<S32, 4>(0);
    k.mma_m16n8k32_s8(acc8, fragment_a8, fragment_b8);

    k.comment("stage 4: lane (g, t) = (lane / 4, lane % 4) stores C[g][2t..2t+2] and C[g+8][..]");
    let group = k.shr(lane, 2u32);
    let thread_in_group = k.and(lane, 3u32);
    let column = k.shl(thread_in_group, 1u32);
    let element = k.mul_add(group, 8u32, column);
    let offset = k.mul_wide(element, 4u32);
    let pc = k.add(c, offset);
    let pc8 = k.add(c8, offset);
    k.st_vector(Store::GLOBAL, pc, [acc[0], acc[1]]);
    k.st_vector(Store::GLOBAL, pc.at(8 * 8 * 4), [acc[2], acc[3]]);
    k.st_vector(Store::GLOBAL, pc8, [acc8[0], acc8[1]]);
    k.st_vector(Store::GLOBAL, pc8.at(8 * 8 * 4), [acc8[2], acc8[3]]);
    k.finish(LaunchRule::linear(Extent::fixed(1), 32))
}

/// out = silu(gate) · up over f16 tensors, computed in f32 through `lower_expr`: two
/// elements per thread with 4-byte loads, one element for an odd tail.
fn silu_mul_f16(target: Target) -> GpuKernel {
    let mut k = KernelBuilder::new("silu_mul_f16", target);
    let gate = k.param_pointer("gate", Access::Read);
    let up = k.param_pointer("up", Access::Read);
    let out = k.param_pointer("out", Access::Write);
    let n = k.param_u32("n");
    let expr = Expr::input(0).silu() * Expr::input(1);

    k.comment("each thread owns the pair of elements starting at `first`");
    let pair = k.global_index_x();
    let first = k.shl(pair, 1u32);
    let offset = k.mul_wide(first, 2u32);
    let pg = k.add(gate, offset);
    let pu = k.add(up, offset);
    let po = k.add(out, offset);
    let second = k.add(first, 1u32);
    let whole = k.setp(Cmp::Lt, second, n);
    let tail = k.setp(Cmp::Lt, first, n);
    k.if_else(
        whole,
        |k| {
            k.comment("both elements: f16x2 loads, f32 math, one packed store");
            let g2 = k.ld::<F16x2>(Load::GLOBAL.non_coherent(), pg);
            let u2 = k.ld::<F16x2>(Load::GLOBAL.non_coherent(), pu);
            let (g_lo, g_hi) = k.unpack(g2);
            let (u_lo, u_hi) = k.unpack(u2);
            let mut results = Vec::new();
            for (g, u) in [(g_lo, u_lo), (g_hi, u_hi)] {
                let g = k.cvt::<F32>(g);
                let u = k.cvt::<F32>(u);
                results.push(lower_expr(k, &expr, &[g, u]));
            }
            let packed = k.cvt_pack_f16x2(results[0], results[1]);
            k.st_global(po, packed);
        },
        |k| {
            k.if_then(tail, |k| {
                k.comment("odd tail: the last element alone");
                let g = k.ld_global::<F16>(pg);
                let u = k.ld_global::<F16>(pu);
                let g = k.cvt::<F32>(g);
                let u = k.cvt::<F32>(u);
                let result = lower_expr(k, &expr, &[g, u]);
                let half = k.cvt_rn::<F16>(result);
                k.st_global(po, half);
            });
        },
    );
    k.finish(LaunchRule::linear(Extent::ceil_div("n", 2 * 128), 128))
}

/// Every remaining instruction family once, so that a typo in a rarely used form is caught
/// by ptxas: atomics, conversions, shuffles, narrow and shared accesses, bf16 packing and
/// mma, dynamic shared memory, labels and branches.
fn instruction_tour(target: Target) -> GpuKernel {
    let mut k = KernelBuilder::new("instruction_tour", target);
    let data = k.param_pointer("data", Access::ReadWrite);
    let bytes = k.param_pointer("bytes", Access::Read);
    let count = k.param_u32("count");
    let scale = k.param_f32("scale");
    let staging = k.dynamic_shared("staging", 16);
    let scratch = k.shared_array("scratch", 256, 16);

    k.comment("integer arithmetic and conversions");
    let tid = k.tid_x();
    let warp = k.shr(tid, 5u32);
    let quotient = k.div(count, 3u32);
    let remainder = k.rem(count, 3u32);
    let mixed = k.xor(quotient, remainder);
    let masked = k.or(mixed, warp);
    let inverted = k.not(masked);
    let clamped = k.min(inverted, 1000u32);
    let signed = k.bitcast::<S32>(clamped);
    let negative = k.neg(signed);
    let magnitude = k.abs(negative);
    let as_float = k.cvt_rn::<F32>(magnitude);
    let back = k.cvt_round::<S32>(as_float, kiln_codegen::ptx::Round::TowardZero);
    let unsigned_float = k.cvt_rn::<F32>(clamped);
    let wide = k.cvt::<U64>(clamped);
    let narrow = k.cvt::<U32>(wide);

    k.comment("float special functions");
    let scaled = k.mul(as_float, scale);
    let root = k.sqrt_approx(scaled);
    let exact_root = k.sqrt_rn(root);
    let log = k.lg2_approx(exact_root);
    let sine = k.sin_approx(log);
    let cosine = k.cos_approx(sine);
    let tanh = k.tanh_approx(cosine);
    let reciprocal = k.rcp_rn(tanh);
    let quotient_f = k.div_rn(reciprocal, unsigned_float);
    let fused = k.fma(quotient_f, 0.5, 0.25);
    let maximum = k.max(fused, -1.0);
    let positive = k.setp(Cmp::Gt, maximum, 0.0);
    let chosen = k.select(positive, maximum, 0.0);

    k.comment("half precision: pack, unpack, bf16 conversions");
    let h = k.cvt_rn::<F16>(chosen);
    let h2 = k.pack::<F16x2>(h, h);
    let h2_sum = k.add(h2, h2);
    let (h_lo, _h_hi) = k.unpack(h2_sum);
    let back_to_f32 = k.cvt::<F32>(h_lo);
    let bf = k.cvt_rn::<BF16>(back_to_f32);
    let bf_wide = k.cvt::<F32>(bf);
    let bf2 = k.cvt_pack_bf16x2(bf_wide, chosen);
    let bf2_bits = k.bitcast::<B32>(bf2);

    k.comment("narrow and shared accesses, shuffles");
    let byte = k.ld_narrow::<U32>(Load::GLOBAL, Narrow::U8, bytes);
    let signed_byte = k.ld_narrow::<S32>(Load::GLOBAL.non_coherent(), Narrow::S8, bytes.at(1));
    let slot = k.shl(tid, 2u32);
    let scratch_base = k.shared_address(&scratch);
    let scratch_slot = k.add(scratch_base, slot);
    k.st_shared(scratch_slot, bf2_bits);
    k.st_narrow(Store::SHARED, Narrow::U8, staging.at(0), byte);
    k.st_shared(staging.at(4), signed_byte);
    k.bar_sync_count(1, 64);
    let neighbour = k.ld_shared::<B32>(scratch_slot.at(4));
    let down = k.shfl_down(neighbour, 1);
    let broadcast = k.shfl_idx(down, 0u32);
    let maximum_lane = k.warp_all_reduce(back, WarpReduce::Max);
    let staged = k.ld_vector::<U32, 2>(Load::SHARED, &staging);

    k.comment("async copies with L1 caching and zero fill");
    k.cp_async_ca(staging.at(16), data, 8);
    k.cp_async_16_zero_fill(staging.at(32), data.at(16), staged[0]);
    k.cp_async_wait_all();
    k.bar_sync(0);

    k.comment("bf16 tensor-core product from transposed fragments");
    let fragment = k.ldmatrix_trans::<4>(scratch_base);
    let fragment_b = k.ldmatrix::<1>(scratch_base);
    let acc = k.splat::<F32, 4>(0.0);
    k.mma_m16n8k16_bf16(acc, fragment, [fragment_b[0], broadcast]);

    k.comment("atomics");
    let old = k.atom_add(Space::Global, data, acc[0]);
    k.red_add(Space::Global, data.at(4), old);
    let counter = data.at(8);
    let _ = k.atom_max(Space::Global, counter.clone(), maximum_lane);
    let _ = k.atom_min(Space::Shared, scratch.at(0), 7u32);
    let _ = k.atom_exch(Space::Global, counter.clone(), narrow);
    let _ = k.atom_cas(Space::Global, counter, 0u32, staged[1]);
    let _ = k.atom_add(Space::Shared, scratch.at(8), 1u32);

    k.comment("a hand-made retry loop with labels");
    let retry = k.new_label("retry");
    k.place_label(&retry);
    let seen = k.atom_cas(Space::Global, data.at(12), 0u32, 1u32);
    let taken = k.setp(Cmp::Ne, seen, 0u32);
    k.branch_if(taken, &retry);
    k.finish(LaunchRule {
        grid: [Extent::fixed(1), Extent::fixed(1), Extent::fixed(1)],
        block: [64, 1, 1],
        shared_bytes: 64,
    })
}

type Sample = fn(Target) -> GpuKernel;

const SAMPLES: [(&str, Sample); 5] = [
    ("vec_add_f32", vec_add_f32),
    ("warp_row_sum", warp_row_sum),
    ("mma_tile", mma_tile),
    ("silu_mul_f16", silu_mul_f16),
    ("instruction_tour", instruction_tour),
];

/// Assembles `kernel` for its target, failing the test on any ptxas error or spill.
fn assemble(kernel: &GpuKernel) -> PtxasReport {
    let report = ptxas::assemble(&kernel.ptx, &kernel.target)
        .unwrap_or_else(|e| panic!("{e}\n--- PTX ---\n{}", kernel.ptx));
    assert_eq!(report.entry, kernel.entry);
    assert!(
        !report.spills(),
        "{} spills on {}: {report:?}",
        kernel.entry,
        kernel.target
    );
    assert_eq!(report.stack_frame_bytes, 0, "{}", report.log);
    assert!(report.registers > 0);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    eprintln!(
        "{:<18} {:<7} {:>3} registers, {:>5} bytes shared, spills {}/{} bytes",
        kernel.entry,
        kernel.target,
        report.registers,
        report.shared_bytes,
        report.spill_store_bytes,
        report.spill_load_bytes
    );
    report
}

#[test]
fn ptxas_is_installed() {
    let path = ptxas::require_ptxas().unwrap_or_else(|e| panic!("{e}"));
    assert!(path.is_file());
}

#[test]
fn samples_assemble_for_sm80_and_sm90_without_spills() {
    for (_, build) in SAMPLES {
        for target in [Target::Sm80, Target::Sm90] {
            assemble(&build(target));
        }
    }
}

#[test]
fn samples_assemble_for_sm90a() {
    for (_, build) in SAMPLES {
        assemble(&build(Target::Sm90a));
    }
}

#[test]
fn shared_memory_is_reported_as_declared() {
    let report = assemble(&mma_tile(Target::Sm80));
    assert_eq!(report.shared_bytes, 3 * 512);
    assert_eq!(report.barriers, 1);
}

#[test]
fn sample_ptx_snapshots() {
    for (name, build) in SAMPLES {
        insta::assert_snapshot!(name, build(Target::Sm80).ptx);
    }
}

#[test]
fn building_twice_gives_identical_kernels() {
    for (name, build) in SAMPLES {
        for target in [Target::Sm80, Target::Sm90a] {
            assert_eq!(build(target), build(target), "{name} on {target}");
        }
    }
}

#[test]
fn targets_change_only_the_target_line() {
    let sm80 = vec_add_f32(Target::Sm80);
    let sm90 = vec_add_f32(Target::Sm90);
    assert_eq!(sm90.target, "sm_90");
    assert_eq!(sm80.ptx.replace(".target sm_80", ".target sm_90"), sm90.ptx);
}

#[test]
fn samples_describe_their_parameters_for_the_runtime() {
    let kernel = mma_tile(Target::Sm80);
    let names: Vec<&str> = kernel.params.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "a8", "b8", "c", "c8"]);
    assert_eq!(
        kernel.param("c8").map(|(i, p)| (i, p.kind)),
        Some((5, ParamKind::Pointer(Access::Write)))
    );
    let tour = instruction_tour(Target::Sm80);
    let kinds: Vec<ParamKind> = tour.params.iter().map(|p| p.kind).collect();
    assert_eq!(
        kinds,
        [
            ParamKind::Pointer(Access::ReadWrite),
            ParamKind::Pointer(Access::Read),
            ParamKind::U32,
            ParamKind::F32
        ]
    );
    assert_eq!(tour.launch.shared_bytes, 64);
}
