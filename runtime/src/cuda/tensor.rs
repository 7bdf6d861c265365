//! Device tensors: an `ir::Tensor`'s dtype and shape with a typed device buffer behind it.
//!
//! Owns the conversion between host reference tensors (f32 values rounded to their dtype)
//! and device storage of the matching element type, and poisoned outputs for tests. It must
//! not launch anything or know kernel families.

use super::{BufferArg, CudaDevice, CudaError, DeviceBuffer};
use half::{bf16, f16};
use kiln_ir::dtype::DType;
use kiln_ir::tensor::Tensor;

/// The typed storage behind a [`DeviceTensor`].
#[derive(Debug)]
pub enum DeviceStorage {
    F32(DeviceBuffer<f32>),
    F16(DeviceBuffer<f16>),
    BF16(DeviceBuffer<bf16>),
    I32(DeviceBuffer<i32>),
    I8(DeviceBuffer<i8>),
}

/// A tensor on the device: dtype, concrete shape and storage.
#[derive(Debug)]
pub struct DeviceTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub storage: DeviceStorage,
}

/// What a new tensor's elements start as.
#[derive(Clone, Copy)]
enum Fill {
    Zeros,
    Poison,
}

fn unsupported(dtype: DType) -> CudaError {
    CudaError::InvalidRequest(format!(
        "device tensors of dtype {dtype} are not supported (packed 4-bit data lives in u8 buffers)"
    ))
}

impl DeviceTensor {
    /// Copies a host tensor to the device in its own dtype.
    pub fn upload(device: &CudaDevice, tensor: &Tensor) -> Result<DeviceTensor, CudaError> {
        let data = &tensor.data;
        let storage = match tensor.dtype {
            DType::F32 => DeviceStorage::F32(DeviceBuffer::from_host(device, data)?),
            DType::F16 => {
                let host: Vec<f16> = data.iter().map(|&v| f16::from_f32(v)).collect();
                DeviceStorage::F16(DeviceBuffer::from_host(device, &host)?)
            }
            DType::BF16 => {
                let host: Vec<bf16> = data.iter().map(|&v| bf16::from_f32(v)).collect();
                DeviceStorage::BF16(DeviceBuffer::from_host(device, &host)?)
            }
            DType::I32 => {
                let host: Vec<i32> = data.iter().map(|&v| v as i32).collect();
                DeviceStorage::I32(DeviceBuffer::from_host(device, &host)?)
            }
            DType::I8 => {
                let host: Vec<i8> = data.iter().map(|&v| v as i8).collect();
                DeviceStorage::I8(DeviceBuffer::from_host(device, &host)?)
            }
            DType::I4 => return Err(unsupported(DType::I4)),
        };
        Ok(DeviceTensor {
            dtype: tensor.dtype,
            shape: tensor.shape.clone(),
            storage,
        })
    }

    /// A tensor whose every element holds the poison pattern (NaN for floats), so that an
    /// element a kernel never writes is caught on download.
    pub fn poisoned(
        device: &CudaDevice,
        dtype: DType,
        shape: &[usize],
    ) -> Result<DeviceTensor, CudaError> {
        Self::allocate(device, dtype, shape, Fill::Poison)
    }

    /// A tensor of zeros (a fresh KV cache, for example).
    pub fn zeros(
        device: &CudaDevice,
        dtype: DType,
        shape: &[usize],
    ) -> Result<DeviceTensor, CudaError> {
        Self::allocate(device, dtype, shape, Fill::Zeros)
    }

    fn allocate(
        device: &CudaDevice,
        dtype: DType,
        shape: &[usize],
        fill: Fill,
    ) -> Result<DeviceTensor, CudaError> {
        let n = shape.iter().product();
        macro_rules! buffer {
            () => {
                match fill {
                    Fill::Zeros => DeviceBuffer::zeros(device, n)?,
                    Fill::Poison => DeviceBuffer::poisoned(device, n)?,
                }
            };
        }
        let storage = match dtype {
            DType::F32 => DeviceStorage::F32(buffer!()),
            DType::F16 => DeviceStorage::F16(buffer!()),
            DType::BF16 => DeviceStorage::BF16(buffer!()),
            DType::I32 => DeviceStorage::I32(buffer!()),
            DType::I8 => DeviceStorage::I8(buffer!()),
            DType::I4 => return Err(unsupported(DType::I4)),
        };
        Ok(DeviceTensor {
            dtype,
            shape: shape.to_vec(),
            storage,
        })
    }

    /// Copies the tensor back to the host. Poisoned float elements come back as NaN; poisoned
    /// integer elements as their poison value.
    pub fn download(&self) -> Result<Tensor, CudaError> {
        let data: Vec<f32> = match &self.storage {
            DeviceStorage::F32(b) => b.to_host()?,
            DeviceStorage::F16(b) => b.to_host()?.iter().map(|v| v.to_f32()).collect(),
            DeviceStorage::BF16(b) => b.to_host()?.iter().map(|v| v.to_f32()).collect(),
            DeviceStorage::I32(b) => b.to_host()?.iter().map(|&v| v as f32).collect(),
            DeviceStorage::I8(b) => b.to_host()?.iter().map(|&v| v as f32).collect(),
        };
        Ok(Tensor {
            dtype: self.dtype,
            shape: self.shape.clone(),
            data,
        })
    }

    /// The buffer as a launch argument.
    pub fn arg(&self) -> BufferArg<'_> {
        match &self.storage {
            DeviceStorage::F32(b) => b.arg(),
            DeviceStorage::F16(b) => b.arg(),
            DeviceStorage::BF16(b) => b.arg(),
            DeviceStorage::I32(b) => b.arg(),
            DeviceStorage::I8(b) => b.arg(),
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
