//! Shared helpers of the GPU tests (root `tests/gpu_*.rs`): the device, fresh random inputs
//! and the comparison against `kiln_ir::interp` that every kernel test uses.
#![allow(dead_code)]

use kiln::ir::dtype::DType;
use kiln::ir::graph::{Graph, ValueId};
use kiln::ir::interp;
use kiln::ir::op::InputKind;
use kiln::ir::shape::Shape;
use kiln::ir::tensor::Tensor;
use kiln_runtime::cuda::CudaDevice;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

/// The first CUDA device; GPU tests are `#[ignore]`d elsewhere, so failing loudly is right.
pub fn device() -> CudaDevice {
    CudaDevice::open(0).unwrap_or_else(|e| panic!("GPU test without a usable device: {e}"))
}

/// A seed that differs between runs (fresh random inputs), printed so a failure can be
/// reproduced with `KILN_TEST_SEED`.
pub fn fresh_seed(test: &str) -> u64 {
    let seed = std::env::var("KILN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("{test}: seed {seed}");
    seed
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Normal random values with standard deviation `std`, rounded to `dtype`.
pub fn random(dtype: DType, shape: &[usize], std: f32, rng: &mut ChaCha8Rng) -> Tensor {
    Tensor::normal(dtype, shape, std, rng)
}

/// Random multiples of `step` in `-2·step..=2·step` of `dtype` (`step` a power of two, so
/// every value is exact in f16 and bf16): a dot product of such values over a few thousand
/// elements is exact in f32 whatever the summation order, so a kernel's f32 accumulation
/// gives the interpreter's f64 result bit for bit, and near-ties of the result are real ties.
pub fn grid(dtype: DType, shape: &[usize], step: f32, rng: &mut ChaCha8Rng) -> Tensor {
    let count = shape.iter().product();
    let values = (0..count)
        .map(|_| rand::Rng::random_range(&mut *rng, -2i32..=2) as f32 * step)
        .collect();
    Tensor::new(dtype, shape, values).unwrap()
}

/// Asserts `got` matches `want` within relative error `tolerance` (‖got − want‖ / ‖want‖);
/// NaN anywhere (an unwritten, poisoned element) fails.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tolerance: f64) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    if let Some(i) = got.data.iter().position(|v| !v.is_finite()) {
        panic!(
            "{what}: element {i} is {} (unwritten or overflowed)",
            got.data[i]
        );
    }
    let error = got.relative_error(want);
    assert!(
        error <= tolerance,
        "{what}: relative error {error:.3e} > {tolerance:.1e}"
    );
    eprintln!("{what}: relative error {error:.3e}");
}

/// The tolerance for results stored in `dtype`.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        _ => 1e-2,
    }
}

/// A graph input (an activation) with `t`'s dtype and shape.
pub fn input(g: &mut Graph, name: &str, t: &Tensor) -> ValueId {
    g.input(name, InputKind::Activation, t.dtype, Shape::of(&t.shape))
        .unwrap()
}

/// The interpreter's output `out` of `graph` on the named `inputs`.
pub fn reference(graph: &Graph, inputs: &[(&str, &Tensor)]) -> Tensor {
    let map: HashMap<String, Tensor> = inputs
        .iter()
        .map(|(n, t)| (n.to_string(), (*t).clone()))
        .collect();
    interp::run(graph, &map).unwrap().remove("out").unwrap()
}
