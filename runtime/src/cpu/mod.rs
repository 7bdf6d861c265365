//! The CPU runtime: JIT compilation of `kiln_codegen::cpu` kernel specs with cranelift-jit, a
//! compiled-function cache keyed by spec (with a compilation counter), and safe, threaded
//! wrappers that check every operand before calling generated code.
//!
//! - [`jit`]: [`CpuJit`] — native ISA, `opt_level = speed`, cache, [`CpuJit::compilations`];
//! - [`map`]: [`MapKernel`], elementwise maps over element chunks;
//! - [`dot`]: [`DotKernel`], `C = alpha·A·Bᵀ + beta·C` over row × column blocks;
//! - [`int4_dot`]: [`Int4DotKernel`], `C = A·Wᵀ` with W in 4 bits and a scale per group,
//!   over column blocks;
//! - [`rms_norm`]: [`RmsNormKernel`], row RMSNorm (optionally after a fused residual add) over
//!   tasks of whole rows;
//! - [`rope`]: [`RopeKernel`], rotary position embedding over tasks of whole tokens, with the
//!   cos/sin tables ([`RopeTables`]) computed on the host;
//! - [`softmax`]: [`SoftmaxKernel`], in-place scaled row softmax over a per-row count of
//!   leading elements; [`attention`]: [`CpuAttention`], prefill and decode attention from a
//!   dot, a softmax and a dot kernel;
//! - [`element`]: which host types a kernel reads and writes; [`parallel`]: [`Parallelism`];
//! - [`vector_state`]: the `vzeroupper` every call into generated code is preceded by.
//!
//! It must not build kernel IR (that is `kiln_codegen::cpu`). A length, format or count
//! mismatch is a [`CpuError`] naming the operand, never undefined behaviour.

pub mod attention;
pub mod dot;
pub mod element;
pub mod error;
pub mod int4_dot;
pub mod jit;
pub mod map;
pub mod parallel;
pub mod rms_norm;
pub mod rope;
pub mod softmax;
pub mod vector_state;

pub use attention::{AttentionShape, CpuAttention};
pub use dot::{DotKernel, DotShape};
pub use element::{Element, Float};
pub use error::CpuError;
pub use int4_dot::Int4DotKernel;
pub use jit::{CompiledFn, CpuJit};
pub use map::MapKernel;
pub use parallel::Parallelism;
pub use rms_norm::RmsNormKernel;
pub use rope::{RopeKernel, RopeTables};
pub use softmax::{SoftmaxKernel, SoftmaxShape};
pub use vector_state::clear_upper_vector_state;
