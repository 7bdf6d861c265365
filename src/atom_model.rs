//! Atom W4A4 on a whole model, for the reference interpreter: the `atom` pass on the
//! prefill and decode graphs, the calibration run that picks each linear's outlier channels,
//! and the quantized weights the rewritten graphs read.
//!
//! It owns that orchestration only: the format and math are `kiln_ir::atom`, the rewrite
//! `kiln_ir::passes::atom`. Compiled plans do not take Atom graphs yet (no CPU or GPU kernel
//! of `atom_linear`); it must not schedule or touch a device.

use crate::generate::kv_cache_state;
use anyhow::{Context, Result};
use kiln_ir::atom::AtomOptions;
use kiln_ir::graph::Graph;
use kiln_ir::interp;
use kiln_ir::passes::atom::{calibration, calibration_graph, quantize_weights, AtomPass};
use kiln_ir::schedule::PassReport;
use kiln_ir::tensor::Tensor;
use kiln_ir::weights::Weights;
use kiln_models::{build_model, ModelConfig, Phase};
use std::collections::HashMap;

/// A model with the Atom pass applied.
pub struct AtomModel {
    pub prefill: Graph,
    pub decode: Graph,
    /// The weights the rewritten graphs read: the quantized linears' Atom tensors and every
    /// other weight as it was.
    pub weights: Weights,
    pub report: PassReport,
    /// Bytes of the quantized linears' weights in the model's dtype, and packed (nibbles,
    /// INT8 columns, f16 scales, permutations).
    pub linear_bytes: (usize, usize),
}

/// Applies Atom to `config`'s graphs and quantizes `weights`, calibrating on a prefill of
/// `calibration_ids` through the unquantized model.
pub fn prepare(
    config: &ModelConfig,
    weights: &Weights,
    options: AtomOptions,
    calibration_ids: &[i32],
) -> Result<AtomModel> {
    let pass = AtomPass::new(options)?;
    let prefill = build_model(config, Phase::Prefill)?;
    let decode = build_model(config, Phase::Decode)?;
    let targets = pass.targets(&prefill)?;
    anyhow::ensure!(
        !targets.is_empty(),
        "--atom: {} has no linear layer in its decoder to quantize",
        config.name
    );

    let n = calibration_ids.len();
    let positions: Vec<i32> = (0..n as i32).collect();
    let mut inputs: HashMap<String, Tensor> = kv_cache_state(config, n, 0.0);
    inputs.insert("input_ids".into(), Tensor::i32(&[1, n], calibration_ids));
    inputs.insert("positions".into(), Tensor::i32(&[1, n], &positions));
    inputs.insert("cache_start".into(), Tensor::i32(&[1], &[0]));
    let outputs = interp::run_with(&calibration_graph(&prefill, &targets), |name| {
        inputs.get(name).or_else(|| weights.get(name))
    })
    .context("--atom: the calibration run")?;
    let mean_squares = calibration(&outputs, &targets);
    let quantized = quantize_weights(&pass, &targets, weights, &mean_squares)?;

    let (prefill, report) = pass.run(&prefill)?;
    let (decode, _) = pass.run(&decode)?;
    let replaced: std::collections::HashSet<&str> =
        targets.iter().map(|t| t.weight.as_str()).collect();
    let dtype_bits = config.dtype.bits();
    let linear_bytes = targets
        .iter()
        .map(|t| t.n * t.k * dtype_bits / 8)
        .sum::<usize>();
    // Packed: i4 two to a byte, i8, f16 scales, i32 permutations.
    let packed = quantized
        .iter()
        .map(|(_, t)| (t.len() * t.dtype.bits()).div_ceil(8))
        .sum();
    let mut all = Weights::new();
    for (name, tensor) in weights.iter() {
        if !replaced.contains(name) {
            all.insert(name, tensor.clone());
        }
    }
    for (name, tensor) in quantized.iter() {
        all.insert(name, tensor.clone());
    }
    Ok(AtomModel {
        prefill,
        decode,
        weights: all,
        report,
        linear_bytes: (linear_bytes, packed),
    })
}
