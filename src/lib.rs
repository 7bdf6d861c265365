//! # kiln — a compiler-style kernel generation framework for LLM inference
//!
//! The root crate ties the pipeline together for users: model loading ([`model_source`]),
//! the reference generation loop ([`generate`]) and model reports ([`inspect`]). The `kiln`
//! binary (`src/main.rs`) is a thin command-line layer over these modules.
//!
//! The crates below it, in pipeline order: `kiln-ir` (tensor IR, interpreter, models),
//! `kiln-codegen` (PTX and Cranelift builders), `kiln-kernels` (kernel generators) and
//! `kiln-runtime` (devices, plans, execution).

pub mod generate;
pub mod inspect;
pub mod model_source;

pub use kiln_ir as ir;
