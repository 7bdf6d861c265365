//! The one error type of `runtime::cuda`: what failed, for which kernel or call, and what to
//! do about it.
//!
//! Owns [`CudaError`] and the helper that wraps cudarc's `DriverError` with context. It must
//! not call the driver itself: formatting an error never touches CUDA, except for cudarc's
//! own text of a driver error, which exists only when a driver was loaded.

use super::bind::GeometryError;
use cudarc::driver::{sys::CUresult, DriverError};
use kiln_codegen::kernel::LaunchRuleError;

/// Everything that can go wrong in `runtime::cuda`.
///
/// Each message names the kernel, parameter or driver call involved and ends with what to do.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// `libcuda` could not be loaded: no NVIDIA driver on this machine.
    #[error(
        "no CUDA driver found: looked for {} on the library search path. Install the NVIDIA \
         driver (it provides libcuda.so.1) or add the directory holding libcuda to \
         LD_LIBRARY_PATH; on a machine without a GPU, use the CPU path instead",
        summarize(looked_for)
    )]
    NoDriver {
        /// The library names tried, in order.
        looked_for: Vec<String>,
    },

    /// The driver loaded, but there is no device with this ordinal.
    #[error(
        "no CUDA device {ordinal}: the driver reports {count} device(s); pick an ordinal below \
         {count}, or check CUDA_VISIBLE_DEVICES and nvidia-smi"
    )]
    NoDevice {
        /// The device ordinal.
        ordinal: usize,
        /// How many devices the driver reports.
        count: usize,
    },

    /// A CUDA driver call failed.
    #[error("{call}{} failed: {source}; {}", for_kernel(kernel), hint(source))]
    Driver {
        /// The operation, such as `cuModuleLoadData` or `copy host to device`.
        call: String,
        /// The kernel involved, when there is one.
        kernel: Option<String>,
        /// The driver's error code.
        #[source]
        source: DriverError,
    },

    /// A declared kernel parameter was given no argument.
    #[error(
        "kernel `{kernel}`: parameter `{param}` ({kind}) has no argument; the kernel declares \
         [{declared}]: add `{param}` to the Args"
    )]
    MissingArgument {
        /// The kernel's entry name.
        kernel: String,
        /// The parameter's name.
        param: String,
        /// What the parameter takes.
        kind: String,
        /// The declared parameters, as `name: kind, …`.
        declared: String,
    },

    /// An argument names no parameter of the kernel.
    #[error(
        "kernel `{kernel}` has no parameter `{name}`; it declares [{declared}]: remove the \
         argument or fix its name"
    )]
    UnexpectedArgument {
        /// The kernel's entry name.
        kernel: String,
        /// The argument name given.
        name: String,
        /// The declared parameters, as `name: kind, …`.
        declared: String,
    },

    /// An argument of the wrong kind: a buffer for a scalar, a `u32` for an `f32`, ….
    #[error(
        "kernel `{kernel}`: parameter `{param}` is {expected} but was given {given}: pass {expected}"
    )]
    ArgumentKind {
        /// The kernel's entry name.
        kernel: String,
        /// The parameter's name.
        param: String,
        /// What the parameter takes.
        expected: String,
        /// What was given.
        given: String,
    },

    /// A buffer argument that lives on another `CudaDevice`.
    #[error(
        "kernel `{kernel}`: the buffer for parameter `{param}` belongs to another CudaDevice; \
         copy it to this device first"
    )]
    WrongDevice {
        /// The kernel's entry name.
        kernel: String,
        /// The parameter's name.
        param: String,
    },

    /// The kernel's launch rule could not be evaluated with the given scalars.
    #[error("kernel `{kernel}`: {message}; pass every u32 scalar the launch rule names")]
    LaunchRule {
        /// The kernel's entry name.
        kernel: String,
        /// What the launch rule reported.
        #[source]
        message: LaunchRuleError,
    },

    /// The evaluated launch geometry is not launchable.
    #[error("kernel `{kernel}`: {reason}; fix the kernel's launch rule or the scalars given")]
    LaunchGeometry {
        /// The kernel's entry name.
        kernel: String,
        /// What is wrong.
        #[source]
        reason: GeometryError,
    },

    /// The kernel was generated for an architecture this device cannot run.
    #[error(
        "kernel `{kernel}` targets {target}, but device {ordinal} ({name}) is sm_{major}{minor}; \
         generate it for this device's architecture or run it on a newer GPU"
    )]
    Target {
        /// The kernel's entry name.
        kernel: String,
        /// The kernel's PTX target.
        target: String,
        /// The device ordinal.
        ordinal: usize,
        /// The device name.
        name: String,
        /// The device's compute capability, major part.
        major: i32,
        /// The device's compute capability, minor part.
        minor: i32,
    },

    /// PTX text the driver cannot be handed (such as one with a NUL byte).
    #[error("kernel `{kernel}`: {reason}; this is a bug in the generator that produced it")]
    InvalidKernel {
        /// The kernel's entry name.
        kernel: String,
        /// What is wrong.
        reason: String,
    },

    /// A copy between buffers of different lengths.
    #[error(
        "{op}: the device buffer holds {expected} elements but the other side has {got}; copy \
         between buffers of equal length"
    )]
    LengthMismatch {
        /// The copy attempted.
        op: &'static str,
        /// Elements in the device buffer.
        expected: usize,
        /// Elements on the other side.
        got: usize,
    },

    /// A caller-side mistake in a request that is not about a kernel.
    #[error("{0}")]
    InvalidRequest(String),
}

impl CudaError {
    /// Wraps a driver error with the call that failed.
    pub(crate) fn driver(call: impl Into<String>) -> impl FnOnce(DriverError) -> CudaError {
        let call = call.into();
        move |source| CudaError::Driver {
            call,
            kernel: None,
            source,
        }
    }

    /// Wraps a driver error with the call that failed and the kernel it was for.
    pub(crate) fn driver_for(
        call: impl Into<String>,
        kernel: &str,
    ) -> impl FnOnce(DriverError) -> CudaError {
        let call = call.into();
        let kernel = kernel.to_string();
        move |source| CudaError::Driver {
            call,
            kernel: Some(kernel),
            source,
        }
    }
}

/// The plain `libcuda.so*` names in full, the other variants cudarc tries as a count.
fn summarize(names: &[String]) -> String {
    let (plain, other): (Vec<&String>, Vec<&String>) =
        names.iter().partition(|n| n.starts_with("libcuda.so"));
    let mut text = plain
        .iter()
        .map(|n| n.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if !other.is_empty() {
        if !text.is_empty() {
            text.push_str(" and ");
        }
        text.push_str(&format!(
            "{} other variants (libcuda64_12.so, …)",
            other.len()
        ));
    }
    text
}

fn for_kernel(kernel: &Option<String>) -> String {
    match kernel {
        Some(name) => format!(" for kernel `{name}`"),
        None => String::new(),
    }
}

/// What to do about a driver error, by its code.
fn hint(error: &DriverError) -> &'static str {
    match error.0 {
        CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
            "the device is out of memory: free buffers or use smaller sizes"
        }
        CUresult::CUDA_ERROR_INVALID_PTX | CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION => {
            "the driver cannot compile this PTX: assemble it with ptxas to see the error, and \
             check its .version against the driver"
        }
        CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU => {
            "the PTX .target does not match this device: generate it for this architecture"
        }
        CUresult::CUDA_ERROR_NOT_FOUND => {
            "the PTX has no .entry of that name: check GpuKernel::entry against the PTX"
        }
        CUresult::CUDA_ERROR_ILLEGAL_ADDRESS
        | CUresult::CUDA_ERROR_MISALIGNED_ADDRESS
        | CUresult::CUDA_ERROR_LAUNCH_FAILED => {
            "a kernel faulted (out-of-bounds or misaligned access): rerun under \
             compute-sanitizer; the CUDA context is now unusable and the process must restart"
        }
        CUresult::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES => {
            "the block needs more registers or shared memory than an SM has: use fewer threads \
             per block or less shared memory"
        }
        CUresult::CUDA_ERROR_INVALID_VALUE => {
            "the driver rejected an argument: check launch geometry, shared memory size and \
             buffer sizes"
        }
        CUresult::CUDA_ERROR_NO_DEVICE => {
            "the driver sees no GPU: check nvidia-smi and CUDA_VISIBLE_DEVICES"
        }
        _ => "look the code up in the CUDA driver API documentation",
    }
}
