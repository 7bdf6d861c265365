//! Block-wide reductions shared by generators: a sum over all threads of a block, returned
//! to every thread. Deterministic (fixed order: lanes by butterfly shuffles, then warps in
//! index order). Emits PTX into the caller's builder; owns no kernel.

use kiln_codegen::ptx::{Cmp, KernelBuilder, Reg, WarpReduce, F32, U32};

/// The sum of `value` over the `threads` threads of the block (a multiple of 32), in every
/// thread. Uses a shared array of one f32 per warp and one `bar.sync 0`; the caller must not
/// rely on barrier 0 being free around the call.
pub fn block_sum(
    k: &mut KernelBuilder,
    value: Reg<F32>,
    threads: u32,
    tid: Reg<U32>,
    name: &str,
) -> Reg<F32> {
    let warps = threads / 32;
    let warp_sum = k.warp_all_reduce(value, WarpReduce::Sum);
    if warps == 1 {
        return warp_sum;
    }
    k.comment("block reduction: one partial sum per warp through shared memory");
    let partials = k.shared_array(name, 4 * warps, 16);
    let base = k.shared_address(&partials);
    let lane = k.and(tid, 31u32);
    let warp = k.shr(tid, 5u32);
    let is_first_lane = k.setp(Cmp::Eq, lane, 0u32);
    let slot = k.mul_add(warp, 4u32, base);
    k.guard(is_first_lane, |k| k.st_shared(slot, warp_sum));
    k.bar_sync(0);
    let total = k.ld_shared::<F32>(base);
    for w in 1..warps {
        let partial = k.ld_shared::<F32>(base.at(4 * w as i64));
        let sum = k.add(total, partial);
        k.assign(total, sum);
    }
    total
}
