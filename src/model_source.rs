//! Resolving what the user names on the command line into a model definition and weights.
//!
//! A model is a preset name or a path to a Hugging Face `config.json` (or its directory);
//! weights are random from a seed, or safetensors files checked against the graph. This
//! module only resolves and loads; it must not build kernels or run anything.

use anyhow::{Context, Result};
use kiln_ir::graph::{Graph, TensorType};
use kiln_ir::weights::Weights;
use kiln_models::weights::WeightsIo;
use kiln_models::ModelConfig;
use std::path::Path;

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
