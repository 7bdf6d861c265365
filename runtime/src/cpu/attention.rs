//! Softmax attention on the CPU with the reference interpreter's semantics
//! (`kiln_ir::interp`, `Op::Attention` and `Op::AttentionDecode`): grouped-query, a per-query
//! count of visible leading keys, f32 data. Built from three compiled kernels — a dot kernel
//! for the scores `q·Kᵀ`, the row softmax kernel (scaled, masked), and a dot kernel for `P·V`.
//! Owns the decomposition of attention into those calls, its scratch buffers and threading;
//! no code generation.
//!
//! Layouts (row-major, as the interpreter's tensors): `q` and `out` `[batch, s, q_heads, d]`,
//! `k` and `v` `[batch, t, kv_heads, d]`; query head `h` reads KV head `h / (q_heads /
//! kv_heads)`.
//!
//! Decomposition: one task per (sequence, KV head), on rayon threads if asked. A task
//! 1. transposes the visible rows of its V block once into a scratch `[d, keys]` buffer — the
//!    dot kernel wants both operands K-contiguous, and the transpose is shared by the
//!    `q_heads / kv_heads` query heads of the group (no accumulate form of the dot kernel is
//!    needed);
//! 2. for each query head of the group and each block of [`CpuAttention::QUERY_BLOCK`]
//!    queries: scores `q · Kᵀ` on the dot kernel straight from the `q` and `k` slices (row
//!    strides `q_heads·d` and `kv_heads·d`, no copy), for the keys the block's last query
//!    sees; the softmax kernel over each query's visible keys (scaled by `scale`; the keys
//!    beyond are written as 0, never read); then `P · V` for the block on the dot kernel over
//!    the same keys (a query's masked probabilities are exact zeros, and those V rows are
//!    visible to a later query of the block, so they hold real values), into a scratch block
//!    copied to the output rows. One difference from the interpreter follows: an infinite or
//!    NaN value in a V row makes the earlier queries of its block NaN (`0 · ∞`), where the
//!    interpreter, which never reads that row for them, stays finite. K and V rows beyond what the last query sees are never read and may
//!    hold garbage, as in a KV cache.
//!
//! Every task's arithmetic depends on the shapes only, so results are bit-identical for every
//! [`Parallelism`]. Numerics: the interpreter accumulates in f64, these kernels in f32 (the
//! softmax as documented on [`SoftmaxSpec`]); `cpu_attention` tests measure ≤ 1e-5 relative
//! error.

use super::dot::{DotKernel, DotShape};
use super::parallel::{Parallelism, SendPtr};
use super::softmax::{SoftmaxKernel, SoftmaxShape};
use super::{CpuError, CpuJit};
use kiln_codegen::cpu::{DotSpec, ElemType, SoftmaxSpec};

/// The sizes of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AttentionShape {
    pub batch: usize,
    /// Queries per sequence (`S`).
    pub queries: usize,
    /// Key rows per sequence (`T`, the cache capacity for decode).
    pub keys: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    pub fn new(
        batch: usize,
        queries: usize,
        keys: usize,
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> AttentionShape {
        AttentionShape {
            batch,
            queries,
            keys,
            q_heads,
            kv_heads,
            head_dim,
        }
    }

    /// Elements of `q` (and `out`).
    fn q_len(&self) -> Option<usize> {
        self.batch
            .checked_mul(self.queries)?
            .checked_mul(self.q_heads)?
            .checked_mul(self.head_dim)
    }

    /// Elements of `k` (and `v`).
    fn kv_len(&self) -> Option<usize> {
        self.batch
            .checked_mul(self.keys)?
            .checked_mul(self.kv_heads)?
            .checked_mul(self.head_dim)
    }
}

/// Softmax attention from compiled CPU kernels (f32).
///
/// ```
/// use kiln_runtime::cpu::{AttentionShape, CpuAttention, CpuJit, Parallelism};
///
/// let attention = CpuAttention::new(&CpuJit::new().unwrap()).unwrap();
/// // one sequence, one query attending to two keys of one head, d = 1
/// let (q, k, v) = ([1.0f32], [0.0f32, 0.0], [2.0f32, 4.0]);
/// let mut out = [f32::NAN];
/// let shape = AttentionShape::new(1, 1, 2, 1, 1, 1);
/// attention
///     .run_prefill(&q, &k, &v, shape, 1.0, true, &mut out, Parallelism::Sequential)
///     .unwrap();
/// assert_eq!(out, [3.0]);
/// ```
#[derive(Clone, Debug)]
pub struct CpuAttention {
    /// `C = A·Bᵀ` with a 4 × 2 register tile: the scores, and `P·V` for blocks of ≥ 4 queries.
    dot: DotKernel,
    softmax: SoftmaxKernel,
    /// `C = A·Bᵀ` with a 1 × 4 register tile: `P·V` for fewer than 4 queries (decode).
    row_dot: DotKernel,
}

/// Which leading keys each query of a sequence sees: `first + i · step` for query `i`.
#[derive(Clone, Copy)]
struct Visible {
    first: usize,
    step: usize,
}

impl Visible {
    fn of(self, i: usize) -> usize {
        self.first + i * self.step
    }
}

impl CpuAttention {
    /// Queries per scores block (bounds the scores scratch to `QUERY_BLOCK × keys`).
    pub const QUERY_BLOCK: usize = 64;

    /// Compiles (or takes from `jit`'s cache) the three f32 kernels.
    pub fn new(jit: &CpuJit) -> Result<CpuAttention, CpuError> {
        Ok(CpuAttention {
            dot: jit.dot(DotSpec::new(ElemType::F32))?,
            softmax: jit.softmax(SoftmaxSpec::new(ElemType::F32))?,
            row_dot: jit.dot(DotSpec::new(ElemType::F32).with_tile(1, 4))?,
        })
    }

    /// `Op::Attention { causal, scale }`: `out = softmax(scale · q·Kᵀ) · V` per sequence and
    /// query head; when `causal`, query `i` sees keys `j < i + T − S + 1` (the queries are the
    /// last `S` of `T`, which needs `T ≥ S`), else all `T`.
    ///
    /// `q`, `out`: `[batch, S, q_heads, d]`; `k`, `v`: `[batch, T, kv_heads, d]` (see
    /// [`AttentionShape`]). Every element of `out` is written. Errors name the operand: a
    /// slice length that does not match the shape (`q`, `k`, `v`, `out`), heads that do not
    /// divide (`kv_heads`), fewer keys than queries when causal or no keys (`k`).
    #[allow(clippy::too_many_arguments)]
    pub fn run_prefill(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: AttentionShape,
        scale: f32,
        causal: bool,
        out: &mut [f32],
        parallelism: Parallelism,
    ) -> Result<(), CpuError> {
        check_operands(q, k, v, out, &shape)?;
        let (s, t) = (shape.queries, shape.keys);
        if causal && t < s {
            return Err(CpuError::operand(
                "k",
                format!("causal attention needs at least as many keys ({t}) as queries ({s})"),
            ));
        }
        if t == 0 && s > 0 && shape.batch > 0 {
            return Err(CpuError::operand("k", "no keys to attend to"));
        }
        // causal: query i sees i + t − s + 1 keys (t ≥ s was checked)
        let visible = if causal {
            Visible {
                first: t + 1 - s,
                step: 1,
            }
        } else {
            Visible { first: t, step: 0 }
        };
        self.run(q, k, v, shape, scale, out, parallelism, |_| visible);
        Ok(())
    }

    /// `Op::AttentionDecode { scale }`: attention of the `S` newest tokens of each sequence
    /// against a KV cache that already holds them; sequence `b` has `lengths[b]` valid cache
    /// rows (`S ≤ lengths[b] ≤ T`, the capacity) and its query `i` sees keys
    /// `j < lengths[b] − (S − 1 − i)`. Cache rows at or beyond `lengths[b]` are never read.
    ///
    /// `lengths`: `[batch]`, integers stored as f32 (as the interpreter's tensors hold them).
    /// Layouts and the other errors as [`run_prefill`](Self::run_prefill); a length that is
    /// not an integer in `S..=T` is an error naming `lengths`.
    #[allow(clippy::too_many_arguments)]
    pub fn run_decode(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        lengths: &[f32],
        shape: AttentionShape,
        scale: f32,
        out: &mut [f32],
        parallelism: Parallelism,
    ) -> Result<(), CpuError> {
        check_operands(q, k, v, out, &shape)?;
        let (s, t) = (shape.queries, shape.keys);
        if lengths.len() != shape.batch {
            return Err(CpuError::operand(
                "lengths",
                format!(
                    "length {}, but the batch has {} sequences",
                    lengths.len(),
                    shape.batch
                ),
            ));
        }
        let mut firsts = Vec::with_capacity(shape.batch);
        for (b, &length) in lengths.iter().enumerate() {
            if !(length >= s as f32 && length <= t as f32 && length.fract() == 0.0) {
                return Err(CpuError::operand(
                    "lengths",
                    format!(
                        "sequence {b} has length {length}, expected an integer in {s}..={t} \
                         (at least the {s} new tokens, at most the cache capacity)"
                    ),
                ));
            }
            // query i sees length − (s − 1 − i) = (length − s + 1) + i keys
            firsts.push((length as usize + 1).saturating_sub(s));
        }
        self.run(q, k, v, shape, scale, out, parallelism, |b| Visible {
            first: firsts[b],
            step: 1,
        });
        Ok(())
    }

    /// The checked body of both entry points: one task per (sequence, KV head).
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: AttentionShape,
        scale: f32,
        out: &mut [f32],
        parallelism: Parallelism,
        visible: impl Fn(usize) -> Visible + Sync,
    ) {
        let AttentionShape {
            batch,
            queries: s,
            keys: t,
            q_heads,
            kv_heads,
            head_dim: d,
        } = shape;
        if batch == 0 || s == 0 || q_heads == 0 || d == 0 {
            return;
        }
        let group = q_heads / kv_heads;
        let (ldq, ldk) = (q_heads * d, kv_heads * d);
        let out_len = out.len();
        let out_ptr = SendPtr(out.as_mut_ptr());
        let fail = |what: &str, e: CpuError| -> ! {
            panic!("attention {what} call on checked operands failed: {e}")
        };
        parallelism.for_each(batch * kv_heads, |task| {
            let (b, kv) = (task / kv_heads, task % kv_heads);
            let seen = visible(b);
            let used = seen.of(s - 1); // keys the last query sees: the most any query reads
            let k_row = |j: usize| ((b * t + j) * kv_heads + kv) * d;

            // Vᵀ of the visible rows: vt[dd · used + j] = v[b, j, kv, dd].
            let mut vt = vec![0.0f32; d * used];
            for j in 0..used {
                let row = &v[k_row(j)..k_row(j) + d];
                for (dd, &x) in row.iter().enumerate() {
                    vt[dd * used + j] = x;
                }
            }

            let block = Self::QUERY_BLOCK.min(s);
            let mut scores = vec![0.0f32; block * used];
            let mut block_out = vec![0.0f32; block * d];
            for h in kv * group..(kv + 1) * group {
                for i0 in (0..s).step_by(Self::QUERY_BLOCK) {
                    let i1 = (i0 + Self::QUERY_BLOCK).min(s);
                    let rows = i1 - i0;
                    let n = seen.of(i1 - 1);
                    let q_first = ((b * s + i0) * q_heads + h) * d;
                    let q_block = &q[q_first..q_first + (rows - 1) * ldq + d];
                    let k_block = &k[k_row(0)..k_row(0) + (n - 1) * ldk + d];
                    let p = &mut scores[..rows * n];
                    let dot = DotShape::new(rows, n, d).with_strides(ldq, ldk, n);
                    self.dot
                        .run(q_block, k_block, p, dot, 1.0, 0.0, Parallelism::Sequential)
                        .unwrap_or_else(|e| fail("scores", e));
                    let softmax = SoftmaxShape::new(rows, n).with_valid(seen.of(i0), seen.step);
                    self.softmax
                        .run(p, softmax, f64::from(scale), Parallelism::Sequential)
                        .unwrap_or_else(|e| fail("softmax", e));
                    // P · V for the block, over the keys its last query sees: the masked
                    // probabilities are exact zeros, and those V rows are visible to a later
                    // query of the block (real values, not cache garbage).
                    let values = if rows >= 4 { &self.dot } else { &self.row_dot };
                    let pv = DotShape::new(rows, d, n).with_strides(n, used, d);
                    let o_block = &mut block_out[..rows * d];
                    values
                        .run(&*p, &vt, o_block, pv, 1.0, 0.0, Parallelism::Sequential)
                        .unwrap_or_else(|e| fail("values", e));
                    for (r, row) in o_block.chunks_exact(d).enumerate() {
                        let o = ((b * s + i0 + r) * q_heads + h) * d;
                        assert!(o + d <= out_len);
                        // SAFETY: `out` holds this row (checked above); each (b, i, h) row is
                        // written by exactly one task, and no other reference to it exists.
                        let out_row =
                            unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(o), d) };
                        out_row.copy_from_slice(row);
                    }
                }
            }
        });
    }
}

/// Checks the slice lengths and head counts of an attention call.
fn check_operands(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    shape: &AttentionShape,
) -> Result<(), CpuError> {
    if shape.kv_heads == 0 || !shape.q_heads.is_multiple_of(shape.kv_heads) {
        return Err(CpuError::operand(
            "kv_heads",
            format!(
                "{} query heads cannot be grouped over {} KV heads",
                shape.q_heads, shape.kv_heads
            ),
        ));
    }
    let overflow = |operand: &str| CpuError::operand(operand, format!("{shape:?} overflows usize"));
    let q_len = shape.q_len().ok_or_else(|| overflow("q"))?;
    let kv_len = shape.kv_len().ok_or_else(|| overflow("k"))?;
    for (operand, len, need, layout) in [
        ("q", q.len(), q_len, "[batch, queries, q_heads, head_dim]"),
        ("k", k.len(), kv_len, "[batch, keys, kv_heads, head_dim]"),
        ("v", v.len(), kv_len, "[batch, keys, kv_heads, head_dim]"),
        (
            "out",
            out.len(),
            q_len,
            "[batch, queries, q_heads, head_dim]",
        ),
    ] {
        if len != need {
            return Err(CpuError::operand(
                operand,
                format!("length {len}, but {layout} of {shape:?} needs {need}"),
            ));
        }
    }
    Ok(())
}
