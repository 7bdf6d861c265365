//! # kiln-codegen — target-independent code generation
//!
//! The machinery that turns kernel descriptions into code, with no knowledge of machine
//! learning:
//!
//! - [`kernel`]: the kernel ABI (parameters with roles, launch rules) shared with the runtime;
//! - [`expr`]: the elementwise expression IR used for fused prologues and epilogues, lowered
//!   to PTX and to Cranelift;
//! - [`ptx`]: a typed PTX builder and a deterministic, readable printer, and the lowering
//!   of [`expr`] to PTX;
//! - [`ptxas`]: a driver that assembles generated PTX for validation in tests;
//! - `cpu`: Cranelift function-building helpers (128-bit SIMD, several accumulators).
//!
//! It must not know what attention or a MoE layer is: kernel families live in `kiln-kernels`,
//! and nothing here touches a device (that is `kiln-runtime`).

pub mod cpu;
pub mod expr;
pub mod kernel;
pub mod ptx;
pub mod ptxas;
