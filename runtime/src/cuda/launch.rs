//! Launching a loaded kernel with arguments bound by name.
//!
//! Owns [`LoadedKernel::launch`] and [`CudaDevice::launch`]: bind (see `bind.rs`), opt in to
//! large dynamic shared memory when the launch rule asks for it, push the arguments in the
//! kernel's declared order, and queue the launch on the device's stream. It does not wait for
//! the kernel (see [`CudaDevice::synchronize`]) and must not build or inspect PTX.

use super::bind::{bind, ArgValue, Args, BoundLaunch, GeometryError};
use super::device::CudaDevice;
use super::error::CudaError;
use super::module_cache::LoadedKernel;
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{LaunchConfig, PushKernelArg};
use kiln_codegen::kernel::GpuKernel;
use std::sync::atomic::Ordering;

/// Dynamic shared memory a block may use without opting in.
const DEFAULT_SHARED_BYTES: u32 = 48 << 10;

impl LoadedKernel {
    /// Binds `args` to the kernel's parameters by name and queues the launch; returns the
    /// binding (argument values and geometry) that was launched.
    ///
    /// The launch is asynchronous: a fault inside the kernel is reported by a later
    /// synchronizing call such as [`CudaDevice::synchronize`] or a copy to the host.
    pub fn launch(&self, args: &Args<'_>) -> Result<BoundLaunch, CudaError> {
        let bound = bind(&self.kernel, args, self.device)?;
        self.opt_in_shared(bound.geometry.shared_bytes)?;
        let g = bound.geometry;
        let config = LaunchConfig {
            grid_dim: (g.grid[0], g.grid[1], g.grid[2]),
            block_dim: (g.block[0], g.block[1], g.block[2]),
            shared_mem_bytes: g.shared_bytes,
        };
        let mut builder = self.stream.launch_builder(&self.function);
        for value in &bound.values {
            match value {
                ArgValue::Pointer(ptr) => builder.arg(ptr),
                ArgValue::U32(v) => builder.arg(v),
                ArgValue::F32(v) => builder.arg(v),
            };
        }
        // SAFETY: `bind` checked that every declared parameter gets a value of its declared
        // kind (`.u64` pointer, `.u32`, `.f32`), pushed in declaration order, and that every
        // pointer is a buffer borrowed from this device for the duration of this call; the
        // device's single stream orders any later free after this launch. What the kernel
        // does with its buffers is the generator's contract, checked by the GPU tests.
        unsafe { builder.launch(config) }
            .map_err(CudaError::driver_for("cuLaunchKernel", &self.kernel.entry))?;
        Ok(bound)
    }

    /// Raises the function's dynamic shared memory limit when a launch needs more than the
    /// default 48 KiB, once per size.
    fn opt_in_shared(&self, bytes: u32) -> Result<(), CudaError> {
        if bytes <= DEFAULT_SHARED_BYTES || bytes <= self.shared_opt_in.load(Ordering::Relaxed) {
            return Ok(());
        }
        if bytes > self.max_shared_bytes {
            return Err(CudaError::LaunchGeometry {
                kernel: self.kernel.entry.clone(),
                reason: GeometryError::SharedMemory {
                    bytes,
                    limit: self.max_shared_bytes,
                },
            });
        }
        self.function
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .map_err(CudaError::driver_for(
                "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)",
                &self.kernel.entry,
            ))?;
        self.shared_opt_in.fetch_max(bytes, Ordering::Relaxed);
        Ok(())
    }
}

impl CudaDevice {
    /// Loads `kernel` (cached by its PTX hash) and launches it with `args`.
    ///
    /// This hashes the PTX text on every call; in a loop, [`CudaDevice::load`] once and call
    /// [`LoadedKernel::launch`].
    pub fn launch(&self, kernel: &GpuKernel, args: &Args<'_>) -> Result<BoundLaunch, CudaError> {
        self.load(kernel)?.launch(args)
    }
}
