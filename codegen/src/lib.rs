//! # kiln-codegen — target-independent code generation
//!
//! This crate will own the machinery that turns kernel descriptions into code, with no
//! knowledge of machine learning:
//!
//! - `ptx`: a typed PTX builder and a deterministic, readable printer (registers of declared
//!   types, shared memory, `cp.async`, `ldmatrix`, `mma.sync`, warp shuffles, …);
//! - `expr`: the elementwise expression IR used for fused prologues and epilogues, lowered to
//!   PTX and to Cranelift;
//! - `cpu`: Cranelift function-building helpers (128-bit SIMD, several accumulators);
//! - `ptxas`: a driver that assembles generated PTX for validation in tests.
//!
//! It must not know what attention or a MoE layer is: kernel families live in `kiln-kernels`,
//! and nothing here touches a device (that is `kiln-runtime`).
//!
//! Nothing is implemented yet; see the PTX/runtime issue.
