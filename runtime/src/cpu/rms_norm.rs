//! The safe wrapper of compiled RMSNorm kernels (plain, or with the residual add fused): checks
//! every operand against the spec and the row count (a mismatch is an error naming the
//! operand, never undefined behaviour), then runs the kernel over tasks of whole rows, on rayon
//! threads if asked. Rows are split by size only and every row is computed by the same code, so
//! results never depend on the parallelism. Owns no code generation and no compilation.

use super::jit::{CompiledFn, Shared};
use super::parallel::{Parallelism, SendPtr};
use super::CpuError;
use kiln_codegen::cpu::RmsNormSpec;
use std::sync::Arc;

/// The RMSNorm ABI (see [`RmsNormSpec`]).
type RmsNormFn = unsafe extern "C" fn(
    *const u8,
    *const u8,
    *const u8,
    *mut u8,
    *mut u8,
    usize,
    usize,
    usize,
    f64,
);

/// A compiled row RMSNorm: `out[r, i] = x[r, i] · (1/√(mean_i x[r, i]² + eps)) · weight[i]`,
/// optionally on `s = x + residual` (also written out) — the interpreter's `Op::RmsNorm` and
/// `Op::AddRmsNorm` in f32.
///
/// ```
/// use kiln_codegen::cpu::RmsNormSpec;
/// use kiln_runtime::cpu::{CpuJit, Parallelism};
///
/// let jit = CpuJit::new().unwrap();
/// let norm = jit.rms_norm(RmsNormSpec::new()).unwrap();
/// // two rows of three
/// let x = [3.0f32, 0.0, 4.0, 1.0, 1.0, 1.0];
/// let weight = [1.0f32, 1.0, 2.0];
/// let mut out = [0.0f32; 6];
/// norm.run(&x, &weight, &mut out, 2, 1e-6, Parallelism::Rayon).unwrap();
/// let inverse = 1.0 / (25.0f32 / 3.0 + 1e-6).sqrt();
/// assert!((out[2] - 4.0 * inverse * 2.0).abs() < 1e-6);
/// // the fused form is a different kernel; a length mismatch is an error naming the operand
/// let fused = jit.rms_norm(RmsNormSpec::new().with_residual(true)).unwrap();
/// let mut sum = [0.0f32; 6];
/// let err = fused
///     .run_residual(&x, &x[..5], &weight, &mut sum, &mut out, 2, 1e-6, Parallelism::Rayon)
///     .unwrap_err();
/// assert!(err.to_string().contains("`residual`"));
/// ```
#[derive(Clone)]
pub struct RmsNormKernel {
    spec: RmsNormSpec,
    function: RmsNormFn,
    _jit: Arc<Shared>,
}

impl std::fmt::Debug for RmsNormKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RmsNormKernel")
            .field("spec", &self.spec)
            .finish()
    }
}

/// Checks that `operand` holds `want` elements (`rows × hidden`).
fn check_len(
    operand: &str,
    len: usize,
    want: usize,
    rows: usize,
    hidden: usize,
) -> Result<(), CpuError> {
    if len != want {
        return Err(CpuError::operand(
            operand,
            format!(
                "length {len}, but {rows} rows × hidden {hidden} (the weight's length) need {want}"
            ),
        ));
    }
    Ok(())
}

impl RmsNormKernel {
    /// Elements per task when a call is split over threads (at least one whole row).
    pub const CHUNK: usize = 16 * 1024;

    /// # Safety
    /// `function` must have been compiled from `spec`, by the JIT `jit` holds.
    pub(crate) unsafe fn from_compiled(
        spec: RmsNormSpec,
        function: CompiledFn,
        jit: Arc<Shared>,
    ) -> RmsNormKernel {
        RmsNormKernel {
            spec,
            // SAFETY: the caller guarantees the rms_norm ABI.
            function: unsafe { std::mem::transmute::<*const u8, RmsNormFn>(function.as_ptr()) },
            _jit: jit,
        }
    }

    pub fn spec(&self) -> &RmsNormSpec {
        &self.spec
    }

    /// Rows per task for rows of `hidden` elements; depends on `hidden` only.
    pub fn rows_per_task(hidden: usize) -> usize {
        (Self::CHUNK / hidden.max(1)).max(1)
    }

    /// The plain norm: `out = RmsNorm(x) · weight` over `rows` rows of `hidden = weight.len()`.
    ///
    /// `eps` must be positive and finite (as `Op::RmsNorm` requires). Errors name the operand:
    /// `x` or `out` whose length is not `rows · hidden`, `eps`, or `residual` when the kernel
    /// was compiled with the fused residual add (use [`run_residual`](Self::run_residual)).
    pub fn run(
        &self,
        x: &[f32],
        weight: &[f32],
        out: &mut [f32],
        rows: usize,
        eps: f32,
        parallelism: Parallelism,
    ) -> Result<(), CpuError> {
        if self.spec.residual {
            return Err(CpuError::operand(
                "residual",
                "the kernel was compiled with a fused residual add: call `run_residual`",
            ));
        }
        self.launch(x, None, weight, out, rows, eps, parallelism)
    }

    /// The fused form: `residual_out = x + residual`, then `out = RmsNorm(residual_out) ·
    /// weight`, over `rows` rows of `hidden = weight.len()` (the two results of
    /// `Op::AddRmsNorm`, in that order).
    ///
    /// Errors as [`run`](Self::run), plus `residual` or `residual_out` of the wrong length, and
    /// `residual` when the kernel was compiled without the fused add.
    #[allow(clippy::too_many_arguments)]
    pub fn run_residual(
        &self,
        x: &[f32],
        residual: &[f32],
        weight: &[f32],
        residual_out: &mut [f32],
        out: &mut [f32],
        rows: usize,
        eps: f32,
        parallelism: Parallelism,
    ) -> Result<(), CpuError> {
        if !self.spec.residual {
            return Err(CpuError::operand(
                "residual",
                "the kernel was compiled without a fused residual add: call `run`",
            ));
        }
        self.launch(
            x,
            Some((residual, residual_out)),
            weight,
            out,
            rows,
            eps,
            parallelism,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        x: &[f32],
        fused: Option<(&[f32], &mut [f32])>,
        weight: &[f32],
        out: &mut [f32],
        rows: usize,
        eps: f32,
        parallelism: Parallelism,
    ) -> Result<(), CpuError> {
        let hidden = weight.len();
        let want = rows.checked_mul(hidden).ok_or_else(|| {
            CpuError::operand("x", format!("{rows} rows × hidden {hidden} overflow usize"))
        })?;
        check_len("x", x.len(), want, rows, hidden)?;
        let (residual_ptr, residual_out_ptr) = match fused {
            Some((residual, residual_out)) => {
                check_len("residual", residual.len(), want, rows, hidden)?;
                check_len("residual_out", residual_out.len(), want, rows, hidden)?;
                (
                    residual.as_ptr().cast::<u8>(),
                    residual_out.as_mut_ptr().cast::<u8>(),
                )
            }
            None => (std::ptr::null(), std::ptr::null_mut()),
        };
        check_len("out", out.len(), want, rows, hidden)?;
        if !(eps > 0.0 && eps.is_finite()) {
            return Err(CpuError::operand(
                "eps",
                format!("eps must be positive and finite, got {eps}"),
            ));
        }
        if want == 0 {
            return Ok(());
        }

        let x_ptr = SendPtr(x.as_ptr().cast::<u8>() as *mut u8);
        let residual_ptr = SendPtr(residual_ptr as *mut u8);
        let weight_ptr = SendPtr(weight.as_ptr().cast::<u8>() as *mut u8);
        let out_ptr = SendPtr(out.as_mut_ptr().cast::<u8>());
        let residual_out_ptr = SendPtr(residual_out_ptr);
        let function = self.function;
        let per_task = Self::rows_per_task(hidden);
        parallelism.for_each(rows.div_ceil(per_task), |t| {
            let start = t * per_task;
            let end = (start + per_task).min(rows);
            // SAFETY: x, out (and, fused, residual and residual_out) hold `rows · hidden` f32
            // and weight `hidden`; `start ≤ end ≤ rows`; tasks write disjoint rows of `out`
            // and `residual_out`; the null residual pointers are not read without `residual`.
            super::clear_upper_vector_state();
            unsafe {
                function(
                    x_ptr.get(),
                    residual_ptr.get(),
                    weight_ptr.get(),
                    out_ptr.get(),
                    residual_out_ptr.get(),
                    hidden,
                    start,
                    end,
                    f64::from(eps),
                )
            };
        });
        Ok(())
    }
}
