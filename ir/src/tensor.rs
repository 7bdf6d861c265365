//! Host tensors for the reference interpreter, weights and tests.
//!
//! A [`Tensor`] holds its dtype, concrete shape and row-major values as `f32`: float values
//! are kept rounded to the dtype's precision, integer values are exact integers (within ±2²⁴,
//! which covers token ids, positions and indices). This is a reference container, not a fast
//! one; it must not grow device or layout concerns.

use crate::dtype::DType;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a tensor could not be made from the values given.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    /// The value count does not match the shape.
    #[error("shape {shape:?} holds {expected} values, got {found}")]
    ValueCount {
        shape: Vec<usize>,
        expected: usize,
        found: usize,
    },
}

/// The largest integer magnitude a tensor stores exactly.
pub const MAX_EXACT_INT: i64 = 1 << 24;

/// A dense host tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    /// A tensor of `dtype` from values, rounded to the dtype's precision. Errors when the
    /// value count does not match the shape.
    pub fn new(dtype: DType, shape: &[usize], mut data: Vec<f32>) -> Result<Tensor, TensorError> {
        let expected: usize = shape.iter().product();
        if data.len() != expected {
            return Err(TensorError::ValueCount {
                shape: shape.to_vec(),
                expected,
                found: data.len(),
            });
        }
        if dtype != DType::F32 {
            for value in &mut data {
                *value = dtype.round(*value);
            }
        }
        Ok(Tensor {
            dtype,
            shape: shape.to_vec(),
            data,
        })
    }

    /// An f32 tensor; panics only on a programming error (count not matching the shape).
    pub fn f32(shape: &[usize], data: Vec<f32>) -> Tensor {
        Tensor::new(DType::F32, shape, data).expect("value count matches the shape")
    }

    /// An i32 tensor of exact integers.
    pub fn i32(shape: &[usize], values: &[i32]) -> Tensor {
        let data = values
            .iter()
            .map(|&v| {
                assert!(
                    (v as i64).abs() <= MAX_EXACT_INT,
                    "integer {v} is beyond the exact range of the reference tensor"
                );
                v as f32
            })
            .collect();
        Tensor::new(DType::I32, shape, data).expect("value count matches the shape")
    }

    /// A tensor of zeros.
    pub fn zeros(dtype: DType, shape: &[usize]) -> Tensor {
        Tensor {
            dtype,
            shape: shape.to_vec(),
            data: vec![0.0; shape.iter().product()],
        }
    }

    /// A tensor of `value` everywhere (rounded to the dtype).
    pub fn full(dtype: DType, shape: &[usize], value: f32) -> Tensor {
        Tensor {
            dtype,
            shape: shape.to_vec(),
            data: vec![dtype.round(value); shape.iter().product()],
        }
    }

    /// Values drawn uniformly from `[-bound, bound]`, rounded to `dtype`.
    pub fn uniform(dtype: DType, shape: &[usize], bound: f32, rng: &mut ChaCha8Rng) -> Tensor {
        let count = shape.iter().product();
        let data = (0..count)
            .map(|_| dtype.round(rng.random_range(-bound..=bound)))
            .collect();
        Tensor {
            dtype,
            shape: shape.to_vec(),
            data,
        }
    }

    /// Values drawn from a normal distribution with mean 0 and `std`, rounded to `dtype`.
    pub fn normal(dtype: DType, shape: &[usize], std: f32, rng: &mut ChaCha8Rng) -> Tensor {
        let count = shape.iter().product();
        let data = (0..count)
            .map(|_| {
                // Box–Muller: two uniforms in (0, 1] give one standard normal value.
                let u1: f64 = 1.0 - rng.random::<f64>();
                let u2: f64 = rng.random::<f64>();
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                dtype.round((z * std as f64) as f32)
            })
            .collect();
        Tensor {
            dtype,
            shape: shape.to_vec(),
            data,
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the tensor holds no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The values as integers (for i32/i8/i4 tensors).
    pub fn to_i32(&self) -> Vec<i32> {
        self.data.iter().map(|&v| v as i32).collect()
    }

    /// A copy with values converted to `dtype`.
    pub fn cast(&self, dtype: DType) -> Tensor {
        Tensor {
            dtype,
            shape: self.shape.clone(),
            data: self.data.iter().map(|&v| dtype.round(v)).collect(),
        }
    }

    /// Relative error ‖self − reference‖₂ / ‖reference‖₂ in f64. A NaN or infinity in either
    /// tensor, or a shape mismatch, gives `f64::INFINITY`, so such a result never passes a
    /// tolerance check.
    pub fn relative_error(&self, reference: &Tensor) -> f64 {
        if self.shape != reference.shape {
            return f64::INFINITY;
        }
        let mut diff = 0.0f64;
        let mut norm = 0.0f64;
        for (&a, &b) in self.data.iter().zip(&reference.data) {
            if !a.is_finite() || !b.is_finite() {
                return f64::INFINITY;
            }
            diff += (a as f64 - b as f64).powi(2);
            norm += (b as f64).powi(2);
        }
        if norm == 0.0 {
            return if diff == 0.0 { 0.0 } else { f64::INFINITY };
        }
        (diff / norm).sqrt()
    }

    /// Row-major strides of the shape.
    pub fn strides(&self) -> Vec<usize> {
        strides(&self.shape)
    }
}

/// Row-major strides of `shape`.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

impl fmt::Display for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{:?}", self.dtype, self.shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn new_rounds_to_the_dtype() {
        let t = Tensor::new(DType::BF16, &[2], vec![1.0 + 2f32.powi(-9), 3.0]).unwrap();
        assert_eq!(t.data, vec![1.0, 3.0]);
        assert!(Tensor::new(DType::F32, &[2, 2], vec![0.0; 3]).is_err());
    }

    #[test]
    fn relative_error_rejects_nan_and_mismatch() {
        let a = Tensor::f32(&[2], vec![1.0, f32::NAN]);
        let b = Tensor::f32(&[2], vec![1.0, 1.0]);
        assert_eq!(a.relative_error(&b), f64::INFINITY);
        assert_eq!(
            b.relative_error(&Tensor::f32(&[1, 2], vec![1.0, 1.0])),
            f64::INFINITY
        );
        let c = Tensor::f32(&[2], vec![1.0, 1.1]);
        assert!((c.relative_error(&b) - 0.1 / 2f64.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn normal_has_the_requested_spread() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let t = Tensor::normal(DType::F32, &[20000], 2.0, &mut rng);
        let mean = t.data.iter().map(|&v| v as f64).sum::<f64>() / t.len() as f64;
        let var = t
            .data
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / t.len() as f64;
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!((var.sqrt() - 2.0).abs() < 0.05, "std {}", var.sqrt());
    }

    #[test]
    fn strides_are_row_major() {
        assert_eq!(strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(strides(&[]), Vec::<usize>::new());
    }
}
