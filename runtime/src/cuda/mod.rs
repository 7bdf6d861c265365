//! # runtime::cuda — CUDA devices, buffers, modules, launches and timing, over cudarc
//!
//! The layer between generated [`GpuKernel`](kiln_codegen::kernel::GpuKernel)s and the
//! driver. One file per idea:
//!
//! - `device`: driver detection, [`CudaDevice`] (a context, one stream, a module cache) and
//!   [`DeviceInfo`];
//! - `element`: the element types buffers may hold ([`Element`], [`ElemType`]) and their
//!   poison values;
//! - `buffer`: [`DeviceBuffer`] and [`PinnedBuffer`], and copies;
//! - `module_cache`: PTX modules cached per device by SHA-256 of the text, [`LoadedKernel`];
//! - `bind`: binding [`Args`] to a kernel's declared parameters by name, and the launch
//!   geometry — pure Rust, testable without a GPU;
//! - `launch`: queueing a launch;
//! - `timing`: CUDA events and [`CudaDevice::time`];
//! - `error`: [`CudaError`].
//!
//! ```ignore
//! let device = CudaDevice::open(0)?;                     // NoDriver error, never a panic
//! let x = DeviceBuffer::from_host(&device, &input)?;
//! let y = DeviceBuffer::<f32>::poisoned(&device, input.len())?;
//! let kernel = device.load(&gpu_kernel)?;                // cached by PTX hash
//! let args = Args::new().buffer("x", &x).buffer("y", &y).u32("n", input.len() as u32);
//! kernel.launch(&args)?;                                 // bound by name, declared order
//! let out = y.to_host()?;
//! let timing = device.time(|| kernel.launch(&args).map(drop), 10, 100)?;
//! ```
//!
//! Every CUDA call goes through the one stream of its [`CudaDevice`], so work is ordered
//! without per-buffer events. This module never builds PTX.

mod bind;
mod buffer;
mod device;
mod element;
mod error;
mod launch;
mod module_cache;
mod tensor;
mod timing;

pub use bind::{
    bind, Arg, ArgValue, Args, BoundLaunch, BufferArg, DeviceId, Geometry, GeometryError,
    MAX_THREADS_PER_BLOCK,
};
pub use buffer::{DeviceBuffer, PinnedBuffer};
pub use device::{driver_library_names, driver_present, CudaDevice, DeviceInfo};
pub use element::{ElemType, Element};
pub use error::CudaError;
pub use module_cache::{LoadedKernel, ModuleCache, PtxHash};
pub use tensor::{DeviceStorage, DeviceTensor};
pub use timing::{Event, Timing};
