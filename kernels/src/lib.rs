//! # kiln-kernels — one generator per kernel family
//!
//! Each family lives in its own module and turns a serialisable spec (dtype, sizes, tile
//! shapes, epilogue, …) into a [`GpuKernel`](kiln_codegen::kernel::GpuKernel) through
//! `kiln-codegen`'s PTX builder. Every generated kernel is tested against `kiln_ir::interp`,
//! the project's single reference, on a GPU (root `tests/gpu_*.rs`), and assembled by ptxas
//! for sm_80 and sm_90 in CI (`kernels/tests/`).
//!
//! This crate must not touch a device: loading and launching belong to `kiln-runtime`.

pub mod admm;
pub mod attention;
pub mod cpu_step;
pub mod elementwise;
pub mod epilogue;
pub mod error;
pub mod gemm;
pub mod gemv;
pub mod kv_append;
pub mod lower;
pub mod moe;
pub mod quest;
pub mod rms_norm;
pub mod rope;
pub mod row_copy;
pub mod step_launches;

pub use epilogue::Epilogue;
pub use error::SpecError;

mod reduce;
mod vector;
