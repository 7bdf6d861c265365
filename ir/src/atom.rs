//! Atom W4A4 quantization on the CPU: the format, the offline weight quantization and the
//! reference of the mixed-precision linear (`Op::AtomLinear`).
//!
//! Atom (arXiv 2310.19102) multiplies 4-bit activations by 4-bit weights. Per linear layer
//! `y = x · wᵀ` with `w [N, K]`:
//!
//! - **Reorder.** The `outliers` input channels with the largest mean square activation
//!   (from calibration) move to the end: `permutation [K]` lists the channels in their new
//!   order, the ordinary ones first (ascending), then the outliers (ascending). The weight
//!   columns are permuted offline to match; the activations are permuted at run time (a
//!   gather, later fused into the producing RMSNorm).
//! - **Ordinary channels** (`K − outliers`, groups of `group_size` along K): symmetric INT4 in
//!   [−8, 7] with an f16 scale per (row, group) for the weights (`weight_clip` of the absolute
//!   maximum) and per (token, group) for the activations (`activation_clip`, computed at run
//!   time).
//! - **Outlier channels**: symmetric INT8 in [−128, 127], one f16 scale per weight row and
//!   per token.
//! - **Product**: integer dot products per group, each multiplied by its two scales, summed
//!   in f64 (the kernels: i32 per group, f32 across groups), rounded to `x`'s dtype.
//!
//! The quantization rule is `Op::Quantize`'s (`crate::op::QuantScheme`, computed by
//! `crate::quant`), so this module, the interpreter and the runtime's host step share one
//! definition. Layouts here are logical (one value per element,
//! i4/i8 tensors holding the integers); the packed device layout (unsigned nibbles `q + 8`,
//! two per byte) is the kernels'. It owns the format and its reference math; it must not
//! build graphs (the `atom` pass does) or touch a device.

use crate::dtype::DType;
use crate::op::QuantScheme;
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};

/// The Atom options of a model (the `--atom` flags).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AtomOptions {
    /// Channels per INT4 scale along K (128 in the paper).
    pub group_size: usize,
    /// Input channels kept in INT8 per linear layer (128 in the paper).
    pub outliers: usize,
    /// Fraction of each weight group's absolute maximum mapped to 7 (1.0 = no clipping).
    pub weight_clip: f32,
    /// The same for the activations, per token and group, at run time.
    pub activation_clip: f32,
    /// Bits of the KV cache: 16 (the model's dtype) or 4 (asymmetric INT4 per token and KV
    /// head, an f16 scale and zero each; the `atom` pass quantizes the rows a `KvAppend`
    /// writes, so decode attention reads what a 4-bit cache holds).
    #[serde(default = "sixteen")]
    pub kv_bits: u8,
}

fn sixteen() -> u8 {
    16
}

impl Default for AtomOptions {
    fn default() -> AtomOptions {
        AtomOptions {
            group_size: 128,
            outliers: 128,
            weight_clip: 1.0,
            activation_clip: 1.0,
            kv_bits: 16,
        }
    }
}

/// Why Atom options do not fit a layer.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum AtomError {
    #[error("atom: group_size must be a positive even number, found {0}")]
    GroupSize(usize),
    #[error("atom: {what} must be in (0, 1], found {value}")]
    Clip { what: &'static str, value: f32 },
    #[error("atom: kv_bits must be 4 or 16, found {0}")]
    KvBits(u8),
    #[error(
        "atom: `{layer}` has {k} input channels: outliers ({outliers}) must be fewer than that"
    )]
    TooManyOutliers {
        layer: String,
        k: usize,
        outliers: usize,
    },
    #[error(
        "atom: `{layer}` has {k} input channels, {outliers} of them outliers: the other {rest} \
         are not a multiple of group_size {group_size} (choose outliers so that K − outliers \
         divides into groups, e.g. --atom-outliers {suggestion})"
    )]
    Groups {
        layer: String,
        k: usize,
        outliers: usize,
        rest: usize,
        group_size: usize,
        suggestion: usize,
    },
    #[error("atom: `{layer}`: {what}")]
    Shape { layer: String, what: String },
}

impl AtomOptions {
    /// Checks the options on their own (any layer).
    pub fn validate(&self) -> Result<(), AtomError> {
        if self.group_size == 0 || !self.group_size.is_multiple_of(2) {
            return Err(AtomError::GroupSize(self.group_size));
        }
        if self.kv_bits != 4 && self.kv_bits != 16 {
            return Err(AtomError::KvBits(self.kv_bits));
        }
        for (what, value) in [
            ("weight_clip", self.weight_clip),
            ("activation_clip", self.activation_clip),
        ] {
            if !(value > 0.0 && value <= 1.0) {
                return Err(AtomError::Clip { what, value });
            }
        }
        Ok(())
    }

    /// Checks that a linear layer `layer` with `k` input channels can be quantized: the
    /// outliers leave a whole number of groups.
    pub fn check_layer(&self, layer: &str, k: usize) -> Result<(), AtomError> {
        self.validate()?;
        if self.outliers >= k {
            return Err(AtomError::TooManyOutliers {
                layer: layer.to_string(),
                k,
                outliers: self.outliers,
            });
        }
        let rest = k - self.outliers;
        if !rest.is_multiple_of(self.group_size) {
            return Err(AtomError::Groups {
                layer: layer.to_string(),
                k,
                outliers: self.outliers,
                rest,
                group_size: self.group_size,
                suggestion: self.outliers + rest % self.group_size,
            });
        }
        Ok(())
    }

    /// The INT4 scheme of the ordinary channels, with `clip`.
    pub fn int4_scheme(&self, clip: f32) -> QuantScheme {
        QuantScheme {
            bits: 4,
            group_size: self.group_size,
            symmetric: true,
            clip,
        }
    }

    /// The KV-cache scheme for rows of `head_dim`: asymmetric 4-bit, one scale and zero per
    /// token and head.
    pub fn kv_scheme(&self, head_dim: usize) -> QuantScheme {
        QuantScheme {
            bits: 4,
            group_size: head_dim,
            symmetric: false,
            clip: 1.0,
        }
    }

    /// The INT8 scheme of the outlier channels: one scale per row.
    pub fn int8_scheme(&self) -> QuantScheme {
        QuantScheme {
            bits: 8,
            group_size: self.outliers.max(1),
            symmetric: true,
            clip: 1.0,
        }
    }
}

/// The channel order of one linear layer: the `outliers` channels of largest
/// `mean_square` go last; both parts keep ascending channel order. Ties go to the lower
/// channel (it stays ordinary). NaN counts as largest.
pub fn outlier_permutation(mean_square: &[f64], outliers: usize) -> Vec<usize> {
    let mut by_size: Vec<usize> = (0..mean_square.len()).collect();
    by_size.sort_by(|&a, &b| {
        let (x, y) = (mean_square[a], mean_square[b]);
        y.partial_cmp(&x)
            .unwrap_or_else(|| y.is_nan().cmp(&x.is_nan()).reverse())
            .then(b.cmp(&a))
    });
    let mut is_outlier = vec![false; mean_square.len()];
    for &channel in by_size.iter().take(outliers) {
        is_outlier[channel] = true;
    }
    let ordinary = (0..mean_square.len()).filter(|&c| !is_outlier[c]);
    let outlying = (0..mean_square.len()).filter(|&c| is_outlier[c]);
    ordinary.chain(outlying).collect()
}

/// One linear layer's weight in Atom's format (logical layout: one integer per element).
#[derive(Clone, Debug, PartialEq)]
pub struct AtomWeight {
    /// `[K]` i32: the input channel order (see the module doc).
    pub permutation: Tensor,
    /// `[N, K − outliers]` i4: the ordinary columns, permuted.
    pub int4: Tensor,
    /// `[N, (K − outliers) / group_size]` f16.
    pub int4_scales: Tensor,
    /// `[N, outliers]` i8: the outlier columns, permuted.
    pub int8: Tensor,
    /// `[N, 1]` f16.
    pub int8_scales: Tensor,
}

impl AtomWeight {
    /// The tensors under their suffixes, as the `atom` pass names the weight inputs.
    pub fn parts(&self) -> [(&'static str, &Tensor); 5] {
        [
            (PERMUTATION, &self.permutation),
            (INT4, &self.int4),
            (INT4_SCALES, &self.int4_scales),
            (INT8, &self.int8),
            (INT8_SCALES, &self.int8_scales),
        ]
    }
}

/// Weight-input suffixes of an Atom linear, in operand order after the activation.
pub const PERMUTATION: &str = "atom_permutation";
pub const INT4: &str = "atom_int4";
pub const INT4_SCALES: &str = "atom_int4_scales";
pub const INT8: &str = "atom_int8";
pub const INT8_SCALES: &str = "atom_int8_scales";

/// Quantizes `weight [N, K]` of layer `layer` with channel order `permutation` (from
/// [`outlier_permutation`]) per `options` (round to nearest).
pub fn quantize_weight(
    layer: &str,
    weight: &Tensor,
    permutation: &[usize],
    options: &AtomOptions,
) -> Result<AtomWeight, AtomError> {
    let shape_error = |what: String| AtomError::Shape {
        layer: layer.to_string(),
        what,
    };
    let [n, k] = weight.shape[..] else {
        return Err(shape_error(format!(
            "the weight must be [N, K], found {:?}",
            weight.shape
        )));
    };
    options.check_layer(layer, k)?;
    let mut sorted = permutation.to_vec();
    sorted.sort_unstable();
    if sorted != (0..k).collect::<Vec<_>>() {
        return Err(shape_error(format!(
            "the channel order is not a permutation of 0..{k}"
        )));
    }
    let ordinary = k - options.outliers;
    let mut low = Vec::with_capacity(n * ordinary);
    let mut high = Vec::with_capacity(n * options.outliers);
    for row in weight.data.chunks(k) {
        low.extend(permutation[..ordinary].iter().map(|&c| row[c]));
        high.extend(permutation[ordinary..].iter().map(|&c| row[c]));
    }
    let low = Tensor::f32(&[n, ordinary], low);
    let high = Tensor::f32(&[n, options.outliers], high);
    let [int4, int4_scales] = two(crate::quant::quantize(
        &low,
        &options.int4_scheme(options.weight_clip),
    ));
    let [int8, int8_scales] = match options.outliers {
        0 => [
            Tensor::full(DType::I8, &[n, 0], 0.0),
            Tensor::full(DType::F16, &[n, 1], 1.0),
        ],
        _ => two(crate::quant::quantize(&high, &options.int8_scheme())),
    };
    Ok(AtomWeight {
        permutation: Tensor::new(
            DType::I32,
            &[k],
            permutation.iter().map(|&c| c as f32).collect(),
        )
        .expect("k values"),
        int4,
        int4_scales,
        int8,
        int8_scales,
    })
}

/// The first two results of a symmetric `quantize`.
fn two(mut parts: Vec<Tensor>) -> [Tensor; 2] {
    let scales = parts.swap_remove(1);
    [parts.swap_remove(0), scales]
}

/// The Atom linear `x [T, K] · wᵀ → [T, N]` in f64 (before rounding to `x`'s dtype): the
/// activations permuted, quantized per token (INT4 groups and an INT8 outlier block) and
/// multiplied by the quantized weight group by group. `x` is row-major with `K` columns.
pub fn linear(x: &Tensor, weight: &AtomWeight, options: &AtomOptions) -> Vec<f64> {
    let k = weight.permutation.len();
    let n = weight.int4.shape[0];
    let tokens = x.len() / k.max(1);
    let ordinary = k - options.outliers;
    let permutation: Vec<usize> = weight
        .permutation
        .data
        .iter()
        .map(|&c| c as usize)
        .collect();
    let mut low = Vec::with_capacity(tokens * ordinary);
    let mut high = Vec::with_capacity(tokens * options.outliers);
    for row in x.data.chunks(k) {
        low.extend(permutation[..ordinary].iter().map(|&c| row[c]));
        high.extend(permutation[ordinary..].iter().map(|&c| row[c]));
    }
    let [a4, s4] = two(crate::quant::quantize(
        &Tensor::f32(&[tokens, ordinary], low),
        &options.int4_scheme(options.activation_clip),
    ));
    let outliers = options.outliers;
    let (a8, s8) = match outliers {
        0 => (Vec::new(), vec![0.0; tokens]),
        _ => {
            let [a8, s8] = two(crate::quant::quantize(
                &Tensor::f32(&[tokens, outliers], high),
                &options.int8_scheme(),
            ));
            (a8.data, s8.data)
        }
    };
    let groups = ordinary / options.group_size;
    let g = options.group_size;
    let mut out = vec![0.0f64; tokens * n];
    for t in 0..tokens {
        for j in 0..n {
            let mut sum = 0.0f64;
            for group in 0..groups {
                // Integers: exact in i64.
                let dot: i64 = (group * g..(group + 1) * g)
                    .map(|c| {
                        a4.data[t * ordinary + c] as i64 * weight.int4.data[j * ordinary + c] as i64
                    })
                    .sum();
                sum += dot as f64
                    * s4.data[t * groups + group] as f64
                    * weight.int4_scales.data[j * groups + group] as f64;
            }
            if outliers > 0 {
                let dot: i64 = (0..outliers)
                    .map(|c| {
                        a8[t * outliers + c] as i64 * weight.int8.data[j * outliers + c] as i64
                    })
                    .sum();
                sum += dot as f64 * s8[t] as f64 * weight.int8_scales.data[j] as f64;
            }
            out[t * n + j] = sum;
        }
    }
    out
}

/// Mean square of each input channel over the rows of `x [.., K]` (calibration).
pub fn channel_mean_square(x: &Tensor) -> Vec<f64> {
    let k = *x.shape.last().unwrap_or(&0);
    let mut sums = vec![0.0f64; k];
    let rows = x.len() / k.max(1);
    for row in x.data.chunks(k.max(1)) {
        for (sum, &v) in sums.iter_mut().zip(row) {
            *sum += v as f64 * v as f64;
        }
    }
    sums.iter().map(|s| s / rows.max(1) as f64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn outliers_go_last_in_ascending_order_ties_to_the_lower_channel() {
        let ms = [1.0, 9.0, 3.0, 9.0, 0.5, 7.0];
        // Largest: 1 and 3 (9.0), then 5 (7.0); with 2 outliers channel 1 and 3.
        assert_eq!(outlier_permutation(&ms, 2), vec![0, 2, 4, 5, 1, 3]);
        // A tie at the cut: 9, 9 then 7; with one outlier the tie goes to the higher channel
        // (the lower stays ordinary).
        assert_eq!(outlier_permutation(&ms, 1), vec![0, 1, 2, 4, 5, 3]);
        assert_eq!(outlier_permutation(&ms, 0), vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn layer_checks_name_the_layer_and_suggest_outliers() {
        let options = AtomOptions::default();
        let error = options.check_layer("q_proj", 576).unwrap_err().to_string();
        assert!(
            error.contains("`q_proj`") && error.contains("576") && error.contains("outliers 192"),
            "{error}"
        );
        assert!(options.check_layer("q_proj", 4096).is_ok());
        let error = options.check_layer("tiny", 128).unwrap_err().to_string();
        assert!(error.contains("fewer"), "{error}");
        let bad = AtomOptions {
            group_size: 0,
            ..options
        };
        assert_eq!(bad.validate(), Err(AtomError::GroupSize(0)));
    }

    /// With integer-valued inputs small enough to be exact (every group's max maps to 7 and
    /// every value is a multiple of the scale), the Atom linear is the exact product.
    #[test]
    fn exact_on_values_the_grid_represents() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let (t, n, k) = (3, 5, 12);
        let options = AtomOptions {
            group_size: 4,
            outliers: 4,
            ..AtomOptions::default()
        };
        // Each group of 4 ordinary values holds a ±7 so the scale is 1; outliers hold ±127.
        let grid = |rng: &mut rand_chacha::ChaCha8Rng, c: usize| -> f32 {
            let v = rng.random_range(-7..=7) as f32;
            if c >= 8 {
                if c == 8 {
                    127.0
                } else {
                    rng.random_range(-127..=127) as f32
                }
            } else if c.is_multiple_of(4) {
                7.0
            } else {
                v
            }
        };
        let x: Vec<f32> = (0..t * k).map(|i| grid(&mut rng, i % k)).collect();
        let w: Vec<f32> = (0..n * k).map(|i| grid(&mut rng, i % k)).collect();
        let permutation: Vec<usize> = (0..k).collect();
        let weight = quantize_weight(
            "grid",
            &Tensor::f32(&[n, k], w.clone()),
            &permutation,
            &options,
        )
        .unwrap();
        let y = linear(&Tensor::f32(&[t, k], x.clone()), &weight, &options);
        for i in 0..t {
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                    .sum();
                assert_eq!(y[i * n + j], want, "({i}, {j})");
            }
        }
    }
}
