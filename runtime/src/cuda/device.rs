//! Opening a CUDA device: driver detection, the context and stream, and device facts.
//!
//! Owns [`CudaDevice`] (one context, one stream, one module cache) and [`DeviceInfo`]. The
//! driver is looked for before any other cudarc call, because cudarc panics when `libcuda`
//! is missing; this file must keep that order. It does not copy data, load modules or
//! launch: see `buffer.rs`, `module_cache.rs` and `launch.rs`.

use super::bind::DeviceId;
use super::error::CudaError;
use super::module_cache::ModuleCache;
use cudarc::driver::sys::{self, CUdevice_attribute};
use cudarc::driver::{CudaContext, CudaStream};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// The library names cudarc tries when it loads the driver, in order, without repeats.
pub fn driver_library_names() -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for name in ["cuda", "nvcuda"]
        .iter()
        .flat_map(|lib| cudarc::get_lib_name_candidates(lib))
    {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// Whether the CUDA driver library (`libcuda`) can be loaded. Checked once per process.
pub fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: `is_culib_present` only tries to dlopen the candidate names and closes them.
    *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() })
}

/// Facts about a device, for bench reports and launch checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device ordinal it was opened with.
    pub ordinal: usize,
    /// The marketing name, such as `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// `(major, minor)`, such as `(9, 0)` for H100.
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors.
    pub sm_count: u32,
    /// Device memory in bytes.
    pub total_memory_bytes: usize,
    /// L2 cache in bytes.
    pub l2_cache_bytes: u32,
    /// The most dynamic + static shared memory a block may use after opting in.
    pub max_shared_bytes_per_block: u32,
    /// The driver's CUDA version, such as `13000` for 13.0.
    pub driver_version: i32,
}

impl fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (major, minor) = self.compute_capability;
        write!(
            f,
            "{} (device {}, sm_{major}{minor}, {} SMs, {:.1} GiB, L2 {} MiB, driver CUDA {}.{})",
            self.name,
            self.ordinal,
            self.sm_count,
            self.total_memory_bytes as f64 / (1u64 << 30) as f64,
            self.l2_cache_bytes >> 20,
            self.driver_version / 1000,
            (self.driver_version % 1000) / 10,
        )
    }
}

/// One CUDA device as kiln uses it: a context, one stream on which every copy, launch and
/// event of this device is ordered, and a cache of loaded PTX modules.
///
/// Because all work is ordered on one stream, cudarc's per-buffer event tracking is turned
/// off: a buffer freed right after a launch is freed in stream order, after the launch.
/// Buffers remember which `CudaDevice` made them, and a launch rejects buffers of another.
#[derive(Debug)]
pub struct CudaDevice {
    pub(crate) id: DeviceId,
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) modules: ModuleCache,
    info: DeviceInfo,
}

impl CudaDevice {
    /// Whether a device can be opened here: the driver loads and reports at least one GPU.
    pub fn is_available() -> bool {
        driver_present() && CudaContext::device_count().is_ok_and(|n| n > 0)
    }

    /// Opens device `ordinal`.
    ///
    /// Without a driver this returns [`CudaError::NoDriver`] (it never panics); with a driver
    /// but no such device, [`CudaError::NoDevice`].
    pub fn open(ordinal: usize) -> Result<CudaDevice, CudaError> {
        if !driver_present() {
            return Err(CudaError::NoDriver {
                looked_for: driver_library_names(),
            });
        }
        let count =
            CudaContext::device_count().map_err(CudaError::driver("cuInit / cuDeviceGetCount"))?;
        let count = count.max(0) as usize;
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(CudaError::driver("create CUDA context"))?;
        // SAFETY: called before any buffer exists in this context; every buffer of this
        // device is used only on `stream` below, so stream order replaces event tracking.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(CudaError::driver("cuStreamCreate"))?;
        let info = query_info(&ctx)?;
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        Ok(CudaDevice {
            id: DeviceId(NEXT_ID.fetch_add(1, Ordering::Relaxed)),
            ctx,
            stream,
            modules: ModuleCache::default(),
            info,
        })
    }

    /// Facts about this device.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The identity buffers of this device carry.
    pub fn id(&self) -> DeviceId {
        self.id
    }

    /// Waits for all work queued on this device, and reports any error a kernel or an
    /// earlier asynchronous call left behind.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream
            .synchronize()
            .map_err(CudaError::driver("cuStreamSynchronize"))?;
        self.ctx.check_err().map_err(CudaError::driver(
            "an earlier asynchronous call (free, event record)",
        ))
    }

    /// The underlying cudarc stream, for work this module does not wrap yet.
    pub fn cudarc_stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

fn query_info(ctx: &Arc<CudaContext>) -> Result<DeviceInfo, CudaError> {
    let attr = |a: CUdevice_attribute| {
        ctx.attribute(a)
            .map_err(CudaError::driver(format!("cuDeviceGetAttribute({a:?})")))
    };
    let mut driver_version = 0;
    // SAFETY: the driver is loaded (checked in `open`) and writes one int.
    unsafe { sys::cuDriverGetVersion(&mut driver_version) }
        .result()
        .map_err(CudaError::driver("cuDriverGetVersion"))?;
    Ok(DeviceInfo {
        ordinal: ctx.ordinal(),
        name: ctx.name().map_err(CudaError::driver("cuDeviceGetName"))?,
        compute_capability: ctx.compute_capability().map_err(CudaError::driver(
            "cuDeviceGetAttribute(compute capability)",
        ))?,
        sm_count: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32,
        total_memory_bytes: ctx
            .total_mem()
            .map_err(CudaError::driver("cuDeviceTotalMem"))?,
        l2_cache_bytes: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as u32,
        max_shared_bytes_per_block: attr(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )? as u32,
        driver_version,
    })
}
