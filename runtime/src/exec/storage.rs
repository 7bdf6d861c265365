//! Where the executor keeps a buffer's value on the device, and the byte conversions between
//! host reference tensors and device memory.
//!
//! Owns [`DeviceSlot`] (a range of the plan's arena, or a tensor of its own) and the
//! conversions `Tensor` ↔ little-endian bytes in the tensor's storage dtype. It must not
//! decide placement or launch anything.

use crate::cuda::{BufferArg, CudaDevice, CudaError, DeviceBuffer, DeviceTensor, ElemType};
use half::{bf16, f16};
use kiln_ir::dtype::DType;
use kiln_ir::tensor::Tensor;
use std::sync::Arc;

/// The storage element type of `dtype` on the device.
pub fn elem_type(dtype: DType) -> Result<ElemType, CudaError> {
    Ok(match dtype {
        DType::F32 => ElemType::F32,
        DType::F16 => ElemType::F16,
        DType::BF16 => ElemType::BF16,
        DType::I32 => ElemType::I32,
        DType::I8 => ElemType::I8,
        DType::I4 => {
            return Err(CudaError::InvalidRequest(
                "the plan executor does not hold packed 4-bit tensors on the device yet".into(),
            ))
        }
    })
}

/// The tensor's values in its storage dtype, as little-endian bytes.
pub fn tensor_bytes(tensor: &Tensor) -> Result<Vec<u8>, CudaError> {
    let mut out = Vec::with_capacity(tensor.len() * elem_type(tensor.dtype)?.size_bytes());
    for &v in &tensor.data {
        match tensor.dtype {
            DType::F32 => out.extend_from_slice(&v.to_le_bytes()),
            DType::F16 => out.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
            DType::BF16 => out.extend_from_slice(&bf16::from_f32(v).to_le_bytes()),
            DType::I32 => out.extend_from_slice(&(v as i32).to_le_bytes()),
            DType::I8 => out.push(v as i8 as u8),
            DType::I4 => return Err(elem_type(DType::I4).unwrap_err()),
        }
    }
    Ok(out)
}

/// A tensor of `dtype` and `shape` from little-endian storage bytes.
pub fn tensor_from_bytes(dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<Tensor, CudaError> {
    let size = elem_type(dtype)?.size_bytes();
    let data = bytes
        .chunks_exact(size)
        .map(|c| match dtype {
            DType::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            DType::F16 => f16::from_le_bytes([c[0], c[1]]).to_f32(),
            DType::BF16 => bf16::from_le_bytes([c[0], c[1]]).to_f32(),
            DType::I32 => i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32,
            _ => c[0] as i8 as f32,
        })
        .collect::<Vec<f32>>();
    let expected: usize = shape.iter().product();
    if data.len() != expected {
        return Err(CudaError::InvalidRequest(format!(
            "{} bytes hold {} {dtype} elements, expected {expected} for shape {shape:?}",
            bytes.len(),
            data.len()
        )));
    }
    Ok(Tensor {
        dtype,
        shape: shape.to_vec(),
        data,
    })
}

/// A buffer's value on the device.
#[derive(Debug)]
pub enum DeviceSlot {
    /// `bytes` bytes at `offset` in the executor's arena (the memory plan's slot).
    Arena { offset: u64, bytes: u64 },
    /// A tensor of its own (inputs, state, outputs, values made on the host).
    Owned(DeviceTensor),
    /// A weight, constant or load-time value, shared by the executors of one model.
    Resident(Arc<DeviceTensor>),
}

impl DeviceSlot {
    /// The slot as a launch argument.
    pub fn arg<'a>(
        &'a self,
        arena: Option<&'a DeviceBuffer<u8>>,
        dtype: DType,
        device: &CudaDevice,
    ) -> Result<BufferArg<'a>, CudaError> {
        match self {
            DeviceSlot::Owned(t) => Ok(t.arg()),
            DeviceSlot::Resident(t) => Ok(t.arg()),
            DeviceSlot::Arena { offset, bytes } => {
                let arena = arena.ok_or_else(|| {
                    CudaError::InvalidRequest("an arena slot was used before allocation".into())
                })?;
                let (offset, bytes) = (*offset as usize, *bytes as usize);
                let range = arena.arg_range(offset..offset + bytes)?;
                // SAFETY: a sub-range of the live arena, checked by `arg_range`, re-tagged
                // with the element type the plan stores there; borrowed for 'a like the arena.
                Ok(unsafe {
                    BufferArg::from_raw_parts(range.ptr(), bytes, elem_type(dtype)?, device.id())
                })
            }
        }
    }

    /// Copies `tensor` into this slot.
    pub fn upload(
        &mut self,
        arena: Option<&mut DeviceBuffer<u8>>,
        tensor: &Tensor,
    ) -> Result<(), CudaError> {
        match self {
            DeviceSlot::Arena { offset, bytes } => {
                let arena = arena.ok_or_else(|| {
                    CudaError::InvalidRequest("an arena slot was used before allocation".into())
                })?;
                let data = tensor_bytes(tensor)?;
                let start = *offset as usize;
                let end = start + (*bytes as usize).min(data.len());
                arena.copy_range_from_host(start..end, &data[..end - start])
            }
            DeviceSlot::Owned(_) | DeviceSlot::Resident(_) => Err(CudaError::InvalidRequest(
                "only arena slots are overwritten in place".into(),
            )),
        }
    }

    /// The slot's value as a host tensor of `dtype` and `shape`.
    pub fn download(
        &self,
        arena: Option<&DeviceBuffer<u8>>,
        dtype: DType,
        shape: &[usize],
    ) -> Result<Tensor, CudaError> {
        let tensor = match self {
            DeviceSlot::Owned(t) => t.download()?,
            DeviceSlot::Resident(t) => t.download()?,
            DeviceSlot::Arena { offset, .. } => {
                let arena = arena.ok_or_else(|| {
                    CudaError::InvalidRequest("an arena slot was used before allocation".into())
                })?;
                let len = shape.iter().product::<usize>() * elem_type(dtype)?.size_bytes();
                let mut bytes = vec![0u8; len];
                let start = *offset as usize;
                arena.copy_range_to_host(start..start + len, &mut bytes)?;
                return tensor_from_bytes(dtype, shape, &bytes);
            }
        };
        Ok(Tensor {
            shape: shape.to_vec(),
            ..tensor
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_in_every_storage_dtype() {
        for dtype in [DType::F32, DType::F16, DType::BF16, DType::I32, DType::I8] {
            let values = if dtype.is_float() {
                vec![1.5, -2.25, 0.0, 65504.0 / 4.0, -0.125, 3.0]
            } else {
                vec![1.0, -2.0, 0.0, 100.0, -128.0, 127.0]
            };
            let tensor = Tensor::new(dtype, &[2, 3], values).unwrap();
            let bytes = tensor_bytes(&tensor).unwrap();
            assert_eq!(bytes.len(), 6 * elem_type(dtype).unwrap().size_bytes());
            let back = tensor_from_bytes(dtype, &[2, 3], &bytes).unwrap();
            assert_eq!(back, tensor, "{dtype}");
        }
        let err = tensor_from_bytes(DType::F16, &[4], &[0u8; 6]).unwrap_err();
        assert!(err.to_string().contains("expected 4"), "{err}");
    }
}
