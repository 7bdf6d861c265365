//! The safe wrapper of compiled dot-product kernels (`C = alpha·A·Bᵀ + beta·C`, both operands
//! K-contiguous): checks shapes, strides, formats and the alpha/beta the spec can honour (a
//! mismatch is an error naming the operand), then runs the kernel over a grid of row blocks ×
//! column blocks — a column block's rows of B fit in L2 while every row block passes over
//! them — on rayon threads if asked. Owns the cache-blocking and threading of the product; no
//! code generation, no compilation.

use super::element::{Element, Float};
use super::jit::{CompiledFn, Shared};
use super::parallel::{Parallelism, SendPtr};
use super::CpuError;
use kiln_codegen::cpu::DotSpec;
use std::sync::Arc;

/// The dot ABI (see [`DotSpec`]).
type DotFn = unsafe extern "C" fn(
    *const u8,
    *const u8,
    *mut u8,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    f64,
    f64,
);

/// The shape of `C[m × n] = A[m × k] · B[n × k]ᵀ`, with row strides in elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DotShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

impl DotShape {
    /// Contiguous (unpadded) rows: `lda = ldb = k`, `ldc = n`.
    pub fn new(m: usize, n: usize, k: usize) -> DotShape {
        DotShape {
            m,
            n,
            k,
            lda: k,
            ldb: k,
            ldc: n,
        }
    }

    pub fn with_strides(mut self, lda: usize, ldb: usize, ldc: usize) -> DotShape {
        self.lda = lda;
        self.ldb = ldb;
        self.ldc = ldc;
        self
    }
}

/// Checks that a `rows × cols` matrix with row stride `ld` fits a slice of `len` elements:
/// exactly `rows · cols` when unpadded, at least `(rows − 1) · ld + cols` when strided.
fn check_matrix(
    operand: &str,
    len: usize,
    rows: usize,
    cols: usize,
    ld: usize,
) -> Result<(), CpuError> {
    if ld < cols {
        return Err(CpuError::operand(
            operand,
            format!("row stride {ld} is smaller than the {cols} columns"),
        ));
    }
    let overflow = || CpuError::operand(operand, format!("{rows} × {ld} elements overflow usize"));
    if ld == cols {
        let need = rows.checked_mul(cols).ok_or_else(overflow)?;
        if len != need {
            return Err(CpuError::operand(
                operand,
                format!("length {len}, but {rows} × {cols} needs exactly {need}"),
            ));
        }
    } else {
        let need = match rows {
            0 => 0,
            _ => (rows - 1)
                .checked_mul(ld)
                .and_then(|x| x.checked_add(cols))
                .ok_or_else(overflow)?,
        };
        if len < need {
            return Err(CpuError::operand(
                operand,
                format!(
                    "length {len}, but {rows} × {cols} with row stride {ld} needs at least {need}"
                ),
            ));
        }
    }
    Ok(())
}

/// A compiled dot-product kernel.
///
/// ```
/// use kiln_codegen::cpu::{DotSpec, ElemType};
/// use kiln_runtime::cpu::{CpuJit, DotShape, Parallelism};
///
/// let jit = CpuJit::new().unwrap();
/// let gemm = jit.dot(DotSpec::new(ElemType::F64).with_scale(true)).unwrap();
/// // C[2 × 3] = 0.5 · A[2 × 4] · B[3 × 4]ᵀ
/// let a: Vec<f64> = (0..8).map(f64::from).collect();
/// let b: Vec<f64> = (0..12).map(f64::from).collect();
/// let mut c = vec![0.0; 6];
/// gemm.run(&a, &b, &mut c, DotShape::new(2, 3, 4), 0.5, 0.0, Parallelism::Rayon).unwrap();
/// assert_eq!(c[5], 0.5 * (4.0 * 8.0 + 5.0 * 9.0 + 6.0 * 10.0 + 7.0 * 11.0));
/// ```
#[derive(Clone)]
pub struct DotKernel {
    spec: DotSpec,
    function: DotFn,
    _jit: Arc<Shared>,
}

impl std::fmt::Debug for DotKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DotKernel")
            .field("spec", &self.spec)
            .finish()
    }
}

impl DotKernel {
    /// Bytes of B rows a column block keeps hot (a quarter of a typical 1 MiB L2).
    pub const B_BLOCK_BYTES: usize = 256 * 1024;
    /// Rows of C per task, before rounding to the register tile.
    pub const ROW_BLOCK: usize = 64;

    /// # Safety
    /// `function` must have been compiled from `spec`, by the JIT `jit` holds.
    pub(crate) unsafe fn from_compiled(
        spec: DotSpec,
        function: CompiledFn,
        jit: Arc<Shared>,
    ) -> DotKernel {
        DotKernel {
            spec,
            // SAFETY: the caller guarantees the dot ABI.
            function: unsafe { std::mem::transmute::<*const u8, DotFn>(function.as_ptr()) },
            _jit: jit,
        }
    }

    pub fn spec(&self) -> &DotSpec {
        &self.spec
    }

    /// The (row block, column block) sizes of the task grid for `shape`; they depend on the
    /// shape only, so results do not depend on the parallelism.
    pub fn blocks(&self, shape: &DotShape) -> (usize, usize) {
        let tile_rows = self.spec.tile_rows as usize;
        let tile_cols = self.spec.tile_cols as usize;
        let row_bytes = (shape.k * self.spec.b.size() as usize).max(1);
        let cols = (Self::B_BLOCK_BYTES / row_bytes / tile_cols * tile_cols).max(tile_cols);
        let rows = Self::ROW_BLOCK.div_ceil(tile_rows) * tile_rows;
        (rows, cols)
    }

    /// `C = alpha · A · Bᵀ + beta · C` over the whole of C.
    ///
    /// `alpha` must be 1 unless the spec has `scale`, and `beta` 0 unless it has `accumulate`
    /// (with `beta = 0`, C is only written). Errors name the operand: an element type other
    /// than the spec's, a stride smaller than the row, or a slice length that does not match
    /// the shape.
    #[allow(clippy::too_many_arguments)]
    pub fn run<A: Element, B: Element, C: Float>(
        &self,
        a: &[A],
        b: &[B],
        c: &mut [C],
        shape: DotShape,
        alpha: f64,
        beta: f64,
        parallelism: Parallelism,
    ) -> Result<(), CpuError> {
        let spec = &self.spec;
        if A::FORMAT != spec.a {
            return Err(CpuError::operand(
                "a",
                format!(
                    "element format {:?} given, the kernel reads {:?}",
                    A::FORMAT,
                    spec.a
                ),
            ));
        }
        if B::FORMAT != spec.b {
            return Err(CpuError::operand(
                "b",
                format!(
                    "element format {:?} given, the kernel reads {:?}",
                    B::FORMAT,
                    spec.b
                ),
            ));
        }
        if C::TYPE != spec.compute {
            return Err(CpuError::operand(
                "c",
                format!(
                    "element type {:?} given, the kernel writes {:?}",
                    C::TYPE,
                    spec.compute
                ),
            ));
        }
        if alpha != 1.0 && !spec.scale {
            return Err(CpuError::operand(
                "alpha",
                format!("alpha = {alpha} needs a kernel compiled with `scale`"),
            ));
        }
        if beta != 0.0 && !spec.accumulate {
            return Err(CpuError::operand(
                "beta",
                format!("beta = {beta} needs a kernel compiled with `accumulate`"),
            ));
        }
        check_matrix("a", a.len(), shape.m, shape.k, shape.lda)?;
        check_matrix("b", b.len(), shape.n, shape.k, shape.ldb)?;
        check_matrix("c", c.len(), shape.m, shape.n, shape.ldc)?;
        if shape.m == 0 || shape.n == 0 {
            return Ok(());
        }

        let (row_block, col_block) = self.blocks(&shape);
        let row_blocks = shape.m.div_ceil(row_block);
        let col_blocks = shape.n.div_ceil(col_block);
        let a_ptr = SendPtr(a.as_ptr().cast::<u8>() as *mut u8);
        let b_ptr = SendPtr(b.as_ptr().cast::<u8>() as *mut u8);
        let c_ptr = SendPtr(c.as_mut_ptr().cast::<u8>());
        let function = self.function;
        // Column-block-major: a thread's contiguous run of tasks shares column blocks, so the
        // block of B stays in its cache while the rows of A stream past.
        parallelism.for_each(row_blocks * col_blocks, |t| {
            let (cb, rb) = (t / row_blocks, t % row_blocks);
            let rows = (rb * row_block, ((rb + 1) * row_block).min(shape.m));
            let cols = (cb * col_block, ((cb + 1) * col_block).min(shape.n));
            // SAFETY: the operands were checked to hold their matrices with these strides and
            // formats, the ranges lie inside C, and concurrent tasks write disjoint blocks.
            super::clear_upper_vector_state();
            unsafe {
                function(
                    a_ptr.get(),
                    b_ptr.get(),
                    c_ptr.get(),
                    shape.lda,
                    shape.ldb,
                    shape.ldc,
                    shape.k,
                    rows.0,
                    rows.1,
                    cols.0,
                    cols.1,
                    alpha,
                    beta,
                )
            };
        });
        Ok(())
    }
}
