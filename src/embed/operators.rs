//! The Gram-trick operators `𝒜` and `𝒜*` and the dense linear algebra of the ADMM solvers,
//! run by JIT-compiled kernels (specs from `kiln_kernels::admm`), with plain reference
//! implementations over explicit secants for the tests.
//!
//! Secant values live in a dense symmetric n × n matrix (entry `(i, j)` is the secant
//! `(xᵢ − xⱼ)/‖xᵢ − xⱼ‖`; the diagonal and inactive secants hold zero). The inner product of
//! secant vectors is over pairs `i < j`, i.e. half the dense Frobenius product; with it
//! `⟨𝒜(Ψ), w⟩ = ⟨Ψ, 𝒜*(w)⟩`. d × d matrices are row-major and symmetric.
//!
//! Owns: the operator buffers, the kernel handles (compiled once per [`Operators`]; every
//! spec is size-free, so the JIT cache makes that once per process), conjugate gradients, the
//! symmetric eigendecomposition (faer) and low-rank reconstructions. Knows nothing about a
//! particular solver.

use anyhow::{bail, Result};
use kiln_codegen::cpu::ElemType;
use kiln_kernels::admm::{gram, l1_ball, steps};
use kiln_runtime::cpu::{CpuJit, DotKernel, DotShape, Float, MapKernel, Parallelism};

const PAR: Parallelism = Parallelism::Rayon;

/// Rows per block of the block-triangular products (the kernel splits them further).
const BLOCK: usize = 128;

/// A float the operators compute in (f32 or f64).
pub trait Real: Float + Default + PartialOrd + std::fmt::Debug {
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
}

impl Real for f32 {
    fn from_f64(x: f64) -> f32 {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl Real for f64 {
    fn from_f64(x: f64) -> f64 {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
}

/// The compiled kernels every operator call uses.
#[derive(Clone, Debug)]
pub struct Kernels {
    product: DotKernel,
    update: DotKernel,
    secant: MapKernel,
    weight: MapKernel,
    normal_weight: MapKernel,
    axpby: MapKernel,
    shrink: MapKernel,
    clamp: MapKernel,
}

impl Kernels {
    pub fn new(jit: &CpuJit, ty: ElemType) -> Result<Kernels> {
        Ok(Kernels {
            product: jit.dot(gram::product(ty))?,
            update: jit.dot(gram::update(ty))?,
            secant: jit.map(gram::secant_map(ty))?,
            weight: jit.map(gram::weight_map(ty))?,
            normal_weight: jit.map(gram::normal_weight_map(ty))?,
            axpby: jit.map(gram::axpby_map(ty))?,
            shrink: jit.map(l1_ball::shrink_map(ty))?,
            clamp: jit.map(l1_ball::clamp_map(ty))?,
        })
    }
}

/// `1/‖xᵢ − xⱼ‖²` for every pair (zero on the diagonal and for coincident points).
pub fn inverse_squared_distances(x: &[f64], n: usize, d: usize) -> Vec<f64> {
    let mut inv = vec![0.0; n * n];
    for i in 0..n {
        for j in i + 1..n {
            let (a, b) = (&x[i * d..(i + 1) * d], &x[j * d..(j + 1) * d]);
            let dist: f64 = a.iter().zip(b).map(|(p, q)| (p - q) * (p - q)).sum();
            if dist > 0.0 {
                inv[i * n + j] = 1.0 / dist;
                inv[j * n + i] = 1.0 / dist;
            }
        }
    }
    inv
}

/// `𝒜`, `𝒜*` and vector operations over the points `X` (n × d) and an active set of secants.
#[derive(Debug)]
pub struct Operators<T: Real> {
    n: usize,
    d: usize,
    x: Vec<T>,
    xt: Vec<T>,
    /// `1/D` over every secant.
    inv_all: Vec<T>,
    /// `1/D` over the active secants (zero elsewhere).
    inv_active: Vec<T>,
    /// `1/D²` over the active secants (zero elsewhere), for the fused `𝒜*𝒜`.
    inv2_active: Vec<T>,
    /// 0/1 mask of the active secants.
    mask: Vec<T>,
    ones: Vec<T>,
    y: Vec<T>,
    g: Vec<T>,
    left: Vec<T>,
    right: Vec<T>,
    zt: Vec<T>,
    sums: Vec<T>,
    splat: Vec<T>,
    /// The fused `𝒜*𝒜`: `h = diag G`, `Z = LₕX` (n × d), per-block scratch for the weights
    /// (n × n, block b's rows at `b·block·n`), row sums (n) and column sums (blocks × n).
    h: Vec<T>,
    z: Vec<T>,
    weights: Vec<T>,
    row_sums: Vec<T>,
    col_sums: Vec<T>,
    /// Optional f32 copy of the operators for the conjugate gradients' `𝒜*𝒜` (mixed
    /// precision: iterates, residuals and inner products stay in T).
    low: Option<Box<LowPrecision>>,
    axpby_out: std::cell::RefCell<Vec<T>>,
    kernels: Kernels,
}

impl<T: Real> Operators<T> {
    /// Operators over `x` (n × d, row-major) with every secant active.
    pub fn new(jit: &CpuJit, x: &[f64], n: usize, d: usize) -> Result<Operators<T>> {
        if x.len() != n * d {
            bail!("points: {} values for {n} × {d}", x.len());
        }
        let inv = inverse_squared_distances(x, n, d);
        let convert = |v: &[f64]| v.iter().map(|&e| T::from_f64(e)).collect::<Vec<T>>();
        let mut xt = vec![0.0; d * n];
        for i in 0..n {
            for k in 0..d {
                xt[k * n + i] = x[i * d + k];
            }
        }
        let mask: Vec<f64> = inv
            .iter()
            .map(|&v| if v > 0.0 { 1.0 } else { 0.0 })
            .collect();
        Ok(Operators {
            n,
            d,
            x: convert(x),
            xt: convert(&xt),
            inv_all: convert(&inv),
            inv_active: convert(&inv),
            inv2_active: convert(&inv.iter().map(|v| v * v).collect::<Vec<f64>>()),
            mask: convert(&mask),
            ones: vec![T::from_f64(1.0); n.max(d).max(1)],
            y: vec![T::default(); n * d],
            g: vec![T::default(); n * n],
            left: vec![T::default(); n * 2],
            right: vec![T::default(); n * 2],
            zt: vec![T::default(); d * n],
            sums: vec![T::default(); n],
            splat: vec![T::default(); n * n],
            h: vec![T::default(); n],
            z: vec![T::default(); n * d],
            weights: vec![T::default(); n * n],
            row_sums: vec![T::default(); n],
            col_sums: vec![T::default(); n.div_ceil(normal_block(n)) * n],
            low: None,
            axpby_out: std::cell::RefCell::new(Vec::new()),
            kernels: Kernels::new(jit, T::TYPE)?,
        })
    }

    pub fn points(&self) -> usize {
        self.n
    }

    pub fn dim(&self) -> usize {
        self.d
    }

    /// The 0/1 mask of the active secants (n × n, symmetric, zero diagonal).
    pub fn mask(&self) -> &[T] {
        &self.mask
    }

    /// Number of active secants (pairs `i < j`).
    pub fn active_secants(&self) -> usize {
        self.mask.iter().filter(|&&m| m.to_f64() > 0.0).count() / 2
    }

    /// Number of secants between distinct points.
    pub fn secants(&self) -> usize {
        self.inv_all.iter().filter(|&&m| m.to_f64() > 0.0).count() / 2
    }

    /// Restricts the active set to the pairs `(i, j)` with `active[i·n + j]` (made symmetric).
    pub fn set_active(&mut self, active: &[bool]) {
        if let Some(low) = &mut self.low {
            low.ops.set_active(active);
        }
        let n = self.n;
        for i in 0..n {
            for j in 0..n {
                let on = (active[i * n + j] || active[j * n + i])
                    && self.inv_all[i * n + j].to_f64() > 0.0;
                self.inv_active[i * n + j] = if on {
                    self.inv_all[i * n + j]
                } else {
                    T::default()
                };
                let inv = self.inv_active[i * n + j].to_f64();
                self.inv2_active[i * n + j] = T::from_f64(inv * inv);
                self.mask[i * n + j] = T::from_f64(if on { 1.0 } else { 0.0 });
            }
        }
    }

    /// `C[m × n] = A[m × k]·B[n × k]ᵀ`.
    #[allow(clippy::too_many_arguments)]
    pub fn product(
        &self,
        a: &[T],
        b: &[T],
        c: &mut [T],
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        self.kernels
            .product
            .run(a, b, c, DotShape::new(m, n, k), 1.0, 0.0, PAR)?;
        Ok(())
    }

    /// `𝒜(Ψ)` over the active secants into `out` (n × n).
    pub fn apply(&mut self, psi: &[T], out: &mut [T]) -> Result<()> {
        self.apply_inner(psi, out, false)
    }

    /// `𝒜(Ψ)` over every secant into `out` (n × n).
    pub fn apply_all(&mut self, psi: &[T], out: &mut [T]) -> Result<()> {
        self.apply_inner(psi, out, true)
    }

    fn apply_inner(&mut self, psi: &[T], out: &mut [T], all: bool) -> Result<()> {
        let (n, d) = (self.n, self.d);
        let k = &self.kernels;
        // Y = XΨ (Ψ symmetric), G = YXᵀ: its upper block triangle, then mirrored
        k.product.run(
            &self.x,
            psi,
            &mut self.y,
            DotShape::new(n, d, d),
            1.0,
            0.0,
            PAR,
        )?;
        for i0 in (0..n).step_by(BLOCK) {
            let m = BLOCK.min(n - i0);
            let c0 = i0 * n + i0;
            k.product.run(
                &self.y[i0 * d..(i0 + m) * d],
                &self.x[i0 * d..],
                &mut self.g[c0..c0 + (m - 1) * n + (n - i0)],
                DotShape::new(m, n - i0, d).with_strides(d, d, n),
                1.0,
                0.0,
                PAR,
            )?;
        }
        for i in 0..n {
            for j in 0..i {
                self.g[i * n + j] = self.g[j * n + i];
            }
        }
        // G ← h1ᵀ + 1hᵀ − 2G as [h 1]·[1 h]ᵀ − 2G
        for i in 0..n {
            let h = self.g[i * n + i];
            self.left[2 * i] = h;
            self.left[2 * i + 1] = T::from_f64(1.0);
            self.right[2 * i] = T::from_f64(1.0);
            self.right[2 * i + 1] = h;
        }
        k.update.run(
            &self.left,
            &self.right,
            &mut self.g,
            DotShape::new(n, n, 2),
            1.0,
            -2.0,
            PAR,
        )?;
        let inv = if all { &self.inv_all } else { &self.inv_active };
        k.secant.run(&[&self.g, inv], out, PAR)?;
        Ok(())
    }

    /// `𝒜*(w)` over the active secants into `out` (d × d); `w` is n × n symmetric.
    pub fn adjoint(&mut self, w: &[T], out: &mut [T]) -> Result<()> {
        let (n, d) = (self.n, self.d);
        let k = &self.kernels;
        // M = −w ⊙ (1/D), then M_ii = −Σ_j M_ij: M = diag(C1) − C
        k.weight.run(&[w, &self.inv_active], &mut self.g, PAR)?;
        k.product.run(
            &self.g,
            &self.ones[..n],
            &mut self.sums,
            DotShape::new(n, 1, n),
            1.0,
            0.0,
            PAR,
        )?;
        // M = Lh + Lhᵀ with Lh its strict lower triangle plus half its diagonal:
        // 𝒜*(w) = XᵀMX = R + Rᵀ with R = (XᵀLh)X, and XᵀLh needs only Lh's lower block
        // triangle (half the flops of XᵀM)
        for i in 0..n {
            let s = self.sums[i].to_f64();
            self.g[i * n + i] = T::from_f64(-0.5 * s);
            for j in i + 1..n {
                self.g[i * n + j] = T::default();
            }
        }
        for i0 in (0..n).step_by(BLOCK) {
            let m = BLOCK.min(n - i0);
            let i1 = i0 + m;
            k.product.run(
                &self.xt[..(d - 1) * n + i1],
                &self.g[i0 * n..i0 * n + (m - 1) * n + i1],
                &mut self.zt[i0..i0 + (d - 1) * n + m],
                DotShape::new(d, m, i1).with_strides(n, n, n),
                1.0,
                0.0,
                PAR,
            )?;
        }
        self.symmetrized_product(out, |_, sum| sum)
    }

    /// `out[a, b] = finish(a·d + b, P[a, b] + P[b, a])` with `P = Zᵀ·X` from `zt` and `xt`:
    /// the symmetric `d × d` tail that the adjoint and the normal operator share.
    fn symmetrized_product(
        &mut self,
        out: &mut [T],
        finish: impl Fn(usize, f64) -> f64,
    ) -> Result<()> {
        let (n, d) = (self.n, self.d);
        self.kernels.product.run(
            &self.zt,
            &self.xt,
            out,
            DotShape::new(d, d, n),
            1.0,
            0.0,
            PAR,
        )?;
        for a in 0..d {
            for b in 0..=a {
                let sum = out[a * d + b].to_f64() + out[b * d + a].to_f64();
                out[a * d + b] = T::from_f64(finish(a * d + b, sum));
                out[b * d + a] = T::from_f64(finish(b * d + a, sum));
            }
        }
        Ok(())
    }

    /// `out = c1·𝒜*(𝒜(Ψ)) + c2·Ψ` over the active secants, fused (see `kiln_kernels::admm::gram`):
    /// `Y = XΨ`, `h = diag(YXᵀ)`; then per block of rows I (one task each, in parallel, the
    /// kernels sequential inside): `G_I = Y_I·X_{<i₁}ᵀ` (lower block triangle), the weights
    /// `Mᵢⱼ = (2Gᵢⱼ − hᵢ − hⱼ)/Dᵢⱼ²` for `j < i` (zero on and above the diagonal), their row and
    /// column sums, and `Z_I = M_I·X`; finally `Lₕ`'s diagonal `−½sᵢ` (`s` = full row sums of
    /// M) enters as `Zᵀ ← Zᵀ − ½·Xᵀdiag(s)`, `R = ZᵀX` and `out = c1·(R + Rᵀ) + c2·Ψ`.
    pub fn normal(&mut self, psi: &[T], c1: f64, c2: f64, out: &mut [T]) -> Result<()> {
        let (n, d) = (self.n, self.d);
        if psi.len() != d * d || out.len() != d * d {
            bail!("normal: Ψ and out must be {d} × {d}");
        }
        if n == 0 || d == 0 {
            out.fill(T::default());
            return Ok(());
        }
        let k = &self.kernels;
        k.product.run(
            &self.x,
            psi,
            &mut self.y,
            DotShape::new(n, d, d),
            1.0,
            0.0,
            PAR,
        )?;
        for (i, h) in self.h.iter_mut().enumerate() {
            let (y, x) = (&self.y[i * d..(i + 1) * d], &self.x[i * d..(i + 1) * d]);
            *h = T::from_f64(y.iter().zip(x).map(|(a, b)| a.to_f64() * b.to_f64()).sum());
        }
        let block = normal_block(n);
        let blocks = n.div_ceil(block);
        let g = SharedMut(self.g.as_mut_ptr());
        let weights = SharedMut(self.weights.as_mut_ptr());
        let z = SharedMut(self.z.as_mut_ptr());
        let row_sums = SharedMut(self.row_sums.as_mut_ptr());
        let col_sums = SharedMut(self.col_sums.as_mut_ptr());
        let (x, y, xt, h, inv2) = (&self.x, &self.y, &self.xt, &self.h, &self.inv2_active);
        let failure = std::sync::Mutex::new(None);
        let seq = Parallelism::Sequential;
        let task = |b: usize| -> Result<()> {
            let (i0, i1) = (b * block, ((b + 1) * block).min(n));
            let m = i1 - i0;
            // SAFETY: task b touches only rows i0..i1 of the n × n scratch matrices (stored
            // with row stride i1 from b·block·n on, m·i1 ≤ block·n elements), rows i0..i1 of
            // Z and of the row sums, and row b of the column sums; tasks are disjoint and
            // joined before the buffers are used again.
            let (g, w, z, rows, cols) = unsafe {
                (
                    std::slice::from_raw_parts_mut(g.get().add(i0 * n), m * i1),
                    std::slice::from_raw_parts_mut(weights.get().add(i0 * n), m * i1),
                    std::slice::from_raw_parts_mut(z.get().add(i0 * d), m * d),
                    std::slice::from_raw_parts_mut(row_sums.get().add(i0), m),
                    std::slice::from_raw_parts_mut(col_sums.get().add(b * n), n),
                )
            };
            k.product.run(
                &y[i0 * d..i1 * d],
                &x[..i1 * d],
                g,
                DotShape::new(m, i1, d),
                1.0,
                0.0,
                seq,
            )?;
            let mut splat = vec![T::default(); i1];
            cols.fill(T::default());
            for r in 0..m {
                let i = i0 + r;
                splat[..i].fill(h[i]);
                let row = &mut w[r * i1..(r + 1) * i1];
                k.normal_weight.run(
                    &[
                        &g[r * i1..r * i1 + i],
                        &h[..i],
                        &inv2[i * n..i * n + i],
                        &splat[..i],
                    ],
                    &mut row[..i],
                    seq,
                )?;
                row[i..].fill(T::default());
                let mut sum = 0.0;
                for (c, &v) in cols.iter_mut().zip(&row[..i]) {
                    sum += v.to_f64();
                    *c = T::from_f64(c.to_f64() + v.to_f64());
                }
                rows[r] = T::from_f64(sum);
            }
            k.product.run(
                w,
                &xt[..(d - 1) * n + i1],
                z,
                DotShape::new(m, d, i1).with_strides(i1, n, d),
                1.0,
                0.0,
                seq,
            )?;
            Ok(())
        };
        PAR.for_each(blocks, |b| {
            if let Err(e) = task(b) {
                failure
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(e);
            }
        });
        if let Some(e) = failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        // s = row sums + column sums of the strict lower triangle; Zᵀ = (LₕX)ᵀ with the
        // diagonal −½sᵢ of Lₕ
        for i in 0..n {
            let mut s = self.row_sums[i].to_f64();
            for b in 0..blocks {
                s += self.col_sums[b * n + i].to_f64();
            }
            for a in 0..d {
                let v = self.z[i * d + a].to_f64() - 0.5 * s * self.x[i * d + a].to_f64();
                self.zt[a * n + i] = T::from_f64(v);
            }
        }
        self.symmetrized_product(out, |ab, sum| c1 * sum + c2 * psi[ab].to_f64())?;
        Ok(())
    }

    /// Runs the conjugate gradients' `𝒜*𝒜` in f32 from now on (twice the SIMD lanes of f64;
    /// the operator's relative error becomes ~1e-6, while the iterate, residual and inner
    /// products of the conjugate gradients stay in T). A variant: off unless asked for.
    pub fn use_f32_normal(&mut self, jit: &CpuJit) -> Result<()> {
        let x: Vec<f64> = self.x.iter().map(|v| v.to_f64()).collect();
        let mut ops = Operators::<f32>::new(jit, &x, self.n, self.d)?;
        let active: Vec<bool> = self.mask.iter().map(|m| m.to_f64() > 0.0).collect();
        ops.set_active(&active);
        let dd = self.d * self.d;
        self.low = Some(Box::new(LowPrecision {
            ops,
            psi: vec![0.0; dd],
            out: vec![0.0; dd],
        }));
        Ok(())
    }

    /// The conjugate gradients' operator: [`Operators::normal`], in f32 if
    /// [`Operators::use_f32_normal`] was called.
    fn cg_normal(&mut self, psi: &[T], c1: f64, c2: f64, out: &mut [T]) -> Result<()> {
        match &mut self.low {
            None => self.normal(psi, c1, c2, out),
            Some(low) => {
                for (l, v) in low.psi.iter_mut().zip(psi) {
                    *l = v.to_f64() as f32;
                }
                low.ops.normal(&low.psi, c1, c2, &mut low.out)?;
                for (o, l) in out.iter_mut().zip(&low.out) {
                    *o = T::from_f64(f64::from(*l));
                }
                Ok(())
            }
        }
    }

    /// `out = c1·𝒜*(𝒜(Ψ)) + c2·Ψ` unfused (`𝒜` into `scratch`, n × n, then `𝒜*`): the
    /// reference of [`Operators::normal`].
    pub fn normal_unfused(
        &mut self,
        psi: &[T],
        c1: f64,
        c2: f64,
        scratch: &mut [T],
        out: &mut [T],
    ) -> Result<()> {
        self.apply(psi, scratch)?;
        self.adjoint(scratch, out)?;
        self.axpby(c2, psi, c1, out)
    }

    /// `⟨a, b⟩` (dense, in the compute type, accumulated by the dot kernel).
    pub fn inner(&self, a: &[T], b: &[T]) -> Result<f64> {
        if a.len() != b.len() {
            bail!("inner product of lengths {} and {}", a.len(), b.len());
        }
        let mut c = [T::default()];
        self.kernels
            .product
            .run(a, b, &mut c, DotShape::new(1, 1, a.len()), 1.0, 0.0, PAR)?;
        Ok(c[0].to_f64())
    }

    /// `‖a − b‖` (dense).
    pub fn distance(&self, a: &[T], b: &[T]) -> Result<f64> {
        let squared = self.inner(a, a)? + self.inner(b, b)? - 2.0 * self.inner(a, b)?;
        Ok(squared.max(0.0).sqrt())
    }

    /// `y ← α·x + β·y` by the map `x·α + y·β` with α and β broadcast.
    pub fn axpby(&self, alpha: f64, x: &[T], beta: f64, y: &mut [T]) -> Result<()> {
        if x.len() != y.len() {
            bail!("axpby of lengths {} and {}", x.len(), y.len());
        }
        let len = x.len();
        let mut out = self.axpby_out.borrow_mut();
        out.resize(3 * len, T::default());
        let (result, scalars) = out.split_at_mut(len);
        let (a, b) = scalars.split_at_mut(len);
        a.fill(T::from_f64(alpha));
        b.fill(T::from_f64(beta));
        self.kernels.axpby.run(&[x, y, a, b], result, PAR)?;
        y.copy_from_slice(result);
        Ok(())
    }

    /// NILE-Pro's ℓ∞ prox on active secant values: `z = y − Π(y)` with Π the projection onto
    /// the ℓ1 ball of radius `radius` over pairs, i.e. `z = clamp(y, −θ, θ)`. Returns θ.
    pub fn linf_prox(&mut self, y: &[T], radius: f64, z: &mut [T]) -> Result<f64> {
        let theta = self.l1_threshold(y, radius);
        self.splat.fill(T::from_f64(theta));
        self.kernels
            .clamp
            .run(&[y, &self.splat[..y.len()]], z, PAR)?;
        Ok(theta)
    }

    /// Projection of the pair values in `v` (n × n symmetric) onto the ℓ1 ball of radius
    /// `radius` over pairs (the fast threshold and the JIT shrink map).
    pub fn project_l1_ball(&mut self, v: &[T], radius: f64, out: &mut [T]) -> Result<f64> {
        let theta = self.l1_threshold(v, radius);
        self.splat.fill(T::from_f64(theta));
        self.kernels
            .shrink
            .run(&[v, &self.splat[..v.len()]], out, PAR)?;
        Ok(theta)
    }

    /// Pairs appear twice in the dense matrix, so its ℓ1 ball has twice the radius.
    fn l1_threshold(&self, v: &[T], radius: f64) -> f64 {
        let values: Vec<f64> = v.iter().map(|e| e.to_f64()).collect();
        l1_ball::threshold(&values, 2.0 * radius)
    }

    /// `max(x0 − t, 0)`-style maps over short vectors: one of `steps`' specs, compiled through
    /// the JIT cache.
    pub fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    /// Conjugate gradients on `(c1·𝒜*𝒜 + c2·I)Ψ = rhs`, `steps` iterations warm-started from
    /// `psi`; `work` holds three d × d scratch buffers. Returns the final
    /// relative residual.
    pub fn conjugate_gradient(
        &mut self,
        rhs: &[T],
        psi: &mut [T],
        c1: f64,
        c2: f64,
        steps: usize,
        work: &mut CgWork<T>,
    ) -> Result<f64> {
        let CgWork { r, p, ap } = work;
        self.cg_normal(psi, c1, c2, ap)?;
        r.copy_from_slice(rhs);
        self.axpby(-1.0, ap, 1.0, r)?;
        p.copy_from_slice(r);
        let mut rs = self.inner(r, r)?;
        let norm_rhs = self.inner(rhs, rhs)?.sqrt().max(f64::MIN_POSITIVE);
        for _ in 0..steps {
            if rs.sqrt() <= 1e-15 * norm_rhs {
                break;
            }
            self.cg_normal(p, c1, c2, ap)?;
            let pap = self.inner(p, ap)?;
            if pap <= 0.0 {
                break;
            }
            let alpha = rs / pap;
            self.axpby(alpha, p, 1.0, psi)?;
            self.axpby(-alpha, ap, 1.0, r)?;
            let rs_new = self.inner(r, r)?;
            self.axpby(1.0, r, rs_new / rs, p)?;
            rs = rs_new;
        }
        Ok(rs.sqrt() / norm_rhs)
    }
}

/// Scratch buffers of [`Operators::conjugate_gradient`].
#[derive(Debug)]
pub struct CgWork<T> {
    r: Vec<T>,
    p: Vec<T>,
    ap: Vec<T>,
}

impl<T: Real> CgWork<T> {
    /// Buffers for d × d iterates (`n`, the number of points, is not needed any more: the
    /// fused operator keeps its own scratch).
    pub fn new(_n: usize, d: usize) -> CgWork<T> {
        CgWork {
            r: vec![T::default(); d * d],
            p: vec![T::default(); d * d],
            ap: vec![T::default(); d * d],
        }
    }
}

/// The f32 operators of [`Operators::use_f32_normal`] and their conversion buffers.
#[derive(Debug)]
struct LowPrecision {
    ops: Operators<f32>,
    psi: Vec<f32>,
    out: Vec<f32>,
}

/// Rows per task of the fused `𝒜*𝒜` (small blocks for small n, so both threads get work).
fn normal_block(n: usize) -> usize {
    if n >= 512 {
        32
    } else {
        16
    }
}

/// A raw pointer handed to the disjoint tasks of [`Operators::normal`].
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);

impl<T> SharedMut<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

// SAFETY: the tasks of `Operators::normal` write disjoint ranges through it and are joined
// before the owner is used again.
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

/// A symmetric eigendecomposition, eigenvalues in *descending* order; `vectors` is d × d
/// row-major with eigenvector `t` in column `t`.
#[derive(Clone, Debug)]
pub struct Eigen {
    pub values: Vec<f64>,
    pub vectors: Vec<f64>,
    pub dim: usize,
}

/// The eigendecomposition of the symmetric d × d matrix `a` (row-major) by faer.
pub fn eigen(a: &[f64], d: usize) -> Result<Eigen> {
    let m = faer::Mat::<f64>::from_fn(d, d, |i, j| 0.5 * (a[i * d + j] + a[j * d + i]));
    let evd = m
        .self_adjoint_eigen(faer::Side::Lower)
        .map_err(|e| anyhow::anyhow!("eigendecomposition failed: {e:?}"))?;
    // faer may return with the upper AVX state dirty, which makes the SSE code that follows
    // (ours and the JIT's) pay a transition penalty per instruction on Intel cores
    kiln_runtime::cpu::clear_upper_vector_state();
    let (s, u) = (evd.S().column_vector(), evd.U());
    let mut values = vec![0.0; d];
    let mut vectors = vec![0.0; d * d];
    for t in 0..d {
        let src = d - 1 - t;
        values[t] = s[src];
        for i in 0..d {
            vectors[i * d + t] = u[(i, src)];
        }
    }
    Ok(Eigen {
        values,
        vectors,
        dim: d,
    })
}

/// A PSD matrix `W·Wᵀ` of rank `rank`, `W` d × rank row-major (`W[i, t] = U[i, t]·√sₜ`, so the
/// embedding is `Φ = Wᵀ`).
#[derive(Clone, Debug)]
pub struct LowRank {
    pub w: Vec<f64>,
    pub dim: usize,
    pub rank: usize,
    /// The kept eigenvalues, descending.
    pub values: Vec<f64>,
}

impl LowRank {
    /// From an eigendecomposition and new eigenvalues (the positive ones are kept).
    pub fn from_eigen(e: &Eigen, new_values: &[f64]) -> LowRank {
        let d = e.dim;
        let kept: Vec<usize> = (0..d).filter(|&t| new_values[t] > 0.0).collect();
        let rank = kept.len();
        let mut w = vec![0.0; d * rank];
        for (c, &t) in kept.iter().enumerate() {
            let root = new_values[t].sqrt();
            for i in 0..d {
                w[i * rank + c] = e.vectors[i * d + t] * root;
            }
        }
        LowRank {
            w,
            dim: d,
            rank,
            values: kept.iter().map(|&t| new_values[t]).collect(),
        }
    }

    /// The first `r` columns (the top `r` eigenpairs).
    pub fn truncate(&self, r: usize) -> LowRank {
        let r = r.min(self.rank);
        let mut w = vec![0.0; self.dim * r];
        for i in 0..self.dim {
            w[i * r..(i + 1) * r].copy_from_slice(&self.w[i * self.rank..i * self.rank + r]);
        }
        LowRank {
            w,
            dim: self.dim,
            rank: r,
            values: self.values[..r].to_vec(),
        }
    }

    /// `W·Wᵀ` into `out` (d × d) by the product kernel.
    pub fn matrix<T: Real>(&self, ops: &Operators<T>, out: &mut [T]) -> Result<()> {
        if self.rank == 0 {
            out.fill(T::default());
            return Ok(());
        }
        let w: Vec<T> = self.w.iter().map(|&v| T::from_f64(v)).collect();
        ops.product(&w, &w, out, self.dim, self.dim, self.rank)
    }

    /// The embedding `Φ = Wᵀ` (rank × d, row-major), scaled by `scale`.
    pub fn phi(&self, scale: f64) -> Vec<f64> {
        let mut phi = vec![0.0; self.rank * self.dim];
        for i in 0..self.dim {
            for t in 0..self.rank {
                phi[t * self.dim + i] = self.w[i * self.rank + t] * scale;
            }
        }
        phi
    }
}

/// Applies one of `kiln_kernels::admm::steps`' one-input eigenvalue maps to `values`.
pub fn map_values(
    jit: &CpuJit,
    spec: kiln_codegen::cpu::MapSpec,
    values: &[f64],
) -> Result<Vec<f64>> {
    let kernel = jit.map(spec)?;
    let mut out = vec![0.0; values.len()];
    kernel.run(&[values], &mut out, PAR)?;
    Ok(out)
}

/// The eigenvalue soft-threshold `max(s − t, 0)` (NuMax's P step) as a JIT map.
pub fn soft_threshold_values(jit: &CpuJit, values: &[f64], t: f64) -> Result<Vec<f64>> {
    map_values(jit, steps::soft_threshold_nonneg(ElemType::F64, t), values)
}

/// Reference implementations over explicit secants, in f64.
pub mod reference {
    fn secant(x: &[f64], d: usize, i: usize, j: usize) -> Option<Vec<f64>> {
        let v: Vec<f64> = (0..d).map(|k| x[i * d + k] - x[j * d + k]).collect();
        let norm = v.iter().map(|e| e * e).sum::<f64>().sqrt();
        (norm > 0.0).then(|| v.iter().map(|e| e / norm).collect())
    }

    /// `𝒜(Ψ)ᵢⱼ = vᵢⱼᵀΨvᵢⱼ` on the pairs with `mask[i·n + j] > 0` (n × n, symmetric).
    pub fn apply(x: &[f64], n: usize, d: usize, mask: &[f64], psi: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; n * n];
        for i in 0..n {
            for j in i + 1..n {
                if mask[i * n + j] == 0.0 {
                    continue;
                }
                if let Some(v) = secant(x, d, i, j) {
                    let mut value = 0.0;
                    for a in 0..d {
                        for b in 0..d {
                            value += v[a] * psi[a * d + b] * v[b];
                        }
                    }
                    out[i * n + j] = value;
                    out[j * n + i] = value;
                }
            }
        }
        out
    }

    /// `𝒜*(w) = Σ_{i<j} wᵢⱼ·vᵢⱼvᵢⱼᵀ` on the masked pairs (d × d).
    pub fn adjoint(x: &[f64], n: usize, d: usize, mask: &[f64], w: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; d * d];
        for i in 0..n {
            for j in i + 1..n {
                if mask[i * n + j] == 0.0 {
                    continue;
                }
                if let Some(v) = secant(x, d, i, j) {
                    for a in 0..d {
                        for b in 0..d {
                            out[a * d + b] += w[i * n + j] * v[a] * v[b];
                        }
                    }
                }
            }
        }
        out
    }

    /// `C = A·Bᵀ` (A m × k, B n × k).
    pub fn product(a: &[f64], b: &[f64], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|t| a[i * k + t] * b[j * k + t]).sum();
            }
        }
        c
    }
}
