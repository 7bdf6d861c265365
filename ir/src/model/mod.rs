//! Model definitions and the graph builder.
//!
//! `config` parses Hugging Face `config.json` files and holds the built-in presets;
//! `builder` turns a [`ModelConfig`] into decoder-layer and whole-model graphs for prefill and
//! decode; `cost` counts parameters, FLOPs and bytes for `kiln inspect`.

pub mod builder;
pub mod config;
pub mod cost;

pub use builder::{
    build_layer, build_layer_with, build_model, build_model_with, BuildOptions, Phase,
};
pub use config::{Architecture, ModelConfig, ModelError, MoeConfig};
