//! # kiln — a compiler-style kernel generation framework for LLM inference
//!
//! The root crate ties the pipeline together for users: model loading ([`model_source`]),
//! the reference generation loop ([`generate`]) and model reports ([`inspect`]). The `kiln`
//! binary (`src/main.rs`) is a thin command-line layer over these modules.
//!
//! The crates below it, in pipeline order: `kiln-ir` (tensor IR, interpreter, rewrites,
//! passes, schedule), `kiln-models` (model configs and presets, the graph builder, weight
//! loading), `kiln-codegen` (PTX and Cranelift builders), `kiln-kernels` (kernel generators),
//! `kiln-runtime` (devices, plans, execution) and `kiln-compiler` (driver and artifacts).

pub mod atom_model;
pub mod bench;
pub mod embed;
pub mod fuzzing;
pub mod generate;
pub mod inspect;
pub mod model_source;
pub mod options;
pub mod plan_runner;
pub mod sampling;

pub use kiln_compiler as compiler;
pub use kiln_ir as ir;
pub use kiln_models as models;
pub use kiln_tokenizer as tokenizer;

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so
/// that `path` is never left half-written.
pub fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    let directory = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let mut temporary = tempfile::NamedTempFile::new_in(&directory)
        .with_context(|| format!("creating a temporary file in {}", directory.display()))?;
    std::io::Write::write_all(&mut temporary, bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    temporary
        .persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
