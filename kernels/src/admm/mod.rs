//! # ADMM kernels of the near-isometric-embedding solvers (NuMax, FroMax, NILE-Pro)
//!
//! The solvers of `kiln::embed` spend their time in a handful of kernels, all JIT-compiled by
//! the Cranelift CPU backend from the specs built here (this crate never compiles or runs
//! anything; `kiln_runtime::cpu::CpuJit` does):
//!
//! - [`gram`]: the Gram-trick operators. `𝒜(Ψ)ᵢⱼ = (Gᵢᵢ + Gⱼⱼ − 2Gᵢⱼ)/Dᵢⱼ` with `G = XΨXᵀ`
//!   (two NT products, a rank-2 update `h·1ᵀ + 1·hᵀ − 2G` as a K = 2 product, and a map), and
//!   `𝒜*(w) = Xᵀ(diag(C1) − C)X` with `Cᵢⱼ = wᵢⱼ/Dᵢⱼ` (a map, a row-sum product and two NT
//!   products), plus the vector operations of the conjugate-gradient inner solves (inner
//!   products as dot kernels, `y ← αx + βy` as a map with α and β as broadcast inputs, so
//!   they are run-time scalars);
//! - [`steps`]: the elementwise proximal and dual steps as maps: the clip of NuMax's `q`, the
//!   eigenvalue soft-threshold, FroMax's scaled non-negative part, the dual updates;
//! - [`l1_ball`]: projection onto the ℓ1 ball (NILE-Pro's ℓ∞ prox by Moreau decomposition):
//!   the threshold by a sorting reference and by a fast pivoting algorithm, and the elementwise
//!   shrink and clamp maps that apply it.
//!
//! Every spec carries no problem size, so one compilation serves every iteration of a solve
//! (constants such as δ or η are compiled in; run-time scalars are inputs or dot-kernel
//! `alpha`/`beta`).

pub mod gram;
pub mod l1_ball;
pub mod steps;
