//! The safe wrapper of the compiled 4-bit grouped dot kernel ([`Int4DotSpec`]): checks the
//! operands against the shape (an error names the operand), deinterleaves A's blocks of 16 as
//! the kernel reads them, and runs the kernel over blocks of columns on rayon threads if
//! asked. Each element of C is computed by one tile in the same order whatever the
//! threading, so results do not depend on it. No code generation.

use super::jit::{CompiledFn, Shared};
use super::parallel::{Parallelism, SendPtr};
use super::CpuError;
use kiln_codegen::cpu::int4_dot_spec::INT4_BLOCK;
use kiln_codegen::cpu::Int4DotSpec;
use std::sync::Arc;

/// The int4 dot ABI (see [`Int4DotSpec`]).
type Int4DotFn = unsafe extern "C" fn(
    *const u8,
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
    usize,
);

/// A compiled 4-bit grouped dot kernel: `C[m × n] = A[m × k] · Wᵀ` with `W[j, t] =
/// (q[j, t] − 8) · scales[j, t / group_size]`, `q` packed two to a byte (low nibble first).
///
/// ```
/// use kiln_codegen::cpu::Int4DotSpec;
/// use kiln_runtime::cpu::{CpuJit, Parallelism};
///
/// let jit = CpuJit::new().unwrap();
/// let kernel = jit.int4_dot(Int4DotSpec::new(16)).unwrap();
/// // One row of 16 ones times one weight row of value 3 (stored 11) at scale 0.5.
/// let a = vec![1.0f32; 16];
/// let b = vec![0xbbu8; 8];
/// let mut c = vec![0.0f32; 1];
/// kernel.run(&a, &b, &[0.5], &mut c, (1, 1, 16), Parallelism::Sequential).unwrap();
/// assert_eq!(c[0], 16.0 * 3.0 * 0.5);
/// ```
#[derive(Clone)]
pub struct Int4DotKernel {
    spec: Int4DotSpec,
    function: Int4DotFn,
    _jit: Arc<Shared>,
}

impl std::fmt::Debug for Int4DotKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Int4DotKernel")
            .field("spec", &self.spec)
            .finish()
    }
}

impl Int4DotKernel {
    /// Columns of C per task.
    pub const COLUMN_BLOCK: usize = 64;

    /// # Safety
    /// `function` must have been compiled from `spec`, by the JIT `jit` holds.
    pub(crate) unsafe fn from_compiled(
        spec: Int4DotSpec,
        function: CompiledFn,
        jit: Arc<Shared>,
    ) -> Int4DotKernel {
        Int4DotKernel {
            spec,
            // SAFETY: the caller guarantees the int4 dot ABI.
            function: unsafe { std::mem::transmute::<*const u8, Int4DotFn>(function.as_ptr()) },
            _jit: jit,
        }
    }

    pub fn spec(&self) -> &Int4DotSpec {
        &self.spec
    }

    /// `C = A · Wᵀ` for `(m, n, k)`: `a` holds `m × k` f32, `b` `n × k / 2` bytes, `scales`
    /// `n × k / group_size` f32 and `c` `m × n` f32 (written). `k` must be a multiple of the
    /// group size.
    pub fn run(
        &self,
        a: &[f32],
        b: &[u8],
        scales: &[f32],
        c: &mut [f32],
        (m, n, k): (usize, usize, usize),
        parallelism: Parallelism,
    ) -> Result<(), CpuError> {
        let group = self.spec.group_size;
        if !k.is_multiple_of(group) {
            return Err(CpuError::operand(
                "k",
                format!("{k} is not a multiple of the group size {group}"),
            ));
        }
        let groups = k / group;
        for (operand, len, need) in [
            ("a", a.len(), m.checked_mul(k)),
            ("b", b.len(), n.checked_mul(k / 2)),
            ("scales", scales.len(), n.checked_mul(groups)),
            ("c", c.len(), m.checked_mul(n)),
        ] {
            let need = need.ok_or_else(|| CpuError::operand(operand, "size overflows usize"))?;
            if len != need {
                return Err(CpuError::operand(
                    operand,
                    format!("length {len}, but m {m}, n {n}, k {k} need {need}"),
                ));
            }
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        // Each block of 16: its even elements, then its odd ones.
        let mut deinterleaved = vec![0.0f32; a.len()];
        for (out, block) in deinterleaved
            .chunks_exact_mut(INT4_BLOCK)
            .zip(a.chunks_exact(INT4_BLOCK))
        {
            for t in 0..INT4_BLOCK / 2 {
                out[t] = block[2 * t];
                out[INT4_BLOCK / 2 + t] = block[2 * t + 1];
            }
        }
        let a_ptr = SendPtr(deinterleaved.as_ptr() as *mut u8);
        let b_ptr = SendPtr(b.as_ptr() as *mut u8);
        let s_ptr = SendPtr(scales.as_ptr() as *mut u8);
        let c_ptr = SendPtr(c.as_mut_ptr().cast::<u8>());
        let function = self.function;
        let blocks = n.div_ceil(Self::COLUMN_BLOCK);
        parallelism.for_each(blocks, |t| {
            let cols = (
                t * Self::COLUMN_BLOCK,
                ((t + 1) * Self::COLUMN_BLOCK).min(n),
            );
            super::clear_upper_vector_state();
            // SAFETY: the operands were checked to hold their matrices, the column ranges lie
            // inside C, and concurrent tasks write disjoint columns.
            unsafe {
                function(
                    a_ptr.get(),
                    b_ptr.get(),
                    s_ptr.get(),
                    c_ptr.get(),
                    k,
                    k / 2,
                    groups,
                    n,
                    k,
                    0,
                    m,
                    cols.0,
                    cols.1,
                )
            };
        });
        Ok(())
    }
}
