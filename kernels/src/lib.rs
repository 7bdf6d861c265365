//! # kiln-kernels — one generator per kernel family
//!
//! This crate will own the kernel generators, each parameterised by a serialisable spec
//! (dtype, head_dim, page size, tile sizes, GQA group, …) and emitting code through
//! `kiln-codegen`'s builders: `gemm`, `attention`, `quest`, `atom`, `moe`, `cpu` (experts and
//! elementwise maps on the CPU) and `admm` (the near-isometric-embedding operators).
//!
//! It must not touch a device: loading and launching belong to `kiln-runtime`. Every kernel a
//! generator emits is tested against `kiln_ir::interp`, the project's single reference.
//!
//! Nothing is implemented yet; see the PTX/runtime and CPU-backend issues.
