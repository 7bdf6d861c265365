//! # kiln-models — the models kiln compiles
//!
//! What a model is, above the IR: Hugging Face `config.json` files and the built-in presets
//! read into a validated [`ModelConfig`] ([`config`]), the graph builder that turns a config
//! into decoder-layer and whole-model graphs for prefill and decode ([`builder`]), and making
//! the weights those graphs read ([`weights`]: deterministic random initialisation, and
//! loading and saving safetensors checkpoints checked against the graph's expected names,
//! shapes and dtypes, into `kiln_ir::weights::Weights`), and reading llama.cpp GGUF files
//! ([`gguf`]: the configuration from the metadata, dequantized weights by Hugging Face name,
//! the tokenizer metadata as plain data).
//!
//! It must not rewrite, schedule, generate code or touch a device: graphs leave here as plain
//! `kiln_ir` graphs (every node of decoder layer `i` carrying `layer: Some(i)`, the typed fact
//! that passes read instead of labels), and the IR, its rewrites, passes and schedule stay in
//! `kiln-ir`, which never depends on this crate.
//!
//! ```
//! use kiln_models::{build_model, ModelConfig, Phase};
//! use kiln_models::weights::{Weights, WeightsIo};
//! let config = ModelConfig::preset("tiny-llama").unwrap();
//! let graph = build_model(&config, Phase::Decode).unwrap();
//! let expected: Vec<_> = graph.weights().map(|(n, ty)| (n.to_string(), ty.clone())).collect();
//! let weights = Weights::random(&expected, 0).unwrap();
//! assert_eq!(weights.len(), expected.len());
//! ```

pub mod builder;
pub mod config;
pub mod gguf;
pub mod weights;

pub use builder::{
    build_layer, build_layer_with, build_model, build_model_with, BuildOptions, Phase,
};
pub use config::{Architecture, ModelConfig, ModelError, MoeConfig};
pub use gguf::{GgufError, GgufFile, GgufTokenizerData};
