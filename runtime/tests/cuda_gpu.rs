//! `runtime::cuda` tests that need a CUDA device: run them on the GPU machine with
//! `cargo test -p kiln-runtime --test cuda_gpu -- --ignored` (or the built test binary with
//! `--ignored`).

use half::{bf16, f16};
use kiln_runtime::cuda::{CudaDevice, DeviceBuffer, Element, PinnedBuffer};

fn device() -> CudaDevice {
    CudaDevice::open(0).unwrap_or_else(|e| panic!("{e}"))
}

/// Bitwise equality, so NaN payloads and signed zeros must survive too.
fn bits_eq<T: Element>(a: &T, b: &T) -> bool {
    let size = std::mem::size_of::<T>();
    // SAFETY: both are plain values of `size` bytes with no padding.
    unsafe {
        std::slice::from_raw_parts(a as *const T as *const u8, size)
            == std::slice::from_raw_parts(b as *const T as *const u8, size)
    }
}

fn all_bits_eq<T: Element>(a: &[T], b: &[T]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| bits_eq(x, y))
}

/// Round trips `data` through a device buffer; checks zeros, poison, fill and pinned copies.
fn round_trip<T: Element>(device: &CudaDevice, data: Vec<T>) {
    let what = T::ELEM;
    let mut buffer = DeviceBuffer::from_host(device, &data).unwrap();
    assert_eq!(buffer.len(), data.len());
    assert_eq!(buffer.byte_len(), data.len() * what.size_bytes());
    assert!(
        all_bits_eq(&buffer.to_host().unwrap(), &data),
        "{what}: round trip"
    );

    let poisoned = DeviceBuffer::<T>::poisoned(device, data.len()).unwrap();
    assert!(
        poisoned.to_host().unwrap().iter().all(Element::is_poison),
        "{what}: poisoned"
    );

    let zeros = DeviceBuffer::<T>::zeros(device, data.len()).unwrap();
    let expected = vec![T::default(); data.len()];
    assert!(
        all_bits_eq(&zeros.to_host().unwrap(), &expected),
        "{what}: zeros"
    );

    buffer.poison().unwrap();
    assert!(
        buffer.to_host().unwrap().iter().all(Element::is_poison),
        "{what}: poison()"
    );

    let pinned = PinnedBuffer::from_slice(device, &data).unwrap();
    buffer.copy_from_pinned(&pinned).unwrap();
    let mut pinned_back = PinnedBuffer::<T>::zeros(device, data.len()).unwrap();
    buffer.copy_to_pinned(&mut pinned_back).unwrap();
    assert!(
        all_bits_eq(pinned_back.as_slice().unwrap(), &data),
        "{what}: pinned round trip"
    );

    let short = &data[..data.len() - 1];
    assert!(
        buffer.copy_from_host(short).is_err(),
        "{what}: length checked"
    );
}

const N: usize = 100_003;

#[test]
#[ignore = "needs a CUDA device"]
fn device_opens_and_reports_itself() {
    let device = device();
    let info = device.info();
    println!("{info}");
    assert!(info.sm_count > 0 && info.total_memory_bytes > 0);
    assert!(info.compute_capability.0 >= 7);
    assert!(CudaDevice::is_available());
    device.synchronize().unwrap();
}

#[test]
#[ignore = "needs a CUDA device"]
fn buffers_round_trip_every_dtype() {
    let device = device();
    round_trip(&device, (0..N).map(|i| i as f32 * 0.25 - 7.0).collect());
    round_trip(
        &device,
        (0..N)
            .map(|i| f16::from_f32((i % 2000) as f32 - 1000.0))
            .collect(),
    );
    round_trip(
        &device,
        (0..N).map(|i| bf16::from_f32(i as f32 * -0.5)).collect(),
    );
    round_trip(&device, (0..N).map(|i| i as i32 - 50_000).collect());
    round_trip(&device, (0..N).map(|i| (i % 256) as u8 as i8).collect());
    round_trip(&device, (0..N).map(|i| (i * 7 % 256) as u8).collect());
    device.synchronize().unwrap();
}

#[test]
#[ignore = "needs a CUDA device"]
fn empty_buffers_work() {
    let device = device();
    let empty = DeviceBuffer::<f32>::from_host(&device, &[]).unwrap();
    assert!(empty.is_empty());
    assert_eq!(empty.to_host().unwrap(), Vec::<f32>::new());
    assert!(DeviceBuffer::<u8>::poisoned(&device, 0).unwrap().is_empty());
    let pinned = PinnedBuffer::<f16>::zeros(&device, 0).unwrap();
    assert!(pinned.as_slice().unwrap().is_empty());
}

#[test]
#[ignore = "needs a CUDA device"]
fn events_time_device_work() {
    let device = device();
    let len = 1 << 24;
    let src = DeviceBuffer::<f32>::zeros(&device, len).unwrap();
    let mut dst = PinnedBuffer::<f32>::zeros(&device, len).unwrap();
    let timing = device.time(|| src.copy_to_pinned(&mut dst), 2, 5).unwrap();
    assert_eq!(timing.samples.len(), 5);
    assert!(timing.min_ms > 0.0 && timing.min_ms <= timing.median_ms);
    println!(
        "64 MiB device to pinned host: median {:.3} ms ({:.1} GB/s)",
        timing.median_ms,
        (len * 4) as f64 / timing.median_ms / 1e6
    );
    let (start, end) = (device.event().unwrap(), device.event().unwrap());
    start.record().unwrap();
    end.record().unwrap();
    assert!(start.elapsed_ms(&end).unwrap() >= 0.0);
}

// Left for when `kiln_codegen::ptx` lands (no hand-written PTX in this repository): loading
// one generated kernel twice counts one module load (`CudaDevice::loads`), and launching it
// by named arguments writes every element of a poisoned output.
