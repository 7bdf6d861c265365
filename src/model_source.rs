//! Resolving what the user names on the command line into a model definition and weights.
//!
//! A model is a preset name or a path to a Hugging Face `config.json` (or its directory);
//! weights are random from a seed, or safetensors files checked against the graph; the
//! tokenizer is the `tokenizer.json` beside the config (presets have none), or a GGUF file's
//! tokenizer metadata ([`gguf_tokenizer`]). This module only resolves and loads; it must not
//! build kernels or run anything.

use anyhow::{Context, Result};
use kiln_ir::graph::{Graph, TensorType};
use kiln_ir::weights::Weights;
use kiln_models::weights::WeightsIo;
use kiln_models::ModelConfig;
use kiln_tokenizer::{Tokenizer, TokenizerData};
use std::path::{Path, PathBuf};

/// The weight tensors a graph expects, `(name, type)` in graph order.
pub fn expected_weights(graph: &Graph) -> Vec<(String, TensorType)> {
    graph
        .weights()
        .map(|(name, ty)| (name.to_string(), ty.clone()))
        .collect()
}

/// Loads a model definition from a preset name or a `config.json` path.
pub fn load_config(spec: &str) -> Result<ModelConfig> {
    Ok(ModelConfig::load(spec)?)
}

/// Weights for `graph`: loaded from `path` when given, otherwise random from `seed`.
pub fn load_weights(graph: &Graph, path: Option<&Path>, seed: u64) -> Result<Weights> {
    load_expected_weights(&expected_weights(graph), &graph.name, path, seed)
}

/// The `expected` weights of `model`: loaded from `path` when given (every name present with
/// its shape), otherwise random from `seed` (each tensor drawn from its name and the seed,
/// so the same weights whatever the order).
pub fn load_expected_weights(
    expected: &[(String, TensorType)],
    model: &str,
    path: Option<&Path>,
    seed: u64,
) -> Result<Weights> {
    match path {
        Some(path) => {
            Weights::load(path, expected).with_context(|| format!("loading weights for `{model}`"))
        }
        None => Ok(Weights::random(expected, seed)?),
    }
}

/// Where the tokenizer of the model named by `spec` would be: `tokenizer.json` in a model
/// directory, or beside a `config.json`. `None` for a preset.
pub fn tokenizer_path(spec: &str) -> Option<PathBuf> {
    let path = Path::new(spec);
    if !path.exists() {
        return None;
    }
    let directory = if path.is_dir() { path } else { path.parent()? };
    Some(directory.join("tokenizer.json"))
}

/// The tokenizer of the model named by `spec` ([`tokenizer_path`]) when it has one, checked
/// against the model's vocabulary size; `None` for a preset or a directory without
/// `tokenizer.json`.
pub fn find_tokenizer(spec: &str, config: &ModelConfig) -> Result<Option<Tokenizer>> {
    match tokenizer_path(spec) {
        Some(path) if path.is_file() => load_tokenizer(&path, config).map(Some),
        _ => Ok(None),
    }
}

/// Loads a `tokenizer.json` (with the `tokenizer_config.json` and `generation_config.json`
/// beside it) and checks it against the model's vocabulary size.
pub fn load_tokenizer(path: &Path, config: &ModelConfig) -> Result<Tokenizer> {
    let tokenizer = Tokenizer::from_file(path)?;
    tokenizer.check_vocab_size(config.vocab_size)?;
    Ok(tokenizer)
}

/// The tokenizer of a GGUF file, from its tokenizer metadata as the GGUF reader fills
/// [`TokenizerData`] (`path` names the file in messages), checked against the model's
/// vocabulary size.
pub fn gguf_tokenizer(
    data: &TokenizerData,
    path: &Path,
    config: &ModelConfig,
) -> Result<Tokenizer> {
    let tokenizer = Tokenizer::from_gguf_data(data, path.display().to_string())?;
    tokenizer.check_vocab_size(config.vocab_size)?;
    Ok(tokenizer)
}
