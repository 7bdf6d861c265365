//! What the host ISA offers the CPU generators: calling convention, pointer width, and whether
//! fused multiply-add is native. Owns only that description; it must not build code.

use cranelift_codegen::ir::Type;
use cranelift_codegen::isa::{CallConv, TargetFrontendConfig, TargetIsa};

/// The target facts the generators need.
#[derive(Clone, Copy)]
pub struct CpuTarget {
    /// Calling convention and pointer width, as `FunctionBuilder::finalize` wants them.
    pub frontend: TargetFrontendConfig,
    /// Whether `fma` lowers to one instruction. Without it Cranelift would call a libm
    /// routine (or refuse vector `fma`), so the generators use `fmul` + `fadd` instead.
    pub fma: bool,
}

impl std::fmt::Debug for CpuTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuTarget")
            .field("call_conv", &self.frontend.default_call_conv)
            .field("pointer_bytes", &self.frontend.pointer_bytes())
            .field("fma", &self.fma)
            .finish()
    }
}

impl CpuTarget {
    pub fn new(frontend: TargetFrontendConfig, fma: bool) -> CpuTarget {
        CpuTarget { frontend, fma }
    }

    /// The facts of an ISA (the native one, in the JIT).
    pub fn from_isa(isa: &dyn TargetIsa) -> CpuTarget {
        CpuTarget {
            frontend: isa.frontend_config(),
            fma: isa.has_native_fma(),
        }
    }

    /// The integer type of pointers, lengths and indices.
    pub fn pointer_type(&self) -> Type {
        self.frontend.pointer_type()
    }

    pub fn call_conv(&self) -> CallConv {
        self.frontend.default_call_conv
    }
}
