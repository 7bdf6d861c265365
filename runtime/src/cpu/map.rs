//! The safe wrapper of compiled elementwise maps: checks every operand against the spec (count,
//! format, length — a mismatch is an error naming the operand, never undefined behaviour) and
//! runs the kernel over element chunks, on rayon threads if asked. Owns no code generation and
//! no compilation.

use super::element::{Element, Float};
use super::jit::{CompiledFn, Shared};
use super::parallel::{Parallelism, SendPtr};
use super::CpuError;
use kiln_codegen::cpu::MapSpec;
use std::sync::Arc;

/// The map ABI (see [`MapSpec`]).
type MapFn = unsafe extern "C" fn(*const *const u8, *mut u8, usize, usize);

/// A compiled elementwise map `out[i] = expr(in_0[i], …)`.
///
/// ```
/// use kiln_codegen::cpu::{ElemType, MapSpec};
/// use kiln_codegen::expr::Expr;
/// use kiln_runtime::cpu::{CpuJit, Parallelism};
///
/// let jit = CpuJit::new().unwrap();
/// let swiglu = jit
///     .map(MapSpec::new(Expr::input(0).silu() * Expr::input(1), 2, ElemType::F32))
///     .unwrap();
/// let (gate, up) = (vec![1.0f32; 5], vec![2.0f32; 5]);
/// let mut out = vec![0.0f32; 5];
/// swiglu.run(&[&gate, &up], &mut out, Parallelism::Rayon).unwrap();
/// assert!((out[4] - 2.0 / (1.0 + (-1f32).exp())).abs() < 1e-6);
/// // a length mismatch is an error naming the operand
/// let err = swiglu.run(&[&gate, &up[..4]], &mut out, Parallelism::Rayon).unwrap_err();
/// assert!(err.to_string().contains("input 1"));
/// ```
#[derive(Clone)]
pub struct MapKernel {
    spec: MapSpec,
    function: MapFn,
    _jit: Arc<Shared>,
}

impl std::fmt::Debug for MapKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapKernel")
            .field("spec", &self.spec)
            .finish()
    }
}

impl MapKernel {
    /// Elements per task when a call is split over threads (a multiple of every vector
    /// width × unroll, so only the last task has a scalar tail).
    pub const CHUNK: usize = 16 * 1024;

    /// # Safety
    /// `function` must have been compiled from `spec`, by the JIT `jit` holds.
    pub(crate) unsafe fn from_compiled(
        spec: MapSpec,
        function: CompiledFn,
        jit: Arc<Shared>,
    ) -> MapKernel {
        MapKernel {
            spec,
            // SAFETY: the caller guarantees the map ABI.
            function: unsafe { std::mem::transmute::<*const u8, MapFn>(function.as_ptr()) },
            _jit: jit,
        }
    }

    pub fn spec(&self) -> &MapSpec {
        &self.spec
    }

    /// `out[i] = expr(inputs[0][i], …)` for every `i`.
    ///
    /// Errors name the operand: a wrong number of inputs, an input whose element type is not
    /// the format the spec lists, an output type other than the spec's compute type, or an input
    /// whose length differs from `out.len()`.
    pub fn run<I: Element, O: Float>(
        &self,
        inputs: &[&[I]],
        out: &mut [O],
        parallelism: Parallelism,
    ) -> Result<(), CpuError> {
        let spec = &self.spec;
        if inputs.len() != spec.inputs.len() {
            return Err(CpuError::operand(
                "inputs",
                format!(
                    "the map reads {} inputs, {} given",
                    spec.inputs.len(),
                    inputs.len()
                ),
            ));
        }
        if O::TYPE != spec.compute {
            return Err(CpuError::operand(
                "out",
                format!(
                    "element type {:?} given, the map writes {:?}",
                    O::TYPE,
                    spec.compute
                ),
            ));
        }
        for (j, (input, &format)) in inputs.iter().zip(&spec.inputs).enumerate() {
            if I::FORMAT != format {
                return Err(CpuError::operand(
                    format!("input {j}"),
                    format!(
                        "element format {:?} given, the map reads {format:?}",
                        I::FORMAT
                    ),
                ));
            }
            if input.len() != out.len() {
                return Err(CpuError::operand(
                    format!("input {j}"),
                    format!("length {} but `out` has length {}", input.len(), out.len()),
                ));
            }
        }

        let input_pointers: Vec<*const u8> =
            inputs.iter().map(|s| s.as_ptr().cast::<u8>()).collect();
        let pointers = SendPtr(input_pointers.as_ptr() as *mut *const u8);
        let out_ptr = SendPtr(out.as_mut_ptr().cast::<u8>());
        let len = out.len();
        let function = self.function;
        let tasks = len.div_ceil(Self::CHUNK);
        parallelism.for_each(tasks, |t| {
            let start = t * Self::CHUNK;
            let end = (start + Self::CHUNK).min(len);
            // SAFETY: every input has `len` elements of the format the kernel reads, `out` has
            // `len` elements of its compute type, `start ≤ end ≤ len`, tasks write disjoint
            // ranges of `out`, and `pointers` outlives the tasks.
            super::clear_upper_vector_state();
            unsafe {
                function(
                    pointers.get() as *const *const u8,
                    out_ptr.get(),
                    start,
                    end,
                )
            };
        });
        Ok(())
    }
}
