//! Row copy through an index map: the embedding gather and slices along one axis, one
//! generator for both.
//!
//! Output row `r` (of `row_elements` f16 or bf16 values, row-major) is a copy of source row
//! `source(r)`, where the [`RowIndex`] says what `source` is:
//!
//! - [`RowIndex::Gather`] (`Embedding`): `source(r) = ids[r]`, a row of `table [vocab,
//!   row_elements]`. An id outside `0..vocab` (negative ids included: they are compared as
//!   unsigned) reads nothing and writes a row of NaN (`0x7FC0` in bf16, `0x7E00` in f16), so
//!   a bad id can never read out of bounds; the interpreter (`kiln_ir::movement::gather`)
//!   reports the same id as an error. Parameters: `table`, `ids` (i32, read), `out` (write);
//!   scalars `rows` (ids), `vocab`.
//! - [`RowIndex::Slice`] (`Slice` of `x` viewed as `[outer, axis_len, row_elements]`, the
//!   range `start..start + taken` of the middle axis): `source(r) = (r / taken) · axis_len +
//!   start + r mod taken`. Parameters: `x` (read), `out` (write); scalars `rows` (`outer ·
//!   taken`), `taken`, `axis_len`, `start` (already resolved to `0 ≤ start ≤ start + taken ≤
//!   axis_len` by the lowering).
//!
//! Launch: one block per output row (`grid.x = rows`, so any row count up to 2³¹ − 1), whose
//! threads (one per 16-byte chunk, whole warps, at most 256) stride over the row. When a row
//! is a whole number of 16-byte chunks (`row_elements · 2` a multiple of 16, so every row
//! starts 16-byte aligned) each access is an `ld.global.nc.v4.u32` / `st.global.v4.b32`;
//! otherwise the kernel copies one 16-bit element per access. Bits are copied as they are
//! (no widening), so a copy is exact, NaN payloads included. This file generates PTX; it
//! must not launch anything.

use crate::vector::{check_half, HALVES_PER_CHUNK};
use crate::SpecError;
use kiln_codegen::kernel::{Access, Extent, GpuKernel, LaunchRule};
use kiln_codegen::ptx::{
    Axis, Cmp, KernelBuilder, Load, Narrow, Reg, Special, Store, Target, U32, U64,
};
use kiln_ir::dtype::DType;
use serde::{Deserialize, Serialize};

const FAMILY: &str = "row_copy";
/// Bytes of one element (f16 and bf16).
const ELEMENT_BYTES: u32 = 2;
/// The longest row, in elements: its byte size and chunk count must fit `u32` arithmetic.
pub const MAX_ROW_ELEMENTS: usize = 1 << 28;

/// Where each output row is copied from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RowIndex {
    /// `Embedding`: row `ids[r]` of the table; NaN for an id outside `0..vocab`.
    Gather,
    /// `Slice`: row `(r / taken) · axis_len + start + r mod taken` of `x`.
    Slice,
}

/// A row copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RowCopySpec {
    /// Storage dtype of the source and the output (f16 or bf16).
    pub dtype: DType,
    /// Elements per row (the embedding's hidden size, or the slice's inner extent).
    pub row_elements: usize,
    pub index: RowIndex,
}

impl RowCopySpec {
    /// Whether rows are whole 16-byte chunks, copied with vector accesses.
    pub fn vectorized(&self) -> bool {
        self.row_elements.is_multiple_of(HALVES_PER_CHUNK)
    }

    /// Elements moved by one access: eight (a 16-byte chunk) or one.
    pub fn access_elements(&self) -> usize {
        if self.vectorized() {
            HALVES_PER_CHUNK
        } else {
            1
        }
    }

    /// Threads per block: one per access of a row, whole warps, at most 256.
    pub fn threads(&self) -> u32 {
        let accesses = (self.row_elements / self.access_elements()) as u32;
        accesses.div_ceil(32).clamp(1, 8) * 32
    }

    /// The kernel entry name: `gather_bf16_h4096_v16` (vector) or `slice_f16_h17_s2`
    /// (scalar), the row length and the access width in bytes.
    pub fn entry(&self) -> String {
        let name = match self.index {
            RowIndex::Gather => "gather",
            RowIndex::Slice => "slice",
        };
        let access = self.access_elements() as u32 * ELEMENT_BYTES;
        let kind = if self.vectorized() { "v" } else { "s" };
        format!(
            "{name}_{}_h{}_{kind}{access}",
            self.dtype, self.row_elements
        )
    }

    /// Why the generator cannot build this spec, naming the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_half(FAMILY, self.dtype)?;
        if self.row_elements == 0 || self.row_elements > MAX_ROW_ELEMENTS {
            return Err(SpecError::new(
                FAMILY,
                format!(
                    "row_elements must be 1..={MAX_ROW_ELEMENTS}, got {}",
                    self.row_elements
                ),
            ));
        }
        Ok(())
    }
}

/// The bits of a quiet NaN in `dtype`.
fn nan_bits(dtype: DType) -> u32 {
    match dtype {
        DType::BF16 => 0x7fc0,
        _ => 0x7e00,
    }
}

/// What a block writes to its output row.
#[derive(Clone, Copy)]
enum Fill {
    /// A copy of the source row at this address.
    Copy(Reg<U64>),
    /// NaN in every element (a gather's out-of-range id).
    Nan,
}

/// Writes the output row at `destination` as `fill` says: each thread strides over the row's
/// accesses.
fn fill_row(k: &mut KernelBuilder, spec: &RowCopySpec, fill: Fill, destination: Reg<U64>) {
    let accesses = (spec.row_elements / spec.access_elements()) as u32;
    let access_bytes = spec.access_elements() as u32 * ELEMENT_BYTES;
    let first = k.tid_x();
    let load = Load::GLOBAL.non_coherent();
    let nan_word = match fill {
        Fill::Nan => {
            let bits = nan_bits(spec.dtype);
            let word = if spec.vectorized() {
                bits | bits << 16
            } else {
                bits
            };
            Some(k.mov::<U32>(word))
        }
        Fill::Copy(_) => None,
    };
    k.for_range(first, accesses, spec.threads(), |k, access| {
        let offset = k.mul_wide(access, access_bytes);
        let to = k.add(destination, offset);
        match (fill, nan_word) {
            (Fill::Copy(source), _) => {
                let from = k.add(source, offset);
                if spec.vectorized() {
                    let words = k.ld_vector::<U32, 4>(load, from);
                    k.st_vector(Store::GLOBAL, to, words);
                } else {
                    let bits = k.ld_narrow::<U32>(load, Narrow::U16, from);
                    k.st_narrow(Store::GLOBAL, Narrow::U16, to, bits);
                }
            }
            (Fill::Nan, Some(nan)) => {
                if spec.vectorized() {
                    k.st_vector(Store::GLOBAL, to, [nan; 4]);
                } else {
                    k.st_narrow(Store::GLOBAL, Narrow::U16, to, nan);
                }
            }
            // `nan_word` is set exactly for `Fill::Nan`.
            (Fill::Nan, None) => {}
        }
    });
}

/// Generates the row-copy kernel for `spec`.
pub fn generate(spec: &RowCopySpec) -> Result<GpuKernel, SpecError> {
    spec.validate()?;
    let row_bytes = spec.row_elements as u32 * ELEMENT_BYTES;
    let mut k = KernelBuilder::new(&spec.entry(), Target::Sm80);
    let source_name = match spec.index {
        RowIndex::Gather => "table",
        RowIndex::Slice => "x",
    };
    let source_base = k.param_pointer(source_name, Access::Read);
    let ids = (spec.index == RowIndex::Gather).then(|| k.param_pointer("ids", Access::Read));
    let out = k.param_pointer("out", Access::Write);
    let rows = k.param_u32("rows");
    let gather = ids.map(|ids| (ids, k.param_u32("vocab")));
    let slice = (spec.index == RowIndex::Slice).then(|| {
        (
            k.param_u32("taken"),
            k.param_u32("axis_len"),
            k.param_u32("start"),
        )
    });

    let row = k.special(Special::Ctaid(Axis::X));
    let in_range = k.setp(Cmp::Lt, row, rows);
    k.if_then(in_range, |k| {
        let destination = k.mad_wide(row, row_bytes, out);
        if let Some((ids, vocab)) = gather {
            k.comment("the row's id; negative ids compare as large unsigned values");
            let id_address = k.mad_wide(row, 4u32, ids);
            let id = k.ld::<U32>(Load::GLOBAL.non_coherent(), id_address);
            let valid = k.setp(Cmp::Lt, id, vocab);
            k.if_else(
                valid,
                |k| {
                    let source = k.mad_wide(id, row_bytes, source_base);
                    fill_row(k, spec, Fill::Copy(source), destination);
                },
                |k| {
                    k.comment("an id outside 0..vocab: a row of NaN, nothing read");
                    fill_row(k, spec, Fill::Nan, destination);
                },
            );
        }
        if let Some((taken, axis_len, start)) = slice {
            k.comment("source row: (row / taken) * axis_len + start + row mod taken");
            let outer = k.div(row, taken);
            let within = k.rem(row, taken);
            let base = k.mul_add(outer, axis_len, start);
            let source_row = k.add(base, within);
            let source = k.mad_wide(source_row, row_bytes, source_base);
            fill_row(k, spec, Fill::Copy(source), destination);
        }
    });
    Ok(k.finish(LaunchRule::linear(
        Extent::ceil_div("rows", 1),
        spec.threads(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(index: RowIndex, row_elements: usize) -> RowCopySpec {
        RowCopySpec {
            dtype: DType::BF16,
            row_elements,
            index,
        }
    }

    #[test]
    fn rows_of_whole_chunks_use_vector_accesses() {
        let wide = spec(RowIndex::Gather, 4096);
        assert!(wide.vectorized());
        assert_eq!(wide.threads(), 256);
        assert_eq!(wide.entry(), "gather_bf16_h4096_v16");
        let odd = spec(RowIndex::Slice, 17);
        assert!(!odd.vectorized());
        assert_eq!(odd.threads(), 32);
        assert_eq!(odd.entry(), "slice_bf16_h17_s2");
        // 12 elements = 24 bytes: not whole chunks.
        assert!(!spec(RowIndex::Slice, 12).vectorized());
    }

    #[test]
    fn bad_specs_are_refused_naming_the_field() {
        let err = generate(&spec(RowIndex::Gather, 0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("row_elements"), "{err}");
        let err = generate(&spec(RowIndex::Slice, MAX_ROW_ELEMENTS + 1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("row_elements"), "{err}");
        let f32 = RowCopySpec {
            dtype: DType::F32,
            ..spec(RowIndex::Gather, 64)
        };
        let err = generate(&f32).unwrap_err().to_string();
        assert!(err.contains("f16 or bf16"), "{err}");
    }

    #[test]
    fn parameters_follow_the_index_map() {
        let gather = generate(&spec(RowIndex::Gather, 64)).unwrap();
        for name in ["table", "ids", "out", "rows", "vocab"] {
            assert!(gather.param(name).is_some(), "gather: {name}");
        }
        assert!(gather.param("x").is_none());
        let slice = generate(&spec(RowIndex::Slice, 64)).unwrap();
        for name in ["x", "out", "rows", "taken", "axis_len", "start"] {
            assert!(slice.param(name).is_some(), "slice: {name}");
        }
        assert!(slice.param("ids").is_none());
    }
}
