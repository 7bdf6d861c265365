//! A typed PTX builder and a deterministic, readable printer.
//!
//! A kernel generator creates a [`KernelBuilder`], declares parameters (device pointers,
//! then `u32`/`f32` scalars), emits instructions through typed methods — each returns
//! fresh [`Reg`]isters of a declared type — and calls [`KernelBuilder::finish`] with a
//! [`LaunchRule`](crate::kernel::LaunchRule) to get a [`GpuKernel`](crate::kernel::GpuKernel).
//! The same calls always print byte-identical PTX: registers are numbered per type in
//! creation order, labels by a counter, constants as exact hex immediates.
//!
//! Files, one idea each:
//! - `types`: register type markers, [`Reg`], [`Operand`], [`Guard`], [`Mem`], capability
//!   traits;
//! - `builder`: [`KernelBuilder`] state, parameters, special registers, shared memory,
//!   labels, structured control flow, [`KernelBuilder::finish`];
//! - `arithmetic`, `convert`, `memory`, `warp`, `tensor_core`: instruction families;
//! - `printer`: the text layout;
//! - `lower_expr`: the elementwise [`Expr`](crate::expr::Expr) IR lowered to `f32` PTX.
//!
//! This module knows PTX, not machine learning: kernel families live in `kiln-kernels`.

mod arithmetic;
mod builder;
mod convert;
mod lower_expr;
mod memory;
mod printer;
mod tensor_core;
mod types;
mod warp;

pub use arithmetic::Cmp;
pub use builder::{Axis, KernelBuilder, Label, SharedArray, Special};
pub use convert::{BitcastInto, ExactInto, Round, RoundInto};
pub use lower_expr::lower_expr;
pub use memory::{L1Eviction, L2Prefetch, Load, LoadCache, Narrow, Space, Store, StoreCache};
pub use types::{
    f32_immediate, AtomicAdd, AtomicBits, AtomicMinMax, BF16x2, Bits32, Bitwise, Comparable,
    Convertible, ExactFrom, F16x2, Float, Guard, IeeeFloat, Immediate, Integer, Mem, Numeric,
    Operand, Pair, Pred, Reg, RegClass, RegType, RoundFrom, Scalar, Signed, B16, B32, B64, BF16,
    F16, F32, F64, S32, U32, U64,
};
pub use warp::{Shuffle, WarpReduce};

use std::fmt;
use std::str::FromStr;

/// The GPU architecture a kernel is written for (`.target`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// Ampere A100: the portable baseline (cp.async, mma.sync, ldmatrix).
    Sm80,
    /// Ampere consumer parts.
    Sm86,
    /// Ada.
    Sm89,
    /// Hopper, without the architecture-specific instructions.
    Sm90,
    /// Hopper with its architecture-specific instructions (`wgmma`, `setmaxnreg`); such
    /// code runs on sm_90 only.
    Sm90a,
}

impl Target {
    /// The `.target` spelling, also the ptxas `-arch` value: `sm_80`, `sm_90a`.
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Sm80 => "sm_80",
            Target::Sm86 => "sm_86",
            Target::Sm89 => "sm_89",
            Target::Sm90 => "sm_90",
            Target::Sm90a => "sm_90a",
        }
    }

    /// The compute capability as a number: 80, 86, 89, 90 (also for sm_90a).
    pub fn sm(self) -> u32 {
        match self {
            Target::Sm80 => 80,
            Target::Sm86 => 86,
            Target::Sm89 => 89,
            Target::Sm90 | Target::Sm90a => 90,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a string does not name a PTX target.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseTargetError {
    #[error("unknown PTX target `{name}` (expected sm_80, sm_86, sm_89, sm_90 or sm_90a)")]
    Unknown { name: String },
}

impl FromStr for Target {
    type Err = ParseTargetError;

    fn from_str(s: &str) -> Result<Target, ParseTargetError> {
        match s {
            "sm_80" => Ok(Target::Sm80),
            "sm_86" => Ok(Target::Sm86),
            "sm_89" => Ok(Target::Sm89),
            "sm_90" => Ok(Target::Sm90),
            "sm_90a" => Ok(Target::Sm90a),
            other => Err(ParseTargetError::Unknown {
                name: other.to_string(),
            }),
        }
    }
}
