//! Errors of the CPU runtime. Owns only the error type.

use kiln_codegen::cpu::CpuCodegenError;

/// Why a CPU kernel could not be compiled or run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuError {
    /// The kernel spec is invalid (the generator refused it).
    #[error(transparent)]
    Codegen(#[from] CpuCodegenError),
    /// The host ISA is not supported by Cranelift, or its settings were rejected.
    #[error("host CPU not supported by the Cranelift JIT: {0}")]
    Host(String),
    /// Cranelift failed to compile or link a generated function (a generator bug).
    #[error("Cranelift could not compile {spec}: {message}")]
    Compile { spec: String, message: String },
    /// An operand does not match what the kernel expects (length, format or count).
    #[error("operand `{operand}`: {message}")]
    Operand { operand: String, message: String },
}

impl CpuError {
    pub(crate) fn operand(operand: impl Into<String>, message: impl Into<String>) -> CpuError {
        CpuError::Operand {
            operand: operand.into(),
            message: message.into(),
        }
    }
}
