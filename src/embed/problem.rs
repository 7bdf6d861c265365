//! The embedding problem in principal coordinates, and how good an embedding is.
//!
//! Secants are differences of points, so they lie in the span of the centred points. The
//! solvers therefore work in that span's principal coordinates (`x' = (x − mean)·V`, columns
//! by decreasing variance, directions with variance below 1e-12 of the largest dropped): this
//! is exact — a component of Ψ outside the span changes no `vᵀΨv` and only adds to any of the
//! objectives — and it turns translating squares' d = 256 into 80. Embeddings are lifted back
//! with `Φ = Φ'·Vᵀ`. Principal coordinates also make PCA the leading coordinates.
//!
//! Quality: [`Isometry`] is the range `[min, max]` of `‖Φv‖²` over every secant; the optimal
//! rescale `c² = 2/(min + max)` gives the isometry constant `δ = (max − min)/(max + min)`,
//! which is what every method (and PCA) is judged by.

use super::data::Dataset;
use super::operators::{eigen, inverse_squared_distances, LowRank, Operators};
use anyhow::{bail, Result};
use kiln_runtime::cpu::CpuJit;

/// Points in principal coordinates.
#[derive(Clone, Debug)]
pub struct Problem {
    pub n: usize,
    /// Dimension of the data.
    pub d_full: usize,
    /// Dimension of the span of the centred points.
    pub d: usize,
    /// n × d, row-major.
    pub x: Vec<f64>,
    /// d_full × d, row-major: column `t` is principal direction `t`.
    pub basis: Vec<f64>,
    /// Variances (eigenvalues of the scatter matrix), descending.
    pub variances: Vec<f64>,
    /// `1/‖xᵢ − xⱼ‖²`, n × n.
    pub inv_d: Vec<f64>,
}

impl Problem {
    pub fn new(data: &Dataset, jit: &CpuJit) -> Result<Problem> {
        let (n, d_full) = (data.n, data.d);
        if n < 2 {
            bail!("{}: at least 2 points are needed", data.name);
        }
        let mut mean = vec![0.0; d_full];
        for row in data.x.chunks(d_full) {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += v / n as f64;
            }
        }
        let xc: Vec<f64> = (0..n * d_full)
            .map(|e| data.x[e] - mean[e % d_full])
            .collect();
        let ops = Operators::<f64>::new(jit, &[0.0; 2], 2, 1)?;
        let (values, basis_full, coords_full, rank_cap);
        if d_full <= n {
            // scatter Xcᵀ·Xc (d × d) from Xcᵀ
            let mut xct = vec![0.0; d_full * n];
            for i in 0..n {
                for k in 0..d_full {
                    xct[k * n + i] = xc[i * d_full + k];
                }
            }
            let mut scatter = vec![0.0; d_full * d_full];
            ops.product(&xct, &xct, &mut scatter, d_full, d_full, n)?;
            let e = eigen(&scatter, d_full)?;
            values = e.values.clone();
            basis_full = e.vectors.clone();
            rank_cap = d_full;
            coords_full = None;
        } else {
            // Gram Xc·Xcᵀ (n × n): direction t is Xcᵀuₜ/√λₜ, coordinates √λₜ·uₜ
            let mut gram = vec![0.0; n * n];
            ops.product(&xc, &xc, &mut gram, n, n, d_full)?;
            let e = eigen(&gram, n)?;
            values = e.values.clone();
            basis_full = e.vectors.clone();
            rank_cap = n;
            coords_full = Some(e);
        }
        let top = values.first().copied().unwrap_or(0.0).max(0.0);
        let d = values.iter().take_while(|&&v| v > 1e-12 * top).count();
        if d == 0 {
            bail!("{}: all points coincide; there is no secant", data.name);
        }
        let mut basis = vec![0.0; d_full * d];
        let mut x = vec![0.0; n * d];
        match coords_full {
            None => {
                for a in 0..d_full {
                    basis[a * d..(a + 1) * d]
                        .copy_from_slice(&basis_full[a * rank_cap..a * rank_cap + d]);
                }
                for i in 0..n {
                    for t in 0..d {
                        x[i * d + t] = (0..d_full)
                            .map(|a| xc[i * d_full + a] * basis[a * d + t])
                            .sum();
                    }
                }
            }
            Some(e) => {
                for t in 0..d {
                    let root = values[t].sqrt();
                    for i in 0..n {
                        x[i * d + t] = root * e.vectors[i * n + t];
                    }
                    for a in 0..d_full {
                        basis[a * d + t] = (0..n)
                            .map(|i| xc[i * d_full + a] * e.vectors[i * n + t])
                            .sum::<f64>()
                            / root;
                    }
                }
            }
        }
        let inv_d = inverse_squared_distances(&x, n, d);
        Ok(Problem {
            n,
            d_full,
            d,
            x,
            basis,
            variances: values[..d].to_vec(),
            inv_d,
        })
    }

    /// Number of secants between distinct points.
    pub fn secants(&self) -> usize {
        self.inv_d.iter().filter(|&&v| v > 0.0).count() / 2
    }

    /// `Φ = Φ'·Vᵀ`: an r × d embedding in principal coordinates to r × d_full.
    pub fn lift(&self, phi: &[f64], r: usize) -> Vec<f64> {
        let (d, d_full) = (self.d, self.d_full);
        let mut out = vec![0.0; r * d_full];
        for t in 0..r {
            for a in 0..d_full {
                out[t * d_full + a] = (0..d).map(|k| phi[t * d + k] * self.basis[a * d + k]).sum();
            }
        }
        out
    }

    /// The isometry of `W·Wᵀ` truncated to its first r columns, for every r = 1..=rank
    /// (`P = X'W`, then `‖Φv‖²` accumulated one column at a time over all secants).
    pub fn truncation_curve(&self, lowrank: &LowRank) -> Vec<Isometry> {
        let (n, d, rank) = (self.n, self.d, lowrank.rank);
        let mut p = vec![0.0; n * rank];
        for i in 0..n {
            for t in 0..rank {
                p[i * rank + t] = (0..d)
                    .map(|k| self.x[i * d + k] * lowrank.w[k * rank + t])
                    .sum();
            }
        }
        self.curve_of(&p, rank)
    }

    /// PCA's curve: the leading r principal coordinates.
    pub fn pca_curve(&self, max_rank: usize) -> Vec<Isometry> {
        let r = max_rank.min(self.d);
        let mut p = vec![0.0; self.n * r];
        for i in 0..self.n {
            p[i * r..(i + 1) * r].copy_from_slice(&self.x[i * self.d..i * self.d + r]);
        }
        self.curve_of(&p, r)
    }

    fn curve_of(&self, p: &[f64], rank: usize) -> Vec<Isometry> {
        let n = self.n;
        let pairs: Vec<(usize, usize, f64)> = (0..n)
            .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
            .map(|(i, j)| (i, j, self.inv_d[i * n + j]))
            .filter(|&(_, _, w)| w > 0.0)
            .collect();
        let mut cumulative = vec![0.0; pairs.len()];
        let mut curve = Vec::with_capacity(rank);
        for t in 0..rank {
            let mut iso = Isometry::EMPTY;
            for (c, &(i, j, w)) in cumulative.iter_mut().zip(&pairs) {
                let diff = p[i * rank + t] - p[j * rank + t];
                *c += diff * diff * w;
                iso.include(*c);
            }
            curve.push(iso);
        }
        curve
    }
}

/// The smallest r (1-based) whose isometry constant is at most `target`.
pub fn smallest_rank(curve: &[Isometry], target: f64) -> Option<usize> {
    curve
        .iter()
        .position(|iso| iso.delta() <= target * (1.0 + 1e-9))
        .map(|p| p + 1)
}

/// The range of `‖Φv‖²` over a set of secants.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Isometry {
    pub min: f64,
    pub max: f64,
}

impl Isometry {
    pub const EMPTY: Isometry = Isometry {
        min: f64::INFINITY,
        max: f64::NEG_INFINITY,
    };

    pub fn include(&mut self, value: f64) {
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    /// Over the masked entries of a dense n × n secant matrix.
    pub fn of_values(values: &[f64], mask: &[f64]) -> Isometry {
        let mut iso = Isometry::EMPTY;
        for (&v, &m) in values.iter().zip(mask) {
            if m > 0.0 {
                iso.include(v);
            }
        }
        iso
    }

    /// The optimal rescale of `‖Φv‖²` (multiply Φ by its square root).
    pub fn scale(&self) -> f64 {
        if self.min + self.max > 0.0 {
            2.0 / (self.min + self.max)
        } else {
            1.0
        }
    }

    /// The isometry constant after the optimal rescale.
    pub fn delta(&self) -> f64 {
        if self.min + self.max > 0.0 {
            (self.max - self.min) / (self.max + self.min)
        } else {
            1.0
        }
    }

    /// `(1 − min, max − 1)` after scaling `‖Φv‖²` by `scale`.
    pub fn deltas_at(&self, scale: f64) -> (f64, f64) {
        (1.0 - scale * self.min, scale * self.max - 1.0)
    }
}
