//! GGML tensor types and the block formats kiln dequantizes.
//!
//! A GGML tensor is stored row by row; a quantized row is a run of blocks of 32 values (the
//! formats here) with their own scale. The formats, as llama.cpp's `ggml-common.h` defines
//! them (all little-endian):
//! - `Q4_0` (18 bytes): f16 scale `d`, 16 bytes of 4-bit `q`; value = (q − 8)·d. Byte `j`'s
//!   low nibble is element `j`, its high nibble element `j + 16`.
//! - `Q4_1` (20 bytes): f16 `d`, f16 minimum `m`, 16 bytes as in Q4_0; value = q·d + m.
//! - `Q8_0` (34 bytes): f16 `d`, 32 `i8` `q`; value = q·d.
//! - `F32`, `F16`, `BF16`: one value per element.

use rayon::prelude::*;

/// A GGML tensor type, by its id in the file (`ggml_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

/// How a type packs values: `elements` values in each block of `bytes` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLayout {
    /// Values per block (1 for the float types).
    pub elements: usize,
    /// Bytes per block.
    pub bytes: usize,
}

impl GgmlType {
    /// `F32`.
    pub const F32: GgmlType = GgmlType(0);
    /// `F16`.
    pub const F16: GgmlType = GgmlType(1);
    /// `Q4_0`.
    pub const Q4_0: GgmlType = GgmlType(2);
    /// `Q4_1`.
    pub const Q4_1: GgmlType = GgmlType(3);
    /// `Q8_0`.
    pub const Q8_0: GgmlType = GgmlType(8);
    /// `BF16`.
    pub const BF16: GgmlType = GgmlType(30);

    /// The types kiln dequantizes, for messages.
    pub const SUPPORTED_NAMES: &'static str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1";

    /// The ggml name of the type (`Q4_K`, `BF16`, …), or `unknown` for an id ggml does not
    /// define.
    pub fn name(self) -> &'static str {
        const NAMES: [&str; 40] = [
            "F32",
            "F16",
            "Q4_0",
            "Q4_1",
            "Q4_2 (removed)",
            "Q4_3 (removed)",
            "Q5_0",
            "Q5_1",
            "Q8_0",
            "Q8_1",
            "Q2_K",
            "Q3_K",
            "Q4_K",
            "Q5_K",
            "Q6_K",
            "Q8_K",
            "IQ2_XXS",
            "IQ2_XS",
            "IQ3_XXS",
            "IQ1_S",
            "IQ4_NL",
            "IQ3_S",
            "IQ2_S",
            "IQ4_XS",
            "I8",
            "I16",
            "I32",
            "I64",
            "F64",
            "IQ1_M",
            "BF16",
            "Q4_0_4_4 (removed)",
            "Q4_0_4_8 (removed)",
            "Q4_0_8_8 (removed)",
            "TQ1_0",
            "TQ2_0",
            "IQ4_NL_4_4 (removed)",
            "IQ4_NL_4_8 (removed)",
            "IQ4_NL_8_8 (removed)",
            "MXFP4",
        ];
        NAMES.get(self.0 as usize).copied().unwrap_or("unknown")
    }

    /// The block layout of a type kiln dequantizes; `None` for every other type.
    pub fn block_layout(self) -> Option<BlockLayout> {
        let (elements, bytes) = match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
            _ => return None,
        };
        Some(BlockLayout { elements, bytes })
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (type id {})", self.name(), self.0)
    }
}

/// Blocks dequantized per parallel task.
const BLOCKS_PER_TASK: usize = 4096;

/// The values of `bytes`, whole blocks of `dtype`; `None` when kiln does not dequantize
/// `dtype`. Trailing bytes short of a block are ignored (callers pass exact sizes).
pub(crate) fn dequantize(dtype: GgmlType, bytes: &[u8]) -> Option<Vec<f32>> {
    let layout = dtype.block_layout()?;
    let decode: fn(&[u8], &mut [f32]) = match dtype {
        GgmlType::F32 => |b, out| out[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, out| out[0] = f16(b[0], b[1]),
        GgmlType::BF16 => |b, out| out[0] = half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q4_0 => decode_q4_0,
        GgmlType::Q4_1 => decode_q4_1,
        GgmlType::Q8_0 => decode_q8_0,
        _ => return None,
    };
    let blocks = bytes.len() / layout.bytes;
    let mut values = vec![0f32; blocks * layout.elements];
    values
        .par_chunks_mut(layout.elements * BLOCKS_PER_TASK)
        .zip(bytes.par_chunks(layout.bytes * BLOCKS_PER_TASK))
        .for_each(|(out, input)| {
            for (block_out, block) in out
                .chunks_exact_mut(layout.elements)
                .zip(input.chunks_exact(layout.bytes))
            {
                decode(block, block_out);
            }
        });
    Some(values)
}

fn f16(low: u8, high: u8) -> f32 {
    half::f16::from_le_bytes([low, high]).to_f32()
}

/// One `Q4_0` block (18 bytes) into 32 values.
fn decode_q4_0(block: &[u8], out: &mut [f32]) {
    let d = f16(block[0], block[1]);
    for (j, &q) in block[2..18].iter().enumerate() {
        out[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
        out[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// One `Q4_1` block (20 bytes) into 32 values.
fn decode_q4_1(block: &[u8], out: &mut [f32]) {
    let d = f16(block[0], block[1]);
    let m = f16(block[2], block[3]);
    for (j, &q) in block[4..20].iter().enumerate() {
        out[j] = (q & 0x0f) as f32 * d + m;
        out[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// One `Q8_0` block (34 bytes) into 32 values.
fn decode_q8_0(block: &[u8], out: &mut [f32]) {
    let d = f16(block[0], block[1]);
    for (j, &q) in block[2..34].iter().enumerate() {
        out[j] = q as i8 as f32 * d;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(v: f32) -> [u8; 2] {
        half::f16::from_f32(v).to_le_bytes()
    }

    #[test]
    fn q4_0_nibbles_are_low_then_high() {
        let mut block = f16_bytes(0.5).to_vec();
        // Byte j: low nibble j % 16, high nibble 15 - j.
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let values = dequantize(GgmlType::Q4_0, &block).unwrap();
        for j in 0..16 {
            assert_eq!(values[j], (j as f32 - 8.0) * 0.5);
            assert_eq!(values[j + 16], ((15 - j) as f32 - 8.0) * 0.5);
        }
    }

    #[test]
    fn q4_1_adds_the_minimum() {
        let mut block = f16_bytes(0.25).to_vec();
        block.extend(f16_bytes(-1.0));
        block.extend([0x21u8; 16]);
        let values = dequantize(GgmlType::Q4_1, &block).unwrap();
        assert!(values[..16].iter().all(|&v| v == 0.25 - 1.0));
        assert!(values[16..].iter().all(|&v| v == 0.5 - 1.0));
    }

    #[test]
    fn q8_0_is_signed() {
        let mut block = f16_bytes(2.0).to_vec();
        block.extend((0..32).map(|j| (j as i8 - 16) as u8));
        let values = dequantize(GgmlType::Q8_0, &block).unwrap();
        for (j, v) in values.iter().enumerate() {
            assert_eq!(*v, (j as f32 - 16.0) * 2.0);
        }
    }

    #[test]
    fn float_types_and_unsupported_ones() {
        let bytes: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(dequantize(GgmlType::F32, &bytes).unwrap(), vec![1.5, -2.0]);
        let bf: Vec<u8> = half::bf16::from_f32(3.0).to_le_bytes().to_vec();
        assert_eq!(dequantize(GgmlType::BF16, &bf).unwrap(), vec![3.0]);
        assert_eq!(
            dequantize(GgmlType::F16, &f16_bytes(-0.5)).unwrap(),
            vec![-0.5]
        );
        assert!(dequantize(GgmlType(12), &[0; 144]).is_none());
        assert_eq!(GgmlType(12).name(), "Q4_K");
        assert_eq!(GgmlType(999).name(), "unknown");
        assert_eq!(GgmlType(30).to_string(), "BF16 (type id 30)");
    }
}
