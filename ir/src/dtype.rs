//! Element types of kiln tensors.
//!
//! Owns the list of dtypes, their storage sizes, their names in files (Hugging Face
//! `torch_dtype`, safetensors) and the rounding of an `f32` value to a dtype's precision,
//! which the reference interpreter uses to model reduced-precision storage. It must not know
//! about shapes or ops.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The element type of a tensor.
///
/// `I4` is a packed signed 4-bit integer in `[-8, 7]`: two values per byte, stored as unsigned
/// nibbles `q + 8`, low nibble first (see [`pack_i4`]). Tensors of 4-bit values keep their
/// logical shape; only their storage is packed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    BF16,
    I32,
    I8,
    I4,
}

impl DType {
    /// Every dtype, in a fixed order.
    pub const ALL: [DType; 6] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::I8,
        DType::I4,
    ];

    /// Storage size of one element in bits.
    pub fn bits(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 32,
            DType::F16 | DType::BF16 => 16,
            DType::I8 => 8,
            DType::I4 => 4,
        }
    }

    /// Bytes needed to store `elements` values (4-bit values round up to whole bytes).
    pub fn storage_bytes(self, elements: usize) -> usize {
        (elements * self.bits()).div_ceil(8)
    }

    /// Whether values of this dtype are floating point.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// Whether values of this dtype are integers.
    pub fn is_int(self) -> bool {
        !self.is_float()
    }

    /// The short lowercase name used in plans, reports and error messages.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::I8 => "i8",
            DType::I4 => "i4",
        }
    }

    /// Parses a short name (`f16`) or a Hugging Face `torch_dtype` (`float16`, `bfloat16`, …).
    pub fn parse(name: &str) -> Option<DType> {
        Some(match name.trim().to_ascii_lowercase().as_str() {
            "f32" | "float32" | "float" | "fp32" => DType::F32,
            "f16" | "float16" | "half" | "fp16" => DType::F16,
            "bf16" | "bfloat16" => DType::BF16,
            "i32" | "int32" => DType::I32,
            "i8" | "int8" => DType::I8,
            "i4" | "int4" => DType::I4,
            _ => return None,
        })
    }

    /// The inclusive range of an integer dtype, as `f32` (exact for all of them).
    pub fn int_range(self) -> Option<(f32, f32)> {
        match self {
            DType::I32 => Some((i32::MIN as f32, i32::MAX as f32)),
            DType::I8 => Some((-128.0, 127.0)),
            DType::I4 => Some((-8.0, 7.0)),
            _ => None,
        }
    }

    /// Rounds an `f32` value to the precision of this float dtype (round to nearest even).
    /// Integer dtypes round to the nearest integer and saturate to their range.
    pub fn round(self, value: f32) -> f32 {
        match self {
            DType::F32 => value,
            DType::F16 => half::f16::from_f32(value).to_f32(),
            DType::BF16 => half::bf16::from_f32(value).to_f32(),
            DType::I32 | DType::I8 | DType::I4 => {
                let (lo, hi) = self.int_range().expect("integer dtype has a range");
                value.round_ties_even().clamp(lo, hi)
            }
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why values could not be packed into a narrower integer type.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    /// A value outside the 4-bit range, with its index in the input.
    #[error("value {value} at index {index} does not fit in 4 bits (expected -8..=7)")]
    OutOfRange { value: i8, index: usize },
}

/// Packs signed 4-bit values (each in `[-8, 7]`) two per byte as unsigned nibbles `q + 8`,
/// low nibble first. An odd count leaves the last high nibble as `8` (the code of zero).
///
/// ```
/// use kiln_ir::dtype::{pack_i4, unpack_i4};
/// let packed = pack_i4(&[-8, 7, 0]).unwrap();
/// assert_eq!(packed, vec![0x_f0, 0x88]);
/// assert_eq!(unpack_i4(&packed, 3), vec![-8, 7, 0]);
/// ```
pub fn pack_i4(values: &[i8]) -> Result<Vec<u8>, PackError> {
    let mut out = Vec::with_capacity(values.len().div_ceil(2));
    for (pair_index, pair) in values.chunks(2).enumerate() {
        let mut byte = 0u8;
        for (half_index, &v) in pair.iter().enumerate() {
            if !(-8..=7).contains(&v) {
                return Err(PackError::OutOfRange {
                    value: v,
                    index: pair_index * 2 + half_index,
                });
            }
            byte |= ((v + 8) as u8) << (4 * half_index);
        }
        if pair.len() == 1 {
            byte |= 8 << 4;
        }
        out.push(byte);
    }
    Ok(out)
}

/// Unpacks `count` signed 4-bit values stored by [`pack_i4`].
pub fn unpack_i4(packed: &[u8], count: usize) -> Vec<i8> {
    (0..count)
        .map(|i| {
            let byte = packed[i / 2];
            let nibble = if i % 2 == 0 { byte & 0xf } else { byte >> 4 };
            nibble as i8 - 8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for dtype in DType::ALL {
            assert_eq!(DType::parse(dtype.name()), Some(dtype));
        }
        assert_eq!(DType::parse("bfloat16"), Some(DType::BF16));
        assert_eq!(DType::parse("complex64"), None);
    }

    #[test]
    fn storage_bytes_pack_four_bit_values() {
        assert_eq!(DType::I4.storage_bytes(5), 3);
        assert_eq!(DType::BF16.storage_bytes(5), 10);
        assert_eq!(DType::F32.storage_bytes(3), 12);
    }

    #[test]
    fn rounding_matches_the_dtype_precision() {
        // 1 + 2^-11 is not representable in f16 (10 mantissa bits): ties to even gives 1.
        assert_eq!(DType::F16.round(1.0 + 2f32.powi(-11)), 1.0);
        // bf16 has 7 mantissa bits: 1 + 2^-7 is representable, 1 + 2^-9 is not.
        assert_eq!(DType::BF16.round(1.0 + 2f32.powi(-7)), 1.0 + 2f32.powi(-7));
        assert_eq!(DType::BF16.round(1.0 + 2f32.powi(-9)), 1.0);
        assert_eq!(DType::I4.round(9.3), 7.0);
        assert_eq!(DType::I8.round(-2.5), -2.0);
    }

    #[test]
    fn pack_rejects_out_of_range_values() {
        let err = pack_i4(&[0, 8]).unwrap_err();
        assert!(err.to_string().contains("index 1"), "{err}");
    }

    #[test]
    fn pack_and_unpack_every_value() {
        let values: Vec<i8> = (-8..=7).collect();
        let packed = pack_i4(&values).unwrap();
        assert_eq!(packed.len(), 8);
        // low nibble first: -8 → 0, -7 → 1 gives 0x10
        assert_eq!(packed[0], 0x10);
        assert_eq!(unpack_i4(&packed, values.len()), values);
    }
}
