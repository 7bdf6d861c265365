//! Reading llama.cpp GGUF checkpoints (versions 2 and 3, little-endian).
//!
//! Owns everything kiln knows about the GGUF format: parsing the header, the typed metadata
//! and the tensor directory of a memory-mapped file ([`GgufFile::open`]) or of bytes in memory
//! ([`GgufFile::from_bytes`]); turning the metadata into a validated [`ModelConfig`]
//! ([`GgufFile::model_config`]: architectures `llama`, `llama` with experts (Mixtral) and
//! `qwen2`); loading tensors by kiln's Hugging Face names into [`Weights`]
//! ([`GgufFile::load_weights`]), dequantizing F32, F16, BF16, Q8_0, Q4_0 and Q4_1 at load and
//! undoing llama.cpp's Q/K row permutation; and exposing the tokenizer metadata as plain data
//! ([`GgufFile::tokenizer_data`]) for whoever builds a tokenizer from it.
//!
//! Every offset and size read from the file is checked against the file's length before any
//! byte is read, so a truncated or corrupt file is an error naming the file and what is wrong,
//! never a panic or an out-of-bounds read. Errors are [`GgufError`].
//!
//! It must not build graphs, tokenize text or know about devices: the expected tensors
//! (names, shapes, dtypes) come from the caller, as for safetensors in [`crate::weights`].
//! Progress reporting is a callback; drawing a progress bar is the command line's job.
//!
//! The parts, one idea per file: `gguf/reader.rs` (the binary layout: header, metadata,
//! tensor directory), `gguf/dequantize.rs` (GGML tensor types and block formats),
//! `gguf/names.rs` (GGUF ↔ Hugging Face tensor names and the Q/K permutation),
//! `gguf/config.rs` (metadata → [`ModelConfig`]) and `gguf/tokenizer.rs`
//! ([`GgufTokenizerData`]).

mod config;
mod dequantize;
mod names;
mod reader;
mod tokenizer;

pub use dequantize::GgmlType;
pub use reader::{GgufTensorInfo, MetadataValue};
pub use tokenizer::GgufTokenizerData;

use crate::config::{ModelConfig, ModelError};
use kiln_ir::dtype::DType;
use kiln_ir::graph::TensorType;
use kiln_ir::tensor::{Tensor, TensorError};
use kiln_ir::weights::Weights;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Why a GGUF file could not be read, understood or loaded. Every message starts with the
/// file's path and names the metadata key or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or mapped.
    #[error("cannot read GGUF file `{}`: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The file does not start with `GGUF`.
    #[error(
        "`{}` is not a GGUF file: expected the magic bytes \"GGUF\", found {}",
        .path.display(), escape_bytes(.found)
    )]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The first (up to four) bytes of the file.
        found: Vec<u8>,
    },
    /// A GGUF version kiln does not read (it reads 2 and 3, little-endian).
    #[error(
        "`{}`: unsupported GGUF version {version} (kiln reads versions 2 and 3{})",
        .path.display(),
        if .version.swap_bytes() <= 3 { "; this looks like a big-endian file, which kiln does not read" } else { "" }
    )]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version field, read little-endian.
        version: u32,
    },
    /// A part of the file ends before the file does.
    #[error(
        "`{}`: truncated {what}: needs {needed} bytes at offset {offset}, but the file is \
         {file_len} bytes long",
        .path.display()
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What was being read (`header`, `metadata key 3`, `data of tensor \`x\``, …).
        what: String,
        /// Where it starts.
        offset: u64,
        /// How many bytes it needs.
        needed: u64,
        /// The file's length.
        file_len: u64,
    },
    /// A metadata entry is malformed or has an unusable value.
    #[error("`{}`: metadata `{key}`: {message}", .path.display())]
    BadMetadata {
        /// The file.
        path: PathBuf,
        /// The metadata key (or `#N` for the N-th entry when its key is unreadable).
        key: String,
        /// What is wrong and what was expected.
        message: String,
    },
    /// A metadata key kiln needs is absent.
    #[error("`{}`: missing metadata key `{key}` ({requirement})", .path.display())]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// Why it is needed.
        requirement: String,
    },
    /// An entry of the tensor directory is malformed.
    #[error("`{}`: tensor `{tensor}`: {message}", .path.display())]
    BadTensorInfo {
        /// The file.
        path: PathBuf,
        /// The GGUF tensor name (or `#N` when its name is unreadable).
        tensor: String,
        /// What is wrong.
        message: String,
    },
    /// `general.architecture` names a family kiln does not read from GGUF.
    #[error(
        "`{}`: unsupported architecture {architecture:?} in `general.architecture` \
         (supported: {})",
        .path.display(), SUPPORTED_ARCHITECTURES
    )]
    UnsupportedArchitecture {
        /// The file.
        path: PathBuf,
        /// The architecture found.
        architecture: String,
    },
    /// The model uses a feature kiln does not implement.
    #[error("`{}`: unsupported model: {message}", .path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The feature and where it was found.
        message: String,
    },
    /// A tensor is stored in a GGML type kiln cannot dequantize.
    #[error(
        "`{}`: tensor `{tensor}` has GGML type {} (type id {type_id}), which kiln cannot \
         dequantize (supported: {})",
        .path.display(), GgmlType(*.type_id).name(), GgmlType::SUPPORTED_NAMES
    )]
    UnsupportedTensorType {
        /// The file.
        path: PathBuf,
        /// The GGUF tensor name.
        tensor: String,
        /// The GGML type id.
        type_id: u32,
    },
    /// A weight the model expects has no tensor in the file.
    #[error("`{}`: weight `{name}` not found: {message}", .path.display())]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The kiln (Hugging Face) weight name.
        name: String,
        /// Which GGUF tensor was looked for.
        message: String,
    },
    /// A tensor's shape disagrees with the model configuration.
    #[error(
        "`{}`: tensor `{gguf_name}` (weight `{name}`) has shape {found:?}, expected \
         {expected:?}",
        .path.display()
    )]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// The kiln (Hugging Face) weight name.
        name: String,
        /// The GGUF tensor name.
        gguf_name: String,
        /// The shape the model expects, outermost dimension first.
        expected: Vec<usize>,
        /// The file's shape, outermost dimension first (GGUF lists it innermost first).
        found: Vec<usize>,
    },
    /// A weight is expected in a dtype GGUF tensors cannot load into, or with a shape that
    /// is not concrete.
    #[error("`{}`: weight `{name}`: {message}", .path.display())]
    BadExpectedWeight {
        /// The file.
        path: PathBuf,
        /// The kiln (Hugging Face) weight name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// The configuration read from the metadata is invalid (its origin is the file's path).
    #[error(transparent)]
    Config(#[from] ModelError),
    /// A dequantized tensor does not fit its shape (an internal inconsistency).
    #[error("`{}`: weight `{name}`: {source}", .path.display())]
    BadTensor {
        /// The file.
        path: PathBuf,
        /// The kiln (Hugging Face) weight name.
        name: String,
        /// The tensor error.
        #[source]
        source: TensorError,
    },
}

/// The `general.architecture` values kiln reads, for error messages.
pub const SUPPORTED_ARCHITECTURES: &str = "llama (dense, or with experts as Mixtral), qwen2";

/// `bytes` as a quoted string with non-printable bytes escaped (`"\x00GG"`).
fn escape_bytes(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}

/// How far [`GgufFile::load_weights_with_progress`] has got: called once before the first
/// tensor and once after each.
#[derive(Clone, Copy, Debug)]
pub struct LoadProgress<'a> {
    /// The weight just loaded (kiln name); `None` for the call before the first.
    pub weight: Option<&'a str>,
    /// Weights loaded so far.
    pub loaded: usize,
    /// Weights to load in all.
    pub total: usize,
    /// Bytes of the file read so far (the stored, possibly quantized, size).
    pub bytes_read: u64,
    /// Bytes of the file to read in all.
    pub total_bytes: u64,
}

/// An open, memory-mapped GGUF file: its metadata and tensor directory, parsed and checked.
///
/// ```no_run
/// use kiln_models::gguf::GgufFile;
/// let file = GgufFile::open("SmolLM2-135M-Instruct.Q4_1.gguf".as_ref()).unwrap();
/// let config = file.model_config().unwrap();
/// let graph = kiln_models::build_model(&config, kiln_models::Phase::Decode).unwrap();
/// let expected: Vec<_> = graph.weights().map(|(n, t)| (n.to_string(), t.clone())).collect();
/// let weights = file.load_weights(&expected).unwrap();
/// let tokenizer = file.tokenizer_data().unwrap();
/// println!("{} tokens, {} weights", tokenizer.vocab.len(), weights.len());
/// ```
pub struct GgufFile {
    path: PathBuf,
    map: reader::FileBytes,
    header: reader::Header,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.header.version)
            .field("metadata_keys", &self.header.metadata.len())
            .field("tensors", &self.header.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and memory-maps `path`, then parses and checks the header, the metadata and the
    /// tensor directory (every tensor of a supported type must lie inside the file). Tensor
    /// data is not read until [`GgufFile::load_weights`].
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        GgufFile::parse(path, reader::FileBytes::map(path)?)
    }

    /// [`GgufFile::open`] for a file's bytes already in memory; `path` is where they came
    /// from, for error messages and [`GgufFile::path`]. The same checks as `open`.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        GgufFile::parse(path, reader::FileBytes::InMemory(bytes))
    }

    fn parse(path: &Path, map: reader::FileBytes) -> Result<GgufFile, GgufError> {
        let header = reader::parse(path, map.bytes())?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            header,
        })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.header.version
    }

    /// Every metadata entry, by key (`general.architecture`, `llama.block_count`,
    /// `tokenizer.ggml.tokens`, …), with its typed value.
    pub fn metadata(&self) -> &BTreeMap<String, MetadataValue> {
        &self.header.metadata
    }

    /// The metadata value of `key`, if present.
    pub fn metadata_value(&self, key: &str) -> Option<&MetadataValue> {
        self.header.metadata.get(key)
    }

    /// The tensor directory, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.header.tensors
    }

    /// The directory entry of the GGUF tensor `name` (`blk.0.attn_q.weight`), if present.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.header
            .tensor_index
            .get(name)
            .map(|&index| &self.header.tensors[index])
    }

    /// The model configuration the metadata describes; its `name` is the file's path. See
    /// `gguf/config.rs` for the keys read and the rules (dtype, tied embeddings, biases).
    pub fn model_config(&self) -> Result<ModelConfig, GgufError> {
        config::model_config(self)
    }

    /// The tokenizer metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`) as plain data.
    pub fn tokenizer_data(&self) -> Result<GgufTokenizerData, GgufError> {
        tokenizer::tokenizer_data(self)
    }

    /// Loads the `expected` weights (kiln / Hugging Face names, shapes and float dtypes, as a
    /// graph lists them) from the file's tensors: dequantized to f32, Q/K rows un-permuted for
    /// llama, each checked against the expected shape and rounded to the expected dtype.
    /// Tensors of the file that are not expected are ignored.
    pub fn load_weights(&self, expected: &[(String, TensorType)]) -> Result<Weights, GgufError> {
        self.load_weights_with_progress(expected, |_| {})
    }

    /// [`GgufFile::load_weights`], calling `progress` before the first weight and after each.
    pub fn load_weights_with_progress(
        &self,
        expected: &[(String, TensorType)],
        mut progress: impl FnMut(LoadProgress<'_>),
    ) -> Result<Weights, GgufError> {
        // Resolve every name and check every shape, type and byte range before reading data.
        let mut plans = Vec::with_capacity(expected.len());
        for (name, ty) in expected {
            plans.push(self.plan_weight(name, ty)?);
        }
        let total_bytes = plans.iter().map(|plan| plan.byte_len as u64).sum();
        let mut report = LoadProgress {
            weight: None,
            loaded: 0,
            total: plans.len(),
            bytes_read: 0,
            total_bytes,
        };
        progress(report);
        let mut weights = Weights::new();
        for ((name, _), plan) in expected.iter().zip(&plans) {
            let tensor = self.read_weight(name, plan)?;
            weights.insert(name, tensor);
            report.weight = Some(name);
            report.loaded += 1;
            report.bytes_read += plan.byte_len as u64;
            progress(report);
        }
        Ok(weights)
    }

    /// Where and how to read the weight `name` of type `ty`, all checked.
    fn plan_weight(&self, name: &str, ty: &TensorType) -> Result<WeightPlan, GgufError> {
        let bad_expected = |message: String| GgufError::BadExpectedWeight {
            path: self.path.clone(),
            name: name.to_string(),
            message,
        };
        if !ty.dtype.is_float() {
            return Err(bad_expected(format!(
                "expected as {}, but GGUF tensors load only as f32, f16 or bf16",
                ty.dtype
            )));
        }
        let shape: Vec<usize> = ty
            .shape
            .dims()
            .iter()
            .map(|d| d.as_const())
            .collect::<Option<_>>()
            .ok_or_else(|| {
                bad_expected(format!(
                    "shape {} is not concrete: weights need fixed sizes",
                    ty.shape
                ))
            })?;
        let source = names::gguf_source(name).ok_or_else(|| GgufError::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
            message: "no GGUF tensor name corresponds to it".to_string(),
        })?;
        let (info, expert) = self.find_source(name, &source)?;
        let dtype = GgmlType(info.type_id);
        // The stored shape of what is read: the tensor, or one expert of a stacked tensor.
        let found: Vec<usize> = match expert {
            Some(_) => info.shape[1..].to_vec(),
            None => info.shape.clone(),
        };
        if found != shape {
            return Err(GgufError::ShapeMismatch {
                path: self.path.clone(),
                name: name.to_string(),
                gguf_name: match expert {
                    Some(e) => format!("{}[{e}]", info.name),
                    None => info.name.clone(),
                },
                expected: shape,
                found,
            });
        }
        dtype
            .block_layout()
            .ok_or_else(|| GgufError::UnsupportedTensorType {
                path: self.path.clone(),
                tensor: info.name.clone(),
                type_id: info.type_id,
            })?;
        // The open-time check covers supported types; this recomputes for the slice.
        let tensor_bytes = reader::tensor_byte_len(&self.path, info)?;
        let (start, byte_len) = match expert {
            Some(e) => {
                let per_expert = tensor_bytes / info.shape[0];
                (e * per_expert, per_expert)
            }
            None => (0, tensor_bytes),
        };
        let offset = (self.header.data_start as u64)
            .saturating_add(info.offset)
            .saturating_add(start as u64);
        let file_len = self.map.bytes().len() as u64;
        if offset.saturating_add(byte_len as u64) > file_len {
            return Err(GgufError::Truncated {
                path: self.path.clone(),
                what: format!("data of tensor `{}`", info.name),
                offset,
                needed: byte_len as u64,
                file_len,
            });
        }
        let permute_heads = match source.rope_permuted {
            Some(kind) => self.rope_permutation_heads(kind)?,
            None => None,
        };
        if let Some(heads) = permute_heads {
            if !shape[0].is_multiple_of(2 * heads) {
                return Err(GgufError::Unsupported {
                    path: self.path.clone(),
                    message: format!(
                        "tensor `{}` has {} rows, which do not split into {heads} heads of \
                         rotary pairs",
                        info.name, shape[0]
                    ),
                });
            }
        }
        Ok(WeightPlan {
            gguf_name: info.name.clone(),
            dtype,
            shape,
            offset: offset as usize,
            byte_len,
            permute_heads,
            expected_dtype: ty.dtype,
        })
    }

    /// The tensor that holds `source` (and the expert index when it is one slice of a stacked
    /// expert tensor).
    fn find_source(
        &self,
        name: &str,
        source: &names::GgufSource,
    ) -> Result<(&GgufTensorInfo, Option<usize>), GgufError> {
        if let Some(info) = self.tensor(&source.name) {
            return Ok((info, None));
        }
        if let Some((stacked, expert)) = &source.stacked_expert {
            if let Some(info) = self.tensor(stacked) {
                if info.shape.len() != 3 || *expert >= info.shape[0] {
                    return Err(GgufError::ShapeMismatch {
                        path: self.path.clone(),
                        name: name.to_string(),
                        gguf_name: stacked.clone(),
                        expected: vec![*expert + 1, 0, 0],
                        found: info.shape.clone(),
                    });
                }
                return Ok((info, Some(*expert)));
            }
        }
        let mut message = format!("looked for GGUF tensor `{}`", source.name);
        if let Some((stacked, _)) = &source.stacked_expert {
            message.push_str(&format!(" and stacked experts `{stacked}`"));
        }
        Err(GgufError::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
            message,
        })
    }

    /// How many heads to un-permute a Q or K projection by: `Some` only for llama files, whose
    /// converter interleaves the rotary pairs of each head.
    fn rope_permutation_heads(
        &self,
        kind: names::RopePermuted,
    ) -> Result<Option<usize>, GgufError> {
        let architecture = config::architecture_name(self)?;
        if architecture != "llama" {
            return Ok(None);
        }
        let heads = config::required_count(self, &format!("{architecture}.attention.head_count"))?;
        Ok(Some(match kind {
            names::RopePermuted::Query => heads,
            names::RopePermuted::Key => {
                config::optional_count(self, &format!("{architecture}.attention.head_count_kv"))?
                    .unwrap_or(heads)
            }
        }))
    }

    /// Reads, dequantizes and un-permutes one planned weight.
    fn read_weight(&self, name: &str, plan: &WeightPlan) -> Result<Tensor, GgufError> {
        let bytes = &self.map.bytes()[plan.offset..plan.offset + plan.byte_len];
        let mut values = dequantize::dequantize(plan.dtype, bytes).ok_or_else(|| {
            GgufError::UnsupportedTensorType {
                path: self.path.clone(),
                tensor: plan.gguf_name.clone(),
                type_id: plan.dtype.0,
            }
        })?;
        if let Some(heads) = plan.permute_heads {
            let rows = plan.shape[0];
            let columns = values.len() / rows.max(1);
            values = names::unpermute_rope_rows(&values, rows, columns, heads);
        }
        Tensor::new(plan.expected_dtype, &plan.shape, values).map_err(|source| {
            GgufError::BadTensor {
                path: self.path.clone(),
                name: name.to_string(),
                source,
            }
        })
    }
}

/// One weight to read: where its bytes are and what to do with them.
struct WeightPlan {
    gguf_name: String,
    dtype: GgmlType,
    shape: Vec<usize>,
    offset: usize,
    byte_len: usize,
    permute_heads: Option<usize>,
    expected_dtype: DType,
}
