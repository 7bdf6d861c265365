//! The errors of plan execution: what failed, naming the tensor, kernel or graph involved.

use crate::cuda::CudaError;

/// Why a plan could not run.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The plan places kernels on the GPU but no device was given.
    #[error(
        "plan `{graph}` has {gpu_kernels} GPU kernel(s) but no CUDA device was given; open a \
         device, or compile the plan for the CPU (`--device cpu`)"
    )]
    NoDevice { graph: String, gpu_kernels: usize },
    /// A weight, input or state tensor the plan reads was not given.
    #[error("the {kind} tensor `{name}` was not given")]
    MissingTensor { name: String, kind: &'static str },
    /// A given tensor has the wrong dtype or shape.
    #[error("tensor `{name}`: {message}")]
    BadTensor { name: String, message: String },
    /// A step on the host whose op has no CPU kernel.
    #[error("kernel {kernel}: `{op}` has no CPU kernel, so it cannot run on the host")]
    NoCpuKernel { kernel: String, op: String },
    /// A kernel could not be lowered or evaluated.
    #[error("kernel {kernel}: {message}")]
    Kernel { kernel: String, message: String },
    /// Running prebuilt kernels, a launch needs a spec they do not have.
    #[error(
        "kernel {kernel}: {origin} has no prebuilt kernel for spec {spec}; compile the \
         artifact for these shapes (batch, prompt length) or run the model directly"
    )]
    NotPrebuilt {
        kernel: String,
        spec: String,
        origin: String,
    },
    /// A launch was rejected by the binding checks or the driver.
    #[error("launching {kernel}: {source}")]
    Launch {
        kernel: String,
        #[source]
        source: Box<CudaError>,
    },
    /// A device call failed.
    #[error(transparent)]
    Cuda(Box<CudaError>),
    /// An inconsistency in the plan itself (a bug in the scheduler or the executor).
    #[error("internal plan error: {0}")]
    Internal(String),
}

impl From<CudaError> for ExecError {
    fn from(error: CudaError) -> ExecError {
        ExecError::Cuda(Box::new(error))
    }
}
