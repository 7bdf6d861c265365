//! MoE dispatch: the slots (`token · top_k + j`) sorted by their chosen expert, stably, and
//! where each expert's run starts (`kiln_ir::op::Op::MoeDispatch`), computed on the device
//! so that no host round trip sits between the router and the expert FFN.
//!
//! Input `experts[s]` is slot `s`'s expert. Outputs: `order`, the slots in (expert, slot)
//! order, and `offsets`, `experts + 1` values with expert `e`'s slots at positions
//! `offsets[e]..offsets[e + 1]` of `order`, exactly the interpreter's result. A slot whose
//! expert is outside `0..experts` (negative ones included: compared as unsigned) is placed
//! nowhere — the interpreter reports it as an error — so `offsets[experts]` counts only the
//! valid slots and the tail `order[offsets[experts]..slots]` is filled with −1.
//!
//! Parameters: `experts` (read, i32 `[slots]`), `order` (write, i32 `[slots]`), `offsets`
//! (write, i32 `[experts + 1]`); scalar `slots` (below 2³¹).
//!
//! Launch: one block of [`THREADS`] threads (grid 1), so the whole sort is one launch with
//! no global synchronisation. Expert `e` is owned by thread `e mod 256`. Pass 1 counts each
//! expert's slots into shared memory (`red.shared.add`; counts do not depend on the order of
//! the additions); thread 0 turns the counts into offsets with a serial prefix sum (written
//! to `offsets` and kept in shared memory as each expert's next position); pass 2 stages the
//! slots' experts into shared memory one tile of 256 slots at a time, and each owner walks
//! every tile in slot order, writing its experts' slots at their next positions. The result
//! does not depend on the thread count or on scheduling. Meant for decode-sized inputs
//! (pass 2 reads every slot once per thread from shared memory); correct for any `slots`.
//! This file generates PTX; it must not launch anything.

use crate::SpecError;
use kiln_codegen::kernel::{Access, Extent, GpuKernel, LaunchRule};
use kiln_codegen::ptx::{Cmp, KernelBuilder, Load, Space, Target, U32};
use serde::{Deserialize, Serialize};

const FAMILY: &str = "moe_dispatch";
/// Threads of the single block (a power of two).
pub const THREADS: u32 = 256;
/// The most experts: one shared-memory count each.
pub const MAX_EXPERTS: usize = 1024;

/// An MoE dispatch kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MoeDispatchSpec {
    /// Number of experts, `1..=1024`.
    pub experts: usize,
}

impl MoeDispatchSpec {
    /// The kernel entry name: `moe_dispatch_e8`.
    pub fn entry(&self) -> String {
        format!("moe_dispatch_e{}", self.experts)
    }

    /// Why the generator cannot build this spec, naming the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.experts == 0 || self.experts > MAX_EXPERTS {
            return Err(SpecError::new(
                FAMILY,
                format!("experts must be 1..={MAX_EXPERTS}, got {}", self.experts),
            ));
        }
        Ok(())
    }
}

/// Generates the dispatch kernel for `spec`.
pub fn generate(spec: &MoeDispatchSpec) -> Result<GpuKernel, SpecError> {
    spec.validate()?;
    let experts = spec.experts as u32;
    let load = Load::GLOBAL.non_coherent();

    let mut k = KernelBuilder::new(&spec.entry(), Target::Sm80);
    let chosen = k.param_pointer("experts", Access::Read);
    let order = k.param_pointer("order", Access::Write);
    let offsets = k.param_pointer("offsets", Access::Write);
    let slots = k.param_u32("slots");

    // counts[e] (then expert e's next position) for e < experts; counts[experts] = total.
    let counts = k.shared_array("counts", 4 * (experts + 1), 16);
    let tile = k.shared_array("tile", 4 * THREADS, 16);
    let counts_base = k.shared_address(&counts);
    let tile_base = k.shared_address(&tile);
    let tid = k.tid_x();

    k.comment("pass 1: count each expert's slots (out-of-range experts count nowhere)");
    k.for_range(tid, experts, THREADS, |k, e| {
        let address = k.mul_add(e, 4u32, counts_base);
        let zero = k.mov::<U32>(0u32);
        k.st_shared(address, zero);
    });
    k.bar_sync(0);
    k.for_range(tid, slots, THREADS, |k, s| {
        let source = k.mad_wide(s, 4u32, chosen);
        let expert = k.ld::<U32>(load, source);
        let valid = k.setp(Cmp::Lt, expert, experts);
        k.if_then(valid, |k| {
            let address = k.mul_add(expert, 4u32, counts_base);
            k.red_add::<U32>(Space::Shared, address, 1u32);
        });
    });
    k.bar_sync(0);

    k.comment("offsets: thread 0's serial prefix sum over the counts");
    let is_first = k.setp(Cmp::Eq, tid, 0u32);
    k.if_then(is_first, |k| {
        let running = k.mov::<U32>(0u32);
        k.for_range(0u32, experts, 1u32, |k, e| {
            let address = k.mul_add(e, 4u32, counts_base);
            let count = k.ld_shared::<U32>(address);
            k.st_shared(address, running);
            let destination = k.mad_wide(e, 4u32, offsets);
            k.st_global(destination, running);
            let next = k.add(running, count);
            k.assign(running, next);
        });
        k.st_shared(counts.at(4 * experts as i64), running);
        k.st_global(offsets.at(4 * experts as i64), running);
    });
    k.bar_sync(0);

    k.comment("the tail past the valid slots: -1");
    let total = k.ld_shared::<U32>(counts.at(4 * experts as i64));
    let tail_start = k.add(total, tid);
    k.for_range(tail_start, slots, THREADS, |k, p| {
        let destination = k.mad_wide(p, 4u32, order);
        let none = k.mov::<U32>(u32::MAX);
        k.st_global(destination, none);
    });

    k.comment(
        "pass 2: tiles of slots in order; the owner of each slot's expert places it at the\n\
         expert's next position",
    );
    let my_tile_slot = k.mul_add(tid, 4u32, tile_base);
    let mask = THREADS - 1;
    k.for_range(0u32, slots, THREADS, |k, tile_start| {
        let s = k.add(tile_start, tid);
        let in_range = k.setp(Cmp::Lt, s, slots);
        let expert = k.mov::<U32>(u32::MAX);
        k.if_then(in_range, |k| {
            let source = k.mad_wide(s, 4u32, chosen);
            let loaded = k.ld::<U32>(load, source);
            k.assign(expert, loaded);
        });
        k.st_shared(my_tile_slot, expert);
        k.bar_sync(0);
        let remaining = k.sub(slots, tile_start);
        let count = k.min(remaining, THREADS);
        k.for_range(0u32, count, 1u32, |k, r| {
            let entry = k.mul_add(r, 4u32, tile_base);
            let expert = k.ld_shared::<U32>(entry);
            let owner = k.and(expert, mask);
            let mine = k.setp(Cmp::Eq, owner, tid);
            let valid = k.setp(Cmp::Lt, expert, experts);
            let place = k.and(mine, valid);
            k.if_then(place, |k| {
                let cursor = k.mul_add(expert, 4u32, counts_base);
                let position = k.ld_shared::<U32>(cursor);
                let destination = k.mad_wide(position, 4u32, order);
                let slot = k.add(tile_start, r);
                k.st_global(destination, slot);
                let next = k.add(position, 1u32);
                k.st_shared(cursor, next);
            });
        });
        k.comment("every thread is done with this tile before the next overwrites it");
        k.bar_sync(0);
    });
    Ok(k.finish(LaunchRule::linear(Extent::fixed(1), THREADS)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_parameters() {
        let spec = MoeDispatchSpec { experts: 8 };
        assert_eq!(spec.entry(), "moe_dispatch_e8");
        let kernel = generate(&spec).unwrap();
        let names: Vec<_> = kernel.params.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["experts", "order", "offsets", "slots"]);
        assert_eq!(kernel.launch.grid[0], Extent::fixed(1));
    }

    #[test]
    fn bad_specs_are_refused_naming_the_field() {
        for experts in [0, MAX_EXPERTS + 1] {
            let err = generate(&MoeDispatchSpec { experts })
                .unwrap_err()
                .to_string();
            assert!(err.contains("experts"), "{err}");
        }
    }
}
