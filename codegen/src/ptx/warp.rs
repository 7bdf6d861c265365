//! Synchronisation and warp-level communication: `bar.sync`, `fence.acq_rel.gpu`,
//! `shfl.sync` and a butterfly all-reduce built from it.
//!
//! Shuffles exchange 32-bit values across the full warp (member mask `0xffffffff`); every
//! lane of the warp must execute them. No memory access here (the fence only orders it).

use super::builder::KernelBuilder;
use super::types::{Bits32, Numeric, Operand, Reg, U32};

/// The lane pattern of a shuffle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shuffle {
    /// `.bfly`: lane `i` reads lane `i ^ b`.
    Butterfly,
    /// `.down`: lane `i` reads lane `i + b` (its own value past the end).
    Down,
    /// `.up`: lane `i` reads lane `i - b` (its own value before the start).
    Up,
    /// `.idx`: every lane reads lane `b`.
    Index,
}

impl Shuffle {
    fn ptx(self) -> &'static str {
        match self {
            Shuffle::Butterfly => "bfly",
            Shuffle::Down => "down",
            Shuffle::Up => "up",
            Shuffle::Index => "idx",
        }
    }

    /// The `c` operand for a full 32-lane segment: the lane clamp `31` except for `.up`,
    /// whose lower bound is `0`.
    fn clamp(self) -> u32 {
        match self {
            Shuffle::Up => 0,
            _ => 31,
        }
    }
}

/// The combining operation of [`KernelBuilder::warp_all_reduce`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WarpReduce {
    Sum,
    Max,
    Min,
}

impl KernelBuilder {
    /// `bar.sync id`: waits for every thread of the block at barrier `id` (0 is the usual
    /// `__syncthreads`).
    pub fn bar_sync(&mut self, id: u32) {
        self.emit(format!("bar.sync {id}"));
    }

    /// `fence.acq_rel.gpu`: orders this thread's memory accesses before the fence against
    /// those after it for every thread of the GPU (release and acquire; with `bar.sync`
    /// it publishes the whole block's prior writes, e.g. before an atomic that signals them).
    pub fn fence_acq_rel_gpu(&mut self) {
        self.require_sm(70, "fence.acq_rel.gpu");
        self.emit("fence.acq_rel.gpu".to_string());
    }

    /// `bar.sync id, threads`: a named barrier for `threads` threads (a multiple of 32).
    pub fn bar_sync_count(&mut self, id: u32, threads: u32) {
        assert!(
            threads.is_multiple_of(32) && threads > 0,
            "bar.sync {id}, {threads}: the thread count must be a positive multiple of 32"
        );
        self.emit(format!("bar.sync {id}, {threads}"));
    }

    /// `shfl.sync.<mode>.b32 d, value, b, c, 0xffffffff` across the full warp.
    pub fn shfl<T: Bits32>(
        &mut self,
        mode: Shuffle,
        value: Reg<T>,
        lane_or_offset: impl Into<Operand<U32>>,
    ) -> Reg<T> {
        let b = lane_or_offset.into();
        let d = self.reg::<T>();
        self.emit(format!(
            "shfl.sync.{}.b32 {d}, {value}, {b}, {}, 0xffffffff",
            mode.ptx(),
            mode.clamp()
        ));
        d
    }

    /// `shfl.sync.bfly.b32`: the value of lane `lane ^ lane_mask`.
    pub fn shfl_bfly<T: Bits32>(&mut self, value: Reg<T>, lane_mask: u32) -> Reg<T> {
        self.shfl(Shuffle::Butterfly, value, lane_mask)
    }

    /// `shfl.sync.down.b32`: the value of lane `lane + delta`.
    pub fn shfl_down<T: Bits32>(&mut self, value: Reg<T>, delta: u32) -> Reg<T> {
        self.shfl(Shuffle::Down, value, delta)
    }

    /// `shfl.sync.idx.b32`: the value of lane `source_lane` (a broadcast).
    pub fn shfl_idx<T: Bits32>(
        &mut self,
        value: Reg<T>,
        source_lane: impl Into<Operand<U32>>,
    ) -> Reg<T> {
        self.shfl(Shuffle::Index, value, source_lane)
    }

    /// Combines `value` across the 32 lanes of the warp with butterfly shuffles (offsets
    /// 16, 8, 4, 2, 1); every lane gets the result.
    pub fn warp_all_reduce<T: Bits32 + Numeric>(
        &mut self,
        value: Reg<T>,
        operation: WarpReduce,
    ) -> Reg<T> {
        let mut acc = value;
        for lane_mask in [16, 8, 4, 2, 1] {
            let other = self.shfl_bfly(acc, lane_mask);
            acc = match operation {
                WarpReduce::Sum => self.add(acc, other),
                WarpReduce::Max => self.max(acc, other),
                WarpReduce::Min => self.min(acc, other),
            };
        }
        acc
    }
}
