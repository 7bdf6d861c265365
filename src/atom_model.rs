//! Atom W4A4 on a whole model: the `atom` pass on the prefill and decode graphs (for the
//! reference interpreter), the calibration run that picks each linear's outlier channels,
//! and the quantized weights the rewritten graphs read — the interpreter's, and the compiled
//! CPU plans' (`crate::plan_runner::Passes::atom`: the compiler runs the same pass on the
//! model graphs, so the plans read the same weights).
//!
//! A model quantized once (`kiln quantize --atom -o FILE`) is read back by
//! [`prepare_quantized`]: the file holds the Atom tensors (i4 packed two to a byte, see
//! `kiln_models::weights::PACKED_I4`) and every other weight, and no calibration runs.
//!
//! It owns that orchestration only: the format and math are `kiln_ir::atom`, the rewrite
//! `kiln_ir::passes::atom`, the plans' kernels the compiler's and runtime's (CPU only: no GPU
//! kernel of `atom_linear` yet); it must not schedule or touch a device.

use crate::generate::kv_cache_state;
use crate::model_source::load_weights;
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
use std::io::Read;
use std::path::Path;

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

    let replaced: std::collections::HashSet<&str> =
        targets.iter().map(|t| t.weight.as_str()).collect();
    let mut all = Weights::new();
    for (name, tensor) in weights.iter() {
        if !replaced.contains(name) {
            all.insert(name, tensor.clone());
        }
    }
    for (name, tensor) in quantized.iter() {
        all.insert(name, tensor.clone());
    }
    finish(config, &pass, prefill, decode, all)
}

/// Applies Atom to `config`'s graphs and reads their weights, already quantized, from
/// `path` (written by `kiln quantize --atom` with the same options).
pub fn prepare_quantized(
    config: &ModelConfig,
    options: AtomOptions,
    path: &Path,
) -> Result<AtomModel> {
    let pass = AtomPass::new(options)?;
    let prefill = build_model(config, Phase::Prefill)?;
    let decode = build_model(config, Phase::Decode)?;
    let (rewritten, _) = pass.run(&prefill)?;
    let weights = load_weights(&rewritten, Some(path), 0).with_context(|| {
        format!(
            "reading the Atom weights of {} from {} (quantized with other --atom options?)",
            config.name,
            path.display()
        )
    })?;
    finish(config, &pass, prefill, decode, weights)
}

/// The rewritten graphs, the report and the byte counts of `weights` (the rewritten graphs').
fn finish(
    config: &ModelConfig,
    pass: &AtomPass,
    prefill: Graph,
    decode: Graph,
    weights: Weights,
) -> Result<AtomModel> {
    let targets = pass.targets(&prefill)?;
    let (prefill, report) = pass.run(&prefill)?;
    let (decode, _) = pass.run(&decode)?;
    let linear_bytes = targets
        .iter()
        .map(|t| t.n * t.k * config.dtype.bits() / 8)
        .sum::<usize>();
    // Packed: i4 two to a byte, i8, f16 scales, i32 permutations.
    let packed = targets
        .iter()
        .flat_map(|t| ATOM_SUFFIXES.map(|suffix| format!("{}.{suffix}", t.weight)))
        .filter_map(|name| weights.get(&name))
        .map(|t| (t.len() * t.dtype.bits()).div_ceil(8))
        .sum();
    Ok(AtomModel {
        prefill,
        decode,
        weights,
        report,
        linear_bytes: (linear_bytes, packed),
    })
}

const ATOM_SUFFIXES: [&str; 5] = [
    kiln_ir::atom::PERMUTATION,
    kiln_ir::atom::INT4,
    kiln_ir::atom::INT4_SCALES,
    kiln_ir::atom::INT8,
    kiln_ir::atom::INT8_SCALES,
];

/// Whether `path` is a safetensors file holding Atom weights (a tensor named
/// `*.atom_int4`); reads only the header. Anything else (a directory, a GGUF file, an
/// unreadable file) is `false`, and loading it reports the problem.
pub fn is_quantized_file(path: &Path) -> bool {
    let read_header = || -> std::io::Result<Option<serde_json::Value>> {
        let mut file = std::fs::File::open(path)?;
        let mut length = [0u8; 8];
        file.read_exact(&mut length)?;
        let length = u64::from_le_bytes(length);
        if length > 100_000_000 {
            return Ok(None);
        }
        let mut header = vec![0u8; length as usize];
        file.read_exact(&mut header)?;
        Ok(serde_json::from_slice(&header).ok())
    };
    if !path.is_file() {
        return false;
    }
    match read_header() {
        Ok(Some(serde_json::Value::Object(map))) => map
            .keys()
            .any(|name| name.ends_with(&format!(".{}", kiln_ir::atom::INT4))),
        _ => false,
    }
}
