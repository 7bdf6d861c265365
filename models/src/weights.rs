//! Making model weights: random initialisation, and loading and saving safetensors.
//!
//! Fills kiln-ir's [`Weights`] container through [`WeightsIo`]: deterministic random
//! initialisation (each tensor's values depend only on the seed, its name and its shape), and
//! loading and saving safetensors — a single file, or a sharded checkpoint described by
//! `model.safetensors.index.json` — checked against the tensors a graph expects (name, shape,
//! dtype); the bytes of one file and of an index parse through [`load_safetensors_bytes`] and
//! [`parse_index`], the same code the file paths run. It must not know about model architectures: the names and types of the expected
//! tensors come from the caller. The container itself stays in `kiln_ir::weights`, so the
//! runtime can hold weights without this crate.

use kiln_ir::dtype::DType;
use kiln_ir::graph::TensorType;
use kiln_ir::tensor::{Tensor, TensorError, MAX_EXACT_INT};
pub use kiln_ir::weights::Weights;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::TensorView;
use safetensors::{Dtype as StDtype, SafeTensors};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The file name of a sharded checkpoint's index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The file name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// Why weights could not be made, loaded or saved. Every message names the culprit (tensor,
/// file) and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("weight `{name}` has shape {shape}, which is not concrete: weights need fixed sizes")]
    SymbolicShape { name: String, shape: String },
    #[error("weights path `{}` does not exist", .path.display())]
    NotFound { path: PathBuf },
    #[error("cannot read `{}`: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "directory `{}` holds no weights: expected `{INDEX_FILE}`, `{SINGLE_FILE}` or a single \
         `*.safetensors` file{found}",
        .dir.display()
    )]
    NoWeightsInDir { dir: PathBuf, found: String },
    #[error("`{}` is not a valid safetensors file: {message}", .file.display())]
    Corrupt { file: PathBuf, message: String },
    #[error("index `{}` is invalid: {message}", .index.display())]
    BadIndex { index: PathBuf, message: String },
    #[error("shard `{shard}` named in index `{}` does not exist (looked for `{}`)", .index.display(), .path.display())]
    MissingShard {
        shard: String,
        index: PathBuf,
        path: PathBuf,
    },
    #[error("weight `{name}` not found in {searched}")]
    MissingTensor { name: String, searched: String },
    #[error(
        "weight `{name}` in `{}` has shape {found:?}, expected {expected:?}",
        .file.display()
    )]
    ShapeMismatch {
        name: String,
        file: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error(
        "weight `{name}` in `{}` has dtype {found}, expected {expected}{accepted}",
        .file.display()
    )]
    DtypeMismatch {
        name: String,
        file: PathBuf,
        found: String,
        expected: DType,
        accepted: String,
    },
    #[error("weight `{name}` in `{}`: {message}", .file.display())]
    BadValues {
        name: String,
        file: PathBuf,
        message: String,
    },
    #[error("weight `{name}` in `{}`: {source}", .file.display())]
    BadTensor {
        name: String,
        file: PathBuf,
        #[source]
        source: TensorError,
    },
    #[error(
        "cannot save weight `{name}` of dtype i4 and shape {shape:?}: it is stored packed, two \
         values to a byte along the last axis, which must be even"
    )]
    OddPackedAxis { name: String, shape: Vec<usize> },
    #[error("cannot write `{}`: {message}", .path.display())]
    Write { path: PathBuf, message: String },
}

/// How [`Weights`] are made, loaded and saved: `Weights::random`, `Weights::load` and
/// `weights.save` with this trait in scope. Implemented for [`Weights`] only.
pub trait WeightsIo: Sized + sealed::Sealed {
    /// Deterministic random weights for the expected tensors (all shapes must be concrete,
    /// else an error naming the tensor).
    ///
    /// Each tensor's values depend only on `(seed, its name, its shape)` (and are rounded to
    /// its dtype), not on the order of the list or on other tensors: a
    /// [`ChaCha8Rng`] seeded from `seed` draws from the stream given by the 64-bit FNV-1a hash
    /// of the name. The values follow the name and shape:
    /// - names ending in `norm.weight` (RMSNorm weights): all ones;
    /// - names ending in `.bias`: uniform in ±0.02;
    /// - rank-2 names ending in `embed_tokens.weight`: normal with std 1;
    /// - any other rank-2 `[N, K]`: uniform in ±√(3/K) (unit variance outputs for unit inputs);
    /// - anything else: uniform in ±0.02.
    ///
    /// Tensors are drawn in parallel (rayon); the result does not depend on the thread count.
    fn random(expected: &[(String, TensorType)], seed: u64) -> Result<Self, WeightsError>;

    /// Loads the expected tensors from `path`: a `.safetensors` file, a
    /// `model.safetensors.index.json`, or a directory holding either (the index preferred).
    ///
    /// Every expected tensor must be present with the expected shape. Float tensors
    /// (F32/F16/BF16 in the file) are converted to the expected float dtype with rounding;
    /// expected I32/I8 tensors must be stored as I32/I8 of the same kind. Tensors in the files
    /// that are not expected are ignored.
    fn load(path: &Path, expected: &[(String, TensorType)]) -> Result<Self, WeightsError>;

    /// Writes all tensors to one safetensors file in their own dtype (F32, F16, BF16, I32,
    /// I8; I4 is an error), atomically: the bytes go to a temporary file in the same
    /// directory, which is then renamed over `path`, so no half-written file is ever left.
    fn save(&self, path: &Path) -> Result<(), WeightsError>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Weights {}
}

impl WeightsIo for Weights {
    fn random(expected: &[(String, TensorType)], seed: u64) -> Result<Weights, WeightsError> {
        use rayon::prelude::*;
        let drawn: Vec<(String, Tensor)> = expected
            .par_iter()
            .map(|(name, ty)| Ok((name.clone(), random_tensor(name, ty, seed)?)))
            .collect::<Result<_, WeightsError>>()?;
        let mut weights = Weights::new();
        for (name, tensor) in drawn {
            weights.insert(&name, tensor);
        }
        Ok(weights)
    }

    fn load(path: &Path, expected: &[(String, TensorType)]) -> Result<Weights, WeightsError> {
        if !path.exists() {
            return Err(WeightsError::NotFound {
                path: path.to_path_buf(),
            });
        }
        let source = if path.is_dir() {
            find_in_dir(path)?
        } else if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".json"))
        {
            Source::Index(path.to_path_buf())
        } else {
            Source::Single(path.to_path_buf())
        };

        // Which file holds each expected tensor.
        let (plan, searched): (Vec<(PathBuf, usize)>, String) = match &source {
            Source::Single(file) => (
                (0..expected.len()).map(|i| (file.clone(), i)).collect(),
                format!("`{}`", file.display()),
            ),
            Source::Index(index) => {
                let weight_map = read_index(index)?;
                let dir = index.parent().unwrap_or_else(|| Path::new(""));
                // Every shard the index names must exist, needed or not: a missing one means
                // an incomplete download.
                let shards: BTreeSet<&String> = weight_map.values().collect();
                for shard in &shards {
                    let shard_path = dir.join(shard);
                    if !shard_path.is_file() {
                        return Err(WeightsError::MissingShard {
                            shard: shard.to_string(),
                            index: index.clone(),
                            path: shard_path,
                        });
                    }
                }
                let searched = format!(
                    "index `{}` (shards: {})",
                    index.display(),
                    shards
                        .iter()
                        .map(|s| format!("`{s}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                let mut plan = Vec::with_capacity(expected.len());
                for (i, (name, _)) in expected.iter().enumerate() {
                    match weight_map.get(name) {
                        Some(shard) => plan.push((dir.join(shard), i)),
                        None => {
                            return Err(WeightsError::MissingTensor {
                                name: name.clone(),
                                searched,
                            })
                        }
                    }
                }
                (plan, searched)
            }
        };

        // Read each file once, in a fixed order.
        let mut by_file: BTreeMap<PathBuf, Vec<usize>> = BTreeMap::new();
        for (file, i) in plan {
            by_file.entry(file).or_default().push(i);
        }
        let mut weights = Weights::new();
        for (file, indices) in by_file {
            let bytes = std::fs::read(&file).map_err(|source| WeightsError::Read {
                path: file.clone(),
                source,
            })?;
            let searched_here = match &source {
                Source::Index(_) => format!("`{}` (where {searched} places it)", file.display()),
                Source::Single(_) => searched.clone(),
            };
            read_tensors(
                &file,
                &bytes,
                expected,
                &indices,
                &searched_here,
                &mut weights,
            )?;
        }
        Ok(weights)
    }

    fn save(&self, path: &Path) -> Result<(), WeightsError> {
        let mut encoded: Vec<(&str, StDtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, tensor) in self.iter() {
            let (dtype, shape, bytes) = encode(name, tensor)?;
            encoded.push((name, dtype, shape, bytes));
        }
        let write_err = |message: String| WeightsError::Write {
            path: path.to_path_buf(),
            message,
        };
        let mut views = Vec::with_capacity(encoded.len());
        for (name, dtype, shape, bytes) in &encoded {
            let view = TensorView::new(*dtype, shape.to_vec(), bytes)
                .map_err(|e| write_err(format!("weight `{name}`: {e}")))?;
            views.push((*name, view));
        }
        let bytes = safetensors::serialize(views, None).map_err(|e| write_err(e.to_string()))?;
        write_atomically(path, &bytes)
    }
}

/// Loads the `expected` tensors from the bytes of one safetensors file, as
/// [`WeightsIo::load`] does for each file it reads (same checks, same errors); `file` is where
/// the bytes came from, for error messages.
pub fn load_safetensors_bytes(
    file: &Path,
    bytes: &[u8],
    expected: &[(String, TensorType)],
) -> Result<Weights, WeightsError> {
    let indices: Vec<usize> = (0..expected.len()).collect();
    let searched = format!("`{}`", file.display());
    let mut weights = Weights::new();
    read_tensors(file, bytes, expected, &indices, &searched, &mut weights)?;
    Ok(weights)
}

/// Reads the tensors `expected[indices]` from the safetensors `bytes` of `file` into
/// `weights`; `searched` says where a missing tensor was looked for.
fn read_tensors(
    file: &Path,
    bytes: &[u8],
    expected: &[(String, TensorType)],
    indices: &[usize],
    searched: &str,
    weights: &mut Weights,
) -> Result<(), WeightsError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| WeightsError::Corrupt {
        file: file.to_path_buf(),
        message: e.to_string(),
    })?;
    for &i in indices {
        let (name, ty) = &expected[i];
        let view = st.tensor(name).map_err(|_| WeightsError::MissingTensor {
            name: name.clone(),
            searched: searched.to_string(),
        })?;
        let tensor = convert(name, file, ty, &view)?;
        weights.insert(name, tensor);
    }
    Ok(())
}

/// One tensor of [`WeightsIo::random`].
fn random_tensor(name: &str, ty: &TensorType, seed: u64) -> Result<Tensor, WeightsError> {
    let shape = concrete_shape(name, ty)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(fnv1a64(name.as_bytes()));
    let dtype = ty.dtype;
    let tensor = if name.ends_with("norm.weight") {
        Tensor::full(dtype, &shape, 1.0)
    } else if name.ends_with(".bias") {
        Tensor::uniform(dtype, &shape, 0.02, &mut rng)
    } else if shape.len() == 2 && name.ends_with("embed_tokens.weight") {
        Tensor::normal(dtype, &shape, 1.0, &mut rng)
    } else if shape.len() == 2 {
        let k = shape[1].max(1);
        Tensor::uniform(dtype, &shape, (3.0 / k as f32).sqrt(), &mut rng)
    } else {
        Tensor::uniform(dtype, &shape, 0.02, &mut rng)
    };
    Ok(tensor)
}

/// Where a checkpoint's tensors are.
enum Source {
    Single(PathBuf),
    Index(PathBuf),
}

/// 64-bit FNV-1a: a stable hash (unlike `std`'s hasher, fixed across versions and runs).
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= b as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The concrete sizes of an expected tensor, or an error naming it.
fn concrete_shape(name: &str, ty: &TensorType) -> Result<Vec<usize>, WeightsError> {
    ty.shape
        .dims()
        .iter()
        .map(|d| d.as_const())
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| WeightsError::SymbolicShape {
            name: name.to_string(),
            shape: ty.shape.to_string(),
        })
}

/// The checkpoint in a directory: the index if present, else `model.safetensors`, else the
/// only `*.safetensors` file.
fn find_in_dir(dir: &Path) -> Result<Source, WeightsError> {
    let index = dir.join(INDEX_FILE);
    if index.is_file() {
        return Ok(Source::Index(index));
    }
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(Source::Single(single));
    }
    let entries = std::fs::read_dir(dir).map_err(|source| WeightsError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.len() == 1 {
        return Ok(Source::Single(files.remove(0)));
    }
    let found = if files.is_empty() {
        String::new()
    } else {
        format!(
            " (found several, which is ambiguous without an index: {})",
            files
                .iter()
                .filter_map(|f| f.file_name().map(|n| format!("`{}`", n.to_string_lossy())))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    Err(WeightsError::NoWeightsInDir {
        dir: dir.to_path_buf(),
        found,
    })
}

/// The `weight_map` of an index file: tensor name → shard file name.
fn read_index(index: &Path) -> Result<BTreeMap<String, String>, WeightsError> {
    let text = std::fs::read(index).map_err(|source| WeightsError::Read {
        path: index.to_path_buf(),
        source,
    })?;
    parse_index(index, &text)
}

/// The `weight_map` of the bytes of an index file (`model.safetensors.index.json`): tensor
/// name → shard file name; `index` is where the bytes came from, for error messages.
pub fn parse_index(index: &Path, text: &[u8]) -> Result<BTreeMap<String, String>, WeightsError> {
    let bad = |message: String| WeightsError::BadIndex {
        index: index.to_path_buf(),
        message,
    };
    let json: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("expected an object `weight_map` of tensor name → shard file".into()))?;
    let mut weight_map = BTreeMap::new();
    for (name, shard) in map {
        let shard = shard.as_str().ok_or_else(|| {
            bad(format!(
                "`weight_map` entry `{name}` is {shard}, expected a shard file name"
            ))
        })?;
        weight_map.insert(name.clone(), shard.to_string());
    }
    Ok(weight_map)
}

/// A file tensor as a host tensor of the expected type.
fn convert(
    name: &str,
    file: &Path,
    ty: &TensorType,
    view: &TensorView<'_>,
) -> Result<Tensor, WeightsError> {
    let expected_shape = concrete_shape(name, ty)?;
    let stored_shape = match ty.dtype {
        DType::I4 => packed_shape(&expected_shape).unwrap_or_default(),
        _ => expected_shape.clone(),
    };
    if view.shape() != stored_shape.as_slice() {
        return Err(WeightsError::ShapeMismatch {
            name: name.to_string(),
            file: file.to_path_buf(),
            expected: stored_shape,
            found: view.shape().to_vec(),
        });
    }
    let dtype_err = |accepted: &str| WeightsError::DtypeMismatch {
        name: name.to_string(),
        file: file.to_path_buf(),
        found: format!("{:?}", view.dtype()),
        expected: ty.dtype,
        accepted: accepted.to_string(),
    };
    let bytes = view.data();
    let data: Vec<f32> = match (ty.dtype, view.dtype()) {
        (DType::F32 | DType::F16 | DType::BF16, StDtype::F32) => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        (DType::F32 | DType::F16 | DType::BF16, StDtype::F16) => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        (DType::F32 | DType::F16 | DType::BF16, StDtype::BF16) => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        (DType::F32 | DType::F16 | DType::BF16, _) => {
            return Err(dtype_err(" (a float tensor: F32, F16 or BF16 in the file)"))
        }
        (DType::I32, StDtype::I32) => {
            let mut data = Vec::with_capacity(bytes.len() / 4);
            for (i, c) in bytes.chunks_exact(4).enumerate() {
                let v = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                if (v as i64).abs() > MAX_EXACT_INT {
                    return Err(WeightsError::BadValues {
                        name: name.to_string(),
                        file: file.to_path_buf(),
                        message: format!(
                            "value {v} at index {i} is beyond ±{MAX_EXACT_INT}, the exact \
                             integer range of host tensors"
                        ),
                    });
                }
                data.push(v as f32);
            }
            data
        }
        (DType::I32, _) => return Err(dtype_err(" (I32 in the file)")),
        (DType::I8, StDtype::I8) => bytes.iter().map(|&b| b as i8 as f32).collect(),
        (DType::I8, _) => return Err(dtype_err(" (I8 in the file)")),
        (DType::I4, StDtype::U8) => bytes
            .iter()
            .flat_map(|&b| [(b & 0x0f) as f32 - 8.0, (b >> 4) as f32 - 8.0])
            .collect(),
        (DType::I4, _) => {
            return Err(dtype_err(
                " (U8 in the file: i4 values packed two to a byte, see `PACKED_I4`)",
            ))
        }
    };
    Tensor::new(ty.dtype, &expected_shape, data).map_err(|source| WeightsError::BadTensor {
        name: name.to_string(),
        file: file.to_path_buf(),
        source,
    })
}

/// How i4 tensors are stored: `U8` bytes, two values to a byte along the last axis (which
/// must be even, and is halved in the file's shape), each the unsigned nibble `q + 8`, the
/// lower-index value in the low nibble (the Atom kernels' layout).
pub const PACKED_I4: &str = "U8, two i4 values q + 8 per byte, low nibble first";

/// The file shape of an i4 tensor of `shape` (last axis halved), `None` when it is odd or
/// the shape is empty.
fn packed_shape(shape: &[usize]) -> Option<Vec<usize>> {
    let (&last, _) = shape.split_last()?;
    if !last.is_multiple_of(2) {
        return None;
    }
    let mut packed = shape.to_vec();
    *packed.last_mut()? = last / 2;
    Some(packed)
}

/// A host tensor's little-endian bytes in its own dtype, with the file's dtype and shape.
fn encode(name: &str, tensor: &Tensor) -> Result<(StDtype, Vec<usize>, Vec<u8>), WeightsError> {
    let data = &tensor.data;
    if tensor.dtype == DType::I4 {
        let shape = packed_shape(&tensor.shape).ok_or_else(|| WeightsError::OddPackedAxis {
            name: name.to_string(),
            shape: tensor.shape.clone(),
        })?;
        let nibble = |v: f32| ((v as i32 + 8) & 0x0f) as u8;
        let bytes = data
            .chunks_exact(2)
            .map(|pair| nibble(pair[0]) | (nibble(pair[1]) << 4))
            .collect();
        return Ok((StDtype::U8, shape, bytes));
    }
    let shape = tensor.shape.clone();
    let (dtype, bytes) = match tensor.dtype {
        DType::F32 => (
            StDtype::F32,
            data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        DType::F16 => (
            StDtype::F16,
            data.iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
        ),
        DType::BF16 => (
            StDtype::BF16,
            data.iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
        ),
        DType::I32 => (
            StDtype::I32,
            data.iter()
                .flat_map(|&v| (v as i32).to_le_bytes())
                .collect(),
        ),
        DType::I8 => (
            StDtype::I8,
            data.iter().flat_map(|&v| (v as i8).to_le_bytes()).collect(),
        ),
        DType::I4 => unreachable!("packed above"),
    };
    Ok((dtype, shape, bytes))
}

/// Writes `bytes` to a fresh temporary file beside `path`, syncs it and renames it over
/// `path`. On any failure the temporary file is removed and `path` is left as it was.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), WeightsError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let write_err = |message: String| WeightsError::Write {
        path: path.to_path_buf(),
        message,
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| write_err("the path does not name a file".into()))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let temp = path.with_file_name(format!(
        ".{}.tmp-{}-{}-{}",
        file_name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        nanos
    ));
    let result = (|| -> std::io::Result<()> {
        let mut file = std::fs::File::create_new(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&temp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&temp);
        return Err(write_err(format!(
            "{e} (while writing the temporary file `{}`)",
            temp.display()
        )));
    }
    // Make the rename durable where the platform allows; failure here loses nothing.
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(dir) = std::fs::File::open(parent) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::shape::Shape;

    fn ty(dtype: DType, dims: &[usize]) -> TensorType {
        TensorType::new(dtype, Shape::of(dims))
    }

    fn expected() -> Vec<(String, TensorType)> {
        vec![
            (
                "model.embed_tokens.weight".into(),
                ty(DType::BF16, &[32, 16]),
            ),
            (
                "model.layers.0.self_attn.q_proj.weight".into(),
                ty(DType::F16, &[16, 16]),
            ),
            (
                "model.layers.0.self_attn.q_proj.bias".into(),
                ty(DType::F32, &[16]),
            ),
            (
                "model.layers.0.input_layernorm.weight".into(),
                ty(DType::F32, &[16]),
            ),
            (
                "model.layers.0.self_attn.q_norm.weight".into(),
                ty(DType::BF16, &[8]),
            ),
            ("model.norm.weight".into(), ty(DType::F16, &[16])),
            ("lm_head.weight".into(), ty(DType::F32, &[32, 16])),
        ]
    }

    fn err_text<T: std::fmt::Debug>(r: Result<T, WeightsError>) -> String {
        r.expect_err("expected an error").to_string()
    }

    #[test]
    fn round_trip_keeps_every_value_and_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let exp = expected();
        let w = Weights::random(&exp, 3).unwrap();
        w.save(&path).unwrap();
        let back = Weights::load(&path, &exp).unwrap();
        assert_eq!(back, w);
        for (name, t) in back.iter() {
            let (_, want) = exp.iter().find(|(n, _)| n == name).unwrap();
            assert_eq!(t.dtype, want.dtype, "{name}");
        }
        // Loading the directory finds the only safetensors file in it.
        assert_eq!(Weights::load(dir.path(), &exp).unwrap(), w);
        // No temporary files are left beside the saved one.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("w.safetensors")]);
        // Saving again over the file replaces it.
        let w2 = Weights::random(&exp, 4).unwrap();
        w2.save(&path).unwrap();
        assert_eq!(Weights::load(&path, &exp).unwrap(), w2);
    }

    #[test]
    fn integer_tensors_round_trip_and_bytes_count_storage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ints.safetensors");
        let mut w = Weights::new();
        w.insert("ids", Tensor::i32(&[3], &[-5, 0, 1 << 20]));
        w.insert(
            "q",
            Tensor::new(DType::I8, &[2, 2], vec![-128.0, 127.0, 0.0, -1.0]).unwrap(),
        );
        w.insert("h", Tensor::f32(&[3], vec![0.5, 1.5, 2.5]).cast(DType::F16));
        assert_eq!(w.bytes(), 12 + 4 + 6);
        w.save(&path).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() as usize > w.bytes());
        let exp = vec![
            ("ids".to_string(), ty(DType::I32, &[3])),
            ("q".to_string(), ty(DType::I8, &[2, 2])),
            ("h".to_string(), ty(DType::F16, &[3])),
        ];
        assert_eq!(Weights::load(&path, &exp).unwrap(), w);
        // i8 stored where i32 is expected is refused: integer kinds must match.
        let exp_wrong = vec![("q".to_string(), ty(DType::I32, &[2, 2]))];
        let msg = err_text(Weights::load(&path, &exp_wrong));
        assert!(
            msg.contains("`q`") && msg.contains("I8") && msg.contains("i32"),
            "{msg}"
        );
    }

    #[test]
    fn i4_round_trips_packed_two_to_a_byte_and_an_odd_axis_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let values: Vec<f32> = (0..12).map(|i| (i as f32) - 8.0 + (i % 3) as f32).collect();
        let values: Vec<f32> = values.iter().map(|v| v.clamp(-8.0, 7.0)).collect();
        let mut w = Weights::new();
        w.insert(
            "packed",
            Tensor::new(DType::I4, &[3, 4], values.clone()).unwrap(),
        );
        w.save(&path).unwrap();
        // The file: U8 [3, 2], nibbles q + 8 with the first value low.
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let view = st.tensor("packed").unwrap();
        assert_eq!(
            (view.dtype(), view.shape()),
            (StDtype::U8, &[3usize, 2][..])
        );
        let first = view.data()[0];
        assert_eq!(
            (first & 0x0f, first >> 4),
            ((values[0] + 8.0) as u8, (values[1] + 8.0) as u8)
        );
        let expected = vec![("packed".to_string(), ty(DType::I4, &[3, 4]))];
        let back = Weights::load(&path, &expected).unwrap();
        assert_eq!(back.get("packed").unwrap().data, values);

        let odd = dir.path().join("odd.safetensors");
        let mut w = Weights::new();
        w.insert("packed", Tensor::zeros(DType::I4, &[3]));
        let msg = err_text(w.save(&odd));
        assert!(msg.contains("`packed`") && msg.contains("even"), "{msg}");
        assert!(!odd.exists());
    }

    #[test]
    fn bf16_file_tensor_converts_exactly_to_f32() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bf.safetensors");
        let mut w = Weights::new();
        let values = vec![1.0, -2.5, 1.0 + 2f32.powi(-7), 3.0e-3, 65504.0, -1.0e20];
        let t = Tensor::new(DType::BF16, &[2, 3], values).unwrap();
        w.insert("x", t.clone());
        w.save(&path).unwrap();
        let exp = vec![("x".to_string(), ty(DType::F32, &[2, 3]))];
        let back = Weights::load(&path, &exp).unwrap();
        let got = back.get("x").unwrap();
        assert_eq!(got.dtype, DType::F32);
        assert_eq!(got.data, t.data);
        // f32 in the file, bf16 expected: values are rounded to bf16.
        let mut w32 = Weights::new();
        w32.insert("y", Tensor::f32(&[2], vec![1.0 + 2f32.powi(-9), 0.1]));
        w32.save(&path).unwrap();
        let exp = vec![("y".to_string(), ty(DType::BF16, &[2]))];
        let got = Weights::load(&path, &exp).unwrap();
        let want = vec![1.0, half::bf16::from_f32(0.1).to_f32()];
        assert_eq!(got.get("y").unwrap().data, want);
        assert_eq!(got.get("y").unwrap().dtype, DType::BF16);
    }

    #[test]
    fn random_is_deterministic_per_seed_and_name() {
        let exp = expected();
        let a = Weights::random(&exp, 42).unwrap();
        let b = Weights::random(&exp, 42).unwrap();
        assert_eq!(a, b);
        let c = Weights::random(&exp, 43).unwrap();
        let q = "model.layers.0.self_attn.q_proj.weight";
        assert_ne!(a.get(q).unwrap().data, c.get(q).unwrap().data);
        assert_ne!(a, c);

        // Removing, reordering or adding other tensors changes nothing for this one.
        let only: Vec<_> = exp.iter().filter(|(n, _)| n == q).cloned().collect();
        let alone = Weights::random(&only, 42).unwrap();
        assert_eq!(alone.len(), 1);
        assert_eq!(alone.get(q), a.get(q));
        let mut more: Vec<_> = exp.iter().rev().cloned().collect();
        more.push(("extra.weight".into(), ty(DType::F32, &[4, 4])));
        let m = Weights::random(&more, 42).unwrap();
        for (name, t) in a.iter() {
            assert_eq!(m.get(name), Some(t), "{name}");
        }
        // Two tensors of the same shape but different names differ.
        let twins = vec![
            ("a.weight".to_string(), ty(DType::F32, &[8, 8])),
            ("b.weight".to_string(), ty(DType::F32, &[8, 8])),
        ];
        let t = Weights::random(&twins, 1).unwrap();
        assert_ne!(
            t.get("a.weight").unwrap().data,
            t.get("b.weight").unwrap().data
        );
    }

    #[test]
    fn random_follows_the_init_rules() {
        let exp = expected();
        let w = Weights::random(&exp, 7).unwrap();
        for name in [
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.self_attn.q_norm.weight",
            "model.norm.weight",
        ] {
            let t = w.get(name).unwrap();
            assert!(t.data.iter().all(|&v| v == 1.0), "{name}");
        }
        let bias = w.get("model.layers.0.self_attn.q_proj.bias").unwrap();
        assert!(bias.data.iter().all(|&v| v.abs() <= 0.02));
        assert!(bias.data.iter().any(|&v| v != 0.0));
        let bound = (3.0f32 / 16.0).sqrt();
        let q = w.get("model.layers.0.self_attn.q_proj.weight").unwrap();
        assert_eq!(q.dtype, DType::F16);
        assert!(q.data.iter().all(|&v| v.abs() <= bound * 1.001));
        assert!(q.data.iter().any(|&v| v.abs() > 0.02));
        assert!(q.data.iter().all(|&v| DType::F16.round(v) == v));
        // The embedding is normal(0, 1): some values beyond the uniform bound of 1.
        let e = w.get("model.embed_tokens.weight").unwrap();
        assert!(e.data.iter().any(|&v| v.abs() > 1.0));
        assert!(e.data.iter().all(|&v| DType::BF16.round(v) == v));
        let small =
            Weights::random(&[("x.scale".to_string(), ty(DType::F32, &[2, 3, 4]))], 7).unwrap();
        assert!(small
            .get("x.scale")
            .unwrap()
            .data
            .iter()
            .all(|&v| v.abs() <= 0.02));
    }

    #[test]
    fn random_rejects_symbolic_shapes() {
        let exp = vec![(
            "kv_cache".to_string(),
            TensorType::new(DType::F16, kiln_ir::shape!["ctx", 8]),
        )];
        let msg = err_text(Weights::random(&exp, 0));
        assert!(msg.contains("`kv_cache`") && msg.contains("ctx"), "{msg}");
    }

    /// Writes `w`'s tensors split across two shards plus an index in `dir`.
    fn write_sharded(dir: &Path, w: &Weights) -> Vec<String> {
        let names: Vec<String> = w.iter().map(|(n, _)| n.to_string()).collect();
        let (first, second) = names.split_at(names.len() / 2);
        let mut map = serde_json::Map::new();
        let shards = [
            ("model-00001-of-00002.safetensors", first),
            ("model-00002-of-00002.safetensors", second),
        ];
        for (file, part) in shards {
            let mut shard = Weights::new();
            for name in part {
                shard.insert(name, w.get(name).unwrap().clone());
                map.insert(name.clone(), serde_json::Value::String(file.to_string()));
            }
            shard.save(&dir.join(file)).unwrap();
        }
        let index = serde_json::json!({
            "metadata": {"total_size": w.bytes()},
            "weight_map": map,
        });
        std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
        names
    }

    #[test]
    fn sharded_checkpoint_loads_via_directory_and_index() {
        let dir = tempfile::tempdir().unwrap();
        let exp = expected();
        let w = Weights::random(&exp, 11).unwrap();
        write_sharded(dir.path(), &w);
        // A stray single file in the directory must lose to the index.
        let mut decoy = Weights::new();
        decoy.insert("model.norm.weight", Tensor::zeros(DType::F16, &[16]));
        decoy.save(&dir.path().join(SINGLE_FILE)).unwrap();

        assert_eq!(Weights::load(dir.path(), &exp).unwrap(), w);
        assert_eq!(
            Weights::load(&dir.path().join(INDEX_FILE), &exp).unwrap(),
            w
        );
        // Unexpected tensors in the shards are ignored.
        let fewer = &exp[..2];
        let some = Weights::load(dir.path(), fewer).unwrap();
        assert_eq!(some.len(), 2);
    }

    #[test]
    fn missing_tensor_names_tensor_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let exp = expected();
        Weights::random(&exp[..3], 1).unwrap().save(&path).unwrap();
        let msg = err_text(Weights::load(&path, &exp));
        assert!(
            msg.contains("model.layers.0.input_layernorm.weight"),
            "{msg}"
        );
        assert!(msg.contains("w.safetensors"), "{msg}");

        // Sharded: missing from the index names the index and its shards.
        let sdir = tempfile::tempdir().unwrap();
        let w = Weights::random(&exp[..4], 1).unwrap();
        write_sharded(sdir.path(), &w);
        let msg = err_text(Weights::load(sdir.path(), &exp));
        assert!(
            msg.contains("model.norm.weight") || msg.contains("q_norm"),
            "{msg}"
        );
        assert!(msg.contains(INDEX_FILE), "{msg}");
        assert!(msg.contains("model-00001-of-00002.safetensors"), "{msg}");
    }

    #[test]
    fn tensor_listed_in_index_but_absent_from_its_shard() {
        let dir = tempfile::tempdir().unwrap();
        let exp = expected();
        let w = Weights::random(&exp, 1).unwrap();
        write_sharded(dir.path(), &w);
        // Rewrite the first shard without one of its tensors.
        let first: Vec<_> = w
            .iter()
            .take(w.len() / 2)
            .map(|(n, _)| n.to_string())
            .collect();
        let mut shard = Weights::new();
        for name in &first[1..] {
            shard.insert(name, w.get(name).unwrap().clone());
        }
        shard
            .save(&dir.path().join("model-00001-of-00002.safetensors"))
            .unwrap();
        let msg = err_text(Weights::load(dir.path(), &exp));
        assert!(msg.contains(&format!("`{}`", first[0])), "{msg}");
        assert!(msg.contains("model-00001-of-00002.safetensors"), "{msg}");
    }

    #[test]
    fn wrong_shape_names_tensor_file_and_both_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shape.safetensors");
        let mut w = Weights::new();
        w.insert("proj.weight", Tensor::zeros(DType::F32, &[4, 6]));
        w.save(&path).unwrap();
        let exp = vec![("proj.weight".to_string(), ty(DType::F32, &[6, 4]))];
        let msg = err_text(Weights::load(&path, &exp));
        assert!(msg.contains("`proj.weight`"), "{msg}");
        assert!(msg.contains("shape.safetensors"), "{msg}");
        assert!(msg.contains("[4, 6]") && msg.contains("[6, 4]"), "{msg}");
        assert!(msg.contains("expected [6, 4]"), "{msg}");
    }

    #[test]
    fn wrong_dtype_names_tensor_file_and_dtypes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dtype.safetensors");
        let mut w = Weights::new();
        w.insert("tok", Tensor::i32(&[2], &[1, 2]));
        w.save(&path).unwrap();
        let exp = vec![("tok".to_string(), ty(DType::F16, &[2]))];
        let msg = err_text(Weights::load(&path, &exp));
        assert!(msg.contains("`tok`"), "{msg}");
        assert!(msg.contains("dtype.safetensors"), "{msg}");
        assert!(msg.contains("I32") && msg.contains("f16"), "{msg}");

        // A float file tensor is refused where an integer one is expected.
        let mut wf = Weights::new();
        wf.insert("tok", Tensor::f32(&[2], vec![1.0, 2.0]));
        wf.save(&path).unwrap();
        let exp = vec![("tok".to_string(), ty(DType::I32, &[2]))];
        let msg = err_text(Weights::load(&path, &exp));
        assert!(
            msg.contains("`tok`") && msg.contains("F32") && msg.contains("i32"),
            "{msg}"
        );
    }

    #[test]
    fn truncated_or_garbage_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trunc.safetensors");
        let exp = expected();
        Weights::random(&exp, 5).unwrap().save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let msg = err_text(Weights::load(&path, &exp));
        assert!(msg.contains("trunc.safetensors"), "{msg}");
        assert!(msg.contains("not a valid safetensors file"), "{msg}");

        // Truncated inside the header, and plain garbage.
        for content in [&bytes[..12], b"hello".as_slice(), &[0xff; 64][..]] {
            std::fs::write(&path, content).unwrap();
            let msg = err_text(Weights::load(&path, &exp));
            assert!(msg.contains("trunc.safetensors"), "{msg}");
        }
    }

    #[test]
    fn missing_shard_names_shard_and_index() {
        let dir = tempfile::tempdir().unwrap();
        let exp = expected();
        let w = Weights::random(&exp, 2).unwrap();
        write_sharded(dir.path(), &w);
        std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
        let msg = err_text(Weights::load(dir.path(), &exp));
        assert!(msg.contains("model-00002-of-00002.safetensors"), "{msg}");
        assert!(msg.contains(INDEX_FILE), "{msg}");
    }

    #[test]
    fn bad_index_names_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join(INDEX_FILE);
        std::fs::write(&index, "{\"metadata\": {}}").unwrap();
        let msg = err_text(Weights::load(&index, &expected()));
        assert!(
            msg.contains(INDEX_FILE) && msg.contains("weight_map"),
            "{msg}"
        );
        std::fs::write(&index, "{not json").unwrap();
        let msg = err_text(Weights::load(dir.path(), &expected()));
        assert!(msg.contains(INDEX_FILE), "{msg}");
    }

    #[test]
    fn nonexistent_path_and_empty_directory_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nowhere").join("model.safetensors");
        let msg = err_text(Weights::load(&path, &expected()));
        assert!(
            msg.contains("nowhere") && msg.contains("does not exist"),
            "{msg}"
        );
        let msg = err_text(Weights::load(dir.path(), &expected()));
        assert!(
            msg.contains(INDEX_FILE) && msg.contains(SINGLE_FILE),
            "{msg}"
        );
    }

    #[test]
    fn fnv1a_matches_reference_values() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
