//! The per-device cache of loaded PTX modules, keyed by a hash of the PTX text.
//!
//! Owns [`PtxHash`], [`ModuleCache`] and [`LoadedKernel`] (a kernel's function handle plus
//! what a launch needs), and the check that a kernel's `.target` suits the device. Loading the
//! same PTX text twice returns the cached module; [`ModuleCache::loads`] counts real loads.
//! It must not build or edit PTX (that is `kiln-codegen`), and it does not launch.
//!
//! The key is SHA-256 of the PTX text: stable across processes, platforms and Rust versions
//! (unlike std's `DefaultHasher`), so the same key can name a persistent on-disk cache entry
//! later, and collisions are not a practical concern.

use super::bind::DeviceId;
use super::device::{CudaDevice, DeviceInfo};
use super::error::CudaError;
use cudarc::driver::{CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;
use kiln_codegen::kernel::GpuKernel;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// SHA-256 of a PTX text: the module cache key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PtxHash(pub [u8; 32]);

impl PtxHash {
    /// The hash of `ptx`.
    pub fn of(ptx: &str) -> PtxHash {
        PtxHash(Sha256::digest(ptx.as_bytes()).into())
    }
}

impl fmt::Display for PtxHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for PtxHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PtxHash({self})")
    }
}

/// Loaded modules of one device, by PTX hash.
#[derive(Debug, Default)]
pub struct ModuleCache {
    modules: Mutex<HashMap<PtxHash, Arc<CudaModule>>>,
    loads: AtomicUsize,
}

impl ModuleCache {
    /// How many modules were really handed to the driver (cache misses).
    pub fn loads(&self) -> usize {
        self.loads.load(Ordering::Relaxed)
    }

    /// How many distinct modules are cached.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PtxHash, Arc<CudaModule>>> {
        // A panic while holding the lock cannot leave the map half-updated: recover it.
        self.modules
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The module for `kernel`'s PTX, loading it on a miss.
    fn get_or_load(
        &self,
        device: &CudaDevice,
        kernel: &GpuKernel,
        key: PtxHash,
    ) -> Result<Arc<CudaModule>, CudaError> {
        // Hold the lock across the load so that two threads never load the same text twice.
        let mut modules = self.lock();
        if let Some(module) = modules.get(&key) {
            return Ok(module.clone());
        }
        if kernel.ptx.contains('\0') {
            return Err(CudaError::InvalidKernel {
                kernel: kernel.entry.clone(),
                reason: "the PTX text contains a NUL byte".to_string(),
            });
        }
        let module = device
            .ctx
            .load_module(Ptx::from_src(kernel.ptx.as_str()))
            .map_err(CudaError::driver_for(
                "cuModuleLoadData (JIT of the PTX)",
                &kernel.entry,
            ))?;
        self.loads.fetch_add(1, Ordering::Relaxed);
        modules.insert(key, module.clone());
        Ok(module)
    }
}

/// A kernel whose module is loaded on a device: launch it many times without rehashing its
/// PTX. Made by [`CudaDevice::load`].
#[derive(Debug)]
pub struct LoadedKernel {
    pub(crate) kernel: GpuKernel,
    pub(crate) function: CudaFunction,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) device: DeviceId,
    pub(crate) max_shared_bytes: u32,
    /// The dynamic shared memory size the function was opted in to (0: the default 48 KiB).
    pub(crate) shared_opt_in: AtomicU32,
    hash: PtxHash,
}

impl LoadedKernel {
    /// The kernel description (its `ptx` field is left empty to save memory).
    pub fn kernel(&self) -> &GpuKernel {
        &self.kernel
    }

    /// The hash of the PTX the module was loaded from.
    pub fn ptx_hash(&self) -> PtxHash {
        self.hash
    }

    /// Registers per thread, as the driver compiled it.
    pub fn registers_per_thread(&self) -> Result<i32, CudaError> {
        self.function.num_regs().map_err(CudaError::driver_for(
            "cuFuncGetAttribute(NUM_REGS)",
            &self.kernel.entry,
        ))
    }

    /// Local (spill) memory per thread in bytes.
    pub fn local_bytes_per_thread(&self) -> Result<i32, CudaError> {
        self.function
            .local_size_bytes()
            .map_err(CudaError::driver_for(
                "cuFuncGetAttribute(LOCAL_SIZE_BYTES)",
                &self.kernel.entry,
            ))
    }
}

impl CudaDevice {
    /// Loads `kernel` (from the cache when the same PTX text was loaded before) and looks up
    /// its entry point.
    ///
    /// Fails with [`CudaError::Target`] when the kernel's `.target` needs a newer (or, for
    /// `sm_XXa`, exactly another) architecture than this device's.
    pub fn load(&self, kernel: &GpuKernel) -> Result<LoadedKernel, CudaError> {
        check_target(kernel, self.info())?;
        if kernel.entry.contains('\0') {
            return Err(CudaError::InvalidKernel {
                kernel: kernel.entry.clone(),
                reason: "the entry name contains a NUL byte".to_string(),
            });
        }
        let hash = PtxHash::of(&kernel.ptx);
        let module = self.modules.get_or_load(self, kernel, hash)?;
        let function = module
            .load_function(&kernel.entry)
            .map_err(CudaError::driver_for("cuModuleGetFunction", &kernel.entry))?;
        Ok(LoadedKernel {
            kernel: GpuKernel {
                ptx: String::new(),
                ..kernel.clone()
            },
            function,
            stream: self.stream.clone(),
            device: self.id,
            max_shared_bytes: self.info().max_shared_bytes_per_block,
            shared_opt_in: AtomicU32::new(0),
            hash,
        })
    }

    /// How many PTX modules this device really loaded (cache misses).
    pub fn loads(&self) -> usize {
        self.modules.loads()
    }

    /// This device's module cache.
    pub fn module_cache(&self) -> &ModuleCache {
        &self.modules
    }
}

/// Parses `sm_XY` / `sm_XYa` / `sm_XYf` into `(XY, arch-specific)`.
fn parse_target(target: &str) -> Option<(u32, bool)> {
    let digits = target.strip_prefix("sm_")?;
    let (digits, specific) = match digits.strip_suffix(['a', 'f']) {
        Some(d) => (d, true),
        None => (digits, false),
    };
    Some((digits.parse().ok()?, specific))
}

/// Checks that a device of `info`'s compute capability can run `kernel`'s PTX target. A
/// target kiln does not recognise is left to the driver.
pub(crate) fn check_target(kernel: &GpuKernel, info: &DeviceInfo) -> Result<(), CudaError> {
    let Some((arch, specific)) = parse_target(&kernel.target) else {
        return Ok(());
    };
    let (major, minor) = info.compute_capability;
    let device_arch = (major * 10 + minor) as u32;
    let runs = if specific {
        // `sm_90a` runs only on 9.0; `sm_100f` on the same major family. Require the same
        // major and at least the minor: the driver has the last word.
        arch / 10 == major as u32 && device_arch >= arch
    } else {
        device_arch >= arch
    };
    if runs {
        Ok(())
    } else {
        Err(CudaError::Target {
            kernel: kernel.entry.clone(),
            target: kernel.target.clone(),
            ordinal: info.ordinal,
            name: info.name.clone(),
            major,
            minor,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_codegen::kernel::{Extent, LaunchRule};

    fn info(cc: (i32, i32)) -> DeviceInfo {
        DeviceInfo {
            ordinal: 0,
            name: "test GPU".to_string(),
            compute_capability: cc,
            sm_count: 1,
            total_memory_bytes: 0,
            l2_cache_bytes: 0,
            max_shared_bytes_per_block: 48 << 10,
            driver_version: 13000,
        }
    }

    fn kernel(target: &str) -> GpuKernel {
        GpuKernel {
            entry: "k".to_string(),
            ptx: String::new(),
            params: vec![],
            launch: LaunchRule::linear(Extent::fixed(1), 32),
            target: target.to_string(),
        }
    }

    #[test]
    fn ptx_hash_is_stable_sha256() {
        // SHA-256("") is a published constant; the key must never depend on the process.
        assert_eq!(
            PtxHash::of("").to_string(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(PtxHash::of(".version 8.0"), PtxHash::of(".version 8.0"));
        assert_ne!(PtxHash::of(".version 8.0"), PtxHash::of(".version 8.1"));
    }

    #[test]
    fn targets_against_compute_capability() {
        assert!(check_target(&kernel("sm_80"), &info((9, 0))).is_ok());
        assert!(check_target(&kernel("sm_90a"), &info((9, 0))).is_ok());
        assert!(check_target(&kernel("sm_90a"), &info((10, 0))).is_err());
        assert!(check_target(&kernel("something else"), &info((8, 0))).is_ok());
        let err = check_target(&kernel("sm_90"), &info((8, 0)))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("targets sm_90") && err.contains("sm_80"),
            "{err}"
        );
    }
}
