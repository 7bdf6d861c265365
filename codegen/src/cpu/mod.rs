//! Cranelift lowering of CPU kernels: serialisable kernel specs in, Cranelift IR functions out.
//!
//! This module owns the *shape* of every CPU kernel kiln generates — its specification
//! ([`spec`]), its C ABI ([`spec::MapSpec::abi`], [`spec::DotSpec::abi`],
//! [`spec::RmsNormSpec::abi`], [`spec::RopeSpec::abi`]) and the Cranelift IR
//! that implements it ([`build_function`]). It must not compile, load or run code (that is
//! `kiln_runtime::cpu`, which JIT-compiles these functions with cranelift-jit), and it must
//! not know what attention or an expert is.
//!
//! Kernel families:
//! - [`map`]: `out[i] = expr(in_0[i], …, in_{n-1}[i])` over an index range, on 128-bit
//!   vectors (f32x4 / f64x2) unrolled several times, with a scalar tail;
//! - [`dot`]: `C[i, j] = alpha · Σ_k A[i, k] · B[j, k] (+ beta · C[i, j])` over a row and
//!   column range of C, both operands K-contiguous ("NT"), register-blocked with several SIMD
//!   accumulators;
//! - [`rms_norm`]: row RMSNorm `x · (1/√(mean(x²) + eps)) · w`, optionally after a fused
//!   residual add (whose sum it also writes), with the sum of squares on f32x4 accumulators;
//! - [`rope`]: rotary position embedding ("rotate half" pairs) from caller-filled cos/sin
//!   tables, in f64 (interpreter-exact) or f32.
//! - [`softmax`]: in-place row softmax of `scale·x` over a per-row count of leading elements
//!   (zeros after them), the key mask of attention ([`SoftmaxSpec`]).
//! - [`int4_dot`]: `C = A · Bᵀ` with B in 4 bits per value and a scale per group along K
//!   (Atom's and Fiddler's int4 weights, [`Int4DotSpec`]).
//!
//! Building blocks: [`target`] (what the host ISA offers), [`simd`] (scalar/vector value
//! helpers), [`load`] (element formats → compute lanes; the one place where narrow formats
//! are unpacked), [`exp`] (the exponential in Cranelift IR), [`lower_expr`] (the
//! elementwise [`Expr`](crate::expr::Expr) IR to Cranelift values), [`loops`] (counted
//! loops).
//!
//! ```
//! use cranelift_codegen::settings;
//! use kiln_codegen::cpu::{build_function, CpuKernelSpec, CpuTarget, ElemType, MapSpec};
//! use kiln_codegen::expr::Expr;
//!
//! let isa = cranelift_native::builder()
//!     .unwrap()
//!     .finish(settings::Flags::new(settings::builder()))
//!     .unwrap();
//! let target = CpuTarget::from_isa(&*isa);
//! // silu(x0) · x1 over f32 slices: the SwiGLU activation
//! let spec = CpuKernelSpec::Map(MapSpec::new(Expr::input(0).silu() * Expr::input(1), 2, ElemType::F32));
//! let function = build_function(&spec, &target).unwrap();
//! assert!(function.display().to_string().contains("f32x4"));
//! ```

pub mod dot;
pub mod error;
pub mod exp;
pub mod int4_dot;
pub mod int4_dot_spec;
pub mod load;
pub mod loops;
pub mod lower_expr;
pub mod map;
pub mod rms_norm;
pub mod rope;
pub mod simd;
pub mod softmax;
pub mod softmax_spec;
pub mod spec;
pub mod target;

pub use error::CpuCodegenError;
pub use int4_dot_spec::Int4DotSpec;
pub use softmax_spec::SoftmaxSpec;
pub use spec::{CpuKernelSpec, DotSpec, ElemType, ElementFormat, MapSpec, RmsNormSpec, RopeSpec};
pub use target::CpuTarget;

use cranelift_codegen::ir::{Function, Signature, UserFuncName};

/// The C ABI signature of the kernel `spec` describes, for `target`.
pub fn signature(spec: &CpuKernelSpec, target: &CpuTarget) -> Signature {
    match spec {
        CpuKernelSpec::Map(_) => map::signature(target),
        CpuKernelSpec::Dot(_) => dot::signature(target),
        CpuKernelSpec::RmsNorm(_) => rms_norm::signature(target),
        CpuKernelSpec::Rope(_) => rope::signature(target),
        CpuKernelSpec::Softmax(_) => softmax::signature(target),
        CpuKernelSpec::Int4Dot(_) => int4_dot::signature(target),
    }
}

/// Builds the Cranelift IR function of the kernel `spec` describes, for `target`.
///
/// The spec is validated first; the function is named with the default user name (the JIT
/// renames it). The result passes the Cranelift verifier (checked by the runtime's JIT).
pub fn build_function(
    spec: &CpuKernelSpec,
    target: &CpuTarget,
) -> Result<Function, CpuCodegenError> {
    spec.validate()?;
    let mut function =
        Function::with_name_signature(UserFuncName::default(), signature(spec, target));
    match spec {
        CpuKernelSpec::Map(map) => map::build(map, target, &mut function),
        CpuKernelSpec::Dot(dot) => dot::build(dot, target, &mut function),
        CpuKernelSpec::RmsNorm(norm) => rms_norm::build(norm, target, &mut function),
        CpuKernelSpec::Rope(rope) => rope::build(rope, target, &mut function),
        CpuKernelSpec::Softmax(softmax) => softmax::build(softmax, target, &mut function),
        CpuKernelSpec::Int4Dot(spec) => int4_dot::build(spec, target, &mut function),
    }
    Ok(function)
}

/// A signature of the given C ABI parameters.
fn abi_signature(params: &[spec::AbiParam], target: &CpuTarget) -> Signature {
    let mut signature = Signature::new(target.call_conv());
    for (_, ty) in params {
        let ty = match ty {
            spec::AbiType::Pointer | spec::AbiType::Usize => target.pointer_type(),
            spec::AbiType::F64 => cranelift_codegen::ir::types::F64,
        };
        signature
            .params
            .push(cranelift_codegen::ir::AbiParam::new(ty));
    }
    signature
}
