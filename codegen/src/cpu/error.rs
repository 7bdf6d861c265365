//! Errors of the CPU code generator. Owns only the error type; builds nothing.

/// Why a CPU kernel could not be generated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuCodegenError {
    /// The spec asks for something the generator cannot or will not produce.
    #[error("invalid CPU kernel spec: {0}")]
    InvalidSpec(String),
}
