//! The safe wrapper of compiled row softmax kernels (in place, scaled, a per-row count of
//! taking-part leading elements and zeros after them; see [`SoftmaxSpec`]): checks the shape,
//! the counts and the slice, then runs the kernel over blocks of rows, on rayon threads if
//! asked. Owns the row blocking; no code generation, no compilation.

use super::element::Float;
use super::jit::{CompiledFn, Shared};
use super::parallel::{Parallelism, SendPtr};
use super::CpuError;
use kiln_codegen::cpu::SoftmaxSpec;
use std::sync::Arc;

/// The softmax ABI (see [`SoftmaxSpec`]).
type SoftmaxFn = unsafe extern "C" fn(*mut u8, usize, usize, usize, usize, usize, usize, f64);

/// `rows` rows of `n` elements, row `r` starting at element `r · ld`, of which the leading
/// `valid + r · valid_step` take part in row `r`'s softmax.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SoftmaxShape {
    pub rows: usize,
    pub n: usize,
    pub ld: usize,
    pub valid: usize,
    pub valid_step: usize,
}

impl SoftmaxShape {
    /// Contiguous rows (`ld = n`), every element taking part.
    pub fn new(rows: usize, n: usize) -> SoftmaxShape {
        SoftmaxShape {
            rows,
            n,
            ld: n,
            valid: n,
            valid_step: 0,
        }
    }

    pub fn with_ld(mut self, ld: usize) -> SoftmaxShape {
        self.ld = ld;
        self
    }

    /// Row `r` takes part with its leading `valid + r · valid_step` elements.
    pub fn with_valid(mut self, valid: usize, valid_step: usize) -> SoftmaxShape {
        self.valid = valid;
        self.valid_step = valid_step;
        self
    }

    /// How many leading elements of row `r` take part (`None` on overflow).
    pub fn valid_of(&self, r: usize) -> Option<usize> {
        r.checked_mul(self.valid_step)?.checked_add(self.valid)
    }

    /// Checks the counts and that the rows fit `len` elements; errors name the operand.
    pub(crate) fn check(&self, operand: &str, len: usize) -> Result<(), CpuError> {
        if self.ld < self.n {
            return Err(CpuError::operand(
                operand,
                format!(
                    "row stride {} is smaller than the {} columns",
                    self.ld, self.n
                ),
            ));
        }
        if self.rows > 0 {
            let last = self.rows - 1;
            match self.valid_of(last) {
                Some(v) if v <= self.n => {}
                _ => {
                    return Err(CpuError::operand(
                        "valid",
                        format!(
                            "row {last} would take part with {} + {last} · {} elements, beyond \
                             the row length {}",
                            self.valid, self.valid_step, self.n
                        ),
                    ))
                }
            }
        }
        let need = match self.rows {
            0 => Some(0),
            rows => (rows - 1)
                .checked_mul(self.ld)
                .and_then(|x| x.checked_add(self.n)),
        };
        match need {
            Some(need) if len >= need => Ok(()),
            Some(need) => Err(CpuError::operand(
                operand,
                format!(
                    "length {len}, but {} rows of {} with row stride {} need at least {need}",
                    self.rows, self.n, self.ld
                ),
            )),
            None => Err(CpuError::operand(
                operand,
                format!("{} × {} elements overflow usize", self.rows, self.ld),
            )),
        }
    }
}

/// A compiled row softmax kernel.
///
/// ```
/// use kiln_codegen::cpu::{ElemType, SoftmaxSpec};
/// use kiln_runtime::cpu::{CpuJit, Parallelism, SoftmaxShape};
///
/// let jit = CpuJit::new().unwrap();
/// let softmax = jit.softmax(SoftmaxSpec::new(ElemType::F32)).unwrap();
/// // two rows of 3; row 0 takes part with 2 elements, row 1 with 3; x scaled by 0.5 first
/// let mut x = vec![2.0f32, 2.0, f32::NAN, 0.0, 0.0, 0.0];
/// let shape = SoftmaxShape::new(2, 3).with_valid(2, 1);
/// softmax.run(&mut x, shape, 0.5, Parallelism::Sequential).unwrap();
/// assert_eq!(x[..3], [0.5, 0.5, 0.0]);
/// assert!((x[3] - 1.0 / 3.0).abs() < 1e-7);
/// ```
#[derive(Clone)]
pub struct SoftmaxKernel {
    spec: SoftmaxSpec,
    function: SoftmaxFn,
    _jit: Arc<Shared>,
}

impl std::fmt::Debug for SoftmaxKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftmaxKernel")
            .field("spec", &self.spec)
            .finish()
    }
}

impl SoftmaxKernel {
    /// Rows per task.
    pub const ROW_BLOCK: usize = 16;

    /// # Safety
    /// `function` must have been compiled from `spec`, by the JIT `jit` holds.
    pub(crate) unsafe fn from_compiled(
        spec: SoftmaxSpec,
        function: CompiledFn,
        jit: Arc<Shared>,
    ) -> SoftmaxKernel {
        SoftmaxKernel {
            spec,
            // SAFETY: the caller guarantees the softmax ABI.
            function: unsafe { std::mem::transmute::<*const u8, SoftmaxFn>(function.as_ptr()) },
            _jit: jit,
        }
    }

    pub fn spec(&self) -> &SoftmaxSpec {
        &self.spec
    }

    /// Softmax of `scale·x` in place over every row of `shape` (each row's leading
    /// `valid + r · valid_step` elements; the rest of its `n` are written as 0).
    ///
    /// Errors name the operand: an element type other than the spec's (`x`), a count beyond
    /// the row length (`valid`), a stride smaller than the row or a slice too short (`x`).
    pub fn run<T: Float>(
        &self,
        x: &mut [T],
        shape: SoftmaxShape,
        scale: f64,
        parallelism: Parallelism,
    ) -> Result<(), CpuError> {
        if T::TYPE != self.spec.compute {
            return Err(CpuError::operand(
                "x",
                format!(
                    "element type {:?} given, the kernel computes in {:?}",
                    T::TYPE,
                    self.spec.compute
                ),
            ));
        }
        shape.check("x", x.len())?;
        let blocks = shape.rows.div_ceil(Self::ROW_BLOCK);
        let x_ptr = SendPtr(x.as_mut_ptr().cast::<u8>());
        let function = self.function;
        parallelism.for_each(blocks, |block| {
            let start = block * Self::ROW_BLOCK;
            let end = (start + Self::ROW_BLOCK).min(shape.rows);
            super::clear_upper_vector_state();
            // SAFETY: the slice holds every row with this stride, every row's count is at most
            // n (checked on the last row, and counts grow with the row), and concurrent tasks
            // write disjoint rows.
            unsafe {
                function(
                    x_ptr.get(),
                    shape.ld,
                    shape.n,
                    start,
                    end,
                    shape.valid,
                    shape.valid_step,
                    scale,
                )
            };
        });
        Ok(())
    }
}
