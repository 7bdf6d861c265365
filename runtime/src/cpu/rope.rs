//! The safe wrapper of compiled rotary position embedding kernels. Cranelift has no sine or
//! cosine, so this file computes the angles: [`RopeTables`] holds, per token, `cos` and `sin`
//! of `position · theta^(−2i/head_dim)` for the `head_dim / 2` pair indices `i`, computed on
//! the host in f64 exactly as the interpreter's `Op::Rope` does (and rounded to f32 for an f32
//! rotation); the generated kernel only does the rotation multiply-adds. Tables depend on the
//! positions, `head_dim` and `theta` but not on the heads, so one set serves the queries and
//! the keys of every layer of a step.
//!
//! Owns the angle formula, operand checks (a mismatch is an error naming the operand, never
//! undefined behaviour) and the split of tokens into tasks (by size only, so results never
//! depend on the parallelism). No code generation, no compilation.

use super::jit::{CompiledFn, Shared};
use super::parallel::{Parallelism, SendPtr};
use super::CpuError;
use kiln_codegen::cpu::{ElemType, RopeSpec};
use std::sync::Arc;

/// The RoPE ABI (see [`RopeSpec`]).
type RopeFn =
    unsafe extern "C" fn(*const u8, *mut u8, *const u8, *const u8, usize, usize, usize, usize);

/// One table of `tokens × head_dim/2` entries in the rotation precision.
#[derive(Clone, Debug, PartialEq)]
enum Table {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl Table {
    fn zeros(rotation: ElemType, len: usize) -> Table {
        match rotation {
            ElemType::F32 => Table::F32(vec![0.0; len]),
            ElemType::F64 => Table::F64(vec![0.0; len]),
        }
    }

    /// The address of entry `index` (at most the length).
    fn ptr_at(&self, index: usize) -> *const u8 {
        match self {
            Table::F32(t) => t[index..].as_ptr().cast(),
            Table::F64(t) => t[index..].as_ptr().cast(),
        }
    }
}

/// The cos/sin tables of one set of positions for a [`RopeKernel`]: for token `t` and pair
/// index `i < head_dim / 2`, `cos(a)` and `sin(a)` with
/// `a = positions[t] · theta^(−2i / head_dim)`, all in f64 (the interpreter's formula and
/// precision), stored in the kernel's rotation precision.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeTables {
    rotation: ElemType,
    tokens: usize,
    head_dim: usize,
    theta: f64,
    cos: Table,
    sin: Table,
}

impl RopeTables {
    /// Tokens (rows) the tables cover.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn theta(&self) -> f64 {
        self.theta
    }

    /// The precision the tables are stored in (the kernel's rotation precision).
    pub fn rotation(&self) -> ElemType {
        self.rotation
    }

    /// `(cos, sin)` of token `token`, pair index `i`, as stored (widened to f64). Panics
    /// unless `token < tokens()` and `i < head_dim() / 2`.
    pub fn angle(&self, token: usize, i: usize) -> (f64, f64) {
        let k = token * (self.head_dim / 2) + i;
        match (&self.cos, &self.sin) {
            (Table::F32(c), Table::F32(s)) => (f64::from(c[k]), f64::from(s[k])),
            (Table::F64(c), Table::F64(s)) => (c[k], s[k]),
            _ => unreachable!("both tables share the rotation precision"),
        }
    }
}

/// `Op::Rope` needs an even head size (and an empty head rotates nothing).
fn check_head_dim(head_dim: usize) -> Result<(), CpuError> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(CpuError::operand(
            "head_dim",
            format!("head_dim must be even and positive, got {head_dim}"),
        ));
    }
    Ok(())
}

/// A compiled rotary position embedding ("rotate half" pairing, as `Op::Rope`).
///
/// ```
/// use kiln_codegen::cpu::RopeSpec;
/// use kiln_runtime::cpu::{CpuJit, Parallelism};
///
/// let jit = CpuJit::new().unwrap();
/// let rope = jit.rope(RopeSpec::new()).unwrap();
/// // one token at position 1, one head of 4: pairs (0, 2) and (1, 3)
/// let x = [1.0f32, 0.0, 0.0, 1.0];
/// let mut out = [0.0f32; 4];
/// rope.run(&x, &[1], &mut out, 1, 4, 10_000.0, Parallelism::Rayon).unwrap();
/// // pair 0 turns by 1 radian, pair 1 by 10000^(−2/4) ≈ 0.01 radian
/// assert_eq!(out[0], 1f64.cos() as f32);
/// assert_eq!(out[2], 1f64.sin() as f32);
/// assert_eq!(out[1], -(10_000f64.powf(-0.5).sin() as f32));
/// // tables once, then any number of tensors (query and key heads) at those positions
/// let tables = rope.tables(&[1], 4, 10_000.0, Parallelism::Rayon).unwrap();
/// let mut again = [0.0f32; 4];
/// rope.run_with_tables(&x, &tables, &mut again, 1, Parallelism::Rayon).unwrap();
/// assert_eq!(again, out);
/// let err = rope.run(&x, &[1, 2], &mut out, 1, 4, 10_000.0, Parallelism::Rayon).unwrap_err();
/// assert!(err.to_string().contains("`x`"));
/// ```
#[derive(Clone)]
pub struct RopeKernel {
    spec: RopeSpec,
    function: RopeFn,
    _jit: Arc<Shared>,
}

impl std::fmt::Debug for RopeKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RopeKernel")
            .field("spec", &self.spec)
            .finish()
    }
}

impl RopeKernel {
    /// Elements of x per task (at least one whole token), and table entries per task.
    pub const CHUNK: usize = 16 * 1024;

    /// # Safety
    /// `function` must have been compiled from `spec`, by the JIT `jit` holds.
    pub(crate) unsafe fn from_compiled(
        spec: RopeSpec,
        function: CompiledFn,
        jit: Arc<Shared>,
    ) -> RopeKernel {
        RopeKernel {
            spec,
            // SAFETY: the caller guarantees the rope ABI.
            function: unsafe { std::mem::transmute::<*const u8, RopeFn>(function.as_ptr()) },
            _jit: jit,
        }
    }

    pub fn spec(&self) -> &RopeSpec {
        &self.spec
    }

    /// The cos/sin tables of `positions` (one per token) for heads of `head_dim` elements and
    /// base `theta`, in this kernel's rotation precision.
    ///
    /// Per pair index `i`, the frequency is `theta.powf(−2i / head_dim)` and per token the
    /// angle is `position · frequency`, its `sin_cos` taken in f64 — the interpreter's lines.
    /// (The interpreter holds positions as f32, exact up to 2²⁴; larger ones differ.) Errors
    /// name `head_dim` (zero or odd; `Op::Rope` needs it even) or `theta` (not finite and
    /// positive).
    pub fn tables(
        &self,
        positions: &[i32],
        head_dim: usize,
        theta: f64,
        parallelism: Parallelism,
    ) -> Result<RopeTables, CpuError> {
        check_head_dim(head_dim)?;
        if !(theta > 0.0 && theta.is_finite()) {
            return Err(CpuError::operand(
                "theta",
                format!("theta must be positive and finite, got {theta}"),
            ));
        }
        let half = head_dim / 2;
        let tokens = positions.len();
        let len = tokens.checked_mul(half).ok_or_else(|| {
            CpuError::operand(
                "positions",
                format!("{tokens} × {half} table entries overflow usize"),
            )
        })?;
        let frequencies: Vec<f64> = (0..half)
            .map(|i| theta.powf(-2.0 * i as f64 / head_dim as f64))
            .collect();
        let rotation = self.spec.rotation;
        let mut cos = Table::zeros(rotation, len);
        let mut sin = Table::zeros(rotation, len);
        let per_task = (Self::CHUNK / half).max(1);
        let (cos_ptr, sin_ptr): (*mut u8, *mut u8) = match (&mut cos, &mut sin) {
            (Table::F32(c), Table::F32(s)) => (c.as_mut_ptr().cast(), s.as_mut_ptr().cast()),
            (Table::F64(c), Table::F64(s)) => (c.as_mut_ptr().cast(), s.as_mut_ptr().cast()),
            _ => unreachable!("both tables share the rotation precision"),
        };
        let (cos_ptr, sin_ptr) = (SendPtr(cos_ptr), SendPtr(sin_ptr));
        parallelism.for_each(tokens.div_ceil(per_task), |task| {
            let first = task * per_task;
            for (t, &position) in positions.iter().enumerate().skip(first).take(per_task) {
                for (i, &frequency) in frequencies.iter().enumerate() {
                    let (s, c) = (f64::from(position) * frequency).sin_cos();
                    let k = t * half + i;
                    // SAFETY: `k < tokens · half`, the tables' length, in the tables' element
                    // type; tasks write disjoint token rows; the tables outlive the tasks.
                    unsafe {
                        match rotation {
                            ElemType::F64 => {
                                *cos_ptr.get().cast::<f64>().add(k) = c;
                                *sin_ptr.get().cast::<f64>().add(k) = s;
                            }
                            ElemType::F32 => {
                                *cos_ptr.get().cast::<f32>().add(k) = c as f32;
                                *sin_ptr.get().cast::<f32>().add(k) = s as f32;
                            }
                        }
                    }
                }
            }
        });
        Ok(RopeTables {
            rotation,
            tokens,
            head_dim,
            theta,
            cos,
            sin,
        })
    }

    /// `out = RoPE(x)` for `x` of `[tokens, heads, head_dim]` f32 (row-major), token `t` at
    /// `positions[t]`, base `theta`: [`tables`](Self::tables), then
    /// [`run_with_tables`](Self::run_with_tables).
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        x: &[f32],
        positions: &[i32],
        out: &mut [f32],
        heads: usize,
        head_dim: usize,
        theta: f64,
        parallelism: Parallelism,
    ) -> Result<(), CpuError> {
        // the cheap length checks first, so that a mismatch costs no table
        self.check(x, out, positions.len(), heads, head_dim)?;
        let tables = self.tables(positions, head_dim, theta, parallelism)?;
        self.run_with_tables(x, &tables, out, heads, parallelism)
    }

    /// `out = RoPE(x)` for `x` of `[tables.tokens(), heads, tables.head_dim()]` f32 with
    /// precomputed tables. Errors name the operand: `tables` made for another rotation
    /// precision, or `x` / `out` whose length is not `tokens · heads · head_dim`.
    pub fn run_with_tables(
        &self,
        x: &[f32],
        tables: &RopeTables,
        out: &mut [f32],
        heads: usize,
        parallelism: Parallelism,
    ) -> Result<(), CpuError> {
        if tables.rotation != self.spec.rotation {
            return Err(CpuError::operand(
                "tables",
                format!(
                    "tables in {:?}, the kernel rotates in {:?}",
                    tables.rotation, self.spec.rotation
                ),
            ));
        }
        let (tokens, head_dim) = (tables.tokens, tables.head_dim);
        let token_elements = self.check(x, out, tokens, heads, head_dim)?;
        if token_elements == 0 || tokens == 0 {
            return Ok(());
        }
        let half = head_dim / 2;
        let x_ptr = SendPtr(x.as_ptr().cast::<u8>() as *mut u8);
        let out_ptr = SendPtr(out.as_mut_ptr().cast::<u8>());
        let function = self.function;
        let per_task = (Self::CHUNK / token_elements).max(1);
        parallelism.for_each(tokens.div_ceil(per_task), |task| {
            let start = task * per_task;
            let end = (start + per_task).min(tokens);
            let cos = tables.cos.ptr_at(start * half);
            let sin = tables.sin.ptr_at(start * half);
            // SAFETY: x and out hold `tokens · heads · head_dim` f32 with head_dim even; the
            // tables hold `tokens · head_dim/2` entries of the kernel's rotation type, and
            // `cos`/`sin` point at row `start` of them; `start < end ≤ tokens`; tasks write
            // disjoint tokens of `out`.
            super::clear_upper_vector_state();
            unsafe {
                function(
                    x_ptr.get(),
                    out_ptr.get(),
                    cos,
                    sin,
                    heads,
                    head_dim,
                    start,
                    end,
                )
            };
        });
        Ok(())
    }

    /// Checks `x` and `out` against `tokens × heads × head_dim` and `head_dim` for evenness;
    /// returns the elements per token.
    fn check(
        &self,
        x: &[f32],
        out: &[f32],
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<usize, CpuError> {
        check_head_dim(head_dim)?;
        let overflow = || {
            CpuError::operand(
                "x",
                format!("{tokens} × {heads} × {head_dim} overflow usize"),
            )
        };
        let token_elements = heads.checked_mul(head_dim).ok_or_else(overflow)?;
        let want = tokens.checked_mul(token_elements).ok_or_else(overflow)?;
        for (operand, len) in [("x", x.len()), ("out", out.len())] {
            if len != want {
                return Err(CpuError::operand(
                    operand,
                    format!(
                        "length {len}, but {tokens} tokens (positions) × {heads} heads × \
                         head_dim {head_dim} need {want}"
                    ),
                ));
            }
        }
        Ok(token_elements)
    }
}
