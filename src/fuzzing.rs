//! The fuzzing entry points of kiln's input parsers: one function per input kind that feeds
//! arbitrary bytes through the same code the command line runs on that kind of file.
//!
//! Owns the list of fuzzed inputs ([`FuzzTarget`]) and what "parse this input" means for
//! each; the cargo-fuzz targets in `fuzz/fuzz_targets/` and the stable smoke test
//! `tests/fuzz_corpus.rs` (every seed of `fuzz/corpus/<target>/` and deterministic mutations
//! of it) both call [`FuzzTarget::check`], so the two never drift apart.
//!
//! The contract checked for every input: the parser returns (`Ok` or an error), never panics,
//! and an error has a non-empty message (the project's errors name the file or field and what
//! was expected); and a model configuration it accepts builds its graph (small models only). Text inputs that are not UTF-8 are skipped: the file paths read them with
//! `read_to_string`, which fails with an I/O error before any parser runs.
//!
//! It must not touch the file system or a device: every parser here takes bytes in memory,
//! with a fixed made-up origin (`fuzz/config.json`, …) for the error messages.

use crate::compiler::Manifest;
use crate::ir::dtype::DType;
use crate::ir::graph::{Graph, TensorType};
use crate::ir::shape::Shape;
use crate::models::weights::{load_safetensors_bytes, parse_index};
use crate::models::{build_model, GgufFile, ModelConfig, Phase};
use std::fmt::Display;
use std::path::Path;

/// The largest model (decoder layers, experts) whose graph a fuzz input may have built: the
/// graph builder's work grows with these counts, not with the input's size, and a fuzzer
/// needs each input to run in milliseconds.
const MAX_FUZZ_LAYERS: usize = 2;
const MAX_FUZZ_EXPERTS: usize = 8;

/// One fuzzed input kind. Its [`FuzzTarget::name`] is the cargo-fuzz target's name and the
/// directory of its seed corpus, `fuzz/corpus/<name>/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FuzzTarget {
    /// A Hugging Face `config.json`: [`ModelConfig::from_hf_json`], and for a small valid
    /// config the model graph it describes ([`build_model`]).
    ConfigJson,
    /// A safetensors file ([`load_safetensors_bytes`] against [`safetensors_expected`]) and a
    /// sharded checkpoint's index ([`parse_index`]), both on the same bytes.
    SafetensorsHeader,
    /// A GGUF file: header, metadata and tensor directory ([`GgufFile::from_bytes`]), the
    /// tokenizer metadata and the model configuration read from them, and for a small valid
    /// model its weights, dequantized.
    GgufMetadata,
    /// An artifact's `plan.json` ([`Manifest::from_json`]).
    PlanJson,
    /// An embedding data set in CSV ([`crate::embed::parse_csv`]).
    EmbedCsv,
}

impl FuzzTarget {
    /// Every target, in the order of the issue that asked for them.
    pub const ALL: [FuzzTarget; 5] = [
        FuzzTarget::ConfigJson,
        FuzzTarget::SafetensorsHeader,
        FuzzTarget::GgufMetadata,
        FuzzTarget::PlanJson,
        FuzzTarget::EmbedCsv,
    ];

    /// The cargo-fuzz target name and corpus directory name (`config_json`, …).
    pub fn name(self) -> &'static str {
        match self {
            FuzzTarget::ConfigJson => "config_json",
            FuzzTarget::SafetensorsHeader => "safetensors_header",
            FuzzTarget::GgufMetadata => "gguf_metadata",
            FuzzTarget::PlanJson => "plan_json",
            FuzzTarget::EmbedCsv => "embed_csv",
        }
    }

    /// Runs `input` through the target's parsers: `Ok` when it was accepted, else the first
    /// error's message. Panics (which is what a fuzzer reports) when a parser panics or
    /// returns an error whose message is empty.
    pub fn check(self, input: &[u8]) -> Result<(), Rejected> {
        match self {
            FuzzTarget::ConfigJson => config_json(input),
            FuzzTarget::SafetensorsHeader => safetensors_header(input),
            FuzzTarget::GgufMetadata => gguf_metadata(input),
            FuzzTarget::PlanJson => plan_json(input),
            FuzzTarget::EmbedCsv => embed_csv(input),
        }
    }
}

/// Why a parser refused an input: its error's message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(pub String);

/// The message of a parser error, which must say something.
fn message(error: impl Display) -> Rejected {
    let text = error.to_string();
    assert!(
        !text.trim().is_empty(),
        "a parser returned an error with an empty message"
    );
    Rejected(text)
}

/// Whether a valid configuration is small enough to build its graph for each fuzz input.
fn small_enough_to_build(config: &ModelConfig) -> bool {
    config.num_layers <= MAX_FUZZ_LAYERS
        && config
            .moe
            .as_ref()
            .is_none_or(|moe| moe.num_experts <= MAX_FUZZ_EXPERTS)
}

fn config_json(input: &[u8]) -> Result<(), Rejected> {
    let Ok(text) = std::str::from_utf8(input) else {
        return Ok(());
    };
    let config = ModelConfig::from_hf_json(text, "fuzz/config.json").map_err(message)?;
    if small_enough_to_build(&config) {
        for phase in [Phase::Prefill, Phase::Decode] {
            build_validated(&config, phase);
        }
    }
    Ok(())
}

/// The graph of a configuration that passed validation. Building it must not fail:
/// validation is where a config's problems are named by field, so a config it lets through
/// that the builder rejects (or panics on) is a finding, reported as a panic.
fn build_validated(config: &ModelConfig, phase: Phase) -> Graph {
    build_model(config, phase).unwrap_or_else(|error| {
        panic!("a validated configuration does not build its {phase:?} graph: {error}")
    })
}

/// The tensors the safetensors target loads: one per conversion path of the loader (floats
/// from any float dtype, I32 and I8 from their own). The seeds in
/// `fuzz/corpus/safetensors_header/` hold these names.
pub fn safetensors_expected() -> Vec<(String, TensorType)> {
    [
        ("f32", DType::F32, &[2usize, 3][..]),
        ("f16", DType::F16, &[4]),
        ("bf16", DType::BF16, &[2, 2]),
        ("i32", DType::I32, &[3]),
        ("i8", DType::I8, &[5]),
    ]
    .into_iter()
    .map(|(name, dtype, dims)| (name.to_string(), TensorType::new(dtype, Shape::of(dims))))
    .collect()
}

fn safetensors_header(input: &[u8]) -> Result<(), Rejected> {
    let index = parse_index(Path::new("fuzz/model.safetensors.index.json"), input).map_err(message);
    let weights = load_safetensors_bytes(
        Path::new("fuzz/model.safetensors"),
        input,
        &safetensors_expected(),
    )
    .map_err(message);
    // Accepted when it is either; the bytes are never both.
    match (index, weights) {
        (Err(as_index), Err(as_file)) => Err(Rejected(format!(
            "as an index: {as_index}; as a safetensors file: {as_file}"
        ))),
        _ => Ok(()),
    }
}

fn gguf_metadata(input: &[u8]) -> Result<(), Rejected> {
    let file =
        GgufFile::from_bytes(Path::new("fuzz/model.gguf"), input.to_vec()).map_err(message)?;
    let tokenizer = file.tokenizer_data().map_err(message);
    let config = file.model_config().map_err(message)?;
    if small_enough_to_build(&config) {
        let graph = build_validated(&config, Phase::Decode);
        let expected: Vec<(String, TensorType)> = graph
            .weights()
            .map(|(name, ty)| (name.to_string(), ty.clone()))
            .collect();
        file.load_weights(&expected).map_err(message)?;
    }
    tokenizer.map(|_| ())
}

fn plan_json(input: &[u8]) -> Result<(), Rejected> {
    let Ok(text) = std::str::from_utf8(input) else {
        return Ok(());
    };
    Manifest::from_json(text, Path::new("fuzz/plan.json"))
        .map(|_| ())
        .map_err(message)
}

fn embed_csv(input: &[u8]) -> Result<(), Rejected> {
    let Ok(text) = std::str::from_utf8(input) else {
        return Ok(());
    };
    crate::embed::parse_csv(text, "fuzz/data.csv")
        .map(|_| ())
        .map_err(|error| message(format!("{error:#}")))
}
