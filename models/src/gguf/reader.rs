//! The GGUF binary layout: header, typed metadata and tensor directory.
//!
//! Layout (all little-endian): magic `GGUF`, version `u32`, tensor count `u64`, metadata
//! count `u64`; each metadata entry a string key, a `u32` value type and the value; each
//! tensor a string name, a `u32` dimension count, that many `u64` dimensions (innermost
//! first), a `u32` GGML type and a `u64` offset into the data section; the data section starts
//! at the next multiple of `general.alignment` (default 32). Strings are a `u64` length and
//! UTF-8 bytes.
//!
//! Every read goes through [`Cursor`], which checks the bytes are there first; counts from the
//! file never size an allocation before the bytes they promise are known to exist.

use super::dequantize::GgmlType;
use super::GgufError;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The GGUF magic, the file's first four bytes.
pub(crate) const MAGIC: &[u8; 4] = b"GGUF";
/// The data section's alignment when `general.alignment` is absent.
pub(crate) const DEFAULT_ALIGNMENT: u64 = 32;
/// The most dimensions a GGML tensor has.
const MAX_DIMS: u32 = 4;
/// The deepest nesting of metadata arrays kiln accepts.
const MAX_ARRAY_DEPTH: usize = 8;

/// A typed metadata value, as stored (GGUF value types 0 to 12).
#[derive(Clone, Debug, PartialEq)]
pub enum MetadataValue {
    /// Type 0.
    U8(u8),
    /// Type 1.
    I8(i8),
    /// Type 2.
    U16(u16),
    /// Type 3.
    I16(i16),
    /// Type 4.
    U32(u32),
    /// Type 5.
    I32(i32),
    /// Type 6.
    F32(f32),
    /// Type 7.
    Bool(bool),
    /// Type 8 (UTF-8).
    String(String),
    /// Type 9: elements all of one type.
    Array(Vec<MetadataValue>),
    /// Type 10.
    U64(u64),
    /// Type 11.
    I64(i64),
    /// Type 12.
    F64(f64),
}

impl MetadataValue {
    /// The GGUF name of the value's type (`u32`, `string`, `array`, …), for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            MetadataValue::U8(_) => "u8",
            MetadataValue::I8(_) => "i8",
            MetadataValue::U16(_) => "u16",
            MetadataValue::I16(_) => "i16",
            MetadataValue::U32(_) => "u32",
            MetadataValue::I32(_) => "i32",
            MetadataValue::F32(_) => "f32",
            MetadataValue::Bool(_) => "bool",
            MetadataValue::String(_) => "string",
            MetadataValue::Array(_) => "array",
            MetadataValue::U64(_) => "u64",
            MetadataValue::I64(_) => "i64",
            MetadataValue::F64(_) => "f64",
        }
    }

    /// The value as an unsigned integer: any integer type holding a value ≥ 0.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetadataValue::U8(v) => Some(v.into()),
            MetadataValue::U16(v) => Some(v.into()),
            MetadataValue::U32(v) => Some(v.into()),
            MetadataValue::U64(v) => Some(v),
            MetadataValue::I8(v) => u64::try_from(v).ok(),
            MetadataValue::I16(v) => u64::try_from(v).ok(),
            MetadataValue::I32(v) => u64::try_from(v).ok(),
            MetadataValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer: any integer type whose value fits an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetadataValue::U64(v) => i64::try_from(v).ok(),
            MetadataValue::I8(v) => Some(v.into()),
            MetadataValue::I16(v) => Some(v.into()),
            MetadataValue::I32(v) => Some(v.into()),
            MetadataValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float: either float type, or any integer type.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetadataValue::F32(v) => Some(v.into()),
            MetadataValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a string, when it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetadataValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool, when it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetadataValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The elements, when the value is an array.
    pub fn as_array(&self) -> Option<&[MetadataValue]> {
        match self {
            MetadataValue::Array(items) => Some(items),
            _ => None,
        }
    }
}

/// One entry of the tensor directory.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    /// The GGUF tensor name (`blk.0.attn_q.weight`).
    pub name: String,
    /// The shape, row-major, outermost dimension first: the reverse of GGUF's `ne` list, so
    /// `ne = [576, 1536]` is shape `[1536, 576]` (1536 rows of 576 values).
    pub shape: Vec<usize>,
    /// The GGML type id (see [`GgmlType`]).
    pub type_id: u32,
    /// The offset of the tensor's data from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// The GGML type of the stored data.
    pub fn ggml_type(&self) -> GgmlType {
        GgmlType(self.type_id)
    }

    /// The number of elements.
    pub fn element_count(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The parsed header of a GGUF file.
pub(crate) struct Header {
    pub(crate) version: u32,
    pub(crate) metadata: BTreeMap<String, MetadataValue>,
    pub(crate) tensors: Vec<GgufTensorInfo>,
    /// GGUF tensor name → index in `tensors`.
    pub(crate) tensor_index: HashMap<String, usize>,
    /// Where the data section starts in the file.
    pub(crate) data_start: usize,
}

/// The file's bytes: a read-only memory map of a file, or bytes already in memory (an empty
/// file, which cannot be mapped on every platform, or a buffer given to
/// [`GgufFile::from_bytes`](super::GgufFile::from_bytes)).
pub(crate) enum FileBytes {
    Mapped(memmap2::Mmap),
    InMemory(Vec<u8>),
}

impl FileBytes {
    /// Maps `path` read-only.
    pub(crate) fn map(path: &Path) -> Result<FileBytes, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len == 0 {
            return Ok(FileBytes::InMemory(Vec::new()));
        }
        // SAFETY: the map is read-only and private to this process. As with any memory map,
        // another process truncating or rewriting the file while it is mapped would change
        // or invalidate the bytes under us; kiln does not modify checkpoint files, and a
        // checkpoint changing during a load is outside what any loader can guard against.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Ok(FileBytes::Mapped(map))
    }

    /// The file's bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(map) => map,
            FileBytes::InMemory(bytes) => bytes,
        }
    }
}

/// A bounds-checked little-endian reader over the file's bytes.
struct Cursor<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Cursor<'a> {
    /// The next `count` bytes, or a [`GgufError::Truncated`] naming `what`.
    fn take(&mut self, count: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        let remaining = (self.bytes.len() - self.position) as u64;
        if count > remaining {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: what(),
                offset: self.position as u64,
                needed: count,
                file_len: self.bytes.len() as u64,
            });
        }
        let start = self.position;
        self.position += count as usize;
        Ok(&self.bytes[start..self.position])
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let bytes = self.take(N as u64, what)?;
        let mut array = [0u8; N];
        array.copy_from_slice(bytes);
        Ok(array)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.position) as u64
    }

    /// A GGUF string; the inner `Err` when its bytes are not UTF-8 (the caller names the
    /// place).
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<Result<String, NotUtf8>, GgufError> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        Ok(String::from_utf8(bytes.to_vec()).map_err(|source| NotUtf8 { len, source }))
    }
}

/// A GGUF string whose bytes are not UTF-8.
#[derive(Debug, thiserror::Error)]
#[error("string of {len} bytes is not valid UTF-8: {source}")]
struct NotUtf8 {
    len: u64,
    source: std::string::FromUtf8Error,
}

/// Parses and checks a whole header. Tensors of supported types must lie inside the file.
pub(crate) fn parse(path: &Path, bytes: &[u8]) -> Result<Header, GgufError> {
    let mut cursor = Cursor {
        path,
        bytes,
        position: 0,
    };
    let header_what = || "header".to_string();
    if bytes.len() < 4 || &bytes[..4] != MAGIC {
        return Err(GgufError::BadMagic {
            path: path.to_path_buf(),
            found: bytes[..bytes.len().min(4)].to_vec(),
        });
    }
    cursor.position = 4;
    let version = cursor.u32(&header_what)?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion {
            path: path.to_path_buf(),
            version,
        });
    }
    let tensor_count = cursor.u64(&header_what)?;
    let metadata_count = cursor.u64(&header_what)?;

    let mut metadata = BTreeMap::new();
    for entry in 0..metadata_count {
        let entry_what = || format!("metadata entry #{entry}");
        let key = cursor
            .string(&entry_what)?
            .map_err(|e| bad_metadata(path, &format!("#{entry}"), e.to_string()))?;
        let value_type = cursor.u32(&|| format!("type of metadata `{key}`"))?;
        let value = read_value(&mut cursor, &key, value_type, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(bad_metadata(path, &key, "the key appears twice".into()));
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(MetadataValue::U32(a)) if a.is_power_of_two() => u64::from(*a),
        Some(other) => {
            return Err(bad_metadata(
                path,
                "general.alignment",
                format!("expected a u32 power of two, found {other:?}"),
            ))
        }
    };

    let mut tensors = Vec::new();
    let mut tensor_index = HashMap::new();
    for number in 0..tensor_count {
        let info_what = || format!("tensor directory entry #{number}");
        let name = cursor
            .string(&info_what)?
            .map_err(|e| bad_tensor(path, &format!("#{number}"), e.to_string()))?;
        let named_what = || format!("tensor directory entry `{name}`");
        let dims = cursor.u32(&named_what)?;
        if dims == 0 || dims > MAX_DIMS {
            return Err(bad_tensor(
                path,
                &name,
                format!("has {dims} dimensions, expected 1 to {MAX_DIMS}"),
            ));
        }
        let mut ne = Vec::with_capacity(dims as usize);
        for _ in 0..dims {
            ne.push(cursor.u64(&named_what)?);
        }
        let type_id = cursor.u32(&named_what)?;
        let offset = cursor.u64(&named_what)?;
        let mut shape = Vec::with_capacity(ne.len());
        for &n in ne.iter().rev() {
            shape.push(
                usize::try_from(n)
                    .map_err(|_| bad_tensor(path, &name, format!("dimension {n} is too large")))?,
            );
        }
        let elements = shape
            .iter()
            .try_fold(1usize, |acc, &n| acc.checked_mul(n))
            .filter(|&n| n <= isize::MAX as usize);
        if elements.is_none() {
            return Err(bad_tensor(
                path,
                &name,
                format!("shape {shape:?} has too many elements"),
            ));
        }
        if !offset.is_multiple_of(alignment) {
            return Err(bad_tensor(
                path,
                &name,
                format!("data offset {offset} is not a multiple of the alignment {alignment}"),
            ));
        }
        if tensor_index.insert(name.clone(), tensors.len()).is_some() {
            return Err(bad_tensor(path, &name, "the name appears twice".into()));
        }
        tensors.push(GgufTensorInfo {
            name,
            shape,
            type_id,
            offset,
        });
    }

    let data_start = (cursor.position as u64).div_ceil(alignment) * alignment;
    let file_len = bytes.len() as u64;
    for info in &tensors {
        if GgmlType(info.type_id).block_layout().is_none() {
            // Unknown sizes: checked (and refused) when the tensor is loaded.
            continue;
        }
        let needed = tensor_byte_len(path, info)? as u64;
        let start = data_start.saturating_add(info.offset);
        if start.saturating_add(needed) > file_len {
            return Err(GgufError::Truncated {
                path: path.to_path_buf(),
                what: format!("data of tensor `{}`", info.name),
                offset: start,
                needed,
                file_len,
            });
        }
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        tensor_index,
        data_start: usize::try_from(data_start).unwrap_or(usize::MAX),
    })
}

/// The stored size in bytes of a tensor of a supported type; an error when its rows do not
/// split into whole blocks.
pub(crate) fn tensor_byte_len(path: &Path, info: &GgufTensorInfo) -> Result<usize, GgufError> {
    let dtype = GgmlType(info.type_id);
    let Some(layout) = dtype.block_layout() else {
        return Err(GgufError::UnsupportedTensorType {
            path: path.to_path_buf(),
            tensor: info.name.clone(),
            type_id: info.type_id,
        });
    };
    let row = info.shape.last().copied().unwrap_or(1);
    if !row.is_multiple_of(layout.elements) {
        return Err(bad_tensor(
            path,
            &info.name,
            format!(
                "rows of {row} values do not split into blocks of {} for type {}",
                layout.elements,
                dtype.name()
            ),
        ));
    }
    (info.element_count() / layout.elements)
        .checked_mul(layout.bytes)
        .ok_or_else(|| bad_tensor(path, &info.name, "its data size overflows".into()))
}

/// Reads one metadata value of GGUF type `value_type` for `key`.
fn read_value(
    cursor: &mut Cursor<'_>,
    key: &str,
    value_type: u32,
    depth: usize,
) -> Result<MetadataValue, GgufError> {
    let what = || format!("value of metadata `{key}`");
    let path = cursor.path;
    Ok(match value_type {
        0 => MetadataValue::U8(u8::from_le_bytes(cursor.array(&what)?)),
        1 => MetadataValue::I8(i8::from_le_bytes(cursor.array(&what)?)),
        2 => MetadataValue::U16(u16::from_le_bytes(cursor.array(&what)?)),
        3 => MetadataValue::I16(i16::from_le_bytes(cursor.array(&what)?)),
        4 => MetadataValue::U32(u32::from_le_bytes(cursor.array(&what)?)),
        5 => MetadataValue::I32(i32::from_le_bytes(cursor.array(&what)?)),
        6 => MetadataValue::F32(f32::from_le_bytes(cursor.array(&what)?)),
        7 => match cursor.array::<1>(&what)?[0] {
            0 => MetadataValue::Bool(false),
            1 => MetadataValue::Bool(true),
            other => {
                return Err(bad_metadata(
                    path,
                    key,
                    format!("bool byte is {other}, expected 0 or 1"),
                ))
            }
        },
        8 => MetadataValue::String(
            cursor
                .string(&what)?
                .map_err(|e| bad_metadata(path, key, e.to_string()))?,
        ),
        9 => {
            if depth >= MAX_ARRAY_DEPTH {
                return Err(bad_metadata(
                    path,
                    key,
                    format!("arrays nested more than {MAX_ARRAY_DEPTH} deep"),
                ));
            }
            let element_type = cursor.u32(&what)?;
            let count = cursor.u64(&what)?;
            // The fewest bytes one element can take; a count the rest of the file cannot hold
            // is truncation, found before allocating anything.
            let smallest = match element_type {
                0 | 1 | 7 => 1,
                2 | 3 => 2,
                4..=6 => 4,
                8 | 10..=12 => 8,
                9 => 12,
                other => return Err(unknown_value_type(path, key, other)),
            };
            if count.saturating_mul(smallest) > cursor.remaining() {
                return Err(GgufError::Truncated {
                    path: path.to_path_buf(),
                    what: format!("array of {count} elements in metadata `{key}`"),
                    offset: cursor.position as u64,
                    needed: count.saturating_mul(smallest),
                    file_len: cursor.bytes.len() as u64,
                });
            }
            let mut items = Vec::with_capacity(count as usize);
            for _ in 0..count {
                items.push(read_value(cursor, key, element_type, depth + 1)?);
            }
            MetadataValue::Array(items)
        }
        10 => MetadataValue::U64(u64::from_le_bytes(cursor.array(&what)?)),
        11 => MetadataValue::I64(i64::from_le_bytes(cursor.array(&what)?)),
        12 => MetadataValue::F64(f64::from_le_bytes(cursor.array(&what)?)),
        other => return Err(unknown_value_type(path, key, other)),
    })
}

fn unknown_value_type(path: &Path, key: &str, value_type: u32) -> GgufError {
    bad_metadata(
        path,
        key,
        format!("unknown value type {value_type} (GGUF defines 0 to 12)"),
    )
}

pub(crate) fn bad_metadata(path: &Path, key: &str, message: String) -> GgufError {
    GgufError::BadMetadata {
        path: PathBuf::from(path),
        key: key.to_string(),
        message,
    }
}

fn bad_tensor(path: &Path, tensor: &str, message: String) -> GgufError {
    GgufError::BadTensorInfo {
        path: PathBuf::from(path),
        tensor: tensor.to_string(),
        message,
    }
}
