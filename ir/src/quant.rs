//! Group quantization along the last axis: the pure math of `Op::Quantize` and
//! `Op::Dequantize` ([`QuantScheme`]), shared by the interpreter, Atom's reference
//! (`crate::atom`) and the runtime's host steps (which must not use the interpreter).
//!
//! Symmetric: per group, `scale = f16(clip · absmax / qmax)` (1 when 0), `q = round_even(v /
//! scale)` clamped to `[−qmax − 1, qmax]`. Asymmetric: `zero = f16(min)`, `scale = f16((max −
//! zero) / (levels − 1))`, `q = round_even((v − zero) / scale)` clamped to `[0, levels − 1]`,
//! stored minus `levels / 2`. Arithmetic in f64. It must not know about graphs or devices.
//!
//! ```
//! use kiln_ir::op::QuantScheme;
//! use kiln_ir::quant::{dequantize, quantize};
//! use kiln_ir::tensor::Tensor;
//! let scheme = QuantScheme { bits: 4, group_size: 4, symmetric: true, clip: 1.0 };
//! let x = Tensor::f32(&[1, 4], vec![7.0, -3.0, 1.0, 0.0]);
//! let parts = quantize(&x, &scheme);
//! assert_eq!(parts[1].data, vec![1.0]);
//! assert_eq!(dequantize(&parts[0], &parts[1], None, &scheme).data, x.data);
//! ```

use crate::dtype::DType;
use crate::op::QuantScheme;
use crate::tensor::Tensor;

/// Quantises along the last axis per [`QuantScheme`]: values, scales and (asymmetric) zeros.
pub fn quantize(x: &Tensor, scheme: &QuantScheme) -> Vec<Tensor> {
    let group = scheme.group_size;
    let levels = (1u32 << scheme.bits) as f64;
    let qmax = levels / 2.0 - 1.0;
    let mut values = Vec::with_capacity(x.len());
    let mut scales = Vec::new();
    let mut zeros = Vec::new();
    for chunk in x.data.chunks(group) {
        if scheme.symmetric {
            let absmax = chunk.iter().fold(0.0f64, |m, &v| m.max((v as f64).abs()));
            let mut scale = DType::F16.round((scheme.clip as f64 * absmax / qmax) as f32) as f64;
            if scale == 0.0 {
                scale = 1.0;
            }
            scales.push(scale as f32);
            values.extend(chunk.iter().map(|&v| {
                ((v as f64 / scale)
                    .round_ties_even()
                    .clamp(-qmax - 1.0, qmax)) as f32
            }));
        } else {
            let min = chunk.iter().fold(f64::INFINITY, |m, &v| m.min(v as f64));
            let max = chunk
                .iter()
                .fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let min = DType::F16.round(min as f32) as f64;
            let mut scale = DType::F16.round(((max - min) / (levels - 1.0)) as f32) as f64;
            if scale == 0.0 {
                scale = 1.0;
            }
            scales.push(scale as f32);
            zeros.push(min as f32);
            values.extend(chunk.iter().map(|&v| {
                (((v as f64 - min) / scale)
                    .round_ties_even()
                    .clamp(0.0, levels - 1.0)
                    - levels / 2.0) as f32
            }));
        }
    }
    let mut scale_shape = x.shape.clone();
    *scale_shape.last_mut().expect("rank ≥ 1") /= group;
    let mut out = vec![
        Tensor {
            dtype: scheme.value_dtype(),
            shape: x.shape.clone(),
            data: values,
        },
        Tensor {
            dtype: DType::F16,
            shape: scale_shape.clone(),
            data: scales,
        },
    ];
    if !scheme.symmetric {
        out.push(Tensor {
            dtype: DType::F16,
            shape: scale_shape,
            data: zeros,
        });
    }
    out
}

/// The inverse map of [`quantize`].
pub fn dequantize(
    q: &Tensor,
    scale: &Tensor,
    zero: Option<&Tensor>,
    scheme: &QuantScheme,
) -> Tensor {
    let group = scheme.group_size;
    let half_levels = (1u32 << (scheme.bits - 1)) as f32;
    let data = q
        .data
        .iter()
        .enumerate()
        .map(|(i, &v)| match zero {
            None => v * scale.data[i / group],
            Some(zero) => (v + half_levels) * scale.data[i / group] + zero.data[i / group],
        })
        .collect();
    Tensor {
        dtype: DType::F32,
        shape: q.shape.clone(),
        data,
    }
}
