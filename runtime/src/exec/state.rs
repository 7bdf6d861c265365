//! State that stays on the device between calls: the KV caches of a model's plans.
//!
//! Owns [`DeviceState`], a name → device tensor map shared by the executors of one model
//! (its prefill and decode plans), with a version per entry that counts the calls that
//! stored it. An executor given a `DeviceState` reads a state input from it when the call
//! does not pass that tensor, and stores the state outputs its GPU kernels produced there
//! instead of copying them to the host. It must not launch kernels or plan memory.

use crate::cuda::{CudaDevice, CudaError, DeviceTensor};
use kiln_ir::dtype::DType;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Debug)]
struct Entry {
    tensor: Arc<DeviceTensor>,
    version: u64,
}

/// Device-resident state tensors by name, shared between executors. Cloning shares.
#[derive(Clone, Debug, Default)]
pub struct DeviceState {
    entries: Arc<Mutex<HashMap<String, Entry>>>,
}

impl DeviceState {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores `tensor` as the value of `name` and bumps its version.
    pub fn insert(&self, name: &str, tensor: Arc<DeviceTensor>) {
        let mut entries = self.lock();
        let version = entries.get(name).map(|e| e.version + 1).unwrap_or(1);
        entries.insert(name.to_string(), Entry { tensor, version });
    }

    /// A zero tensor of `dtype` and `shape` as the value of `name` (a fresh KV cache).
    pub fn insert_zeros(
        &self,
        device: &CudaDevice,
        name: &str,
        dtype: DType,
        shape: &[usize],
    ) -> Result<(), CudaError> {
        let tensor = Arc::new(DeviceTensor::zeros(device, dtype, shape)?);
        self.insert(name, tensor);
        Ok(())
    }

    /// The value of `name` and its version.
    pub fn get(&self, name: &str) -> Option<(Arc<DeviceTensor>, u64)> {
        self.lock().get(name).map(|e| (e.tensor.clone(), e.version))
    }

    /// The version of `name` (0 when absent).
    pub fn version(&self, name: &str) -> u64 {
        self.lock().get(name).map(|e| e.version).unwrap_or(0)
    }

    /// How many tensors are held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        self.lock()
            .values()
            .map(|e| e.tensor.dtype.storage_bytes(e.tensor.len()))
            .sum()
    }
}
