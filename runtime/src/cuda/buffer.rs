//! Typed device buffers and pinned host buffers, and the copies between them and the host.
//!
//! Owns [`DeviceBuffer`] and [`PinnedBuffer`]. All copies run on the owning device's one
//! stream. Copies from and to ordinary host slices return when the host side may be reused
//! or read; copies between a device buffer and a pinned buffer are asynchronous, and the
//! pinned buffer waits for them before its host side is touched. Launching is not done here.

use super::bind::{Arg, BufferArg, DeviceId};
use super::device::CudaDevice;
use super::element::{ElemType, Element};
use super::error::CudaError;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice};
use std::ops::Range;
use std::sync::Arc;

/// A device buffer of `len` elements of `T` (`f32`, `f16`, `bf16`, `i32`, `i8` or `u8`).
///
/// ```ignore
/// let x = DeviceBuffer::from_host(&device, &[1.0f32, 2.0, 3.0])?;
/// let y = DeviceBuffer::<f32>::poisoned(&device, 3)?;
/// assert_eq!(x.to_host()?, vec![1.0, 2.0, 3.0]);
/// ```
#[derive(Debug)]
pub struct DeviceBuffer<T> {
    /// `None` for an empty buffer: the driver cannot allocate zero bytes.
    slice: Option<CudaSlice<T>>,
    stream: Arc<CudaStream>,
    device: DeviceId,
}

impl<T: Element> DeviceBuffer<T> {
    /// A buffer holding a copy of `data`.
    pub fn from_host(device: &CudaDevice, data: &[T]) -> Result<Self, CudaError> {
        let slice = if data.is_empty() {
            None
        } else {
            Some(
                device
                    .stream
                    .clone_htod(data)
                    .map_err(CudaError::driver(copy_call::<T>(
                        "host to device",
                        data.len(),
                    )))?,
            )
        };
        Ok(Self::wrap(device, slice))
    }

    /// A buffer of `len` zeros.
    pub fn zeros(device: &CudaDevice, len: usize) -> Result<Self, CudaError> {
        let slice = if len == 0 {
            None
        } else {
            Some(
                device
                    .stream
                    .alloc_zeros(len)
                    .map_err(CudaError::driver(alloc_call::<T>(len)))?,
            )
        };
        Ok(Self::wrap(device, slice))
    }

    /// A buffer of `len` copies of `value`.
    pub fn filled(device: &CudaDevice, len: usize, value: T) -> Result<Self, CudaError> {
        Self::from_host(device, &vec![value; len])
    }

    /// A buffer of `len` poison values ([`Element::POISON`]): give outputs this before a
    /// launch, and an element the kernel never wrote reads back as poison.
    pub fn poisoned(device: &CudaDevice, len: usize) -> Result<Self, CudaError> {
        Self::filled(device, len, T::POISON)
    }

    fn wrap(device: &CudaDevice, slice: Option<CudaSlice<T>>) -> Self {
        DeviceBuffer {
            slice,
            stream: device.stream.clone(),
            device: device.id,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.slice.as_ref().map_or(0, |s| s.len())
    }

    /// Whether the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Size in bytes.
    pub fn byte_len(&self) -> usize {
        self.len() * T::ELEM.size_bytes()
    }

    /// The element type.
    pub fn elem(&self) -> ElemType {
        T::ELEM
    }

    /// The device this buffer lives on.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// The device address (0 for an empty buffer).
    pub fn device_ptr(&self) -> u64 {
        match &self.slice {
            Some(slice) => slice.device_ptr(&self.stream).0,
            None => 0,
        }
    }

    /// A copy of the contents, after all work queued before it on the device.
    pub fn to_host(&self) -> Result<Vec<T>, CudaError> {
        let mut out = vec![T::default(); self.len()];
        self.copy_to_host(&mut out)?;
        Ok(out)
    }

    /// Copies the contents into `out`, which must have the same length.
    pub fn copy_to_host(&self, out: &mut [T]) -> Result<(), CudaError> {
        check_len("copy device to host", self.len(), out.len())?;
        if let Some(slice) = &self.slice {
            let call = copy_call::<T>("device to host", out.len());
            self.stream
                .memcpy_dtoh(slice, out)
                .map_err(CudaError::driver(call.clone()))?;
            self.stream.synchronize().map_err(CudaError::driver(call))?;
        }
        Ok(())
    }

    /// Overwrites the contents with `data`, which must have the same length.
    pub fn copy_from_host(&mut self, data: &[T]) -> Result<(), CudaError> {
        check_len("copy host to device", self.len(), data.len())?;
        if let Some(slice) = &mut self.slice {
            self.stream
                .memcpy_htod(data, slice)
                .map_err(CudaError::driver(copy_call::<T>(
                    "host to device",
                    data.len(),
                )))?;
        }
        Ok(())
    }

    /// Copies elements `range` into `out` (of the range's length), after all work queued
    /// before it on the device.
    pub fn copy_range_to_host(&self, range: Range<usize>, out: &mut [T]) -> Result<(), CudaError> {
        self.check_range(&range)?;
        check_len("copy device range to host", range.len(), out.len())?;
        if let (Some(slice), false) = (&self.slice, range.is_empty()) {
            let call = copy_call::<T>("device range to host", out.len());
            self.stream
                .memcpy_dtoh(&slice.slice(range), out)
                .map_err(CudaError::driver(call.clone()))?;
            self.stream.synchronize().map_err(CudaError::driver(call))?;
        }
        Ok(())
    }

    /// Overwrites elements `range` with `data` (of the range's length).
    pub fn copy_range_from_host(
        &mut self,
        range: Range<usize>,
        data: &[T],
    ) -> Result<(), CudaError> {
        self.check_range(&range)?;
        check_len("copy host to device range", range.len(), data.len())?;
        if let (Some(slice), false) = (&mut self.slice, range.is_empty()) {
            self.stream
                .memcpy_htod(data, &mut slice.slice_mut(range))
                .map_err(CudaError::driver(copy_call::<T>(
                    "host to device range",
                    data.len(),
                )))?;
        }
        Ok(())
    }

    fn check_range(&self, range: &Range<usize>) -> Result<(), CudaError> {
        if range.start > range.end || range.end > self.len() {
            return Err(CudaError::InvalidRequest(format!(
                "buffer range {range:?} is outside a buffer of {} elements; pass a range within it",
                self.len()
            )));
        }
        Ok(())
    }

    /// Sets every element to `value`.
    pub fn fill(&mut self, value: T) -> Result<(), CudaError> {
        self.copy_from_host(&vec![value; self.len()])
    }

    /// Sets every element to the poison value.
    pub fn poison(&mut self) -> Result<(), CudaError> {
        self.fill(T::POISON)
    }

    /// Queues a copy from a pinned buffer of the same length; it does not wait.
    pub fn copy_from_pinned(&mut self, src: &PinnedBuffer<T>) -> Result<(), CudaError> {
        check_len("copy pinned host to device", self.len(), src.len())?;
        check_same_device(self.device, src.device)?;
        if let (Some(slice), Some(host)) = (&mut self.slice, &src.host) {
            let call = copy_call::<T>("pinned host to device", src.len());
            self.stream
                .memcpy_htod(host, slice)
                .map_err(CudaError::driver(call.clone()))?;
            src.pending
                .record(&self.stream)
                .map_err(CudaError::driver(call))?;
        }
        Ok(())
    }

    /// Queues a copy into a pinned buffer of the same length; it does not wait, but the
    /// pinned buffer's [`PinnedBuffer::as_slice`] does.
    pub fn copy_to_pinned(&self, dst: &mut PinnedBuffer<T>) -> Result<(), CudaError> {
        check_len("copy device to pinned host", self.len(), dst.len())?;
        check_same_device(self.device, dst.device)?;
        if let (Some(slice), Some(host)) = (&self.slice, &mut dst.host) {
            let call = copy_call::<T>("device to pinned host", self.len());
            self.stream
                .memcpy_dtoh(slice, host)
                .map_err(CudaError::driver(call.clone()))?;
            dst.pending
                .record(&self.stream)
                .map_err(CudaError::driver(call))?;
        }
        Ok(())
    }

    /// This buffer as a launch argument.
    pub fn arg(&self) -> BufferArg<'_> {
        // SAFETY: the address and size are this live allocation's, and the borrow keeps it
        // alive while the argument exists; a later free is ordered after the launch on the
        // device's one stream.
        unsafe {
            BufferArg::from_raw_parts(self.device_ptr(), self.byte_len(), T::ELEM, self.device)
        }
    }

    /// Elements `range` of this buffer as a launch argument.
    pub fn arg_range(&self, range: Range<usize>) -> Result<BufferArg<'_>, CudaError> {
        self.check_range(&range)?;
        let size = T::ELEM.size_bytes();
        let ptr = self.device_ptr() + (range.start * size) as u64;
        // SAFETY: a sub-range of this live allocation, borrowed as in `arg`.
        Ok(unsafe { BufferArg::from_raw_parts(ptr, range.len() * size, T::ELEM, self.device) })
    }
}

impl<'a, T: Element> From<&'a DeviceBuffer<T>> for BufferArg<'a> {
    fn from(buffer: &'a DeviceBuffer<T>) -> Self {
        buffer.arg()
    }
}

impl<'a, T: Element> From<&'a DeviceBuffer<T>> for Arg<'a> {
    fn from(buffer: &'a DeviceBuffer<T>) -> Self {
        Arg::Buffer(buffer.arg())
    }
}

/// Page-locked host memory of `len` elements, for fast asynchronous copies to and from a
/// device. Reading or writing its host side first waits for copies queued on it.
#[derive(Debug)]
pub struct PinnedBuffer<T> {
    /// `None` when empty.
    host: Option<PinnedHostSlice<T>>,
    /// Recorded after each copy that uses this buffer.
    pending: CudaEvent,
    device: DeviceId,
}

impl<T: Element> PinnedBuffer<T> {
    /// `len` zeroed elements of pinned memory.
    pub fn zeros(device: &CudaDevice, len: usize) -> Result<Self, CudaError> {
        let host = if len == 0 {
            None
        } else {
            // Plain page-locked memory: cudarc's `alloc_pinned` asks for write-combined
            // memory, which is slow for the host to read back.
            // SAFETY: the memory is zeroed below before any use, and zero is a valid `T`.
            let mut host = unsafe { device.ctx.alloc_pinned_with_flags::<T>(len, 0) }.map_err(
                CudaError::driver(format!("cuMemHostAlloc of {len} {} elements", T::ELEM)),
            )?;
            let ptr = host
                .as_mut_ptr()
                .map_err(CudaError::driver("pinned buffer event"))?;
            // SAFETY: `ptr` addresses `len` elements just allocated.
            unsafe { std::ptr::write_bytes(ptr, 0, len) };
            Some(host)
        };
        let pending = device
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .map_err(CudaError::driver("cuEventCreate"))?;
        Ok(PinnedBuffer {
            host,
            pending,
            device: device.id,
        })
    }

    /// Pinned memory holding a copy of `data`.
    pub fn from_slice(device: &CudaDevice, data: &[T]) -> Result<Self, CudaError> {
        let mut buffer = Self::zeros(device, data.len())?;
        buffer.as_mut_slice()?.copy_from_slice(data);
        Ok(buffer)
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.host.as_ref().map_or(0, |h| h.len())
    }

    /// Whether the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The host side, after the copies queued on this buffer have finished.
    pub fn as_slice(&self) -> Result<&[T], CudaError> {
        self.wait()?;
        match &self.host {
            Some(host) => host
                .as_slice()
                .map_err(CudaError::driver("pinned buffer event")),
            None => Ok(&[]),
        }
    }

    /// The host side for writing, after the copies queued on this buffer have finished.
    pub fn as_mut_slice(&mut self) -> Result<&mut [T], CudaError> {
        self.wait()?;
        match &mut self.host {
            Some(host) => host
                .as_mut_slice()
                .map_err(CudaError::driver("pinned buffer event")),
            None => Ok(&mut []),
        }
    }

    fn wait(&self) -> Result<(), CudaError> {
        self.pending
            .synchronize()
            .map_err(CudaError::driver("cuEventSynchronize (pinned buffer copy)"))
    }
}

impl<T> Drop for PinnedBuffer<T> {
    fn drop(&mut self) {
        // Never free page-locked memory a queued copy still uses. An error here surfaces at
        // the device's next `synchronize`.
        let result = self.pending.synchronize();
        self.pending.context().record_err(result);
    }
}

fn check_len(op: &'static str, expected: usize, got: usize) -> Result<(), CudaError> {
    if expected == got {
        Ok(())
    } else {
        Err(CudaError::LengthMismatch { op, expected, got })
    }
}

fn check_same_device(buffer: DeviceId, pinned: DeviceId) -> Result<(), CudaError> {
    if buffer == pinned {
        Ok(())
    } else {
        Err(CudaError::InvalidRequest(
            "the pinned buffer was made for another CudaDevice; make it with this device"
                .to_string(),
        ))
    }
}

fn copy_call<T: Element>(direction: &str, len: usize) -> String {
    format!("copy {direction} of {len} {} elements", T::ELEM)
}

fn alloc_call<T: Element>(len: usize) -> String {
    format!("allocate {len} {} elements on the device", T::ELEM)
}
