//! # kiln-runtime — running compiled kernels
//!
//! This crate owns everything that touches a device at run time: the cudarc device and
//! streams, typed buffers and host↔device copies, the PTX module JIT cache, launches that bind
//! arguments by the roles a kernel spec declares, CUDA-event timing, the Cranelift JIT and
//! thread pool, the plan executor, the paged KV cache and the Fiddler orchestrator.
//!
//! It must never build PTX text or kernel code itself: it receives that from `kiln-kernels`.
//! With no GPU or no driver, every entry point must return a clear error, never panic.
//!
//! Implemented so far:
//! - [`cuda`]: CUDA devices, typed buffers, the PTX module cache, launches bound by parameter
//!   name, and CUDA-event timing.

pub mod cpu;
pub mod cuda;
pub mod exec;
pub mod kv;
