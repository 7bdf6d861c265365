//! Resolving what the user names on the command line into a model definition and weights.
//!
//! A model is a preset name, a path to a Hugging Face `config.json` (or its directory), or a
//! llama.cpp `.gguf` file (configuration, weights and tokenizer all from the file); weights
//! are random from a seed, safetensors files checked against the graph, or a `.gguf` file;
//! the tokenizer is the `tokenizer.json` beside the config (presets have none) or a GGUF
//! file's tokenizer metadata ([`gguf_tokenizer`]). This module only resolves and loads
//! (drawing a progress bar on a terminal while a GGUF file loads); it must not build kernels
//! or run anything.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_ir::graph::{Graph, TensorType};
use kiln_ir::weights::Weights;
use kiln_models::gguf::{GgufFile, GgufTokenizerData};
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

/// Whether `path` names a GGUF file: its extension is `gguf` (any case).
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|extension| extension.eq_ignore_ascii_case("gguf"))
}

/// Loads a model definition from a preset name, a `config.json` path, or a `.gguf` file (its
/// metadata).
pub fn load_config(spec: &str) -> Result<ModelConfig> {
    let path = Path::new(spec);
    if is_gguf(path) {
        let file = GgufFile::open(path)?;
        return Ok(file.model_config()?);
    }
    Ok(ModelConfig::load(spec)?)
}

/// Where the weights of `--model model` come from: `--weights` when given, else the model
/// itself when it is a `.gguf` file (which holds its weights), else nowhere (random). A
/// `--weights` beside a `.gguf` model is an error: the file already holds the weights, and
/// silently preferring either would hide a mistake.
pub fn weights_source<'a>(model: &'a str, weights: Option<&'a Path>) -> Result<Option<&'a Path>> {
    let model_path = Path::new(model);
    match (is_gguf(model_path), weights) {
        (true, Some(weights)) => anyhow::bail!(
            "--weights {} cannot be used with --model {model}: a GGUF model's weights come \
             from the .gguf file itself (drop --weights)",
            weights.display()
        ),
        (true, None) => Ok(Some(model_path)),
        (false, weights) => Ok(weights),
    }
}

/// Weights for `graph`: loaded from `path` when given, otherwise random from `seed`.
pub fn load_weights(graph: &Graph, path: Option<&Path>, seed: u64) -> Result<Weights> {
    load_expected_weights(&expected_weights(graph), &graph.name, path, seed)
}

/// The `expected` weights of `model`: loaded from `path` when given (a `.gguf` file, or
/// safetensors; every name present with its shape), otherwise random from `seed` (each tensor
/// drawn from its name and the seed, so the same weights whatever the order).
pub fn load_expected_weights(
    expected: &[(String, TensorType)],
    model: &str,
    path: Option<&Path>,
    seed: u64,
) -> Result<Weights> {
    match path {
        Some(path) if is_gguf(path) => load_gguf_weights(expected, path)
            .with_context(|| format!("loading weights for `{model}`")),
        Some(path) => {
            Weights::load(path, expected).with_context(|| format!("loading weights for `{model}`"))
        }
        None => Ok(Weights::random(expected, seed)?),
    }
}

/// The `expected` weights from a GGUF file, dequantized, with a progress bar over the bytes
/// read (drawn only when stderr is a terminal).
fn load_gguf_weights(expected: &[(String, TensorType)], path: &Path) -> Result<Weights> {
    let file = GgufFile::open(path)?;
    let progress = ProgressBar::new(0);
    progress.set_style(
        ProgressStyle::with_template(
            "{spinner} loading {msg} {binary_bytes}/{binary_total_bytes} [{elapsed}]",
        )
        .expect("the template is valid"),
    );
    let weights = file.load_weights_with_progress(expected, |report| {
        progress.set_length(report.total_bytes);
        progress.set_position(report.bytes_read);
        progress.set_message(format!(
            "{} ({}/{} tensors)",
            path.display(),
            report.loaded,
            report.total
        ));
    });
    progress.finish_and_clear();
    Ok(weights?)
}

/// Where the tokenizer of the model named by `spec` would be: `tokenizer.json` in a model
/// directory, or beside a `config.json`. `None` for a preset or a `.gguf` file (whose
/// tokenizer is in the file, see [`find_tokenizer`]).
pub fn tokenizer_path(spec: &str) -> Option<PathBuf> {
    let path = Path::new(spec);
    if !path.exists() || is_gguf(path) {
        return None;
    }
    let directory = if path.is_dir() { path } else { path.parent()? };
    Some(directory.join("tokenizer.json"))
}

/// The tokenizer of the model named by `spec` when it has one, checked against the model's
/// vocabulary size: a `.gguf` file's tokenizer metadata, or the `tokenizer.json` of
/// [`tokenizer_path`]; `None` for a preset or a directory without `tokenizer.json`.
pub fn find_tokenizer(spec: &str, config: &ModelConfig) -> Result<Option<Tokenizer>> {
    let path = Path::new(spec);
    if is_gguf(path) {
        let data = GgufFile::open(path)?.tokenizer_data()?;
        return gguf_tokenizer(&tokenizer_data(data), path, config).map(Some);
    }
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

/// The tokenizer's view of a GGUF file's tokenizer metadata. Absent flags take llama.cpp's
/// defaults: a SentencePiece (`llama`) vocabulary adds BOS and a space prefix, a byte-level
/// one neither.
fn tokenizer_data(gguf: GgufTokenizerData) -> TokenizerData {
    let sentencepiece = gguf.model == "llama";
    TokenizerData {
        model: gguf.model,
        pre: gguf.pre,
        tokens: gguf.vocab,
        scores: gguf.scores.unwrap_or_default(),
        merges: gguf.merges,
        token_types: gguf.token_types.unwrap_or_default(),
        bos: gguf.bos_token_id,
        eos: gguf.eos_token_id,
        unknown: gguf.unknown_token_id,
        padding: gguf.padding_token_id,
        add_bos: gguf.add_bos.unwrap_or(sentencepiece),
        add_space_prefix: gguf.add_space_prefix.unwrap_or(sentencepiece),
        chat_template: gguf.chat_template,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_models_bring_their_weights() {
        assert!(is_gguf(Path::new("dir/m.GGUF")));
        assert!(!is_gguf(Path::new("m.safetensors")));
        assert!(!is_gguf(Path::new("gguf")));
        let explicit = Path::new("w.safetensors");
        assert_eq!(
            weights_source("m.gguf", None).unwrap(),
            Some(Path::new("m.gguf"))
        );
        assert_eq!(
            weights_source("tiny-llama", Some(explicit)).unwrap(),
            Some(explicit)
        );
        assert_eq!(weights_source("tiny-llama", None).unwrap(), None);
        let message = weights_source("m.gguf", Some(explicit))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("--weights w.safetensors") && message.contains("m.gguf"),
            "{message}"
        );
    }
}
