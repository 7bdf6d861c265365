//! Device side of the paged KV cache: per layer the `k_pages`, `v_pages`, `page_max` and
//! `page_min` buffers in `kiln_kernels::attention::paged`'s layout for one [`PagedKv`], and
//! the `page_table` / `seq_lens` buffers shared by the layers, uploaded from the host
//! [`BatchTables`].
//!
//! It only allocates and copies (through `runtime::cuda`); it never launches a kernel and
//! never decides which page holds what (that is `pool.rs`).

use super::error::KvError;
use super::pool::BatchTables;
use crate::cuda::{CudaDevice, DeviceBuffer, DeviceStorage, DeviceTensor};
use half::{bf16, f16};
use kiln_ir::dtype::DType;
use kiln_kernels::attention::PagedKv;

/// One layer's cache buffers.
#[derive(Debug)]
pub struct DeviceKvLayer {
    /// `[num_pages, kv_heads, page_size, head_dim]`.
    pub k_pages: DeviceTensor,
    /// `[num_pages, kv_heads, page_size, head_dim]`.
    pub v_pages: DeviceTensor,
    /// `[num_pages, kv_heads, head_dim]`: element-wise max of each page's valid keys.
    pub page_max: DeviceTensor,
    /// `[num_pages, kv_heads, head_dim]`: element-wise min of each page's valid keys.
    pub page_min: DeviceTensor,
}

/// The page tables of the current batch on the device.
#[derive(Debug)]
pub struct DevicePageTables {
    /// `[batch, max_pages]` i32.
    pub page_table: DeviceBuffer<i32>,
    /// `[batch]` i32.
    pub seq_lens: DeviceBuffer<i32>,
    pub batch: usize,
    pub max_pages: usize,
}

/// The device buffers of a paged KV cache of `num_pages` pages and `layers` layers.
#[derive(Debug)]
pub struct DeviceKvCache {
    pub layout: PagedKv,
    pub num_pages: usize,
    pub layers: Vec<DeviceKvLayer>,
    /// `None` until [`DeviceKvCache::upload_tables`] is first called.
    pub tables: Option<DevicePageTables>,
}

impl DeviceKvCache {
    /// Allocates zeroed buffers for `layers` layers of `num_pages` pages in `layout`.
    pub fn new(
        device: &CudaDevice,
        layout: PagedKv,
        num_pages: usize,
        layers: usize,
    ) -> Result<DeviceKvCache, KvError> {
        layout
            .validate("kv_cache")
            .map_err(|e| KvError::Layout(e.to_string()))?;
        if num_pages == 0 || num_pages > i32::MAX as usize {
            return Err(KvError::Config {
                field: "num_pages",
                value: num_pages,
                expected: format!("1..={}", i32::MAX),
            });
        }
        if layers == 0 {
            return Err(KvError::Config {
                field: "layers",
                value: 0,
                expected: "at least 1".to_string(),
            });
        }
        let pages_shape = [
            num_pages,
            layout.kv_heads,
            layout.page_size,
            layout.head_dim,
        ];
        let meta_shape = [num_pages, layout.kv_heads, layout.head_dim];
        let layers = (0..layers)
            .map(|_| {
                Ok(DeviceKvLayer {
                    k_pages: zeros(device, layout.dtype, &pages_shape)?,
                    v_pages: zeros(device, layout.dtype, &pages_shape)?,
                    page_max: zeros(device, layout.dtype, &meta_shape)?,
                    page_min: zeros(device, layout.dtype, &meta_shape)?,
                })
            })
            .collect::<Result<Vec<_>, KvError>>()?;
        Ok(DeviceKvCache {
            layout,
            num_pages,
            layers,
            tables: None,
        })
    }

    /// Copies `tables` to the device, reusing the buffers when the shape is unchanged.
    pub fn upload_tables(
        &mut self,
        device: &CudaDevice,
        tables: &BatchTables,
    ) -> Result<&DevicePageTables, KvError> {
        let fits =
            |t: &DevicePageTables| t.batch == tables.batch && t.max_pages == tables.max_pages;
        match &mut self.tables {
            Some(held) if fits(held) => {
                held.page_table.copy_from_host(&tables.page_table)?;
                held.seq_lens.copy_from_host(&tables.seq_lens)?;
            }
            slot => {
                *slot = Some(DevicePageTables {
                    page_table: DeviceBuffer::from_host(device, &tables.page_table)?,
                    seq_lens: DeviceBuffer::from_host(device, &tables.seq_lens)?,
                    batch: tables.batch,
                    max_pages: tables.max_pages,
                });
            }
        }
        Ok(self.tables.as_ref().expect("just set"))
    }
}

fn zeros(device: &CudaDevice, dtype: DType, shape: &[usize]) -> Result<DeviceTensor, KvError> {
    let n = shape.iter().product();
    let storage = match dtype {
        DType::F16 => DeviceStorage::F16(DeviceBuffer::<f16>::zeros(device, n)?),
        DType::BF16 => DeviceStorage::BF16(DeviceBuffer::<bf16>::zeros(device, n)?),
        other => {
            return Err(KvError::Layout(format!(
                "cache dtype must be f16 or bf16, got {other}"
            )))
        }
    };
    Ok(DeviceTensor {
        dtype,
        shape: shape.to_vec(),
        storage,
    })
}
